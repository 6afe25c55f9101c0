"""What the service core needs from an inference engine. The vLLM adapter is the one implementation that
talks to vLLM; tests may plug in others."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from interpgw.core.capture import HookOrder


@dataclass(frozen=True)
class ModelFacts:
    id: str
    architecture: str
    n_layers: int
    d_model: int
    vocab_size: int
    dtype: str
    max_model_len: int
    source: str


@dataclass(frozen=True)
class SamplingOptions:
    max_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: disabled
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    top_logprobs: int = 0  # >0: top-k of the full next-token distribution at each step


@dataclass
class EngineStep:
    """One streamed increment of a request."""

    token_ids: list[int]  # new tokens since the last step
    text: str  # new text since the last step
    finished: bool = False
    finish_reason: str | None = None
    cached_prompt_tokens: int = 0
    # per new token: [(token_id, logprob, decoded)] sorted by rank, when top_logprobs > 0
    top_logprobs: list[list[tuple[int, float, str]]] = field(default_factory=list)


@dataclass
class CaptureResult:
    positions: list[int]
    tensors: dict[str, Any]  # hook -> torch.Tensor [n_positions, d_model]
    error: str | None = None


class Engine(Protocol):
    facts: ModelFacts

    def generate(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling: SamplingOptions,
        capture: HookOrder | None,
    ) -> AsyncIterator[EngineStep]: ...

    async def collect(self, keys: list[str]) -> dict[str, CaptureResult]: ...

    async def discard(self, keys: list[str]) -> None: ...

    async def shutdown(self) -> None: ...
