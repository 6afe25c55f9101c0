"""Per-request activation capture and editing inside vLLM's continuous batch (runs in the engine worker).

vLLM flattens every scheduled token of every request into one `[num_tokens, d_model]` batch. Once per
forward step we build a plan: for each hook point, the rows of the batch that some request wants to record
or edit, and how they split between requests. At each hook point the edits run first (in the request's
order), then the recording: a capture sees the stream as the request's own interventions left it, as with
TransformerLens hooks. Recording does one `index_select` per hook point (which also copies: vLLM's fused norms
overwrite their inputs in place). When the forward ends, the hook points that the same requests record are
stacked and each request copies its rows of all of them into its own buffer at once: one copy per request and
step, however many layers it records. Rows are identified by absolute token position, so chunked prefill (a
prompt spread over several steps) and preemption (a prompt recomputed) both come out right.

Where the stream at a hook point is a sum the model has not formed yet (Llama-family layers pass
`hidden + residual` unsummed), an edit reads the sum and adds its change to one addend.

An exception inside a hook is caught and recorded against the request(s) it concerns: it must never reach
the engine core, which would die and take every other request with it.
"""

from __future__ import annotations

import logging
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn

from interpgw.core.capture import HookOrder
from interpgw.core.interventions import EditOp, EditOrder, apply_edit
from interpgw.core.positions import RowFilter
from interpgw.core.wire import torch_dtype
from interpgw.engine.architectures import ModelModules, locate_modules
from interpgw.engine.signal_step import LensFn, SamplingEntry, SignalStep
from interpgw.signals.monitors import MonitorEvent, MonitorState
from interpgw.signals.orders import Action, MonitorRule, SignalOrder

log = logging.getLogger(__name__)


class StepLayout(NamedTuple):
    """How the flat batch of one forward step maps to requests."""

    req_ids: list[str]  # internal request ids, batch order
    query_start_loc: np.ndarray  # [num_reqs + 1]: request i owns rows [qsl[i], qsl[i+1])


@dataclass
class _RequestCapture:
    order: HookOrder
    req_id: str
    rows: RowFilter  # the rows to record
    # each edit with its vector [d_model] float32 and, for adds, scale * vector [1, d_model] (made once, used per step)
    edits: list[tuple[EditOrder, torch.Tensor | None, torch.Tensor | None]]
    positions: list[np.ndarray] = field(default_factory=list)  # one array per step
    # every recorded row so far, one plane per hook point (in `order.hooks` order): [n_hooks, capacity, d_model]
    buffer: torch.Tensor | None = None
    n_rows: int = 0  # rows of `buffer` in use
    step_start: int = 0  # where this step's rows go
    planes: dict[tuple[str, ...], slice | torch.Tensor] = field(default_factory=dict)  # see `planes_of`
    error: str | None = None
    salt: str = ""  # equal for requests with equal edits (counts distinct steering configurations)
    signals: SignalOrder | None = None  # per-token signals to compute at each sampling step
    tap_hooks: tuple[str, ...] = ()  # hook points whose sampling row the signals read (from `signals`, made once)
    monitor: MonitorState | None = None
    probe_weights: torch.Tensor | None = None  # [n_probes, d_model] float32
    probe_bias: torch.Tensor | None = None  # [n_probes]
    last_signal_index: int = -1  # the last token whose signals were sent (recomputation after preemption: skip)
    stopped: bool = False  # a STOP monitor fired: no more signals
    error_reported: bool = False

    def fire_monitors(self, token_index: int, values: dict[str, float]) -> list[tuple[MonitorRule, MonitorEvent]]:
        """Run the monitors on one token; a STEER arms its edits from the next step, a STOP ends the signals."""
        fired = self.monitor.update(token_index, values)
        for rule, _ in fired:
            if rule.action is Action.STEER:
                self.edits.extend(_prepared(rule.edits))
            elif rule.action is Action.STOP:
                self.stopped = True
        return fired

    def planes_of(self, hooks: tuple[str, ...], device: torch.device) -> slice | torch.Tensor:
        """Where `hooks` go among this request's hook planes: a range when they are consecutive there (the usual
        case: the request records exactly these), else an index. The same hooks come back every step: cached."""
        found = self.planes.get(hooks)
        if found is None:
            places = [self.order.hooks.index(hook) for hook in hooks]
            if places == list(range(places[0], places[0] + len(places))):
                found = slice(places[0], places[0] + len(places))
            else:
                found = torch.tensor(places, device=device)
            if len(self.planes) >= 64:  # other requests' hook sets come and go: keep the cache small
                self.planes.clear()
            self.planes[hooks] = found
        return found

    def reserve(self, count: int) -> None:
        """Make room for this step's `count` rows (at most a doubling: rows arrive a step at a time)."""
        self.step_start = self.n_rows
        self.n_rows += count
        if self.buffer is not None and self.buffer.shape[1] < self.n_rows:
            grown = self.buffer.new_empty(
                (self.buffer.shape[0], max(self.n_rows, 2 * self.buffer.shape[1]), self.buffer.shape[2])
            )
            grown[:, : self.step_start].copy_(self.buffer[:, : self.step_start])
            self.buffer = grown

    def store(self, block: torch.Tensor, slots: slice | torch.Tensor, allow_faults: bool) -> None:
        """This step's rows of some hook points: `block` [n_hooks_in_block, n_rows_this_step, d_model] goes to the
        hook planes `slots` (a range, or an index tensor when the hook points are not consecutive here)."""
        if self.error is not None:
            return
        if allow_faults and self.order.fault == "hook":
            raise RuntimeError("fault injected into hook (test only)")
        if self.buffer is None:
            capacity = max(self.n_rows, 16)
            self.buffer = block.new_empty((len(self.order.hooks), capacity, block.shape[2]))
        rows = slice(self.step_start, self.step_start + block.shape[1])
        if isinstance(slots, slice):
            self.buffer[slots, rows].copy_(block)
        else:
            self.buffer[:, rows].index_copy_(0, slots, block)

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
        for slot, hook in enumerate(self.order.hooks):
            data = self.buffer[slot, : self.n_rows] if self.buffer is not None else torch.empty(0)
            if order is not None:
                data = data.index_select(0, torch.from_numpy(order))
            if dtype is not None:
                data = data.to(dtype)
            tensors[hook] = data.cpu().contiguous()
        return {"positions": positions.tolist(), "tensors": tensors, "error": None}


@dataclass
class _CaptureGroup:
    """The hook points that the same requests record in one step: gathered apart, handed out together."""

    captures: list[_RequestCapture]
    counts: list[int]  # each request's rows, in batch order
    slots: list[slice | torch.Tensor]  # each request's hook planes for `hooks`, in its buffer
    hooks: list[str] = field(default_factory=list)
    rows: list[torch.Tensor | None] = field(default_factory=list)  # per hook this step: [sum(counts), d_model]


@dataclass
class _HookSelection:
    index: torch.Tensor  # [n_rows] rows of the flat batch
    group: _CaptureGroup
    slot: int  # this hook's place in `group.hooks`


@dataclass
class _EditGroup:
    """The edits of one step at one hook point."""

    add_index: torch.Tensor | None = None  # [n_rows]: rows of all plain adds, batched into one index_add_
    add_delta: torch.Tensor | None = None  # [n_rows, d_model] float32
    add_owners: list[_RequestCapture] = field(default_factory=list)
    # other edits, in each request's order: (rows of the flat batch, edit, vector, owner)
    others: list[tuple[torch.Tensor, EditOrder, torch.Tensor | None, _RequestCapture]] = field(default_factory=list)


@dataclass
class HookStats:
    """What the hooks cost and did since the last read: the gateway polls this for its metrics."""

    seconds: float = 0.0  # time spent planning, recording and editing
    steps: int = 0  # forward steps that recorded or edited something
    interventions: list[int] = field(default_factory=list)  # per such step: edits applied (at most 4096 kept)
    configs: list[int] = field(default_factory=list)  # per such step: distinct edit configurations

    def to_json(self) -> dict[str, Any]:
        return {
            "seconds": self.seconds,
            "steps": self.steps,
            "interventions": self.interventions,
            "configs": self.configs,
        }


@dataclass
class _StepPlan:
    captures: dict[str, _HookSelection]
    groups: list[_CaptureGroup]
    edits: dict[str, _EditGroup]
    stash_layers: set[int]  # layers whose resid_pre must be kept for resid_mid edits (Llama family)
    hooks: frozenset[str]  # every hook point this step records, edits or taps for signals
    layers: frozenset[int]  # the layers among them: the other layers' hooks return at once


class ActivationRecorder:
    """Installs forward hooks on a vLLM model and records per-request activations."""

    def __init__(
        self,
        model: nn.Module,
        layout_fn: Callable[[], StepLayout],
        order_fn: Callable[[str], dict | None],
        allow_faults: bool = False,
        sampler: nn.Module | None = None,
        lens_fn: LensFn | None = None,
        send_signals: Callable[[list[dict]], None] | None = None,
    ) -> None:
        """`sampler`, `lens_fn` and `send_signals` enable per-token signals (vLLM's sampler module, the logit lens
        through the model's own final norm and unembedding, and the channel to the gateway)."""
        self.modules: ModelModules = locate_modules(model)
        self._layout_fn = layout_fn
        self._order_fn = order_fn
        self._allow_faults = allow_faults
        self._by_req: dict[str, _RequestCapture | None] = {}
        self._by_key: dict[str, _RequestCapture] = {}
        self._plan: _StepPlan | None = None
        self._stash: dict[int, torch.Tensor] = {}  # layer -> resid_pre [num_tokens, d_model], for resid_mid edits
        self._steps = 0
        self._pending_pre: torch.Tensor | None = None  # GPT-2 only: resid_pre of the running block
        self.fire_counts: Counter[str] = Counter()
        self.stats = HookStats()
        self._handles: list[Any] = []
        self._signal_step: SignalStep | None = None
        self._lens_fn = lens_fn
        self._send_signals = send_signals
        self._install(model, sampler)

    # ------------------------------------------------------------------ installation

    def _install(self, model: nn.Module, sampler: nn.Module | None) -> None:
        m = self.modules
        add = self._handles.append
        if sampler is not None:
            add(sampler.register_forward_pre_hook(self._on_sample_start, with_kwargs=True))
            add(sampler.register_forward_hook(self._on_sample_end))
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
            order = HookOrder.from_extra_args(data)
            capture = _RequestCapture(
                order=order,
                req_id=req_id,
                rows=order.capture_rows(),
                edits=_prepared(order.edits),
                salt=order.edit_salt() if order.edits else "",
            )
            if order.signals is not None:
                capture.signals = order.signals
                capture.tap_hooks = order.signals.tap_hooks()
                capture.monitor = MonitorState(order.signals.monitors) if order.signals.monitors else None
                if order.signals.probes:
                    capture.probe_weights = torch.stack([p.weight_tensor() for p in order.signals.probes])
                    capture.probe_bias = torch.tensor([p.bias for p in order.signals.probes])
            self._by_key[order.key] = capture
        self._by_req[req_id] = capture
        return capture

    def take_stats(self) -> HookStats:
        """The stats since the last call, which starts a new count."""
        stats, self.stats = self.stats, HookStats()
        return stats

    def _on_forward_start(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self._plan is not None:  # the previous forward raised before its end: its rows are incomplete
            for group in self._plan.groups:
                for capture in group.captures:
                    capture.error = capture.error or "a forward step failed while capturing"
        self._plan = None
        self._signal_step = None  # never let a failed plan leave the previous step's signal entries behind
        start = time.perf_counter()
        try:
            self._plan = self._build_plan(args, kwargs)
        except Exception:  # noqa: BLE001
            log.exception("building the hook plan failed; this step is neither captured nor edited")
            for capture in self._by_key.values():
                capture.error = capture.error or "internal error while planning capture"
        if self._plan is not None:
            self.stats.seconds += time.perf_counter() - start

    def _build_plan(self, args: tuple, kwargs: dict) -> _StepPlan | None:
        layout = self._layout_fn()
        self._steps += 1
        if self._steps % 256 == 0:
            self._prune(set(layout.req_ids))
        active = []
        failed_signals = []
        for i, req_id in enumerate(layout.req_ids):
            capture = self._capture_for(req_id)
            if capture is not None and capture.error is None:
                active.append((i, capture))
            elif capture is not None and capture.signals is not None and not capture.error_reported:
                capture.error_reported = True
                failed_signals.append({"k": capture.order.key, "error": capture.error})
        if failed_signals and self._send_signals is not None:
            self._send_signals(failed_signals)
        self._signal_step = None
        if not active:
            return None
        positions = kwargs.get("positions") if "positions" in kwargs else args[1]
        positions_np = positions.detach().to("cpu").numpy()
        device = positions.device
        qsl = layout.query_start_loc
        per_hook: dict[str, list[tuple[_RequestCapture, np.ndarray]]] = defaultdict(list)
        edits: dict[str, _EditGroup] = {}
        add_parts: dict[str, list[tuple[np.ndarray, torch.Tensor]]] = defaultdict(list)
        sampling: list[SamplingEntry] = []
        taps: dict[str, list[tuple[_RequestCapture, int]]] = defaultdict(list)
        for i, capture in active:
            lo, hi = int(qsl[i]), int(qsl[i + 1])
            step_positions = positions_np[lo:hi]
            if capture.signals is not None and not capture.stopped and hi > lo and self._send_signals is not None:
                # the step's last row samples token (position + 1 - prompt_len) once the prompt is done
                token_index = int(step_positions[-1]) + 1 - capture.order.prompt_len
                if token_index > capture.last_signal_index:
                    sampling.append(SamplingEntry(owner=capture, batch_index=i, token_index=token_index))
                    for hook in capture.tap_hooks:
                        taps[hook].append((capture, hi - 1))
            if capture.order.hooks:
                keep = capture.rows.mask(step_positions)
                if keep.any():
                    rows = np.nonzero(keep)[0] + lo
                    capture.positions.append(step_positions[keep].astype(np.int64))
                    capture.reserve(len(rows))
                    for hook in capture.order.hooks:
                        per_hook[hook].append((capture, rows))
            if capture.edits:
                self._plan_edits(capture, step_positions, lo, device, edits, add_parts)
        for hook, parts in add_parts.items():
            group = edits[hook]
            group.add_index = torch.from_numpy(np.concatenate([rows for rows, _ in parts])).to(device)
            group.add_delta = torch.cat([delta.expand(len(rows), -1) for rows, delta in parts])
        if sampling:
            self._signal_step = SignalStep(
                entries=sampling,
                taps={
                    hook: (
                        torch.tensor([row for _, row in owners], device=device),
                        {id(owner): k for k, (owner, _) in enumerate(owners)},
                    )
                    for hook, owners in taps.items()
                },
            )
        if not per_hook and not edits and not sampling:
            return None
        groups: dict[tuple[int, ...], tuple[torch.Tensor, _CaptureGroup]] = {}
        selections = {}
        for hook, entries in per_hook.items():
            key = tuple(id(capture) for capture, _ in entries)
            if key not in groups:
                index = torch.from_numpy(np.concatenate([rows for _, rows in entries])).to(device)
                captures = [capture for capture, _ in entries]
                groups[key] = (index, _CaptureGroup(captures, [len(rows) for _, rows in entries], []))
            index, group = groups[key]
            selections[hook] = _HookSelection(index=index, group=group, slot=len(group.hooks))
            group.hooks.append(hook)
            group.rows.append(None)
        for _, group in groups.values():
            hooks_key = tuple(group.hooks)
            group.slots = [capture.planes_of(hooks_key, device) for capture in group.captures]
        stash = {int(h.split(".")[1]) for h in edits if h.endswith(".hook_resid_mid")}
        stats = self.stats
        stats.steps += 1
        if len(stats.interventions) < 4096:
            editing = [capture for _, capture in active if capture.edits]
            stats.interventions.append(sum(len(capture.edits) for capture in editing))
            stats.configs.append(len({capture.salt for capture in editing}))
        hooks = frozenset({*selections, *edits, *taps})
        layers = frozenset(int(hook.split(".")[1]) for hook in hooks if hook.startswith("blocks."))
        return _StepPlan(
            captures=selections,
            groups=[group for _, group in groups.values()],
            edits=edits,
            stash_layers=stash,
            hooks=hooks,
            layers=layers,
        )

    @staticmethod
    def _plan_edits(
        capture: _RequestCapture,
        step_positions: np.ndarray,
        lo: int,
        device: torch.device,
        edits: dict[str, _EditGroup],
        add_parts: dict[str, list[tuple[np.ndarray, torch.Tensor]]],
    ) -> None:
        """Place one request's edits of this step: plain adds batch across requests, the rest run in order."""
        per_hook: dict[str, list[tuple[np.ndarray, EditOrder, torch.Tensor | None, torch.Tensor | None]]]
        per_hook = defaultdict(list)
        for edit, vector, scaled in capture.edits:
            keep = edit.rows.mask(step_positions)
            if keep.any():
                per_hook[edit.hook].append((np.nonzero(keep)[0] + lo, edit, vector, scaled))
        for hook, items in per_hook.items():
            group = edits.setdefault(hook, _EditGroup())
            if all(edit.is_plain_add for _, edit, _, _ in items):  # order among adds does not matter
                for rows, _, _, scaled in items:
                    add_parts[hook].append((rows, scaled))  # [1, d_model]
                group.add_owners.append(capture)
            else:
                for rows, edit, vector, _ in items:
                    group.others.append((torch.from_numpy(rows).to(device), edit, vector, capture))

    def _prune(self, live: set[str]) -> None:
        """Forget non-capturing requests that left the batch (their lookups are cheap to redo)."""
        for req_id in [r for r, c in self._by_req.items() if c is None and r not in live]:
            del self._by_req[req_id]

    def _on_forward_end(self, module: nn.Module, args: tuple, output: Any) -> None:
        plan, self._plan = self._plan, None
        self._stash.clear()
        if plan is not None and plan.groups:
            start = time.perf_counter()
            for group in plan.groups:
                self._hand_out(group)
            self.stats.seconds += time.perf_counter() - start

    def _hand_out(self, group: _CaptureGroup) -> None:
        """Copy each request's rows of the group's hook points into its buffer, all hook points at once."""
        missing = [hook for hook, rows in zip(group.hooks, group.rows, strict=True) if rows is None]
        if missing:  # a gather failed (its requests already hold the error) or a hook point did not fire
            for capture in group.captures:
                capture.error = capture.error or f"capture at {missing[0]} did not run"
            return
        try:
            block = torch.stack(group.rows)  # [n_hooks, n_rows, d_model]
        except Exception as exc:  # noqa: BLE001
            log.exception("assembling this step's captures failed")
            for capture in group.captures:
                capture.error = capture.error or f"capture failed: {exc}"
            return
        offset = 0
        for capture, count, slots in zip(group.captures, group.counts, group.slots, strict=True):
            try:
                capture.store(block[:, offset : offset + count], slots, self._allow_faults)
            except Exception as exc:  # noqa: BLE001
                capture.error = capture.error or f"capture failed: {exc}"
            offset += count

    # ------------------------------------------------------------------ editing and recording

    def _edit(self, hook: str, read: Callable[[torch.Tensor], torch.Tensor], target: torch.Tensor) -> None:
        """Apply this step's edits at `hook`: `read(index)` gives the stream's rows, changes are added to `target`.

        `target` is the tensor the model carries on (for a summed stream, one addend): adding the change there
        makes every later computation see the edited stream.
        """
        group = self._plan.edits.get(hook) if self._plan is not None else None
        if group is None:
            return
        start = time.perf_counter()
        if group.add_index is not None:
            try:
                target.index_add_(0, group.add_index, group.add_delta.to(target.dtype))
            except Exception as exc:  # noqa: BLE001
                log.exception("edit at %s failed", hook)
                for owner in group.add_owners:
                    owner.error = owner.error or f"edit at {hook} failed: {exc}"
        for index, edit, vector, owner in group.others:
            if owner.error is not None:
                continue
            try:
                if self._allow_faults and owner.order.fault == "edit":
                    raise RuntimeError("fault injected into edit (test only)")
                x = read(index).float()  # [n_rows, d_model]
                new = apply_edit(x, edit.op, vector, edit.scale, edit.value, edit.norm_preserving)
                target.index_add_(0, index, (new - x).to(target.dtype))
            except Exception as exc:  # noqa: BLE001
                log.exception("edit at %s failed", hook)
                owner.error = owner.error or f"edit at {hook} failed: {exc}"
        self.stats.seconds += time.perf_counter() - start

    def _record(self, hook: str, compute: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Gather the planned rows of one hook point once, then split them between requests."""
        plan = self._plan
        if plan is None:
            return
        if self._signal_step is not None:
            self._tap(hook, compute)
        selection = plan.captures.get(hook)
        if selection is None:
            return
        self.fire_counts[hook] += 1
        start = time.perf_counter()
        try:
            # [n_rows, d_model], a fresh copy; handed out to the requests when the forward ends
            selection.group.rows[selection.slot] = compute(selection.index)
        except Exception as exc:  # noqa: BLE001
            log.exception("capture at %s failed", hook)
            for capture in selection.group.captures:
                capture.error = capture.error or f"capture at {hook} failed: {exc}"
        self.stats.seconds += time.perf_counter() - start

    def _tap(self, hook: str, compute: Callable[[torch.Tensor], torch.Tensor]) -> None:
        start = time.perf_counter()
        try:
            self._signal_step.record_tap(hook, compute)
        except Exception as exc:  # noqa: BLE001
            log.exception("signal tap at %s failed", hook)
            self._fail_signals(f"signal tap at {hook} failed: {exc}")
        self.stats.seconds += time.perf_counter() - start

    def _fail_signals(self, message: str) -> None:
        """Fail this step's signal requests (and only them) and tell the gateway."""
        step, self._signal_step = self._signal_step, None
        if step is None:
            return
        records = []
        for entry in step.entries:
            owner = entry.owner
            owner.error = owner.error or message
            if not owner.error_reported:
                owner.error_reported = True
                records.append({"k": owner.order.key, "error": owner.error})
        if records and self._send_signals is not None:
            self._send_signals(records)

    # ------------------------------------------------------------------ token signals (around the sampler)

    def _on_sample_start(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        step = self._signal_step
        if step is None:
            return
        start = time.perf_counter()
        logits = kwargs["logits"] if "logits" in kwargs else args[0]
        try:
            self._compute_before_sampling(step, logits)
        except Exception:  # noqa: BLE001
            log.exception("token signals failed for the batch; retrying request by request")
            self._signal_step = self._isolate(step, logits)
        self.stats.seconds += time.perf_counter() - start

    def _compute_before_sampling(self, step: SignalStep, logits: torch.Tensor) -> None:
        if self._allow_faults and any(e.owner.order.fault == "signals" for e in step.entries):
            raise RuntimeError("fault injected into token signals (test only)")
        step.before_sampling(logits, self._lens_fn)

    def _isolate(self, step: SignalStep, logits: torch.Tensor) -> SignalStep | None:
        """After a batched failure: fail only the requests that fail on their own, go on with the others."""
        survivors = []
        for entry in step.entries:
            try:
                self._compute_before_sampling(replace(step, entries=[entry]), logits)
                survivors.append(entry)
            except Exception as exc:  # noqa: BLE001
                self._signal_step = replace(step, entries=[entry])
                self._fail_signals(f"token signals failed: {exc}")
        if not survivors:
            return None
        retry = replace(step, entries=survivors)
        try:
            retry.before_sampling(logits, self._lens_fn)
        except Exception as exc:  # noqa: BLE001
            self._signal_step = retry
            self._fail_signals(f"token signals failed: {exc}")
            return None
        return retry

    def _on_sample_end(self, module: nn.Module, args: tuple, output: Any) -> None:
        step, self._signal_step = self._signal_step, None
        if step is None:
            return
        start = time.perf_counter()
        try:
            results = step.after_sampling(output.sampled_token_ids)
            records = []
            for entry, _ in results:
                entry.owner.last_signal_index = entry.token_index
                records.append({"k": entry.owner.order.key, "s": entry.signals.to_json()})
            self._send_signals(records)
        except Exception as exc:  # noqa: BLE001
            log.exception("token signals failed")
            self._signal_step = step
            self._fail_signals(f"token signals failed: {exc}")
        self.stats.seconds += time.perf_counter() - start

    def _visit(self, hook: str, read: Callable[[torch.Tensor], torch.Tensor], target: torch.Tensor) -> None:
        """Edit, then record, one hook point whose stream is `read` and whose carrier is `target`."""
        self._edit(hook, read, target)
        self._record(hook, read)

    # ------------------------------------------------------------------ hooks

    def _on_embed(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        if self._plan is not None and "hook_embed" in self._plan.hooks:
            self._visit("hook_embed", partial(_rows, output), output)

    def _idle(self, layer: int) -> bool:
        """Nothing to do in this layer this step (a capture of one layer leaves the other layers' hooks idle)."""
        return self._plan is None or layer not in self._plan.layers

    def _on_layer_start(self, layer: int, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self._idle(layer):
            return
        hook = f"blocks.{layer}.hook_resid_pre"
        if self.modules.fused_residual:
            hidden = args[1] if len(args) > 1 else kwargs["hidden_states"]
            residual = args[2] if len(args) > 2 else kwargs.get("residual")
            read = partial(_rows, hidden) if residual is None else partial(_rows_sum, hidden, residual)
            self._visit(hook, read, hidden)
            if layer in self._plan.stash_layers:  # the fused norm will overwrite hidden/residual in place
                self._stash[layer] = hidden.clone() if residual is None else hidden + residual
        else:
            hidden = args[0] if args else kwargs["hidden_states"]
            self._visit(hook, partial(_rows, hidden), hidden)
            self._pending_pre = hidden

    def _on_attn(self, layer: int, module: nn.Module, args: tuple, output: Any) -> None:
        if self._idle(layer):
            return
        attn_out = output[0] if isinstance(output, tuple) else output
        self._visit(f"blocks.{layer}.hook_attn_out", partial(_rows, attn_out), attn_out)
        mid = f"blocks.{layer}.hook_resid_mid"
        resid_pre = self._pending_pre if not self.modules.fused_residual else self._stash.get(layer)
        if mid in self._plan.edits and resid_pre is not None:
            self._edit(mid, partial(_rows_sum, attn_out, resid_pre), attn_out)
        if not self.modules.fused_residual:
            self._record(mid, partial(_rows_sum, attn_out, self._pending_pre))

    def _on_mlp(self, layer: int, module: nn.Module, args: tuple, output: Any) -> None:
        if self._idle(layer):
            return
        self._visit(f"blocks.{layer}.hook_mlp_out", partial(_rows, output), output)

    def _on_layer_end(self, layer: int, module: nn.Module, args: tuple, output: Any) -> None:
        if self._idle(layer):
            return
        if self.modules.fused_residual:
            mlp_out, resid_mid = output
            self._visit(f"blocks.{layer}.hook_mlp_out", partial(_rows, mlp_out), mlp_out)
            self._record(f"blocks.{layer}.hook_resid_mid", partial(_rows, resid_mid))
            self._visit(f"blocks.{layer}.hook_resid_post", partial(_rows_sum, mlp_out, resid_mid), mlp_out)
        else:
            self._visit(f"blocks.{layer}.hook_resid_post", partial(_rows, output), output)

    def _on_final_norm(self, module: nn.Module, args: tuple, output: Any) -> None:
        if self._plan is None or "ln_final.hook_normalized" not in self._plan.hooks:
            return
        normed = output[0] if isinstance(output, tuple) else output
        self._visit("ln_final.hook_normalized", partial(_rows, normed), normed)


def _prepared(edits: tuple[EditOrder, ...]) -> list[tuple[EditOrder, torch.Tensor | None, torch.Tensor | None]]:
    """Each edit with its vector `[d_model]` and, for adds, `scale * vector` `[1, d_model]`, made once."""
    prepared = []
    for edit in edits:
        vector = edit.vector_tensor()
        scaled = (edit.scale * vector).unsqueeze(0) if edit.op is EditOp.ADD else None
        prepared.append((edit, vector, scaled))
    return prepared


def _rows(tensor: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return tensor.index_select(0, index)


def _rows_sum(a: torch.Tensor, b: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return a.index_select(0, index) + b.index_select(0, index)
