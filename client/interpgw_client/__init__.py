"""Python SDK for the interpgw interpretability gateway (sync and asyncio), without torch or vLLM."""

from interpgw_client.aio import AsyncClient, AsyncGenerateStream, AsyncProbes, AsyncSteering
from interpgw_client.client import Client, GenerateStream, Probes, Steering
from interpgw_client.errors import (
    CancelledError,
    DeadlineExceededError,
    InternalError,
    InterpgwError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    ResourceExhaustedError,
    UnauthenticatedError,
    UnavailableError,
)
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
    "AsyncClient",
    "AsyncGenerateStream",
    "AsyncProbes",
    "AsyncSteering",
    "CancelledError",
    "Client",
    "DeadlineExceededError",
    "GenerateResult",
    "GenerateStream",
    "HtmlFragment",
    "InternalError",
    "InterpgwError",
    "Intervention",
    "InvalidArgumentError",
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
    "render_html",
]
