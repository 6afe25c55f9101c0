"""What one request asks the engine worker to compute per generated token, as JSON-safe data.

A `SignalOrder` travels inside the request's `HookOrder` (vLLM `SamplingParams.extra_args`), like edits do. It
names the signals to compute at each sampling step, the probes to score (weights inline: the worker has no
registry), and the monitors to evaluate on the resulting values.

Signal names are stable strings, used by monitors and by the sequence aggregates:
`entropy`, `logprob`, `rank`, `margin`, `lens_kl:<layer>`, `lens_earliest`, `probe:<id>`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

import torch

from interpgw.core.interventions import EditOrder

DISTRIBUTION_SIGNALS = ("entropy", "logprob", "rank", "margin")


def lens_signal(layer: int) -> str:
    return f"lens_kl:{layer}"


def probe_signal(probe_id: str) -> str:
    return f"probe:{probe_id}"


@dataclass(frozen=True)
class ProbeOrder:
    """A linear probe as the worker applies it: score = sigmoid(h @ weight + bias) on one hook's row."""

    id: str
    hook: str  # canonical hook name
    weight: tuple[float, ...]  # [d_model]
    bias: float

    def to_json(self) -> dict:
        return {"id": self.id, "hook": self.hook, "weight": list(self.weight), "bias": self.bias}

    @classmethod
    def from_json(cls, data: dict) -> ProbeOrder:
        return cls(
            id=str(data["id"]),
            hook=str(data["hook"]),
            weight=tuple(float(w) for w in data["weight"]),
            bias=float(data["bias"]),
        )

    def weight_tensor(self) -> torch.Tensor:
        return torch.tensor(self.weight, dtype=torch.float32)  # [d_model]


class Comparison(StrEnum):
    LT = "<"
    LE = "<="
    GT = ">"
    GE = ">="

    def holds(self, value: float, threshold: float) -> bool:
        if self is Comparison.LT:
            return value < threshold
        if self is Comparison.LE:
            return value <= threshold
        if self is Comparison.GT:
            return value > threshold
        return value >= threshold


class Reduce(StrEnum):
    ALL = "all"  # the comparison holds for each of the last `window` tokens
    MEAN = "mean"  # the comparison holds for the mean over the last `window` tokens


class Action(StrEnum):
    FLAG = "flag"  # report an event, generation goes on
    STOP = "stop"  # end the generation after the token that fired
    STEER = "steer"  # apply the monitor's edits from the next token on


@dataclass(frozen=True)
class MonitorRule:
    """`signal op threshold over a window -> action`; fires at most once per request."""

    name: str
    signal: str
    op: Comparison
    threshold: float
    window: int = 1
    reduce: Reduce = Reduce.ALL
    action: Action = Action.FLAG
    edits: tuple[EditOrder, ...] = ()  # STEER: armed when the monitor fires

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "signal": self.signal,
            "op": self.op.value,
            "threshold": self.threshold,
            "window": self.window,
            "reduce": self.reduce.value,
            "action": self.action.value,
            "edits": [edit.to_json() for edit in self.edits],
        }

    @classmethod
    def from_json(cls, data: dict) -> MonitorRule:
        return cls(
            name=str(data["name"]),
            signal=str(data["signal"]),
            op=Comparison(data["op"]),
            threshold=float(data["threshold"]),
            window=int(data.get("window", 1)),
            reduce=Reduce(data.get("reduce", "all")),
            action=Action(data.get("action", "flag")),
            edits=tuple(EditOrder.from_json(e) for e in data.get("edits") or ()),
        )


@dataclass(frozen=True)
class SignalOrder:
    distribution: bool = False  # entropy, chosen-token logprob and rank, top-1/top-2 margin
    lens_layers: tuple[int, ...] = ()  # absolute layer indices, ascending: logit lens on their resid_post
    probes: tuple[ProbeOrder, ...] = ()
    monitors: tuple[MonitorRule, ...] = field(default_factory=tuple)

    def to_json(self) -> dict:
        return {
            "distribution": self.distribution,
            "lens_layers": list(self.lens_layers),
            "probes": [p.to_json() for p in self.probes],
            "monitors": [m.to_json() for m in self.monitors],
        }

    @classmethod
    def from_json(cls, data: dict) -> SignalOrder:
        return cls(
            distribution=bool(data.get("distribution", False)),
            lens_layers=tuple(int(layer) for layer in data.get("lens_layers") or ()),
            probes=tuple(ProbeOrder.from_json(p) for p in data.get("probes") or ()),
            monitors=tuple(MonitorRule.from_json(m) for m in data.get("monitors") or ()),
        )

    def tap_hooks(self) -> tuple[str, ...]:
        """Hook points whose sampling-row value the signals read."""
        hooks = [f"blocks.{layer}.hook_resid_post" for layer in self.lens_layers]
        hooks += [p.hook for p in self.probes]
        return tuple(dict.fromkeys(hooks))

    def signal_names(self) -> tuple[str, ...]:
        names: list[str] = list(DISTRIBUTION_SIGNALS) if self.distribution else []
        if self.lens_layers:
            names += [lens_signal(layer) for layer in self.lens_layers] + ["lens_earliest"]
        names += [probe_signal(p.id) for p in self.probes]
        return tuple(names)
