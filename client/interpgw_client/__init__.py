"""Python SDK for the interpgw interpretability gateway (sync and asyncio), without torch or vLLM."""

from interpgw_client.aio import AsyncClient, AsyncGenerateStream, AsyncSteering
from interpgw_client.client import Client, GenerateStream, Steering
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

__all__ = [
    "AsyncClient",
    "AsyncGenerateStream",
    "AsyncSteering",
    "CancelledError",
    "Client",
    "DeadlineExceededError",
    "GenerateResult",
    "GenerateStream",
    "InternalError",
    "Intervention",
    "InterpgwError",
    "InvalidArgumentError",
    "ModelInfo",
    "NotFoundError",
    "PatchResult",
    "PermissionDeniedError",
    "PromptTrace",
    "ResourceExhaustedError",
    "Steering",
    "SteeringVector",
    "TokenEvent",
    "TopLogits",
    "TraceResult",
    "UnauthenticatedError",
    "UnavailableError",
]
