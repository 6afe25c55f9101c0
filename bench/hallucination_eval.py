"""How well each hallucination signal separates right from wrong answers, with a length-only baseline.

On `../shared/datasets/qa_wikidata.jsonl` (a sentence to complete, accepted answers): the default model completes
each prompt greedily (at most `--max-tokens`, stopping at a newline or a full stop); an answer is correct when an
accepted answer appears in it (case-insensitive). Each signal is turned into a hallucination score (higher = more
likely wrong) fixed in advance, never flipped after looking at the data, and scored by AUROC against "wrong":

  entropy        mean entropy over the answer's tokens
  -logprob       minus the mean chosen-token log-probability
  lens KL        mean KL(final || logit lens) at the middle layer (internal consistency)
  lens layer     mean earliest lens layer agreeing with the token (later = less settled)
  probe          1 - score of a SAPLMA-style probe: trained through TrainProbe on (prompt + answer, correct) of a
                 separate split, applied through Trace (last token, middle layer) to the evaluation answers
  EigenScore     INSIDE over `--samples` extra sampled continuations per prompt (same batch)
  length         answer length in tokens (the baseline: length heuristics rival fancier signals)

Run from the repository root (one gateway, bf16, a few minutes on 2 cores):

    .venv/bin/python bench/hallucination_eval.py                  # 300 probe-training + 400 evaluation prompts
    .venv/bin/python bench/hallucination_eval.py --train 40 --eval 40 --samples 3
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH), str(BENCH.parent / "tests"), str(BENCH.parent / "server")]

from trace_throughput import model_dir  # noqa: E402

from interpgw.signals.probe_fit import auroc  # noqa: E402

DATA = BENCH.parent.parent / "shared" / "datasets" / "qa_wikidata.jsonl"


def correct(answer: str, accepted: list[str]) -> bool:
    text = answer.lower()
    return any(a.lower() in text for a in accepted if a.strip())


async def generate_all(client, rows: list[dict], args: argparse.Namespace, middle: int, with_eigen: bool) -> list:  # noqa: ANN001
    signals = {"distribution": True, "lens_layers": [middle]}
    if with_eigen:
        signals["eigenscore_samples"] = args.samples
    semaphore = asyncio.Semaphore(args.concurrency)

    async def one(row: dict):  # noqa: ANN202
        async with semaphore:
            return await client.generate(
                row["prompt"], max_tokens=args.max_tokens, temperature=0.0, stop=["\n", "."], signals=signals
            )

    return await asyncio.gather(*(one(row) for row in rows))


async def run(address: str, args: argparse.Namespace) -> dict:
    from interpgw_client import AsyncClient

    rows = [json.loads(line) for line in DATA.read_text().splitlines() if line.strip()]
    train_rows, eval_rows = rows[: args.train], rows[args.train : args.train + args.eval]
    client = AsyncClient(address, timeout=1800)
    await client.wait_ready(timeout=60.0)
    middle = (await client.model_info()).n_layers // 2
    start = time.perf_counter()
    train_results = await generate_all(client, train_rows, args, middle, with_eigen=False)
    eval_results = await generate_all(client, eval_rows, args, middle, with_eigen=True)
    generation_s = time.perf_counter() - start

    train_labels = [correct(r.text, row["answers"]) for r, row in zip(train_results, train_rows, strict=True)]
    labels = [correct(r.text, row["answers"]) for r, row in zip(eval_results, eval_rows, strict=True)]
    probe = await client.probes.train(
        [(row["prompt"] + r.text, ok) for r, row, ok in zip(train_results, train_rows, train_labels, strict=True)],
        layer=middle,
        name="bench-qa-saplma",
    )
    answers = [row["prompt"] + r.text for r, row in zip(eval_results, eval_rows, strict=True)]
    traced = []
    for start in range(0, len(answers), 200):  # a trace takes at most 256 prompts
        traced += (await client.trace(answers[start : start + 200], probes=[probe.id], positions="last")).prompts
    await client.probes.delete(probe.id)
    await client.close()

    def mean(result, name: str) -> float:  # noqa: ANN001
        return result.scores.get(f"{name}.mean", float("nan"))

    wrong = [not ok for ok in labels]
    scores = {
        "entropy": [mean(r, "entropy") for r in eval_results],
        "-logprob": [-mean(r, "logprob") for r in eval_results],
        f"lens KL (layer {middle})": [mean(r, f"lens_kl:{middle}") for r in eval_results],
        "lens earliest layer": [mean(r, "lens_earliest") for r in eval_results],
        "probe (1 - P(correct))": [1.0 - t.probe_scores[probe.id].pooled for t in traced],
        f"EigenScore (K={args.samples})": [r.scores["eigenscore"] for r in eval_results],
        "length in tokens (baseline)": [float(len(r.token_ids)) for r in eval_results],
    }
    report = {
        "n_train": len(train_rows),
        "n_eval": len(eval_rows),
        "eval_accuracy": sum(labels) / len(labels),
        "train_accuracy": sum(train_labels) / len(train_labels),
        "probe_held_out_auroc_at_training": probe.test_auroc,
        "generation_seconds": generation_s,
        "auroc_wrong": {},
    }
    for name, values in scores.items():
        keep = [(v, w) for v, w in zip(values, wrong, strict=True) if v == v]  # drop NaN (empty answers)
        report["auroc_wrong"][name] = auroc([v for v, _ in keep], [w for _, w in keep]) if keep else float("nan")
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", type=int, default=300, help="prompts whose answers train the probe")
    parser.add_argument("--eval", type=int, default=400, help="prompts the AUROCs are measured on")
    parser.add_argument("--samples", type=int, default=5, help="EigenScore continuations per prompt")
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--json", type=Path, default=BENCH / "hallucination_eval.json")
    args = parser.parse_args()

    from gateway_process import GatewayProcess

    model_dir()
    gateway = GatewayProcess("--dtype", "bfloat16", "--max-num-seqs", "256", startup_timeout=600)
    try:
        report = asyncio.run(run(gateway.address, args))
    finally:
        gateway.stop()
    print(
        f"\n{report['n_eval']} evaluation prompts (accuracy {report['eval_accuracy']:.1%}), probe trained on "
        f"{report['n_train']} other prompts (accuracy {report['train_accuracy']:.1%}; held-out AUROC at training "
        f"{report['probe_held_out_auroc_at_training']:.3f}); generation {report['generation_seconds']:.0f} s"
    )
    print(f"{'signal (higher = more likely wrong)':40s} {'AUROC':>7s}")
    for name, value in report["auroc_wrong"].items():
        print(f"{name:40s} {value:7.3f}")
    args.json.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
