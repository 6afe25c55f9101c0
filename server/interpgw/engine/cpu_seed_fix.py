"""Work around a vLLM CPU crash: a seeded request whose prompt is prefilled in chunks kills the engine.

vLLM samples a token for every request at every step, and throws away the samples of requests still in a
partial prefill chunk. To keep seeded sampling reproducible it then rewinds each such request's generator with
`gen.set_offset(gen.get_offset() - 4)` (`_bookkeeping_sync`). CPU generators have no offset: that line raises
"CPU Generator does not use offset" inside the engine core, which dies and fails every request in the batch
(found by tests/test_signals.py: seeded requests with long prompts in one batch).

The fix keeps vLLM's intent with what CPU generators do have, their state: before sampling, save the state of
each generator whose sample will be discarded; after sampling, put it back (the discarded draw consumed no
randomness); and hide those generators from the bookkeeping call so the offset line is never reached.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)


def install_cpu_seed_fix(runner: Any) -> bool:
    """Patch `runner` (a V1 model runner on CPU) in place; False when it does not have the expected shape."""
    if not all(hasattr(runner, name) for name in ("sampler", "_bookkeeping_sync", "discard_request_mask")):
        return False
    saved: dict[int, torch.Tensor] = {}

    def discarded() -> list[int]:
        num_reqs = runner.input_batch.num_reqs
        return [int(i) for i in np.nonzero(runner.discard_request_mask.np[:num_reqs])[0]]

    def before_sampling(module: Any, args: tuple, kwargs: dict) -> None:
        saved.clear()
        generators = runner.input_batch.generators
        for i in discarded():
            gen = generators.get(i)
            if gen is not None and gen.device.type == "cpu":
                saved[i] = gen.get_state()

    def after_sampling(module: Any, args: tuple, output: Any) -> None:
        generators = runner.input_batch.generators
        for i, state in saved.items():
            generators[i].set_state(state)

    bookkeeping = runner._bookkeeping_sync

    def bookkeeping_without_rewind(*args: Any, **kwargs: Any) -> Any:
        generators = runner.input_batch.generators
        hidden = {i: generators.pop(i) for i in list(saved) if i in generators}
        try:
            return bookkeeping(*args, **kwargs)
        finally:
            generators.update(hidden)
            saved.clear()

    runner.sampler.register_forward_pre_hook(before_sampling, with_kwargs=True)
    runner.sampler.register_forward_hook(after_sampling)
    runner._bookkeeping_sync = bookkeeping_without_rewind
    return True
