"""Builds the grpc.aio server: the gateway service, standard health checking and server reflection, over plain
TCP or TLS (mutual TLS when a client CA is given)."""

from __future__ import annotations

from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from interpgw.auth.management import KeyManagement
from interpgw.config import TlsConfig
from interpgw.core.errors import InvalidArgument
from interpgw.metrics import GatewayMetrics
from interpgw.service import GatewayService
from interpgw.transport.chunks import serializer
from interpgw.transport.guard import CallGuard, safe_deserializer
from interpgw.transport.servicer import GatewayServicer
from interpgw.v1 import gateway_pb2

SERVICE = gateway_pb2.DESCRIPTOR.services_by_name["Gateway"]
SERVICE_NAME = SERVICE.full_name


def gateway_handler(servicer: GatewayServicer) -> grpc.GenericRpcHandler:
    """The generated `add_GatewayServicer_to_server`, except that undecodable request bytes (truncated, invalid
    UTF-8, ...) reach the handler as `Undecodable` and are answered INVALID_ARGUMENT instead of INTERNAL, and
    that tensor chunks already in wire format (`chunks.EncodedChunk`) are sent as they are."""
    handlers = {}
    for method in SERVICE.methods:
        request_cls = getattr(gateway_pb2, method.input_type.name)
        response_cls = getattr(gateway_pb2, method.output_type.name)
        make = grpc.unary_stream_rpc_method_handler if method.server_streaming else grpc.unary_unary_rpc_method_handler
        handlers[method.name] = make(
            getattr(servicer, method.name),
            request_deserializer=safe_deserializer(request_cls),
            response_serializer=serializer(response_cls),
        )
    return grpc.method_handlers_generic_handler(SERVICE_NAME, handlers)


def server_credentials(tls: TlsConfig) -> grpc.ServerCredentials | None:
    """TLS credentials from PEM files; None for plain TCP. A client CA turns on mutual TLS (client certs required)."""
    if tls.cert is None and tls.key is None:
        if tls.client_ca is not None:
            raise InvalidArgument("--tls-client-ca needs --tls-cert and --tls-key (mutual TLS is TLS first)")
        return None
    if tls.cert is None or tls.key is None:
        raise InvalidArgument("TLS needs both --tls-cert and --tls-key")
    pair = (Path(tls.key).read_bytes(), Path(tls.cert).read_bytes())
    client_ca = Path(tls.client_ca).read_bytes() if tls.client_ca else None
    return grpc.ssl_server_credentials([pair], root_certificates=client_ca, require_client_auth=client_ca is not None)


class GatewayServer:
    def __init__(
        self,
        service: GatewayService,
        host: str,
        port: int,
        max_message_bytes: int,
        metrics: GatewayMetrics | None = None,
        guard: CallGuard | None = None,
        keys: KeyManagement | None = None,
        credentials: grpc.ServerCredentials | None = None,
    ) -> None:
        self.service = service
        self.metrics = metrics
        options = [
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.so_reuseport", 0),
        ]
        self.server = grpc.aio.server(options=options)
        self.guard = guard if guard is not None else CallGuard(service.limits, quotas=service.quotas, metrics=metrics)
        self.server.add_generic_rpc_handlers((gateway_handler(GatewayServicer(service, metrics, self.guard, keys)),))
        self.health = health_aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        names = (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME)
        reflection.enable_server_reflection(names, self.server)
        address = f"{host}:{port}"
        if credentials is None:
            self.port = self.server.add_insecure_port(address)
        else:
            self.port = self.server.add_secure_port(address, credentials)
        if self.port == 0:
            raise OSError(f"cannot listen on {host}:{port}")

    async def start(self) -> None:
        await self.server.start()
        await self.set_serving(True)

    async def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", SERVICE_NAME):
            await self.health.set(name, status)

    async def stop(self, grace: float) -> None:
        await self.set_serving(False)
        await self.server.stop(grace)
