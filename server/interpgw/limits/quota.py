"""Per-API-key quotas: concurrency, request rate and captured bytes per minute, with bounded per-key state."""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType

from interpgw.core.errors import ResourceExhausted
from interpgw.limits.rate import TokenBucket
from interpgw.limits.window import SlidingWindowBudget

CONCURRENCY_RETRY_S = 1.0  # a slot frees when some request of the key ends: unknowable, so a fixed hint


@dataclass(frozen=True)
class Quota:
    """One API key's effective limits (None: unlimited)."""

    requests_per_s: float | None = None
    burst: int | None = None  # None with a rate: max(1, ceil(rate)); ignored without a rate
    max_concurrent: int | None = None
    capture_bytes_per_min: int | None = None

    def __post_init__(self) -> None:
        if self.requests_per_s is not None and not self.requests_per_s > 0:
            raise ValueError(f"requests_per_s must be > 0 (or None: unlimited), got {self.requests_per_s}")
        for name, low in (("burst", 1), ("max_concurrent", 1), ("capture_bytes_per_min", 0)):
            value = getattr(self, name)
            if value is not None and value < low:
                raise ValueError(f"{name} must be >= {low} (or None: unlimited), got {value}")

    @property
    def effective_burst(self) -> int | None:
        if self.requests_per_s is None:
            return None
        return self.burst if self.burst is not None else max(1, math.ceil(self.requests_per_s))


class Ticket:
    """One admitted request; release() (idempotent) frees its concurrency slot. Also a context manager."""

    def __init__(self, release: Callable[[], None]) -> None:
        self._release: Callable[[], None] | None = release

    @property
    def released(self) -> bool:
        return self._release is None

    def release(self) -> None:
        release, self._release = self._release, None
        if release is not None:
            release()

    def __enter__(self) -> Ticket:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()


class _KeyState:
    """One key's limiters, each rebuilt when the quota values it was built from change."""

    def __init__(self) -> None:
        self.in_flight = 0
        self.bucket: TokenBucket | None = None
        self.bucket_params: tuple[float, int] | None = None
        self.window: SlidingWindowBudget | None = None
        self.window_limit: int | None = None

    def bucket_for(self, quota: Quota, clock: Callable[[], float]) -> TokenBucket | None:
        params = None if quota.requests_per_s is None else (quota.requests_per_s, quota.effective_burst)
        if params != self.bucket_params:
            self.bucket_params = params
            self.bucket = None if params is None else TokenBucket(params[0], params[1], clock)
        return self.bucket

    def window_for(self, quota: Quota, clock: Callable[[], float]) -> SlidingWindowBudget | None:
        limit = quota.capture_bytes_per_min
        if limit != self.window_limit:
            self.window_limit = limit
            self.window = None if limit is None else SlidingWindowBudget(limit, 60.0, clock)
        return self.window


def _seconds(value: float) -> str:
    return f"{value:.2g}" if value < 10 else f"{value:.0f}"


class QuotaBook:
    """Per-key limiter state. Bounded: keeps at most `max_keys` keys' state (least recently used dropped first,
    but never a key with requests in flight), so a flood of distinct keys cannot grow memory.

    A dropped key starts afresh (full burst, empty capture window) when it comes back, so `max_keys` should exceed
    the number of keys active within a minute. Keys with requests in flight are held apart from the LRU order
    (their number is bounded by admission), so eviction never scans past them. Not thread-safe: one event loop."""

    def __init__(self, max_keys: int = 10_000, clock: Callable[[], float] = time.monotonic) -> None:
        if max_keys < 1:
            raise ValueError(f"max_keys must be >= 1, got {max_keys}")
        self.max_keys = max_keys
        self._clock = clock
        self._idle: OrderedDict[str, _KeyState] = OrderedDict()  # least recently used first
        self._busy: dict[str, _KeyState] = {}

    def __len__(self) -> int:
        return len(self._idle) + len(self._busy)

    def _state(self, key_id: str) -> _KeyState:
        """The key's state, now the most recently used; a new key first makes room for itself."""
        state = self._busy.get(key_id)
        if state is not None:
            return state
        state = self._idle.pop(key_id, None)
        if state is None:
            state = _KeyState()
            self._shrink(self.max_keys - 1)
        self._idle[key_id] = state
        return state

    def _shrink(self, size: int) -> None:
        """Drop least recently used idle keys until at most `size` keys are kept (busy keys always are)."""
        while len(self) > size and self._idle:
            self._idle.popitem(last=False)

    def acquire(self, key_id: str, quota: Quota) -> Ticket:
        """Admit one request of `key_id`: concurrency first, then rate; on refusal nothing is consumed."""
        state = self._state(key_id)
        if quota.max_concurrent is not None and state.in_flight >= quota.max_concurrent:
            raise ResourceExhausted(
                f"concurrency limit of {quota.max_concurrent} requests in flight for this API key reached; "
                f"retry in {_seconds(CONCURRENCY_RETRY_S)} s",
                retry_after_s=CONCURRENCY_RETRY_S,
            )
        bucket = state.bucket_for(quota, self._clock)
        if bucket is not None:
            wait = bucket.take()
            if wait > 0:
                raise ResourceExhausted(
                    f"rate limit of {quota.requests_per_s:g} requests/s for this API key exceeded; "
                    f"retry in {_seconds(wait)} s",
                    retry_after_s=wait,
                )
        if state.in_flight == 0:
            del self._idle[key_id]
            self._busy[key_id] = state
        state.in_flight += 1
        return Ticket(lambda: self._release(key_id, state))

    def _release(self, key_id: str, state: _KeyState) -> None:
        state.in_flight -= 1
        if state.in_flight == 0:
            del self._busy[key_id]
            self._idle[key_id] = state
            self._shrink(self.max_keys)  # over the bound while every key was busy: back under it

    def charge_capture(self, key_id: str, quota: Quota, nbytes: int) -> None:
        """Count `nbytes` captured against the key's per-minute budget, or refuse them (nothing counted)."""
        window = self._state(key_id).window_for(quota, self._clock)
        if window is None:
            return
        wait = window.charge(nbytes)
        if wait == 0:
            return
        limit = quota.capture_bytes_per_min
        if math.isinf(wait):
            raise ResourceExhausted(
                f"this request alone would capture {nbytes} bytes, more than the key's {limit} bytes per minute",
                retry_after_s=None,
            )
        raise ResourceExhausted(
            f"capture limit of {limit} bytes per minute for this API key exceeded ({window.used():.0f} bytes captured "
            f"in the last minute, this request needs {nbytes}); retry in {_seconds(wait)} s",
            retry_after_s=wait,
        )

    def in_flight(self, key_id: str) -> int:
        state = self._busy.get(key_id)
        return 0 if state is None else state.in_flight
