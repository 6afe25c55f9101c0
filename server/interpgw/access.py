"""Who the current request acts for, carried in a context variable.

The transport authenticates each call and sets the caller before handing it to the core; registry views
(`registry.tenancy`), role checks and per-key limits inside the core read it from here, so the core's signatures do
not thread a caller through every helper. With authentication off every call acts as `LOCAL_CALLER` (one local user
with every role), which is also what code outside any request (tests, benchmarks) sees.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar

from interpgw.auth.authenticator import LOCAL_CALLER, Caller
from interpgw.config import LimitsConfig
from interpgw.core.errors import PermissionDenied
from interpgw.limits import Quota

_current: ContextVar[Caller] = ContextVar("interpgw_caller", default=LOCAL_CALLER)


def current_caller() -> Caller:
    return _current.get()


@contextlib.contextmanager
def acting_as(caller: Caller) -> Iterator[Caller]:
    """Runs the body as `caller` (tasks created inside inherit it)."""
    token = _current.set(caller)
    try:
        yield caller
    finally:
        _current.reset(token)


def require_role(role: str, what: str) -> None:
    """PERMISSION_DENIED unless the current caller's key has `role`; `what` names the action for the message."""
    caller = _current.get()
    if not caller.has(role):
        have = ", ".join(sorted(caller.roles)) or "none"
        raise PermissionDenied(f"{what} needs the {role!r} role; this API key has: {have}")


def _pick(own: float | int | None, default: float | int | None) -> float | int | None:
    return own if own is not None else default


def quota_of(caller: Caller, limits: LimitsConfig) -> Quota:
    """The caller's key limits, each falling back to the server's per-key default."""
    own = caller.limits
    return Quota(
        requests_per_s=_pick(own.requests_per_s, limits.key_requests_per_s),
        burst=_pick(own.burst, limits.key_burst),
        max_concurrent=_pick(own.max_concurrent, limits.key_max_concurrent),
        capture_bytes_per_min=_pick(own.capture_bytes_per_min, limits.key_capture_bytes_per_min),
    )


def max_new_tokens_of(caller: Caller, limits: LimitsConfig) -> int:
    """The most tokens one request of this caller may generate: the server's cap, lowered by the key's own."""
    own = caller.limits.max_tokens
    return limits.max_new_tokens if own is None else min(own, limits.max_new_tokens)
