"""Python SDK for the interpgw interpretability gateway (sync and asyncio), without torch or vLLM."""

from interpgw_client.aio import AsyncClient, AsyncGenerateStream
from interpgw_client.client import Client, GenerateStream
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
from interpgw_client.protocol import GenerateResult, ModelInfo, PromptTrace, TokenEvent, TopLogits, TraceResult

__all__ = [
    "AsyncClient",
    "AsyncGenerateStream",
    "CancelledError",
    "Client",
    "DeadlineExceededError",
    "GenerateResult",
    "GenerateStream",
    "InternalError",
    "InterpgwError",
    "InvalidArgumentError",
    "ModelInfo",
    "NotFoundError",
    "PermissionDeniedError",
    "PromptTrace",
    "ResourceExhaustedError",
    "TokenEvent",
    "TopLogits",
    "TraceResult",
    "UnauthenticatedError",
    "UnavailableError",
]
