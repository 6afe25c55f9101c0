"""From a client's signal request to the `SignalOrder` the worker runs, validated against the served model.

Monitors may name signals the request did not list (a probe, a lens layer, entropy): those are added, so a rule
never waits on a value nobody computes.
"""

from __future__ import annotations

import math
import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from interpgw.core.errors import InvalidArgument
from interpgw.core.interventions import EditOrder
from interpgw.core.requests import MonitorInput, SignalsInput, quoted
from interpgw.engine.base import ModelFacts
from interpgw.signals.orders import (
    DISTRIBUTION_SIGNALS,
    Action,
    Comparison,
    MonitorRule,
    Reduce,
    SignalOrder,
)
from interpgw.signals.probes import Probe

MAX_MONITORS = 16
MAX_WINDOW = 1024
MAX_LENS_LAYERS = 64
MAX_EIGENSCORE_SAMPLES = 32
_LENS_LAYER = re.compile(r"-?[0-9]{1,9}", re.ASCII)

ResolveProbes = Callable[[tuple[str, ...]], Awaitable[list[Probe]]]
# interventions -> edits placed on this prompt
ResolveEdits = Callable[[Sequence], Awaitable[tuple[EditOrder, ...]]]


@dataclass(frozen=True)
class ResolvedSignals:
    order: SignalOrder
    probes: tuple[Probe, ...]  # in order.probes order
    eigenscore_samples: int  # 0: none
    eigenscore_layer: int


async def resolve_signals(
    request: SignalsInput, facts: ModelFacts, probes: ResolveProbes, edits: ResolveEdits
) -> ResolvedSignals:
    n_layers = facts.n_layers
    lens = {_layer(layer, n_layers, "lens layer") for layer in request.lens_layers}
    probe_ids = list(dict.fromkeys(request.probes))
    distribution = request.distribution
    if len(request.monitors) > MAX_MONITORS:
        raise InvalidArgument(f"{len(request.monitors)} monitors; at most {MAX_MONITORS} are allowed")
    rules = []
    for i, monitor in enumerate(request.monitors):
        signal = _monitor_signal(monitor.signal, n_layers)
        if signal in DISTRIBUTION_SIGNALS:
            distribution = True
        elif signal.startswith("lens_kl:"):
            lens.add(int(signal.split(":")[1]))
        elif signal == "lens_earliest" and not lens:
            raise InvalidArgument("monitor signal lens_earliest needs lens_layers")
        elif signal.startswith("probe:") and signal[6:] not in probe_ids:
            probe_ids.append(signal[6:])
        rules.append(await _rule(monitor, signal, i, edits))
    if len(lens) > MAX_LENS_LAYERS:
        raise InvalidArgument(f"{len(lens)} lens layers; at most {MAX_LENS_LAYERS} are allowed")
    resolved_probes = tuple(await probes(tuple(probe_ids))) if probe_ids else ()
    if request.eigenscore_samples and not 2 <= request.eigenscore_samples <= MAX_EIGENSCORE_SAMPLES:
        raise InvalidArgument(
            f"eigenscore_samples must be 0 (off) or in [2, {MAX_EIGENSCORE_SAMPLES}], got {request.eigenscore_samples}"
        )
    eigen_layer = n_layers // 2
    if request.eigenscore_layer is not None:
        eigen_layer = _layer(request.eigenscore_layer, n_layers, "eigenscore layer")
    order = SignalOrder(
        distribution=distribution,
        lens_layers=tuple(sorted(lens)),
        probes=tuple(p.order() for p in resolved_probes),
        monitors=tuple(rules),
    )
    return ResolvedSignals(order, resolved_probes, request.eigenscore_samples, eigen_layer)


def _layer(layer: int, n_layers: int, what: str) -> int:
    if not -n_layers <= layer < n_layers:
        raise InvalidArgument(
            f"{what} {layer} out of range: the model has {n_layers} layers, valid [{-n_layers}, {n_layers - 1}]"
        )
    return layer % n_layers


def _monitor_signal(signal: str, n_layers: int) -> str:
    valid = f"valid: {', '.join(DISTRIBUTION_SIGNALS)}, lens_kl:<layer>, lens_earliest, probe:<id>"
    if signal in DISTRIBUTION_SIGNALS or signal == "lens_earliest":
        return signal
    if signal.startswith("lens_kl:"):
        # ASCII digits only, as in hook names (int() would also take " 1", "1_0" or other scripts' digits)
        match = _LENS_LAYER.fullmatch(signal, len("lens_kl:"))
        if match is None:
            raise InvalidArgument(f"monitor signal {quoted(signal)}: the layer is not an integer; {valid}")
        return f"lens_kl:{_layer(int(match.group(0)), n_layers, 'monitor lens layer')}"
    if signal.startswith("probe:") and len(signal) > 6:
        return signal
    raise InvalidArgument(f"unknown monitor signal {quoted(signal)}; {valid}")


async def _rule(monitor: MonitorInput, signal: str, index: int, edits: ResolveEdits) -> MonitorRule:
    name = monitor.name or f"monitor-{index}"
    if len(name) > 128:
        raise InvalidArgument("a monitor name takes at most 128 characters")
    try:
        op = Comparison(monitor.op)
        reduce = Reduce(monitor.reduce)
        action = Action(monitor.action)
    except ValueError as exc:
        raise InvalidArgument(f"monitor {name}: {exc}") from None
    if not math.isfinite(monitor.threshold):
        raise InvalidArgument(f"monitor {name}: threshold must be a finite number, got {monitor.threshold}")
    window = max(monitor.window, 1)
    if window > MAX_WINDOW:
        raise InvalidArgument(f"monitor {name}: window must be in [1, {MAX_WINDOW}], got {monitor.window}")
    armed: tuple[EditOrder, ...] = ()
    if action is Action.STEER:
        if not monitor.interventions:
            raise InvalidArgument(f"monitor {name}: action steer needs at least one intervention")
        armed = await edits(monitor.interventions)
    elif monitor.interventions:
        raise InvalidArgument(f"monitor {name}: interventions are only used by action steer, not {action.value}")
    return MonitorRule(
        name=name,
        signal=signal,
        op=op,
        threshold=float(monitor.threshold),
        window=window,
        reduce=reduce,
        action=action,
        edits=armed,
    )
