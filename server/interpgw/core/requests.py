"""Transport-neutral request and result types of the service core (the gRPC layer converts to and from these)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from interpgw.core.interventions import InterventionSpec
from interpgw.core.positions import PositionSelector


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


@dataclass(frozen=True)
class TraceInput:
    prompts: tuple[PromptInput, ...]
    model: str = ""
    capture: CaptureOptions | None = None
    top_k_logits: int = 0
    interventions: tuple[InterventionSpec, ...] = ()
    cache: str = "use"  # "use" | "refresh" | "bypass"
    store: bool = False  # keep each prompt's result under a handle


@dataclass
class TokenDelta:
    index: int  # index of the first token of this delta within the generation
    token_ids: list[int]
    text: str
    variant: int = 0  # 0: as requested; 1: the unsteered baseline


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
