"""asyncio client: the same methods as `Client`, awaitable; streams are async iterators."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from interpgw.v1 import gateway_pb2 as pb
from interpgw_client import keys as K
from interpgw_client import protocol as P
from interpgw_client import signals as S
from interpgw_client.channels import open_aio_channel, resolve_api_key
from interpgw_client.chunks import ReceivedChunk, gateway_stub
from interpgw_client.client import DEFAULT_ADDRESS
from interpgw_client.errors import from_rpc_error


async def _unary(rpc: Callable[..., Any], request: Any, timeout: float | None, metadata: Any = None) -> Any:
    """One unary call with the SDK's typed errors."""
    try:
        return await rpc(request, timeout=timeout, metadata=metadata)
    except grpc.RpcError as exc:
        raise from_rpc_error(exc) from None


class AsyncGenerateStream:
    """`async for event in stream` yields TokenEvents (`.variant` 1: the unsteered baseline); `.result` holds the
    GenerateResult at the end, with the baseline as `.result.baseline`."""

    def __init__(self, call: grpc.aio.UnaryStreamCall, assembler: P.GenerateAssembler) -> None:
        self._call = call
        self._assembler = assembler
        self.result: P.GenerateResult | None = None

    async def __aiter__(self) -> AsyncIterator[P.TokenEvent]:
        try:
            async for message in self._call:
                event = self._assembler.add(message)
                if event is not None:
                    yield event
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None
        self.result = self._assembler.result()

    def cancel(self) -> None:
        self._call.cancel()

    async def collect(self) -> P.GenerateResult:
        async for _ in self:
            pass
        assert self.result is not None, "stream ended without a final message"
        return self.result


class AsyncClient:
    def __init__(
        self,
        address: str | Sequence[str] = DEFAULT_ADDRESS,
        *,
        credentials: grpc.ChannelCredentials | None = None,
        api_key: str | None = None,
        as_torch: bool = False,
        timeout: float | None = None,
        max_message_bytes: int = 64 * 2**20,
    ) -> None:
        options = P.channel_options(max_message_bytes)
        self._channel = open_aio_channel(address, credentials, resolve_api_key(api_key), options)
        self._stub = gateway_stub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)
        self.as_torch = as_torch
        self.timeout = timeout

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def wait_ready(self, timeout: float = 60.0) -> None:
        try:
            response = await self._health.Check(
                health_pb2.HealthCheckRequest(service=""), timeout=timeout, wait_for_ready=True
            )
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None
        if response.status != health_pb2.HealthCheckResponse.SERVING:
            raise TimeoutError("gateway is up but not serving")

    async def models(self) -> list[P.ModelInfo]:
        try:
            response = await self._stub.ListModels(pb.ListModelsRequest(), timeout=self.timeout)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None
        return [P.ModelInfo.from_proto(m) for m in response.models]

    async def model_info(self, model: str = "") -> P.ModelInfo:
        try:
            response = await self._stub.GetModelInfo(pb.GetModelInfoRequest(model=model), timeout=self.timeout)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None
        return P.ModelInfo.from_proto(response)

    def generate_stream(
        self,
        prompt: P.PromptLike,
        *,
        model: str = "",
        max_tokens: int = 64,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int = 0,
        seed: int | None = None,
        stop: Sequence[str] | str | None = None,
        ignore_eos: bool = False,
        capture: Sequence[str] | str | None = None,
        positions: P.PositionsLike = "all",
        capture_generated: bool = False,
        capture_dtype: str = "",
        add_generation_prompt: bool = True,
        interventions: Sequence[P.InterventionLike] | None = None,
        steer: P.SteerLike | None = None,
        compare_unsteered: bool = False,
        signals: S.Signals | dict | bool | None = None,
        metadata: Sequence[tuple[str, str]] | None = None,
    ) -> AsyncGenerateStream:
        request = P.build_generate(
            prompt,
            model=model,
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            seed=seed,
            stop=stop,
            ignore_eos=ignore_eos,
            capture=capture,
            positions=positions,
            capture_generated=capture_generated,
            capture_dtype=capture_dtype,
            add_generation_prompt=add_generation_prompt,
            interventions=interventions,
            steer=steer,
            compare_unsteered=compare_unsteered,
            signals=signals,
        )
        call = self._stub.Generate(request, timeout=self.timeout, metadata=metadata)
        return AsyncGenerateStream(call, P.GenerateAssembler(request, self.as_torch))

    async def generate(self, prompt: P.PromptLike, **kwargs) -> P.GenerateResult:  # noqa: ANN003
        return await self.generate_stream(prompt, **kwargs).collect()

    async def trace(
        self,
        prompts: P.PromptLike | Sequence[P.PromptLike],
        hooks: Sequence[str] | str | None = None,
        *,
        positions: P.PositionsLike = "all",
        model: str = "",
        dtype: str = "",
        top_k: int = 0,
        add_generation_prompt: bool = True,
        interventions: Sequence[P.InterventionLike] | None = None,
        steer: P.SteerLike | None = None,
        cache: str = "use",
        store: bool = False,
        public: bool = False,
        probes: Sequence[str] | None = None,
        metadata: Sequence[tuple[str, str]] | None = None,
    ) -> P.TraceResult:
        request = P.build_trace(
            prompts,
            model=model,
            hooks=hooks,
            positions=positions,
            dtype=dtype,
            top_k=top_k,
            add_generation_prompt=add_generation_prompt,
            interventions=interventions,
            steer=steer,
            cache=cache,
            store=store,
            probes=probes,
        )
        request.public = public
        return await self._collect_trace(self._stub.Trace(request, timeout=self.timeout, metadata=metadata))

    async def get_trace(self, handle: str, metadata: Sequence[tuple[str, str]] | None = None) -> P.PromptTrace:
        """A trace stored with `trace(..., store=True)`, by its handle."""
        call = self._stub.GetTrace(pb.GetTraceRequest(handle=handle), timeout=self.timeout, metadata=metadata)
        return (await self._collect_trace(call))[0]

    async def _collect_trace(self, call: Any) -> P.TraceResult:
        assembler = P.TensorAssembler(self.as_torch)
        traces: dict[int, P.PromptTrace] = {}
        try:
            async for message in call:
                if isinstance(message, ReceivedChunk):
                    assembler.add(message)
                elif message.WhichOneof("event") == "prompt":
                    traces[message.prompt.prompt_index] = P.prompt_trace(message.prompt)
                else:
                    assembler.add(message.tensor)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None
        return P.trace_result(traces, assembler)

    @property
    def steering(self) -> AsyncSteering:
        """The steering-vector registry (awaitable methods)."""
        return AsyncSteering(self)

    @property
    def probes(self) -> AsyncProbes:
        """The linear-probe registry (awaitable methods)."""
        return AsyncProbes(self)

    @property
    def keys(self) -> AsyncKeys:
        """API keys of your tenant (admin role; awaitable methods)."""
        return AsyncKeys(self)

    async def patch(
        self,
        clean: P.PromptLike | None,
        corrupted: P.PromptLike,
        *,
        target: int | str,
        foil: int | str | None = None,
        metric: str = "logit_diff",
        hook: str = "hook_resid_pre",
        layers: Sequence[int] | int | None = None,
        positions: P.PositionsLike = "all",
        model: str = "",
        add_generation_prompt: bool = True,
        clean_trace: str = "",
        metadata: Sequence[tuple[str, str]] | None = None,
    ) -> P.PatchResult:
        request = P.build_patch(
            clean,
            corrupted,
            target=target,
            foil=foil,
            metric=metric,
            hook=hook,
            layers=layers,
            positions=positions,
            model=model,
            add_generation_prompt=add_generation_prompt,
            clean_trace=clean_trace,
        )
        response = await _unary(self._stub.Patch, request, self.timeout, metadata)
        return P.PatchResult.from_proto(response, self.as_torch)


class AsyncSteering:
    """`client.steering` of an AsyncClient: the methods of `Steering`, awaitable."""

    def __init__(self, client: AsyncClient) -> None:
        self._client = client

    async def _vector(self, rpc: Callable[..., Any], request: Any) -> P.SteeringVector:
        response = await _unary(rpc, request, self._client.timeout)
        return P.SteeringVector.from_proto(response, self._client.as_torch)

    async def create(
        self,
        tensor: P.ArrayLike,
        hooks: Sequence[str] | str,
        *,
        name: str = "",
        description: str = "",
        model: str = "",
        public: bool = False,
    ) -> P.SteeringVector:
        request = P.build_create_vector(tensor, hooks, name=name, description=description, model=model)
        request.public = public
        return await self._vector(self._client._stub.CreateVector, request)

    async def train(
        self,
        pairs: Sequence[P.PairLike],
        *,
        layers: Sequence[int] | int | None = None,
        hooks: Sequence[str] | str | None = None,
        method: str = "mean_diff",
        reduce: str = "last",
        name: str = "",
        description: str = "",
        model: str = "",
        add_generation_prompt: bool = True,
        public: bool = False,
    ) -> P.SteeringVector:
        request = P.build_train_vector(
            pairs,
            layers=layers,
            hooks=hooks,
            method=method,
            reduce=reduce,
            name=name,
            description=description,
            model=model,
            add_generation_prompt=add_generation_prompt,
        )
        request.public = public
        return await self._vector(self._client._stub.TrainVector, request)

    async def get(self, id: str) -> P.SteeringVector:
        return await self._vector(self._client._stub.GetVector, pb.GetVectorRequest(id=id))

    async def delete(self, id: str) -> bool:
        request = pb.DeleteVectorRequest(id=id)
        return (await _unary(self._client._stub.DeleteVector, request, self._client.timeout)).deleted

    async def list(self, model: str = "") -> list[P.SteeringVector]:
        request = pb.ListVectorsRequest(model=model)
        response = await _unary(self._client._stub.ListVectors, request, self._client.timeout)
        return [P.SteeringVector.from_proto(v, self._client.as_torch) for v in response.vectors]


class AsyncProbes:
    """`client.probes` of an AsyncClient: the methods of `Probes`, awaitable."""

    def __init__(self, client: AsyncClient) -> None:
        self._client = client

    async def train(
        self,
        examples: Sequence[S.ExampleLike],
        *,
        hook: str | None = None,
        layer: int | None = None,
        position: str = "last",
        test_fraction: float = 0.25,
        seed: int = 0,
        l2: float | None = None,
        name: str = "",
        description: str = "",
        model: str = "",
        add_generation_prompt: bool = False,
        public: bool = False,
    ) -> S.Probe:
        request = S.build_train_probe(
            examples,
            hook=hook,
            layer=layer,
            position=position,
            test_fraction=test_fraction,
            seed=seed,
            l2=l2,
            name=name,
            description=description,
            model=model,
            add_generation_prompt=add_generation_prompt,
        )
        request.public = public
        return S.Probe.from_proto(await _unary(self._client._stub.TrainProbe, request, self._client.timeout))

    async def list(self, model: str = "") -> list[S.Probe]:
        request = pb.ListProbesRequest(model=model)
        response = await _unary(self._client._stub.ListProbes, request, self._client.timeout)
        return [S.Probe.from_proto(p) for p in response.probes]

    async def get(self, id: str) -> S.Probe:
        response = await _unary(self._client._stub.GetProbe, pb.GetProbeRequest(id=id), self._client.timeout)
        return S.Probe.from_proto(response)

    async def delete(self, id: str) -> bool:
        request = pb.DeleteProbeRequest(id=id)
        return (await _unary(self._client._stub.DeleteProbe, request, self._client.timeout)).deleted


class AsyncKeys:
    """`client.keys`, awaitable: create, list and revoke your tenant's API keys (admin role)."""

    def __init__(self, client: AsyncClient) -> None:
        self._client = client

    async def create(
        self, roles: Sequence[str] | str, *, name: str = "", **limits: float | None
    ) -> tuple[str, K.ApiKeyInfo]:
        """A new key with at most your own roles; returns (secret, info). The secret is shown only now."""
        request = K.build_create_key(roles, name, **limits)
        response = await _unary(self._client._stub.CreateApiKey, request, self._client.timeout)
        return response.secret, K.ApiKeyInfo.from_proto(response.key)

    async def list(self) -> list[K.ApiKeyInfo]:
        response = await _unary(self._client._stub.ListApiKeys, pb.ListApiKeysRequest(), self._client.timeout)
        return [K.ApiKeyInfo.from_proto(k) for k in response.keys]

    async def revoke(self, id: str) -> bool:
        request = pb.RevokeApiKeyRequest(id=id)
        return (await _unary(self._client._stub.RevokeApiKey, request, self._client.timeout)).revoked
