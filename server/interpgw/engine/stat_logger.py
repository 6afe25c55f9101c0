"""Forwards vLLM's scheduler numbers (running and waiting requests, KV-cache usage) to a callback, for /metrics.

vLLM 0.32's V1 `AsyncLLM` takes custom stat loggers as `stat_loggers=[factory, ...]`; a factory that is not an
`AggregateStatLoggerBase` subclass is called per engine core as `factory(vllm_config, engine_index)` and must
return a `StatLoggerBase`. The output-handler task of `AsyncLLM` (in the gateway's process, on its event loop)
calls `record(scheduler_stats, iteration_stats, ...)` once per batch of engine outputs; `scheduler_stats` is a
`vllm.v1.metrics.stats.SchedulerStats` (`num_running_reqs`, `num_waiting_reqs`, `num_skipped_waiting_reqs`,
`kv_cache_usage` in 0..1) or None. vLLM documents this interface as not stable, so only those fields are read,
and a failing callback is logged, never raised into vLLM's output handler (that would stop the engine).

How the engine adapter passes it (`engine/vllm_engine.py`, `VllmEngine.start`, with an optional
`on_stats: EngineStatsCallback | None` parameter):

    stat_loggers = [scheduler_stats_logger(on_stats)] if on_stats is not None else None
    llm = await asyncio.to_thread(AsyncLLM.from_engine_args, args, stat_loggers=stat_loggers)

and `serve.py` gives `on_stats=functools.partial(metrics.engine_stats, model_id)`. One engine core per gateway
(no data parallelism), so the numbers are that engine's. vLLM keeps its own default loggers next to this one.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Protocol

log = logging.getLogger(__name__)


class EngineStatsCallback(Protocol):
    def __call__(self, running: int, waiting: int, kv_usage: float) -> None: ...


def forward_scheduler_stats(callback: EngineStatsCallback, scheduler_stats: Any) -> None:
    """Reads the fields the gateway exports from a `SchedulerStats` and hands them on; None (no stats) is skipped."""
    if scheduler_stats is None:
        return
    try:
        waiting = int(scheduler_stats.num_waiting_reqs) + int(getattr(scheduler_stats, "num_skipped_waiting_reqs", 0))
        callback(int(scheduler_stats.num_running_reqs), waiting, float(scheduler_stats.kv_cache_usage))
    except Exception:  # noqa: BLE001 - metrics must never stop vLLM's output handler
        log.exception("engine stats callback failed")


def scheduler_stats_logger(callback: EngineStatsCallback) -> Callable[[Any, int], Any]:
    """A per-engine `StatLoggerFactory` for `AsyncLLM.from_engine_args(..., stat_loggers=[...])`."""
    from vllm.v1.metrics.loggers import StatLoggerBase  # imported here: the gateway's tests run without vLLM

    class SchedulerStatsForwarder(StatLoggerBase):
        def __init__(self, vllm_config: Any, engine_index: int = 0) -> None:
            self.engine_index = engine_index

        def record(
            self,
            scheduler_stats: Any,
            iteration_stats: Any,
            mm_cache_stats: Any = None,
            engine_idx: int = 0,
        ) -> None:
            forward_scheduler_stats(callback, scheduler_stats)

        def log_engine_initialized(self) -> None:
            pass

    return SchedulerStatsForwarder
