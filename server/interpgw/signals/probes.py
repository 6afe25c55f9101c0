"""Linear probes in the registry: training from labelled prompts, listing, and scoring activations.

A probe is stored as a registry record of kind "probe" next to steering vectors: its weight is the record's one
row (at the probe's hook), its bias, held-out metrics and calibration quantiles are in `extra`. Training traces
every example through the engine (in one batch), reduces each to one `[d_model]` row (last token, or mean without
the attention sink) and fits a logistic regression (`probe_fit.py`).
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from interpgw.core.errors import InvalidArgument, NotFound
from interpgw.core.hookpoints import parse_hook
from interpgw.core.requests import TrainProbeInput
from interpgw.registry.records import VectorRecord, new_probe_id
from interpgw.signals.orders import ProbeOrder
from interpgw.signals.probe_fit import quantile_of, train_probe
from interpgw.steering.operations import check_label
from interpgw.steering.training import mean_over_tokens

if TYPE_CHECKING:
    from interpgw.service import GatewayService, ServedModel

POSITIONS = ("last", "mean")
MIN_PER_CLASS = 4


@dataclass(frozen=True)
class Probe:
    """A registry record of kind "probe", read as a probe."""

    record: VectorRecord

    @property
    def id(self) -> str:
        return self.record.id

    @property
    def hook(self) -> str:
        return self.record.hooks[0]

    @property
    def weight(self) -> torch.Tensor:
        return self.record.tensor[0]  # [d_model]

    @property
    def bias(self) -> float:
        return float(self.record.extra["bias"])

    @property
    def position(self) -> str:
        return str(self.record.extra.get("position", "last"))

    @property
    def quantiles(self) -> tuple[float, ...]:
        return tuple(self.record.extra.get("quantiles") or ())

    def order(self) -> ProbeOrder:
        return ProbeOrder(id=self.id, hook=self.hook, weight=tuple(self.weight.tolist()), bias=self.bias)

    def scores(self, rows: torch.Tensor) -> torch.Tensor:
        """sigmoid(rows @ w + b) for rows `[n, d_model]` -> `[n]`."""
        return torch.sigmoid(rows.float() @ self.weight + self.bias)

    def pooled(self, rows: torch.Tensor) -> float:
        """The probe's own reduction of a prompt's rows `[n, d_model]` (as in training), scored."""
        if rows.shape[0] == 0:
            return float("nan")
        row = rows[-1] if self.position == "last" else mean_over_tokens(rows.float())
        return float(self.scores(row.unsqueeze(0))[0])

    def quantile(self, score: float) -> float:
        return quantile_of(score, self.quantiles) if len(self.quantiles) >= 2 else float("nan")


class ProbeOperations:
    def __init__(self, gateway: GatewayService) -> None:
        self._gateway = gateway

    async def train(self, request: TrainProbeInput, public: bool = False) -> VectorRecord:
        gateway = self._gateway
        served = gateway.model(request.model)
        facts = served.facts
        hook = parse_hook(request.hook or f"blocks.{facts.n_layers // 2}.hook_resid_post", facts.n_layers).name
        if request.position not in POSITIONS:
            raise InvalidArgument(f"unknown probe position {request.position!r}; valid: {', '.join(POSITIONS)}")
        limit = gateway.limits.max_train_pairs * 2
        if len(request.examples) > limit:
            raise InvalidArgument(f"{len(request.examples)} examples; at most {limit} are allowed")
        n_true = sum(1 for e in request.examples if e.label)
        n_false = len(request.examples) - n_true
        if min(n_true, n_false) < MIN_PER_CLASS:
            raise InvalidArgument(
                f"a probe needs at least {MIN_PER_CLASS} examples of each label; got {n_true} true, {n_false} false"
            )
        test_fraction = request.test_fraction or 0.25
        if not 0.05 <= test_fraction <= 0.5:
            raise InvalidArgument(f"test_fraction must be in [0.05, 0.5], got {test_fraction}")
        if not math.isfinite(request.l2) or not 0 <= request.l2 <= 1e4:
            raise InvalidArgument(f"l2 must be a finite number in [0, 10000], got {request.l2}")
        encoded = served.encoder.encode_each([e.prompt for e in request.examples], "example")
        rows = await asyncio.gather(*(self._reduced(served, ids, hook, request.position) for ids in encoded))
        features = torch.stack(rows)  # [n_examples, d_model]
        labels = torch.tensor([e.label for e in request.examples])
        try:
            fit = await asyncio.to_thread(train_probe, features, labels, test_fraction, request.seed, request.l2)
        except ValueError as exc:
            raise InvalidArgument(f"probe training failed: {exc}") from None
        record = VectorRecord(
            id=new_probe_id(),
            model=facts.id,
            d_model=facts.d_model,
            hooks=(hook,),
            tensor=fit.weight.unsqueeze(0),
            method="logistic",
            n_pairs=len(request.examples),
            created=time.time(),
            name=check_label(request.name, "name"),
            description=check_label(request.description, "description", 4096),
            kind="probe",
            public=public,
            extra={
                "bias": fit.bias,
                "position": request.position,
                "train_auroc": fit.train_auroc,
                "test_auroc": fit.test_auroc,
                "test_accuracy": fit.test_accuracy,
                "n_train": fit.n_train,
                "n_test": fit.n_test,
                "quantiles": list(fit.quantiles),
                "l2": request.l2,
                "seed": request.seed,
            },
        )
        await gateway.vectors.put(record)
        await gateway.steering.registry_changed()
        return record

    async def _reduced(self, served: ServedModel, ids: list[int], hook: str, position: str) -> torch.Tensor:
        at = (len(ids) - 1,) if position == "last" else None
        rows = (await self._gateway.forward(served, ids, (), (hook,), at))[hook]  # [n, d_model] float32
        return mean_over_tokens(rows)

    async def list(self, model: str = "") -> list[VectorRecord]:
        if model:
            self._gateway.model(model)
        return [r for r in await self._gateway.vectors.list(model or None) if r.kind == "probe"]

    async def get(self, probe_id: str) -> VectorRecord:
        record = await self._gateway.vectors.get(probe_id) if probe_id else None
        if record is None or record.kind != "probe":
            raise NotFound(f"no probe with id {probe_id!r}")
        return record

    async def delete(self, probe_id: str) -> bool:
        await self.get(probe_id)
        await self._gateway.vectors.delete(probe_id)
        await self._gateway.steering.registry_changed()
        return True

    async def resolve(self, served: ServedModel, ids: tuple[str, ...]) -> list[Probe]:
        """The probes `ids` for this model, or INVALID_ARGUMENT / NOT_FOUND saying which one is wrong."""
        if len(ids) > 16:
            raise InvalidArgument(f"{len(ids)} probes in one request; at most 16 are allowed")
        probes = []
        for probe_id in dict.fromkeys(ids):
            record = await self.get(probe_id)
            if record.model != served.facts.id or record.d_model != served.facts.d_model:
                raise InvalidArgument(f"probe {probe_id} belongs to model {record.model!r}, not {served.facts.id!r}")
            probes.append(Probe(record))
        return probes
