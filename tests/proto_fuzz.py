"""Hypothesis strategies that fuzz the gateway's gRPC API (used by tests/test_fuzz.py).

Three families, all producing requests for one RPC of `interpgw.v1.Gateway`:

- `random_message(descriptor)`: a random message of ANY protobuf message type, built by walking its descriptor:
  scalars with edge values (0, negatives, huge ints, NaN, +-Inf, -0.0, very long and odd unicode strings, empty),
  enums with unknown numbers, repeated fields with 0..N items (N biased small, sometimes large), oneofs, nested
  messages up to a depth bound. It needs no per-RPC code: an RPC added to the proto is fuzzed by it at once.
- `mutated_valid(method, ctx)`: a VALID request of that RPC (built by `VALID_BUILDERS` with knowledge of the served
  model: hook names, a registered vector, a trained probe, a stored trace, tensors of the right dtype and shape) with
  one to three fields mutated (out of range, near-miss hook names and ids, wrong tensor dtype / shape / byte
  length, NaN and Inf in tensor bytes and float fields, huge repeated lists, empty and very long strings). An RPC
  without a builder falls back to `random_message`.
- `raw_bytes(method, ctx)`: serialized valid (or random) requests damaged at the byte level: truncation, bit flips,
  invalid UTF-8 patched into a string field, deeply nested unknown groups, bad varints and lengths, garbage.

Requests are sent with generic callables (`channel.unary_unary(path)` / `unary_stream`: bytes in, bytes out), so the
fuzz never depends on the generated stubs' registration.
"""

from __future__ import annotations

import math
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from google.protobuf import message_factory, text_format
from google.protobuf.descriptor import Descriptor, FieldDescriptor, MethodDescriptor
from google.protobuf.message import Message
from hypothesis import strategies as st

from interpgw.v1 import gateway_pb2 as pb

SERVICE = pb.DESCRIPTOR.services_by_name["Gateway"]


def methods() -> list[MethodDescriptor]:
    """Every RPC of the Gateway service, in proto order (RPCs added later are picked up automatically)."""
    return list(SERVICE.methods)


def method_path(method: MethodDescriptor) -> str:
    return f"/{SERVICE.full_name}/{method.name}"


def message_class(descriptor: Descriptor) -> type[Message]:
    return message_factory.GetMessageClass(descriptor)


# ---------------------------------------------------------------------------------------------- generic values

INT32_EDGES = (0, 1, -1, 2, 3, 4, 7, 8, 16, 17, 32, 33, 64, 100, 127, 128, 255, 1023, 1024, 1025, 4096, 65536)
INT32_EDGES += (2**24 + 1, 2**31 - 1, -(2**31), -2, -1000)
INT64_EDGES = (*INT32_EDGES, 2**31, 2**32, 2**53 + 1, 2**62, 2**63 - 1, -(2**63), -(2**32))
FLOAT_EDGES = (
    0.0,
    -0.0,
    1.0,
    -1.0,
    0.5,
    0.25,
    2.0,
    2.5,
    0.01,
    0.99,
    5.0,
    10.0,
    101.0,
    1e-7,
    1e-30,
    1e-45,  # the smallest float32 subnormal
    -1e-45,
    100.0,
    1000.0,
    1000.5,
    65504.0,
    1e30,
    3.4028234663852886e38,  # float32 max
    -3.4028234663852886e38,
    math.inf,
    -math.inf,
    math.nan,
)
DOUBLE_EDGES = (*FLOAT_EDGES, 1e308, 5e-324, -1e308)
ODD_STRINGS = (
    "",
    " ",
    "\x00",
    "\n",
    "\t\r",
    "a",
    "é",
    "e\u0301",  # combining accent
    "ß",
    "İ",
    "日本語",
    "\U0001f600",
    "\u202e",  # right-to-left override
    "\ufeff",  # byte-order mark
    "\uffff",
    "\U0010ffff",
    "\u0660",  # ARABIC-INDIC DIGIT ZERO (int() accepts it)
    "<|im_start|>",
    "<|endoftext|>",
    "{{ 7*7 }}",
    "{% raise %}",
    "%s%n%x",
    "../../etc/passwd",
    "-1",
    "0",
    "NaN",
    "null",
)
# strings without surrogates (protobuf cannot encode them); anything else of unicode
TEXT = st.text(st.characters(exclude_categories=("Cs",)), max_size=24)
LONG_SIZES = (300, 2_000, 20_000, 200_000)
LONG_TEXT = st.builds(
    lambda unit, n: unit * (n // len(unit)),
    st.sampled_from(["a", "é", "\U0001f600", " ", "ab "]),
    st.sampled_from(LONG_SIZES),
)
STRINGS = st.one_of(st.sampled_from(ODD_STRINGS), TEXT, TEXT, LONG_TEXT)
SHORT_STRINGS = st.one_of(st.sampled_from(ODD_STRINGS), TEXT)
BYTES = st.one_of(
    st.binary(max_size=32),
    st.builds(
        lambda b, n: b * n,
        st.sampled_from([b"\x00", b"\xff", b"\x7f\x7f\x80\x7f"]),
        st.sampled_from([256, 4096, 1 << 20]),
    ),
)
SHORT_BYTES = st.binary(max_size=64)

# repeated fields: 0..3 items most of the time, sometimes a handful, rarely many (one drawn item repeated)
SMALL_COUNT = st.integers(0, 3)
LARGE_COUNTS = {"scalar": (100, 1_000, 5_000), "message": (17, 40, 300)}
MAX_DEPTH = 6
# sizes multiply through nesting: very long values and many items only near the top of a message (depth <= 1)
BIG_DEPTH = 1


def _float_strategy(double: bool) -> st.SearchStrategy[float]:
    edges = DOUBLE_EDGES if double else FLOAT_EDGES
    return st.one_of(st.sampled_from(edges), st.floats(width=64 if double else 32))


def _int_strategy(fd: FieldDescriptor) -> st.SearchStrategy[int]:
    cpp = fd.cpp_type
    if cpp == FieldDescriptor.CPPTYPE_INT32:
        lo, hi, edges = -(2**31), 2**31 - 1, INT32_EDGES
    elif cpp == FieldDescriptor.CPPTYPE_INT64:
        lo, hi, edges = -(2**63), 2**63 - 1, INT64_EDGES
    elif cpp == FieldDescriptor.CPPTYPE_UINT32:
        lo, hi, edges = 0, 2**32 - 1, tuple(e for e in INT64_EDGES if 0 <= e < 2**32)
    else:
        lo, hi, edges = 0, 2**64 - 1, tuple(e for e in INT64_EDGES if e >= 0) + (2**64 - 1,)
    return st.one_of(st.sampled_from(edges), st.integers(lo, hi))


def enum_strategy(fd: FieldDescriptor) -> st.SearchStrategy[int]:
    """Valid numbers most of the time; unknown ones (proto3 enums are open) otherwise."""
    valid = sorted(fd.enum_type.values_by_number)
    unknown = (-1, max(valid) + 1, 99, 2**31 - 1, -(2**31))
    return st.one_of(
        st.sampled_from(valid), st.sampled_from(valid), st.sampled_from(unknown), st.integers(-(2**31), 2**31 - 1)
    )


def scalar_strategy(fd: FieldDescriptor, depth: int = 0) -> st.SearchStrategy[Any]:
    cpp = fd.cpp_type
    if cpp == FieldDescriptor.CPPTYPE_STRING:
        if fd.type == FieldDescriptor.TYPE_BYTES:
            return BYTES if depth <= BIG_DEPTH + 1 else SHORT_BYTES
        return STRINGS if depth <= BIG_DEPTH else SHORT_STRINGS
    if cpp == FieldDescriptor.CPPTYPE_BOOL:
        return st.booleans()
    if cpp == FieldDescriptor.CPPTYPE_ENUM:
        return enum_strategy(fd)
    if cpp in (FieldDescriptor.CPPTYPE_FLOAT, FieldDescriptor.CPPTYPE_DOUBLE):
        return _float_strategy(cpp == FieldDescriptor.CPPTYPE_DOUBLE)
    return _int_strategy(fd)


def _is_map(fd: FieldDescriptor) -> bool:
    return fd.message_type is not None and fd.message_type.GetOptions().map_entry


def _real_oneofs(descriptor: Descriptor) -> list:
    """Oneofs the schema declares (not the synthetic ones of proto3 `optional` fields)."""
    return [o for o in descriptor.oneofs if not (len(o.fields) == 1 and o.name == "_" + o.fields[0].name)]


def assign(msg: Message, fd: FieldDescriptor, value: Any) -> None:
    """Set one field (a repeated field takes a list, a map field a dict)."""
    if _is_map(fd):
        target = getattr(msg, fd.name)
        value_fd = fd.message_type.fields_by_name["value"]
        for k, v in value.items():
            if value_fd.message_type is not None:
                target[k].CopyFrom(v)
            else:
                target[k] = v
    elif fd.is_repeated:
        target = getattr(msg, fd.name)
        del target[:]
        target.extend(value)
    elif fd.message_type is not None:
        getattr(msg, fd.name).CopyFrom(value)
    else:
        setattr(msg, fd.name, value)


def _value(draw: Callable, fd: FieldDescriptor, depth: int) -> Any:
    if fd.message_type is not None:
        return draw(random_message(fd.message_type, depth + 1))
    return draw(scalar_strategy(fd, depth))


def _repeated(draw: Callable, fd: FieldDescriptor, depth: int) -> list:
    kind = "message" if fd.message_type is not None else "scalar"
    if depth > BIG_DEPTH:
        size = draw(st.one_of(SMALL_COUNT, st.integers(0, 6)))
    else:
        size = draw(st.one_of(SMALL_COUNT, SMALL_COUNT, st.integers(4, 12), st.sampled_from(LARGE_COUNTS[kind])))
    if size <= 12:
        return [_value(draw, fd, depth) for _ in range(size)]
    # many items: a few small drawn ones, cycled (cheap to draw, still as many items on the wire)
    pattern = [_value(draw, fd, MAX_DEPTH) for _ in range(draw(st.integers(1, 2)))]
    return [pattern[i % len(pattern)] for i in range(size)]


@st.composite
def _random_message(draw: Callable, descriptor: Descriptor, depth: int) -> Message:
    msg = message_class(descriptor)()
    in_oneof = set()
    for oneof in _real_oneofs(descriptor):
        in_oneof.update(f.name for f in oneof.fields)
        choice = draw(st.sampled_from([None, *oneof.fields]))
        if choice is not None and not (choice.message_type is not None and depth >= MAX_DEPTH):
            assign(msg, choice, _value(draw, choice, depth))
    for fd in descriptor.fields:
        if fd.name in in_oneof:
            continue
        if fd.message_type is not None and depth >= MAX_DEPTH:
            continue  # depth bound: leave nested messages unset
        if not draw(st.booleans()):
            continue
        if _is_map(fd):
            key_fd, value_fd = fd.message_type.fields_by_name["key"], fd.message_type.fields_by_name["value"]
            keys = draw(st.lists(scalar_strategy(key_fd, MAX_DEPTH), max_size=3))
            assign(msg, fd, {k: _value(draw, value_fd, depth) for k in keys})
        elif fd.is_repeated:
            assign(msg, fd, _repeated(draw, fd, depth))
        else:
            assign(msg, fd, _value(draw, fd, depth))
    return msg


def random_message(descriptor: Descriptor, depth: int = 0) -> st.SearchStrategy[Message]:
    """A random message of any type: every field set or not, every oneof one member or none, bounded nesting."""
    return _random_message(descriptor, depth)


# ---------------------------------------------------------------------------------------------- the served model


@dataclass
class ModelContext:
    """What the valid builders know about the gateway under test (filled in by the test's set-up)."""

    model_id: str
    n_layers: int
    d_model: int
    vocab_size: int
    hook_points: tuple[str, ...]
    vector_id: str = ""  # a registered vector with rows at VECTOR_HOOKS
    deletable_vectors: tuple[str, ...] = ()  # DeleteVector's valid requests use these, never vector_id
    probe_id: str = ""  # a trained probe at PROBE_HOOK
    deletable_probes: tuple[str, ...] = ()
    trace_handle: str = ""  # a stored trace of STORED_PROMPT_IDS holding every hook point at every position
    extra_strings: tuple[str, ...] = field(default_factory=tuple)

    def known_strings(self) -> tuple[str, ...]:
        """Valid names and ids of every kind: swapping one for another is a classic near miss (a probe id where
        a vector id belongs, a handle for a vector)."""
        ids = (self.model_id, self.vector_id, self.probe_id, self.trace_handle, *self.deletable_vectors)
        return tuple(s for s in (*ids, *self.hook_points, *self.extra_strings) if s)


VECTOR_HOOKS = ("blocks.1.hook_resid_post", "blocks.2.hook_resid_post")
PROBE_HOOK = "blocks.1.hook_resid_post"
STORED_PROMPT_IDS = (1, 504, 3458, 314, 5288, 30, 1456, 28)  # 8 tokens
PATCH_CLEAN_IDS = (1, 504, 3458, 314, 5288, 30, 1456, 28)
PATCH_CORRUPTED_IDS = (1, 504, 3458, 314, 7045, 30, 1456, 28)


def f32_tensor(values: np.ndarray) -> pb.Tensor:
    a = np.ascontiguousarray(values, dtype=np.float32)
    return pb.Tensor(dtype="float32", shape=list(a.shape), data=a.tobytes())


def bf16_tensor(values: np.ndarray) -> pb.Tensor:
    a = np.ascontiguousarray(values, dtype=np.float32)
    return pb.Tensor(dtype="bfloat16", shape=list(a.shape), data=(a.view(np.uint32) >> 16).astype(np.uint16).tobytes())


def direction(d_model: int, seed: int, shape: tuple[int, ...] = ()) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((*shape, d_model)).astype(np.float32)


def text(value: str) -> pb.Prompt:
    return pb.Prompt(text=value)


def chat(*turns: tuple[str, str]) -> pb.Prompt:
    messages = [pb.ChatMessage(role=r, content=c) for r, c in turns]
    return pb.Prompt(chat=pb.ChatMessages(messages=messages, add_generation_prompt=True))


def tokens(ids: tuple[int, ...]) -> pb.Prompt:
    return pb.Prompt(tokens=pb.TokenIds(ids=list(ids)))


# ~20 tokens: long enough that an edit which overflows reaches the KV cache blocks later requests are given (a
# request of a handful of tokens did not poison other requests in tests; one of 20 did)
LONG_PROMPT = "My review of the hotel: the room was small but clean, and the staff were friendly and helpful."

Sel = pb.PositionSelector
Tgt = pb.InterventionTarget
Iv = pb.Intervention


def _generate(ctx: ModelContext) -> list[Message]:
    d = ctx.d_model
    greedy = pb.SamplingParams(max_tokens=4, temperature=0)
    return [
        pb.GenerateRequest(prompt=text("The capital of France is"), sampling=greedy),
        pb.GenerateRequest(
            model=ctx.model_id,
            prompt=chat(("system", "Be brief."), ("user", "Name a colour.")),
            sampling=pb.SamplingParams(max_tokens=6, temperature=0.7, top_p=0.9, top_k=20, seed=7, stop=["."]),
        ),
        pb.GenerateRequest(
            prompt=tokens((1, 2, 3, 400, 5000)),
            sampling=pb.SamplingParams(max_tokens=3, temperature=0),
            capture=pb.CaptureSpec(
                hooks=["blocks.-1.hook_resid_post", "hook_embed"],
                positions=Sel(mode=Sel.LAST),
                generated=True,
                dtype="bfloat16",
            ),
        ),
        pb.GenerateRequest(
            prompt=text(LONG_PROMPT),
            sampling=pb.SamplingParams(max_tokens=8, temperature=0),
            interventions=[
                Iv(
                    op=Iv.ADD,
                    hook="blocks.1.hook_resid_post",
                    tensor=f32_tensor(direction(d, 1)),
                    scale=2.0,
                    target=Tgt(mode=Tgt.PROMPT),
                ),
                Iv(op=Iv.SCALE, hook="blocks.0.hook_mlp_out", scale=0.5, target=Tgt(mode=Tgt.LAST_N, n=2)),
            ],
            compare_unsteered=True,
        ),
        pb.GenerateRequest(
            prompt=text("Once upon a time"),
            sampling=pb.SamplingParams(max_tokens=3, temperature=1.0, seed=11),
            interventions=[
                Iv(op=Iv.ADD, vector_id=ctx.vector_id, scale=1.5),
                Iv(
                    op=Iv.PROJECT_OUT,
                    hook="blocks.2.hook_resid_mid",
                    tensor=bf16_tensor(direction(d, 2)),
                    target=Tgt(mode=Tgt.INDICES, indices=[0, -1], window_start=0, window_end=8),
                ),
                Iv(op=Iv.CLAMP, hook=VECTOR_HOOKS[0], vector_id=ctx.vector_id, value=1.5, norm_preserving=True),
            ],
        ),
        pb.GenerateRequest(
            prompt=text("Paris is in"),
            sampling=pb.SamplingParams(max_tokens=4, temperature=0),
            signals=pb.SignalRequest(
                distribution=True,
                lens_layers=[1, -1],
                probes=[ctx.probe_id],
                monitors=[
                    pb.Monitor(
                        name="hi", signal="entropy", op=pb.Monitor.GT, threshold=100.0, window=2, reduce=pb.Monitor.MEAN
                    ),
                    pb.Monitor(
                        signal="probe:" + ctx.probe_id,
                        op=pb.Monitor.GE,
                        threshold=0.99,
                        action=pb.Monitor.STEER,
                        interventions=[Iv(op=Iv.ADD, vector_id=ctx.vector_id)],
                    ),
                    pb.Monitor(signal="logprob", op=pb.Monitor.LT, threshold=-1000.0, action=pb.Monitor.STOP),
                    pb.Monitor(signal="lens_kl:-1", op=pb.Monitor.LE, threshold=-1.0),
                ],
            ),
        ),
        pb.GenerateRequest(
            prompt=text("The sky is"),
            sampling=pb.SamplingParams(max_tokens=3, temperature=0.8, seed=3),
            signals=pb.SignalRequest(eigenscore_samples=2, eigenscore_layer=-1),
        ),
        pb.GenerateRequest(
            prompt=text("Hello there"),
            sampling=pb.SamplingParams(max_tokens=2, temperature=0, ignore_eos=True),
            interventions=[
                Iv(op=Iv.ZERO, hook="blocks.3.hook_attn_out", target=Tgt(mode=Tgt.GENERATED)),
                Iv(
                    op=Iv.MEAN_ABLATE,
                    hook=VECTOR_HOOKS[0],
                    reference_prompts=[text("Hello world")],
                    reference_traces=[ctx.trace_handle],
                ),
            ],
        ),
    ]


def _trace(ctx: ModelContext) -> list[Message]:
    d = ctx.d_model
    return [
        pb.TraceRequest(
            prompts=[text(LONG_PROMPT), text("on the mat")],
            capture=pb.CaptureSpec(hooks=["blocks.3.hook_resid_post"], positions=Sel(mode=Sel.LAST), dtype="float32"),
            interventions=[
                Iv(op=Iv.ADD, hook="blocks.0.hook_resid_post", tensor=f32_tensor(direction(d, 7)), scale=4.0),
                Iv(
                    op=Iv.SET,
                    hook="blocks.1.hook_mlp_out",
                    tensor=bf16_tensor(direction(d, 8)),
                    target=Tgt(mode=Tgt.LAST_N, n=1),
                ),
            ],
            cache=pb.CACHE_BYPASS,
        ),
        pb.TraceRequest(
            prompts=[text("The capital of France is")],
            capture=pb.CaptureSpec(hooks=["blocks.1.hook_resid_post"], dtype="float32"),
            cache=pb.CACHE_BYPASS,
        ),
        pb.TraceRequest(
            model=ctx.model_id,
            prompts=[text("Paris is in"), chat(("user", "Hi")), tokens((1, 2, 3))],
            capture=pb.CaptureSpec(
                hooks=["hook_embed", "ln_final.hook_normalized"], positions=Sel(mode=Sel.INDICES, indices=[0, -1])
            ),
            top_k_logits=5,
        ),
        pb.TraceRequest(
            prompts=[text("Rome is in")],
            capture=pb.CaptureSpec(hooks=["blocks.2.hook_resid_post"], positions=Sel(mode=Sel.LAST), dtype="bfloat16"),
            interventions=[Iv(op=Iv.ADD, hook=VECTOR_HOOKS[0], vector_id=ctx.vector_id, scale=-3.0)],
            probes=[ctx.probe_id],
            store=True,
            cache=pb.CACHE_REFRESH,
        ),
        pb.TraceRequest(
            prompts=[text("A B C D")],
            interventions=[
                Iv(
                    op=Iv.MEAN_ABLATE,
                    hook="blocks.0.hook_resid_pre",
                    reference_traces=[ctx.trace_handle],
                    target=Tgt(mode=Tgt.LAST_N, n=1),
                )
            ],
            top_k_logits=3,
        ),
        pb.TraceRequest(
            prompts=[text("x")],
            capture=pb.CaptureSpec(hooks=["blocks.0.hook_attn_out"], positions=Sel(mode=Sel.NONE)),
            probes=[ctx.probe_id],
        ),
    ]


def _create_vector(ctx: ModelContext) -> list[Message]:
    d = ctx.d_model
    f64 = direction(d, 5, (1,)).astype(np.float64)
    f16 = direction(d, 6).astype(np.float16)
    return [
        pb.CreateVectorRequest(
            hooks=["blocks.1.hook_resid_post"], tensor=f32_tensor(direction(d, 3)), name="fuzz", description="d"
        ),
        pb.CreateVectorRequest(
            model=ctx.model_id,
            hooks=["blocks.0.hook_resid_pre", "blocks.-1.hook_mlp_out"],
            tensor=bf16_tensor(direction(d, 4, (2,))),
        ),
        pb.CreateVectorRequest(
            hooks=["hook_embed"], tensor=pb.Tensor(dtype="float64", shape=[1, d], data=f64.tobytes())
        ),
        pb.CreateVectorRequest(
            hooks=["ln_final.hook_normalized"], tensor=pb.Tensor(dtype="float16", shape=[d], data=f16.tobytes())
        ),
    ]


def _train_vector(ctx: ModelContext) -> list[Message]:
    pairs = [
        pb.ContrastPair(positive=text("I love it."), negative=text("I hate it.")),
        pb.ContrastPair(positive=text("Great day!"), negative=text("Awful day!")),
    ]
    return [
        pb.TrainVectorRequest(pairs=pairs, hooks=["blocks.1.hook_resid_post"]),
        pb.TrainVectorRequest(
            model=ctx.model_id,
            name="fuzz",
            pairs=[*pairs, pb.ContrastPair(positive=chat(("user", "yes")), negative=tokens((1, 2, 3)))],
            hooks=["blocks.-1.hook_resid_pre", "hook_embed"],
            method=pb.TrainVectorRequest.PCA,
            reduce=pb.TrainVectorRequest.MEAN,
        ),
    ]


def _patch(ctx: ModelContext) -> list[Message]:
    metric = pb.PatchMetric(kind=pb.PatchMetric.LOGIT_DIFF, target_id=42, foil_id=43)
    return [
        pb.PatchRequest(
            clean=tokens(PATCH_CLEAN_IDS),
            corrupted=tokens(PATCH_CORRUPTED_IDS),
            metric=metric,
            layers=[0, -1],
            positions=Sel(mode=Sel.INDICES, indices=[4, -1]),
        ),
        pb.PatchRequest(
            model=ctx.model_id,
            clean=text("The capital of France is"),
            corrupted=text("The capital of Italy is"),
            hook="hook_mlp_out",
            layers=[1],
            positions=Sel(mode=Sel.LAST),
            metric=pb.PatchMetric(kind=pb.PatchMetric.PROB, target_text=" the"),
        ),
        pb.PatchRequest(
            clean_trace=ctx.trace_handle,
            corrupted=tokens(PATCH_CORRUPTED_IDS),
            hook="hook_attn_out",
            layers=[2],
            metric=pb.PatchMetric(target_id=5, foil_text=" the"),
            positions=Sel(mode=Sel.INDICES, indices=[4]),
        ),
    ]


def _train_probe(ctx: ModelContext) -> list[Message]:
    facts = [
        ("Paris is in France.", True),
        ("Rome is in Italy.", True),
        ("Berlin is in Germany.", True),
        ("Madrid is in Spain.", True),
        ("Paris is in Peru.", False),
        ("Rome is in Chile.", False),
        ("Berlin is in Japan.", False),
        ("Madrid is in Kenya.", False),
    ]
    examples = [pb.LabelledPrompt(prompt=text(t), label=label) for t, label in facts]
    return [
        pb.TrainProbeRequest(examples=examples, hook=PROBE_HOOK, seed=1),
        pb.TrainProbeRequest(
            model=ctx.model_id,
            name="fuzz",
            examples=[*examples, pb.LabelledPrompt(prompt=tokens((1, 2)), label=True)],
            position=pb.TrainProbeRequest.MEAN,
            test_fraction=0.3,
            l2=0.1,
        ),
    ]


VALID_BUILDERS: dict[str, Callable[[ModelContext], list[Message]]] = {
    "ListModels": lambda ctx: [pb.ListModelsRequest()],
    "GetModelInfo": lambda ctx: [pb.GetModelInfoRequest(), pb.GetModelInfoRequest(model=ctx.model_id)],
    "Generate": _generate,
    "Trace": _trace,
    "CreateVector": _create_vector,
    "TrainVector": _train_vector,
    "ListVectors": lambda ctx: [pb.ListVectorsRequest(), pb.ListVectorsRequest(model=ctx.model_id)],
    "GetVector": lambda ctx: [pb.GetVectorRequest(id=ctx.vector_id)],
    "DeleteVector": lambda ctx: [pb.DeleteVectorRequest(id=i) for i in ctx.deletable_vectors],
    "Patch": _patch,
    "GetTrace": lambda ctx: [pb.GetTraceRequest(handle=ctx.trace_handle)],
    "TrainProbe": _train_probe,
    "ListProbes": lambda ctx: [pb.ListProbesRequest(), pb.ListProbesRequest(model=ctx.model_id)],
    "GetProbe": lambda ctx: [pb.GetProbeRequest(id=ctx.probe_id)],
    "DeleteProbe": lambda ctx: [pb.DeleteProbeRequest(id=i) for i in ctx.deletable_probes],
}


def _regressions(ctx: ModelContext) -> dict[str, list[Message]]:
    d = ctx.d_model
    overflow = f32_tensor(np.full(d, 3.4e38, dtype=np.float32))  # finite; Inf once scaled inside the model
    add_overflow = Iv(op=Iv.ADD, hook="blocks.0.hook_resid_post", tensor=overflow, scale=2.0)
    scale_1000 = Iv(op=Iv.SCALE, hook="blocks.0.hook_resid_pre", scale=1000.0)
    always = dict(signal="entropy", op=pb.Monitor.GT, threshold=-1.0, action=pb.Monitor.STEER)
    greedy = pb.SamplingParams(max_tokens=8, temperature=0)
    long_hook = "blocks." + "9" * 5000 + ".hook_resid_post"
    empty_but_huge = pb.Tensor(dtype="float32", shape=[0, 2**40, 2**40])
    return {
        "GetModelInfo": [pb.GetModelInfoRequest(model=" " * 20_000), pb.GetModelInfoRequest(model="é" * 3000)],
        "Generate": [
            pb.GenerateRequest(prompt=text("hi"), sampling=pb.SamplingParams(max_tokens=2, temperature=2.5)),
            pb.GenerateRequest(prompt=text("hi"), sampling=pb.SamplingParams(max_tokens=2, temperature=100.0)),
            pb.GenerateRequest(prompt=text(LONG_PROMPT), sampling=greedy, interventions=[add_overflow]),
            pb.GenerateRequest(
                prompt=text(LONG_PROMPT),
                sampling=greedy,
                interventions=[add_overflow],
                signals=pb.SignalRequest(probes=[ctx.probe_id]),
            ),
            pb.GenerateRequest(
                prompt=text(LONG_PROMPT),
                sampling=greedy,
                interventions=[scale_1000] * 8,
                signals=pb.SignalRequest(monitors=[pb.Monitor(**always, interventions=[scale_1000] * 8)] * 8),
            ),
            pb.GenerateRequest(prompt=text("hi"), capture=pb.CaptureSpec(hooks=[long_hook])),
            pb.GenerateRequest(prompt=chat(("r" * 20_000, "x"))),
            pb.GenerateRequest(prompt=text("a b " * 1_000_000), sampling=greedy),
            pb.GenerateRequest(
                prompt=text("hi"), sampling=greedy, interventions=[Iv(op=Iv.ADD, vector_id=ctx.probe_id)]
            ),
            pb.GenerateRequest(
                prompt=text("hi"),
                sampling=greedy,
                interventions=[Iv(op=Iv.ADD, hook="blocks.0.hook_resid_post", tensor=empty_but_huge)],
            ),
        ],
        "Trace": [
            pb.TraceRequest(prompts=[text("hi")], capture=pb.CaptureSpec(hooks=[long_hook])),
            pb.TraceRequest(
                prompts=[text(LONG_PROMPT)],
                cache=pb.CACHE_BYPASS,
                interventions=[Iv(op=Iv.ADD, hook="blocks.0.hook_resid_post", tensor=overflow, scale=4.0)],
            ),
        ],
        "CreateVector": [
            pb.CreateVectorRequest(hooks=["hook_embed"], tensor=empty_but_huge),
            pb.CreateVectorRequest(hooks=["hook_embed"], tensor=overflow),
        ],
        "Patch": [
            pb.PatchRequest(
                clean=tokens(PATCH_CLEAN_IDS),
                corrupted=tokens(PATCH_CORRUPTED_IDS),
                metric=pb.PatchMetric(kind=pb.PatchMetric.PROB, target_text="x" * 1_000_000),
            ),
        ],
        "GetVector": [pb.GetVectorRequest(id="é" * 5000)],
    }


def regression_requests(method: MethodDescriptor, ctx: ModelContext) -> list[Message]:
    """Requests that once got a wrong answer (INTERNAL, an unreadable status, or a result that poisoned later
    requests), sent before the random ones so that they are always tried."""
    return _regressions(ctx).get(method.name, [])


def valid_requests(method: MethodDescriptor, ctx: ModelContext) -> list[Message]:
    builder = VALID_BUILDERS.get(method.name)
    return builder(ctx) if builder is not None else []


# ---------------------------------------------------------------------------------------------- mutations


@dataclass(frozen=True)
class Site:
    """One place in a message a mutation can change: a field, or one element of a repeated field."""

    path: str
    parent: Message
    field: FieldDescriptor
    index: int | None = None  # element of a repeated field; None: the field itself (all of a repeated one)


def sites(msg: Message, prefix: str = "") -> list[Site]:
    """Every field of `msg` (set or not) and of its set sub-messages, and every element of repeated fields."""
    found = []
    for fd in msg.DESCRIPTOR.fields:
        path = f"{prefix}{fd.name}"
        found.append(Site(path, msg, fd))
        if _is_map(fd):
            continue
        if fd.is_repeated:
            items = getattr(msg, fd.name)
            for i in range(len(items)):
                found.append(Site(f"{path}[{i}]", msg, fd, i))
                if fd.message_type is not None:
                    found.extend(sites(items[i], f"{path}[{i}]."))
        elif fd.message_type is not None and msg.HasField(fd.name):
            found.extend(sites(getattr(msg, fd.name), path + "."))
    return found


def _current(site: Site) -> Any:
    value = getattr(site.parent, site.field.name)
    return value[site.index] if site.index is not None else value


def _set(site: Site, value: Any) -> None:
    fd = site.field
    if site.index is not None:
        items = getattr(site.parent, fd.name)
        if fd.message_type is not None:
            items[site.index].CopyFrom(value)
        else:
            items[site.index] = value
    else:
        assign(site.parent, fd, value)


_LAYER_NAME = re.compile(r"blocks\.(-?[0-9]{1,9})\.(\w+)", re.ASCII)


def hook_near_misses(name: str, n_layers: int) -> list[str]:
    """Names that look like `name` but are not valid (or are valid aliases a parser must resolve)."""
    misses = [
        name + " ",
        " " + name,
        name + "\n",
        name.upper(),
        name[:-1],
        name + "s",
        name + ".x",
        name.replace(".", "_"),
    ]
    misses += [
        f"blocks.{n_layers}.hook_resid_post",
        f"blocks.{-n_layers - 1}.hook_resid_pre",
        "blocks.1.hook_pattern",
        "blocks.1.attn.hook_pattern",
        "blocks.1",
        "blocks..hook_resid_post",
        "blocks.+1.hook_resid_post",
        "blocks.\u0661.hook_resid_post",
        "blocks.1.hook_resid_post\x00",
        "blocks.99999999999999999999.hook_mlp_out",
        "blocks." + "9" * 5000 + ".hook_resid_post",
        "hook_embed.",
        "ln_final",
        "blocks.-0.hook_resid_post",
        "blocks.01.hook_resid_post",
        "hook_resid_pre",
        "ln_final.hook_scale",
    ]
    match = _LAYER_NAME.fullmatch(name)
    if match:
        layer, kind = int(match.group(1)), match.group(2)
        misses += [
            f"blocks.{layer + n_layers}.{kind}",
            f"blocks.{layer - 2 * n_layers}.{kind}",
            f"blocks.{layer}.{kind[:-1]}",
            f"block.{layer}.{kind}",
            f"blocks.{layer}.{kind.replace('hook_', '')}",
        ]
    return misses


def id_near_misses(value: str) -> list[str]:
    if not value:
        return ["x", " ", "vec_", "prb_"]
    swapped = value.replace("vec_", "prb_") if value.startswith("vec_") else value.replace("prb_", "vec_")
    return [
        value[:-1],
        value + "0",
        value.upper(),
        " " + value,
        value + "\n",
        swapped,
        value[::-1],
        value[:4],
        value * 50,
    ]


def _string_mutations(site: Site, value: str, ctx: ModelContext) -> st.SearchStrategy[str]:
    choices: list[str] = list(ODD_STRINGS)
    if value.startswith(("blocks.", "hook_", "ln_final")) or site.field.name in ("hook", "hooks"):
        choices += hook_near_misses(value, ctx.n_layers)
    elif value:
        choices += id_near_misses(value)
    if value.startswith(("probe:", "lens_kl:")):
        choices += [
            "probe:",
            "probe:x",
            "lens_kl:",
            "lens_kl:x",
            f"lens_kl:{ctx.n_layers}",
            "lens_kl:\u0661",
            "lens_earliest",
            "lens_kl:" + "9" * 5000,
            "margin ",
            "ENTROPY",
        ]
    return st.one_of(st.sampled_from(choices), st.sampled_from(ctx.known_strings()), STRINGS)


def _number_mutations(site: Site, value: Any) -> st.SearchStrategy[Any]:
    fd = site.field
    cpp = fd.cpp_type
    if cpp in (FieldDescriptor.CPPTYPE_FLOAT, FieldDescriptor.CPPTYPE_DOUBLE):
        near = [value * 1000, -value, value + 1e-7, value * (1 + 2**-20)] if math.isfinite(value) else [0.0]
        return st.one_of(st.sampled_from(FLOAT_EDGES), st.sampled_from(near))
    if cpp == FieldDescriptor.CPPTYPE_BOOL:
        return st.just(not value)
    if cpp == FieldDescriptor.CPPTYPE_ENUM:
        return enum_strategy(fd)
    lo, hi = {
        FieldDescriptor.CPPTYPE_INT32: (-(2**31), 2**31 - 1),
        FieldDescriptor.CPPTYPE_INT64: (-(2**63), 2**63 - 1),
        FieldDescriptor.CPPTYPE_UINT32: (0, 2**32 - 1),
    }.get(cpp, (0, 2**64 - 1))
    near = [v for v in (value - 1, value + 1, -value, value * 2, value * 1000) if lo <= v <= hi]
    return st.one_of(st.sampled_from(near), _int_strategy(fd))


# NaN and Inf written into float payloads, as float32 / bfloat16 / float16 / float64 bit patterns
_POISON = {
    4: [
        struct.pack("<f", v)
        for v in (3.4028234663852886e38, -3.4028234663852886e38, math.nan, math.inf, -math.inf, 1e-45)
    ]
    + [b"\x00\x00\xc0\x7f", b"\x01\x00\x80\x7f"],
    2: [b"\xc0\x7f", b"\x80\x7f", b"\x80\xff", b"\x7f\x7f", b"\x00\x7c", b"\x00\x7e"],
    8: [struct.pack("<d", v) for v in (math.nan, math.inf, -math.inf, 1e300)],
}
_ITEMSIZE = {"float32": 4, "float64": 8, "bfloat16": 2, "float16": 2}
BAD_DTYPES = (
    "",
    "float",
    "fp32",
    "Float32",
    "float32 ",
    "torch.float32",
    "int64",
    "int8",
    "uint8",
    "bool",
    "complex64",
    "float8_e4m3fn",
    "bfloat16\x00",
    "half",
    "double",
    "qint8",
    "float3\u0662",
)


@st.composite
def tensor_mutation(draw: Callable, tensor: pb.Tensor) -> pb.Tensor:
    """A wrong variant of a valid tensor: dtype, shape, byte length, or its values."""
    out = pb.Tensor()
    out.CopyFrom(tensor)
    shape = list(tensor.shape)
    n = math.prod(shape) if shape else 0
    size = _ITEMSIZE.get(tensor.dtype, 4)
    kind = draw(
        st.sampled_from(
            ["dtype", "dtype_keep_bytes", "shape", "bytes", "poison", "poison", "values", "values", "reencode"]
        )
    )
    if kind == "dtype":
        out.dtype = draw(st.sampled_from(BAD_DTYPES))
    elif kind == "dtype_keep_bytes":
        out.dtype = draw(st.sampled_from([d for d in _ITEMSIZE if d != tensor.dtype]))
    elif kind == "shape":
        d = shape[-1] if shape else 1
        candidates = [
            [d + 1],
            [d - 1],
            [1, d],
            [d, 1],
            [2, d],
            [],
            [0],
            [d, 0],
            [-1],
            [-d],
            [2**40, 0],
            [0, 2**40, 2**40],
            [1, 1, 1, 1, d],
            [1, 1, 1, 1, 1, d],
            [n * 2],
            [2**62],
            [2**31, 2**31],
            shape[::-1],
        ]
        out.ClearField("shape")
        out.shape.extend(draw(st.sampled_from(candidates)))
    elif kind == "bytes":
        data = tensor.data
        out.data = draw(
            st.sampled_from([data[:-1], data + b"\x00", data[: len(data) // 2], b"", data * 2, data[:size]])
        )
    elif kind == "poison":
        data = bytearray(tensor.data)
        count = len(data) // size  # elements present (an earlier mutation may have changed the shape)
        if count:
            for _ in range(draw(st.integers(1, 3))):
                i = draw(st.integers(0, count - 1))
                data[i * size : (i + 1) * size] = draw(st.sampled_from(_POISON.get(size, _POISON[4])))
        out.data = bytes(data)
    elif kind == "values":
        # the largest finite floats first: a valid-looking vector that overflows once scaled inside the model
        fill = draw(st.sampled_from([3.4e38, -3.4e38, 1.7e38, 1e38, 1e30, 1e10, 1e6, 65504.0, 0.0, -0.0, 1e-45, 1e-30]))
        count = n if 0 < n <= 1 << 16 else 1  # an earlier mutation may have left an absurd shape
        out.dtype, out.data = "float32", np.full(count, fill, dtype=np.float32).tobytes()
    else:  # the same values in another valid dtype: must still work
        values = _decode(tensor)
        if values is not None:
            target = draw(st.sampled_from(["float64", "float32", "bfloat16", "float16"]))
            out.CopyFrom(_encode(values, target))
    return out


def _decode(tensor: pb.Tensor) -> np.ndarray | None:
    shape = list(tensor.shape)
    try:
        if tensor.dtype == "bfloat16":
            raw = np.frombuffer(tensor.data, dtype=np.uint16).astype(np.uint32) << 16
            return raw.view(np.float32).reshape(shape)
        if tensor.dtype in ("float32", "float64", "float16"):
            return np.frombuffer(tensor.data, dtype=np.dtype(tensor.dtype)).astype(np.float32).reshape(shape)
    except ValueError:
        return None
    return None


def _encode(values: np.ndarray, dtype: str) -> pb.Tensor:
    if dtype == "bfloat16":
        return bf16_tensor(values)
    a = np.ascontiguousarray(values, dtype=np.dtype(dtype))
    return pb.Tensor(dtype=dtype, shape=list(a.shape), data=a.tobytes())


def _repeat_sizes(fd: FieldDescriptor) -> tuple[int, ...]:
    # training inputs are traced one forward pass each: big counts only where the server rejects them up front
    costly = {"pairs": (2, 5, 1025, 3000), "examples": (9, 17, 2049, 5000), "reference_prompts": (2, 65, 200)}
    return costly.get(fd.name, (2, 3, 9, 17, 33, 257, 4097))


@st.composite
def mutate_site(draw: Callable, site: Site, ctx: ModelContext) -> None:
    """Change one site in place."""
    fd = site.field
    if fd.is_repeated and site.index is None and not _is_map(fd):
        items = list(getattr(site.parent, fd.name))
        action = draw(st.sampled_from(["clear", "repeat", "append", "drop", "reverse"]))
        if action == "clear" or (not items and action != "append"):
            items = []
        elif action == "repeat":
            n = draw(st.sampled_from(_repeat_sizes(fd)))
            items = [items[i % len(items)] for i in range(n)]
        elif action == "append":
            items.append(_value(draw, fd, MAX_DEPTH - 2))
        elif action == "drop":
            del items[draw(st.integers(0, len(items) - 1))]
        else:
            items.reverse()
        assign(site.parent, fd, items)
        return
    if _is_map(fd):
        assign(site.parent, fd, {})
        return
    if fd.message_type is not None:
        value = _current(site)
        present = site.index is not None or site.parent.HasField(fd.name)
        if fd.message_type.full_name == "interpgw.v1.Tensor" and present and value.data:
            _set(site, draw(tensor_mutation(value)))
        elif present and site.index is None and draw(st.booleans()):
            site.parent.ClearField(fd.name)
        else:
            _set(site, draw(random_message(fd.message_type, MAX_DEPTH - 3)))
        return
    value = _current(site) if (site.index is not None or not fd.has_presence or site.parent.HasField(fd.name)) else None
    if fd.cpp_type == FieldDescriptor.CPPTYPE_STRING:
        if fd.type == FieldDescriptor.TYPE_BYTES:
            _set(site, draw(BYTES))
        else:
            _set(site, draw(_string_mutations(site, value or "", ctx)))
        return
    if value is None:
        value = fd.default_value
    _set(site, draw(_number_mutations(site, value)))


@st.composite
def mutated_valid(draw: Callable, method: MethodDescriptor, ctx: ModelContext) -> Message:
    """A valid request of `method` with one to three mutations; random messages for RPCs without valid builders."""
    templates = valid_requests(method, ctx)
    if not templates:
        return draw(random_message(method.input_type))
    msg = message_class(method.input_type)()
    msg.CopyFrom(draw(st.sampled_from(templates)))
    for _ in range(draw(st.integers(1, 3))):
        by_kind: dict[str, list[Site]] = {}
        for site in sites(msg):
            by_kind.setdefault(_kind(site), []).append(site)
        if not by_kind:
            break
        # a kind first, then a site of that kind: tensors and numbers (few sites, most ways to be wrong) are picked
        # as often as the many string and message sites
        kinds = [k for k in _KIND_WEIGHTS for _ in range(_KIND_WEIGHTS[k]) if k in by_kind]
        site = draw(st.sampled_from(by_kind[draw(st.sampled_from(kinds))]))
        draw(mutate_site(site, ctx))
    return msg


_KIND_WEIGHTS = {"tensor": 4, "number": 4, "string": 3, "list": 2, "message": 1, "unset": 1}


def _kind(site: Site) -> str:
    fd = site.field
    if site.index is not None:
        present = True
    elif fd.is_repeated:
        present = len(getattr(site.parent, fd.name)) > 0
    elif fd.has_presence:
        present = site.parent.HasField(fd.name)
    else:
        present = getattr(site.parent, fd.name) != fd.default_value
    if not present:
        return "unset"
    if fd.is_repeated and site.index is None:
        return "list"
    if fd.message_type is not None:
        return "tensor" if fd.message_type.full_name == "interpgw.v1.Tensor" else "message"
    return "string" if fd.cpp_type == FieldDescriptor.CPPTYPE_STRING else "number"


# ---------------------------------------------------------------------------------------------- raw bytes

INVALID_UTF8 = (
    b"\xff",
    b"\xfe",
    b"\xc0\xaf",
    b"\xe0\x80\xaf",
    b"\xed\xa0\x80",
    b"\xf4\x90\x80\x80",
    b"\xe2\x82",
    b"\x80",
    b"\xf8\x88\x80\x80\x80",
    b"\xc3",
    b"a\xffb",
)
MARKER = "\x7fFUZZMARK\x7f"


def _string_sites(msg: Message) -> list[Site]:
    return [
        s
        for s in sites(msg)
        if s.field.type == FieldDescriptor.TYPE_STRING and not (s.field.is_repeated and s.index is None)
    ]


def _varint(value: int) -> bytes:
    out = bytearray()
    value &= (1 << 64) - 1
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def nested_groups(depth: int, field_number: int = 15) -> bytes:
    """`depth` nested start-group tags of an unknown field, each closed again."""
    start, end = _varint(field_number << 3 | 3), _varint(field_number << 3 | 4)
    return start * depth + end * depth


def nested_messages(depth: int, field_number: int = 1) -> bytes:
    """`depth` nested length-delimited messages in field `field_number`."""
    data = b""
    for _ in range(depth):
        data = _varint(field_number << 3 | 2) + _varint(len(data)) + data
    return data


@st.composite
def invalid_utf8_request(draw: Callable, msg: Message) -> bytes | None:
    """`msg` serialized with the bytes of one string field replaced by invalid UTF-8 of the same length."""
    copy = type(msg)()
    copy.CopyFrom(msg)
    candidates = _string_sites(copy)
    if not candidates:
        return None
    _set(draw(st.sampled_from(candidates)), MARKER)
    marker = MARKER.encode()
    bad = draw(st.sampled_from(INVALID_UTF8))
    return copy.SerializeToString().replace(marker, (bad + b"x" * len(marker))[: len(marker)], 1)


@st.composite
def raw_bytes(draw: Callable, method: MethodDescriptor, ctx: ModelContext) -> bytes:
    """A serialized request damaged at the byte level."""
    templates = valid_requests(method, ctx)
    if templates and draw(st.booleans()):
        msg = draw(st.sampled_from(templates))
    else:
        msg = draw(random_message(method.input_type, MAX_DEPTH - 2))
    data = msg.SerializeToString()
    kind = draw(
        st.sampled_from(
            ["truncate", "flip", "utf8", "groups", "nested", "append", "merge", "varint", "garbage", "wiretype"]
        )
    )
    if kind == "truncate" and data:
        return data[: draw(st.integers(0, len(data) - 1))]
    if kind == "flip" and data:
        buf = bytearray(data)
        for _ in range(draw(st.integers(1, 8))):
            bit = draw(st.integers(0, len(buf) * 8 - 1))
            buf[bit // 8] ^= 1 << (bit % 8)
        return bytes(buf)
    if kind == "utf8":
        base = message_class(method.input_type)()
        base.CopyFrom(msg)
        patched = draw(invalid_utf8_request(base))
        if patched is not None:
            return patched
        return data + _varint(1 << 3 | 2) + b"\x02\xc3\x28"  # field 1 as a string holding invalid UTF-8
    if kind == "groups":
        depth = draw(st.sampled_from([1, 10, 63, 64, 65, 99, 100, 101, 1000, 10_000, 100_000]))
        where = draw(st.sampled_from(["alone", "after", "unclosed", "mismatched"]))
        groups = nested_groups(depth)
        if where == "unclosed":
            return data + _varint(15 << 3 | 3) * depth
        if where == "mismatched":
            return data + _varint(15 << 3 | 3) * depth + _varint(16 << 3 | 4) * depth
        return data + groups if where == "after" else groups
    if kind == "nested":
        depth = draw(st.sampled_from([10, 64, 100, 101, 1000, 5000]))
        fields = [fd for fd in method.input_type.fields if fd.message_type is not None] or list(
            method.input_type.fields
        )
        number = draw(st.sampled_from([fd.number for fd in fields] or [1]))
        return data + nested_messages(depth, number)
    if kind == "append":
        return data + draw(st.binary(min_size=1, max_size=32))
    if kind == "merge":
        other = draw(random_message(method.input_type, MAX_DEPTH - 2)).SerializeToString()
        return data + other  # concatenation is a merge in protobuf: valid bytes, merged semantics
    if kind == "varint":
        return data + draw(
            st.sampled_from(
                [
                    b"\x08" + b"\xff" * 10 + b"\x01",  # a varint longer than 10 bytes
                    b"\x0a\xff\xff\xff\xff\x0f",  # length far beyond the message
                    b"\x12\x80\x80\x80\x80\x80\x80\x80\x80\x80\x01",  # length with an overlong varint
                    b"\x00\x01",  # field number 0
                    b"\xf8\xff\xff\xff\x0f\x01",  # field number 2**29 - 1
                    b"\x0f",  # wire type 7 (invalid)
                    b"\x0e\x00",  # wire type 6 (invalid)
                    b"\x0d\x00\x00",  # fixed32 cut short
                ]
            )
        )
    if kind == "wiretype":
        # a known field encoded with the wrong wire type
        fields = list(method.input_type.fields)
        if fields:
            fd = draw(st.sampled_from(fields))
            wrong = draw(st.sampled_from([0, 1, 2, 5]))
            payload = {0: b"\x96\x01", 1: b"\x00" * 8, 2: b"\x03abc", 5: b"\x00" * 4}[wrong]
            return data + _varint(fd.number << 3 | wrong) + payload
    return draw(st.binary(max_size=256))


# ---------------------------------------------------------------------------------------------- reporting


class Batch(list):
    """Requests sent together; shown abbreviated (long strings cut, bytes as hex) when hypothesis reports one."""

    def __repr__(self) -> str:
        return "Batch([\n" + ",\n".join(_brief(r) for r in self) + "\n])"


def _brief(request: Message | bytes, limit: int = 400) -> str:
    if isinstance(request, bytes):
        more = f" + {len(request) - limit} more bytes" if len(request) > limit else ""
        return f"  bytes.fromhex({request[:limit].hex()!r}){more}"
    shown = type(request)()
    shown.CopyFrom(request)
    _abbreviate(shown)
    body = text_format.MessageToString(shown, as_utf8=True, as_one_line=True)
    return f"  {type(request).__name__}({body[:2000]})"


def describe(message: Message | None, data: bytes, limit: int = 3000) -> str:
    """A request in a form a person can read and replay: text format (long strings abbreviated) and hex."""
    lines = []
    if message is not None:
        shown = type(message)()
        shown.CopyFrom(message)
        _abbreviate(shown)
        lines.append(f"{type(message).__name__} {{\n{text_format.MessageToString(shown, as_utf8=True)}}}")
    hex_data = data.hex()
    more = f" ... ({len(data)} bytes in all)" if len(hex_data) > limit else ""
    lines.append(f"bytes.fromhex({hex_data[:limit]!r}){more}")
    return "\n".join(lines)


def _abbreviate(msg: Message, limit: int = 120) -> None:
    for fd, value in msg.ListFields():
        if fd.message_type is not None and not _is_map(fd):
            for item in value if fd.is_repeated else [value]:
                _abbreviate(item, limit)
        elif fd.cpp_type == FieldDescriptor.CPPTYPE_STRING:
            items = [_short(v, limit) for v in (value[:20] if fd.is_repeated else [value])]
            assign(msg, fd, items) if fd.is_repeated else setattr(msg, fd.name, items[0])
        elif fd.is_repeated and len(value) > 20:
            assign(msg, fd, list(value[:20]))


def _short(value: str | bytes, limit: int) -> str | bytes:
    if len(value) <= limit:
        return value
    marker = f"...<{len(value)} in all>"
    return value[:limit] + (marker if isinstance(value, str) else marker.encode())
