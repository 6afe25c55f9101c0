"""The engine adapter: vLLM's V1 `AsyncLLM` with the gateway's worker extension installed.

This module and `worker_ext.py` are the only places that import vLLM. Hooks are plain PyTorch forward hooks,
so the engine runs eagerly (`enforce_eager=True`): torch.compile and CUDA graphs would silently skip them.
A start-up probe checks that every hook point actually fires.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import uuid
import warnings
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import torch

from interpgw.config import EngineConfig
from interpgw.core.capture import EXTRA_ARGS_KEY, HookOrder
from interpgw.core.errors import Internal, InvalidArgument, Unavailable
from interpgw.core.hookpoints import all_hook_names
from interpgw.core.wire import torch_dtype
from interpgw.engine.base import CaptureResult, EngineStep, ModelFacts, SamplingOptions
from interpgw.engine.signal_channel import SignalHub
from interpgw.engine.stat_logger import EngineStatsCallback, scheduler_stats_logger
from interpgw.engine.tensor_handoff import HandoffDirectory
from interpgw.engine.worker_ext import FAULT_INJECTION_ENV
from interpgw.models.resolve import resolve_model

log = logging.getLogger(__name__)

WORKER_EXTENSION = "interpgw.engine.worker_ext.InterpWorkerExtension"


def _set_process_env(allow_faults: bool) -> None:
    """Environment the engine process inherits (it is started after this)."""
    os.environ.setdefault("VLLM_CACHE_ROOT", str(Path.home() / ".cache" / "interpgw" / "vllm"))
    os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")  # hooks rely on the V1 runner's batch layout
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    # We run eagerly anyway (hooks need it). Without this, vLLM's sampler helpers decorated with torch.compile
    # (logprob ranks, top-k/top-p) build C++ kernels with inductor on first use: minutes on a 2-core machine,
    # during which every request in the batch stalls.
    os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
    if allow_faults:
        os.environ[FAULT_INJECTION_ENV] = "1"


def tensor_from_wire(dtype: str, shape: list[int], raw: bytes) -> torch.Tensor:
    """A read-only view of the received bytes (no copy: the tensor is only read, to be chunked onto the wire)."""
    if not raw:
        return torch.empty(shape, dtype=torch_dtype(dtype))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "buffer is not writable": nobody writes to it
        return torch.frombuffer(raw, dtype=torch_dtype(dtype)).reshape(shape)


class VllmEngine:
    """One served model."""

    def __init__(self, llm, facts: ModelFacts, signals: SignalHub, handoff: HandoffDirectory) -> None:  # noqa: ANN001
        self._llm = llm
        self.facts = facts
        self.signals = signals  # per-token signals pushed by the worker (see signal_channel.py)
        self.handoff = handoff  # captured tensors written by the worker (tensor_handoff.py)
        # Hooks see the whole model only when one rank holds every layer (any tensor-parallel size: the residual
        # stream is complete on every rank there); pipeline stages would each hold part of the layers.
        self.supports_hooks = True
        self.requests_started = 0  # generate() calls so far (see `serve._poll_hook_stats`)
        self.requests_running = 0

    @classmethod
    async def start(
        cls,
        config: EngineConfig,
        allow_faults: bool = False,
        probe: bool = True,
        on_stats: EngineStatsCallback | None = None,
    ) -> VllmEngine:
        """`on_stats` receives vLLM's scheduler numbers (running, waiting, KV-cache usage) for the metrics."""
        _set_process_env(allow_faults)
        from vllm import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        model_path, default_id = resolve_model(config.model)
        args = AsyncEngineArgs(
            model=str(model_path),
            served_model_name=[config.served_model_id or default_id],
            dtype=config.dtype,
            max_model_len=config.max_model_len,
            enforce_eager=True,
            enable_prefix_caching=config.enable_prefix_caching,
            enable_chunked_prefill=True,
            max_num_batched_tokens=config.max_num_batched_tokens,
            max_num_seqs=config.max_num_seqs,
            kv_cache_memory_bytes=int(config.kv_cache_gib * 2**30),
            max_logprobs=config.max_logprobs,
            seed=config.seed,
            tensor_parallel_size=config.tensor_parallel_size,
            pipeline_parallel_size=config.pipeline_parallel_size,
            distributed_executor_backend=config.distributed_executor_backend,
            worker_extension_cls=WORKER_EXTENSION,
        )
        stat_loggers = [scheduler_stats_logger(on_stats)] if on_stats is not None else None
        llm = await asyncio.to_thread(AsyncLLM.from_engine_args, args, stat_loggers=stat_loggers)
        hub = SignalHub()
        await hub.start()
        handoff = HandoffDirectory()
        await llm.collective_rpc("interpgw_install", args=(hub.path, handoff.path))
        model_config = llm.model_config
        text_config = model_config.hf_config.get_text_config()
        facts = ModelFacts(
            id=config.served_model_id or default_id,
            architecture=(model_config.hf_config.architectures or ["unknown"])[0],
            n_layers=int(text_config.num_hidden_layers),
            d_model=int(text_config.hidden_size),
            vocab_size=int(text_config.vocab_size),
            dtype=str(model_config.dtype).removeprefix("torch."),
            max_model_len=int(model_config.max_model_len),
            source=str(model_path),
        )
        engine = cls(llm, facts, hub, handoff)
        if config.pipeline_parallel_size > 1:
            engine.supports_hooks = False
            log.warning(
                "pipeline parallel size %d: captures, edits and token signals are refused (they need every layer "
                "on one rank); plain generation works",
                config.pipeline_parallel_size,
            )
        elif probe:
            await engine.probe()
        return engine

    async def probe(self) -> None:
        """Hazard check: every hook point must fire and return rows of the right shape."""
        hooks = tuple(all_hook_names(self.facts.n_layers))
        key = f"probe-{uuid.uuid4().hex}"
        order = HookOrder(key=key, hooks=hooks, prompt_len=3, prompt_positions=None, generated=False)
        async for _ in self.generate(key, [1, 2, 3], SamplingOptions(max_tokens=1, temperature=0.0), order):
            pass
        result = (await self.collect([key]))[key]
        missing = [h for h in hooks if tuple(result.tensors.get(h, torch.empty(0)).shape) != (3, self.facts.d_model)]
        if result.error or missing:
            raise Internal(
                f"start-up probe failed: hooks did not fire or gave wrong shapes for {missing[:5]} "
                f"(error: {result.error}); is the engine compiled instead of eager?"
            )
        log.info("start-up probe: all %d hook points fired", len(hooks))

    async def generate(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling: SamplingOptions,
        capture: HookOrder | None,
    ) -> AsyncIterator[EngineStep]:
        from vllm import SamplingParams
        from vllm.exceptions import VLLMClientError
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind
        from vllm.v1.engine.exceptions import EngineDeadError

        try:
            params = SamplingParams(
                max_tokens=sampling.max_tokens,
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                top_k=sampling.top_k,
                seed=sampling.seed,
                stop=list(sampling.stop) or None,
                ignore_eos=sampling.ignore_eos,
                logprobs=sampling.top_logprobs or None,
                output_kind=RequestOutputKind.DELTA,
                extra_args={EXTRA_ARGS_KEY: capture.to_extra_args()} if capture else None,
                # a capture must see every prompt position computed, not read from the prefix cache
                skip_reading_prefix_cache=True if capture and capture.hooks else None,
            )
        except VLLMClientError as exc:  # a check of vLLM's own that the gateway's validation did not anticipate
            raise InvalidArgument(f"vLLM refused the request: {exc}") from None
        prompt = TokensPrompt(prompt_token_ids=list(prompt_token_ids))
        if capture is not None and capture.may_edit:
            # Edited KV must never be served to a request without the same edits (DESIGN.md hazard 3.2): the salt
            # puts this request's cached blocks in their own namespace.
            prompt["cache_salt"] = capture.edit_salt()
        outputs = self._llm.generate(prompt, params, request_id)
        self.requests_started += 1
        self.requests_running += 1
        try:
            async with contextlib.aclosing(outputs):  # closing aborts the request in vLLM at once
                async for output in outputs:
                    yield _engine_step(output, sampling)
        except EngineDeadError as exc:
            raise Unavailable(
                f"the model engine stopped ({exc}); retry on another replica or after a restart"
            ) from None
        except VLLMClientError as exc:  # a check of vLLM's own that the gateway's validation did not anticipate
            raise InvalidArgument(f"vLLM refused the request: {exc}") from None
        finally:
            self.requests_running -= 1

    def dead(self) -> bool:
        """True once vLLM's engine process has died; the gateway then reports NOT_SERVING and exits."""
        return bool(self._llm.errored)

    async def collect(self, keys: list[str]) -> dict[str, CaptureResult]:
        """The finished captures of `keys`, popped from the worker.

        Shielded: once the worker has popped a capture, its tensors exist only in the reply (or a handoff file).
        A caller cancelled meanwhile (a client that went away) would otherwise leave that file in /dev/shm until
        the gateway stops; the collection finishes instead, which reads and unlinks the file, and is dropped."""
        collecting = asyncio.ensure_future(self._collect(keys))
        try:
            return await asyncio.shield(collecting)
        except asyncio.CancelledError:
            collecting.add_done_callback(_drop_collection)
            raise

    async def _collect(self, keys: list[str]) -> dict[str, CaptureResult]:
        # One RPC per finishing request. Batching the keys of requests that finish together into one RPC was
        # measured slower (bench/trace_throughput.py, all-layer capture): per-request RPCs let the gateway
        # start streaming one request's tensors while the next ones are still being collected.
        raw = (await self._llm.collective_rpc("interpgw_pop", args=(keys,)))[0]
        results = {}
        for key, item in raw.items():
            error = item.get("error")
            tensors: dict[str, torch.Tensor] = {}
            if item.get("handoff"):
                try:
                    tensors = self.handoff.read(item["handoff"])
                except (OSError, ValueError, KeyError, TypeError) as exc:
                    log.exception("reading the captured tensors of %s failed", key)
                    error = error or f"reading the captured tensors failed: {exc}"
            else:
                tensors = {hook: tensor_from_wire(*wire) for hook, wire in (item.get("tensors") or {}).items()}
            positions = list(item.get("positions") or [])
            results[key] = CaptureResult(positions=positions, tensors=tensors, error=error)
        return results

    async def discard(self, keys: list[str]) -> None:
        await self._llm.collective_rpc("interpgw_discard", args=(keys,))

    async def hook_stats(self) -> dict:
        """Hook time, steps and per-step intervention counts since the last call (`HookStats.to_json`)."""
        return (await self._llm.collective_rpc("interpgw_stats"))[0]

    async def shutdown(self) -> None:
        try:
            self._llm.shutdown()
            await self.signals.close()
        finally:
            self.handoff.close()


def _drop_collection(collecting: asyncio.Future) -> None:
    """A collection nobody waits for any more: its files are unlinked; an error is only logged."""
    if not collecting.cancelled() and collecting.exception() is not None:
        log.warning("collecting the captures of a cancelled request failed: %s", collecting.exception())


def _engine_step(output: Any, sampling: SamplingOptions) -> EngineStep:
    """One vLLM `RequestOutput` (a delta) as the gateway's engine step."""
    completion = output.outputs[0]
    step = EngineStep(
        token_ids=list(completion.token_ids),
        text=completion.text,
        finished=output.finished,
        finish_reason=completion.finish_reason,
        cached_prompt_tokens=int(output.num_cached_tokens or 0),
    )
    if sampling.top_logprobs and completion.logprobs:
        for position in completion.logprobs:
            ranked = sorted(position.items(), key=lambda item: item[1].rank or 0)
            step.top_logprobs.append(
                [(tid, float(lp.logprob), lp.decoded_token or "") for tid, lp in ranked][: sampling.top_logprobs]
            )
    return step
