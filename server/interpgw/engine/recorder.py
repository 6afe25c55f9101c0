"""Per-request activation capture inside vLLM's continuous batch (runs in the engine worker).

vLLM flattens every scheduled token of every request into one `[num_tokens, d_model]` batch. Once per
forward step we build a plan: for each hook point, the rows of the batch that some request wants, and how
they split between requests. Each hook then does one `index_select` (which also copies: vLLM's fused norms
overwrite their inputs in place) and hands each request its slice. Rows are identified by absolute token
position, so chunked prefill (a prompt spread over several steps) and preemption (a prompt recomputed) both
reassemble correctly.

An exception inside a hook is caught and recorded against the request(s) it concerns: it must never reach
the engine core, which would die and take every other request with it.
"""

from __future__ import annotations

import logging
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn

from interpgw.core.capture import CaptureOrder
from interpgw.core.wire import torch_dtype
from interpgw.engine.architectures import ModelModules, locate_modules

log = logging.getLogger(__name__)


class StepLayout(NamedTuple):
    """How the flat batch of one forward step maps to requests."""

    req_ids: list[str]  # internal request ids, batch order
    query_start_loc: np.ndarray  # [num_reqs + 1]: request i owns rows [qsl[i], qsl[i+1])


@dataclass
class _RequestCapture:
    order: CaptureOrder
    req_id: str
    prompt_positions: np.ndarray | None  # sorted absolute positions, None: all
    positions: list[np.ndarray] = field(default_factory=list)  # one array per step
    chunks: dict[str, list[torch.Tensor]] = field(default_factory=lambda: defaultdict(list))
    error: str | None = None

    def select(self, positions: np.ndarray) -> np.ndarray:
        """Boolean mask over this step's positions of the rows to keep."""
        prompt_len = self.order.prompt_len
        in_prompt = positions < prompt_len
        if self.prompt_positions is None:
            keep = in_prompt
        else:
            keep = in_prompt & np.isin(positions, self.prompt_positions)
        if self.order.generated:
            keep = keep | ~in_prompt
        return keep

    def append(self, hook: str, rows: torch.Tensor, allow_faults: bool) -> None:
        if self.error is not None:
            return
        if allow_faults and self.order.fault == "hook":
            raise RuntimeError("fault injected into hook (test only)")
        self.chunks[hook].append(rows)

    def finish(self) -> dict[str, Any]:
        """Assemble rows in position order; a recomputed position keeps its latest capture."""
        if self.error is not None:
            return {"error": self.error}
        if not self.positions:
            return {"positions": [], "tensors": {}, "error": None}
        positions = np.concatenate(self.positions)
        order = None
        if len(positions) > 1 and not bool(np.all(positions[1:] > positions[:-1])):
            # keep the last occurrence of each position (preemption recomputes earlier ones)
            reversed_unique, first_in_reversed = np.unique(positions[::-1], return_index=True)
            order = (len(positions) - 1 - first_in_reversed).astype(np.int64)
            positions = reversed_unique
        dtype = torch_dtype(self.order.dtype) if self.order.dtype else None
        tensors = {}
        for hook in self.order.hooks:
            data = torch.cat(self.chunks[hook]) if self.chunks[hook] else torch.empty(0)
            if order is not None:
                data = data.index_select(0, torch.from_numpy(order))
            if dtype is not None:
                data = data.to(dtype)
            tensors[hook] = data.cpu().contiguous()
        return {"positions": positions.tolist(), "tensors": tensors, "error": None}


@dataclass
class _HookSelection:
    index: torch.Tensor  # [n_rows] rows of the flat batch
    captures: list[_RequestCapture]
    counts: list[int]


class ActivationRecorder:
    """Installs forward hooks on a vLLM model and records per-request activations."""

    def __init__(
        self,
        model: nn.Module,
        layout_fn: Callable[[], StepLayout],
        order_fn: Callable[[str], dict | None],
        allow_faults: bool = False,
    ) -> None:
        self.modules: ModelModules = locate_modules(model)
        self._layout_fn = layout_fn
        self._order_fn = order_fn
        self._allow_faults = allow_faults
        self._by_req: dict[str, _RequestCapture | None] = {}
        self._by_key: dict[str, _RequestCapture] = {}
        self._plan: dict[str, _HookSelection] | None = None
        self._steps = 0
        self._pending_pre: torch.Tensor | None = None  # GPT-2 only: resid_pre of the running block
        self.fire_counts: Counter[str] = Counter()
        self._handles: list[Any] = []
        self._install(model)

    # ------------------------------------------------------------------ installation

    def _install(self, model: nn.Module) -> None:
        m = self.modules
        add = self._handles.append
        add(model.register_forward_pre_hook(self._on_forward_start, with_kwargs=True))
        add(model.register_forward_hook(self._on_forward_end))
        add(m.embed.register_forward_hook(self._on_embed))
        for i in range(m.n_layers):
            add(m.layers[i].register_forward_pre_hook(partial(self._on_layer_start, i), with_kwargs=True))
            add(m.layers[i].register_forward_hook(partial(self._on_layer_end, i)))
            add(m.attn[i].register_forward_hook(partial(self._on_attn, i)))
            if not m.fused_residual:
                add(m.mlp[i].register_forward_hook(partial(self._on_mlp, i)))
        add(m.final_norm.register_forward_hook(self._on_final_norm))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    # ------------------------------------------------------------------ results

    def pop(self, keys: list[str]) -> dict[str, dict[str, Any]]:
        """Finished requests' captures by key (missing keys: the request never reached a forward step)."""
        results = {}
        for key in keys:
            capture = self._by_key.pop(key, None)
            if capture is None:
                results[key] = {"positions": [], "tensors": {}, "error": None}
                continue
            self._by_req.pop(capture.req_id, None)
            try:
                results[key] = capture.finish()
            except Exception as exc:  # noqa: BLE001 - never let the worker die for one request
                log.exception("assembling capture %s failed", key)
                results[key] = {"error": f"assembling capture failed: {exc}"}
        return results

    def discard(self, keys: list[str]) -> None:
        for key in keys:
            capture = self._by_key.pop(key, None)
            if capture is not None:
                self._by_req.pop(capture.req_id, None)

    # ------------------------------------------------------------------ per-step planning

    def _capture_for(self, req_id: str) -> _RequestCapture | None:
        if req_id in self._by_req:
            return self._by_req[req_id]
        capture = None
        data = self._order_fn(req_id)
        if data is not None:
            order = CaptureOrder.from_extra_args(data)
            positions = None
            if order.prompt_positions is not None:
                positions = np.asarray(order.prompt_positions, dtype=np.int64)
            capture = _RequestCapture(order=order, req_id=req_id, prompt_positions=positions)
            self._by_key[order.key] = capture
        self._by_req[req_id] = capture
        return capture

    def _on_forward_start(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self._plan = None
        try:
            self._plan = self._build_plan(args, kwargs)
        except Exception:  # noqa: BLE001
            log.exception("building the capture plan failed; this step is not captured")
            for capture in self._by_key.values():
                capture.error = capture.error or "internal error while planning capture"

    def _build_plan(self, args: tuple, kwargs: dict) -> dict[str, _HookSelection] | None:
        layout = self._layout_fn()
        self._steps += 1
        if self._steps % 256 == 0:
            self._prune(set(layout.req_ids))
        active = []
        for i, req_id in enumerate(layout.req_ids):
            capture = self._capture_for(req_id)
            if capture is not None and capture.error is None:
                active.append((i, capture))
        if not active:
            return None
        positions = kwargs.get("positions") if "positions" in kwargs else args[1]
        positions_np = positions.detach().to("cpu").numpy()
        qsl = layout.query_start_loc
        per_hook: dict[str, list[tuple[_RequestCapture, np.ndarray]]] = defaultdict(list)
        for i, capture in active:
            lo, hi = int(qsl[i]), int(qsl[i + 1])
            step_positions = positions_np[lo:hi]
            keep = capture.select(step_positions)
            if not keep.any():
                continue
            rows = np.nonzero(keep)[0] + lo
            capture.positions.append(step_positions[keep].astype(np.int64))
            for hook in capture.order.hooks:
                per_hook[hook].append((capture, rows))
        if not per_hook:
            return None
        device = positions.device
        shared_index: dict[tuple[int, ...], torch.Tensor] = {}
        plan = {}
        for hook, entries in per_hook.items():
            group = tuple(id(capture) for capture, _ in entries)
            index = shared_index.get(group)
            if index is None:
                index = torch.from_numpy(np.concatenate([rows for _, rows in entries])).to(device)
                shared_index[group] = index
            plan[hook] = _HookSelection(
                index=index,
                captures=[capture for capture, _ in entries],
                counts=[len(rows) for _, rows in entries],
            )
        return plan

    def _prune(self, live: set[str]) -> None:
        """Forget non-capturing requests that left the batch (their lookups are cheap to redo)."""
        for req_id in [r for r, c in self._by_req.items() if c is None and r not in live]:
            del self._by_req[req_id]

    def _on_forward_end(self, module: nn.Module, args: tuple, output: Any) -> None:
        self._plan = None

    # ------------------------------------------------------------------ hooks

    def _record(self, hook: str, compute: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Gather the planned rows of one hook point once, then split them between requests."""
        plan = self._plan
        if plan is None:
            return
        selection = plan.get(hook)
        if selection is None:
            return
        self.fire_counts[hook] += 1
        try:
            rows = compute(selection.index)  # [n_rows, d_model], a fresh copy
            parts = rows.split(selection.counts)
        except Exception as exc:  # noqa: BLE001
            log.exception("capture at %s failed", hook)
            for capture in selection.captures:
                capture.error = capture.error or f"capture at {hook} failed: {exc}"
            return
        for capture, part in zip(selection.captures, parts, strict=True):
            try:
                capture.append(hook, part, self._allow_faults)
            except Exception as exc:  # noqa: BLE001
                capture.error = capture.error or f"capture at {hook} failed: {exc}"

    def _on_embed(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        if self._plan is not None:
            self._record("hook_embed", partial(_rows, output))

    def _on_layer_start(self, layer: int, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self._plan is None:
            return
        if self.modules.fused_residual:
            hidden = args[1] if len(args) > 1 else kwargs["hidden_states"]
            residual = args[2] if len(args) > 2 else kwargs.get("residual")
            if residual is None:
                self._record(f"blocks.{layer}.hook_resid_pre", partial(_rows, hidden))
            else:
                self._record(f"blocks.{layer}.hook_resid_pre", partial(_rows_sum, hidden, residual))
        else:
            hidden = args[0] if args else kwargs["hidden_states"]
            self._record(f"blocks.{layer}.hook_resid_pre", partial(_rows, hidden))
            self._pending_pre = hidden

    def _on_attn(self, layer: int, module: nn.Module, args: tuple, output: Any) -> None:
        if self._plan is None:
            return
        attn_out = output[0] if isinstance(output, tuple) else output
        self._record(f"blocks.{layer}.hook_attn_out", partial(_rows, attn_out))
        if not self.modules.fused_residual:
            self._record(f"blocks.{layer}.hook_resid_mid", partial(_rows_sum, attn_out, self._pending_pre))

    def _on_mlp(self, layer: int, module: nn.Module, args: tuple, output: Any) -> None:
        if self._plan is None:
            return
        self._record(f"blocks.{layer}.hook_mlp_out", partial(_rows, output))

    def _on_layer_end(self, layer: int, module: nn.Module, args: tuple, output: Any) -> None:
        if self._plan is None:
            return
        if self.modules.fused_residual:
            mlp_out, resid_mid = output
            self._record(f"blocks.{layer}.hook_resid_mid", partial(_rows, resid_mid))
            self._record(f"blocks.{layer}.hook_mlp_out", partial(_rows, mlp_out))
            self._record(f"blocks.{layer}.hook_resid_post", partial(_rows_sum, mlp_out, resid_mid))
        else:
            self._record(f"blocks.{layer}.hook_resid_post", partial(_rows, output))

    def _on_final_norm(self, module: nn.Module, args: tuple, output: Any) -> None:
        if self._plan is None:
            return
        normed = output[0] if isinstance(output, tuple) else output
        self._record("ln_final.hook_normalized", partial(_rows, normed))


def _rows(tensor: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return tensor.index_select(0, index)


def _rows_sum(a: torch.Tensor, b: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return a.index_select(0, index) + b.index_select(0, index)
