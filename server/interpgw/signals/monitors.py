"""Per-request monitor rules evaluated on each token's signals.

Evaluation runs in the engine worker, right after the token is sampled, so a STEER action takes effect from the
very next forward step and a STOP is decided on exactly the token that crossed the threshold, whatever the
network does later.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from interpgw.signals.orders import Action, MonitorRule, Reduce


@dataclass(frozen=True)
class MonitorEvent:
    monitor: str
    token_index: int
    signal: str
    value: float  # the value that decided: the token's own (ALL) or the window mean (MEAN)
    action: Action

    def to_json(self) -> dict:
        return {
            "monitor": self.monitor,
            "token_index": self.token_index,
            "signal": self.signal,
            "value": self.value,
            "action": self.action.value,
        }

    @classmethod
    def from_json(cls, data: dict) -> MonitorEvent:
        return cls(
            monitor=str(data["monitor"]),
            token_index=int(data["token_index"]),
            signal=str(data["signal"]),
            value=float(data["value"]),
            action=Action(data["action"]),
        )


class MonitorState:
    """The recent values of each rule's signal; fires each rule at most once."""

    def __init__(self, rules: tuple[MonitorRule, ...]) -> None:
        self.rules = rules
        self._recent = [deque(maxlen=rule.window) for rule in rules]
        self._fired = [False] * len(rules)

    def update(self, token_index: int, values: dict[str, float]) -> list[tuple[MonitorRule, MonitorEvent]]:
        """Feed one token's signal values; the rules that fire on it."""
        fired = []
        for i, rule in enumerate(self.rules):
            if self._fired[i] or rule.signal not in values:
                continue
            recent = self._recent[i]
            recent.append(values[rule.signal])
            if len(recent) < rule.window:
                continue
            if rule.reduce is Reduce.MEAN:
                value = sum(recent) / len(recent)
                holds = rule.op.holds(value, rule.threshold)
            else:
                value = values[rule.signal]
                holds = all(rule.op.holds(v, rule.threshold) for v in recent)
            if holds:
                self._fired[i] = True
                fired.append((rule, MonitorEvent(rule.name, token_index, rule.signal, float(value), rule.action)))
        return fired
