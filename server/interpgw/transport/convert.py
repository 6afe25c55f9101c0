"""Protobuf <-> core types. Pure data shuffling; all validation lives in the core."""

from __future__ import annotations

from collections.abc import Iterator

from interpgw.core.errors import InvalidArgument
from interpgw.core.positions import PositionMode, PositionSelector
from interpgw.core.requests import (
    Captured,
    CaptureOptions,
    ChatTurn,
    GenerateInput,
    PromptInput,
    SamplingInput,
    TraceInput,
)
from interpgw.core.wire import tensor_chunks
from interpgw.engine.base import ModelFacts
from interpgw.v1 import gateway_pb2 as pb

_MODES = {
    pb.PositionSelector.ALL: PositionMode.ALL,
    pb.PositionSelector.LAST: PositionMode.LAST,
    pb.PositionSelector.INDICES: PositionMode.INDICES,
    pb.PositionSelector.NONE: PositionMode.NONE,
}


def model_info(facts: ModelFacts, hook_points: list[str]) -> pb.ModelInfo:
    return pb.ModelInfo(
        id=facts.id,
        architecture=facts.architecture,
        n_layers=facts.n_layers,
        d_model=facts.d_model,
        vocab_size=facts.vocab_size,
        dtype=facts.dtype,
        max_model_len=facts.max_model_len,
        hook_points=hook_points,
        source=facts.source,
    )


def prompt_input(prompt: pb.Prompt) -> PromptInput:
    kind = prompt.WhichOneof("input")
    if kind == "text":
        return PromptInput(text=prompt.text)
    if kind == "chat":
        turns = tuple(ChatTurn(role=m.role, content=m.content) for m in prompt.chat.messages)
        return PromptInput(chat=turns, add_generation_prompt=prompt.chat.add_generation_prompt)
    if kind == "tokens":
        return PromptInput(token_ids=tuple(prompt.tokens.ids))
    raise InvalidArgument("prompt is empty: set one of text, chat, tokens")


def capture_options(spec: pb.CaptureSpec, present: bool) -> CaptureOptions | None:
    if not present:
        return None
    mode = _MODES.get(spec.positions.mode)
    if mode is None:
        raise InvalidArgument(f"unknown position mode {spec.positions.mode}; valid: ALL, LAST, INDICES, NONE")
    return CaptureOptions(
        hooks=tuple(spec.hooks),
        positions=PositionSelector(mode=mode, indices=tuple(spec.positions.indices)),
        generated=spec.generated,
        dtype=spec.dtype,
    )


def generate_input(request: pb.GenerateRequest) -> GenerateInput:
    s = request.sampling
    sampling = SamplingInput(
        max_tokens=s.max_tokens or None,
        temperature=s.temperature if s.HasField("temperature") else None,
        top_p=s.top_p if s.HasField("top_p") else None,
        top_k=s.top_k,
        seed=s.seed if s.HasField("seed") else None,
        stop=tuple(s.stop),
        ignore_eos=s.ignore_eos,
    )
    return GenerateInput(
        prompt=prompt_input(request.prompt),
        model=request.model,
        sampling=sampling,
        capture=capture_options(request.capture, request.HasField("capture") and bool(request.capture.hooks)),
    )


def trace_input(request: pb.TraceRequest) -> TraceInput:
    return TraceInput(
        prompts=tuple(prompt_input(p) for p in request.prompts),
        model=request.model,
        capture=capture_options(request.capture, request.HasField("capture") and bool(request.capture.hooks)),
        top_k_logits=request.top_k_logits,
    )


def tensor_messages(prompt_index: int, captured: Captured) -> Iterator[pb.TensorChunk]:
    for hook, tensor in captured.tensors.items():
        for chunk in tensor_chunks(tensor):
            yield pb.TensorChunk(
                prompt_index=prompt_index,
                hook=hook,
                dtype=chunk.dtype,
                shape=chunk.shape,
                offset=chunk.offset,
                total_bytes=chunk.total_bytes,
                data=chunk.data,
            )
