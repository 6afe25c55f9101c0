"""What steering costs: generation throughput at batch N with no steering, one shared vector, N distinct vectors.

All three run in one gateway process (bf16 default model) on the same N prompts, greedy, `--new-tokens` each,
forced past end-of-sequence. Steering adds `scale * v` at `blocks.15.hook_resid_post` on every position
(prompt and generated):

  none       no interventions
  shared     one registry vector, the same for all N requests (by id)
  distinct   N different inline vectors, one per request

The rounds are interleaved (none, shared, distinct, none, ...) so that slow drift of the machine hits all three
alike; one untimed warm-up round first, then the median of `--repeats` rounds. Goals (issue 3): shared >= 0.95
and distinct >= 0.90 of unsteered. Run from the repository root:

    .venv/bin/python bench/steering_overhead.py                 # 32 prompts x 64 tokens, 5 rounds
    .venv/bin/python bench/steering_overhead.py --prompts 4 --new-tokens 8 --repeats 1
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path

import numpy as np

BENCH = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH), str(BENCH.parent / "tests")]

from trace_throughput import RunStats, _result_stats, interleaved_rounds, overhead_run  # noqa: E402

HOOK = "blocks.15.hook_resid_post"
SCALE = 4.0


async def measure_all(address: str, prompts: list[str], new_tokens: int, repeats: int) -> dict[str, list[RunStats]]:
    from interpgw_client import AsyncClient, Intervention

    client = AsyncClient(address, as_torch=True, timeout=900)
    await client.wait_ready(timeout=60.0)
    d_model = (await client.model_info()).d_model
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((len(prompts), d_model)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)  # unit vectors: scale sets the size
    shared = await client.steering.create(vectors[0], [HOOK], name="bench-shared")
    base = {"max_tokens": new_tokens, "temperature": 0.0, "ignore_eos": True}

    def per_request(name: str, i: int) -> dict:
        if name == "shared":
            return {"steer": {"vector": shared.id, "scale": SCALE}}
        if name == "distinct":
            return {"interventions": [Intervention("add", HOOK, vectors[i], scale=SCALE)]}
        return {}

    async def once(name: str) -> RunStats:
        start = time.perf_counter()
        results = await asyncio.gather(
            *(client.generate(p, **base, **per_request(name, i)) for i, p in enumerate(prompts))
        )
        return _result_stats(results, time.perf_counter() - start)

    names = ("none", "shared", "distinct")
    try:
        return await interleaved_rounds(once, names, repeats)
    finally:
        await client.steering.delete(shared.id)
        await client.close()


def main() -> None:
    args, prompts, runs, rate = overhead_run(__doc__, BENCH / "steering_overhead.json", measure_all)
    print(f"{'config':40s} {'tok/s':>8s} {'vs none':>8s}  goal")
    labels = {
        "none": ("no steering", ""),
        "shared": (f"one shared vector at {HOOK}", ">= 0.95"),
        "distinct": (f"{len(prompts)} distinct vectors at {HOOK}", ">= 0.90"),
    }
    for name, (label, goal) in labels.items():
        print(f"{label:40s} {rate[name]:8.1f} {rate[name] / rate['none']:8.3f}  {goal}")
    report = {
        "prompts": len(prompts),
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "hook": HOOK,
        "tokens_per_s": rate,
        "ratio_shared": rate["shared"] / rate["none"],
        "ratio_distinct": rate["distinct"] / rate["none"],
        "runs": {name: [r.__dict__ for r in stats] for name, stats in runs.items()},
    }
    args.json.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
