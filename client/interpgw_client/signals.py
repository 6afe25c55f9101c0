"""Hallucination-detection signals: per-token signal requests, monitors, linear probes.

Import direction: `protocol` imports this module; this module imports `protocol` only inside the functions that
build interventions and prompts, so neither import is circular at load time.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

import numpy as np

from interpgw.v1 import gateway_pb2 as pb
from interpgw_client.tensors import is_index, to_numpy

if TYPE_CHECKING:
    from interpgw_client.protocol import InterventionLike, SteerLike

OPS = {"<": pb.Monitor.LT, "<=": pb.Monitor.LE, ">": pb.Monitor.GT, ">=": pb.Monitor.GE}
REDUCES = {"all": pb.Monitor.ALL, "mean": pb.Monitor.MEAN}
ACTIONS = {"flag": pb.Monitor.FLAG, "stop": pb.Monitor.STOP, "steer": pb.Monitor.STEER}
_ACTION_NAMES = {code: name for name, code in ACTIONS.items()}
DISTRIBUTION_SIGNALS = ("entropy", "logprob", "rank", "margin")
_SIGNAL_FORMS = "entropy, logprob, rank, margin, lens_kl:<layer>, lens_earliest, probe:<id>"
PROBE_POSITIONS = {"last": pb.TrainProbeRequest.LAST, "mean": pb.TrainProbeRequest.MEAN}
_PROMPT_KEYS = ("prompt", "text", "statement")


def check_signal(signal: str) -> str:
    """Fail on a malformed signal name before any RPC; the server still checks layers and probe ids."""
    if not isinstance(signal, str):
        raise TypeError(f"a signal name is a string ({_SIGNAL_FORMS}), got {type(signal).__name__}")
    if signal in DISTRIBUTION_SIGNALS or signal == "lens_earliest":
        return signal
    if signal.startswith("lens_kl:"):
        try:
            int(signal[len("lens_kl:") :])
        except ValueError:
            raise ValueError(f"signal {signal!r}: the layer is not an integer; valid: {_SIGNAL_FORMS}") from None
        return signal
    if signal.startswith("probe:") and len(signal) > len("probe:"):
        return signal
    raise ValueError(f"unknown signal {signal!r}; valid: {_SIGNAL_FORMS}")


# ---------------------------------------------------------------------- requests


@dataclass
class Monitor:
    """`signal op threshold` over the last `window` tokens -> `action`; fires at most once per generation.

    reduce "all": every token of the window satisfies the comparison; "mean": the window's mean does.
    action "flag" reports a MonitorEvent, "stop" ends the generation (finish_reason "monitor"), "steer" applies
    `interventions` / `steer` (as in `generate`) from the next token on."""

    signal: str
    op: str
    threshold: float
    window: int = 1
    reduce: str = "all"
    action: str = "flag"
    interventions: Sequence[InterventionLike] | None = None
    steer: SteerLike | None = None
    name: str = ""  # reported in events; the server names it "monitor-<i>" when empty

    def __post_init__(self) -> None:
        check_signal(self.signal)
        if self.op not in OPS:
            raise ValueError(f"monitor op must be one of {list(OPS)}, got {self.op!r}")
        self.reduce = self.reduce.lower() if isinstance(self.reduce, str) else self.reduce
        if self.reduce not in REDUCES:
            raise ValueError(f"monitor reduce must be one of {list(REDUCES)}, got {self.reduce!r}")
        self.action = self.action.lower() if isinstance(self.action, str) else self.action
        if self.action not in ACTIONS:
            raise ValueError(f"monitor action must be one of {list(ACTIONS)}, got {self.action!r}")
        if not is_index(self.window) or self.window < 0:
            raise ValueError(
                f"monitor window is a number of tokens >= 0 (0 or 1: each token alone), got {self.window!r}"
            )
        if not math.isfinite(float(self.threshold)):
            raise ValueError(f"monitor threshold must be a finite number, got {self.threshold!r}")
        edits = bool(self.interventions) or self.steer is not None
        if self.action == "steer" and not edits:
            raise ValueError("monitor action 'steer' needs interventions= or steer=")
        if self.action != "steer" and edits:
            raise ValueError(f"interventions/steer are only used by action 'steer', not {self.action!r}")

    def to_proto(self) -> pb.Monitor:
        from interpgw_client.protocol import build_interventions

        return pb.Monitor(
            name=self.name,
            signal=self.signal,
            op=OPS[self.op],
            threshold=float(self.threshold),
            window=operator.index(self.window),
            reduce=REDUCES[self.reduce],
            action=ACTIONS[self.action],
            interventions=build_interventions(self.interventions, self.steer),
        )


MonitorLike = Monitor | dict
_MONITOR_KEYS = [f.name for f in fields(Monitor)]


def build_monitor(monitor: MonitorLike) -> Monitor:
    if isinstance(monitor, Monitor):
        return monitor
    if isinstance(monitor, dict):
        unknown = sorted(set(monitor) - set(_MONITOR_KEYS))
        if unknown:
            raise ValueError(f"monitor dict has unknown keys {unknown}; keys: {_MONITOR_KEYS}")
        return Monitor(**monitor)
    raise TypeError(f"a monitor is a Monitor or a dict, got {type(monitor).__name__}")


@dataclass
class Signals:
    """Which per-token signals `generate` streams: the next-token `distribution` (entropy, logprob, rank, margin),
    a logit lens on `lens_layers`, registry `probes`, `monitors` acting on them, and EigenScore over
    `eigenscore_samples` (>= 2) extra sampled continuations. Monitors on unrequested signals add them server-side."""

    distribution: bool = True
    lens_layers: Sequence[int] = ()
    probes: Sequence[str] = ()
    monitors: Sequence[MonitorLike] = ()
    eigenscore_samples: int = 0
    eigenscore_layer: int | None = None

    def __post_init__(self) -> None:
        if is_index(self.lens_layers):
            self.lens_layers = [self.lens_layers]  # type: ignore[list-item]
        if not all(is_index(layer) for layer in self.lens_layers):
            raise ValueError(f"lens_layers are layer numbers (negative from the end), got {self.lens_layers!r}")
        self.lens_layers = [operator.index(layer) for layer in self.lens_layers]
        if isinstance(self.probes, str):
            self.probes = [self.probes]
        if not all(isinstance(p, str) and p for p in self.probes):
            raise ValueError(f"probes are registry probe ids (strings), got {self.probes!r}")
        self.probes = list(self.probes)
        if isinstance(self.monitors, Monitor | dict):
            self.monitors = [self.monitors]
        self.monitors = [build_monitor(m) for m in self.monitors]
        if any(m.signal == "lens_earliest" for m in self.monitors) and not self.lens_layers:  # type: ignore[union-attr]
            raise ValueError("a monitor on lens_earliest needs lens_layers")
        if not is_index(self.eigenscore_samples) or self.eigenscore_samples == 1 or self.eigenscore_samples < 0:
            raise ValueError(f"eigenscore_samples is 0 (off) or >= 2, got {self.eigenscore_samples!r}")
        if self.eigenscore_layer is not None:
            if not is_index(self.eigenscore_layer):
                raise ValueError(f"eigenscore_layer is a layer number, got {self.eigenscore_layer!r}")
            if not self.eigenscore_samples:
                raise ValueError("eigenscore_layer needs eigenscore_samples >= 2")

    def to_proto(self) -> pb.SignalRequest:
        request = pb.SignalRequest(
            distribution=self.distribution,
            lens_layers=list(self.lens_layers),
            probes=list(self.probes),
            monitors=[m.to_proto() for m in self.monitors],  # type: ignore[union-attr]
            eigenscore_samples=operator.index(self.eigenscore_samples),
        )
        if self.eigenscore_layer is not None:
            request.eigenscore_layer = operator.index(self.eigenscore_layer)
        return request


SignalsLike = Signals | dict | bool | pb.SignalRequest
_SIGNALS_KEYS = [f.name for f in fields(Signals)]


def build_signals(signals: SignalsLike | None) -> pb.SignalRequest | None:
    """None/False: no signals; True: the distribution signals only; a dict: `Signals(**dict)`."""
    if signals is None or signals is False:
        return None
    if signals is True:
        return Signals().to_proto()
    if isinstance(signals, pb.SignalRequest):
        return signals
    if isinstance(signals, dict):
        unknown = sorted(set(signals) - set(_SIGNALS_KEYS))
        if unknown:
            raise ValueError(f"signals dict has unknown keys {unknown}; keys: {_SIGNALS_KEYS}")
        signals = Signals(**signals)
    if not isinstance(signals, Signals):
        raise TypeError(f"signals is a Signals, a dict, True or None, got {type(signals).__name__}")
    return signals.to_proto()


# ---------------------------------------------------------------------- responses


@dataclass
class TokenSignals:
    """One generated token's signals; optional values are None when not requested (or not computable)."""

    index: int  # token index within the generation
    token_id: int
    entropy: float | None = None  # nats
    logprob: float | None = None  # of the chosen token
    rank: int | None = None  # of the chosen token; 1 = most likely
    margin: float | None = None  # logprob(top-1) - logprob(top-2)
    lens_layers: list[int] = field(default_factory=list)
    lens_kl: list[float] = field(default_factory=list)  # KL(final || lens) per lens layer, nats
    lens_top1: list[int] = field(default_factory=list)  # the lens's top-1 token per lens layer
    lens_earliest: int | None = None  # earliest lens layer whose top-1 is the chosen token; -1: none
    probe_ids: list[str] = field(default_factory=list)
    probe_scores: list[float] = field(default_factory=list)  # sigmoid scores in [0, 1]
    probe_quantiles: list[float] = field(default_factory=list)  # each score's quantile among its training scores

    @classmethod
    def from_proto(cls, msg: pb.TokenSignals) -> TokenSignals:
        def optional(name: str) -> Any:
            return getattr(msg, name) if msg.HasField(name) else None

        return cls(
            index=msg.index,
            token_id=msg.token_id,
            entropy=optional("entropy"),
            logprob=optional("logprob"),
            rank=optional("rank"),
            margin=optional("margin"),
            lens_layers=list(msg.lens_layers),
            lens_kl=list(msg.lens_kl),
            lens_top1=list(msg.lens_top1),
            lens_earliest=optional("lens_earliest"),
            probe_ids=list(msg.probe_ids),
            probe_scores=list(msg.probe_scores),
            probe_quantiles=list(msg.probe_quantiles),
        )

    def values(self) -> dict[str, float]:
        """The present values under the names monitors use ("entropy", "lens_kl:<layer>", "probe:<id>", ...)."""
        out = {
            name: float(getattr(self, name))
            for name in (*DISTRIBUTION_SIGNALS, "lens_earliest")
            if getattr(self, name) is not None
        }
        out.update({f"lens_kl:{layer}": float(kl) for layer, kl in zip(self.lens_layers, self.lens_kl, strict=False)})
        out.update({f"probe:{pid}": float(s) for pid, s in zip(self.probe_ids, self.probe_scores, strict=False)})
        return out


@dataclass
class MonitorEvent:
    """A monitor that fired, at the token that made it fire."""

    monitor: str
    token_index: int
    signal: str
    value: float  # the token's value (reduce "all") or the window mean ("mean")
    action: str  # "flag", "stop", "steer"
    variant: int = 0

    @classmethod
    def from_proto(cls, msg: pb.MonitorEvent) -> MonitorEvent:
        return cls(
            monitor=msg.monitor,
            token_index=msg.token_index,
            signal=msg.signal,
            value=msg.value,
            action=_ACTION_NAMES.get(msg.action, str(msg.action)),
            variant=msg.variant,
        )


@dataclass
class ProbeScores:
    """A probe applied by `trace`: one score per captured position, and its own pooled score."""

    scores: list[float]
    pooled: float

    @classmethod
    def from_proto(cls, msg: pb.ProbeScores) -> ProbeScores:
        return cls(scores=list(msg.scores), pooled=msg.pooled)


@dataclass
class Probe:
    """A registry probe: sigmoid(x . weight + bias) on `hook`'s activations; `weight` is None in listings."""

    id: str
    model: str
    name: str
    description: str
    hook: str
    d_model: int
    weight: np.ndarray | None  # [d_model] float32
    bias: float
    position: str  # "last" or "mean"
    train_auroc: float
    test_auroc: float  # on the held-out split
    test_accuracy: float  # threshold 0.5
    n_train: int
    n_test: int
    quantiles: list[float] = field(default_factory=list)  # 101 score quantiles over all examples
    created: float | None = None  # unix seconds; None when unset
    owner: str = ""  # tenant that trained it ("" when the gateway runs without authentication)
    public: bool = False  # published to every tenant

    @classmethod
    def from_proto(cls, msg: pb.Probe) -> Probe:
        weight = None
        if msg.HasField("weight") and msg.weight.data:
            w = msg.weight
            weight = to_numpy(w.dtype, tuple(w.shape), w.data).astype(np.float32, copy=False)
        return cls(
            id=msg.id,
            model=msg.model,
            name=msg.name,
            description=msg.description,
            hook=msg.hook,
            d_model=msg.d_model,
            weight=weight,
            bias=msg.bias,
            position=msg.position,
            train_auroc=msg.train_auroc,
            test_auroc=msg.test_auroc,
            test_accuracy=msg.test_accuracy,
            n_train=msg.n_train,
            n_test=msg.n_test,
            quantiles=list(msg.quantiles),
            created=msg.created.ToNanoseconds() / 1e9 if msg.HasField("created") else None,
            owner=msg.owner,
            public=msg.public,
        )


# ---------------------------------------------------------------------- probe training

# (prompt, label) or {"prompt" | "text" | "statement": prompt, "label": label}
ExampleLike = tuple[Any, Any] | dict


def _label(value: object, where: str) -> bool:
    if isinstance(value, bool | np.bool_):
        return bool(value)
    if is_index(value) and operator.index(value) in (0, 1):  # type: ignore[arg-type]
        return bool(value)
    raise ValueError(f"{where}: a label is a bool (or 0/1), got {value!r}")


def _example(example: ExampleLike, index: int, add_generation_prompt: bool) -> pb.LabelledPrompt:
    from interpgw_client.protocol import build_prompt

    where = f"example {index}"
    if isinstance(example, dict):
        keys = [k for k in _PROMPT_KEYS if k in example]
        if len(keys) != 1 or "label" not in example:
            raise ValueError(
                f"{where}: a dict example has one of {list(_PROMPT_KEYS)} and 'label', got {sorted(example)}"
            )
        prompt, label = example[keys[0]], example["label"]
    elif isinstance(example, Sequence) and not isinstance(example, str) and len(example) == 2:
        prompt, label = example
    else:
        raise ValueError(f"{where}: an example is (prompt, label) or {{'prompt': ..., 'label': ...}}, got {example!r}")
    return pb.LabelledPrompt(prompt=build_prompt(prompt, add_generation_prompt), label=_label(label, where))


def build_train_probe(
    examples: Sequence[ExampleLike],
    *,
    hook: str | None = None,
    layer: int | None = None,
    position: str = "last",
    test_fraction: float = 0.25,
    seed: int = 0,
    l2: float | None = None,
    name: str = "",
    description: str = "",
    model: str = "",
    add_generation_prompt: bool = False,
) -> pb.TrainProbeRequest:
    """`layer=L` means blocks.L.hook_resid_post; neither hook nor layer: the server's middle layer."""
    if hook is not None and layer is not None:
        raise ValueError("give hook or layer, not both")
    if layer is not None:
        if not is_index(layer):
            raise ValueError(f"layer is a layer number (negative from the end), got {layer!r}")
        hook = f"blocks.{operator.index(layer)}.hook_resid_post"
    if position not in PROBE_POSITIONS:
        raise ValueError(f"position must be one of {list(PROBE_POSITIONS)}, got {position!r}")
    if not 0 <= test_fraction < 1:
        raise ValueError(f"test_fraction is the held-out share in [0, 1), got {test_fraction!r}")
    if l2 is not None and not (math.isfinite(l2) and l2 >= 0):
        raise ValueError(f"l2 must be a finite number >= 0, got {l2!r}")
    items = [_example(e, i, add_generation_prompt) for i, e in enumerate(examples)]
    if not items:
        raise ValueError("training a probe needs labelled examples of both labels")
    if len({item.label for item in items}) < 2:
        raise ValueError(f"training a probe needs examples of both labels; all {len(items)} are {items[0].label}")
    request = pb.TrainProbeRequest(
        model=model,
        name=name,
        examples=items,
        hook=hook or "",
        position=PROBE_POSITIONS[position],
        test_fraction=test_fraction,
        seed=seed,
        description=description,
    )
    if l2 is not None:
        request.l2 = l2
    return request
