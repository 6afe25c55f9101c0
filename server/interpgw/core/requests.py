"""Transport-neutral request and result types of the service core (the gRPC layer converts to and from these)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from interpgw.core.interventions import InterventionSpec
from interpgw.core.positions import PositionSelector

QUOTED_LIMIT = 100


def quoted(value: str, limit: int = QUOTED_LIMIT) -> str:
    """A client-sent string as an error message shows it: its repr, cut to `limit` characters with the full length
    noted. Status messages travel in gRPC trailers, whose size is limited (16 KiB by default): a message echoing a
    long value whole never reaches the client, which then sees RESOURCE_EXHAUSTED instead of the real error."""
    if len(value) <= limit:
        return repr(value)
    return f"{value[:limit]!r}... ({len(value)} characters)"


@dataclass(frozen=True)
class ChatTurn:
    role: str
    content: str


@dataclass(frozen=True)
class PromptInput:
    """Exactly one of text, chat or token_ids is set."""

    text: str | None = None
    chat: tuple[ChatTurn, ...] | None = None
    add_generation_prompt: bool = True
    token_ids: tuple[int, ...] | None = None


@dataclass(frozen=True)
class CaptureOptions:
    hooks: tuple[str, ...]
    positions: PositionSelector = field(default_factory=PositionSelector)
    generated: bool = False
    dtype: str = ""


@dataclass(frozen=True)
class SamplingInput:
    """As the client sent it; None means 'server default'."""

    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False


@dataclass(frozen=True)
class GenerateInput:
    prompt: PromptInput
    model: str = ""
    sampling: SamplingInput = field(default_factory=SamplingInput)
    capture: CaptureOptions | None = None
    interventions: tuple[InterventionSpec, ...] = ()
    compare_unsteered: bool = False  # also stream the continuation without interventions (variant 1)
    signals: SignalsInput | None = None  # per-token signals, monitors, sequence scores


@dataclass(frozen=True)
class TraceInput:
    prompts: tuple[PromptInput, ...]
    model: str = ""
    capture: CaptureOptions | None = None
    top_k_logits: int = 0
    interventions: tuple[InterventionSpec, ...] = ()
    cache: str = "use"  # "use" | "refresh" | "bypass"
    store: bool = False  # keep each prompt's result under a handle
    probes: tuple[str, ...] = ()  # probe ids scored at every captured position


@dataclass
class TokenDelta:
    index: int  # index of the first token of this delta within the generation
    token_ids: list[int]
    text: str
    variant: int = 0  # 0: as requested; 1: the unsteered baseline
    signals: list[Any] = field(default_factory=list)  # TokenSignals per token, when requested
    events: list[Any] = field(default_factory=list)  # MonitorFired on these tokens


@dataclass
class Captured:
    positions: list[int]  # absolute positions of the rows
    tensors: dict[str, Any]  # hook -> torch.Tensor [n_positions, d_model]


@dataclass
class GenerateDone:
    finish_reason: str
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    text: str
    captured: Captured | None = None
    cached_prompt_tokens: int = 0
    variant: int = 0
    seed: int | None = None
    scores: dict[str, float] = field(default_factory=dict)  # sequence-level scores from the token signals
    monitor_events: list[Any] = field(default_factory=list)  # MonitorFired


@dataclass
class TopLogits:
    token_ids: list[int]
    logprobs: list[float]
    tokens: list[str]


@dataclass
class TracedPrompt:
    prompt_index: int
    token_ids: list[int]
    tokens: list[str]
    captured: Captured | None
    top_logits: TopLogits | None
    cache_hit: bool = False
    handle: str = ""  # with store: the stored trace's handle
    probe_scores: list[Any] = field(default_factory=list)  # ProbeScoresOutput


@dataclass(frozen=True)
class ContrastPairInput:
    positive: PromptInput
    negative: PromptInput


@dataclass(frozen=True)
class TrainVectorInput:
    pairs: tuple[ContrastPairInput, ...]
    hooks: tuple[str, ...] = ()  # default: every layer's resid_post
    method: str = "mean_diff"  # "mean_diff" | "pca"
    reduce: str = "last"  # "last" | "mean"
    model: str = ""
    name: str = ""
    description: str = ""


@dataclass(frozen=True)
class PatchInput:
    clean: PromptInput
    corrupted: PromptInput
    metric: str = "logit_diff"  # "logit_diff" | "prob"
    target: int | str | None = None  # token id, or text encoding to one token
    foil: int | str | None = None
    hook: str = "hook_resid_pre"
    layers: tuple[int, ...] = ()  # default: every layer
    positions: PositionSelector = field(default_factory=PositionSelector)
    model: str = ""
    clean_trace: str = ""  # a stored trace's handle, instead of `clean`


@dataclass
class PatchOutput:
    layers: list[int]
    positions: list[int]
    tokens: list[str]
    metric: Any  # torch.Tensor [n_layers, n_positions] float32
    restored: Any  # torch.Tensor [n_layers, n_positions] float32
    clean_metric: float
    corrupted_metric: float
    target_id: int
    foil_id: int | None


@dataclass(frozen=True)
class LabelledPromptInput:
    prompt: PromptInput
    label: bool


@dataclass(frozen=True)
class TrainProbeInput:
    examples: tuple[LabelledPromptInput, ...]
    hook: str = ""  # default: the middle layer's resid_post
    position: str = "last"  # "last" | "mean"
    test_fraction: float = 0.25
    seed: int = 0
    l2: float = 1e-2
    model: str = ""
    name: str = ""
    description: str = ""


@dataclass(frozen=True)
class MonitorInput:
    signal: str
    op: str  # "<", "<=", ">", ">="
    threshold: float
    window: int = 1
    reduce: str = "all"  # "all" | "mean"
    action: str = "flag"  # "flag" | "stop" | "steer"
    interventions: tuple[InterventionSpec, ...] = ()
    name: str = ""


@dataclass(frozen=True)
class SignalsInput:
    distribution: bool = False
    lens_layers: tuple[int, ...] = ()  # negative from the end
    probes: tuple[str, ...] = ()
    monitors: tuple[MonitorInput, ...] = ()
    eigenscore_samples: int = 0
    eigenscore_layer: int | None = None


@dataclass
class MonitorFired:
    """A monitor that fired, reported with the token it fired on."""

    monitor: str
    token_index: int
    signal: str
    value: float
    action: str
    variant: int = 0


@dataclass
class ProbeScoresOutput:
    probe_id: str
    scores: list[float]  # one per captured position
    pooled: float
