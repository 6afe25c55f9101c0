"""The service core: validates requests, plans captures, drives the engine and shapes results.

No gRPC and no vLLM here: the transport converts protobuf to `core.requests` types and back, and the engine
is anything that implements `engine.base.Engine`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from interpgw.access import current_caller, max_new_tokens_of, quota_of, require_role
from interpgw.cache.backends import MemoryTraceCache
from interpgw.cache.entries import CachedTrace
from interpgw.cache.traces import CACHE_MODES, TraceRepository, entry_from, trace_key, traced_from
from interpgw.config import LimitsConfig
from interpgw.core.capture import CAPTURE_DTYPES, HookOrder, estimate_capture_bytes
from interpgw.core.errors import FailedPrecondition, Internal, InvalidArgument, ResourceExhausted
from interpgw.core.hookpoints import all_hook_names, parse_hooks
from interpgw.core.interventions import EditOrder
from interpgw.core.positions import PositionMode, PositionSelector
from interpgw.core.prompts import PromptEncoder
from interpgw.core.requests import (
    Captured,
    CaptureOptions,
    GenerateDone,
    GenerateInput,
    MonitorFired,
    ProbeScoresOutput,
    PromptInput,
    SamplingInput,
    TokenDelta,
    TopLogits,
    TracedPrompt,
    TraceInput,
)
from interpgw.core.wire import torch_dtype
from interpgw.engine.base import CaptureResult, Engine, EngineStep, ModelFacts, SamplingOptions
from interpgw.limits import QuotaBook
from interpgw.registry.store import MemoryVectorStore, VectorStore
from interpgw.registry.tenancy import TenantScopedStore
from interpgw.signals.eigenscore import eigenscore
from interpgw.signals.orders import Action, SignalOrder
from interpgw.signals.probes import Probe, ProbeOperations
from interpgw.signals.resolve import ResolvedSignals, resolve_signals
from interpgw.signals.sequence import sequence_scores
from interpgw.signals.token_signals import TokenSignals
from interpgw.steering.operations import SteeringOperations
from interpgw.steering.resolve import InterventionResolver, PreparedEdit
from interpgw.steering.training import without_sink

log = logging.getLogger(__name__)

GenerateEvent = TokenDelta | GenerateDone

# EigenScore samples of a greedy request are drawn with INSIDE's setting (Chen et al. 2024): greedy continuations
# would all be equal and the score meaningless.
# vLLM 0.32 refuses higher temperatures in its own SamplingParams check.
MAX_TEMPERATURE = 2.0

EIGENSCORE_SAMPLING = {"temperature": 0.5, "top_p": 0.99, "top_k": 10}


@dataclass
class ServedModel:
    engine: Engine
    encoder: PromptEncoder
    max_logprobs: int
    revision: str = ""  # fingerprint of the weights, part of every cache key
    _unembedding: torch.Tensor | None = field(default=None, repr=False)

    @property
    def facts(self) -> ModelFacts:
        return self.engine.facts

    def unembedding(self) -> torch.Tensor:
        """[vocab, d_model] float32, read from the checkpoint on first use."""
        if self._unembedding is None:
            from interpgw.models.unembed import load_unembedding

            facts = self.facts
            self._unembedding = load_unembedding(facts.source, facts.vocab_size, facts.d_model)
        return self._unembedding


class GatewayService:
    def __init__(
        self,
        models: list[ServedModel],
        limits: LimitsConfig,
        allow_faults: bool = False,
        vectors: VectorStore | None = None,
        traces: TraceRepository | None = None,
        metrics: Any = None,
        quotas: QuotaBook | None = None,
    ) -> None:
        if not models:
            raise ValueError("a gateway needs at least one model")
        self._models = {m.facts.id: m for m in models}
        self._default = models[0].facts.id
        self.limits = limits
        self._allow_faults = allow_faults
        # every registry access goes through the current caller's tenant view
        self.vectors: VectorStore = TenantScopedStore(vectors if vectors is not None else MemoryVectorStore())
        self.traces = traces if traces is not None else TraceRepository(MemoryTraceCache(), MemoryTraceCache())
        self.metrics = metrics  # interpgw.metrics.GatewayMetrics or None
        self.quotas = quotas if quotas is not None else QuotaBook()  # per-API-key limiter state
        self._queued: dict[str, int] = {}  # per model: requests sent to the engine that have no output yet
        self.steering = SteeringOperations(self)  # registry, training, patching
        self.probes = ProbeOperations(self)  # probe training and registry

    # ------------------------------------------------------------------ models

    async def _engine_steps(
        self,
        served: ServedModel,
        request_id: str,
        prompt_ids: list[int],
        sampling: SamplingOptions,
        order: HookOrder | None,
    ) -> AsyncIterator[EngineStep]:
        """The engine's steps for one request, counted as queued until its first step arrives (queue-depth metric)."""
        model = served.facts.id
        self._queued[model] = self._queued.get(model, 0) + 1
        queued = True
        self._report_queue(model)
        try:
            async for step in served.engine.generate(request_id, prompt_ids, sampling, order):
                if queued:
                    queued = False
                    self._queued[model] -= 1
                    self._report_queue(model)
                yield step
        finally:
            if queued:
                self._queued[model] -= 1
                self._report_queue(model)

    def _report_queue(self, model: str) -> None:
        if self.metrics is not None:
            self.metrics.queue_depth(model, self._queued[model])

    def list_models(self) -> list[ModelFacts]:
        return [m.facts for m in self._models.values()]

    def model(self, model_id: str = "") -> ServedModel:
        served = self._models.get(model_id or self._default)
        if served is None:  # a bad field value, not a missing resource: INVALID_ARGUMENT, as for hooks
            raise InvalidArgument(f"unknown model {model_id!r}; served models: {', '.join(self._models)}")
        return served

    def hook_points(self, model_id: str = "") -> list[str]:
        return all_hook_names(self.model(model_id).facts.n_layers)

    # ------------------------------------------------------------------ generate

    async def generate(self, request: GenerateInput, fault: str = "") -> AsyncIterator[GenerateEvent]:
        served = self.model(request.model)
        prompt_ids = served.encoder.encode(request.prompt, reserve=1)
        sampling = self._sampling(request.sampling, room=served.facts.max_model_len - len(prompt_ids))
        hooks = self._hooks(request.capture, served) if request.capture is not None else ()
        prepared = await self._prepare_edits(served, request.interventions)
        if request.compare_unsteered:
            if not prepared:
                raise InvalidArgument("compare_unsteered needs at least one intervention to compare against")
            if sampling.seed is None and sampling.temperature > 0:
                # both variants must draw the same random numbers: fix a seed and report it
                sampling = replace(sampling, seed=random.randrange(2**31))
        signals = await self._signals(served, request, len(prompt_ids)) if request.signals is not None else None
        variants = [prepared, []] if request.compare_unsteered else [prepared]
        orders = []
        for variant, edits in enumerate(variants):
            request_id = f"gen-{uuid.uuid4().hex}"
            order = None
            signal_order = None
            if signals is not None:
                # the unsteered baseline runs the same signals and monitors, without any that steer
                signal_order = signals.order if variant == 0 else _without_steering(signals.order)
            if hooks or edits or signal_order is not None:
                _check_hooks_supported(served)
                order = self._hook_order(request_id, request.capture, hooks, prompt_ids, fault, edits, signal_order)
            orders.append((request_id, order))
        self._check_bytes([o for _, o in orders if o is not None], served, sampling.max_tokens)
        eigen = None
        if signals is not None and signals.eigenscore_samples:
            eigen = asyncio.ensure_future(self._eigenscore(served, prompt_ids, sampling, signals))
        try:
            streams = [
                self._generate_one(served, prompt_ids, sampling, request_id, order, variant, signals, eigen)
                for variant, (request_id, order) in enumerate(orders)
            ]
            if len(streams) == 1:
                async with contextlib.aclosing(streams[0]) as stream:
                    async for event in stream:
                        yield event
                return
            async for event in _merge(streams):
                yield event
        finally:
            if eigen is not None and not eigen.done():
                eigen.cancel()
                await asyncio.gather(eigen, return_exceptions=True)

    async def _generate_one(
        self,
        served: ServedModel,
        prompt_ids: list[int],
        sampling: SamplingOptions,
        request_id: str,
        order: HookOrder | None,
        variant: int,
        signals: ResolvedSignals | None = None,
        eigen: asyncio.Future | None = None,
    ) -> AsyncIterator[GenerateEvent]:
        output_ids: list[int] = []
        text: list[str] = []
        finish_reason = "abort"
        cached = 0
        collected = False
        hub = served.engine.signals if signals is not None else None
        token_signals: list[TokenSignals] = []
        probes = {p.id: p for p in signals.probes} if signals is not None else {}
        fired: list[MonitorFired] = []
        if hub is not None:
            hub.expect(order.key)
        try:
            async with contextlib.aclosing(
                self._engine_steps(served, request_id, prompt_ids, sampling, order)
            ) as steps:
                async for step in steps:
                    token_ids, delta = step.token_ids, step.text
                    stop = False
                    step_signals: list[TokenSignals] = []
                    if hub is not None and token_ids:
                        for j in range(len(token_ids)):
                            item = TokenSignals.from_json(await hub.take(order.key, len(output_ids) + j))
                            _add_quantiles(item, probes)
                            step_signals.append(item)
                            if any(e["action"] == Action.STOP.value for e in item.events):
                                stop = True
                                break
                        if len(step_signals) < len(token_ids):  # a STOP fired before this step's last token
                            token_ids = token_ids[: len(step_signals)]
                            delta = served.encoder.tokenizer.decode(token_ids)
                    events = [MonitorFired(**event, variant=variant) for s in step_signals for event in s.events]
                    for event in events:
                        self._count_monitor(served, event.action)
                    fired.extend(events)
                    if token_ids or delta:
                        yield TokenDelta(
                            index=len(output_ids),
                            token_ids=token_ids,
                            text=delta,
                            variant=variant,
                            signals=step_signals,
                            events=events,
                        )
                        output_ids.extend(token_ids)
                        text.append(delta)
                    token_signals.extend(step_signals)
                    cached = max(cached, step.cached_prompt_tokens)
                    if stop:
                        finish_reason = "monitor"
                        break
                    if step.finished:
                        finish_reason = step.finish_reason or "stop"
            scores: dict[str, float] = {}
            if signals is not None:
                scores = sequence_scores(token_signals)
                if self.metrics is not None:
                    self.metrics.signal_tokens(served.facts.id, len(token_signals))
                if eigen is not None and variant == 0:
                    scores["eigenscore"] = await asyncio.shield(eigen)
            captured = None
            if order is not None:
                result = (await served.engine.collect([order.key]))[order.key]
                collected = True
                captured = _captured(result, order, served.facts)
            yield GenerateDone(
                finish_reason=finish_reason,
                prompt_token_ids=prompt_ids,
                output_token_ids=output_ids,
                text="".join(text),
                captured=captured,
                cached_prompt_tokens=cached,
                variant=variant,
                seed=sampling.seed,
                scores=scores,
                monitor_events=fired,
            )
        finally:
            if hub is not None:
                hub.forget(order.key)
            if order is not None and not collected:
                _discard_later(served.engine, [order.key])

    def _count_monitor(self, served: ServedModel, action: str) -> None:
        if self.metrics is not None:
            self.metrics.monitor_event(served.facts.id, action)

    async def _signals(self, served: ServedModel, request: GenerateInput, prompt_len: int) -> ResolvedSignals:
        if getattr(served.engine, "signals", None) is None:
            raise InvalidArgument(f"model {served.facts.id!r} is served by an engine without token signals")

        async def edits(specs: Sequence) -> tuple[EditOrder, ...]:
            return InterventionResolver.orders(await self._prepare_edits(served, specs), prompt_len)

        return await resolve_signals(request.signals, served.facts, lambda ids: self.probes.resolve(served, ids), edits)

    async def _eigenscore(
        self, served: ServedModel, prompt_ids: list[int], sampling: SamplingOptions, signals: ResolvedSignals
    ) -> float:
        """EigenScore over `eigenscore_samples` continuations sampled side by side in the engine's batch: each
        one's embedding is the chosen layer's resid_post at the last token it fed through the model."""
        hook = f"blocks.{signals.eigenscore_layer}.hook_resid_post"
        if sampling.temperature == 0:
            sampling = replace(sampling, **EIGENSCORE_SAMPLING)
        base_seed = sampling.seed

        async def sample(i: int) -> torch.Tensor:
            key = f"eigen-{uuid.uuid4().hex}"
            seed = None if base_seed is None else (base_seed + 1 + i) % 2**63
            order = HookOrder(
                key=key,
                hooks=(hook,),
                prompt_len=len(prompt_ids),
                prompt_positions=(len(prompt_ids) - 1,),
                generated=True,
                dtype="float32",
            )
            result = await self._run_to_end(served, prompt_ids, replace(sampling, seed=seed), order)
            return _captured(result, order, served.facts).tensors[hook][-1]  # [d_model]

        embeddings = await asyncio.gather(*(sample(i) for i in range(signals.eigenscore_samples)))
        return eigenscore(torch.stack(embeddings))  # [K, d_model] -> score

    # ------------------------------------------------------------------ trace

    async def trace(self, request: TraceInput, fault: str = "", public: bool = False) -> AsyncIterator[TracedPrompt]:
        """One forward pass per prompt, all prompts in the engine's batch at once; results in completion order."""
        served = self.model(request.model)
        if not request.prompts:
            raise InvalidArgument("a trace needs at least one prompt")
        if len(request.prompts) > self.limits.max_trace_prompts:
            raise InvalidArgument(
                f"{len(request.prompts)} prompts in one trace; at most {self.limits.max_trace_prompts} are allowed"
            )
        if not 0 <= request.top_k_logits <= served.max_logprobs:
            raise InvalidArgument(f"top_k_logits must be in [0, {served.max_logprobs}], got {request.top_k_logits}")
        if request.cache not in CACHE_MODES:
            raise InvalidArgument(f"unknown cache mode {request.cache!r}; valid: {', '.join(CACHE_MODES)}")
        encoded = served.encoder.encode_each(request.prompts)
        batch = uuid.uuid4().hex
        orders: list[HookOrder | None] = [None] * len(encoded)
        capture = request.capture
        probes = await self.probes.resolve(served, request.probes) if request.probes else []
        if probes and capture is None:
            capture = CaptureOptions(hooks=(), positions=PositionSelector(PositionMode.LAST))
        hooks = self._hooks(capture, served) if capture is not None and capture.hooks else ()
        # probe hooks the client did not ask for are captured too, scored, then left out of the reply
        extra_hooks = tuple(dict.fromkeys(p.hook for p in probes if p.hook not in hooks))
        if extra_hooks:
            hooks = tuple(h.name for h in parse_hooks([*hooks, *extra_hooks], served.facts.n_layers))
        prepared = await self._prepare_edits(served, request.interventions)
        if hooks or prepared:
            _check_hooks_supported(served)
            for index, ids in enumerate(encoded):
                try:
                    orders[index] = self._hook_order(f"trace-{batch}-{index}", capture, hooks, ids, fault, prepared)
                except InvalidArgument as exc:
                    raise InvalidArgument(f"prompt {index}: {exc}") from None
            self._check_bytes([o for o in orders if o is not None], served, 1)
        sampling = SamplingOptions(max_tokens=1, temperature=0.0, top_logprobs=request.top_k_logits)
        facts = served.facts
        caching = request.cache != "bypass" and not (fault and self._allow_faults)
        keys = [
            trace_key(facts.id, served.revision, facts.dtype, ids, orders[i], request.top_k_logits)
            if caching or request.store
            else ""
            for i, ids in enumerate(encoded)
        ]

        async def run_one(index: int) -> TracedPrompt:
            traced = await cached_or_computed(index)
            if probes:
                _score_probes(traced, probes, extra_hooks)
            return traced

        async def cached_or_computed(index: int) -> TracedPrompt:
            key = keys[index]
            if key and caching and request.cache == "use":
                entry = await self.traces.lookup(key)
                if entry is not None:
                    traced = traced_from(entry, index, served.encoder.token_strings(entry.token_ids))
                    if request.store:
                        traced.handle = await self.traces.store(key, entry, public)
                    return traced
            traced = await compute(index)
            if key:
                entry = entry_from(traced, facts.id)
                if caching:
                    await self.traces.remember(key, entry)
                if request.store:
                    traced.handle = await self.traces.store(key, entry, public)
            return traced

        async def compute(index: int) -> TracedPrompt:
            ids, order = encoded[index], orders[index]
            top: TopLogits | None = None
            async for step in self._engine_steps(served, f"trace-{batch}-{index}", ids, sampling, order):
                if step.top_logprobs:
                    ranked = step.top_logprobs[0]
                    top = TopLogits(
                        token_ids=[t for t, _, _ in ranked],
                        logprobs=[lp for _, lp, _ in ranked],
                        tokens=[s for _, _, s in ranked],
                    )
            captured = None
            if order is not None:
                captured = _captured((await served.engine.collect([order.key]))[order.key], order, served.facts)
            return TracedPrompt(
                prompt_index=index,
                token_ids=ids,
                tokens=served.encoder.token_strings(ids),
                captured=captured,
                top_logits=top,
            )

        tasks = [asyncio.ensure_future(run_one(i)) for i in range(len(encoded))]
        try:
            for next_done in asyncio.as_completed(tasks):
                yield await next_done
        finally:
            pending = [t for t in tasks if not t.done()]
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)
                keys = [o.key for o, t in zip(orders, tasks, strict=True) if o is not None and t in pending]
                _discard_later(served.engine, keys)

    async def get_trace(self, handle: str) -> TracedPrompt:
        """A stored trace, as Trace returned it (its tokens decoded by the model that made it, when served here)."""
        entry = await self.traces.fetch(handle)
        served = self._models.get(str(entry.meta.get("model", "")))
        tokens = served.encoder.token_strings(entry.token_ids) if served is not None else []
        return traced_from(entry, 0, tokens, handle=handle)

    async def stored_activations(self, served: ServedModel, handle: str, hooks: Sequence[str]) -> CachedTrace:
        """A stored trace of this model holding `hooks` at every position, or INVALID_ARGUMENT saying why not."""
        entry = await self.traces.fetch(handle)
        if entry.meta.get("model") != served.facts.id:
            raise InvalidArgument(
                f"stored trace {handle} was made with model {entry.meta.get('model')!r}, not {served.facts.id!r}"
            )
        missing = [h for h in hooks if h not in entry.tensors]
        if missing or list(entry.positions) != list(range(len(entry.token_ids))):
            raise InvalidArgument(
                f"stored trace {handle} must hold {', '.join(hooks)} at every position "
                f"(it holds {', '.join(entry.tensors) or 'nothing'} at {len(entry.positions)} of "
                f"{len(entry.token_ids)} positions)"
            )
        return entry

    # ------------------------------------------------------------------ validation

    def _sampling(self, sampling: SamplingInput, room: int) -> SamplingOptions:
        """Validated sampling options; `room` is how many tokens the context has left after the prompt."""
        limits = self.limits
        cap = max_new_tokens_of(current_caller(), limits)
        if sampling.max_tokens in (None, 0):
            max_tokens = min(limits.default_max_tokens, cap, room)
        else:
            max_tokens = sampling.max_tokens
            if not 1 <= max_tokens <= limits.max_new_tokens:
                raise InvalidArgument(f"max_tokens must be in [1, {limits.max_new_tokens}], got {max_tokens}")
            if max_tokens > cap:
                if self.metrics is not None:
                    self.metrics.rejected("max_tokens")
                raise ResourceExhausted(f"max_tokens={max_tokens} is above this API key's limit of {cap} tokens")
            if max_tokens > room:
                raise InvalidArgument(
                    f"max_tokens={max_tokens} does not fit: the prompt leaves room for {room} new tokens "
                    f"in the model's context"
                )
        temperature = 1.0 if sampling.temperature is None else sampling.temperature
        if not math.isfinite(temperature) or not 0.0 <= temperature <= MAX_TEMPERATURE:
            raise InvalidArgument(f"temperature must be a finite number in [0, {MAX_TEMPERATURE:g}], got {temperature}")
        top_p = 1.0 if sampling.top_p is None else sampling.top_p
        if not math.isfinite(top_p) or not 0.0 < top_p <= 1.0:
            raise InvalidArgument(f"top_p must be in (0, 1], got {top_p}")
        if sampling.top_k < 0:
            raise InvalidArgument(f"top_k must be 0 (disabled) or positive, got {sampling.top_k}")
        if len(sampling.stop) > 16 or any(not s for s in sampling.stop):
            raise InvalidArgument("stop takes at most 16 non-empty strings")
        if sampling.seed is not None and not 0 <= sampling.seed < 2**63:
            raise InvalidArgument(f"seed must be in [0, 2**63), got {sampling.seed}")
        return SamplingOptions(
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=sampling.top_k,
            seed=sampling.seed,
            stop=tuple(sampling.stop),
            ignore_eos=sampling.ignore_eos,
        )

    def _hooks(self, capture: CaptureOptions, served: ServedModel) -> tuple[str, ...]:
        """Canonical hook names in forward order; also validates the capture dtype."""
        if len(capture.hooks) > self.limits.max_hooks:
            raise InvalidArgument(f"{len(capture.hooks)} hooks requested; at most {self.limits.max_hooks} allowed")
        if capture.dtype not in ("", *CAPTURE_DTYPES):
            raise InvalidArgument(
                f"unknown capture dtype {capture.dtype!r}; valid: '' (model dtype), {', '.join(CAPTURE_DTYPES)}"
            )
        return tuple(h.name for h in parse_hooks(list(capture.hooks), served.facts.n_layers))

    def _hook_order(
        self,
        key: str,
        capture: CaptureOptions | None,
        hooks: tuple[str, ...],
        prompt_ids: list[int],
        fault: str,
        edits: Sequence[PreparedEdit] = (),
        signals: SignalOrder | None = None,
    ) -> HookOrder:
        positions = capture.positions.resolve(len(prompt_ids)) if capture is not None and hooks else []
        return HookOrder(
            key=key,
            hooks=hooks,
            prompt_len=len(prompt_ids),
            prompt_positions=None if hooks and len(positions) == len(prompt_ids) else tuple(positions),
            generated=bool(capture is not None and hooks and capture.generated),
            dtype=capture.dtype if capture is not None else "",
            fault=fault if self._allow_faults else "",
            edits=InterventionResolver.orders(edits, len(prompt_ids)),
            signals=signals,
        )

    async def _prepare_edits(self, served: ServedModel, specs: Sequence) -> list[PreparedEdit]:
        if not specs:
            return []
        require_role("steer", "interventions")
        if len(specs) > self.limits.max_interventions:
            raise InvalidArgument(
                f"{len(specs)} interventions in one request; at most {self.limits.max_interventions} are allowed"
            )
        resolver = InterventionResolver(
            served.facts,
            self.limits,
            self.vectors,
            lambda hook, prompts, handles: self._reference_mean(served, hook, prompts, handles),
        )
        return await resolver.prepare(specs)

    # ------------------------------------------------------------------ forward passes for the service's own use

    async def forward(
        self,
        served: ServedModel,
        prompt_ids: list[int],
        edits: tuple[EditOrder, ...],
        hooks: tuple[str, ...],
        positions: tuple[int, ...] | None,
    ) -> dict[str, torch.Tensor]:
        """One forward pass with `edits`, capturing `hooks` at prompt `positions` (None: all) in float32."""
        _check_hooks_supported(served)
        key = f"internal-{uuid.uuid4().hex}"
        order = HookOrder(
            key=key,
            hooks=hooks,
            prompt_len=len(prompt_ids),
            prompt_positions=positions,
            generated=False,
            dtype="float32",
            edits=edits,
        )
        result = await self._run_to_end(served, prompt_ids, SamplingOptions(max_tokens=1, temperature=0.0), order)
        captured = _captured(result, order, served.facts)
        return captured.tensors if captured is not None else {}

    async def _run_to_end(
        self, served: ServedModel, prompt_ids: list[int], sampling: SamplingOptions, order: HookOrder
    ) -> CaptureResult:
        """Run one internal request (its id is the order's key) to the end and collect its capture; a cancelled
        run frees the worker's partial capture."""
        collected = False
        try:
            async for _ in self._engine_steps(served, order.key, prompt_ids, sampling, order):
                pass
            result = (await served.engine.collect([order.key]))[order.key]
            collected = True
        finally:
            if not collected:
                _discard_later(served.engine, [order.key])
        return result

    async def _reference_mean(
        self, served: ServedModel, hook: str, prompts: Sequence[PromptInput], handles: Sequence[str] = ()
    ) -> torch.Tensor:
        """Mean of `hook` over the reference prompts' and stored traces' tokens, each one's first token left out
        (an attention sink: see `steering.training.without_sink`)."""
        encoded = served.encoder.encode_each(prompts, "reference prompt")
        results = await asyncio.gather(*(self.forward(served, ids, (), (hook,), None) for ids in encoded))
        tensors = [r[hook] for r in results]
        for handle in handles:
            tensors.append((await self.stored_activations(served, handle, [hook])).tensors[hook].float())
        rows = [without_sink(t) for t in tensors]
        return torch.cat(rows).mean(dim=0)  # [d_model]

    def _check_bytes(self, orders: list[HookOrder], served: ServedModel, max_new_tokens: int) -> None:
        facts = served.facts
        total = sum(estimate_capture_bytes(o, facts.d_model, facts.dtype, max_new_tokens) for o in orders)
        if total > self.limits.max_capture_bytes:
            raise ResourceExhausted(
                f"this capture would return up to {total:,} bytes; the server's limit is "
                f"{self.limits.max_capture_bytes:,} bytes per request: capture fewer hooks or positions"
            )
        if total:  # the per-key budget is charged with the bound, before anything runs
            caller = current_caller()
            try:
                self.quotas.charge_capture(caller.key_id, quota_of(caller, self.limits), total)
            except ResourceExhausted:
                if self.metrics is not None:
                    self.metrics.rejected("capture_bytes")
                raise


def _check_hooks_supported(served: ServedModel) -> None:
    if not getattr(served.engine, "supports_hooks", True):
        raise FailedPrecondition(
            f"model {served.facts.id!r} is served with pipeline parallelism: captures, edits and token signals need "
            "every layer on one rank (serve it with --pipeline-parallel-size 1, using tensor parallelism instead)"
        )


def _captured(result: CaptureResult, order: HookOrder, facts: ModelFacts) -> Captured | None:
    """Every requested hook gets a [n_positions, d_model] tensor, also when no position was selected; None when
    the order only edits. A failed capture or edit fails this request (and only this one)."""
    if result.error:
        raise Internal(f"activation capture failed for this request (others are unaffected): {result.error}")
    if not order.hooks:
        return None
    tensors = {}
    dtype = torch_dtype(order.dtype or facts.dtype)
    for hook in order.hooks:
        tensor = result.tensors.get(hook)
        if tensor is None or tensor.numel() == 0:
            tensor = torch.empty((0, facts.d_model), dtype=dtype)
        tensors[hook] = tensor
    return Captured(positions=result.positions, tensors=tensors)


def _score_probes(traced: TracedPrompt, probes: Sequence[Probe], extra_hooks: tuple[str, ...]) -> None:
    """Probe scores at every captured position; hooks captured only for the probes are dropped from the reply."""
    tensors = traced.captured.tensors
    for probe in probes:
        rows = tensors[probe.hook].float()  # [n_positions, d_model]
        traced.probe_scores.append(
            ProbeScoresOutput(probe_id=probe.id, scores=probe.scores(rows).tolist(), pooled=probe.pooled(rows))
        )
    kept = {hook: t for hook, t in tensors.items() if hook not in extra_hooks}
    traced.captured = replace(traced.captured, tensors=kept) if kept else None


def _without_steering(order: SignalOrder) -> SignalOrder:
    return replace(order, monitors=tuple(m for m in order.monitors if m.action is not Action.STEER))


def _add_quantiles(item: TokenSignals, probes: dict[str, Probe]) -> None:
    """Each probe score's place among its training scores (calibration lives in the registry, not the worker)."""
    item.probe_quantiles = tuple(probes[i].quantile(s) for i, s in zip(item.probe_ids, item.probe_scores, strict=True))


def _discard_later(engine: Engine, keys: list[str]) -> None:
    """Free a cancelled request's captures without blocking the (possibly cancelled) caller."""
    if not keys:
        return

    async def discard() -> None:
        try:
            await engine.discard(keys)
        except Exception:  # noqa: BLE001
            log.warning("discarding captures %s failed", keys, exc_info=True)

    try:
        asyncio.get_running_loop().create_task(discard())
    except RuntimeError:
        pass


async def _merge(streams: list[AsyncIterator[GenerateEvent]]) -> AsyncIterator[GenerateEvent]:
    """Interleave several event streams as their events arrive; closing the merge cancels them all."""
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(stream: AsyncIterator[GenerateEvent]) -> None:
        try:
            async for event in stream:
                await queue.put(event)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, which re-raises it
            await queue.put(exc)
            return
        await queue.put(done)

    tasks = [asyncio.ensure_future(pump(stream)) for stream in streams]
    remaining = len(tasks)
    try:
        while remaining:
            item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
