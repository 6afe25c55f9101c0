"""Channels to a gateway, for the sync and asyncio clients alike: plain or TLS, with an optional API key, to one
replica or balanced across several.

Several replicas: give a list of addresses (or "host1:port,host2:port"), or a DNS name that resolves to every
replica (`dns:///interpgw-headless.ns.svc:50051`, a Kubernetes headless Service). gRPC's own client-side
`round_robin` policy spreads calls over them and skips replicas that are down, and its retry policy repeats a call
that failed with UNAVAILABLE (or a shutting-down server's CANCELLED) before any reply arrived, for the methods that
change nothing on the server (so a stopped replica costs its in-flight streams, never a request sent after it
stopped).

The API key travels as `authorization: Bearer <key>` metadata on every call. Over TLS it is attached the usual gRPC
way, as call credentials (`grpc.access_token_call_credentials`), which gRPC only sends over secure channels. Over a
plain channel (a gateway on loopback, or behind a TLS-terminating proxy) gRPC refuses call credentials, so an
interceptor adds the same metadata.
"""

from __future__ import annotations

import ipaddress
import json
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


SERVICE = "interpgw.v1.Gateway"
# Methods that change nothing on the server (Trace(store=true) stores under a content handle: repeating it is
# harmless), so gRPC may retry them on another replica.
RETRYABLE_METHODS = (
    "ListModels",
    "GetModelInfo",
    "Generate",
    "Trace",
    "GetTrace",
    "Patch",
    "ListVectors",
    "GetVector",
    "ListProbes",
    "GetProbe",
    "ListApiKeys",
)
SERVICE_CONFIG = json.dumps(
    {
        "loadBalancingConfig": [{"round_robin": {}}],
        "methodConfig": [
            {
                "name": [{"service": SERVICE, "method": m} for m in RETRYABLE_METHODS]
                + [{"service": "grpc.health.v1.Health", "method": "Check"}],
                "retryPolicy": {
                    "maxAttempts": 4,
                    "initialBackoff": "0.1s",
                    "maxBackoff": "2s",
                    "backoffMultiplier": 2,
                    # CANCELLED: what a server answers to a call it never ran as it shuts down (see
                    # errors.SHUTDOWN_CANCELLED_DETAILS); the client's own cancels are never retried
                    "retryableStatusCodes": ["UNAVAILABLE", "CANCELLED"],
                },
            }
        ],
    }
)


def target(address: str | Sequence[str]) -> str:
    """A gRPC target for one address, a list of "ip:port" / "localhost:port", or a comma-separated list of them.
    A target that already names its resolver ("dns:///name:port", "ipv4:a:p,b:p", "unix:path") is used as it is."""
    if isinstance(address, str) and address.split(":", 1)[0] in ("dns", "ipv4", "ipv6", "unix", "unix-abstract"):
        return address
    addresses = [a.strip() for a in address.split(",")] if isinstance(address, str) else [a.strip() for a in address]
    addresses = [a for a in addresses if a]
    if len(addresses) == 1:
        return addresses[0]
    if not addresses:
        raise ValueError("no gateway address given")
    hosts = []
    for a in addresses:
        host, _, port = a.rpartition(":")
        host = host.strip("[]")
        if host == "localhost":
            host = "127.0.0.1"
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            raise ValueError(
                f"several addresses must be IP:port (got {a!r}); for host names use one DNS name that resolves to "
                "every replica, e.g. dns:///interpgw-headless.namespace.svc:50051"
            ) from None
        hosts.append((ip.version, f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"))
    versions = {v for v, _ in hosts}
    if len(versions) > 1:
        raise ValueError("several addresses must all be IPv4 or all IPv6")
    return f"ipv{versions.pop()}:" + ",".join(h for _, h in hosts)


def balanced_options(options: list[tuple[str, Any]]) -> list[tuple[str, Any]]:
    return [*options, ("grpc.service_config", SERVICE_CONFIG), ("grpc.enable_retries", 1)]


def resolve_api_key(api_key: str | None) -> str | None:
    """The explicit key, else $INTERPGW_API_KEY, else None (a gateway with authentication off)."""
    return api_key if api_key is not None else (os.environ.get(API_KEY_ENV) or None)


def open_channel(
    address: str | Sequence[str],
    credentials: grpc.ChannelCredentials | None,
    api_key: str | None,
    options: list[tuple[str, Any]],
) -> grpc.Channel:
    address, options = target(address), balanced_options(options)
    if credentials is not None:
        if api_key:
            credentials = grpc.composite_channel_credentials(credentials, grpc.access_token_call_credentials(api_key))
        return grpc.secure_channel(address, credentials, options=options)
    channel = grpc.insecure_channel(address, options=options)
    return grpc.intercept_channel(channel, _KeyInterceptor(api_key)) if api_key else channel


def open_aio_channel(
    address: str | Sequence[str],
    credentials: grpc.ChannelCredentials | None,
    api_key: str | None,
    options: list[tuple[str, Any]],
) -> grpc.aio.Channel:
    address, options = target(address), balanced_options(options)
    if credentials is not None:
        if api_key:
            credentials = grpc.composite_channel_credentials(credentials, grpc.access_token_call_credentials(api_key))
        return grpc.aio.secure_channel(address, credentials, options=options)
    interceptors = [_AsyncKeyInterceptor(api_key)] if api_key else None
    return grpc.aio.insecure_channel(address, options=options, interceptors=interceptors)
