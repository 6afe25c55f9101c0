"""Request building and response assembly shared by the sync and asyncio clients."""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from datetime import datetime, timezone
from typing import Any

import numpy as np

from interpgw.v1 import gateway_pb2 as pb
from interpgw_client.chunks import ReceivedChunk
from interpgw_client.render import HtmlFragment, render_html
from interpgw_client.signals import (
    MonitorEvent,
    ProbeScores,
    SignalsLike,
    TokenSignals,
    build_signals,
)
from interpgw_client.tensor_memory import TensorMemory
from interpgw_client.tensors import decode, is_index

# A prompt: text, chat messages ([{"role": ..., "content": ...}]) or token ids.
PromptLike = str | Sequence[dict] | Sequence[int]
# Positions: "all", "last", "none", or explicit indices (negative from the prompt's end).
PositionsLike = str | int | Sequence[int]
# Positions an intervention edits: "all", "prompt", "generated", prompt indices (negative from the end), ("last", n).
TargetLike = str | int | Sequence[int] | tuple[str, int]
# A numpy array, nested lists or a torch tensor (torch is never imported here).
ArrayLike = Any


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
    variant: int = 0  # 0: as requested; 1: the unsteered baseline (compare_unsteered)
    signals: list[TokenSignals] = field(default_factory=list)  # one per token, when signals were requested
    events: list[MonitorEvent] = field(default_factory=list)  # monitors that fired on these tokens


@dataclass
class GenerateResult:
    """A finished generation. finish_reason "monitor": a STOP monitor ended it (see `monitor_events`)."""

    text: str
    token_ids: list[int]
    prompt_token_ids: list[int]
    finish_reason: str
    activations: dict[str, Any] = field(default_factory=dict)  # hook -> array [n_positions, d_model]
    positions: list[int] = field(default_factory=list)  # absolute positions of the activation rows
    cached_prompt_tokens: int = 0
    seed: int | None = None  # the sampling seed used (the server's choice when none was given); None: unseeded
    baseline: GenerateResult | None = None  # the unsteered continuation, with compare_unsteered
    signals: list[TokenSignals] = field(default_factory=list)  # per generated token, when signals were requested
    scores: dict[str, float] = field(default_factory=dict)  # "<signal>.mean|min|max", "perplexity", "eigenscore"
    monitor_events: list[MonitorEvent] = field(default_factory=list)
    tokens: list[str] = field(default_factory=list)  # per generated token text ("" for tokens sharing a text delta)

    def signal_values(self, signal: str) -> list[float | None]:
        """Per generated token, the value of `signal` (a `TokenSignals.values()` name); None where absent."""
        by_index = {s.index: s.values() for s in self.signals}
        return [by_index.get(i, {}).get(signal) for i in range(len(self.tokens))]

    def render_html(self, signal: str = "entropy", **kwargs: Any) -> HtmlFragment:
        """The generated tokens as a heat map of `signal`; `kwargs` as `render_html` (title, low, high, cmap)."""
        return render_html(self.tokens, self.signal_values(signal), signal=signal, **kwargs)


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
    cache_hit: bool = False  # served from the gateway's activation cache
    handle: str = ""  # with store=True: a stored trace's handle (get_trace, reference_traces, clean_trace)
    probe_scores: dict[str, ProbeScores] = field(default_factory=dict)  # probe id -> scores at the captured positions


@dataclass
class TraceResult:
    prompts: list[PromptTrace]

    def __getitem__(self, index: int) -> PromptTrace:
        return self.prompts[index]

    def __len__(self) -> int:
        return len(self.prompts)


@dataclass
class Intervention:
    """One edit of a hook point inside the forward pass, e.g. `Intervention("add", "blocks.6.hook_resid_post",
    vector=v, scale=4.0)`. `vector` is a registry id (str) or a [d_model] array; `positions` is "all", "prompt",
    "generated", an index, a list of indices or ("last", n); `window` = (start, end) narrows it to absolute
    positions [start, end) of prompt + output (either end may be None)."""

    op: str  # add, set, zero (alias ablate), scale, project_out, clamp, mean_ablate
    hook: str = ""  # empty with a registry vector: every hook point the vector holds
    vector: ArrayLike | str | None = None
    scale: float | None = None  # add, set, scale; None: 1
    value: float = 0.0  # clamp: the component along vector is set to this
    positions: TargetLike = "all"
    window: tuple[int | None, int | None] | None = None
    norm_preserving: bool = False
    reference_prompts: Sequence[PromptLike] = ()  # mean_ablate
    reference_traces: Sequence[str] = ()  # mean_ablate: handles of stored traces holding the hook


InterventionLike = Intervention | dict | pb.Intervention
# The `steer=` shorthand: a registry vector id, a dict {"vector", "scale", "hook", "positions", ...}, or a list.
SteerLike = str | dict | Sequence[str | dict]


@dataclass
class SteeringVector:
    """A registry vector; `vector` is None in listings (ListVectors sends no tensor data)."""

    id: str
    model: str
    d_model: int
    hooks: list[str]
    vector: Any  # array [len(hooks), d_model] float32, or None
    method: str  # "tensor", "mean_diff", "pca"
    n_pairs: int
    created: datetime | None  # UTC
    name: str = ""
    description: str = ""
    separation: list[float] = field(default_factory=list)  # per hook: share of pairs the vector orders correctly
    owner: str = ""  # tenant that created it ("" when the gateway runs without authentication)
    public: bool = False  # published to every tenant

    @classmethod
    def from_proto(cls, msg: pb.SteeringVector, as_torch: bool = False) -> SteeringVector:
        return cls(
            id=msg.id,
            model=msg.model,
            d_model=msg.d_model,
            hooks=list(msg.hooks),
            vector=decode_tensor(msg.tensor, as_torch) if msg.tensor.data else None,
            method=msg.method,
            n_pairs=msg.n_pairs,
            created=msg.created.ToDatetime(tzinfo=timezone.utc) if msg.HasField("created") else None,  # noqa: UP017 (3.10)
            name=msg.name,
            description=msg.description,
            separation=list(msg.separation),
            owner=msg.owner,
            public=msg.public,
        )


@dataclass
class PatchResult:
    """Activation patching over (layer, position) cells; `restored` = (patched - corrupted) / (clean - corrupted)."""

    layers: list[int]
    positions: list[int]
    tokens: list[str]  # the corrupted prompt's tokens
    metric: Any  # array [len(layers), len(positions)]: the metric of each patched run
    restored: Any  # array [len(layers), len(positions)]; NaN where clean == corrupted
    clean_metric: float
    corrupted_metric: float
    target_id: int
    foil_id: int

    @classmethod
    def from_proto(cls, msg: pb.PatchResponse, as_torch: bool = False) -> PatchResult:
        return cls(
            layers=list(msg.layers),
            positions=list(msg.positions),
            tokens=list(msg.tokens),
            metric=decode_tensor(msg.metric, as_torch),
            restored=decode_tensor(msg.restored, as_torch),
            clean_metric=msg.clean_metric,
            corrupted_metric=msg.corrupted_metric,
            target_id=msg.target_id,
            foil_id=msg.foil_id,
        )


# ---------------------------------------------------------------------- tensors


def as_float32(array: ArrayLike) -> np.ndarray:
    """numpy, nested lists, or a torch tensor of any dtype on any device (duck-typed: torch stays optional)."""
    if hasattr(array, "detach") and hasattr(array, "cpu"):
        array = array.detach().cpu().float().numpy()
    return np.asarray(array, dtype=np.float32)


def encode_tensor(array: ArrayLike) -> pb.Tensor:
    """A float32 wire tensor (little-endian, row-major); the inverse of `decode_tensor`."""
    data = np.asarray(as_float32(array), dtype="<f4", order="C")  # ascontiguousarray would make 0-d arrays 1-d
    return pb.Tensor(dtype="float32", shape=list(data.shape), data=data.tobytes())


def decode_tensor(msg: pb.Tensor, as_torch: bool = False) -> Any:
    return decode(msg.dtype, tuple(msg.shape), msg.data, as_torch)


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


_TARGET_MODES = {
    "all": pb.InterventionTarget.ALL,
    "prompt": pb.InterventionTarget.PROMPT,
    "generated": pb.InterventionTarget.GENERATED,
}
_TARGET_CHOICES = "'all', 'prompt', 'generated', 'last', an index, a list of indices or ('last', n)"


def build_target(positions: TargetLike, window: tuple[int | None, int | None] | None = None) -> pb.InterventionTarget:
    """Intervention positions; "last" is ("last", 1)."""
    T = pb.InterventionTarget
    if isinstance(positions, str) and positions == "last":
        positions = ("last", 1)
    if isinstance(positions, str):
        if positions not in _TARGET_MODES:
            raise ValueError(f"intervention positions must be {_TARGET_CHOICES}, got {positions!r}")
        target = T(mode=_TARGET_MODES[positions])
    elif is_index(positions):
        target = T(mode=T.INDICES, indices=[operator.index(positions)])  # type: ignore[arg-type]
    elif isinstance(positions, Sequence) and len(positions) == 2 and positions[0] == "last":
        n = positions[1]
        if not is_index(n) or operator.index(n) < 1:
            raise ValueError(f"intervention positions ('last', n) need an integer n >= 1, got {n!r}")
        target = T(mode=T.LAST_N, n=operator.index(n))
    else:
        items = list(positions) if isinstance(positions, Sequence | np.ndarray) else None
        if not items or not all(is_index(p) for p in items):
            raise ValueError(f"intervention positions must be {_TARGET_CHOICES}, got {positions!r}")
        target = T(mode=T.INDICES, indices=[operator.index(p) for p in items])
    if window is not None:
        start, end = window
        if start is not None and end is not None and start >= end:
            raise ValueError(f"an intervention window (start, end) needs start < end, got {window!r}")
        if start is not None:
            target.window_start = start
        if end is not None:
            target.window_end = end
    return target


OPS = {
    "add": pb.Intervention.ADD,
    "set": pb.Intervention.SET,
    "zero": pb.Intervention.ZERO,
    "ablate": pb.Intervention.ZERO,
    "scale": pb.Intervention.SCALE,
    "project_out": pb.Intervention.PROJECT_OUT,
    "clamp": pb.Intervention.CLAMP,
    "mean_ablate": pb.Intervention.MEAN_ABLATE,
}
_VECTOR_OPS = {"add", "set", "project_out", "clamp"}
_SCALE_OPS = {"add", "set", "scale"}
_INTERVENTION_KEYS = [f.name for f in fields(Intervention)]


def build_intervention(x: InterventionLike) -> pb.Intervention:
    """Validate one intervention client-side, so mistakes fail before any RPC with the valid choices named."""
    if isinstance(x, pb.Intervention):
        return x
    if isinstance(x, dict):
        unknown = sorted(set(x) - set(_INTERVENTION_KEYS))
        if unknown or "op" not in x:
            problem = f"unknown keys {unknown}" if unknown else "no 'op'"
            raise ValueError(f"intervention dict has {problem}; keys: {_INTERVENTION_KEYS}")
        x = Intervention(**x)
    if not isinstance(x, Intervention):
        raise TypeError(f"an intervention is an Intervention, a dict or a pb.Intervention, got {type(x).__name__}")
    op = x.op.lower() if isinstance(x.op, str) else x.op
    if op not in OPS:
        raise ValueError(f"intervention op must be one of {sorted(OPS)}, got {x.op!r}")
    msg = pb.Intervention(op=OPS[op], hook=x.hook, value=x.value, norm_preserving=x.norm_preserving)
    msg.target.CopyFrom(build_target(x.positions, x.window))
    if op in _VECTOR_OPS:
        if x.vector is None:
            raise ValueError(f"op {op!r} needs a vector (a registry id or a [d_model] array)")
        if isinstance(x.vector, str):
            msg.vector_id = x.vector
        else:
            msg.tensor.CopyFrom(encode_tensor(x.vector))
            if len(msg.tensor.shape) != 1:
                raise ValueError(f"an inline vector is one [d_model] row, got shape {list(msg.tensor.shape)}")
            if not x.hook:
                raise ValueError(f"op {op!r} with an inline vector needs a hook")
    elif x.vector is not None:
        raise ValueError(f"op {op!r} takes no vector (vector ops: {sorted(_VECTOR_OPS)})")
    elif not x.hook:
        raise ValueError(f"op {op!r} needs a hook")
    if x.scale is not None:
        if op not in _SCALE_OPS:
            raise ValueError(f"op {op!r} takes no scale (scaled ops: {sorted(_SCALE_OPS)})")
        msg.scale = x.scale
    if isinstance(x.reference_prompts, str) or isinstance(x.reference_traces, str):
        raise ValueError("reference_prompts and reference_traces are lists")
    if op == "mean_ablate":
        if not x.reference_prompts and not x.reference_traces:
            raise ValueError("op 'mean_ablate' needs reference_prompts and/or reference_traces to average over")
        msg.reference_prompts.extend(build_prompt(p) for p in x.reference_prompts)
        msg.reference_traces.extend(str(h) for h in x.reference_traces)
    elif x.reference_prompts or x.reference_traces:
        raise ValueError(f"op {op!r} takes no reference_prompts/reference_traces (only 'mean_ablate' does)")
    return msg


def build_steer(steer: SteerLike | None) -> list[pb.Intervention]:
    """The `steer=` shorthand: each item ADDs a vector (scale 1 unless given); a bare registry id adds it at every
    hook point the vector holds."""
    if steer is None:
        return []
    items = [steer] if isinstance(steer, str | dict) or not isinstance(steer, Sequence) else list(steer)
    out = []
    for item in items:
        if isinstance(item, str):
            item = {"vector": item}
        if not isinstance(item, dict):
            raise TypeError(
                "steer is a vector id, a dict {'vector', 'scale', 'hook', 'positions', ...} or a list of those, "
                f"got an item of type {type(item).__name__}"
            )
        if item.get("op", "add") != "add":
            raise ValueError("steer= only adds vectors; pass other ops as interventions=")
        out.append(build_intervention({"op": "add", "scale": 1.0} | item))
    return out


def build_interventions(
    interventions: Sequence[InterventionLike] | None, steer: SteerLike | None
) -> list[pb.Intervention]:
    """`interventions` in order, then the `steer` shorthand's additions."""
    if isinstance(interventions, Intervention | dict | pb.Intervention):
        interventions = [interventions]
    return [build_intervention(x) for x in interventions or ()] + build_steer(steer)


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
    interventions: Sequence[InterventionLike] | None = None,
    steer: SteerLike | None = None,
    compare_unsteered: bool = False,
    signals: SignalsLike | None = None,
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
    request = pb.GenerateRequest(
        model=model,
        prompt=build_prompt(prompt, add_generation_prompt),
        sampling=sampling,
        interventions=build_interventions(interventions, steer),
        compare_unsteered=compare_unsteered,
    )
    spec = build_capture(capture, positions, capture_generated, capture_dtype)
    if spec is not None:
        request.capture.CopyFrom(spec)
    signal_request = build_signals(signals)
    if signal_request is not None:
        request.signals.CopyFrom(signal_request)
    return request


CACHE_MODES = {"use": pb.CACHE_USE, "refresh": pb.CACHE_REFRESH, "bypass": pb.CACHE_BYPASS}


def build_trace(
    prompts: PromptLike | Sequence[PromptLike],
    *,
    model: str,
    hooks: Sequence[str] | str | None,
    positions: PositionsLike,
    dtype: str,
    top_k: int,
    add_generation_prompt: bool,
    interventions: Sequence[InterventionLike] | None = None,
    steer: SteerLike | None = None,
    cache: str = "use",
    store: bool = False,
    probes: Sequence[str] | str | None = None,
) -> pb.TraceRequest:
    """`probes`: registry probe ids scored at every captured position (`PromptTrace.probe_scores`)."""
    if cache not in CACHE_MODES:
        raise ValueError(f"cache must be one of {sorted(CACHE_MODES)}, got {cache!r}")
    probes = [probes] if isinstance(probes, str) else list(probes or ())
    if not all(isinstance(p, str) and p for p in probes):
        raise ValueError(f"probes are registry probe ids (strings), got {probes!r}")
    if isinstance(prompts, str) or (prompts and isinstance(list(prompts)[0], (int, dict))):
        prompts = [prompts]  # type: ignore[list-item]
    request = pb.TraceRequest(
        model=model,
        prompts=[build_prompt(p, add_generation_prompt) for p in prompts],  # type: ignore[arg-type]
        top_k_logits=top_k,
        interventions=build_interventions(interventions, steer),
        cache=CACHE_MODES[cache],
        store=store,
        probes=probes,
    )
    spec = build_capture(hooks, positions, False, dtype)
    if spec is not None:
        request.capture.CopyFrom(spec)
    return request


def build_create_vector(
    tensor: ArrayLike, hooks: Sequence[str] | str, *, name: str, description: str, model: str
) -> pb.CreateVectorRequest:
    """`tensor` is [d_model] for one hook or [len(hooks), d_model]."""
    hooks = [hooks] if isinstance(hooks, str) else list(hooks)
    wire = encode_tensor(tensor)
    rows = 1 if len(wire.shape) == 1 else wire.shape[0]
    if len(wire.shape) not in (1, 2) or rows != len(hooks) or not hooks:
        raise ValueError(
            f"a vector is [d_model] (one hook) or [len(hooks), d_model]; got shape {list(wire.shape)} "
            f"for {len(hooks)} hook(s)"
        )
    return pb.CreateVectorRequest(model=model, name=name, hooks=hooks, tensor=wire, description=description)


PairLike = tuple[PromptLike, PromptLike] | dict
TRAIN_METHODS = {"mean_diff": pb.TrainVectorRequest.MEAN_DIFF, "pca": pb.TrainVectorRequest.PCA}
TRAIN_REDUCE = {"last": pb.TrainVectorRequest.LAST, "mean": pb.TrainVectorRequest.MEAN}


def build_pair(pair: PairLike, add_generation_prompt: bool = True) -> pb.ContrastPair:
    if isinstance(pair, dict):
        if set(pair) != {"positive", "negative"}:
            raise ValueError(f"a contrast pair dict has exactly the keys 'positive' and 'negative', got {sorted(pair)}")
        positive, negative = pair["positive"], pair["negative"]
    elif isinstance(pair, Sequence) and not isinstance(pair, str) and len(pair) == 2:
        positive, negative = pair
    else:
        raise ValueError(
            f"a contrast pair is (positive, negative) or {{'positive': ..., 'negative': ...}}, got {pair!r}"
        )
    return pb.ContrastPair(
        positive=build_prompt(positive, add_generation_prompt), negative=build_prompt(negative, add_generation_prompt)
    )


def resid_post_hooks(layers: Sequence[int] | int) -> list[str]:
    """Layer numbers (negative from the end) as their residual-stream output hooks."""
    if is_index(layers):
        layers = [layers]  # type: ignore[list-item]
    return [f"blocks.{operator.index(layer)}.hook_resid_post" for layer in layers]  # type: ignore[union-attr]


def build_train_vector(
    pairs: Sequence[PairLike],
    *,
    layers: Sequence[int] | int | None,
    hooks: Sequence[str] | str | None,
    method: str,
    reduce: str,
    name: str,
    description: str,
    model: str,
    add_generation_prompt: bool = True,
) -> pb.TrainVectorRequest:
    """Neither `layers` nor `hooks`: the server trains at every layer's resid_post."""
    if method not in TRAIN_METHODS:
        raise ValueError(f"method must be one of {sorted(TRAIN_METHODS)}, got {method!r}")
    if reduce not in TRAIN_REDUCE:
        raise ValueError(f"reduce must be one of {sorted(TRAIN_REDUCE)}, got {reduce!r}")
    if layers is not None and hooks is not None:
        raise ValueError("give layers or hooks, not both")
    pairs = list(pairs)
    if not pairs:
        raise ValueError("training needs at least one contrast pair")
    if layers is not None:
        hooks = resid_post_hooks(layers)
    return pb.TrainVectorRequest(
        model=model,
        name=name,
        pairs=[build_pair(p, add_generation_prompt) for p in pairs],
        hooks=[hooks] if isinstance(hooks, str) else list(hooks or ()),
        method=TRAIN_METHODS[method],
        reduce=TRAIN_REDUCE[reduce],
        description=description,
    )


PATCH_METRICS = {"logit_diff": pb.PatchMetric.LOGIT_DIFF, "prob": pb.PatchMetric.PROB}


def _set_token(metric: pb.PatchMetric, role: str, token: int | str) -> None:
    """A token by id or by text (which must encode to exactly one token)."""
    if isinstance(token, str):
        setattr(metric, f"{role}_text", token)
    elif is_index(token):
        setattr(metric, f"{role}_id", operator.index(token))
    else:
        raise TypeError(f"{role} is a token id or a one-token string, got {token!r}")


def build_patch(
    clean: PromptLike | None,
    corrupted: PromptLike,
    *,
    target: int | str,
    foil: int | str | None,
    metric: str,
    hook: str,
    layers: Sequence[int] | int | None,
    positions: PositionsLike,
    model: str,
    add_generation_prompt: bool = True,
    clean_trace: str = "",
) -> pb.PatchRequest:
    if (clean is None) == (not clean_trace):
        raise ValueError("give exactly one of clean (a prompt) and clean_trace (a stored trace's handle)")
    if metric not in PATCH_METRICS:
        raise ValueError(f"metric must be one of {sorted(PATCH_METRICS)}, got {metric!r}")
    spec = pb.PatchMetric(kind=PATCH_METRICS[metric])
    _set_token(spec, "target", target)
    if foil is not None:
        _set_token(spec, "foil", foil)
    elif metric == "logit_diff":
        raise ValueError("metric 'logit_diff' needs a foil token (an id or a one-token string)")
    if layers is not None and is_index(layers):
        layers = [layers]  # type: ignore[list-item]
    request = pb.PatchRequest(
        model=model,
        corrupted=build_prompt(corrupted, add_generation_prompt),
        hook=hook,
        layers=[operator.index(layer) for layer in layers or ()],  # type: ignore[union-attr]
        positions=build_positions(positions),
        metric=spec,
        clean_trace=clean_trace,
    )
    if clean is not None:
        request.clean.CopyFrom(build_prompt(clean, add_generation_prompt))
    return request


# ---------------------------------------------------------------------- assembling responses


@dataclass
class _TensorParts:
    dtype: str
    shape: tuple[int, ...]
    total_bytes: int
    buffer: bytearray | np.ndarray  # [total_bytes] uint8, from the response's TensorMemory
    received: int = 0


class TensorAssembler:
    """Reassembles TensorChunk messages into arrays keyed by (prompt_index, hook).

    Each tensor's memory is taken once, at its first chunk, from the response's `TensorMemory` (large tensors share
    huge-page-backed blocks, see there); each chunk is then copied to its offset: the one copy out of the message.
    """

    def __init__(self, as_torch: bool) -> None:
        self.as_torch = as_torch
        self._parts: dict[tuple[int, str], _TensorParts] = {}
        self._memory = TensorMemory()

    def add(self, chunk: pb.TensorChunk | ReceivedChunk) -> None:
        data = chunk.data
        if isinstance(chunk, ReceivedChunk):
            chunk = chunk.header  # the other fields
        key = (chunk.prompt_index, chunk.hook)
        parts = self._parts.get(key)
        if parts is None:
            total = chunk.total_bytes
            parts = self._parts[key] = _TensorParts(chunk.dtype, tuple(chunk.shape), total, self._memory.take(total))
        end = chunk.offset + len(data)
        if end > parts.total_bytes:
            raise ValueError(
                f"tensor {chunk.hook!r} of prompt {chunk.prompt_index}: a chunk ends at byte {end} of a "
                f"{parts.total_bytes}-byte tensor"
            )
        memoryview(parts.buffer)[chunk.offset : end] = data
        parts.received += len(data)

    def tensors(self, prompt_index: int) -> dict[str, Any]:
        out = {}
        for (index, hook), parts in self._parts.items():
            if index != prompt_index:
                continue
            if parts.received != parts.total_bytes:
                raise ValueError(
                    f"tensor {hook!r} of prompt {index}: received {parts.received} of {parts.total_bytes} bytes"
                )
            out[hook] = decode(parts.dtype, parts.shape, parts.buffer, self.as_torch)
        return out


@dataclass
class VariantTokens:
    """What one variant's token events carried: per-token texts, signals and fired monitors."""

    tokens: list[str] = field(default_factory=list)
    signals: list[TokenSignals] = field(default_factory=list)
    events: list[MonitorEvent] = field(default_factory=list)

    def add(self, event: TokenEvent) -> None:
        """The event's text goes to its first token (the others get ""): a text delta may span several tokens."""
        n = len(event.token_ids)
        if n == 0:
            if self.tokens:
                self.tokens[-1] += event.text
        else:
            end = event.index + n
            self.tokens.extend([""] * (end - len(self.tokens)))
            self.tokens[event.index : end] = [event.text] + [""] * (n - 1)
        self.signals.extend(event.signals)
        self.events.extend(event.events)


def generate_result(
    done: pb.GenerateDone, assembler: TensorAssembler, seeded: bool = False, streamed: VariantTokens | None = None
) -> GenerateResult:
    """One variant's result; its tensor chunks carry the variant as prompt_index. The wire seed is 0 when the
    server used none, so 0 means None unless the request set a seed. Monitor events come from the final message
    (every event), else from the streamed ones."""
    streamed = streamed or VariantTokens()
    events = [MonitorEvent.from_proto(e) for e in done.monitor_events] or list(streamed.events)
    return GenerateResult(
        text=done.text,
        token_ids=list(done.output_token_ids),
        prompt_token_ids=list(done.prompt_token_ids),
        finish_reason=done.finish_reason,
        activations=assembler.tensors(done.variant),
        positions=list(done.captured_positions),
        cached_prompt_tokens=done.cached_prompt_tokens,
        seed=done.seed if done.seed or seeded else None,
        signals=sorted(streamed.signals, key=lambda s: s.index),
        scores=dict(done.scores),
        monitor_events=events,
        tokens=list(streamed.tokens),
    )


class GenerateAssembler:
    """Consumes a Generate stream's messages for both stream classes: `add` turns token messages into TokenEvents
    and keeps the rest; `result()` at the end gives variant 0 with the unsteered variant 1 as `.baseline`."""

    def __init__(self, request: pb.GenerateRequest, as_torch: bool) -> None:
        self._tensors = TensorAssembler(as_torch)
        self._done: dict[int, pb.GenerateDone] = {}
        self._streamed: dict[int, VariantTokens] = {}
        self._seeded = request.sampling.HasField("seed")

    def add(self, message: pb.GenerateResponse | ReceivedChunk) -> TokenEvent | None:
        if isinstance(message, ReceivedChunk):
            self._tensors.add(message)
            return None
        kind = message.WhichOneof("event")
        if kind == "token":
            t = message.token
            event = TokenEvent(
                index=t.index,
                token_ids=list(t.token_ids),
                text=t.text,
                variant=t.variant,
                signals=[TokenSignals.from_proto(s) for s in t.signals],
                events=[MonitorEvent.from_proto(e) for e in t.events],
            )
            self._streamed.setdefault(t.variant, VariantTokens()).add(event)
            return event
        if kind == "tensor":
            self._tensors.add(message.tensor)
        elif kind == "done":
            self._done[message.done.variant] = message.done
        return None

    def result(self) -> GenerateResult | None:
        """None until variant 0's final message has arrived."""
        if 0 not in self._done:
            return None
        result = generate_result(self._done[0], self._tensors, self._seeded, self._streamed.get(0))
        if 1 in self._done:
            result.baseline = generate_result(self._done[1], self._tensors, self._seeded, self._streamed.get(1))
        return result


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
        cache_hit=msg.cache_hit,
        handle=msg.handle,
        probe_scores={p.probe_id: ProbeScores.from_proto(p) for p in msg.probe_scores},
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
