"""Sequence-level scores from a generation's token signals (returned at the end of the stream)."""

from __future__ import annotations

import math
from collections.abc import Sequence

from interpgw.signals.token_signals import TokenSignals


def sequence_scores(tokens: Sequence[TokenSignals]) -> dict[str, float]:
    """For every signal: `<name>.mean`, `.min`, `.max` over the tokens; `perplexity` from the chosen logprobs."""
    columns: dict[str, list[float]] = {}
    for token in tokens:
        for name, value in token.values().items():
            columns.setdefault(name, []).append(value)
    scores: dict[str, float] = {}
    for name, values in columns.items():
        scores[f"{name}.mean"] = sum(values) / len(values)
        scores[f"{name}.min"] = min(values)
        scores[f"{name}.max"] = max(values)
    if "logprob" in columns:
        scores["perplexity"] = math.exp(-scores["logprob.mean"])
    if tokens:
        scores["n_tokens"] = float(len(tokens))
    return scores
