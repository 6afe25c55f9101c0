"""Synchronous client."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from interpgw.v1 import gateway_pb2 as pb
from interpgw_client import keys as K
from interpgw_client import protocol as P
from interpgw_client import signals as S
from interpgw_client.channels import open_channel, resolve_api_key
from interpgw_client.chunks import ReceivedChunk, gateway_stub
from interpgw_client.errors import from_rpc_error

DEFAULT_ADDRESS = os.environ.get("INTERPGW_ADDRESS", "localhost:50051")


def _unary(rpc: Callable[..., Any], request: Any, timeout: float | None, metadata: Any = None) -> Any:
    """One unary call with the SDK's typed errors."""
    try:
        return rpc(request, timeout=timeout, metadata=metadata)
    except grpc.RpcError as exc:
        raise from_rpc_error(exc) from None


class GenerateStream:
    """Iterate for TokenEvents as they arrive (`.variant` 1: the unsteered baseline of compare_unsteered);
    `.result` holds the GenerateResult once the stream ends, with the baseline as `.result.baseline`."""

    def __init__(self, call: grpc.Call, assembler: P.GenerateAssembler) -> None:
        self._call = call
        self._assembler = assembler
        self.result: P.GenerateResult | None = None

    def __iter__(self) -> Iterator[P.TokenEvent]:
        try:
            for message in self._call:
                event = self._assembler.add(message)
                if event is not None:
                    yield event
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None
        self.result = self._assembler.result()

    def cancel(self) -> None:
        self._call.cancel()

    def collect(self) -> P.GenerateResult:
        for _ in self:
            pass
        assert self.result is not None, "stream ended without a final message"
        return self.result


class Client:
    """Talk to an interpgw gateway.

    >>> client = Client("localhost:50051")
    >>> client.generate("The capital of France is", max_tokens=5, temperature=0).text

    `address` may also list replicas (["10.0.0.1:50051", "10.0.0.2:50051"]) or be a DNS name resolving to all of them
    ("dns:///interpgw-headless.ns.svc:50051"): calls are balanced round-robin and, for methods that change nothing,
    retried on another replica when one answers UNAVAILABLE. `api_key` (default $INTERPGW_API_KEY) and
    `credentials` (grpc.ssl_channel_credentials(...)) are for gateways with authentication and TLS.
    """

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
        self._channel = open_channel(address, credentials, resolve_api_key(api_key), options)
        self._stub = gateway_stub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)
        self.as_torch = as_torch
        self.timeout = timeout

    # ------------------------------------------------------------------ lifecycle

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Block until the gateway's health service reports SERVING."""
        ready = grpc.channel_ready_future(self._channel)
        try:
            ready.result(timeout=timeout)
            response = self._health.Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout)
        except grpc.FutureTimeoutError:
            raise TimeoutError(f"gateway not reachable within {timeout}s") from None
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None
        finally:
            ready.cancel()  # stops its connectivity-polling thread
        if response.status != health_pb2.HealthCheckResponse.SERVING:
            raise TimeoutError("gateway is up but not serving")

    # ------------------------------------------------------------------ models

    def models(self) -> list[P.ModelInfo]:
        try:
            response = self._stub.ListModels(pb.ListModelsRequest(), timeout=self.timeout)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None
        return [P.ModelInfo.from_proto(m) for m in response.models]

    def model_info(self, model: str = "") -> P.ModelInfo:
        try:
            return P.ModelInfo.from_proto(
                self._stub.GetModelInfo(pb.GetModelInfoRequest(model=model), timeout=self.timeout)
            )
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None

    # ------------------------------------------------------------------ generate

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
    ) -> GenerateStream:
        """Stream a generation. `capture` names hook points; activations arrive in `.result` at the end.
        `interventions` edit the forward pass (see `Intervention`); `steer` is the shorthand for adding vectors
        (a registry id, {"vector", "scale", "hook", ...} or a list); `compare_unsteered` also streams the
        unsteered continuation with the same seed, as `.result.baseline`. `signals` asks for per-token
        hallucination signals and monitors (`Signals`; True: the distribution signals), streamed in each
        TokenEvent's `.signals` and collected in `.result.signals` / `.scores` / `.monitor_events`."""
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
        return GenerateStream(call, P.GenerateAssembler(request, self.as_torch))

    def generate(self, prompt: P.PromptLike, **kwargs) -> P.GenerateResult:  # noqa: ANN003 - as generate_stream
        """Generate to the end; same arguments as `generate_stream`."""
        return self.generate_stream(prompt, **kwargs).collect()

    # ------------------------------------------------------------------ trace

    def trace(
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
        """One forward pass over each prompt; activations at `hooks` for the selected `positions`, with the
        `interventions` / `steer` edits (as in `generate_stream`) applied to every prompt; `probes` (registry ids)
        are scored at every captured position, in each prompt's `.probe_scores`."""
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
        return self._collect_trace(self._stub.Trace(request, timeout=self.timeout, metadata=metadata))

    def get_trace(self, handle: str, metadata: Sequence[tuple[str, str]] | None = None) -> P.PromptTrace:
        """A trace stored with `trace(..., store=True)`, by its handle."""
        call = self._stub.GetTrace(pb.GetTraceRequest(handle=handle), timeout=self.timeout, metadata=metadata)
        return self._collect_trace(call)[0]

    def _collect_trace(self, call: Any) -> P.TraceResult:
        assembler = P.TensorAssembler(self.as_torch)
        traces: dict[int, P.PromptTrace] = {}
        try:
            for message in call:
                if isinstance(message, ReceivedChunk):
                    assembler.add(message)
                elif message.WhichOneof("event") == "prompt":
                    traces[message.prompt.prompt_index] = P.prompt_trace(message.prompt)
                else:
                    assembler.add(message.tensor)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None
        return P.trace_result(traces, assembler)

    # ------------------------------------------------------------------ steering and patching

    @property
    def steering(self) -> Steering:
        """The steering-vector registry."""
        return Steering(self)

    @property
    def probes(self) -> Probes:
        """The linear-probe registry."""
        return Probes(self)

    @property
    def keys(self) -> Keys:
        """API keys of your tenant (admin role)."""
        return Keys(self)

    def patch(
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
        """Patch clean activations into the corrupted run one (layer, position) cell at a time. `metric`:
        "logit_diff" (target - foil) or "prob" (of target) at the final position; tokens by id or one-token text."""
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
        return P.PatchResult.from_proto(_unary(self._stub.Patch, request, self.timeout, metadata), self.as_torch)


class Steering:
    """`client.steering`: create or train vectors bound to one model, then `generate(..., steer=vector.id)`."""

    def __init__(self, client: Client) -> None:
        self._client = client

    def _vector(self, rpc: Callable[..., Any], request: Any) -> P.SteeringVector:
        response = _unary(rpc, request, self._client.timeout)
        return P.SteeringVector.from_proto(response, self._client.as_torch)

    def create(
        self,
        tensor: P.ArrayLike,
        hooks: Sequence[str] | str,
        *,
        name: str = "",
        description: str = "",
        model: str = "",
        public: bool = False,
    ) -> P.SteeringVector:
        """Store a vector: `tensor` is [d_model] for one hook or [len(hooks), d_model]. `public`: every tenant may
        use it (default: only the caller's tenant)."""
        request = P.build_create_vector(tensor, hooks, name=name, description=description, model=model)
        request.public = public
        return self._vector(self._client._stub.CreateVector, request)

    def train(
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
        """Train on the server from (positive, negative) pairs; `layers` [6, 7] means blocks.L.hook_resid_post.
        `method`: "mean_diff" or "pca"; `reduce`: the "last" token's activation or the "mean" over the prompt."""
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
        return self._vector(self._client._stub.TrainVector, request)

    def get(self, id: str) -> P.SteeringVector:
        return self._vector(self._client._stub.GetVector, pb.GetVectorRequest(id=id))

    def delete(self, id: str) -> bool:
        """False when no such vector existed."""
        return _unary(self._client._stub.DeleteVector, pb.DeleteVectorRequest(id=id), self._client.timeout).deleted

    def list(self, model: str = "") -> list[P.SteeringVector]:
        """Every vector (of `model`, when given), without tensor data."""
        response = _unary(self._client._stub.ListVectors, pb.ListVectorsRequest(model=model), self._client.timeout)
        return [P.SteeringVector.from_proto(v, self._client.as_torch) for v in response.vectors]


class Probes:
    """`client.probes`: train linear probes from labelled prompts, then `generate(..., signals=Signals(probes=[id]))`
    or `trace(..., probes=[id])`."""

    def __init__(self, client: Client) -> None:
        self._client = client

    def train(
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
        """Fit on the server from (prompt, label) pairs or {"statement"|"text"|"prompt", "label"} dicts, with a
        held-out split; `layer=L` means blocks.L.hook_resid_post (default: the middle layer). Chat prompts get no
        generation prompt by default: examples are usually plain statements."""
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
        return S.Probe.from_proto(_unary(self._client._stub.TrainProbe, request, self._client.timeout))

    def list(self, model: str = "") -> list[S.Probe]:
        """Every probe (of `model`, when given), without weights."""
        response = _unary(self._client._stub.ListProbes, pb.ListProbesRequest(model=model), self._client.timeout)
        return [S.Probe.from_proto(p) for p in response.probes]

    def get(self, id: str) -> S.Probe:
        return S.Probe.from_proto(_unary(self._client._stub.GetProbe, pb.GetProbeRequest(id=id), self._client.timeout))

    def delete(self, id: str) -> bool:
        """False when no such probe existed."""
        return _unary(self._client._stub.DeleteProbe, pb.DeleteProbeRequest(id=id), self._client.timeout).deleted


class Keys:
    """`client.keys`: create, list and revoke your tenant's API keys (admin role; the gateway must keep its keys
    in Redis). Operators manage every tenant's keys with `interpgw keys`."""

    def __init__(self, client: Client) -> None:
        self._client = client

    def create(self, roles: Sequence[str] | str, *, name: str = "", **limits: float | None) -> tuple[str, K.ApiKeyInfo]:
        """A new key with at most your own roles; returns (secret, info). The secret is shown only now."""
        request = K.build_create_key(roles, name, **limits)
        response = _unary(self._client._stub.CreateApiKey, request, self._client.timeout)
        return response.secret, K.ApiKeyInfo.from_proto(response.key)

    def list(self) -> list[K.ApiKeyInfo]:
        response = _unary(self._client._stub.ListApiKeys, pb.ListApiKeysRequest(), self._client.timeout)
        return [K.ApiKeyInfo.from_proto(k) for k in response.keys]

    def revoke(self, id: str) -> bool:
        request = pb.RevokeApiKeyRequest(id=id)
        return _unary(self._client._stub.RevokeApiKey, request, self._client.timeout).revoked
