"""One forward step's token signals, computed in the worker around vLLM's sampler.

The recorder plans, per step, which requests sample a token they want signals for (`SamplingEntry`) and which
hook-point rows those signals read (the "taps": the sampling row of each lens layer's resid_post and of each
probe's hook). Around the sampler:

- before sampling, from the raw logits `[num_reqs, vocab]`: full-vocabulary normaliser, entropy and margin;
  the logit lens (final norm + the engine's own unembedding applied to the tapped rows) and probe scores;
- after sampling, with the chosen tokens: their log-probability and rank, the earliest agreeing lens layer,
  then the request's monitors.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from interpgw.signals.monitors import MonitorEvent
from interpgw.signals.token_signals import (
    TokenSignals,
    chosen_logprob_and_rank,
    distribution_stats,
    earliest_agreeing_layer,
    lens_kl_and_top1,
)

# hidden rows [m, d_model] -> logits [m, vocab], through the model's final norm and unembedding
LensFn = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class SamplingEntry:
    owner: Any  # the recorder's per-request state (has .signals, .probe_weights, .probe_bias, .order.key)
    batch_index: int  # row of the sampler's logits
    token_index: int  # index of the token being sampled within the generation
    signals: TokenSignals | None = None


@dataclass
class SignalStep:
    entries: list[SamplingEntry]
    taps: dict[str, tuple[torch.Tensor, dict[int, int]]]  # hook -> (flat-batch rows, id(owner) -> row in tap)
    tap_rows: dict[str, torch.Tensor] = field(default_factory=dict)  # hook -> [n_taps, d_model] float32
    _logprobs: torch.Tensor | None = None  # [n_entries, vocab] float32

    def record_tap(self, hook: str, read: Callable[[torch.Tensor], torch.Tensor]) -> None:
        tap = self.taps.get(hook)
        if tap is not None:
            self.tap_rows[hook] = read(tap[0]).float()  # [n_taps, d_model], a copy

    def _tap(self, hook: str, owner: Any) -> torch.Tensor:
        return self.tap_rows[hook][self.taps[hook][1][id(owner)]]  # [d_model]

    def before_sampling(self, logits: torch.Tensor, lens: LensFn) -> None:
        """Everything that needs the raw logits `[num_reqs, vocab]` (the sampler may edit them in place)."""
        rows = torch.tensor([e.batch_index for e in self.entries], device=logits.device)
        self._logprobs, probs, entropy, margin = distribution_stats(logits.index_select(0, rows))
        by_layer: dict[int, list[int]] = {}  # lens layer -> entries that want it, in entry order
        entropy_list, margin_list = entropy.tolist(), margin.tolist()  # one conversion, not one per entry
        for i, entry in enumerate(self.entries):
            order = entry.owner.signals
            signals = TokenSignals(index=entry.token_index, token_id=-1)
            if order.distribution:
                signals.entropy = entropy_list[i]
                signals.margin = margin_list[i]
            for layer in order.lens_layers:
                by_layer.setdefault(layer, []).append(i)
            if order.probes:
                hidden = torch.stack([self._tap(p.hook, entry.owner) for p in order.probes])  # [n_probes, d_model]
                scores = torch.sigmoid((hidden * entry.owner.probe_weights).sum(-1) + entry.owner.probe_bias)
                signals.probe_ids = tuple(p.id for p in order.probes)
                signals.probe_scores = tuple(float(s) for s in scores)
            signals.lens_layers = tuple(order.lens_layers)
            entry.signals = signals
        if by_layer:
            # one unembedding matmul for every (entry, layer) row, grouped by layer so that the common case (every
            # entry wants the layer) compares with the final distributions without copying them
            groups = sorted(by_layer.items())  # ascending, as each entry's lens_layers
            hidden = torch.cat(
                [
                    torch.stack([self._tap(_resid_post(layer), self.entries[i].owner) for i in idx])
                    for layer, idx in groups
                ]
            )  # [m, d_model]
            lens_logits = lens(hidden)  # [m, vocab]
            offset = 0
            for _layer, idx in groups:
                rows = lens_logits[offset : offset + len(idx)]
                offset += len(idx)
                if len(idx) == len(self.entries):
                    kl, top1 = lens_kl_and_top1(probs, entropy, rows)
                else:
                    at = torch.tensor(idx, device=probs.device)
                    kl, top1 = lens_kl_and_top1(probs.index_select(0, at), entropy.index_select(0, at), rows)
                for i, value, top in zip(idx, kl.tolist(), top1.tolist(), strict=True):
                    signals = self.entries[i].signals
                    signals.lens_kl += (value,)
                    signals.lens_top1 += (int(top),)

    def after_sampling(self, sampled: torch.Tensor) -> list[tuple[SamplingEntry, list[MonitorEvent]]]:
        """Finish each entry's signals with its chosen token (`sampled`: [num_reqs, 1]) and run its monitors."""
        rows = torch.tensor([e.batch_index for e in self.entries], device=sampled.device)
        chosen = sampled.index_select(0, rows)[:, 0].long()  # [n]
        logprob, rank = chosen_logprob_and_rank(self._logprobs, chosen)
        chosen_list, logprob_list, rank_list = chosen.tolist(), logprob.tolist(), rank.tolist()
        results = []
        for i, entry in enumerate(self.entries):
            signals = entry.signals
            signals.token_id = chosen_list[i]
            if entry.owner.signals.distribution:
                signals.logprob = logprob_list[i]
                signals.rank = rank_list[i]
            if signals.lens_layers:
                signals.lens_earliest = earliest_agreeing_layer(
                    signals.lens_layers, list(signals.lens_top1), signals.token_id
                )
            events = []
            if entry.owner.monitor is not None:
                events = [event for _, event in entry.owner.fire_monitors(entry.token_index, signals.values())]
                signals.events = [event.to_json() for event in events]
            results.append((entry, events))
        self._logprobs = None
        return results


def _resid_post(layer: int) -> str:
    return f"blocks.{layer}.hook_resid_post"
