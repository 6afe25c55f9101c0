"""Per-token signals from the model's internals, computed where the full distributions are (the engine worker).

Everything here is plain torch on float32 log-probabilities, so the same functions give the reference values in
tests. Signals describe the model's own next-token distribution (raw logits, before temperature, top-p or top-k):
what a sampling setting does to the draw is not what the model believes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from interpgw.signals.orders import lens_signal, probe_signal


@dataclass
class TokenSignals:
    """The signals of one generated token, from the forward pass that chose it."""

    index: int  # position of the token within the generation (0 = first new token)
    token_id: int
    entropy: float | None = None  # nats, of the full next-token distribution
    logprob: float | None = None  # log-probability of the chosen token
    rank: int | None = None  # 1 = the chosen token was the most likely one
    margin: float | None = None  # logprob(top-1) - logprob(top-2)
    lens_layers: tuple[int, ...] = ()
    lens_kl: tuple[float, ...] = ()  # KL(final || lens at each layer), nats
    lens_top1: tuple[int, ...] = ()  # each lens layer's top-1 token
    lens_earliest: int | None = None  # earliest lens layer whose top-1 is the chosen token; -1: none
    probe_ids: tuple[str, ...] = ()
    probe_scores: tuple[float, ...] = ()  # sigmoid scores in [0, 1]
    probe_quantiles: tuple[float, ...] = ()  # each score's place among the probe's training scores (gateway-side)
    events: list[dict] = field(default_factory=list)  # monitor events fired at this token

    def values(self) -> dict[str, float]:
        """Signal name -> value, for monitors and sequence aggregates."""
        out: dict[str, float] = {}
        for name in ("entropy", "logprob", "rank", "margin"):
            value = getattr(self, name)
            if value is not None:
                out[name] = float(value)
        for layer, kl in zip(self.lens_layers, self.lens_kl, strict=True):
            out[lens_signal(layer)] = kl
        if self.lens_earliest is not None:
            out["lens_earliest"] = float(self.lens_earliest)
        for probe_id, score in zip(self.probe_ids, self.probe_scores, strict=True):
            out[probe_signal(probe_id)] = score
        return out

    def to_json(self) -> dict:
        return {
            "index": self.index,
            "token_id": self.token_id,
            "entropy": self.entropy,
            "logprob": self.logprob,
            "rank": self.rank,
            "margin": self.margin,
            "lens_layers": list(self.lens_layers),
            "lens_kl": list(self.lens_kl),
            "lens_top1": list(self.lens_top1),
            "lens_earliest": self.lens_earliest,
            "probe_ids": list(self.probe_ids),
            "probe_scores": list(self.probe_scores),
            "probe_quantiles": list(self.probe_quantiles),
            "events": self.events,
        }

    @classmethod
    def from_json(cls, data: dict) -> TokenSignals:
        return cls(
            index=int(data["index"]),
            token_id=int(data["token_id"]),
            entropy=data.get("entropy"),
            logprob=data.get("logprob"),
            rank=data.get("rank"),
            margin=data.get("margin"),
            lens_layers=tuple(data.get("lens_layers") or ()),
            lens_kl=tuple(data.get("lens_kl") or ()),
            lens_top1=tuple(data.get("lens_top1") or ()),
            lens_earliest=data.get("lens_earliest"),
            probe_ids=tuple(data.get("probe_ids") or ()),
            probe_scores=tuple(data.get("probe_scores") or ()),
            probe_quantiles=tuple(data.get("probe_quantiles") or ()),
            events=list(data.get("events") or ()),
        )


def distribution_stats(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """From raw logits `[n, vocab]`: log-probabilities and probabilities `[n, vocab]`, entropy `[n]` and the
    top-1/top-2 margin `[n]`, in float32.

    Fused softmax kernels only: a hand-written logsumexp (`exp` of `z - max`) runs into denormals on the CPU for
    real logits and was measured 10x slower.
    """
    logprobs = torch.log_softmax(logits, dim=-1, dtype=torch.float32)  # [n, vocab]
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)  # [n, vocab]
    entropy = -(probs * logprobs).sum(dim=-1)  # [n]
    top2 = logprobs.topk(2, dim=-1).values  # [n, 2]
    return logprobs, probs, entropy, top2[:, 0] - top2[:, 1]


def chosen_logprob_and_rank(logprobs: torch.Tensor, chosen: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probability `[n]` and 1-based rank `[n]` of the chosen tokens `[n]` (ties rank in the token's favour)."""
    picked = logprobs.gather(1, chosen.view(-1, 1).long())  # [n, 1]
    rank = (logprobs > picked).sum(dim=-1) + 1  # [n]
    return picked.squeeze(1), rank


def lens_kl_and_top1(
    final_probs: torch.Tensor, final_entropy: torch.Tensor, lens_logits: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """KL(final || lens) `[n]` and the lens's top-1 token `[n]`:
    KL = sum p log p - sum p log q = -H(final) - E_p[log q].

    `final_probs` `[n, vocab]` and `final_entropy` `[n]` belong to the same rows as `lens_logits` `[n, vocab]`.
    """
    lens_logprobs = torch.log_softmax(lens_logits, dim=-1, dtype=torch.float32)  # [n, vocab]
    kl = -final_entropy - (final_probs * lens_logprobs).sum(dim=-1)
    return kl.clamp_min(0.0), lens_logprobs.argmax(dim=-1)


def earliest_agreeing_layer(layers: tuple[int, ...], top1: list[int], token_id: int) -> int:
    """The first of `layers` (ascending) whose lens top-1 is `token_id`, or -1."""
    for layer, guess in zip(layers, top1, strict=True):
        if guess == token_id:
            return layer
    return -1
