"""Request rate limiting: a token bucket, so short bursts pass while the long-run rate stays bounded."""

from __future__ import annotations

import math
import time
from collections.abc import Callable

# Float refills (elapsed * rate) land a hair short of whole tokens; this much shortfall still counts as enough.
_EPSILON = 1e-9


class TokenBucket:
    """Requests per second with a burst allowance."""

    def __init__(self, rate_per_s: float, burst: float, clock: Callable[[], float] = time.monotonic) -> None:
        if not rate_per_s > 0 or not burst > 0:
            raise ValueError(f"a token bucket needs rate_per_s > 0 and burst > 0, got {rate_per_s} and {burst}")
        self.rate_per_s = float(rate_per_s)
        self.burst = float(burst)
        self._clock = clock
        self._tokens = self.burst
        self._last = clock()

    def take(self, n: float = 1.0) -> float:
        """0.0 when the n tokens were taken; otherwise the seconds until they would be available (nothing taken).
        More than the burst is never available at once: math.inf."""
        if n > self.burst:
            return math.inf
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + max(0.0, now - self._last) * self.rate_per_s)
        self._last = now
        if self._tokens + _EPSILON >= n:
            self._tokens = max(0.0, self._tokens - n)
            return 0.0
        return (n - self._tokens) / self.rate_per_s
