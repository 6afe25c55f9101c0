"""The service core: validates requests, plans captures, drives the engine and shapes results.

No gRPC and no vLLM here: the transport converts protobuf to `core.requests` types and back, and the engine
is anything that implements `engine.base.Engine`.
"""

from __future__ import annotations

import asyncio
import logging
import math
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import torch

from interpgw.config import LimitsConfig
from interpgw.core.capture import CAPTURE_DTYPES, CaptureOrder, estimate_capture_bytes
from interpgw.core.errors import Internal, InvalidArgument, ResourceExhausted
from interpgw.core.hookpoints import all_hook_names, parse_hooks
from interpgw.core.prompts import PromptEncoder
from interpgw.core.requests import (
    Captured,
    CaptureOptions,
    GenerateDone,
    GenerateInput,
    SamplingInput,
    TokenDelta,
    TopLogits,
    TracedPrompt,
    TraceInput,
)
from interpgw.core.wire import torch_dtype
from interpgw.engine.base import CaptureResult, Engine, ModelFacts, SamplingOptions

log = logging.getLogger(__name__)

GenerateEvent = TokenDelta | GenerateDone


@dataclass
class ServedModel:
    engine: Engine
    encoder: PromptEncoder
    max_logprobs: int

    @property
    def facts(self) -> ModelFacts:
        return self.engine.facts


class GatewayService:
    def __init__(self, models: list[ServedModel], limits: LimitsConfig, allow_faults: bool = False) -> None:
        if not models:
            raise ValueError("a gateway needs at least one model")
        self._models = {m.facts.id: m for m in models}
        self._default = models[0].facts.id
        self.limits = limits
        self._allow_faults = allow_faults

    # ------------------------------------------------------------------ models

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
        request_id = f"gen-{uuid.uuid4().hex}"
        order = None
        if request.capture is not None:
            hooks = self._hooks(request.capture, served)
            order = self._capture_order(request_id, request.capture, hooks, prompt_ids, fault)
            self._check_bytes([order], served, sampling.max_tokens)
        output_ids: list[int] = []
        text: list[str] = []
        finish_reason = "abort"
        cached = 0
        collected = False
        try:
            async for step in served.engine.generate(request_id, prompt_ids, sampling, order):
                if step.token_ids or step.text:
                    yield TokenDelta(index=len(output_ids), token_ids=step.token_ids, text=step.text)
                    output_ids.extend(step.token_ids)
                    text.append(step.text)
                cached = max(cached, step.cached_prompt_tokens)
                if step.finished:
                    finish_reason = step.finish_reason or "stop"
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
            )
        finally:
            if order is not None and not collected:
                _discard_later(served.engine, [order.key])

    # ------------------------------------------------------------------ trace

    async def trace(self, request: TraceInput, fault: str = "") -> AsyncIterator[TracedPrompt]:
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
        encoded = []
        for index, prompt in enumerate(request.prompts):
            try:
                encoded.append(served.encoder.encode(prompt, reserve=1))
            except InvalidArgument as exc:
                raise InvalidArgument(f"prompt {index}: {exc}") from None
        batch = uuid.uuid4().hex
        orders: list[CaptureOrder | None] = [None] * len(encoded)
        if request.capture is not None:
            hooks = self._hooks(request.capture, served)
            for index, ids in enumerate(encoded):
                try:
                    orders[index] = self._capture_order(f"trace-{batch}-{index}", request.capture, hooks, ids, fault)
                except InvalidArgument as exc:
                    raise InvalidArgument(f"prompt {index}: {exc}") from None
            self._check_bytes([o for o in orders if o is not None], served, 1)
        sampling = SamplingOptions(max_tokens=1, temperature=0.0, top_logprobs=request.top_k_logits)

        async def run_one(index: int) -> TracedPrompt:
            ids, order = encoded[index], orders[index]
            top: TopLogits | None = None
            async for step in served.engine.generate(f"trace-{batch}-{index}", ids, sampling, order):
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

    # ------------------------------------------------------------------ validation

    def _sampling(self, sampling: SamplingInput, room: int) -> SamplingOptions:
        """Validated sampling options; `room` is how many tokens the context has left after the prompt."""
        limits = self.limits
        if sampling.max_tokens in (None, 0):
            max_tokens = min(limits.default_max_tokens, room)
        else:
            max_tokens = sampling.max_tokens
            if not 1 <= max_tokens <= limits.max_new_tokens:
                raise InvalidArgument(f"max_tokens must be in [1, {limits.max_new_tokens}], got {max_tokens}")
            if max_tokens > room:
                raise InvalidArgument(
                    f"max_tokens={max_tokens} does not fit: the prompt leaves room for {room} new tokens "
                    f"in the model's context"
                )
        temperature = 1.0 if sampling.temperature is None else sampling.temperature
        if not math.isfinite(temperature) or not 0.0 <= temperature <= 100.0:
            raise InvalidArgument(f"temperature must be a finite number in [0, 100], got {temperature}")
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

    def _capture_order(
        self, key: str, capture: CaptureOptions, hooks: tuple[str, ...], prompt_ids: list[int], fault: str
    ) -> CaptureOrder:
        positions = capture.positions.resolve(len(prompt_ids))
        return CaptureOrder(
            key=key,
            hooks=hooks,
            prompt_len=len(prompt_ids),
            prompt_positions=None if len(positions) == len(prompt_ids) else tuple(positions),
            generated=capture.generated,
            dtype=capture.dtype,
            fault=fault if self._allow_faults else "",
        )

    def _check_bytes(self, orders: list[CaptureOrder], served: ServedModel, max_new_tokens: int) -> None:
        facts = served.facts
        total = sum(estimate_capture_bytes(o, facts.d_model, facts.dtype, max_new_tokens) for o in orders)
        if total > self.limits.max_capture_bytes:
            raise ResourceExhausted(
                f"this capture would return up to {total:,} bytes; the server's limit is "
                f"{self.limits.max_capture_bytes:,} bytes per request: capture fewer hooks or positions"
            )


def _captured(result: CaptureResult, order: CaptureOrder, facts: ModelFacts) -> Captured:
    """Every requested hook gets a [n_positions, d_model] tensor, also when no position was selected."""
    if result.error:
        raise Internal(f"activation capture failed for this request (others are unaffected): {result.error}")
    tensors = {}
    dtype = torch_dtype(order.dtype or facts.dtype)
    for hook in order.hooks:
        tensor = result.tensors.get(hook)
        if tensor is None or tensor.numel() == 0:
            tensor = torch.empty((0, facts.d_model), dtype=dtype)
        tensors[hook] = tensor
    return Captured(positions=result.positions, tensors=tensors)


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
