"""Quantity budgets over a sliding time window (captured bytes per minute), in fixed memory."""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable


class SlidingWindowBudget:
    """A quantity per time window (captured bytes per minute): sum of charges in the last `window_s` seconds.

    The window is cut into `slots` equal slots and a charge is kept as part of its slot's total, so memory is
    bounded by `slots` whatever the traffic; a charge counts until its whole slot has left the window (between
    `window_s - window_s / slots` and `window_s` seconds)."""

    def __init__(
        self, limit: float, window_s: float = 60.0, clock: Callable[[], float] = time.monotonic, slots: int = 60
    ) -> None:
        if limit < 0 or not window_s > 0 or slots < 1:
            raise ValueError(f"need limit >= 0, window_s > 0 and slots >= 1, got {limit}, {window_s}, {slots}")
        self.limit = float(limit)
        self.window_s = float(window_s)
        self._slot_s = self.window_s / slots
        self._slots = slots
        self._clock = clock
        self._charges: deque[list[float]] = deque()  # [slot index, total], oldest first, at most `slots` entries
        self._used = 0.0

    def _expire(self, now: float) -> int:
        """Drop slots that left the window; the current slot's index."""
        current = math.floor(now / self._slot_s)
        while self._charges and self._charges[0][0] <= current - self._slots:
            self._used -= self._charges.popleft()[1]
        if not self._charges:
            self._used = 0.0  # no float drift left behind by the subtractions
        return current

    def used(self) -> float:
        self._expire(self._clock())
        return self._used

    def charge(self, amount: float) -> float:
        """0.0 when accepted (and recorded); else seconds until enough of the window expires for it to fit (nothing
        recorded). An amount larger than the whole limit is never accepted: math.inf."""
        if amount < 0:
            raise ValueError(f"a charge is >= 0, got {amount}")
        if amount > self.limit:
            return math.inf
        now = self._clock()
        current = self._expire(now)
        excess = self._used + amount - self.limit
        if excess <= 0:
            if amount:
                if self._charges and self._charges[-1][0] == current:
                    self._charges[-1][1] += amount
                else:
                    self._charges.append([current, amount])
                self._used += amount
            return 0.0
        # The oldest slots leave first; it fits once the slot that frees enough has left (at the latest the newest:
        # amount <= limit, so an empty window always has room).
        fits_after = self._charges[-1][0]
        freed = 0.0
        for index, total in self._charges:
            freed += total
            if freed >= excess:
                fits_after = index
                break
        return max(1e-6, (fits_after + self._slots) * self._slot_s - now)  # > 0: a refusal never reads as accepted
