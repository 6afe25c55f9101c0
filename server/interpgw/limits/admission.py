"""Engine admission: a bounded number of running requests and a bounded FIFO queue in front of them."""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator, Callable

from interpgw.core.errors import ResourceExhausted


class AdmissionGate:
    """Bounds the work sent to the engine: at most `max_active` requests run, at most `max_waiting` wait (FIFO);
    beyond that a request is refused at once with RESOURCE_EXHAUSTED instead of queueing without bound.

    A finishing request hands its slot straight to the oldest waiter, so a newcomer can never overtake the queue.
    Single event loop; not thread-safe. `on_change` is called after every change of `active` or `waiting` (a call
    starting to wait included), so a gauge shows the queue while calls sit in it."""

    def __init__(
        self,
        max_active: int,
        max_waiting: int,
        retry_after_s: float = 1.0,
        on_change: Callable[[], None] | None = None,
    ) -> None:
        if max_active < 1 or max_waiting < 0:
            raise ValueError(f"need max_active >= 1 and max_waiting >= 0, got {max_active} and {max_waiting}")
        self.max_active = max_active
        self.max_waiting = max_waiting
        self.retry_after_s = retry_after_s
        self._active = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        self.on_change = on_change

    @property
    def active(self) -> int:
        return self._active

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Hold one running slot for the body; waits FIFO, or raises ResourceExhausted when the queue is full."""
        await self._enter()
        try:
            yield
        finally:
            self._leave()

    async def _enter(self) -> None:
        if self._active < self.max_active and not self._waiters:
            self._active += 1
            self._changed()
            return
        if len(self._waiters) >= self.max_waiting:
            raise ResourceExhausted(
                f"gateway busy: {self._active} requests running and {len(self._waiters)} waiting (limits "
                f"{self.max_active} running, {self.max_waiting} waiting); retry in {self.retry_after_s:g} s",
                retry_after_s=self.retry_after_s,
            )
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        self._changed()
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self._leave()  # the slot was handed over just as we were cancelled: pass it on
            elif waiter in self._waiters:
                self._waiters.remove(waiter)
                self._changed()
            raise

    def _leave(self) -> None:
        """Hand the slot to the oldest live waiter, else free it."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                self._changed()
                return
        self._active -= 1
        self._changed()

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change()
