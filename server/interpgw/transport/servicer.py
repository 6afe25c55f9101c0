"""The gRPC servicer: thin. Converts messages, calls the service core, streams results."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import grpc
from google.protobuf import timestamp_pb2

from interpgw.auth.keys import ApiKey, KeyLimits
from interpgw.auth.management import KeyManagement
from interpgw.core.requests import GenerateDone, TokenDelta, TracedPrompt
from interpgw.metrics import GatewayMetrics
from interpgw.service import GatewayService
from interpgw.transport import convert
from interpgw.transport.chunks import EncodedChunk, encoded_tensor_messages
from interpgw.transport.errors import streaming, unary
from interpgw.transport.guard import CallGuard, metadata_value
from interpgw.v1 import gateway_pb2 as pb
from interpgw.v1 import gateway_pb2_grpc as pb_grpc

FAULT_METADATA = "x-interpgw-fault"


def _fault(context: grpc.aio.ServicerContext) -> str:
    return metadata_value(context, FAULT_METADATA) or ""


class GatewayServicer(pb_grpc.GatewayServicer):
    def __init__(
        self,
        service: GatewayService,
        metrics: GatewayMetrics | None = None,
        guard: CallGuard | None = None,
        keys: KeyManagement | None = None,
    ) -> None:
        self.service = service
        self.metrics = metrics  # read by the `unary`/`streaming` decorators; None: not measured
        self.guard = guard  # read by the decorators: authentication, roles, limits; None: none
        self.keys = keys or KeyManagement(None)

    @unary
    async def ListModels(self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext):
        models = [convert.model_info(f, self.service.hook_points(f.id)) for f in self.service.list_models()]
        return pb.ListModelsResponse(models=models)

    @unary
    async def GetModelInfo(self, request: pb.GetModelInfoRequest, context: grpc.aio.ServicerContext):
        facts = self.service.model(request.model).facts
        return convert.model_info(facts, self.service.hook_points(facts.id))

    @streaming
    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateResponse | EncodedChunk]:
        async for event in self.service.generate(convert.generate_input(request), fault=_fault(context)):
            if isinstance(event, TokenDelta):
                token = pb.TokenEvent(
                    index=event.index,
                    token_ids=event.token_ids,
                    text=event.text,
                    variant=event.variant,
                    signals=[convert.token_signals(s) for s in event.signals],
                    events=[convert.monitor_event(e) for e in event.events],
                )
                yield pb.GenerateResponse(token=token)
            elif isinstance(event, GenerateDone):
                positions: list[int] = []
                if event.captured is not None:
                    positions = event.captured.positions
                    for chunk in encoded_tensor_messages(pb.GenerateResponse, event.variant, event.captured):
                        yield chunk
                done = pb.GenerateDone(
                    finish_reason=event.finish_reason,
                    prompt_token_ids=event.prompt_token_ids,
                    output_token_ids=event.output_token_ids,
                    text=event.text,
                    captured_positions=positions,
                    cached_prompt_tokens=event.cached_prompt_tokens,
                    variant=event.variant,
                    scores=event.scores,
                    monitor_events=[convert.monitor_event(e) for e in event.monitor_events],
                )
                if event.seed is not None:
                    done.seed = event.seed
                yield pb.GenerateResponse(done=done)

    @streaming
    async def Trace(
        self, request: pb.TraceRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.TraceResponse | EncodedChunk]:
        trace = self.service.trace(convert.trace_input(request), fault=_fault(context), public=request.public)
        async for traced in trace:
            for message in _trace_messages(traced):
                yield message

    @streaming
    async def GetTrace(
        self, request: pb.GetTraceRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.TraceResponse | EncodedChunk]:
        for message in _trace_messages(await self.service.get_trace(request.handle)):
            yield message

    # ------------------------------------------------------------------ steering-vector registry

    @unary
    async def CreateVector(self, request: pb.CreateVectorRequest, context: grpc.aio.ServicerContext):
        tensor = convert.tensor_from_proto(request.tensor, "tensor")
        record = await self.service.steering.create_vector(
            request.model, list(request.hooks), tensor, request.name, request.description, public=request.public
        )
        return convert.steering_vector(record)

    @unary
    async def TrainVector(self, request: pb.TrainVectorRequest, context: grpc.aio.ServicerContext):
        record = await self.service.steering.train_vector(convert.train_vector_input(request), public=request.public)
        return convert.steering_vector(record)

    @unary
    async def ListVectors(self, request: pb.ListVectorsRequest, context: grpc.aio.ServicerContext):
        records = await self.service.steering.list_vectors(request.model)
        return pb.ListVectorsResponse(vectors=[convert.steering_vector(r, with_tensor=False) for r in records])

    @unary
    async def GetVector(self, request: pb.GetVectorRequest, context: grpc.aio.ServicerContext):
        return convert.steering_vector(await self.service.steering.get_vector(request.id))

    @unary
    async def DeleteVector(self, request: pb.DeleteVectorRequest, context: grpc.aio.ServicerContext):
        return pb.DeleteVectorResponse(deleted=await self.service.steering.delete_vector(request.id))

    # ------------------------------------------------------------------ probes

    @unary
    async def TrainProbe(self, request: pb.TrainProbeRequest, context: grpc.aio.ServicerContext):
        record = await self.service.probes.train(convert.train_probe_input(request), public=request.public)
        return convert.probe(record)

    @unary
    async def ListProbes(self, request: pb.ListProbesRequest, context: grpc.aio.ServicerContext):
        records = await self.service.probes.list(request.model)
        return pb.ListProbesResponse(probes=[convert.probe(r, with_tensor=False) for r in records])

    @unary
    async def GetProbe(self, request: pb.GetProbeRequest, context: grpc.aio.ServicerContext):
        return convert.probe(await self.service.probes.get(request.id))

    @unary
    async def DeleteProbe(self, request: pb.DeleteProbeRequest, context: grpc.aio.ServicerContext):
        return pb.DeleteProbeResponse(deleted=await self.service.probes.delete(request.id))

    # ------------------------------------------------------------------ API keys

    @unary
    async def CreateApiKey(self, request: pb.CreateApiKeyRequest, context: grpc.aio.ServicerContext):
        limits = _key_limits_from_proto(request.limits) if request.HasField("limits") else None
        secret, key = await self.keys.create(list(request.roles), request.name, limits)
        return pb.CreateApiKeyResponse(secret=secret, key=_api_key_info(key))

    @unary
    async def ListApiKeys(self, request: pb.ListApiKeysRequest, context: grpc.aio.ServicerContext):
        return pb.ListApiKeysResponse(keys=[_api_key_info(k) for k in await self.keys.list()])

    @unary
    async def RevokeApiKey(self, request: pb.RevokeApiKeyRequest, context: grpc.aio.ServicerContext):
        return pb.RevokeApiKeyResponse(revoked=await self.keys.revoke(request.id))

    # ------------------------------------------------------------------ patching

    @unary
    async def Patch(self, request: pb.PatchRequest, context: grpc.aio.ServicerContext):
        return convert.patch_response(await self.service.steering.patch(convert.patch_input(request)))


def _trace_messages(traced: TracedPrompt) -> Iterator[pb.TraceResponse | EncodedChunk]:
    """One prompt's result, then its tensors in chunks."""
    yield pb.TraceResponse(prompt=convert.trace_prompt_result(traced))
    if traced.captured is not None:
        yield from encoded_tensor_messages(pb.TraceResponse, traced.prompt_index, traced.captured)


_LIMIT_FIELDS = ("requests_per_s", "burst", "max_concurrent", "capture_bytes_per_min", "max_tokens")


def _key_limits_from_proto(message: pb.KeyLimits) -> KeyLimits:
    return KeyLimits.from_json({f: getattr(message, f) for f in _LIMIT_FIELDS if message.HasField(f)})


def _api_key_info(key: ApiKey) -> pb.ApiKeyInfo:
    created = timestamp_pb2.Timestamp()
    created.FromNanoseconds(int(key.created * 1e9))
    limits = pb.KeyLimits(**{f: v for f in _LIMIT_FIELDS if (v := getattr(key.limits, f)) is not None})
    return pb.ApiKeyInfo(
        id=key.id, tenant=key.tenant, roles=sorted(key.roles), name=key.name, created=created, limits=limits
    )
