"""vLLM worker extension: the gateway's methods inside the engine worker, called via `collective_rpc`.

vLLM mixes this class into its Worker (`worker_extension_cls`), so `self.model_runner` is the V1 model
runner. Only JSON/msgpack-safe values cross back: captured tensors travel through a shared-memory file
(`tensor_handoff.py`), or as (dtype, shape, bytes) where that is not possible.
"""

from __future__ import annotations

import os
from typing import Any

from interpgw.core.capture import EXTRA_ARGS_KEY
from interpgw.core.wire import dtype_name
from interpgw.engine.cpu_seed_fix import install_cpu_seed_fix
from interpgw.engine.recorder import ActivationRecorder, HookStats, StepLayout
from interpgw.engine.signal_channel import SignalSender
from interpgw.engine.tensor_handoff import HandoffWriter

FAULT_INJECTION_ENV = "INTERPGW_ENABLE_FAULT_INJECTION"


def tensor_to_wire(tensor: Any) -> tuple[str, list[int], bytes]:
    import torch

    data = tensor.detach().cpu().contiguous()
    raw = data.view(torch.uint8).numpy().tobytes() if data.numel() else b""
    return dtype_name(data), list(data.shape), raw


def _drop(records: list[dict]) -> None:
    """Non-reporting ranks compute signals but send nothing."""


class InterpWorkerExtension:
    """Methods prefixed `interpgw_` to stay clear of vLLM's own worker attributes."""

    def interpgw_install(self, signal_path: str | None = None, handoff_dir: str | None = None) -> dict[str, Any]:
        """Install the hooks; `signal_path` is the gateway's socket for per-token signals (None: no signals),
        `handoff_dir` its shared-memory directory for captured tensors (None: they travel as bytes)."""
        import torch

        runner = self.model_runner  # type: ignore[attr-defined]
        existing = getattr(self, "_interpgw_recorder", None)
        if existing is not None:
            existing.remove()
        self._interpgw_recorder = None
        if runner.vllm_config.parallel_config.pipeline_parallel_size > 1:
            # A pipeline stage holds only some layers (the others are placeholders): no hooks. The gateway refuses
            # captures, edits and signals for such a model (`VllmEngine.supports_hooks`).
            return {"n_layers": 0, "fused_residual": False, "hooks": False}
        model = runner.get_model()
        if runner.device.type == "cpu" and not getattr(runner, "_interpgw_seed_fix", False):
            runner._interpgw_seed_fix = install_cpu_seed_fix(runner)

        def layout() -> StepLayout:
            batch = runner.input_batch
            num_reqs = batch.num_reqs
            return StepLayout(batch.req_ids[:num_reqs], runner.query_start_loc.np[: num_reqs + 1])

        def order_for(req_id: str) -> dict | None:
            state = runner.requests.get(req_id)
            params = getattr(state, "sampling_params", None)
            extra = getattr(params, "extra_args", None)
            if not extra:
                return None
            return extra.get(EXTRA_ARGS_KEY)

        def lens(hidden: torch.Tensor) -> torch.Tensor:
            """[m, d_model] -> [m, vocab] logits through the engine's own final norm and unembedding."""
            normed = recorder.modules.final_norm(hidden.to(model_dtype))
            normed = normed[0] if isinstance(normed, tuple) else normed
            return model.compute_logits(normed)

        model_dtype = runner.model_config.dtype
        sender = SignalSender(signal_path) if signal_path else None
        # Every rank computes the signals (a STEER monitor must arm the same edits on each tensor-parallel rank);
        # only rank 0 reports them.
        rank = getattr(self, "rank", 0)
        recorder = ActivationRecorder(
            model,
            layout_fn=layout,
            order_fn=order_for,
            allow_faults=os.environ.get(FAULT_INJECTION_ENV) == "1",
            sampler=getattr(runner, "sampler", None) if sender is not None else None,
            lens_fn=lens,
            send_signals=None if sender is None else sender.send if rank == 0 else _drop,
        )
        self._interpgw_recorder = recorder
        # Only rank 0's results are read: the other ranks write no files (nobody would unlink them).
        self._interpgw_handoff = HandoffWriter(handoff_dir if rank == 0 else None)
        self._interpgw_rank = rank
        return {"n_layers": recorder.modules.n_layers, "fused_residual": recorder.modules.fused_residual, "hooks": True}

    def interpgw_pop(self, keys: list[str]) -> dict[str, dict[str, Any]]:
        if self._interpgw_recorder is None:
            return {}
        results = self._interpgw_recorder.pop(keys)
        for result in results.values():
            tensors = result.pop("tensors", None) or {}
            if self._interpgw_rank != 0:  # the gateway reads rank 0's results only
                result["tensors"] = {}
                continue
            handle = self._interpgw_handoff.write(tensors)
            if handle is not None:
                result["handoff"] = handle
            else:
                result["tensors"] = {hook: tensor_to_wire(t) for hook, t in tensors.items()}
        return results

    def interpgw_discard(self, keys: list[str]) -> None:
        if self._interpgw_recorder is not None:
            self._interpgw_recorder.discard(keys)

    def interpgw_stats(self) -> dict[str, Any]:
        """Hook time and per-step intervention counts since the last call (for the gateway's metrics)."""
        if self._interpgw_recorder is None:
            return HookStats().to_json()
        return self._interpgw_recorder.take_stats().to_json()
