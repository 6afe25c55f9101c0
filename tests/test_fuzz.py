"""Fuzzing every RPC of a real gateway: random, mutated-valid and byte-damaged requests (strategies in proto_fuzz.py).

The gateway (the tiny random Llama, real Redis, small limits so valid requests stay cheap) must answer every request
within its deadline with an expected status: OK, INVALID_ARGUMENT (with a readable message), NOT_FOUND,
RESOURCE_EXHAUSTED, FAILED_PRECONDITION or OUT_OF_RANGE. INTERNAL, UNKNOWN, UNAVAILABLE or DEADLINE_EXCEEDED (a hang)
fail with the method, the status, its message and the request in replayable form. Afterwards the process must still
be alive and SERVING, well-formed requests must give exactly what they gave before the fuzzing (token ids equal,
tensors bit-identical), and the log must hold no "unexpected error in RPC".

Requests go out in concurrent batches (hypothesis draws a batch per example), so the engine batches them as it would
a real load. `derandomize=True`: the same requests every run.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import proto_fuzz as pf
import pytest
from google.protobuf.descriptor import MethodDescriptor
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st

from gateway_process import GatewayProcess
from interpgw.v1 import gateway_pb2 as pb
from tiny_models import TINY_SERVER_ARGS

pytestmark = pytest.mark.engine

# small limits: a valid random request stays cheap (16 tokens at most, 8 prompts, 1 MiB of activations)
FUZZ_SERVER_ARGS = (
    "--max-new-tokens", "16",
    "--max-trace-prompts", "8",
    "--max-capture-bytes", str(2**20),
    "--max-interventions", "8",
    "--cache-max-entry-bytes", str(2**20),
)  # fmt: skip
DEADLINE_S = 30.0  # per call; DEADLINE_EXCEEDED means the gateway hung on a request
BATCH = 8  # requests in flight at once (one hypothesis example)
MIN_TOTAL_REQUESTS = 3000

Code = grpc.StatusCode
ALLOWED = {
    Code.OK,
    Code.INVALID_ARGUMENT,
    Code.NOT_FOUND,
    Code.RESOURCE_EXHAUSTED,
    Code.FAILED_PRECONDITION,
    Code.OUT_OF_RANGE,
}
# a message that is only an exception's class or repr tells the client nothing
_BARE_EXCEPTION = re.compile(r"^(<class '[\w.]+'>|[\w.]*(Error|Exception)(\(.*\))?|'.*'|\(.*\))$", re.S)
# what the client sees when the server's status message was too long for gRPC's metadata limit
_CLIENT_SIDE = ("metadata size exceeds", "Received message larger than max", "Stream removed")

METHODS = pf.methods()
# hypothesis examples per RPC (each sends a batch of BATCH requests): (random, mutated-valid, damaged bytes).
# Model-running RPCs get more mutated-valid examples: their requests have the most fields to get wrong.
EXAMPLES = {
    "Generate": (8, 30, 4),
    "Trace": (8, 30, 4),
    "Patch": (6, 16, 4),
    "TrainVector": (6, 10, 4),
    "TrainProbe": (6, 10, 4),
    "CreateVector": (10, 16, 4),
}
DEFAULT_EXAMPLES = (12, 12, 4)
# INTERPGW_FUZZ_SCALE=N: N times as many examples; INTERPGW_FUZZ_SEED=S: other requests than the fixed default set
SCALE = float(os.environ.get("INTERPGW_FUZZ_SCALE", "1"))
SEED = os.environ.get("INTERPGW_FUZZ_SEED")


def examples(method: MethodDescriptor, family: int) -> int:
    return max(1, round(EXAMPLES.get(method.name, DEFAULT_EXAMPLES)[family] * SCALE))


def fuzz_settings(n: int) -> Callable:
    # INTERPGW_FUZZ_NO_SHRINK=1: report the first failing batch as drawn (shrinking re-sends many batches)
    shrink = os.environ.get("INTERPGW_FUZZ_NO_SHRINK") != "1"
    configured = settings(
        max_examples=n,
        phases=[Phase.explicit, Phase.reuse, Phase.generate, *([Phase.shrink] if shrink else [])],
        deadline=None,
        derandomize=SEED is None,
        database=None,
        print_blob=False,
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.large_base_example,
            HealthCheck.filter_too_much,
            HealthCheck.function_scoped_fixture,
        ],
    )
    if SEED is None:
        return configured
    return lambda test: seed(int(SEED))(configured(test))


class WrongAnswer(AssertionError):
    """The gateway answered a fuzz request with a status it must not use (or an unreadable message)."""


@dataclass
class Outcome:
    code: grpc.StatusCode
    details: str
    responses: list[bytes]
    seconds: float


class Fuzzer:
    """A channel to the gateway under test, what the valid builders know about it, and the request counts."""

    def __init__(self, gateway: GatewayProcess) -> None:
        self.gateway = gateway
        big = 256 * 2**20
        self.channel = grpc.insecure_channel(
            gateway.address, options=[("grpc.max_receive_message_length", big), ("grpc.max_send_message_length", big)]
        )
        self.pool = ThreadPoolExecutor(BATCH)
        self.counts: Counter[tuple[str, str]] = Counter()
        self.slowest: dict[str, float] = {}
        self.dump_dir = Path(tempfile.mkdtemp(prefix="interpgw-fuzz-"))
        self._calls = {}
        for method in METHODS:
            path = pf.method_path(method)
            # no serializers: bytes in, bytes out
            factory = self.channel.unary_stream if method.server_streaming else self.channel.unary_unary
            self._calls[method.name] = factory(path)
        self.ctx = self._context()
        self.baseline = self.well_formed_results()

    # ------------------------------------------------------------------ typed calls for the set-up

    def call(self, method: str, request: Message) -> list[Message]:
        descriptor = pf.SERVICE.methods_by_name[method]
        outcome = self.send(descriptor, request.SerializeToString())
        assert outcome.code == Code.OK, f"{method} failed: {outcome.code.name}: {outcome.details}"
        out = pf.message_class(descriptor.output_type)
        return [out.FromString(r) for r in outcome.responses]

    def _context(self) -> pf.ModelContext:
        info = self.call("GetModelInfo", pb.GetModelInfoRequest())[0]
        ctx = pf.ModelContext(info.id, info.n_layers, info.d_model, info.vocab_size, tuple(info.hook_points))
        d = info.d_model

        def vector(hooks: tuple[str, ...], seed: int) -> str:
            tensor = pf.f32_tensor(pf.direction(d, seed, (len(hooks),)))
            return self.call("CreateVector", pb.CreateVectorRequest(hooks=list(hooks), tensor=tensor, name="fuzz"))[
                0
            ].id

        ctx.vector_id = vector(pf.VECTOR_HOOKS, 100)
        ctx.deletable_vectors = tuple(vector(("hook_embed",), 200 + i) for i in range(12))
        probe_request = pf.VALID_BUILDERS["TrainProbe"](ctx)[0]
        ctx.probe_id = self.call("TrainProbe", probe_request)[0].id
        ctx.deletable_probes = tuple(self.call("TrainProbe", probe_request)[0].id for _ in range(4))
        stored = pb.TraceRequest(
            prompts=[pf.tokens(pf.STORED_PROMPT_IDS)],
            capture=pb.CaptureSpec(hooks=list(info.hook_points), dtype="float32"),
            store=True,
        )
        ctx.trace_handle = self.call("Trace", stored)[0].prompt.handle
        assert ctx.trace_handle
        self._check_valid_builders(ctx)
        return ctx

    def _check_valid_builders(self, ctx: pf.ModelContext) -> None:
        """Every template the mutations start from must itself succeed (Delete*: one id of each pool)."""
        for method in METHODS:
            templates = pf.valid_requests(method, ctx)
            if method.name.startswith("Delete"):
                templates = templates[-1:]
            for request in templates:
                outcome = self.send(method, request.SerializeToString())
                assert outcome.code == Code.OK, (
                    f"valid {method.name} request failed: {outcome.code.name}: {outcome.details}\n"
                    f"{pf.describe(request, request.SerializeToString())}"
                )
        ctx.deletable_vectors = ctx.deletable_vectors[:-1]
        ctx.deletable_probes = ctx.deletable_probes[:-1]

    def context_for(self, method: MethodDescriptor) -> pf.ModelContext:
        """What mutations may use: deleting RPCs never see the ids the other templates depend on."""
        if method.name.startswith(("Delete", "Revoke")):
            return dataclasses.replace(self.ctx, vector_id="", probe_id="", trace_handle="")
        return self.ctx

    # ------------------------------------------------------------------ sending and judging

    def send(self, method: MethodDescriptor, payload: bytes) -> Outcome:
        start = time.monotonic()
        try:
            result = self._calls[method.name](payload, timeout=DEADLINE_S)
            responses = list(result) if method.server_streaming else [result]
            code, details = Code.OK, ""
        except grpc.RpcError as exc:
            responses, code, details = [], exc.code(), exc.details() or ""
        return Outcome(code, details, responses, time.monotonic() - start)

    def problem(self, method: MethodDescriptor, outcome: Outcome) -> str | None:
        code, details = outcome.code, outcome.details
        if code == Code.DEADLINE_EXCEEDED:
            return f"no answer within {DEADLINE_S:g} s (the gateway hung on this request)"
        if code not in ALLOWED:
            return f"unexpected status {code.name}"
        if code == Code.RESOURCE_EXHAUSTED and any(s in details for s in _CLIENT_SIDE):
            return "the status message was too long for gRPC's metadata limit (the client never saw it)"
        if code != Code.OK and (not details.strip() or _BARE_EXCEPTION.match(details.strip())):
            return f"{code.name} without a readable message"
        if code == Code.OK:
            out = pf.message_class(method.output_type)
            try:
                for raw in outcome.responses:
                    out.FromString(raw)
            except Exception as exc:  # noqa: BLE001
                return f"malformed response: {exc}"
        return None

    def run_batch(self, family: str, method: MethodDescriptor, batch: list[Message | bytes]) -> None:
        """Send a batch concurrently; fail with every request that got a wrong answer."""
        payloads = [r if isinstance(r, bytes) else r.SerializeToString() for r in batch]
        outcomes = list(self.pool.map(lambda p: self.send(method, p), payloads))
        self.counts[(family, method.name)] += len(batch)
        self.slowest[method.name] = max([self.slowest.get(method.name, 0.0)] + [o.seconds for o in outcomes])
        failures = []
        for request, payload, outcome in zip(batch, payloads, outcomes, strict=True):
            problem = self.problem(method, outcome)
            if problem is None:
                continue
            dump = self.dump_dir / f"{method.name}-{len(list(self.dump_dir.iterdir()))}.bin"
            dump.write_bytes(payload)
            kind = "stream" if method.server_streaming else "unary"
            failures.append(
                f"{method.name}: {problem}: {outcome.code.name}: {outcome.details[:2000]!r}\n"
                f"request ({family}; full bytes in {dump}; replay: channel.unary_{kind}('{pf.method_path(method)}')"
                f"(payload, timeout=30)):\n{pf.describe(None if isinstance(request, bytes) else request, payload)}"
            )
        if failures and self.gateway.process.poll() is not None:
            failures.append(f"the gateway exited with {self.gateway.process.returncode}:\n{self.gateway.log_tail()}")
        if failures:
            raise WrongAnswer(
                f"{len(failures)} of {len(batch)} requests got a wrong answer:\n\n" + "\n\n".join(failures)
            )

    # ------------------------------------------------------------------ well-formed requests, before and after

    def well_formed_results(self) -> dict[str, object]:
        """Results that must not change: greedy tokens, activations (bytes), model info, stored data."""
        generate = pb.GenerateRequest(
            prompt=pf.text("The capital of France is"),
            sampling=pb.SamplingParams(max_tokens=8, temperature=0, ignore_eos=True),
            capture=pb.CaptureSpec(
                hooks=["blocks.-1.hook_resid_post"],
                positions=pb.PositionSelector(mode=1),
                generated=True,
                dtype="float32",
            ),
        )
        events = self.call("Generate", generate)
        done = events[-1].done
        chunks = [e.tensor.data for e in events if e.HasField("tensor")]
        trace = pb.TraceRequest(
            prompts=[pf.text("Paris is in France, and Rome is in")],
            capture=pb.CaptureSpec(hooks=["blocks.1.hook_resid_post"], dtype="float32"),
            top_k_logits=5,
            cache=pb.CACHE_BYPASS,
        )

        def traced(request: pb.TraceRequest) -> tuple:
            responses = self.call("Trace", request)
            prompt = responses[0].prompt
            data = b"".join(r.tensor.data for r in responses[1:])
            return (list(prompt.token_ids), list(prompt.top_logits.token_ids), list(prompt.top_logits.logprobs), data)

        cached = pb.TraceRequest()
        cached.CopyFrom(trace)
        cached.cache = pb.CACHE_USE
        return {
            "model_info": self.call("GetModelInfo", pb.GetModelInfoRequest())[0].SerializeToString(),
            "generate": (list(done.output_token_ids), list(done.captured_positions), b"".join(chunks)),
            "trace": traced(trace),
            "trace_cached": traced(cached),
            "vector": self.call("GetVector", pb.GetVectorRequest(id=self.ctx.vector_id))[0].tensor.data,
            "stored_trace": [
                r.SerializeToString() for r in self.call("GetTrace", pb.GetTraceRequest(handle=self.ctx.trace_handle))
            ],
        }

    def close(self) -> None:
        self.pool.shutdown()
        self.channel.close()


@pytest.fixture(scope="module")
def fuzz_gateway(tiny_llama_dir: Path, redis_args: tuple[str, ...]):
    args = list(redis_args)
    args[args.index("--redis-prefix") + 1] += "fuzz:"  # own keys, still removed with the session's prefix
    gateway = GatewayProcess("--model", str(tiny_llama_dir), *TINY_SERVER_ARGS, *FUZZ_SERVER_ARGS, *args)
    yield gateway
    gateway.stop()


@pytest.fixture(scope="module")
def fuzz(fuzz_gateway: GatewayProcess):
    fuzzer = Fuzzer(fuzz_gateway)
    yield fuzzer
    fuzzer.close()


IDS = [m.name for m in METHODS]


@pytest.mark.parametrize("method", METHODS, ids=IDS)
def test_random_requests(fuzz: Fuzzer, method: MethodDescriptor) -> None:
    """Random messages of the RPC's request type (no knowledge of the model)."""

    @fuzz_settings(examples(method, 0))
    @given(batch=st.lists(pf.random_message(method.input_type), min_size=BATCH, max_size=BATCH).map(pf.Batch))
    def check(batch: pf.Batch) -> None:
        fuzz.run_batch("random", method, batch)

    check()


@pytest.mark.parametrize("method", METHODS, ids=IDS)
def test_mutated_valid_requests(fuzz: Fuzzer, method: MethodDescriptor) -> None:
    """Valid requests with one to three fields made wrong (or odd but valid); first, requests that once failed."""
    ctx = fuzz.context_for(method)
    regressions = pf.regression_requests(method, ctx)
    if regressions:
        fuzz.run_batch("regression", method, regressions)

    @fuzz_settings(examples(method, 1))
    @given(batch=st.lists(pf.mutated_valid(method, ctx), min_size=BATCH, max_size=BATCH).map(pf.Batch))
    def check(batch: pf.Batch) -> None:
        fuzz.run_batch("mutated", method, batch)

    check()


@pytest.mark.parametrize("method", METHODS, ids=IDS)
def test_damaged_bytes(fuzz: Fuzzer, method: MethodDescriptor) -> None:
    """Serialized requests damaged at the byte level: undecodable ones must be INVALID_ARGUMENT, not INTERNAL."""
    ctx = fuzz.context_for(method)

    @fuzz_settings(examples(method, 2))
    @given(batch=st.lists(pf.raw_bytes(method, ctx), min_size=BATCH, max_size=BATCH).map(pf.Batch))
    def check(batch: pf.Batch) -> None:
        fuzz.run_batch("raw", method, batch)

    check()


def test_gateway_survives_and_answers_as_before(fuzz: Fuzzer, fuzz_gateway: GatewayProcess) -> None:
    """After the fuzzing: alive, SERVING, the same results bit for bit, no unexpected error in the log."""
    assert fuzz_gateway.process.poll() is None, f"the gateway died:\n{fuzz_gateway.log_tail()}"
    health = health_pb2_grpc.HealthStub(fuzz.channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    after = fuzz.well_formed_results()
    for name, before in fuzz.baseline.items():
        assert after[name] == before, f"{name}: the result changed after the fuzzing"
    generated = np.frombuffer(after["generate"][2], dtype=np.float32)
    assert np.isfinite(generated).all()
    log = fuzz_gateway.log_path.read_text(errors="replace")
    assert "unexpected error in RPC" not in log, log[log.index("unexpected error in RPC") - 200 :][:6000]
    families = {family for family, _ in fuzz.counts}
    total = sum(fuzz.counts.values())
    per_method = Counter()
    for (_, name), n in fuzz.counts.items():
        per_method[name] += n
    print(
        f"\nfuzz: {total} requests; per RPC: {dict(per_method)}; slowest call per RPC (s): "
        f"{ {k: round(v, 2) for k, v in fuzz.slowest.items()} }"
    )
    if {"random", "mutated", "raw"} <= families:  # the whole file ran
        assert total >= MIN_TOTAL_REQUESTS, f"only {total} requests were sent"
