"""Python SDK for the interpgw interpretability gateway (sync and asyncio), without torch or vLLM."""

from interpgw_client.aio import AsyncClient, AsyncGenerateStream, AsyncKeys, AsyncProbes, AsyncSteering
from interpgw_client.allocator import keep_freed_memory
from interpgw_client.client import Client, GenerateStream, Keys, Probes, Steering
from interpgw_client.errors import (
    CancelledError,
    DeadlineExceededError,
    FailedPreconditionError,
    InternalError,
    InterpgwError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    ResourceExhaustedError,
    UnauthenticatedError,
    UnavailableError,
)
from interpgw_client.keys import ApiKeyInfo
from interpgw_client.protocol import (
    GenerateResult,
    Intervention,
    ModelInfo,
    PatchResult,
    PromptTrace,
    SteeringVector,
    TokenEvent,
    TopLogits,
    TraceResult,
)
from interpgw_client.render import HtmlFragment, render_html
from interpgw_client.signals import Monitor, MonitorEvent, Probe, ProbeScores, Signals, TokenSignals

__all__ = [
    "ApiKeyInfo",
    "AsyncClient",
    "AsyncGenerateStream",
    "AsyncKeys",
    "AsyncProbes",
    "AsyncSteering",
    "CancelledError",
    "Client",
    "DeadlineExceededError",
    "FailedPreconditionError",
    "GenerateResult",
    "GenerateStream",
    "HtmlFragment",
    "InternalError",
    "InterpgwError",
    "Intervention",
    "InvalidArgumentError",
    "Keys",
    "ModelInfo",
    "Monitor",
    "MonitorEvent",
    "NotFoundError",
    "PatchResult",
    "PermissionDeniedError",
    "Probe",
    "ProbeScores",
    "Probes",
    "PromptTrace",
    "ResourceExhaustedError",
    "Signals",
    "Steering",
    "SteeringVector",
    "TokenEvent",
    "TokenSignals",
    "TopLogits",
    "TraceResult",
    "UnauthenticatedError",
    "UnavailableError",
    "keep_freed_memory",
    "render_html",
]
