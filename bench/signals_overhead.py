"""What per-token hallucination signals cost: generation throughput with signals off vs on, same batch.

One gateway process (bf16 default model), N prompts, greedy, `--new-tokens` each, forced past end-of-sequence:

  off       no signals
  signals   entropy / logprob / rank / margin, the logit lens at 3 layers (7, 15, 23) and one linear probe
            (trained first, on 200 statements of ../shared/datasets/truth_fever.jsonl, at blocks.15.hook_resid_post)

Rounds are interleaved (off, signals, off, ...) after one untimed warm-up round each; the median of `--repeats`
rounds is reported. Goal (issue 5): signals >= 0.9 of off. Run from the repository root:

    .venv/bin/python bench/signals_overhead.py                 # 32 prompts x 64 tokens, 5 rounds
    .venv/bin/python bench/signals_overhead.py --prompts 4 --new-tokens 8 --repeats 1
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH), str(BENCH.parent / "tests")]

from trace_throughput import RunStats, _result_stats, interleaved_rounds, overhead_run  # noqa: E402

LENS_LAYERS = (7, 15, 23)
PROBE_LAYER = 15
TRUTH = BENCH.parent.parent / "shared" / "datasets" / "truth_fever.jsonl"


async def measure_all(address: str, prompts: list[str], new_tokens: int, repeats: int) -> dict[str, list[RunStats]]:
    from interpgw_client import AsyncClient

    client = AsyncClient(address, timeout=900)
    await client.wait_ready(timeout=60.0)
    rows = [json.loads(line) for line in TRUTH.read_text().splitlines()[:200]]
    probe = await client.probes.train([(r["statement"], r["label"]) for r in rows], layer=PROBE_LAYER, name="bench")
    print(f"probe {probe.id}: held-out AUROC {probe.test_auroc:.3f} on {probe.n_test} statements", flush=True)
    base = {"max_tokens": new_tokens, "temperature": 0.0, "ignore_eos": True}
    signals = {"distribution": True, "lens_layers": list(LENS_LAYERS), "probes": [probe.id]}

    async def once(name: str) -> RunStats:
        extra = {"signals": signals} if name == "signals" else {}
        start = time.perf_counter()
        results = await asyncio.gather(*(client.generate(p, **base, **extra) for p in prompts))
        if name == "signals":
            assert all(len(r.signals) == len(r.token_ids) for r in results), "a token came without its signals"
        return _result_stats(results, time.perf_counter() - start)

    names = ("off", "signals")
    try:
        return await interleaved_rounds(once, names, repeats)
    finally:
        await client.probes.delete(probe.id)
        await client.close()


def main() -> None:
    args, prompts, runs, rate = overhead_run(__doc__, BENCH / "signals_overhead.json", measure_all)
    ratio = rate["signals"] / rate["off"]
    print(f"{'config':58s} {'tok/s':>8s} {'vs off':>8s}  goal")
    print(f"{'signals off':58s} {rate['off']:8.1f} {1.0:8.3f}")
    label = f"entropy+logprob+rank+margin, lens at {list(LENS_LAYERS)}, 1 probe"
    print(f"{label:58s} {rate['signals']:8.1f} {ratio:8.3f}  >= 0.90")
    report = {
        "prompts": len(prompts),
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "lens_layers": list(LENS_LAYERS),
        "tokens_per_s": rate,
        "ratio": ratio,
        "runs": {name: [r.__dict__ for r in stats] for name, stats in runs.items()},
    }
    args.json.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
