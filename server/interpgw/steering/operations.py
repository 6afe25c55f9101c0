"""Steering-vector registry, contrastive training and activation patching: the service operations of steering.

They run on the gateway's engines through `GatewayService.forward` and keep their state in its vector store
and trace repository; the gRPC layer calls them as `service.steering.<operation>`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from interpgw.core.errors import InvalidArgument, NotFound, ResourceExhausted
from interpgw.core.hookpoints import LAYER_KINDS, parse_hook, parse_hooks
from interpgw.core.interventions import check_vector
from interpgw.core.requests import PatchInput, PatchOutput, TrainVectorInput
from interpgw.engine.base import ModelFacts
from interpgw.registry.records import VectorRecord, new_vector_id
from interpgw.steering.patching import PatchMetric, PatchMetricKind, patch_grid
from interpgw.steering.training import TrainMethod, contrast_vector, mean_over_tokens

if TYPE_CHECKING:
    from interpgw.service import GatewayService


class SteeringOperations:
    def __init__(self, gateway: GatewayService) -> None:
        self._gateway = gateway

    # ------------------------------------------------------------------ steering-vector registry

    async def create_vector(
        self,
        model: str,
        hooks: Sequence[str],
        tensor: torch.Tensor,
        name: str = "",
        description: str = "",
        public: bool = False,
    ) -> VectorRecord:
        served = self._gateway.model(model)
        facts = served.facts
        if not hooks:
            raise InvalidArgument("a vector needs at least one hook (one per row of its tensor)")
        names = [parse_hook(h, facts.n_layers).name for h in hooks]
        if len(set(names)) != len(names):
            raise InvalidArgument(f"duplicate hooks in {list(hooks)}")
        if tensor.dim() == 1:
            tensor = tensor.unsqueeze(0)
        if tensor.dim() != 2 or tensor.shape[0] != len(names):
            raise InvalidArgument(
                f"tensor has shape {list(tensor.shape)}; expected [{len(names)}, {facts.d_model}] (one row per hook)"
            )
        rows = torch.stack([check_vector(row, facts.d_model, f"row {i} of the tensor") for i, row in enumerate(tensor)])
        return await self._save(facts, tuple(names), rows, "tensor", 0, name, description, public=public)

    async def train_vector(self, request: TrainVectorInput, public: bool = False) -> VectorRecord:
        """Contrastive training: trace each pair's prompts through the engine, then CAA / PCA per hook."""
        served = self._gateway.model(request.model)
        facts = served.facts
        try:
            method = TrainMethod(request.method)
        except ValueError:
            raise InvalidArgument(f"unknown method {request.method!r}; valid: mean_diff, pca") from None
        if request.reduce not in ("last", "mean"):
            raise InvalidArgument(f"unknown reduce {request.reduce!r}; valid: last, mean")
        if not 1 <= len(request.pairs) <= self._gateway.limits.max_train_pairs:
            raise InvalidArgument(
                f"training needs 1 to {self._gateway.limits.max_train_pairs} pairs, got {len(request.pairs)}"
            )
        if method is TrainMethod.PCA and len(request.pairs) < 2:
            raise InvalidArgument("method pca needs at least 2 pairs")
        names = request.hooks or tuple(f"blocks.{layer}.hook_resid_post" for layer in range(facts.n_layers))
        hooks = tuple(h.name for h in parse_hooks(list(names), facts.n_layers))
        positive_ids = served.encoder.encode_each([pair.positive for pair in request.pairs], "positive prompt of pair")
        negative_ids = served.encoder.encode_each([pair.negative for pair in request.pairs], "negative prompt of pair")

        async def reduced(ids: list[int]) -> dict[str, torch.Tensor]:
            positions = (len(ids) - 1,) if request.reduce == "last" else None
            captured = await self._gateway.forward(served, ids, (), hooks, positions)
            return {hook: mean_over_tokens(captured[hook]) for hook in hooks}  # hook -> [d_model]

        positives = await asyncio.gather(*(reduced(ids) for ids in positive_ids))
        negatives = await asyncio.gather(*(reduced(ids) for ids in negative_ids))
        rows, separation = [], []
        for hook in hooks:
            vector, sep = contrast_vector(
                torch.stack([p[hook] for p in positives]), torch.stack([n[hook] for n in negatives]), method
            )
            rows.append(vector)
            separation.append(sep)
        return await self._save(
            facts,
            hooks,
            torch.stack(rows),
            method.value,
            len(request.pairs),
            request.name,
            request.description,
            tuple(separation),
            public=public,
        )

    async def _save(
        self,
        facts: ModelFacts,
        hooks: tuple[str, ...],
        tensor: torch.Tensor,  # [len(hooks), d_model]
        method: str,
        n_pairs: int,
        name: str,
        description: str,
        separation: tuple[float, ...] = (),
        public: bool = False,
    ) -> VectorRecord:
        """A new registry record for this model, stored."""
        record = VectorRecord(
            id=new_vector_id(),
            model=facts.id,
            d_model=facts.d_model,
            hooks=hooks,
            tensor=tensor,
            method=method,
            n_pairs=n_pairs,
            created=time.time(),
            name=check_label(name, "name"),
            description=check_label(description, "description", 4096),
            separation=separation,
            public=public,
        )
        await self._gateway.vectors.put(record)
        await self.registry_changed()
        return record

    async def list_vectors(self, model: str = "") -> list[VectorRecord]:
        if model:
            self._gateway.model(model)  # unknown model: INVALID_ARGUMENT rather than an empty list
        return [r for r in await self._gateway.vectors.list(model or None) if r.kind == "vector"]

    async def get_vector(self, vector_id: str) -> VectorRecord:
        record = await self._gateway.vectors.get(vector_id) if vector_id else None
        if record is None or record.kind != "vector":
            raise NotFound(f"no steering vector with id {vector_id!r}")
        return record

    async def delete_vector(self, vector_id: str) -> bool:
        await self.get_vector(vector_id)
        if not await self._gateway.vectors.delete(vector_id):
            raise NotFound(f"no steering vector with id {vector_id!r}")
        await self.registry_changed()
        return True

    async def registry_changed(self) -> None:
        if self._gateway.metrics is not None:
            self._gateway.metrics.registry_size(await self._gateway.vectors.count())

    # ------------------------------------------------------------------ activation patching

    async def patch(self, request: PatchInput) -> PatchOutput:
        served = self._gateway.model(request.model)
        facts, encoder = served.facts, served.encoder
        stored = None
        if request.clean_trace:
            stored = await self._gateway.traces.fetch(request.clean_trace)  # hooks checked below, once layers are known
            clean = list(stored.token_ids)
        else:
            clean = encoder.encode(request.clean, reserve=1)
        corrupted = encoder.encode(request.corrupted, reserve=1)
        if len(clean) != len(corrupted):
            raise InvalidArgument(
                f"clean and corrupted prompts must have the same number of tokens ({len(clean)} != {len(corrupted)})"
            )
        if request.hook not in LAYER_KINDS:
            raise InvalidArgument(f"unknown patch hook {request.hook!r}; valid: {', '.join(LAYER_KINDS)}")
        try:
            kind = PatchMetricKind(request.metric)
        except ValueError:
            raise InvalidArgument(f"unknown metric {request.metric!r}; valid: logit_diff, prob") from None
        if request.target is None:
            raise InvalidArgument("the metric needs a target token")
        target = encoder.single_token(request.target, "target")
        foil = None
        if kind is PatchMetricKind.LOGIT_DIFF:
            if request.foil is None:
                raise InvalidArgument("metric logit_diff needs a foil token")
            foil = encoder.single_token(request.foil, "foil")
        layers = sorted(
            {parse_hook(f"blocks.{layer}.{request.hook}", facts.n_layers).layer for layer in request.layers}
        )
        layers = layers or list(range(facts.n_layers))
        positions = request.positions.resolve(len(corrupted))
        if not positions:
            raise InvalidArgument("patching needs at least one position")
        runs = len(layers) * len(positions)
        if runs > self._gateway.limits.max_patch_runs:
            raise ResourceExhausted(
                f"{len(layers)} layers x {len(positions)} positions = {runs} runs; the limit is "
                f"{self._gateway.limits.max_patch_runs}: patch fewer layers or positions"
            )

        clean_acts = None
        if stored is not None:
            hooks = [f"blocks.{layer}.{request.hook}" for layer in layers]
            entry = await self._gateway.stored_activations(served, request.clean_trace, hooks)
            clean_acts = {hook: entry.tensors[hook].float() for hook in hooks}

        async def forward(ids, edits, hooks, at):  # noqa: ANN001, ANN202 - patching.Forward
            return await self._gateway.forward(served, ids, edits, hooks, at)

        grid = await patch_grid(
            forward,
            clean,
            corrupted,
            request.hook,
            layers,
            positions,
            PatchMetric(kind, target, foil),
            await asyncio.to_thread(served.unembedding),
            clean_acts,
        )
        return PatchOutput(
            layers=grid.layers,
            positions=grid.positions,
            tokens=encoder.token_strings(corrupted),
            metric=grid.metric,
            restored=grid.restored,
            clean_metric=grid.clean_metric,
            corrupted_metric=grid.corrupted_metric,
            target_id=target,
            foil_id=foil,
        )


def check_label(text: str, what: str, limit: int = 256) -> str:
    if len(text) > limit:
        raise InvalidArgument(f"{what} is {len(text)} characters; at most {limit} are allowed")
    return text
