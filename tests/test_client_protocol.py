"""Client SDK request builders and response assembly, without a server: interventions, steering, patching."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import numpy as np
import pytest
from fake_stubs import AsyncStub

from interpgw.v1 import gateway_pb2 as pb
from interpgw_client import AsyncClient, Client, Intervention, cli
from interpgw_client import protocol as P
from interpgw_client.aio import AsyncGenerateStream
from interpgw_client.client import GenerateStream
from interpgw_client.tensors import decode

HOOK = "blocks.6.hook_resid_post"
T = pb.InterventionTarget


def one(**kwargs) -> pb.Intervention:  # noqa: ANN003
    return P.build_intervention(Intervention(**kwargs))


# ---------------------------------------------------------------------- interventions


@pytest.mark.parametrize(
    ("op", "kind"),
    [
        ("add", pb.Intervention.ADD),
        ("set", pb.Intervention.SET),
        ("project_out", pb.Intervention.PROJECT_OUT),
        ("clamp", pb.Intervention.CLAMP),
        ("ADD", pb.Intervention.ADD),
    ],
)
def test_vector_ops(op: str, kind: int) -> None:
    msg = one(op=op, hook=HOOK, vector="vec_0123")
    assert msg.op == kind and msg.hook == HOOK and msg.vector_id == "vec_0123"
    assert msg.WhichOneof("vector") == "vector_id" and not msg.HasField("scale")


@pytest.mark.parametrize(
    ("op", "kind"),
    [("zero", pb.Intervention.ZERO), ("ablate", pb.Intervention.ZERO), ("scale", pb.Intervention.SCALE)],
)
def test_vectorless_ops(op: str, kind: int) -> None:
    msg = one(op=op, hook=HOOK)
    assert msg.op == kind and msg.WhichOneof("vector") is None


def test_scale_value_norm_and_mean_ablate_fields() -> None:
    msg = one(op="add", hook=HOOK, vector="v", scale=4.0, norm_preserving=True)
    assert msg.HasField("scale") and msg.scale == 4.0 and msg.norm_preserving
    assert one(op="scale", hook=HOOK, scale=0.5).scale == 0.5
    assert one(op="clamp", hook=HOOK, vector="v", value=-2.5).value == -2.5
    msg = one(op="mean_ablate", hook=HOOK, reference_prompts=["a b", [1, 2, 3]])
    assert msg.op == pb.Intervention.MEAN_ABLATE
    assert msg.reference_prompts[0].text == "a b" and list(msg.reference_prompts[1].tokens.ids) == [1, 2, 3]


def test_inline_vectors_are_float32_rows() -> None:
    for vector in (np.arange(8, dtype=np.float64), list(range(8))):
        msg = one(op="add", hook=HOOK, vector=vector)
        assert msg.WhichOneof("vector") == "tensor"
        assert msg.tensor.dtype == "float32" and list(msg.tensor.shape) == [8]
        np.testing.assert_array_equal(decode("float32", (8,), msg.tensor.data), np.arange(8, dtype=np.float32))


def test_inline_torch_vector() -> None:
    torch = pytest.importorskip("torch")
    vector = torch.linspace(-1, 1, 16, dtype=torch.bfloat16, requires_grad=False)
    msg = one(op="add", hook=HOOK, vector=vector)
    assert msg.tensor.dtype == "float32" and list(msg.tensor.shape) == [16]
    np.testing.assert_array_equal(decode("float32", (16,), msg.tensor.data), vector.float().numpy())


@pytest.mark.parametrize(
    ("positions", "mode", "indices", "n"),
    [
        ("all", T.ALL, [], 0),
        ("prompt", T.PROMPT, [], 0),
        ("generated", T.GENERATED, [], 0),
        (3, T.INDICES, [3], 0),
        (np.int64(-1), T.INDICES, [-1], 0),
        ([0, -1], T.INDICES, [0, -1], 0),
        (np.array([1, 2]), T.INDICES, [1, 2], 0),
        (("last", 4), T.LAST_N, [], 4),
        (["last", 2], T.LAST_N, [], 2),
        ("last", T.LAST_N, [], 1),
    ],
)
def test_positions(positions: P.TargetLike, mode: int, indices: list[int], n: int) -> None:
    target = one(op="zero", hook=HOOK, positions=positions).target
    assert (target.mode, list(target.indices), target.n) == (mode, indices, n)
    assert not target.HasField("window_start") and not target.HasField("window_end")


def test_window() -> None:
    target = one(op="zero", hook=HOOK, positions="generated", window=(10, 14)).target
    assert target.mode == T.GENERATED and (target.window_start, target.window_end) == (10, 14)
    target = one(op="zero", hook=HOOK, window=(None, 3)).target
    assert not target.HasField("window_start") and target.window_end == 3
    with pytest.raises(ValueError, match="start < end"):
        one(op="zero", hook=HOOK, window=(5, 5))


def test_invalid_op_names_the_valid_ones() -> None:
    with pytest.raises(ValueError, match="op must be one of") as info:
        one(op="steer", hook=HOOK)
    for op in ("add", "set", "zero", "ablate", "scale", "project_out", "clamp", "mean_ablate"):
        assert repr(op) in str(info.value)


@pytest.mark.parametrize("positions", ["middle", ("last", 0), ("last", "x"), [], [1.5], ["a", "b"], None])
def test_invalid_positions_name_the_valid_forms(positions: object) -> None:
    with pytest.raises(ValueError, match="positions") as info:
        one(op="zero", hook=HOOK, positions=positions)
    if positions != ("last", 0) and positions != ("last", "x"):
        assert all(word in str(info.value) for word in ("'all'", "'prompt'", "'generated'", "('last', n)"))


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"op": "add", "hook": HOOK}, "needs a vector"),
        ({"op": "zero", "hook": HOOK, "vector": "v"}, "takes no vector"),
        ({"op": "add", "vector": [1.0, 2.0]}, "needs a hook"),
        ({"op": "add", "hook": HOOK, "vector": np.ones((2, 4))}, "one [d_model] row"),
        ({"op": "scale"}, "needs a hook"),
        ({"op": "clamp", "hook": HOOK, "vector": "v", "scale": 2.0}, "takes no scale"),
        ({"op": "mean_ablate", "hook": HOOK}, "needs reference_prompts"),
        ({"op": "mean_ablate", "hook": HOOK, "reference_prompts": "one prompt"}, "are lists"),
        ({"op": "zero", "hook": HOOK, "reference_prompts": ["x"]}, "takes no reference_prompts"),
    ],
)
def test_invalid_interventions(kwargs: dict, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment.replace("[", r"\[")):
        P.build_intervention(kwargs)


def test_dict_and_proto_interventions() -> None:
    msg = P.build_intervention({"op": "add", "hook": HOOK, "vector": "v", "scale": 2.0, "positions": ("last", 1)})
    assert msg == one(op="add", hook=HOOK, vector="v", scale=2.0, positions=("last", 1))
    assert P.build_intervention(msg) is msg
    with pytest.raises(ValueError, match="unknown keys \\['vecto'\\]"):
        P.build_intervention({"op": "add", "vecto": "v"})
    with pytest.raises(ValueError, match="no 'op'"):
        P.build_intervention({"vector": "v"})
    with pytest.raises(TypeError):
        P.build_intervention("add")  # type: ignore[arg-type]


# ---------------------------------------------------------------------- steer shorthand


def test_steer_vector_id_adds_at_every_hook_it_holds() -> None:
    (msg,) = P.build_steer("vec_abc")
    assert msg.op == pb.Intervention.ADD and msg.vector_id == "vec_abc" and msg.hook == ""
    assert msg.HasField("scale") and msg.scale == 1.0 and msg.target.mode == T.ALL


def test_steer_dicts_and_lists() -> None:
    (msg,) = P.build_steer({"vector": "vec_abc", "scale": 4.0, "hook": HOOK, "positions": "generated"})
    assert (msg.vector_id, msg.scale, msg.hook, msg.target.mode) == ("vec_abc", 4.0, HOOK, T.GENERATED)
    inline, registry = P.build_steer([{"vector": np.ones(4), "hook": HOOK, "scale": -2.0}, "vec_x"])
    assert list(inline.tensor.shape) == [4] and inline.scale == -2.0 and registry.vector_id == "vec_x"
    assert P.build_steer(None) == [] and P.build_steer([]) == []


@pytest.mark.parametrize(
    ("steer", "error"),
    [
        ([0.1, 0.2], TypeError),
        (np.ones(4), TypeError),
        ({"vector": "v", "op": "zero"}, ValueError),
        ({"scale": 2.0}, ValueError),
        ({"vector": "v", "scal": 2.0}, ValueError),
    ],
)
def test_invalid_steer(steer: object, error: type[Exception]) -> None:
    with pytest.raises(error):
        P.build_steer(steer)  # type: ignore[arg-type]


def test_generate_and_trace_requests_carry_interventions() -> None:
    request = P.build_generate(
        "Hi",
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
        interventions=[Intervention("zero", HOOK)],
        steer="vec_abc",
        compare_unsteered=True,
    )
    assert [m.op for m in request.interventions] == [pb.Intervention.ZERO, pb.Intervention.ADD]
    assert request.compare_unsteered and request.interventions[1].vector_id == "vec_abc"
    trace = P.build_trace(
        ["a", "b"],
        model="",
        hooks=HOOK,
        positions="last",
        dtype="",
        top_k=0,
        add_generation_prompt=True,
        interventions=Intervention("project_out", HOOK, vector=[1.0, 0.0]),
    )
    assert len(trace.prompts) == 2 and trace.interventions[0].op == pb.Intervention.PROJECT_OUT
    assert not P.build_trace(
        "a", model="", hooks=None, positions="all", dtype="", top_k=0, add_generation_prompt=True
    ).interventions


# ---------------------------------------------------------------------- tensors


@pytest.mark.parametrize(
    "array",
    [
        np.arange(12, dtype=np.float32).reshape(3, 4),
        np.arange(12, dtype=np.float64).reshape(3, 4).T,  # non-contiguous, float64
        np.array(2.5),
        np.zeros((0, 4)),
        [[1, 2], [3, 4]],
    ],
)
def test_encode_tensor_round_trips_through_decode(array: object) -> None:
    wire = P.encode_tensor(array)
    expected = np.asarray(array, dtype=np.float32)
    assert wire.dtype == "float32" and list(wire.shape) == list(expected.shape)
    assert wire.data == expected.astype("<f4").tobytes()
    np.testing.assert_array_equal(decode(wire.dtype, tuple(wire.shape), wire.data), expected)
    np.testing.assert_array_equal(P.decode_tensor(wire), expected)


# ---------------------------------------------------------------------- registry requests


def test_create_vector_request() -> None:
    request = P.build_create_vector(np.ones(8), HOOK, name="n", description="d", model="m")
    assert list(request.hooks) == [HOOK] and list(request.tensor.shape) == [8] and request.name == "n"
    request = P.build_create_vector(
        np.ones((2, 8)), [HOOK, "blocks.7.hook_resid_post"], name="", description="", model=""
    )
    assert list(request.tensor.shape) == [2, 8]
    for tensor, hooks in ((np.ones((2, 8)), [HOOK]), (np.ones(8), [HOOK, HOOK]), (np.ones((1, 1, 8)), [HOOK])):
        with pytest.raises(ValueError, match="d_model"):
            P.build_create_vector(tensor, hooks, name="", description="", model="")


def train(pairs: list, **kwargs) -> pb.TrainVectorRequest:  # noqa: ANN003
    args = {"layers": None, "hooks": None, "method": "mean_diff", "reduce": "last", "name": "", "description": ""}
    return P.build_train_vector(pairs, **(args | {"model": ""} | kwargs))


def test_train_pair_forms() -> None:
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "(A"}]
    request = train([("love", "hate"), {"positive": chat, "negative": [5, 6]}])
    first, second = request.pairs
    assert (first.positive.text, first.negative.text) == ("love", "hate")
    assert second.positive.chat.messages[1].content == "(A" and second.positive.chat.add_generation_prompt
    assert list(second.negative.tokens.ids) == [5, 6]
    assert not train([["a", "b"]], add_generation_prompt=False).pairs[0].positive.HasField("chat")
    chat_pair = train([(chat, chat)], add_generation_prompt=False).pairs[0]
    assert not chat_pair.positive.chat.add_generation_prompt


def test_train_hooks_method_and_reduce() -> None:
    assert list(train([("a", "b")], layers=[6, -1]).hooks) == [HOOK, "blocks.-1.hook_resid_post"]
    assert list(train([("a", "b")], layers=3).hooks) == ["blocks.3.hook_resid_post"]
    assert list(train([("a", "b")], hooks="blocks.2.hook_mlp_out").hooks) == ["blocks.2.hook_mlp_out"]
    assert list(train([("a", "b")]).hooks) == []
    request = train([("a", "b")], method="pca", reduce="mean", name="joy", description="d", model="m")
    assert (request.method, request.reduce) == (pb.TrainVectorRequest.PCA, pb.TrainVectorRequest.MEAN)
    assert (request.name, request.description, request.model) == ("joy", "d", "m")


@pytest.mark.parametrize(
    ("pairs", "kwargs", "fragment"),
    [
        ([("a", "b")], {"method": "lda"}, "'mean_diff', 'pca'"),
        ([("a", "b")], {"reduce": "first"}, "'last', 'mean'"),
        ([("a", "b")], {"layers": [1], "hooks": [HOOK]}, "not both"),
        ([], {}, "at least one"),
        ([("a", "b", "c")], {}, "contrast pair"),
        (["ab"], {}, "contrast pair"),
        ([{"positive": "a", "neg": "b"}], {}, "'positive' and 'negative'"),
    ],
)
def test_invalid_train_requests(pairs: list, kwargs: dict, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        train(pairs, **kwargs)


# ---------------------------------------------------------------------- patching


def patch(**kwargs) -> pb.PatchRequest:  # noqa: ANN003
    args = {"foil": None, "metric": "logit_diff", "hook": "hook_resid_pre", "layers": None, "positions": "all"}
    return P.build_patch("clean", "corrupt", **(args | {"model": ""} | kwargs))


def test_patch_request() -> None:
    request = patch(target=" Paris", foil=1234, layers=[0, -1], positions=[-1])
    assert (request.clean.text, request.corrupted.text, request.hook) == ("clean", "corrupt", "hook_resid_pre")
    assert request.metric.kind == pb.PatchMetric.LOGIT_DIFF
    assert request.metric.target_text == " Paris" and request.metric.foil_id == 1234
    assert list(request.layers) == [0, -1] and list(request.positions.indices) == [-1]
    request = patch(target=7, metric="prob", layers=2, hook="hook_attn_out")
    assert request.metric.kind == pb.PatchMetric.PROB and request.metric.target_id == 7
    assert request.metric.WhichOneof("foil") is None and list(request.layers) == [2]
    assert request.positions.mode == pb.PositionSelector.ALL and request.hook == "hook_attn_out"


def test_invalid_patch_requests() -> None:
    with pytest.raises(ValueError, match="needs a foil"):
        patch(target=" Paris")
    with pytest.raises(ValueError, match="'logit_diff', 'prob'"):
        patch(target=1, foil=2, metric="kl")
    with pytest.raises(TypeError, match="target"):
        patch(target=1.5, foil=2)


# ---------------------------------------------------------------------- responses


def chunks(variant: int, hook: str, array: np.ndarray, pieces: int) -> list[pb.GenerateResponse]:
    data = array.astype("<f4").tobytes()
    step = -(-len(data) // pieces)
    return [
        pb.GenerateResponse(
            tensor=pb.TensorChunk(
                prompt_index=variant,
                hook=hook,
                dtype="float32",
                shape=list(array.shape),
                offset=offset,
                total_bytes=len(data),
                data=data[offset : offset + step],
            )
        )
        for offset in range(0, len(data), step)
    ]


def token(variant: int, index: int, ids: list[int], text: str) -> pb.GenerateResponse:
    return pb.GenerateResponse(token=pb.TokenEvent(index=index, token_ids=ids, text=text, variant=variant))


def done(variant: int, ids: list[int], text: str, seed: int = 0) -> pb.GenerateResponse:
    return pb.GenerateResponse(
        done=pb.GenerateDone(
            finish_reason="length",
            prompt_token_ids=[1, 2],
            output_token_ids=ids,
            text=text,
            captured_positions=[0, 1, 2] if variant == 0 else [0, 1],
            variant=variant,
            seed=seed,
        )
    )


STEERED = np.arange(12, dtype=np.float32).reshape(3, 4)
BASELINE = -np.arange(8, dtype=np.float32).reshape(2, 4)


def two_variant_stream() -> list[pb.GenerateResponse]:
    """Interleaved like the server may send them: the baseline finishes first."""
    return [
        token(0, 0, [10], "A"),
        token(1, 0, [20], "X"),
        token(0, 1, [11, 12], "BC"),
        *chunks(1, HOOK, BASELINE, 1),
        done(1, [20], "X", seed=99),
        *chunks(0, HOOK, STEERED, 3),
        done(0, [10, 11, 12], "ABC", seed=99),
    ]


def compare_request(seed: int | None = None) -> pb.GenerateRequest:
    request = pb.GenerateRequest(compare_unsteered=True)
    if seed is not None:
        request.sampling.seed = seed
    return request


def test_generate_result_with_baseline() -> None:
    assembler = P.GenerateAssembler(compare_request(), as_torch=False)
    events = [e for e in map(assembler.add, two_variant_stream()) if e is not None]
    assert [(e.variant, e.index, e.text) for e in events] == [(0, 0, "A"), (1, 0, "X"), (0, 1, "BC")]
    result = assembler.result()
    assert result is not None and result.text == "ABC" and result.token_ids == [10, 11, 12] and result.seed == 99
    np.testing.assert_array_equal(result.activations[HOOK], STEERED)
    assert result.positions == [0, 1, 2]
    baseline = result.baseline
    assert baseline is not None and baseline.text == "X" and baseline.token_ids == [20] and baseline.seed == 99
    np.testing.assert_array_equal(baseline.activations[HOOK], BASELINE)
    assert baseline.positions == [0, 1] and baseline.baseline is None


def test_generate_result_single_variant_and_seed() -> None:
    assembler = P.GenerateAssembler(pb.GenerateRequest(), as_torch=False)
    assert assembler.result() is None
    assembler.add(done(0, [5], "x"))
    result = assembler.result()
    assert result is not None and result.baseline is None and result.seed is None and result.activations == {}
    seeded = P.GenerateAssembler(compare_request(seed=0), as_torch=False)
    seeded.add(done(0, [5], "x", seed=0))
    assert seeded.result().seed == 0  # type: ignore[union-attr]


def test_generate_streams_fill_result_and_baseline() -> None:
    stream = GenerateStream(iter(two_variant_stream()), P.GenerateAssembler(compare_request(), as_torch=False))
    assert [e.variant for e in stream] == [0, 1, 0]
    assert stream.result is not None and stream.result.baseline is not None
    np.testing.assert_array_equal(stream.result.baseline.activations[HOOK], BASELINE)

    class Call:
        def __init__(self, messages: list[pb.GenerateResponse]) -> None:
            self._messages = iter(messages)

        def __aiter__(self) -> Call:
            return self

        async def __anext__(self) -> pb.GenerateResponse:
            try:
                return next(self._messages)
            except StopIteration:
                raise StopAsyncIteration from None

    async def collect() -> P.GenerateResult:
        assembler = P.GenerateAssembler(compare_request(), as_torch=False)
        return await AsyncGenerateStream(Call(two_variant_stream()), assembler).collect()  # type: ignore[arg-type]

    result = asyncio.run(collect())
    assert result.text == "ABC" and result.baseline is not None and result.baseline.text == "X"


def test_steering_vector_from_proto() -> None:
    created = datetime(2026, 1, 2, 3, 4, 5, 600000, tzinfo=UTC)
    msg = pb.SteeringVector(
        id="vec_1",
        model="m",
        d_model=4,
        hooks=[HOOK, "blocks.7.hook_resid_post"],
        tensor=P.encode_tensor(STEERED[:2]),
        method="mean_diff",
        n_pairs=16,
        name="joy",
        description="d",
        separation=[0.75, 1.0],
    )
    msg.created.FromDatetime(created)
    vector = P.SteeringVector.from_proto(msg)
    assert (vector.id, vector.model, vector.d_model, vector.method, vector.n_pairs) == (
        "vec_1",
        "m",
        4,
        "mean_diff",
        16,
    )
    assert vector.hooks == [HOOK, "blocks.7.hook_resid_post"] and vector.separation == [0.75, 1.0]
    assert vector.created == created and vector.created.tzinfo is not None
    np.testing.assert_array_equal(vector.vector, STEERED[:2])
    msg.ClearField("tensor")
    msg.ClearField("created")
    listed = P.SteeringVector.from_proto(msg)
    assert listed.vector is None and listed.created is None


def test_patch_result_from_proto() -> None:
    metric = np.array([[1.0, 2.0], [3.0, 4.0]], dtype=np.float32)
    restored = np.array([[0.0, np.nan], [0.5, 1.0]], dtype=np.float32)
    msg = pb.PatchResponse(
        layers=[0, 1],
        positions=[3, 4],
        tokens=["a", "b", "c", "d", "e"],
        metric=P.encode_tensor(metric),
        restored=P.encode_tensor(restored),
        clean_metric=4.0,
        corrupted_metric=1.0,
        target_id=7,
        foil_id=9,
    )
    result = P.PatchResult.from_proto(msg)
    assert (result.layers, result.positions, result.target_id, result.foil_id) == ([0, 1], [3, 4], 7, 9)
    assert (result.clean_metric, result.corrupted_metric) == (4.0, 1.0) and len(result.tokens) == 5
    np.testing.assert_array_equal(result.metric, metric)
    np.testing.assert_array_equal(result.restored, restored)


# ---------------------------------------------------------------------- client wiring, no server


class FakeStub:
    """Records requests; answers like the gateway would."""

    def __init__(self) -> None:
        self.requests: list[object] = []

    def _vector(self, request: object, **_: object) -> pb.SteeringVector:
        self.requests.append(request)
        return pb.SteeringVector(id="vec_1", hooks=[HOOK], d_model=4, tensor=P.encode_tensor(np.ones((1, 4))))

    CreateVector = TrainVector = GetVector = _vector

    def ListVectors(self, request: pb.ListVectorsRequest, **_: object) -> pb.ListVectorsResponse:  # noqa: N802
        self.requests.append(request)
        return pb.ListVectorsResponse(vectors=[pb.SteeringVector(id="vec_1"), pb.SteeringVector(id="vec_2")])

    def DeleteVector(self, request: pb.DeleteVectorRequest, **_: object) -> pb.DeleteVectorResponse:  # noqa: N802
        self.requests.append(request)
        return pb.DeleteVectorResponse(deleted=request.id == "vec_1")

    def Patch(self, request: pb.PatchRequest, **_: object) -> pb.PatchResponse:  # noqa: N802
        self.requests.append(request)
        cells = P.encode_tensor(np.zeros((1, 1)))
        return pb.PatchResponse(layers=[0], positions=[0], metric=cells, restored=cells, target_id=3)


def test_client_steering_and_patch_without_a_server() -> None:
    with Client("localhost:1") as client:
        client._stub = stub = FakeStub()  # type: ignore[assignment]
        vector = client.steering.train([("a", "b")], layers=[6], method="pca")
        assert vector.id == "vec_1" and vector.vector.shape == (1, 4)
        assert stub.requests[-1].method == pb.TrainVectorRequest.PCA and list(stub.requests[-1].hooks) == [HOOK]
        assert client.steering.create(np.ones(4), HOOK, name="n").id == "vec_1"
        assert [v.id for v in client.steering.list("m")] == ["vec_1", "vec_2"] and stub.requests[-1].model == "m"
        assert client.steering.get("vec_1").hooks == [HOOK]
        assert client.steering.delete("vec_1") and not client.steering.delete("vec_9")
        assert client.patch("a", "b", target=3, metric="prob").target_id == 3

    async def run() -> None:
        async with AsyncClient("localhost:1") as client:
            client._stub = AsyncStub(FakeStub())  # type: ignore[assignment]
            assert (await client.steering.train([{"positive": "a", "negative": "b"}])).id == "vec_1"
            assert [v.id for v in await client.steering.list()] == ["vec_1", "vec_2"]
            assert await client.steering.delete("vec_1") and (await client.steering.get("x")).d_model == 4
            assert (await client.patch("a", "b", target=" x", foil=" y")).target_id == 3

    asyncio.run(run())


def test_cli_pairs_file_and_compare_needs_steer(tmp_path, capsys) -> None:  # noqa: ANN001
    path = tmp_path / "pairs.jsonl"
    path.write_text('{"positive": "good", "negative": "bad", "label": 1}\n\n{"positive": [1, 2], "negative": [3, 4]}\n')
    assert cli._read_pairs(str(path)) == [
        {"positive": "good", "negative": "bad"},
        {"positive": [1, 2], "negative": [3, 4]},
    ]
    path.write_text('{"positive": "good"}\n')
    with pytest.raises(ValueError, match="pairs.jsonl:1"):
        cli._read_pairs(str(path))
    with pytest.raises(SystemExit) as info:
        cli.main(["generate", "Hi", "--compare", "--address", "localhost:1"])
    assert info.value.code == 1 and "--compare needs --steer" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        cli.main(["steer", "train", "--pairs", str(path), "--layers", "6,x"])
    assert info.value.code == 2


def _chunks(array: np.ndarray, hook: str, size: int) -> list[pb.TensorChunk]:
    raw = array.tobytes()
    return [
        pb.TensorChunk(
            hook=hook,
            dtype=str(array.dtype),
            shape=list(array.shape),
            offset=offset,
            total_bytes=len(raw),
            data=raw[offset : offset + size],
        )
        for offset in range(0, len(raw), size)
    ]


def test_tensor_assembler_joins_chunks_in_any_order_and_refuses_missing_bytes() -> None:
    rng = np.random.default_rng(0)
    a = rng.standard_normal((7, 5)).astype(np.float32)
    b = rng.standard_normal((3, 4)).astype(np.float32)
    in_order, shuffled = _chunks(a, "a", 24), _chunks(b, "b", 10)
    assembler = P.TensorAssembler(as_torch=False)
    for chunk in [*in_order, *reversed(shuffled)]:
        assembler.add(chunk)
    tensors = assembler.tensors(0)
    assert np.array_equal(tensors["a"], a) and np.array_equal(tensors["b"], b)
    tensors["a"][0, 0] = 1.0  # the arrays own writable memory

    short = P.TensorAssembler(as_torch=False)
    for chunk in in_order[:-1]:
        short.add(chunk)
    with pytest.raises(ValueError, match="received 120 of 140 bytes"):
        short.tensors(0)

    overflowing = P.TensorAssembler(as_torch=False)
    last = in_order[-1]
    last.offset += 4  # would end past the tensor's 140 bytes
    with pytest.raises(ValueError, match="a chunk ends at byte 144 of a 140-byte tensor"):
        overflowing.add(last)


def test_tensor_assembler_large_tensors_intact_in_shared_blocks() -> None:
    """Tensors big enough to share the SDK's huge-page blocks come out exact, writable and independent."""
    rng = np.random.default_rng(1)
    arrays = {f"h{i}": rng.standard_normal((512, 160)).astype(np.float32) for i in range(12)}  # 320 KiB each
    assembler = P.TensorAssembler(as_torch=False)
    for hook, array in arrays.items():
        for chunk in _chunks(array, hook, 100_000):
            assembler.add(chunk)
    tensors = assembler.tensors(0)
    for hook, array in arrays.items():
        assert np.array_equal(tensors[hook], array)
    tensors["h3"][:] = 0.0  # writable, and no other tensor changes
    assert all(np.array_equal(tensors[h], a) for h, a in arrays.items() if h != "h3")
