"""vLLM worker extension: the gateway's methods inside the engine worker, called via `collective_rpc`.

vLLM mixes this class into its Worker (`worker_extension_cls`), so `self.model_runner` is the V1 model
runner. Only JSON/msgpack-safe values cross back: tensors travel as (dtype, shape, bytes).
"""

from __future__ import annotations

import os
from typing import Any

from interpgw.core.capture import EXTRA_ARGS_KEY
from interpgw.core.wire import dtype_name
from interpgw.engine.recorder import ActivationRecorder, StepLayout

FAULT_INJECTION_ENV = "INTERPGW_ENABLE_FAULT_INJECTION"


def tensor_to_wire(tensor: Any) -> tuple[str, list[int], bytes]:
    import torch

    data = tensor.detach().cpu().contiguous()
    raw = data.view(torch.uint8).numpy().tobytes() if data.numel() else b""
    return dtype_name(data), list(data.shape), raw


class InterpWorkerExtension:
    """Methods prefixed `interpgw_` to stay clear of vLLM's own worker attributes."""

    def interpgw_install(self) -> dict[str, Any]:
        runner = self.model_runner  # type: ignore[attr-defined]
        existing = getattr(self, "_interpgw_recorder", None)
        if existing is not None:
            existing.remove()

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

        recorder = ActivationRecorder(
            runner.get_model(),
            layout_fn=layout,
            order_fn=order_for,
            allow_faults=os.environ.get(FAULT_INJECTION_ENV) == "1",
        )
        self._interpgw_recorder = recorder
        return {"n_layers": recorder.modules.n_layers, "fused_residual": recorder.modules.fused_residual}

    def interpgw_pop(self, keys: list[str]) -> dict[str, dict[str, Any]]:
        results = self._interpgw_recorder.pop(keys)
        for result in results.values():
            tensors = result.pop("tensors", None) or {}
            result["tensors"] = {hook: tensor_to_wire(t) for hook, t in tensors.items()}
        return results

    def interpgw_discard(self, keys: list[str]) -> None:
        self._interpgw_recorder.discard(keys)

    def interpgw_stats(self) -> dict[str, Any]:
        """Hook time and per-step intervention counts since the last call (for the gateway's metrics)."""
        return self._interpgw_recorder.take_stats().to_json()
