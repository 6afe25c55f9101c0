"""One mapping from core errors to gRPC status codes, applied to every RPC, which is also guarded (authentication,
roles, limits: `guard.py`), counted and timed.

RESOURCE_EXHAUSTED from a limit carries a `google.rpc.RetryInfo` detail (the standard rich-status way to say when
to retry, which gRPC clients and proxies understand) in addition to the message.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc._cython.cygrpc import ExecuteBatchError  # what grpc-aio's own server loop catches for a reset stream
from grpc_status import rpc_status

from interpgw.core.errors import GatewayError, ResourceExhausted
from interpgw.transport.observe import observe

log = logging.getLogger(__name__)


def status_code(error: GatewayError) -> grpc.StatusCode:
    return getattr(grpc.StatusCode, error.code, grpc.StatusCode.INTERNAL)


def _error_code(exc: BaseException) -> grpc.StatusCode:
    return status_code(exc) if isinstance(exc, GatewayError) else grpc.StatusCode.INTERNAL


def _aborted_code(context: grpc.aio.ServicerContext) -> grpc.StatusCode:
    """The code a handler passed to `context.abort` itself."""
    try:
        code = context.code()
    except Exception:  # noqa: BLE001 - metrics only
        code = None
    return code if isinstance(code, grpc.StatusCode) else grpc.StatusCode.UNKNOWN


# A client's deadline travels as a relative timeout, so the server's deadline is later than the client's by the
# request's transit (and any wait before gRPC read it). When the client's deadline fires first, its cancellation
# arrives while the server still has that much time left: a cancel this close to the deadline is the deadline.
DEADLINE_SLACK_S = 1.0


def _gone_code(context: grpc.aio.ServicerContext) -> grpc.StatusCode:
    """The client went away (its handler was cancelled): by its deadline, or it cancelled."""
    try:
        remaining = context.time_remaining()
    except Exception:  # noqa: BLE001 - metrics only
        remaining = None
    if remaining is not None and remaining <= DEADLINE_SLACK_S:
        return grpc.StatusCode.DEADLINE_EXCEEDED
    return grpc.StatusCode.CANCELLED


def _retry_status(message: str, retry_after_s: float) -> grpc.Status:
    delay = duration_pb2.Duration()
    delay.FromNanoseconds(int(max(0.0, retry_after_s) * 1e9))
    detail = any_pb2.Any()
    detail.Pack(error_details_pb2.RetryInfo(retry_delay=delay))
    status = status_pb2.Status(code=code_pb2.RESOURCE_EXHAUSTED, message=message, details=[detail])
    return rpc_status.to_status(status)


# A status message travels in HTTP/2 trailers, percent-encoded (3 bytes per non-ASCII byte), and gRPC caps them
# (8 KiB soft, 16 KiB hard by default): a message quoting a huge field back would reach the client as an opaque
# "metadata size exceeds limit" instead of the explanation.
MAX_MESSAGE_BYTES = 2000


def _message(exc: BaseException) -> str:
    text = str(exc)
    raw = text.encode("utf-8")
    if len(raw) <= MAX_MESSAGE_BYTES:
        return text
    kept = raw[:MAX_MESSAGE_BYTES].decode("utf-8", errors="ignore")
    return f"{kept}… ({len(raw) - len(kept.encode('utf-8'))} more bytes cut)"


async def _abort(context: grpc.aio.ServicerContext, exc: BaseException) -> None:
    if isinstance(exc, ResourceExhausted) and exc.retry_after_s is not None and exc.retry_after_s != float("inf"):
        await context.abort_with_status(_retry_status(_message(exc), exc.retry_after_s))
    if isinstance(exc, GatewayError):
        await context.abort(status_code(exc), _message(exc))
    log.exception("unexpected error in RPC", exc_info=exc)
    await context.abort(
        grpc.StatusCode.INTERNAL, _message(RuntimeError(f"internal error: {type(exc).__name__}: {exc}"))
    )


def _guarded(servicer: Any, method: str, request: Any, context: grpc.aio.ServicerContext) -> Any:
    guard = getattr(servicer, "guard", None)
    return guard.enter(method, request, context) if guard is not None else contextlib.nullcontext()


def unary(method: Callable[..., Any]) -> Callable[..., Any]:
    name = method.__name__

    @functools.wraps(method)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        call = observe(self, name, request)
        code = grpc.StatusCode.UNKNOWN
        try:
            async with _guarded(self, name, request, context):
                response = await method(self, request, context)
            code = grpc.StatusCode.OK
            return response
        except grpc.aio.AbortError:
            code = _aborted_code(context)
            raise
        except asyncio.CancelledError:
            code = _gone_code(context)
            raise
        except Exception as exc:  # noqa: BLE001 - every error becomes a status, never a crash
            code = _error_code(exc)
            await _abort(context, exc)
        finally:
            call.finish(code)

    return wrapper


def streaming(method: Callable[..., AsyncIterator[Any]]) -> Callable[..., Awaitable[None]]:
    """Serves an async-generator handler through gRPC's writer API (`context.write`), not as a generator.

    Handed a generator, grpc-aio writes each item outside it; a client that goes away while a write is pending
    cancels grpc's task there and leaves the generator suspended, to be closed whenever the garbage collector
    finds it, in another task: the engine request ran on until then, and the caller's context variables could not
    be reset ("created in a different Context"), so the call ended as INTERNAL. Writing here keeps every exit
    (finished, failed, cancelled, deadline) in the RPC's own task, and closes the handler's generator at once.
    """
    name = method.__name__

    @functools.wraps(method)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> None:
        call = observe(self, name, request)
        code = grpc.StatusCode.UNKNOWN
        try:
            async with _guarded(self, name, request, context):
                async with contextlib.aclosing(method(self, request, context)) as items:
                    async for item in items:
                        call.message(item)
                        await context.write(item)
            code = grpc.StatusCode.OK
        except grpc.aio.AbortError:
            code = _aborted_code(context)
            raise
        except asyncio.CancelledError:  # the client cancelled, or its deadline passed
            code = _gone_code(context)
            raise
        except ExecuteBatchError:  # gRPC core refused a write: the client reset the stream before its cancel reached us
            code = _gone_code(context)
            raise asyncio.CancelledError() from None  # how grpc-aio ends a call whose client is gone, quietly
        except Exception as exc:  # noqa: BLE001
            code = _error_code(exc)
            await _abort(context, exc)
        finally:
            call.finish(code)

    return wrapper
