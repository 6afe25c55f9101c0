"""Client SDK signals, monitors and probes without a server: request builders and response assembly."""

from __future__ import annotations

import asyncio
import re
from datetime import UTC, datetime

import numpy as np
import pytest
from fake_stubs import AsyncStub

from interpgw.v1 import gateway_pb2 as pb
from interpgw_client import AsyncClient, Client, Intervention, Monitor, Probe, Signals, TokenSignals, cli
from interpgw_client import protocol as P
from interpgw_client.signals import MonitorEvent, build_signals, build_train_probe

HOOK = "blocks.6.hook_resid_post"


def generate_request(**kwargs) -> pb.GenerateRequest:  # noqa: ANN003
    defaults = dict(
        model="",
        max_tokens=8,
        temperature=None,
        top_p=None,
        top_k=0,
        seed=None,
        stop=None,
        ignore_eos=False,
        capture=None,
        positions="all",
        capture_generated=False,
        capture_dtype="",
        add_generation_prompt=True,
    )
    return P.build_generate("Hi", **(defaults | kwargs))


# ---------------------------------------------------------------------- requests


def test_build_signals_forms() -> None:
    assert build_signals(None) is None and build_signals(False) is None
    only = build_signals(True)
    assert only is not None and only.distribution and not only.lens_layers and not only.monitors
    assert not only.HasField("eigenscore_layer")
    msg = build_signals(
        {
            "distribution": False,
            "lens_layers": [10, -1],
            "probes": "prb_1",
            "monitors": [{"signal": "probe:prb_1", "op": ">=", "threshold": 0.8, "action": "stop"}],
            "eigenscore_samples": 4,
            "eigenscore_layer": 6,
        }
    )
    assert msg is not None and not msg.distribution and list(msg.lens_layers) == [10, -1]
    assert list(msg.probes) == ["prb_1"] and msg.eigenscore_samples == 4 and msg.eigenscore_layer == 6
    monitor = msg.monitors[0]
    assert (monitor.signal, monitor.op, monitor.threshold, monitor.action) == (
        "probe:prb_1",
        pb.Monitor.GE,
        pytest.approx(0.8),
        pb.Monitor.STOP,
    )
    same = build_signals(Signals(distribution=False, lens_layers=[10, -1], probes=["prb_1"]))
    assert same is not None and list(same.lens_layers) == [10, -1] and not same.monitors
    passthrough = pb.SignalRequest(distribution=True)
    assert build_signals(passthrough) is passthrough

    request = generate_request(signals=Signals(lens_layers=[3]))
    assert request.HasField("signals") and list(request.signals.lens_layers) == [3] and request.signals.distribution
    assert not generate_request().HasField("signals")


@pytest.mark.parametrize(
    ("signals", "error", "fragment"),
    [
        ({"distribution": True, "lens": [1]}, ValueError, "unknown keys \\['lens'\\]"),
        ("entropy", TypeError, "Signals, a dict"),
        ({"eigenscore_samples": 1}, ValueError, "0 \\(off\\) or >= 2"),
        ({"eigenscore_layer": 3}, ValueError, "needs eigenscore_samples"),
        ({"lens_layers": [1.5]}, ValueError, "lens_layers"),
        ({"probes": [""]}, ValueError, "probe ids"),
        ({"monitors": [{"signal": "lens_earliest", "op": "<", "threshold": 0}]}, ValueError, "needs lens_layers"),
        ({"monitors": [{"signal": "entropy", "op": ">", "threshold": 1, "when": 2}]}, ValueError, "unknown keys"),
        ({"monitors": ["entropy > 1"]}, TypeError, "a Monitor or a dict"),
    ],
)
def test_build_signals_errors(signals: object, error: type[Exception], fragment: str) -> None:
    with pytest.raises(error, match=fragment):
        build_signals(signals)  # type: ignore[arg-type]


def test_monitor_to_proto() -> None:
    msg = Monitor("entropy", "<", 0.5, window=4, reduce="mean", name="calm").to_proto()
    assert (msg.name, msg.signal, msg.op, msg.window, msg.reduce, msg.action) == (
        "calm",
        "entropy",
        pb.Monitor.LT,
        4,
        pb.Monitor.MEAN,
        pb.Monitor.FLAG,
    )
    assert not msg.interventions
    ops = {"<": pb.Monitor.LT, "<=": pb.Monitor.LE, ">": pb.Monitor.GT, ">=": pb.Monitor.GE}
    for op, code in ops.items():
        assert Monitor("lens_kl:-2", op, 1.0).to_proto().op == code
    steer = Monitor("probe:p", ">", 0.9, action="steer", steer={"vector": "vec_1", "scale": -4.0}).to_proto()
    assert steer.action == pb.Monitor.STEER and steer.interventions[0].vector_id == "vec_1"
    assert steer.interventions[0].op == pb.Intervention.ADD and steer.interventions[0].scale == -4.0
    both = Monitor(
        "margin", "<=", 0.1, action="STEER", interventions=[Intervention("zero", HOOK)], steer="vec_2"
    ).to_proto()
    assert [i.op for i in both.interventions] == [pb.Intervention.ZERO, pb.Intervention.ADD]


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"op": "=="}, "op must be one of \\['<', '<=', '>', '>='\\]"),
        ({"op": "lt"}, "op must be one of"),
        ({"reduce": "max"}, "reduce must be one of \\['all', 'mean'\\]"),
        ({"action": "abort"}, "action must be one of \\['flag', 'stop', 'steer'\\]"),
        ({"action": "steer"}, "needs interventions= or steer="),
        ({"steer": "vec_1"}, "only used by action 'steer'"),
        ({"window": -1}, "window"),
        ({"threshold": float("nan")}, "finite"),
        ({"signal": "perplexity"}, "unknown signal 'perplexity'; valid: entropy, logprob"),
        ({"signal": "lens_kl:x"}, "not an integer"),
        ({"signal": "probe:"}, "unknown signal"),
    ],
)
def test_monitor_validation(kwargs: dict, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        Monitor(**({"signal": "entropy", "op": ">", "threshold": 2.0} | kwargs))


def test_monitor_steer_interventions_are_validated_when_built() -> None:
    monitor = Monitor("entropy", ">", 2.0, action="steer", interventions=[{"op": "explode", "hook": HOOK}])
    with pytest.raises(ValueError, match="intervention op must be one of"):
        build_signals(Signals(monitors=[monitor]))


def test_trace_request_probes() -> None:
    def trace(**kwargs) -> pb.TraceRequest:  # noqa: ANN003
        return P.build_trace(
            "a", model="", hooks=HOOK, positions="all", dtype="", top_k=0, add_generation_prompt=True, **kwargs
        )

    assert list(trace(probes=["p1", "p2"]).probes) == ["p1", "p2"]
    assert list(trace(probes="p1").probes) == ["p1"] and not trace().probes
    with pytest.raises(ValueError, match="probe ids"):
        trace(probes=[3])


# ---------------------------------------------------------------------- probes


def test_build_train_probe_tuples_and_dicts() -> None:
    examples = [
        ("Paris is in France.", True),
        {"statement": "Paris is in Spain.", "label": False, "source": "ignored"},
        {"text": "Rome is in Italy.", "label": 1},
        {"prompt": [{"role": "user", "content": "Is 2+2=5?"}], "label": np.bool_(False)},
        ([1, 2, 3], 0),
    ]
    msg = build_train_probe(examples, layer=12, position="mean", test_fraction=0.3, seed=7, l2=0.5, name="truth")
    assert msg.hook == "blocks.12.hook_resid_post" and msg.position == pb.TrainProbeRequest.MEAN
    assert [e.label for e in msg.examples] == [True, False, True, False, False]
    assert msg.examples[0].prompt.text == "Paris is in France." and msg.examples[1].prompt.text == "Paris is in Spain."
    assert not msg.examples[3].prompt.chat.add_generation_prompt  # plain statements by default
    assert list(msg.examples[4].prompt.tokens.ids) == [1, 2, 3]
    assert (msg.test_fraction, msg.seed, msg.name) == (pytest.approx(0.3), 7, "truth") and msg.l2 == 0.5
    default = build_train_probe(examples[:2])
    assert default.hook == "" and default.position == pb.TrainProbeRequest.LAST and not default.HasField("l2")
    assert build_train_probe(examples[:2], hook=HOOK).hook == HOOK
    chat = build_train_probe(examples[3:4] + examples[:1], add_generation_prompt=True)
    assert chat.examples[0].prompt.chat.add_generation_prompt


@pytest.mark.parametrize(
    ("examples", "kwargs", "fragment"),
    [
        ([("a", True), ("b", False)], {"hook": HOOK, "layer": 3}, "not both"),
        ([("a", True), ("b", False)], {"position": "first"}, "position must be one of \\['last', 'mean'\\]"),
        ([("a", True), ("b", False)], {"test_fraction": 1.0}, "test_fraction"),
        ([("a", True), ("b", False)], {"l2": -1.0}, "l2"),
        ([("a", True), ("b", True)], {}, "both labels"),
        ([], {}, "both labels"),
        ([("a", True), ("b", 2)], {}, "example 1: a label is a bool"),
        ([("a", True), {"statement": "b", "text": "c", "label": 0}], {}, "example 1: a dict example"),
        ([("a", True), {"statement": "b"}], {}, "example 1"),
        ([("a", True), ("b", False, "c")], {}, "example 1: an example is"),
    ],
)
def test_build_train_probe_errors(examples: list, kwargs: dict, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        build_train_probe(examples, **kwargs)


def probe_message(with_weight: bool = True) -> pb.Probe:
    msg = pb.Probe(
        id="prb_1",
        model="m",
        name="truth",
        description="d",
        hook=HOOK,
        d_model=4,
        bias=-0.5,
        position="last",
        train_auroc=0.99,
        test_auroc=0.9,
        test_accuracy=0.85,
        n_train=24,
        n_test=8,
        quantiles=[i / 100 for i in range(101)],
    )
    msg.created.FromDatetime(datetime(2026, 1, 2, 3, 4, 5, 500000, tzinfo=UTC))
    if with_weight:
        msg.weight.CopyFrom(P.encode_tensor(np.arange(4, dtype=np.float64)))
    return msg


def test_probe_from_proto_with_and_without_weight() -> None:
    probe = Probe.from_proto(probe_message())
    assert (probe.id, probe.model, probe.name, probe.hook, probe.d_model, probe.position) == (
        "prb_1",
        "m",
        "truth",
        HOOK,
        4,
        "last",
    )
    assert probe.weight is not None and probe.weight.dtype == np.float32
    np.testing.assert_array_equal(probe.weight, np.arange(4, dtype=np.float32))
    assert probe.bias == -0.5 and probe.test_auroc == pytest.approx(0.9) and (probe.n_train, probe.n_test) == (24, 8)
    assert len(probe.quantiles) == 101
    assert probe.created == pytest.approx(datetime(2026, 1, 2, 3, 4, 5, 500000, tzinfo=UTC).timestamp())
    listed = Probe.from_proto(probe_message(with_weight=False))
    assert listed.weight is None and listed.id == "prb_1"
    bare = pb.Probe(id="x")
    assert Probe.from_proto(bare).created is None


# ---------------------------------------------------------------------- responses


def token_signals(index: int, token_id: int, entropy: float, *, lens: bool = True) -> pb.TokenSignals:
    msg = pb.TokenSignals(index=index, token_id=token_id, entropy=entropy, logprob=-entropy, rank=1, margin=0.5)
    if lens:
        msg.lens_layers.extend([2, 5])
        msg.lens_kl.extend([1.5, 0.25])
        msg.lens_top1.extend([7, token_id])
        msg.lens_earliest = 5
        msg.probe_ids.append("prb_1")
        msg.probe_scores.append(0.75)
        msg.probe_quantiles.append(0.6)
    return msg


def test_token_signals_values() -> None:
    item = TokenSignals.from_proto(token_signals(3, 42, 1.25))
    assert (item.index, item.token_id, item.rank, item.lens_earliest, item.lens_top1) == (3, 42, 1, 5, [7, 42])
    assert item.values() == {
        "entropy": 1.25,
        "logprob": -1.25,
        "rank": 1.0,
        "margin": 0.5,
        "lens_earliest": 5.0,
        "lens_kl:2": 1.5,
        "lens_kl:5": 0.25,
        "probe:prb_1": 0.75,
    }
    assert item.probe_quantiles == [pytest.approx(0.6)]
    sparse = TokenSignals.from_proto(pb.TokenSignals(index=0, token_id=9, entropy=0.0, lens_earliest=-1))
    assert sparse.logprob is None and sparse.rank is None and sparse.margin is None
    assert sparse.values() == {"entropy": 0.0, "lens_earliest": -1.0}  # unset optional fields are absent
    assert TokenSignals.from_proto(pb.TokenSignals(index=1)).values() == {}


def token(
    variant: int, index: int, ids: list[int], text: str, signals: list, events: tuple = ()
) -> pb.GenerateResponse:
    return pb.GenerateResponse(
        token=pb.TokenEvent(index=index, token_ids=ids, text=text, variant=variant, signals=signals, events=events)
    )


def fired(variant: int, index: int, action: int = pb.Monitor.FLAG) -> pb.MonitorEvent:
    return pb.MonitorEvent(
        monitor="hot", token_index=index, signal="entropy", value=2.5, action=action, variant=variant
    )


def done(variant: int, ids: list[int], text: str, reason: str, scores: dict, events: tuple = ()) -> pb.GenerateResponse:
    return pb.GenerateResponse(
        done=pb.GenerateDone(
            finish_reason=reason,
            prompt_token_ids=[1, 2],
            output_token_ids=ids,
            text=text,
            variant=variant,
            scores=scores,
            monitor_events=events,
        )
    )


def signal_stream() -> list[pb.GenerateResponse]:
    """Steered variant 0: a two-token text delta, a stop monitor on token 2; baseline 1: one flag, no final list."""
    return [
        token(0, 0, [10], "The", [token_signals(0, 10, 0.5)]),
        token(1, 0, [20], "A", [token_signals(0, 20, 0.1, lens=False)]),
        token(0, 1, [11, 12], " moon", [token_signals(1, 11, 1.0), token_signals(2, 12, 2.5)], (fired(0, 2, 1),)),
        token(1, 1, [21], "!", [token_signals(1, 21, 3.0, lens=False)], (fired(1, 1),)),
        done(1, [20, 21], "A!", "length", {"entropy.mean": 1.55}),
        done(0, [10, 11, 12], "The moon", "monitor", {"entropy.mean": 4 / 3, "perplexity": 3.0}, (fired(0, 2, 1),)),
    ]


def assemble() -> P.GenerateResult:
    assembler = P.GenerateAssembler(pb.GenerateRequest(compare_unsteered=True), as_torch=False)
    events = [e for e in map(assembler.add, signal_stream()) if e is not None]
    assert [(e.variant, e.index, len(e.signals), len(e.events)) for e in events] == [
        (0, 0, 1, 0),
        (1, 0, 1, 0),
        (0, 1, 2, 1),
        (1, 1, 1, 1),
    ]
    assert events[2].signals[1].entropy == 2.5 and events[2].events[0].action == "stop"
    result = assembler.result()
    assert result is not None
    return result


def test_generate_assembler_collects_signals_per_variant() -> None:
    result = assemble()
    assert result.finish_reason == "monitor" and result.tokens == ["The", " moon", ""]
    assert [s.index for s in result.signals] == [0, 1, 2] and [s.token_id for s in result.signals] == [10, 11, 12]
    assert result.scores == {"entropy.mean": pytest.approx(4 / 3), "perplexity": 3.0}
    assert result.monitor_events == [MonitorEvent("hot", 2, "entropy", 2.5, "stop", 0)]
    assert result.signal_values("probe:prb_1") == [0.75, 0.75, 0.75]
    baseline = result.baseline
    assert baseline is not None and baseline.tokens == ["A", "!"] and baseline.finish_reason == "length"
    assert [s.token_id for s in baseline.signals] == [20, 21] and baseline.scores == {
        "entropy.mean": pytest.approx(1.55)
    }
    # no list in the baseline's final message: the streamed events stand in
    assert baseline.monitor_events == [MonitorEvent("hot", 1, "entropy", 2.5, "flag", 1)]
    assert baseline.signal_values("lens_kl:2") == [None, None]


def test_tokens_from_events_without_signals() -> None:
    assembler = P.GenerateAssembler(pb.GenerateRequest(), as_torch=False)
    for message in (token(0, 0, [5, 6, 7], "abc", []), token(0, 3, [], "d", []), token(0, 3, [8], "e", [])):
        assembler.add(message)
    assembler.add(done(0, [5, 6, 7, 8], "abcde", "length", {}))
    result = assembler.result()
    assert result is not None and result.tokens == ["abc", "", "d", "e"]  # a text-only delta joins the last token
    assert result.signals == [] and result.scores == {} and result.monitor_events == []
    assert result.signal_values("entropy") == [None] * 4


_SPAN = re.compile(r'<span data-i="(\d+)" title="([^"]*)" style="([^"]*)">(.*?)</span>', re.S)


def test_render_html_on_a_result() -> None:
    result = assemble()
    spans = _SPAN.findall(result.render_html())
    assert [text for _, _, _, text in spans] == ["The", " moon", ""]
    assert [title for _, title, _, _ in spans] == ["entropy: 0.500", "entropy: 1.000", "entropy: 2.500"]
    assert all("background-color" in style for _, _, style, _ in spans)
    lens = result.render_html("lens_kl:5", title="lens", cmap="blue")
    assert "lens_kl:5: 0.250" in lens and ">lens<" in lens and hasattr(lens, "_repr_html_")
    baseline = result.baseline.render_html("lens_kl:2")  # type: ignore[union-attr]
    titles = [(title, "background-color" in style) for _, title, style, _ in _SPAN.findall(baseline)]
    assert titles == [("lens_kl:2: n/a", False), ("lens_kl:2: n/a", False)]


def test_prompt_trace_probe_scores() -> None:
    msg = pb.TracePromptResult(prompt_index=0, token_ids=[1, 2, 3], captured_positions=[1, 2])
    msg.probe_scores.add(probe_id="prb_1", scores=[0.25, 0.75], pooled=0.75)
    msg.probe_scores.add(probe_id="prb_2", scores=[0.5, 0.5], pooled=0.5)
    trace = P.prompt_trace(msg)
    assert set(trace.probe_scores) == {"prb_1", "prb_2"}
    assert trace.probe_scores["prb_1"].scores == [0.25, 0.75] and trace.probe_scores["prb_1"].pooled == 0.75
    assert P.prompt_trace(pb.TracePromptResult()).probe_scores == {}


# ---------------------------------------------------------------------- client wiring, no server


class ProbeStub:
    """Records requests; answers like the gateway would."""

    def __init__(self) -> None:
        self.requests: list[object] = []

    def TrainProbe(self, request: pb.TrainProbeRequest, **_: object) -> pb.Probe:  # noqa: N802
        self.requests.append(request)
        return probe_message()

    def GetProbe(self, request: pb.GetProbeRequest, **_: object) -> pb.Probe:  # noqa: N802
        self.requests.append(request)
        return probe_message()

    def ListProbes(self, request: pb.ListProbesRequest, **_: object) -> pb.ListProbesResponse:  # noqa: N802
        self.requests.append(request)
        return pb.ListProbesResponse(probes=[probe_message(False), pb.Probe(id="prb_2")])

    def DeleteProbe(self, request: pb.DeleteProbeRequest, **_: object) -> pb.DeleteProbeResponse:  # noqa: N802
        self.requests.append(request)
        return pb.DeleteProbeResponse(deleted=request.id == "prb_1")


EXAMPLES = [("a", True), ("b", False)]


def test_client_probes_without_a_server() -> None:
    with Client("localhost:1") as client:
        client._stub = stub = ProbeStub()  # type: ignore[assignment]
        probe = client.probes.train(EXAMPLES, layer=3, name="t")
        assert probe.id == "prb_1" and probe.weight is not None and probe.weight.shape == (4,)
        request = stub.requests[-1]
        assert request.hook == "blocks.3.hook_resid_post" and request.name == "t" and len(request.examples) == 2
        assert [p.id for p in client.probes.list("m")] == ["prb_1", "prb_2"] and stub.requests[-1].model == "m"
        assert client.probes.get("prb_1").hook == HOOK
        assert client.probes.delete("prb_1") and not client.probes.delete("prb_9")

    async def run() -> None:
        async with AsyncClient("localhost:1") as client:
            client._stub = AsyncStub(ProbeStub())  # type: ignore[assignment]
            assert (await client.probes.train(EXAMPLES, position="mean")).id == "prb_1"
            assert [p.weight for p in await client.probes.list()] == [None, None]
            assert (await client.probes.get("prb_1")).d_model == 4
            assert await client.probes.delete("prb_1") and not await client.probes.delete("x")

    asyncio.run(run())


def test_cli_examples_file_and_signal_lines(tmp_path, capsys) -> None:  # noqa: ANN001
    path = tmp_path / "facts.jsonl"
    path.write_text(
        '{"statement": "a", "label": true, "x": 1}\n\n{"text": "b", "label": 0}\n{"prompt": "c", "label": 1}\n'
    )
    assert cli._read_examples(str(path)) == [
        {"prompt": "a", "label": True},
        {"prompt": "b", "label": 0},
        {"prompt": "c", "label": 1},
    ]
    path.write_text('{"statement": "a"}\n')
    with pytest.raises(ValueError, match="facts.jsonl:1"):
        cli._read_examples(str(path))
    cli._print_signals(assemble())
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("   0 'The'") and "entropy 0.500" in lines[0] and "rank 1" in lines[0]
    assert "lens_kl:2 1.500" in lines[0] and "probe:prb_1 0.750" in lines[0] and "lens_earliest 5" in lines[0]
    assert lines[2].startswith("   2 ''") and lines[3].startswith("scores: entropy.mean 1.333")
    assert lines[4] == "monitor hot: stop at token 2 (entropy 2.5)"
    with pytest.raises(SystemExit) as info:
        cli.main(["probe", "train", "--file", str(path), "--layer", "x"])
    assert info.value.code == 2
