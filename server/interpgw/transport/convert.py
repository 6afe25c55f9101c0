"""Protobuf <-> core types. Pure data shuffling; all validation lives in the core."""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator

import torch

from interpgw.core.errors import InvalidArgument
from interpgw.core.interventions import EditOp, InterventionSpec, TargetMode, TargetSpec
from interpgw.core.positions import PositionMode, PositionSelector
from interpgw.core.requests import (
    CaptureOptions,
    ChatTurn,
    ContrastPairInput,
    GenerateInput,
    LabelledPromptInput,
    MonitorFired,
    MonitorInput,
    PatchInput,
    PatchOutput,
    PromptInput,
    SamplingInput,
    SignalsInput,
    TracedPrompt,
    TraceInput,
    TrainProbeInput,
    TrainVectorInput,
    quoted,
)
from interpgw.core.wire import dtype_name
from interpgw.engine.base import ModelFacts
from interpgw.registry.records import VectorRecord
from interpgw.signals.token_signals import TokenSignals
from interpgw.v1 import gateway_pb2 as pb

# dtypes accepted in tensors sent by clients
INPUT_DTYPES = ("float32", "float64", "bfloat16", "float16")
MAX_INPUT_TENSOR_BYTES = 256 * 2**20

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


def capture_positions(selector: pb.PositionSelector) -> PositionSelector:
    mode = _MODES.get(selector.mode)
    if mode is None:
        raise InvalidArgument(f"unknown position mode {selector.mode}; valid: ALL, LAST, INDICES, NONE")
    return PositionSelector(mode=mode, indices=tuple(selector.indices))


def capture_options(spec: pb.CaptureSpec, present: bool) -> CaptureOptions | None:
    if not present:
        return None
    return CaptureOptions(
        hooks=tuple(spec.hooks),
        positions=capture_positions(spec.positions),
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
        interventions=interventions(request.interventions),
        compare_unsteered=request.compare_unsteered,
        signals=signals_input(request.signals) if request.HasField("signals") else None,
    )


def trace_input(request: pb.TraceRequest) -> TraceInput:
    return TraceInput(
        prompts=tuple(prompt_input(p) for p in request.prompts),
        model=request.model,
        capture=capture_options(request.capture, request.HasField("capture") and bool(request.capture.hooks)),
        top_k_logits=request.top_k_logits,
        interventions=interventions(request.interventions),
        cache=_CACHE_MODES.get(request.cache, str(request.cache)),
        store=request.store,
        probes=tuple(request.probes),
    )


_CACHE_MODES = {pb.CACHE_USE: "use", pb.CACHE_REFRESH: "refresh", pb.CACHE_BYPASS: "bypass"}


def trace_prompt_result(traced: TracedPrompt) -> pb.TracePromptResult:
    result = pb.TracePromptResult(
        prompt_index=traced.prompt_index,
        token_ids=traced.token_ids,
        tokens=traced.tokens,
        captured_positions=traced.captured.positions if traced.captured else [],
        cache_hit=traced.cache_hit,
        handle=traced.handle,
    )
    if traced.top_logits is not None:
        top = traced.top_logits
        result.top_logits.CopyFrom(pb.TopLogits(token_ids=top.token_ids, logprobs=top.logprobs, tokens=top.tokens))
    for scores in traced.probe_scores:
        result.probe_scores.add(probe_id=scores.probe_id, scores=scores.scores, pooled=scores.pooled)
    return result


# ---------------------------------------------------------------------- signals, monitors, probes

_COMPARISONS = {pb.Monitor.LT: "<", pb.Monitor.LE: "<=", pb.Monitor.GT: ">", pb.Monitor.GE: ">="}
_MONITOR_REDUCE = {pb.Monitor.ALL: "all", pb.Monitor.MEAN: "mean"}
_ACTIONS = {pb.Monitor.FLAG: "flag", pb.Monitor.STOP: "stop", pb.Monitor.STEER: "steer"}
_ACTION_CODES = {name: code for code, name in _ACTIONS.items()}


def signals_input(message: pb.SignalRequest) -> SignalsInput:
    monitors = []
    for index, m in enumerate(message.monitors):
        try:
            monitors.append(
                MonitorInput(
                    name=m.name,
                    signal=m.signal,
                    op=_enum(_COMPARISONS, m.op, "monitor op"),
                    threshold=m.threshold,
                    window=m.window,
                    reduce=_enum(_MONITOR_REDUCE, m.reduce, "monitor reduce"),
                    action=_enum(_ACTIONS, m.action, "monitor action"),
                    interventions=interventions(m.interventions),
                )
            )
        except InvalidArgument as exc:
            raise InvalidArgument(f"monitor {index}: {exc}") from None
    return SignalsInput(
        distribution=message.distribution,
        lens_layers=tuple(message.lens_layers),
        probes=tuple(message.probes),
        monitors=tuple(monitors),
        eigenscore_samples=message.eigenscore_samples,
        eigenscore_layer=message.eigenscore_layer if message.HasField("eigenscore_layer") else None,
    )


def _enum(table: dict, value: int, what: str) -> str:
    if value not in table:
        raise InvalidArgument(f"unknown {what} {value}; valid: {', '.join(f'{k} ({v})' for k, v in table.items())}")
    return table[value]


def token_signals(item: TokenSignals) -> pb.TokenSignals:
    message = pb.TokenSignals(
        index=item.index,
        token_id=item.token_id,
        lens_layers=item.lens_layers,
        lens_kl=item.lens_kl,
        lens_top1=item.lens_top1,
        probe_ids=item.probe_ids,
        probe_scores=item.probe_scores,
        probe_quantiles=item.probe_quantiles,
    )
    for name in ("entropy", "logprob", "rank", "margin", "lens_earliest"):
        value = getattr(item, name)
        if value is not None:
            setattr(message, name, value)
    return message


def monitor_event(event: MonitorFired) -> pb.MonitorEvent:
    return pb.MonitorEvent(
        monitor=event.monitor,
        token_index=event.token_index,
        signal=event.signal,
        value=event.value,
        action=_ACTION_CODES[event.action],
        variant=event.variant,
    )


_PROBE_POSITIONS = {pb.TrainProbeRequest.LAST: "last", pb.TrainProbeRequest.MEAN: "mean"}


def train_probe_input(request: pb.TrainProbeRequest) -> TrainProbeInput:
    examples = []
    for index, example in enumerate(request.examples):
        try:
            examples.append(LabelledPromptInput(prompt_input(example.prompt), example.label))
        except InvalidArgument as exc:
            raise InvalidArgument(f"example {index}: {exc}") from None
    return TrainProbeInput(
        examples=tuple(examples),
        hook=request.hook,
        position=_enum(_PROBE_POSITIONS, request.position, "probe position"),
        test_fraction=request.test_fraction,
        seed=request.seed,
        l2=request.l2 if request.HasField("l2") else 1e-2,
        model=request.model,
        name=request.name,
        description=request.description,
    )


def probe(record: VectorRecord, with_tensor: bool = True) -> pb.Probe:
    extra = record.extra
    message = pb.Probe(
        id=record.id,
        model=record.model,
        name=record.name,
        description=record.description,
        hook=record.hooks[0],
        d_model=record.d_model,
        bias=float(extra.get("bias", 0.0)),
        position=str(extra.get("position", "last")),
        train_auroc=float(extra.get("train_auroc", float("nan"))),
        test_auroc=float(extra.get("test_auroc", float("nan"))),
        test_accuracy=float(extra.get("test_accuracy", float("nan"))),
        n_train=int(extra.get("n_train", 0)),
        n_test=int(extra.get("n_test", 0)),
        quantiles=list(extra.get("quantiles") or ()),
        owner=record.owner,
        public=record.public,
    )
    message.created.FromNanoseconds(int(record.created * 1e9))
    if with_tensor:
        message.weight.CopyFrom(tensor_to_proto(record.tensor[0]))
    return message


# ---------------------------------------------------------------------- tensors from clients


def tensor_from_proto(message: pb.Tensor, what: str) -> torch.Tensor:
    """A float tensor from a client; InvalidArgument for a bad dtype, shape or byte count."""
    if message.dtype not in INPUT_DTYPES:
        raise InvalidArgument(f"{what}: unsupported dtype {quoted(message.dtype)}; valid: {', '.join(INPUT_DTYPES)}")
    shape = list(message.shape)
    if not 1 <= len(shape) <= 4:
        raise InvalidArgument(f"{what}: shape has {len(shape)} dimensions; it must have 1 to 4")
    if any(d < 0 for d in shape):
        raise InvalidArgument(f"{what}: shape {shape} has a negative dimension")
    dtype = getattr(torch, message.dtype)
    itemsize = torch.empty(0, dtype=dtype).element_size()
    expected = math.prod(shape) * itemsize
    # a zero in the shape makes the product 0 whatever the other dimensions are: bound those too (torch cannot
    # even allocate an empty [0, 2**40, 2**40] tensor: its strides overflow)
    if expected > MAX_INPUT_TENSOR_BYTES or math.prod(max(d, 1) for d in shape) * itemsize > MAX_INPUT_TENSOR_BYTES:
        raise InvalidArgument(
            f"{what}: shape {shape} of dtype {message.dtype} is too large: at most {MAX_INPUT_TENSOR_BYTES} bytes"
        )
    if len(message.data) != expected:
        raise InvalidArgument(
            f"{what}: {len(message.data)} data bytes for shape {shape} and dtype {message.dtype} (expected {expected})"
        )
    if expected == 0:
        return torch.empty(shape, dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # read-only buffer: copied by .to() below
        return torch.frombuffer(message.data, dtype=dtype).reshape(shape).to(torch.float32)


def tensor_to_proto(tensor: torch.Tensor) -> pb.Tensor:
    data = tensor.detach().cpu().contiguous()
    raw = data.view(torch.uint8).numpy().tobytes() if data.numel() else b""
    return pb.Tensor(dtype=dtype_name(data), shape=list(data.shape), data=raw)


# ---------------------------------------------------------------------- interventions

_OPS = {
    pb.Intervention.ADD: EditOp.ADD,
    pb.Intervention.SET: EditOp.SET,
    pb.Intervention.ZERO: EditOp.ZERO,
    pb.Intervention.SCALE: EditOp.SCALE,
    pb.Intervention.PROJECT_OUT: EditOp.PROJECT_OUT,
    pb.Intervention.CLAMP: EditOp.CLAMP,
    pb.Intervention.MEAN_ABLATE: EditOp.MEAN_ABLATE,
}
_TARGETS = {
    pb.InterventionTarget.ALL: TargetMode.ALL,
    pb.InterventionTarget.PROMPT: TargetMode.PROMPT,
    pb.InterventionTarget.GENERATED: TargetMode.GENERATED,
    pb.InterventionTarget.INDICES: TargetMode.INDICES,
    pb.InterventionTarget.LAST_N: TargetMode.LAST_N,
}


def interventions(messages: Iterator[pb.Intervention]) -> tuple[InterventionSpec, ...]:
    specs = []
    for index, message in enumerate(messages):
        try:
            specs.append(intervention(message))
        except InvalidArgument as exc:
            raise InvalidArgument(f"intervention {index}: {exc}") from None
    return tuple(specs)


def intervention(message: pb.Intervention) -> InterventionSpec:
    op = _OPS.get(message.op)
    if op is None:
        raise InvalidArgument(f"unknown op {message.op}; valid: {', '.join(o.value for o in EditOp)}")
    target = message.target
    mode = _TARGETS.get(target.mode)
    if mode is None:
        raise InvalidArgument(f"unknown target mode {target.mode}; valid: {', '.join(m.value for m in TargetMode)}")
    kind = message.WhichOneof("vector")
    return InterventionSpec(
        op=op,
        hook=message.hook,
        target=TargetSpec(
            mode=mode,
            indices=tuple(target.indices),
            n=target.n,
            window_start=target.window_start if target.HasField("window_start") else None,
            window_end=target.window_end if target.HasField("window_end") else None,
        ),
        vector=tensor_from_proto(message.tensor, "vector") if kind == "tensor" else None,
        vector_id=message.vector_id if kind == "vector_id" else "",
        scale=message.scale if message.HasField("scale") else None,
        value=message.value,
        norm_preserving=message.norm_preserving,
        reference_prompts=tuple(prompt_input(p) for p in message.reference_prompts),
        reference_traces=tuple(message.reference_traces),
    )


# ---------------------------------------------------------------------- registry and patching


def steering_vector(record: VectorRecord, with_tensor: bool = True) -> pb.SteeringVector:
    message = pb.SteeringVector(
        id=record.id,
        model=record.model,
        d_model=record.d_model,
        hooks=list(record.hooks),
        method=record.method,
        n_pairs=record.n_pairs,
        name=record.name,
        description=record.description,
        separation=list(record.separation),
        owner=record.owner,
        public=record.public,
    )
    message.created.FromNanoseconds(int(record.created * 1e9))
    if with_tensor:
        message.tensor.CopyFrom(tensor_to_proto(record.tensor))
    return message


_TRAIN_METHODS = {pb.TrainVectorRequest.MEAN_DIFF: "mean_diff", pb.TrainVectorRequest.PCA: "pca"}
_REDUCE = {pb.TrainVectorRequest.LAST: "last", pb.TrainVectorRequest.MEAN: "mean"}


def train_vector_input(request: pb.TrainVectorRequest) -> TrainVectorInput:
    pairs = []
    for index, pair in enumerate(request.pairs):
        try:
            pairs.append(ContrastPairInput(prompt_input(pair.positive), prompt_input(pair.negative)))
        except InvalidArgument as exc:
            raise InvalidArgument(f"pair {index}: {exc}") from None
    return TrainVectorInput(
        pairs=tuple(pairs),
        hooks=tuple(request.hooks),
        method=_TRAIN_METHODS.get(request.method, str(request.method)),
        reduce=_REDUCE.get(request.reduce, str(request.reduce)),
        model=request.model,
        name=request.name,
        description=request.description,
    )


_PATCH_METRICS = {pb.PatchMetric.LOGIT_DIFF: "logit_diff", pb.PatchMetric.PROB: "prob"}


def patch_input(request: pb.PatchRequest) -> PatchInput:
    metric = request.metric
    target_kind, foil_kind = metric.WhichOneof("target"), metric.WhichOneof("foil")
    return PatchInput(
        clean=prompt_input(request.clean) if request.HasField("clean") else PromptInput(),
        corrupted=prompt_input(request.corrupted),
        metric=_PATCH_METRICS.get(metric.kind, str(metric.kind)),
        target=getattr(metric, target_kind) if target_kind else None,
        foil=getattr(metric, foil_kind) if foil_kind else None,
        hook=request.hook or "hook_resid_pre",
        layers=tuple(request.layers),
        positions=capture_positions(request.positions),
        model=request.model,
        clean_trace=request.clean_trace,
    )


def patch_response(output: PatchOutput) -> pb.PatchResponse:
    return pb.PatchResponse(
        layers=output.layers,
        positions=output.positions,
        tokens=output.tokens,
        metric=tensor_to_proto(output.metric),
        restored=tensor_to_proto(output.restored),
        clean_metric=output.clean_metric,
        corrupted_metric=output.corrupted_metric,
        target_id=output.target_id,
        foil_id=output.foil_id if output.foil_id is not None else -1,
    )
