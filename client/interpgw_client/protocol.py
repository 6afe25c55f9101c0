"""Request building and response assembly shared by the sync and asyncio clients."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from interpgw.v1 import gateway_pb2 as pb
from interpgw_client.tensors import decode

# A prompt: text, chat messages ([{"role": ..., "content": ...}]) or token ids.
PromptLike = str | Sequence[dict] | Sequence[int]
# Positions: "all", "last", "none", or explicit indices (negative from the prompt's end).
PositionsLike = str | int | Sequence[int]


@dataclass
class ModelInfo:
    id: str
    architecture: str
    n_layers: int
    d_model: int
    vocab_size: int
    dtype: str
    max_model_len: int
    hook_points: list[str]
    source: str

    @classmethod
    def from_proto(cls, msg: pb.ModelInfo) -> ModelInfo:
        return cls(
            id=msg.id,
            architecture=msg.architecture,
            n_layers=msg.n_layers,
            d_model=msg.d_model,
            vocab_size=msg.vocab_size,
            dtype=msg.dtype,
            max_model_len=msg.max_model_len,
            hook_points=list(msg.hook_points),
            source=msg.source,
        )


@dataclass
class TokenEvent:
    """A streamed piece of a generation."""

    index: int
    token_ids: list[int]
    text: str


@dataclass
class GenerateResult:
    text: str
    token_ids: list[int]
    prompt_token_ids: list[int]
    finish_reason: str
    activations: dict[str, Any] = field(default_factory=dict)  # hook -> array [n_positions, d_model]
    positions: list[int] = field(default_factory=list)  # absolute positions of the activation rows
    cached_prompt_tokens: int = 0


@dataclass
class TopLogits:
    token_ids: list[int]
    logprobs: list[float]
    tokens: list[str]


@dataclass
class PromptTrace:
    prompt_index: int
    token_ids: list[int]
    tokens: list[str]
    positions: list[int]  # absolute positions of the activation rows
    activations: dict[str, Any] = field(default_factory=dict)  # hook -> array [n_positions, d_model]
    top_logits: TopLogits | None = None


@dataclass
class TraceResult:
    prompts: list[PromptTrace]

    def __getitem__(self, index: int) -> PromptTrace:
        return self.prompts[index]

    def __len__(self) -> int:
        return len(self.prompts)


# ---------------------------------------------------------------------- building requests


def build_prompt(prompt: PromptLike, add_generation_prompt: bool = True) -> pb.Prompt:
    if isinstance(prompt, str):
        return pb.Prompt(text=prompt)
    items = list(prompt)
    if items and all(isinstance(item, dict) for item in items):
        messages = [pb.ChatMessage(role=str(m["role"]), content=str(m["content"])) for m in items]
        return pb.Prompt(chat=pb.ChatMessages(messages=messages, add_generation_prompt=add_generation_prompt))
    if all(isinstance(item, int) for item in items):
        return pb.Prompt(tokens=pb.TokenIds(ids=items))
    raise TypeError("a prompt is a string, a list of {'role','content'} dicts, or a list of token ids")


def build_positions(positions: PositionsLike) -> pb.PositionSelector:
    if isinstance(positions, str):
        modes = {"all": pb.PositionSelector.ALL, "last": pb.PositionSelector.LAST, "none": pb.PositionSelector.NONE}
        if positions not in modes:
            raise ValueError(f"positions must be one of {sorted(modes)} or a list of indices, got {positions!r}")
        return pb.PositionSelector(mode=modes[positions])
    if isinstance(positions, int):
        positions = [positions]
    return pb.PositionSelector(mode=pb.PositionSelector.INDICES, indices=[int(p) for p in positions])


def build_capture(
    hooks: Sequence[str] | str | None, positions: PositionsLike, generated: bool, dtype: str
) -> pb.CaptureSpec | None:
    if not hooks:
        return None
    if isinstance(hooks, str):
        hooks = [hooks]
    return pb.CaptureSpec(hooks=list(hooks), positions=build_positions(positions), generated=generated, dtype=dtype)


def build_generate(
    prompt: PromptLike,
    *,
    model: str,
    max_tokens: int,
    temperature: float | None,
    top_p: float | None,
    top_k: int,
    seed: int | None,
    stop: Sequence[str] | str | None,
    ignore_eos: bool,
    capture: Sequence[str] | str | None,
    positions: PositionsLike,
    capture_generated: bool,
    capture_dtype: str,
    add_generation_prompt: bool,
) -> pb.GenerateRequest:
    sampling = pb.SamplingParams(
        max_tokens=max_tokens, top_k=top_k, stop=[stop] if isinstance(stop, str) else stop, ignore_eos=ignore_eos
    )
    if temperature is not None:
        sampling.temperature = temperature
    if top_p is not None:
        sampling.top_p = top_p
    if seed is not None:
        sampling.seed = seed
    request = pb.GenerateRequest(model=model, prompt=build_prompt(prompt, add_generation_prompt), sampling=sampling)
    spec = build_capture(capture, positions, capture_generated, capture_dtype)
    if spec is not None:
        request.capture.CopyFrom(spec)
    return request


def build_trace(
    prompts: PromptLike | Sequence[PromptLike],
    *,
    model: str,
    hooks: Sequence[str] | str | None,
    positions: PositionsLike,
    dtype: str,
    top_k: int,
    add_generation_prompt: bool,
) -> pb.TraceRequest:
    if isinstance(prompts, str) or (prompts and isinstance(list(prompts)[0], (int, dict))):
        prompts = [prompts]  # type: ignore[list-item]
    request = pb.TraceRequest(
        model=model,
        prompts=[build_prompt(p, add_generation_prompt) for p in prompts],  # type: ignore[arg-type]
        top_k_logits=top_k,
    )
    spec = build_capture(hooks, positions, False, dtype)
    if spec is not None:
        request.capture.CopyFrom(spec)
    return request


# ---------------------------------------------------------------------- assembling responses


class TensorAssembler:
    """Reassembles TensorChunk messages into arrays keyed by (prompt_index, hook)."""

    def __init__(self, as_torch: bool) -> None:
        self.as_torch = as_torch
        self._parts: dict[tuple[int, str], tuple[str, tuple[int, ...], bytearray]] = {}

    def add(self, chunk: pb.TensorChunk) -> None:
        key = (chunk.prompt_index, chunk.hook)
        if key not in self._parts:
            self._parts[key] = (chunk.dtype, tuple(chunk.shape), bytearray(chunk.total_bytes))
        _, _, buffer = self._parts[key]
        buffer[chunk.offset : chunk.offset + len(chunk.data)] = chunk.data

    def tensors(self, prompt_index: int) -> dict[str, Any]:
        return {
            hook: decode(dtype, shape, buffer, self.as_torch)
            for (index, hook), (dtype, shape, buffer) in self._parts.items()
            if index == prompt_index
        }


def generate_result(done: pb.GenerateDone, assembler: TensorAssembler) -> GenerateResult:
    return GenerateResult(
        text=done.text,
        token_ids=list(done.output_token_ids),
        prompt_token_ids=list(done.prompt_token_ids),
        finish_reason=done.finish_reason,
        activations=assembler.tensors(0),
        positions=list(done.captured_positions),
        cached_prompt_tokens=done.cached_prompt_tokens,
    )


def prompt_trace(msg: pb.TracePromptResult) -> PromptTrace:
    top = None
    if msg.HasField("top_logits"):
        t = msg.top_logits
        top = TopLogits(token_ids=list(t.token_ids), logprobs=list(t.logprobs), tokens=list(t.tokens))
    return PromptTrace(
        prompt_index=msg.prompt_index,
        token_ids=list(msg.token_ids),
        tokens=list(msg.tokens),
        positions=list(msg.captured_positions),
        top_logits=top,
    )


def trace_result(traces: dict[int, PromptTrace], assembler: TensorAssembler) -> TraceResult:
    ordered = [traces[i] for i in sorted(traces)]
    for trace in ordered:
        trace.activations = assembler.tensors(trace.prompt_index)
    return TraceResult(prompts=ordered)


def channel_options(max_message_bytes: int = 64 * 2**20) -> list[tuple[str, Any]]:
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
    ]
