"""The service's view of cached and stored traces.

Two stores with different promises:
- the **cache** is content-addressed and may forget (LRU, TTL, Redis down): it only ever saves recomputation;
- **stored traces** are kept on request (`Trace(store=true)`) under a handle that later requests name. They go to
  Redis when configured (shared by replicas, with a TTL) and, if Redis fails, to a bounded in-process store, so
  the handle a client was given still works on this replica: storing never fails a request.

Both hold `CachedTrace` entries. The cache is shared by every tenant (equal requests hit the same entry); a stored
trace belongs to the tenant that stored it (`interpgw.access`): its handle is derived from the content key and the
tenant, so storing the same trace twice gives the same handle, two tenants get different ones, and another tenant's
handle answers NOT_FOUND unless the trace was stored as public.
"""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from typing import Any

from interpgw.access import current_caller
from interpgw.cache.backends import MemoryTraceCache, TraceCache
from interpgw.cache.entries import CachedTrace, cache_key
from interpgw.core.capture import HookOrder
from interpgw.core.errors import NotFound
from interpgw.core.requests import Captured, TopLogits, TracedPrompt

log = logging.getLogger(__name__)

CACHE_MODES = ("use", "refresh", "bypass")


def trace_key(
    model_id: str, revision: str, model_dtype: str, token_ids: list[int], order: HookOrder | None, top_k: int
) -> str:
    """Everything that decides a trace's result; equal requests from different users get the same key."""
    parts: dict[str, Any] = {
        "model": model_id,
        "revision": revision,
        "model_dtype": model_dtype,
        "tokens": list(token_ids),
        "top_k": top_k,
    }
    if order is not None:
        parts |= {
            "hooks": list(order.hooks),
            "positions": None if order.prompt_positions is None else list(order.prompt_positions),
            "dtype": order.dtype,
            "edits": [edit.to_json() for edit in order.edits],
        }
    return cache_key(parts)


def entry_from(traced: TracedPrompt, model_id: str) -> CachedTrace:
    top = None
    if traced.top_logits is not None:
        t = traced.top_logits
        top = {"token_ids": t.token_ids, "logprobs": t.logprobs, "tokens": t.tokens}
    captured = traced.captured
    return CachedTrace(
        token_ids=list(traced.token_ids),
        positions=list(captured.positions) if captured is not None else [],
        tensors=dict(captured.tensors) if captured is not None else {},
        top_logits=top,
        meta={"model": model_id, "captured": captured is not None},
    )


def traced_from(entry: CachedTrace, prompt_index: int, tokens: list[str], handle: str = "") -> TracedPrompt:
    top = None
    if entry.top_logits is not None:
        top = TopLogits(**entry.top_logits)
    captured = None
    if entry.meta.get("captured", bool(entry.tensors)):
        captured = Captured(positions=list(entry.positions), tensors=dict(entry.tensors))
    return TracedPrompt(
        prompt_index=prompt_index,
        token_ids=list(entry.token_ids),
        tokens=tokens,
        captured=captured,
        top_logits=top,
        cache_hit=True,
        handle=handle,
    )


class TraceRepository:
    def __init__(self, cache: TraceCache, stored: TraceCache, fallback_bytes: int = 512 * 2**20) -> None:
        self.cache = cache
        self.stored = stored
        # where stored traces go when `stored` (Redis) refuses them; GetTrace looks here second
        self._fallback = MemoryTraceCache(max_bytes=fallback_bytes, max_entry_bytes=fallback_bytes)

    async def lookup(self, key: str) -> CachedTrace | None:
        return await self.cache.get(key)

    async def remember(self, key: str, entry: CachedTrace) -> None:
        await self.cache.put(key, entry)

    async def store(self, key: str, entry: CachedTrace, public: bool = False) -> str:
        """Keeps `entry` for the current tenant; returns its handle."""
        tenant = current_caller().tenant
        handle = key if not tenant else cache_key({"trace": key, "tenant": tenant})
        entry = replace(entry, meta={**entry.meta, "owner": tenant, "public": bool(public)})
        if not await self.stored.put(handle, entry):
            if not await self._fallback.put(handle, entry):
                log.warning("stored trace %s is larger than the in-process fallback allows", handle)
        return handle

    async def fetch(self, handle: str) -> CachedTrace:
        entry = await self.stored.get(handle) if handle else None
        if entry is None and handle:
            entry = await self._fallback.get(handle)
        if entry is not None:
            owner, public = str(entry.meta.get("owner", "")), bool(entry.meta.get("public", False))
            if not (public or owner in ("", current_caller().tenant)):
                entry = None  # another tenant's private trace: answered as absent
        if entry is None:
            raise NotFound(f"no stored trace with handle {handle!r} (stored traces expire; store it again)")
        return entry

    async def close(self) -> None:
        for backend in (self.cache, self.stored, self._fallback):
            await backend.close()

    def describe(self) -> str:
        return json.dumps({"cache": self.cache.describe(), "stored": self.stored.describe()})
