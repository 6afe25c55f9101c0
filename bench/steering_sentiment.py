"""Does a sentiment vector trained on the server shift generations? (issue 3's behavioural check)

1. Train a steering vector through the SDK from positive/negative sentence pairs of
   `../shared/datasets/sentiment_en.jsonl` (CAA mean difference of token-averaged resid_post).
2. Train a sentiment probe on held-out sentences of the same file (logistic regression on the model's own
   token-averaged activations at another layer, fitted here with torch), and report its held-out accuracy.
3. Generate from 50 neutral prompts at fixed seeds three times: unsteered, +vector, -vector (same seeds), and
   score each continuation with the probe (positive when p > 0.5) and with a small word lexicon.

The share of positive continuations should rise with +vector and fall with -vector. Run from the repository root:

    .venv/bin/python bench/steering_sentiment.py                    # default: layer 12, scales 4 and 8
    .venv/bin/python bench/steering_sentiment.py --layers 8,12 --scales 2,4,8 --json /tmp/sentiment.json
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
DATASET = REPO.parent / "shared" / "datasets" / "sentiment_en.jsonl"

TOPICS = (
    "the new library", "my neighbour's car", "the train station", "this morning's meeting", "the city park",
    "the hotel room", "the museum visit", "the weekend trip", "the local bakery", "the football match",
)  # fmt: skip
FRAMES = (
    "Here is what I think about {}:",
    "Let me tell you about {}.",
    "Yesterday I saw {} and",
    "My honest review of {}:",
    "Everyone was talking about {} because",
)
POSITIVE_WORDS = set(
    "good great excellent wonderful amazing love loved lovely nice happy beautiful best fantastic perfect enjoy "
    "enjoyed pleasant friendly delicious awesome brilliant glad recommend helpful comfortable clean fun".split()
)
NEGATIVE_WORDS = set(
    "bad terrible awful horrible hate hated worst poor sad ugly disappointing disappointed dirty rude boring "
    "broken angry annoying unpleasant disgusting noisy slow problem problems never unfortunately".split()
)


def neutral_prompts() -> list[str]:
    return [frame.format(topic) for topic in TOPICS for frame in FRAMES]  # 50


def load_dataset() -> tuple[list[str], list[str]]:
    rows = [json.loads(line) for line in DATASET.read_text().splitlines() if line.strip()]
    positive = [r["text"] for r in rows if r["label"] == "positive"]
    negative = [r["text"] for r in rows if r["label"] == "negative"]
    return positive, negative


def features(client, texts: list[str], hook: str) -> torch.Tensor:  # noqa: ANN001
    """Token-averaged activations (first token skipped: an attention sink) [n_texts, d_model]."""
    rows = []
    for start in range(0, len(texts), 64):
        for trace in client.trace(texts[start : start + 64], hook, dtype="float32"):
            acts = torch.as_tensor(np.asarray(trace.activations[hook]))
            rows.append(acts[1:].mean(0) if acts.shape[0] > 1 else acts[0])
    return torch.stack(rows)


class Probe:
    """Standardised logistic regression, fitted with L-BFGS and an L2 penalty."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, l2: float = 1e-2) -> None:
        self.mean, self.std = x.mean(0), x.std(0) + 1e-6
        z = (x - self.mean) / self.std
        self.w = torch.zeros(x.shape[1], requires_grad=True)
        self.b = torch.zeros(1, requires_grad=True)
        opt = torch.optim.LBFGS([self.w, self.b], max_iter=200)

        def closure():  # noqa: ANN202
            opt.zero_grad()
            loss = torch.nn.functional.binary_cross_entropy_with_logits(z @ self.w + self.b, y)
            loss = loss + l2 * (self.w**2).sum()
            loss.backward()
            return loss

        opt.step(closure)

    def prob(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return torch.sigmoid(((x - self.mean) / self.std) @ self.w + self.b)


def lexicon_score(text: str) -> int:
    words = re.findall(r"[a-z']+", text.lower())
    return sum(w in POSITIVE_WORDS for w in words) - sum(w in NEGATIVE_WORDS for w in words)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", default="12", help="steering layers to try, comma-separated")
    parser.add_argument("--scales", default="4,8", help="steering scales to try, comma-separated")
    parser.add_argument("--probe-layer", type=int, default=20)
    parser.add_argument("--pairs", type=int, default=128)
    parser.add_argument("--max-tokens", type=int, default=40)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    from gateway_process import GatewayProcess
    from interpgw_client import Client

    positive, negative = load_dataset()
    n_pairs = args.pairs
    pairs = list(zip(positive[:n_pairs], negative[:n_pairs], strict=True))
    probe_train = (positive[n_pairs : n_pairs + 300], negative[n_pairs : n_pairs + 300])
    probe_test = (positive[n_pairs + 300 : n_pairs + 500], negative[n_pairs + 300 : n_pairs + 500])
    prompts = neutral_prompts()
    probe_hook = f"blocks.{args.probe_layer}.hook_resid_post"
    report: dict = {"pairs": n_pairs, "prompts": len(prompts), "max_tokens": args.max_tokens, "runs": []}

    gateway = GatewayProcess()
    try:
        with Client(gateway.address, timeout=900) as client:
            x_train = torch.cat(
                [features(client, probe_train[0], probe_hook), features(client, probe_train[1], probe_hook)]
            )
            y_train = torch.cat([torch.ones(len(probe_train[0])), torch.zeros(len(probe_train[1]))])
            probe = Probe(x_train, y_train)
            x_test = torch.cat(
                [features(client, probe_test[0], probe_hook), features(client, probe_test[1], probe_hook)]
            )
            y_test = torch.cat([torch.ones(len(probe_test[0])), torch.zeros(len(probe_test[1]))])
            accuracy = float(((probe.prob(x_test) > 0.5).float() == y_test).float().mean())
            report["probe"] = {"hook": probe_hook, "held_out_accuracy": accuracy, "n_test": len(y_test)}
            print(f"probe at {probe_hook}: held-out accuracy {accuracy:.3f} on {len(y_test)} sentences")

            def run(steer) -> dict:  # noqa: ANN001
                def one(seed: int) -> str:
                    return client.generate(
                        prompts[seed], max_tokens=args.max_tokens, temperature=args.temperature, seed=seed, steer=steer
                    ).text

                with ThreadPoolExecutor(len(prompts)) as pool:  # all prompts in the engine's batch at once
                    texts = list(pool.map(one, range(len(prompts))))
                scored = [t if t.strip() else "." for t in texts]
                probs = probe.prob(features(client, scored, probe_hook))
                lexicon = [lexicon_score(t) for t in texts]
                return {
                    "probe_positive_share": float((probs > 0.5).float().mean()),
                    "probe_mean": float(probs.mean()),
                    "lexicon_positive_share": float(np.mean([s > 0 for s in lexicon])),
                    "lexicon_negative_share": float(np.mean([s < 0 for s in lexicon])),
                    "examples": texts[:3],
                }

            t0 = time.time()
            baseline = run(None)
            report["unsteered"] = baseline
            print(
                f"{'condition':28s} {'probe +share':>12s} {'probe mean':>10s} {'lex +share':>10s} {'lex -share':>10s}"
            )

            def show(name: str, r: dict) -> None:
                print(
                    f"{name:28s} {r['probe_positive_share']:12.2f} {r['probe_mean']:10.3f} "
                    f"{r['lexicon_positive_share']:10.2f} {r['lexicon_negative_share']:10.2f}"
                )

            show("unsteered", baseline)
            for layer in [int(x) for x in args.layers.split(",")]:
                vector = client.steering.train(pairs, layers=[layer], reduce="mean", name=f"sentiment-L{layer}")
                for scale in [float(x) for x in args.scales.split(",")]:
                    entry = {"layer": layer, "scale": scale, "vector_id": vector.id, "separation": vector.separation}
                    for sign in (+1, -1):
                        result = run({"vector": vector.id, "scale": sign * scale})
                        entry["plus" if sign > 0 else "minus"] = result
                        show(f"L{layer} scale {sign * scale:+g}", result)
                    report["runs"].append(entry)
            report["seconds"] = time.time() - t0
    finally:
        gateway.stop()
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
