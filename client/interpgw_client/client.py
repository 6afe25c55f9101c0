"""Synchronous client."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from interpgw.v1 import gateway_pb2 as pb
from interpgw.v1 import gateway_pb2_grpc as pb_grpc
from interpgw_client import protocol as P
from interpgw_client.errors import from_rpc_error

DEFAULT_ADDRESS = os.environ.get("INTERPGW_ADDRESS", "localhost:50051")


class GenerateStream:
    """Iterate for TokenEvents as they arrive; `.result` holds the GenerateResult once the stream ends."""

    def __init__(self, call: grpc.Call, as_torch: bool) -> None:
        self._call = call
        self._assembler = P.TensorAssembler(as_torch)
        self.result: P.GenerateResult | None = None

    def __iter__(self) -> Iterator[P.TokenEvent]:
        try:
            for message in self._call:
                kind = message.WhichOneof("event")
                if kind == "token":
                    t = message.token
                    yield P.TokenEvent(index=t.index, token_ids=list(t.token_ids), text=t.text)
                elif kind == "tensor":
                    self._assembler.add(message.tensor)
                elif kind == "done":
                    self.result = P.generate_result(message.done, self._assembler)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None

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
    """

    def __init__(
        self,
        address: str = DEFAULT_ADDRESS,
        *,
        credentials: grpc.ChannelCredentials | None = None,
        as_torch: bool = False,
        timeout: float | None = None,
        max_message_bytes: int = 64 * 2**20,
    ) -> None:
        options = P.channel_options(max_message_bytes)
        if credentials is None:
            self._channel = grpc.insecure_channel(address, options=options)
        else:
            self._channel = grpc.secure_channel(address, credentials, options=options)
        self._stub = pb_grpc.GatewayStub(self._channel)
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
        metadata: Sequence[tuple[str, str]] | None = None,
    ) -> GenerateStream:
        """Stream a generation. `capture` names hook points; activations arrive in `.result` at the end."""
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
        )
        call = self._stub.Generate(request, timeout=self.timeout, metadata=metadata)
        return GenerateStream(call, self.as_torch)

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
        metadata: Sequence[tuple[str, str]] | None = None,
    ) -> P.TraceResult:
        """One forward pass over each prompt; activations at `hooks` for the selected `positions`."""
        request = P.build_trace(
            prompts,
            model=model,
            hooks=hooks,
            positions=positions,
            dtype=dtype,
            top_k=top_k,
            add_generation_prompt=add_generation_prompt,
        )
        assembler = P.TensorAssembler(self.as_torch)
        traces: dict[int, P.PromptTrace] = {}
        try:
            for message in self._stub.Trace(request, timeout=self.timeout, metadata=metadata):
                if message.WhichOneof("event") == "prompt":
                    traces[message.prompt.prompt_index] = P.prompt_trace(message.prompt)
                else:
                    assembler.add(message.tensor)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None
        return P.trace_result(traces, assembler)
