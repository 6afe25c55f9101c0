"""What every Gateway call passes before its handler runs: decodable bytes, a known API key, the method's role,
the key's quota, and (for calls that run the model) a place in the bounded admission queue.

The decisions live in the core (`interpgw.auth`, `interpgw.limits`, `interpgw.access`); this module only reads
the gRPC metadata and keeps the order: authenticate → role → per-key quota → admission. Whatever is acquired is
released when the call ends by any path (finished, failed, cancelled, deadline).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from interpgw.access import acting_as, quota_of, require_role
from interpgw.auth.authenticator import LOCAL_CALLER, Authenticator, Caller
from interpgw.config import LimitsConfig
from interpgw.core.errors import InvalidArgument, ResourceExhausted
from interpgw.limits import AdmissionGate, QuotaBook

READ, STEER, ADMIN = "read", "steer", "admin"

# The role each method needs. Content-dependent needs (interventions in Generate/Trace, monitors that steer)
# are checked by the core where it resolves them.
METHOD_ROLES: dict[str, str] = {
    "ListModels": READ,
    "GetModelInfo": READ,
    "Generate": READ,
    "Trace": READ,
    "GetTrace": READ,
    "ListVectors": READ,
    "GetVector": READ,
    "ListProbes": READ,
    "GetProbe": READ,
    "Patch": STEER,
    "CreateVector": ADMIN,
    "TrainVector": ADMIN,
    "DeleteVector": ADMIN,
    "TrainProbe": ADMIN,
    "DeleteProbe": ADMIN,
    "CreateApiKey": ADMIN,
    "ListApiKeys": ADMIN,
    "RevokeApiKey": ADMIN,
}

# Methods that run the model: they take a place in the admission queue.
ENGINE_METHODS = frozenset({"Generate", "Trace", "Patch", "TrainVector", "TrainProbe"})


class Undecodable:
    """Stands in for a request whose bytes did not parse, so the handler can answer INVALID_ARGUMENT (grpc's own
    deserializer failure would answer INTERNAL)."""

    def __init__(self, type_name: str, error: Exception) -> None:
        self.type_name = type_name
        self.error = error


def safe_deserializer(message_type: Any) -> Callable[[bytes], Any]:
    def deserialize(data: bytes) -> Any:
        try:
            return message_type.FromString(data)
        except (DecodeError, ValueError, RuntimeError) as exc:  # malformed wire data, invalid UTF-8, too deep
            return Undecodable(message_type.DESCRIPTOR.full_name, exc)

    return deserialize


def metadata_value(context: grpc.aio.ServicerContext, key: str) -> str | None:
    """The first value of a (non-binary) metadata key of the call, or None."""
    for name, value in context.invocation_metadata() or ():
        if name == key:
            return value if isinstance(value, str) else None
    return None


class CallGuard:
    def __init__(
        self,
        limits: LimitsConfig,
        authenticator: Authenticator | None = None,
        admission: AdmissionGate | None = None,
        quotas: QuotaBook | None = None,
        metrics: Any = None,
    ) -> None:
        self.limits = limits
        self.authenticator = authenticator  # None: authentication off, every call is the local user
        self.admission = admission or AdmissionGate(limits.max_active_requests, limits.max_queued_requests)
        self.quotas = quotas or QuotaBook()
        self.metrics = metrics
        if metrics is not None:
            self.admission.on_change = self._report_admission  # the gauges follow every enter, wait and leave

    @contextlib.asynccontextmanager
    async def enter(self, method: str, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Caller]:
        if isinstance(request, Undecodable):
            raise InvalidArgument(f"the request is not a valid {request.type_name} message: {request.error}")
        caller = LOCAL_CALLER
        if self.authenticator is not None:
            caller = await self.authenticator.authenticate(metadata_value(context, "authorization"))
        with acting_as(caller):
            require_role(METHOD_ROLES.get(method, ADMIN), method)
            async with contextlib.AsyncExitStack() as held:
                held.enter_context(self._key_quota(caller))
                if method in ENGINE_METHODS:
                    await held.enter_async_context(self._admitted())
                yield caller

    def _key_quota(self, caller: Caller) -> contextlib.AbstractContextManager:
        try:
            return self.quotas.acquire(caller.key_id, quota_of(caller, self.limits))
        except ResourceExhausted:
            self._rejected("key_quota")
            raise

    @contextlib.asynccontextmanager
    async def _admitted(self) -> AsyncIterator[None]:
        entered = False
        try:
            async with self.admission.slot():
                entered = True
                yield
        except ResourceExhausted:
            if not entered:  # refused by the queue; the same error from the call's body is not an admission refusal
                self._rejected("admission")
            raise

    def _rejected(self, limit: str) -> None:
        if self.metrics is not None:
            self.metrics.rejected(limit)

    def _report_admission(self) -> None:
        self.metrics.admission(self.admission.active, self.admission.waiting)
