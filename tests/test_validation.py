"""Request validation found wanting by the fuzz test (tests/test_fuzz.py), each fixed case pinned here without an
engine: every bad value is INVALID_ARGUMENT (or NOT_FOUND) with a short message that names what is valid, never a
stray ValueError (INTERNAL), a message too long for gRPC's trailers, or an edit that overflows the model's numbers."""

from __future__ import annotations

import asyncio
import re

import pytest
import torch

from interpgw.config import LimitsConfig
from interpgw.core.capture import HookOrder
from interpgw.core.errors import InvalidArgument, NotFound
from interpgw.core.hookpoints import parse_hook
from interpgw.core.interventions import (
    MAX_EDIT_GAIN,
    MAX_VECTOR_ABS,
    EditOp,
    EditOrder,
    InterventionSpec,
    check_edit_gain,
    check_vector,
    edit_gain,
)
from interpgw.core.positions import RowFilter
from interpgw.core.prompts import PromptEncoder, max_token_chars
from interpgw.core.requests import (
    CaptureOptions,
    ChatTurn,
    GenerateInput,
    MonitorInput,
    PromptInput,
    SamplingInput,
    SignalsInput,
    TraceInput,
    quoted,
)
from interpgw.engine.base import ModelFacts
from interpgw.registry.records import VectorRecord
from interpgw.registry.store import MemoryVectorStore
from interpgw.signals.orders import Action, Comparison, MonitorRule, SignalOrder
from interpgw.signals.resolve import resolve_signals
from interpgw.steering.resolve import InterventionResolver
from interpgw.transport.convert import tensor_from_proto
from interpgw.v1 import gateway_pb2 as pb

FACTS = ModelFacts("fake", "FakeForCausalLM", 2, 4, 100, "float32", 32, "memory")
SHORT = 1000  # every message here stays far below gRPC's 16 KiB trailer limit


def run(coro):  # noqa: ANN001, ANN201
    return asyncio.run(coro)


# ---------------------------------------------------------------------------------------------- messages


def test_quoted_cuts_long_values_and_says_how_long() -> None:
    assert quoted("abc") == "'abc'"
    shown = quoted("x" * 20_000)
    assert len(shown) < 200 and "20000 characters" in shown


# ---------------------------------------------------------------------------------------------- hook names


@pytest.mark.parametrize(
    "name",
    [
        "blocks." + "9" * 5000 + ".hook_resid_post",  # int() refuses > 4300 digits: was ValueError -> INTERNAL
        "blocks.0.hook_resid_post\n",  # `$` matched before a final newline: was accepted
        "blocks.\u0661.hook_resid_post",  # ARABIC-INDIC DIGIT ONE: `\d` matched it, int() read it: was accepted
        "blocks.1.hook_resid_post\x00",
        "blocks.+1.hook_resid_post",
        "x" * 100_000,
    ],
)
def test_malformed_hook_names_are_invalid_argument_with_a_short_message(name: str) -> None:
    with pytest.raises(InvalidArgument, match="valid hook points|valid kinds") as info:
        parse_hook(name, 2)
    assert len(str(info.value)) < SHORT


def test_hook_aliases_still_resolve() -> None:
    assert parse_hook("blocks.-1.hook_resid_post", 2).name == "blocks.1.hook_resid_post"
    assert parse_hook("blocks.01.hook_mlp_out", 2).name == "blocks.1.hook_mlp_out"
    with pytest.raises(InvalidArgument, match=r"L must be in \[-2, 1\]"):
        parse_hook("blocks.123456789.hook_resid_post", 2)


# ---------------------------------------------------------------------------------------------- tensors


@pytest.mark.parametrize(
    ("tensor", "fragment"),
    [
        # an empty tensor whose other dimensions overflow torch's strides: was RuntimeError -> INTERNAL
        (pb.Tensor(dtype="float32", shape=[0, 2**40, 2**40]), "too large"),
        (pb.Tensor(dtype="float32", shape=[2**62, 0]), "too large"),
        (pb.Tensor(dtype="float32", shape=[1] * 5000), "5000 dimensions"),
        (pb.Tensor(dtype="float32", shape=[-4]), "negative dimension"),
        (pb.Tensor(dtype="f" * 50_000, shape=[4]), "unsupported dtype"),
        (pb.Tensor(dtype="float32", shape=[4], data=b"\x00" * 15), "expected 16"),
    ],
)
def test_bad_tensors_are_invalid_argument(tensor: pb.Tensor, fragment: str) -> None:
    with pytest.raises(InvalidArgument, match=fragment) as info:
        tensor_from_proto(tensor, "vector")
    assert len(str(info.value)) < SHORT


def test_empty_tensors_of_sane_shape_still_convert() -> None:
    assert tensor_from_proto(pb.Tensor(dtype="bfloat16", shape=[0, 4]), "vector").shape == (0, 4)


# ---------------------------------------------------------------------------------------------- vectors and edits


@pytest.mark.parametrize(
    "vector",
    [
        torch.full((4,), 3.0e38),  # finite float32: ADD with scale 2 overflowed to Inf inside the model
        torch.tensor([1.0, 2.0, -1.5e6, 0.0]),
        torch.full((4,), 1e300, dtype=torch.float64),  # finite float64, Inf as float32
    ],
)
def test_vectors_with_huge_entries_are_refused(vector: torch.Tensor) -> None:
    with pytest.raises(InvalidArgument, match=r"entries must be in \[-1e\+06, 1e\+06\]"):
        check_vector(vector, 4, "inline vector")


def test_vectors_within_the_bound_pass() -> None:
    vector = torch.tensor([MAX_VECTOR_ABS, -MAX_VECTOR_ABS, 2.2e4, 0.0], dtype=torch.float64)
    assert check_vector(vector, 4, "v").dtype == torch.float32


def scale(value: float, norm_preserving: bool = False) -> EditOrder:
    return EditOrder(
        EditOp.SCALE, "blocks.0.hook_resid_post", RowFilter(3, None, True), None, value, 0.0, norm_preserving
    )


def test_edit_gain_multiplies_scale_edits_only() -> None:
    add = EditOrder(EditOp.ADD, "blocks.0.hook_resid_post", RowFilter(3, None, True), (1.0,) * 4, 1000.0)
    assert edit_gain([scale(10.0), scale(-10.0), scale(0.5), add, scale(1000.0, norm_preserving=True)]) == 100.0
    check_edit_gain([scale(1000.0), scale(1000.0)])  # exactly the bound
    with pytest.raises(InvalidArgument, match="multiply activations by up to 1e\\+09"):
        check_edit_gain([scale(1000.0), scale(1000.0), scale(1000.0)])


def test_a_hook_order_bounds_its_own_and_its_monitors_edits_together() -> None:
    def order(edits: tuple, armed: tuple) -> HookOrder:
        monitor = MonitorRule("m", "entropy", Comparison.GT, 1.0, action=Action.STEER, edits=armed)
        return HookOrder("k", (), 3, None, False, edits=edits, signals=SignalOrder(monitors=(monitor,)))

    order((scale(1000.0),), (scale(1000.0),))
    with pytest.raises(InvalidArgument, match=re.escape(f"at most {MAX_EDIT_GAIN:g} is allowed")):
        order((scale(1000.0), scale(1000.0)), (scale(2.0),))
    # the worker rebuilds the order from JSON: the check passes there as it did in the gateway
    ok = order((scale(1000.0),), ())
    assert HookOrder.from_extra_args(ok.to_extra_args()) == ok


# ---------------------------------------------------------------------------------------------- registry vectors


def record(kind: str = "vector", value: float = 1.0, record_id: str = "vec_1") -> VectorRecord:
    extra = {"bias": 0.0} if kind == "probe" else {}
    method = "logistic" if kind == "probe" else "tensor"
    return VectorRecord(
        record_id,
        "fake",
        4,
        ("blocks.1.hook_resid_post",),
        torch.full((1, 4), value),
        method,
        0,
        0.0,
        kind=kind,
        extra=extra,
    )


def resolver(*records: VectorRecord, mean: torch.Tensor | None = None) -> InterventionResolver:
    store = MemoryVectorStore()
    for r in records:
        run(store.put(r))

    async def reference_mean(hook, prompts, handles):  # noqa: ANN001, ANN202
        return mean if mean is not None else torch.zeros(4)

    return InterventionResolver(FACTS, LimitsConfig(), store, reference_mean)


def test_a_probe_id_is_not_a_steering_vector() -> None:
    # was accepted: the probe's weight steered the model
    spec = InterventionSpec(EditOp.ADD, vector_id="prb_1")
    with pytest.raises(NotFound, match="no steering vector with id 'prb_1'"):
        run(resolver(record("probe", record_id="prb_1")).prepare([spec]))


def test_registry_vectors_are_held_to_the_vector_bounds() -> None:
    legacy = record(value=1e30)  # stored before the bound existed
    with pytest.raises(InvalidArgument, match="entries must be in"):
        run(resolver(legacy).prepare([InterventionSpec(EditOp.ADD, vector_id="vec_1")]))
    assert len(run(resolver(record()).prepare([InterventionSpec(EditOp.ADD, vector_id="vec_1")]))) == 1


def test_a_non_finite_mean_ablation_is_refused() -> None:
    spec = InterventionSpec(EditOp.MEAN_ABLATE, hook="blocks.0.hook_resid_post", reference_traces=("h",))
    with pytest.raises(InvalidArgument, match="mean of the references .* NaN or Inf"):
        run(resolver(mean=torch.tensor([0.0, float("nan"), 1.0, 2.0])).prepare([spec]))


def test_an_unknown_vector_id_is_quoted_short() -> None:
    with pytest.raises(NotFound) as info:
        run(resolver().prepare([InterventionSpec(EditOp.ADD, vector_id="v" * 50_000)]))
    assert len(str(info.value)) < SHORT


# ---------------------------------------------------------------------------------------------- prompts


class CountingTokenizer:
    """Characters as tokens; counts calls, so a test can tell whether the text was tokenized at all."""

    chat_template = "{{ messages }}"

    def __init__(self, template_error: Exception | None = None) -> None:
        self.calls = 0
        self.template_error = template_error

    def get_vocab(self) -> dict[str, int]:
        return {"a": 0, "bb": 1, "<|im_start|>": 2}

    def __call__(self, text: str, add_special_tokens: bool = True):  # noqa: ANN204
        self.calls += 1

        class Encoded:
            input_ids = [ord(c) % 100 for c in text]

        return Encoded()

    def apply_chat_template(self, messages, tokenize: bool, add_generation_prompt: bool) -> str:  # noqa: ANN001
        if self.template_error is not None:
            raise self.template_error
        return "".join(m["content"] for m in messages)

    def decode(self, ids: list[int]) -> str:
        return "".join(chr(97 + i % 26) for i in ids)


def test_the_longest_token_bounds_a_text_before_it_is_tokenized() -> None:
    tokenizer = CountingTokenizer()
    assert max_token_chars(tokenizer) == len("<|im_start|>")
    encoder = PromptEncoder(tokenizer, 100, 32)
    assert encoder.max_text_chars == 4 * 12 * 32
    with pytest.raises(InvalidArgument, match="more tokens than the model's context of 32"):
        encoder.encode(PromptInput(text="a" * (encoder.max_text_chars + 1)))
    with pytest.raises(InvalidArgument, match="chat prompt has"):
        encoder.encode(PromptInput(chat=(ChatTurn("user", "a" * (encoder.max_text_chars + 1)),)))
    with pytest.raises(InvalidArgument, match="40 messages"):
        encoder.encode(PromptInput(chat=tuple(ChatTurn("user", "") for _ in range(40))))
    assert tokenizer.calls == 0  # refused without tokenizing megabytes on the event loop


def test_too_many_token_ids_are_refused_before_they_are_read() -> None:
    encoder = PromptEncoder(CountingTokenizer(), 100, 32)
    with pytest.raises(InvalidArgument, match="prompt has 100000 tokens"):
        encoder.encode(PromptInput(token_ids=tuple(range(100_000))))


def test_a_chat_template_that_raises_is_invalid_argument() -> None:
    # a Jinja template's raise_exception() (e.g. "roles must alternate") was an INTERNAL error
    encoder = PromptEncoder(CountingTokenizer(template_error=ValueError("Conversation roles must alternate")), 100, 32)
    with pytest.raises(InvalidArgument, match="chat template refused these messages: Conversation roles must"):
        encoder.encode(PromptInput(chat=(ChatTurn("user", "a"), ChatTurn("user", "b"))))


def test_unknown_chat_roles_are_quoted_short() -> None:
    encoder = PromptEncoder(CountingTokenizer(), 100, 32)
    with pytest.raises(InvalidArgument, match="valid roles") as info:
        encoder.encode(PromptInput(chat=(ChatTurn("r" * 100_000, "a"),)))
    assert len(str(info.value)) < SHORT


@pytest.mark.parametrize("token", ["", "abcdefghijklmnopqrstuvwxyz", "x" * 1_000_000])
def test_single_tokens_longer_than_any_token_are_refused_untokenized(token: str) -> None:
    tokenizer = CountingTokenizer()
    with pytest.raises(InvalidArgument, match="is not exactly one token") as info:
        PromptEncoder(tokenizer, 100, 32).single_token(token, "target")
    assert tokenizer.calls == 0 and len(str(info.value)) < SHORT


def test_a_multi_token_text_names_at_most_ten_pieces() -> None:
    with pytest.raises(InvalidArgument, match="is 12 tokens .*, ...; it must be exactly one"):
        PromptEncoder(CountingTokenizer(), 100, 32).single_token("a" * 12, "target")


# ---------------------------------------------------------------------------------------------- monitor signals


@pytest.mark.parametrize(
    ("signal", "fragment"),
    [
        ("lens_kl:\u0661", "the layer is not an integer"),  # int() read other scripts' digits
        ("lens_kl: 1", "the layer is not an integer"),
        ("lens_kl:1_0", "the layer is not an integer"),
        ("lens_kl:" + "9" * 5000, "the layer is not an integer"),
        ("lens_kl:5", r"valid \[-2, 1\]"),
        ("s" * 100_000, "unknown monitor signal"),
    ],
)
def test_bad_monitor_signals_are_invalid_argument(signal: str, fragment: str) -> None:
    request = SignalsInput(monitors=(MonitorInput(signal=signal, op=">", threshold=0.0),))

    async def no_probes(ids):  # noqa: ANN001, ANN202
        return []

    with pytest.raises(InvalidArgument, match=fragment) as info:
        run(resolve_signals(request, FACTS, no_probes, no_probes))
    assert len(str(info.value)) < SHORT


def test_lens_monitor_layers_still_resolve() -> None:
    request = SignalsInput(monitors=(MonitorInput(signal="lens_kl:-1", op=">", threshold=0.0),))

    async def no_probes(ids):  # noqa: ANN001, ANN202
        return []

    resolved = run(resolve_signals(request, FACTS, no_probes, no_probes))
    assert resolved.order.lens_layers == (1,) and resolved.order.monitors[0].signal == "lens_kl:1"


# ---------------------------------------------------------------------------------------------- through the service


def test_the_service_refuses_overflowing_edits_and_bad_hooks() -> None:
    from test_service import drain, make_service  # the service core with a fake engine

    service = make_service()
    huge = InterventionSpec(EditOp.ADD, hook="blocks.0.hook_resid_post", vector=torch.full((4,), 3.0e38), scale=2.0)
    with pytest.raises(InvalidArgument, match="intervention 0: inline vector has an entry of magnitude"):
        run(drain(service.generate(GenerateInput(PromptInput(text="abc"), interventions=(huge,)))))
    chain = tuple(InterventionSpec(EditOp.SCALE, hook="blocks.0.hook_resid_post", scale=1000.0) for _ in range(3))
    with pytest.raises(InvalidArgument, match="multiply activations"):
        run(drain(service.generate(GenerateInput(PromptInput(text="abc"), interventions=chain))))
    with pytest.raises(InvalidArgument, match="multiply activations"):
        run(drain(service.trace(TraceInput(prompts=(PromptInput(text="abc"),), interventions=chain))))
    capture = CaptureOptions(hooks=("blocks." + "1" * 5000 + ".hook_resid_post",))
    with pytest.raises(InvalidArgument, match="unknown hook point"):
        request = GenerateInput(PromptInput(text="abc"), sampling=SamplingInput(max_tokens=2), capture=capture)
        run(drain(service.generate(request)))
