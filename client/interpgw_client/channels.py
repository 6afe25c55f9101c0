"""Channels to a gateway, for the sync and asyncio clients alike: plain or TLS, with an optional API key.

The API key travels as `authorization: Bearer <key>` metadata on every call. Over TLS it is attached the usual gRPC
way, as call credentials (`grpc.access_token_call_credentials`), which gRPC only sends over secure channels. Over a
plain channel (a gateway on loopback, or behind a TLS-terminating proxy) gRPC refuses call credentials, so an
interceptor adds the same metadata.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import grpc

API_KEY_ENV = "INTERPGW_API_KEY"


def _with_key(metadata: Sequence[tuple[str, str]] | None, api_key: str) -> list[tuple[str, str]]:
    return [*(metadata or ()), ("authorization", f"Bearer {api_key}")]


class _KeyInterceptor(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    def __init__(self, api_key: str) -> None:
        self._api_key = api_key

    def _details(self, details: Any) -> Any:
        return details._replace(metadata=_with_key(details.metadata, self._api_key))

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)


class _AsyncKeyInterceptor(grpc.aio.UnaryUnaryClientInterceptor, grpc.aio.UnaryStreamClientInterceptor):
    def __init__(self, api_key: str) -> None:
        self._api_key = api_key

    def _details(self, details: Any) -> Any:
        return details._replace(metadata=_with_key(details.metadata, self._api_key))

    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._details(details), request)

    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._details(details), request)


def resolve_api_key(api_key: str | None) -> str | None:
    """The explicit key, else $INTERPGW_API_KEY, else None (a gateway with authentication off)."""
    return api_key if api_key is not None else (os.environ.get(API_KEY_ENV) or None)


def open_channel(
    address: str,
    credentials: grpc.ChannelCredentials | None,
    api_key: str | None,
    options: list[tuple[str, Any]],
) -> grpc.Channel:
    if credentials is not None:
        if api_key:
            credentials = grpc.composite_channel_credentials(credentials, grpc.access_token_call_credentials(api_key))
        return grpc.secure_channel(address, credentials, options=options)
    channel = grpc.insecure_channel(address, options=options)
    return grpc.intercept_channel(channel, _KeyInterceptor(api_key)) if api_key else channel


def open_aio_channel(
    address: str,
    credentials: grpc.ChannelCredentials | None,
    api_key: str | None,
    options: list[tuple[str, Any]],
) -> grpc.aio.Channel:
    if credentials is not None:
        if api_key:
            credentials = grpc.composite_channel_credentials(credentials, grpc.access_token_call_credentials(api_key))
        return grpc.aio.secure_channel(address, credentials, options=options)
    interceptors = [_AsyncKeyInterceptor(api_key)] if api_key else None
    return grpc.aio.insecure_channel(address, options=options, interceptors=interceptors)
