"""Hallucination-detection signals, probes and monitors, end to end.

Real gateway processes (vLLM engines, the real Redis for the registry), the SDK, and Hugging Face transformers
forwards of the same weights as the reference (fp32).
"""

from __future__ import annotations

import asyncio
import json
import math
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

from gateway_process import run_cli
from interpgw_client import AsyncClient, Client, Intervention, Monitor, Signals
from interpgw_client.errors import InternalError, InvalidArgumentError, NotFoundError
from reference import hf_greedy, hf_token_signals

pytestmark = pytest.mark.engine

TRUTH = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "truth_fever.jsonl"
PROMPTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Paris is the capital of France and",
    "In 1969, Neil Armstrong became the first person to walk on the Moon. Then",
    "Water boils at",
    "My favourite programming language is",
    "Once upon a time, in a land far away,",
]


def assert_signals_match(signals, reference: list[dict], lens_layers: list[int]) -> None:  # noqa: ANN001
    assert len(signals) == len(reference)
    for i, (got, want) in enumerate(zip(signals, reference, strict=True)):
        assert got.index == i
        assert got.entropy == pytest.approx(want["entropy"], abs=1e-4)
        assert got.logprob == pytest.approx(want["logprob"], abs=1e-4)
        assert got.margin == pytest.approx(want["margin"], abs=1e-4)
        assert got.rank == want["rank"]
        assert list(got.lens_layers) == lens_layers
        np.testing.assert_allclose(got.lens_kl, want["lens_kl"], atol=1e-4, rtol=1e-5)
        assert list(got.lens_top1) == want["lens_top1"]
        agreeing = [layer for layer, top in zip(lens_layers, want["lens_top1"], strict=True) if top == got.token_id]
        assert got.lens_earliest == ((agreeing[0] if agreeing else -1) if lens_layers else None)


# ---------------------------------------------------------------------- signals equal a transformers reference


def test_token_signals_match_transformers_on_the_default_model(client, hf_default) -> None:  # noqa: ANN001
    """Entropy, logprob, rank, margin and the logit lens at three layers, per generated token, against HF."""
    layers = [5, 15, 29]
    result = client.generate(
        "The capital of France is", max_tokens=12, temperature=0.0, signals=Signals(lens_layers=[5, 15, -1])
    )
    assert [s.token_id for s in result.signals] == result.token_ids
    reference = hf_token_signals(hf_default, result.prompt_token_ids, result.token_ids, layers)
    assert_signals_match(result.signals, reference, layers)
    assert all(s.lens_kl[-1] == pytest.approx(0.0, abs=1e-4) for s in result.signals)  # the last layer is the model


def test_signals_of_concurrent_requests_each_match_their_own_reference(tiny_gateway, hf_tiny) -> None:  # noqa: ANN001
    """Different signal settings in one continuous batch (sampled and greedy, with chunked prefill): each request's
    signals equal a transformers forward of its own tokens."""
    configs = [
        {"signals": Signals(lens_layers=[0, 2]), "temperature": 0.0},
        {"signals": Signals(lens_layers=[1]), "temperature": 1.0, "seed": 3},
        {"signals": Signals(lens_layers=[0, 1, 2, 3]), "temperature": 0.7, "seed": 5},
        {"temperature": 0.0},  # no signals beside ones with signals
        {"signals": True, "temperature": 0.0},
        {"signals": Signals(lens_layers=[3]), "temperature": 1.0, "seed": 11},
    ]

    async def run() -> list:
        async with AsyncClient(tiny_gateway.address, timeout=300) as client:
            return await asyncio.gather(
                *(
                    client.generate(p * 3, max_tokens=10, ignore_eos=True, **c)
                    for p, c in zip(PROMPTS, configs, strict=True)
                )
            )

    results = asyncio.run(run())
    for result, config in zip(results, configs, strict=True):
        if "signals" not in config:
            assert result.signals == [] and result.scores == {}
            continue
        layers = [] if config["signals"] is True else list(config["signals"].lens_layers)
        reference = hf_token_signals(hf_tiny, result.prompt_token_ids, result.token_ids, layers)
        assert_signals_match(result.signals, reference, layers)


def test_sequence_scores_aggregate_the_token_signals(tiny_client) -> None:  # noqa: ANN001
    result = tiny_client.generate(
        PROMPTS[1], max_tokens=9, temperature=0.0, ignore_eos=True, signals=Signals(lens_layers=[2])
    )
    entropy = [s.entropy for s in result.signals]
    logprob = [s.logprob for s in result.signals]
    assert result.scores["n_tokens"] == 9
    assert result.scores["entropy.mean"] == pytest.approx(sum(entropy) / 9, rel=1e-5)
    assert result.scores["entropy.max"] == pytest.approx(max(entropy), rel=1e-6)
    assert result.scores["logprob.min"] == pytest.approx(min(logprob), rel=1e-6)
    assert result.scores["perplexity"] == pytest.approx(math.exp(-sum(logprob) / 9), rel=1e-5)
    assert result.scores["lens_kl:2.mean"] == pytest.approx(sum(s.lens_kl[0] for s in result.signals) / 9, rel=1e-5)


# ---------------------------------------------------------------------- probes


@pytest.fixture(scope="module")
def truth_rows() -> list[dict]:
    return [json.loads(line) for line in TRUTH.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def truth_probe(default_gateway, truth_rows):  # noqa: ANN001
    with Client(default_gateway.address, timeout=600) as client:
        probe = client.probes.train(
            [(r["statement"], r["label"]) for r in truth_rows[:800]], layer=15, name="truth", seed=1
        )
        yield probe
        client.probes.delete(probe.id)


def test_probe_reaches_its_reported_auroc_on_unseen_statements(client, truth_probe, truth_rows) -> None:  # noqa: ANN001
    """Trained through the SDK on 800 statements (held-out AUROC reported), applied through Trace to 400 others."""
    from interpgw.signals.probe_fit import auroc

    assert truth_probe.n_train + truth_probe.n_test == 800 and truth_probe.n_test == 200
    assert truth_probe.hook == "blocks.15.hook_resid_post" and truth_probe.weight.shape == (576,)
    assert len(truth_probe.quantiles) == 101 and truth_probe.quantiles == sorted(truth_probe.quantiles)
    unseen = truth_rows[2000:2400]
    scores = []
    for start in range(0, len(unseen), 200):  # a trace takes at most 256 prompts
        batch = [r["statement"] for r in unseen[start : start + 200]]
        traced = client.trace(batch, probes=[truth_probe.id], positions="last")
        scores += [t.probe_scores[truth_probe.id].pooled for t in traced]
    measured = auroc(scores, [r["label"] for r in unseen])
    # 200 held-out statements give the reported AUROC a standard error of about 0.04
    assert measured > 0.5 + 0.05, f"the probe does not separate true from false ({measured:.3f})"
    assert abs(measured - truth_probe.test_auroc) < 0.1, (measured, truth_probe.test_auroc)


def test_probe_scores_equal_the_probe_applied_to_the_traced_activations(client, truth_probe) -> None:  # noqa: ANN001
    statements = ["Paris is the capital of France.", "The Moon is made of cheese."]
    traced = client.trace(statements, "blocks.15.hook_resid_post", positions="all", probes=[truth_probe.id])
    weight = torch.as_tensor(truth_probe.weight)
    for t in traced:
        rows = t.activations["blocks.15.hook_resid_post"].float()  # [n_tokens, d_model]
        expected = torch.sigmoid(rows @ weight + truth_probe.bias)
        np.testing.assert_allclose(t.probe_scores[truth_probe.id].scores, expected.numpy(), atol=1e-5)
        assert t.probe_scores[truth_probe.id].pooled == pytest.approx(float(expected[-1]), abs=1e-5)
    # a probe's hook that the trace did not ask for is captured for the scores, not returned
    only_probe = client.trace(statements[0], probes=[truth_probe.id])
    assert only_probe[0].activations == {} and len(only_probe[0].probe_scores[truth_probe.id].scores) == 1


def test_probe_scores_stream_with_generated_tokens(client, hf_default, truth_probe) -> None:  # noqa: ANN001
    result = client.generate(
        "The capital of France is",
        max_tokens=6,
        temperature=0.0,
        signals=Signals(distribution=False, probes=[truth_probe.id]),
    )
    reference = hf_token_signals(hf_default, result.prompt_token_ids, result.token_ids, [15])
    weight = torch.as_tensor(truth_probe.weight)
    for got, want in zip(result.signals, reference, strict=True):
        expected = float(torch.sigmoid(want["resid"][15] @ weight + truth_probe.bias))
        assert got.probe_ids == [truth_probe.id]
        assert got.probe_scores[0] == pytest.approx(expected, abs=1e-4)
        assert 0.0 <= got.probe_quantiles[0] <= 1.0
        assert got.entropy is None  # distribution signals were not asked for


def test_probe_registry_lists_gets_and_deletes(client, truth_probe) -> None:  # noqa: ANN001
    assert truth_probe.id in [p.id for p in client.probes.list()]
    assert truth_probe.id not in [v.id for v in client.steering.list()]  # probes are not steering vectors
    fetched = client.probes.get(truth_probe.id)
    np.testing.assert_array_equal(fetched.weight, truth_probe.weight)
    assert fetched.test_auroc == pytest.approx(truth_probe.test_auroc)
    with pytest.raises(NotFoundError):
        client.probes.get("prb_doesnotexist")
    with pytest.raises(InvalidArgumentError, match="at least 4 examples of each label"):
        client.probes.train([("A true thing.", True)] * 10 + [("A false thing.", False)] * 2)


# ---------------------------------------------------------------------- monitors


def first_window(values: list[float], threshold: float, window: int) -> int | None:
    """Index of the first token that ends `window` consecutive values below `threshold`."""
    run = 0
    for i, value in enumerate(values):
        run = run + 1 if value < threshold else 0
        if run >= window:
            return i
    return None


def test_a_stop_monitor_on_a_probe_stops_exactly_there(client, truth_probe) -> None:  # noqa: ANN001
    prompt = "Write three short facts about the Moon."
    free = client.generate(
        prompt, max_tokens=40, temperature=0.0, ignore_eos=True, signals=Signals(probes=[truth_probe.id])
    )
    scores = [s.probe_scores[0] for s in free.signals]
    threshold = float(np.median(scores))  # fires somewhere in the middle of this generation
    expected = first_window(scores, threshold, 3)
    assert expected is not None and expected < len(scores) - 1
    stop = Monitor(f"probe:{truth_probe.id}", "<", threshold, window=3, action="stop", name="low-truth")
    stream = client.generate_stream(
        prompt, max_tokens=40, temperature=0.0, ignore_eos=True, signals=Signals(monitors=[stop])
    )
    events = [e for token in stream for e in token.events]
    result = stream.result
    assert result.finish_reason == "monitor"
    assert result.token_ids == free.token_ids[: expected + 1]
    assert [(e.monitor, e.token_index, e.action) for e in events] == [("low-truth", expected, "stop")]
    assert result.monitor_events == events
    assert events[0].value == pytest.approx(scores[expected], abs=1e-4)


def test_a_flag_monitor_reports_and_generation_goes_on(tiny_client, tiny_gateway) -> None:  # noqa: ANN001
    free = tiny_client.generate(PROMPTS[0], max_tokens=12, temperature=0.0, ignore_eos=True, signals=True)
    entropy = [s.entropy for s in free.signals]
    threshold = sorted(entropy)[len(entropy) // 2]
    flag = Monitor("entropy", ">=", threshold, window=2, reduce="mean", name="uncertain")
    result = tiny_client.generate(
        PROMPTS[0],
        max_tokens=12,
        temperature=0.0,
        ignore_eos=True,
        signals=Signals(distribution=False, monitors=[flag]),
    )
    means = [(entropy[i - 1] + entropy[i]) / 2 for i in range(1, len(entropy))]
    expected = 1 + next(i for i, m in enumerate(means) if m >= threshold)
    assert result.token_ids == free.token_ids and result.finish_reason == "length"
    assert [(e.monitor, e.token_index, e.action) for e in result.monitor_events] == [("uncertain", expected, "flag")]
    assert result.signals[0].entropy is not None  # a monitor's signal is computed even when not listed
    metrics = urllib.request.urlopen(tiny_gateway.metrics_url, timeout=10).read().decode()
    assert 'interpgw_monitor_events_total{action="flag"' in metrics


def test_a_steer_monitor_steers_from_the_next_token_on(tiny_client, hf_tiny) -> None:  # noqa: ANN001
    """When the monitor fires on token i, the vector is added from the forward step that feeds token i: the tokens
    up to i are the unsteered ones, the rest equal a transformers greedy run with the edit on those positions."""
    prompt = PROMPTS[2]
    hook = "blocks.1.hook_resid_post"
    vector = torch.randn(128, generator=torch.Generator().manual_seed(7)) * 6.0
    free = tiny_client.generate(prompt, max_tokens=16, temperature=0.0, ignore_eos=True, signals=True)
    fire_at = 4
    threshold = free.signals[fire_at].entropy
    steer = Monitor(
        "entropy",
        "<=" if all(s.entropy > threshold for s in free.signals[:fire_at]) else ">=",
        threshold,
        action="steer",
        interventions=[Intervention("add", hook, vector.numpy(), positions="generated")],
    )
    fired = next(
        i
        for i, s in enumerate(free.signals)
        if steer.op == "<=" and s.entropy <= threshold or steer.op == ">=" and s.entropy >= threshold
    )
    result = tiny_client.generate(
        prompt, max_tokens=16, temperature=0.0, ignore_eos=True, signals=Signals(monitors=[steer])
    )
    assert [e.token_index for e in result.monitor_events] == [fired]
    assert result.token_ids[: fired + 1] == free.token_ids[: fired + 1]
    start = len(result.prompt_token_ids) + fired  # position of token `fired`, the first one fed after firing

    def add_late(stream: torch.Tensor) -> torch.Tensor:
        stream = stream.clone()
        stream[start:] += vector
        return stream

    expected = hf_greedy(hf_tiny, result.prompt_token_ids, 16, {hook: add_late})
    assert result.token_ids == expected
    assert result.token_ids != free.token_ids  # the steering changed something


# ---------------------------------------------------------------------- EigenScore


def test_eigenscore_equals_the_score_of_its_sampled_continuations(tiny_client) -> None:  # noqa: ANN001
    """The K continuations are sampled with seeds seed+1..seed+K: regenerating them one by one, capturing the middle
    layer, and scoring their last rows gives the same EigenScore."""
    from interpgw.signals.eigenscore import eigenscore

    result = tiny_client.generate(
        PROMPTS[3], max_tokens=8, temperature=0.9, seed=40, ignore_eos=True, signals=Signals(eigenscore_samples=4)
    )
    embeddings = []
    for i in range(4):
        sample = tiny_client.generate(
            PROMPTS[3],
            max_tokens=8,
            temperature=0.9,
            seed=41 + i,
            ignore_eos=True,
            capture="blocks.2.hook_resid_post",
            positions=[-1],
            capture_generated=True,
        )
        embeddings.append(torch.as_tensor(sample.activations["blocks.2.hook_resid_post"][-1]).float())
    assert result.scores["eigenscore"] == pytest.approx(eigenscore(torch.stack(embeddings)), rel=1e-4, abs=1e-4)
    again = tiny_client.generate(
        PROMPTS[3], max_tokens=8, temperature=0.9, seed=40, ignore_eos=True, signals=Signals(eigenscore_samples=4)
    )
    assert again.scores["eigenscore"] == pytest.approx(result.scores["eigenscore"], rel=1e-5)


# ---------------------------------------------------------------------- bad input and faults


def test_bad_signal_requests_get_clear_errors(tiny_client) -> None:  # noqa: ANN001
    """Raw SignalRequest messages, past the SDK's own checks: the server names what is valid."""
    from interpgw.v1 import gateway_pb2 as pb

    def monitor(**fields) -> pb.Monitor:  # noqa: ANN003
        return pb.Monitor(**{"signal": "entropy", "op": pb.Monitor.GT, "threshold": 1.0, **fields})

    cases = [
        (pb.SignalRequest(lens_layers=[4]), InvalidArgumentError, r"lens layer 4 out of range.*valid \[-4, 3\]"),
        (pb.SignalRequest(monitors=[monitor(signal="confidence")]), InvalidArgumentError, "unknown monitor signal"),
        (pb.SignalRequest(monitors=[monitor(signal="lens_kl:x")]), InvalidArgumentError, "not an integer"),
        (pb.SignalRequest(monitors=[monitor(signal="lens_earliest")]), InvalidArgumentError, "needs lens_layers"),
        (pb.SignalRequest(monitors=[monitor(threshold=float("nan"))]), InvalidArgumentError, "finite"),
        (pb.SignalRequest(monitors=[monitor(op=7)]), InvalidArgumentError, "unknown monitor op 7"),
        (pb.SignalRequest(monitors=[monitor(action=pb.Monitor.STEER)]), InvalidArgumentError, "needs at least one"),
        (pb.SignalRequest(monitors=[monitor(window=5000)]), InvalidArgumentError, "window"),
        (pb.SignalRequest(monitors=[monitor()] * 17), InvalidArgumentError, "at most 16"),
        (pb.SignalRequest(eigenscore_samples=1), InvalidArgumentError, r"eigenscore_samples must be 0 \(off\)"),
        (pb.SignalRequest(probes=["prb_unknown"]), NotFoundError, "no probe"),
    ]
    for signals, error, message in cases:
        with pytest.raises(error, match=message):
            tiny_client.generate("Hello", max_tokens=2, signals=signals)
    assert len(tiny_client.generate("Hello", max_tokens=3, temperature=0.0, signals=True).signals) == 3


def test_a_failing_signal_computation_fails_only_its_request(default_gateway) -> None:  # noqa: ANN001
    """Fault injection (enabled on this test server only) raises inside one request's signal computation."""
    from interpgw.transport.servicer import FAULT_METADATA

    async def run() -> list:
        async with AsyncClient(default_gateway.address, timeout=300) as client:
            others = [
                client.generate(p, max_tokens=8, temperature=0.0, ignore_eos=True, signals=True) for p in PROMPTS[:4]
            ]
            faulty = client.generate(
                PROMPTS[4], max_tokens=8, temperature=0.0, signals=True, metadata=[(FAULT_METADATA, "signals")]
            )
            return await asyncio.gather(faulty, *others, return_exceptions=True)

    faulty, *others = asyncio.run(run())
    assert isinstance(faulty, InternalError) and "token signals failed" in str(faulty)
    assert all(len(r.signals) == 8 for r in others)


def test_cli_probe_commands_and_generate_with_signals(tiny_gateway, tmp_path, truth_rows) -> None:  # noqa: ANN001
    data = tmp_path / "statements.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in truth_rows[:40]) + "\n")
    trained = run_cli(tiny_gateway.address, "probe", "train", "--file", str(data), "--layer", "2", "--name", "cli")
    assert trained.returncode == 0, trained.stderr
    probe_id = trained.stdout.split()[0]
    assert probe_id.startswith("prb_")
    listed = run_cli(tiny_gateway.address, "probe", "list")
    assert probe_id in listed.stdout and "blocks.2.hook_resid_post" in listed.stdout
    out = run_cli(
        tiny_gateway.address,
        "generate",
        "Hello",
        "--max-tokens",
        "3",
        "--temperature",
        "0",
        "--lens",
        "1",
        "--probe",
        probe_id,
    )
    assert out.returncode == 0, out.stderr
    assert "entropy" in out.stdout and probe_id in out.stdout, out.stdout
    assert run_cli(tiny_gateway.address, "probe", "delete", probe_id).returncode == 0
    missing = run_cli(tiny_gateway.address, "probe", "get", probe_id)
    assert missing.returncode == 1 and "no probe" in missing.stderr
