"""The service core with a fake engine: validation and streaming logic, fast and without vLLM or gRPC."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import torch

from interpgw.config import LimitsConfig
from interpgw.core.capture import HookOrder
from interpgw.core.errors import GatewayError, Internal, InvalidArgument, ResourceExhausted
from interpgw.core.positions import PositionMode, PositionSelector
from interpgw.core.prompts import PromptEncoder
from interpgw.core.requests import (
    CaptureOptions,
    ChatTurn,
    GenerateDone,
    GenerateInput,
    PromptInput,
    SamplingInput,
    TokenDelta,
    TraceInput,
)
from interpgw.engine.base import CaptureResult, EngineStep, ModelFacts, SamplingOptions
from interpgw.service import GatewayService, ServedModel

FACTS = ModelFacts("fake", "FakeForCausalLM", 2, 4, 100, "float32", 32, "memory")


class FakeTokenizer:
    chat_template = "{{ messages }}"

    def __call__(self, text: str, add_special_tokens: bool = True):  # noqa: ANN204
        class Encoded:
            input_ids = [ord(c) % 100 for c in text]

        return Encoded()

    def apply_chat_template(self, messages, tokenize: bool, add_generation_prompt: bool) -> str:  # noqa: ANN001
        return "".join(f"<{m['role']}>{m['content']}" for m in messages) + ("<a>" if add_generation_prompt else "")

    def decode(self, ids: list[int]) -> str:
        return "".join(chr(97 + i % 26) for i in ids)


class FakeEngine:
    """Emits token i+1 after token i; captures are deterministic tensors tagged by position."""

    def __init__(self) -> None:
        self.facts = FACTS
        self.orders: dict[str, tuple[HookOrder, int]] = {}
        self.discarded: list[str] = []
        self.seen: list[HookOrder] = []  # every order, in arrival order

    async def generate(
        self, request_id: str, prompt_token_ids: list[int], sampling: SamplingOptions, capture: HookOrder | None
    ) -> AsyncIterator[EngineStep]:
        token = prompt_token_ids[-1]
        if capture is not None:
            self.seen.append(capture)
        for i in range(sampling.max_tokens):
            await asyncio.sleep(0)
            token = (token + 1) % FACTS.vocab_size
            if capture is not None:
                self.orders[capture.key] = (capture, i + 1)
            last = i == sampling.max_tokens - 1
            yield EngineStep(
                [token],
                f"t{token}",
                finished=last,
                finish_reason="length" if last else None,
                top_logprobs=[[(token, -0.5, "x")]] if sampling.top_logprobs else [],
            )

    async def collect(self, keys: list[str]) -> dict[str, CaptureResult]:
        results = {}
        for key in keys:
            order, n_out = self.orders.pop(key)
            positions = list(order.prompt_positions or range(order.prompt_len))
            if order.generated:
                positions += list(range(order.prompt_len, order.prompt_len + n_out - 1))
            rows = torch.tensor(positions, dtype=torch.float32)[:, None].expand(-1, FACTS.d_model)
            error = "boom" if order.fault else None
            results[key] = CaptureResult(positions, {h: rows.clone() for h in order.hooks}, error)
        return results

    async def discard(self, keys: list[str]) -> None:
        self.discarded += keys

    async def shutdown(self) -> None: ...


def make_service(**limits) -> GatewayService:  # noqa: ANN003
    encoder = PromptEncoder(FakeTokenizer(), FACTS.vocab_size, FACTS.max_model_len)
    return GatewayService([ServedModel(FakeEngine(), encoder, 5)], LimitsConfig(**limits), allow_faults=True)


async def drain(stream: AsyncIterator) -> list:
    return [event async for event in stream]


def run(coro):  # noqa: ANN001, ANN201
    return asyncio.run(coro)


def test_generate_streams_tokens_then_done_with_captures() -> None:
    service = make_service()
    capture = CaptureOptions(
        hooks=("blocks.-1.hook_resid_post",), positions=PositionSelector(PositionMode.LAST), generated=True
    )
    events = run(
        drain(
            service.generate(
                GenerateInput(PromptInput(text="abc"), sampling=SamplingInput(max_tokens=3), capture=capture)
            )
        )
    )
    deltas, done = events[:-1], events[-1]
    assert [d.index for d in deltas] == [0, 1, 2] and all(isinstance(d, TokenDelta) for d in deltas)
    assert isinstance(done, GenerateDone) and done.finish_reason == "length"
    assert done.output_token_ids == [d.token_ids[0] for d in deltas]
    assert done.captured.positions == [2, 3, 4]
    assert list(done.captured.tensors) == ["blocks.1.hook_resid_post"]


def test_trace_runs_prompts_concurrently_and_returns_each() -> None:
    service = make_service()
    request = TraceInput(
        prompts=(PromptInput(text="abcd"), PromptInput(token_ids=(1, 2))),
        top_k_logits=1,
        capture=CaptureOptions(hooks=("hook_embed",)),
    )
    results = sorted(run(drain(service.trace(request))), key=lambda r: r.prompt_index)
    assert [len(r.token_ids) for r in results] == [4, 2]
    assert results[1].captured.positions == [0, 1]
    assert results[0].top_logits.logprobs == [-0.5]


def test_chat_prompts_use_the_template() -> None:
    service = make_service()
    prompt = PromptInput(chat=(ChatTurn("user", "hi"),))
    done = run(drain(service.generate(GenerateInput(prompt, sampling=SamplingInput(max_tokens=1)))))[-1]
    assert len(done.prompt_token_ids) == len("<user>hi<a>")


@pytest.mark.parametrize(
    ("request_", "error", "fragment"),
    [
        (GenerateInput(PromptInput(text="")), InvalidArgument, "prompt text is empty"),
        (GenerateInput(PromptInput(token_ids=())), InvalidArgument, "token ids are empty"),
        (GenerateInput(PromptInput(token_ids=(100,))), InvalidArgument, r"valid ids are \[0, 99\]"),
        (GenerateInput(PromptInput(text="x" * 40)), InvalidArgument, "context is 32 tokens"),
        (
            GenerateInput(PromptInput(text="x" * 20), sampling=SamplingInput(max_tokens=20)),
            InvalidArgument,
            "leaves room for 12 new tokens",
        ),
        (GenerateInput(PromptInput(text="x"), model="nope"), InvalidArgument, "served models: fake"),
        (
            GenerateInput(PromptInput(text="x"), sampling=SamplingInput(temperature=float("nan"))),
            InvalidArgument,
            "temperature",
        ),
        (GenerateInput(PromptInput(text="x"), sampling=SamplingInput(top_p=0.0)), InvalidArgument, "top_p"),
        (
            GenerateInput(PromptInput(text="x"), sampling=SamplingInput(max_tokens=10_000)),
            InvalidArgument,
            "max_tokens must be in",
        ),
        (GenerateInput(PromptInput(chat=(ChatTurn("robot", "x"),))), InvalidArgument, "valid roles"),
        (
            GenerateInput(PromptInput(text="x"), capture=CaptureOptions(hooks=("blocks.5.hook_resid_post",))),
            InvalidArgument,
            r"L must be in \[-2, 1\]",
        ),
        (
            GenerateInput(PromptInput(text="x"), capture=CaptureOptions(hooks=("hook_embed",), dtype="int8")),
            InvalidArgument,
            "valid: '' \\(model dtype\\), float32",
        ),
        (
            GenerateInput(
                PromptInput(text="xy"),
                capture=CaptureOptions(hooks=("hook_embed",), positions=PositionSelector(PositionMode.INDICES, (5,))),
            ),
            InvalidArgument,
            "out of range for a prompt of 2 tokens",
        ),
        (TraceInput(prompts=()), InvalidArgument, "at least one prompt"),
        (TraceInput(prompts=(PromptInput(text="x"),), top_k_logits=6), InvalidArgument, r"top_k_logits must be in"),
        (TraceInput(prompts=(PromptInput(text="ok"), PromptInput(text=""))), InvalidArgument, "prompt 1: "),
    ],
)
def test_bad_requests_get_clear_errors(request_, error: type[GatewayError], fragment: str) -> None:  # noqa: ANN001
    service = make_service()
    stream = service.trace(request_) if isinstance(request_, TraceInput) else service.generate(request_)
    with pytest.raises(error, match=fragment):
        run(drain(stream))


def test_byte_limit_is_resource_exhausted() -> None:
    service = make_service(max_capture_bytes=500)
    capture = CaptureOptions(hooks=("hook_embed", "blocks.0.hook_resid_post"), generated=True)
    with pytest.raises(ResourceExhausted, match="up to 864 bytes; the server.s limit is 500 bytes"):
        run(
            drain(
                service.generate(
                    GenerateInput(PromptInput(text="abcdefgh"), capture=capture, sampling=SamplingInput(max_tokens=20))
                )
            )
        )


def test_capture_failure_is_internal_for_that_request_only() -> None:
    service = make_service()
    capture = CaptureOptions(hooks=("hook_embed",))
    with pytest.raises(Internal, match="others are unaffected"):
        run(drain(service.generate(GenerateInput(PromptInput(text="ab"), capture=capture), fault="hook")))
    done = run(drain(service.generate(GenerateInput(PromptInput(text="ab"), capture=capture))))[-1]
    assert done.captured.positions == [0, 1]


def test_an_abandoned_stream_discards_its_captures() -> None:
    service = make_service()
    engine = service.model().engine

    async def abandon() -> None:
        stream = service.generate(
            GenerateInput(
                PromptInput(text="ab"),
                capture=CaptureOptions(hooks=("hook_embed",)),
                sampling=SamplingInput(max_tokens=5),
            )
        )
        await stream.__anext__()
        await stream.aclose()
        await asyncio.sleep(0.01)

    run(abandon())
    assert len(engine.discarded) == 1


# ---------------------------------------------------------------------- interventions, registry, patching


def steer_input(**kwargs) -> GenerateInput:  # noqa: ANN003
    from interpgw.core.interventions import EditOp, InterventionSpec, TargetMode, TargetSpec

    spec = InterventionSpec(
        op=EditOp.ADD, hook="blocks.-1.hook_resid_post", target=TargetSpec(TargetMode.LAST_N, n=2),
        vector=torch.ones(FACTS.d_model),
    )  # fmt: skip
    return GenerateInput(PromptInput(text="abcde"), sampling=SamplingInput(max_tokens=3, temperature=0.7), **kwargs,
                         interventions=(spec,))  # fmt: skip


def test_interventions_reach_the_engine_as_absolute_edits() -> None:
    service = make_service()
    run(drain(service.generate(steer_input())))
    (order,) = service.model().engine.seen
    (edit,) = order.edits
    assert order.hooks == () and edit.hook == "blocks.1.hook_resid_post" and edit.vector == (1.0,) * 4
    assert edit.rows.prompt_positions == (3, 4) and not edit.rows.generated


def test_compare_unsteered_streams_two_variants_with_one_seed() -> None:
    service = make_service()
    events = run(drain(service.generate(steer_input(compare_unsteered=True))))
    done = [e for e in events if isinstance(e, GenerateDone)]
    assert sorted(d.variant for d in done) == [0, 1]
    assert done[0].seed is not None and done[0].seed == done[1].seed, "random sampling needs one shared seed"
    assert {e.variant for e in events if isinstance(e, TokenDelta)} == {0, 1}
    with pytest.raises(InvalidArgument, match="needs at least one intervention"):
        run(drain(service.generate(GenerateInput(PromptInput(text="ab"), compare_unsteered=True))))


def test_registry_errors() -> None:
    from interpgw.core.errors import NotFound

    service = make_service()
    with pytest.raises(InvalidArgument, match=r"expected \[2, 4\]"):
        run(service.steering.create_vector("", ["hook_embed", "blocks.0.hook_resid_post"], torch.ones(3, 4)))
    with pytest.raises(InvalidArgument, match="duplicate hooks"):
        run(
            service.steering.create_vector(
                "", ["blocks.1.hook_resid_post", "blocks.-1.hook_resid_post"], torch.ones(2, 4)
            )
        )
    record = run(service.steering.create_vector("", ["blocks.-1.hook_resid_post"], torch.ones(4), name="ones"))
    assert record.hooks == ("blocks.1.hook_resid_post",) and record.model == "fake"
    assert [r.id for r in run(service.steering.list_vectors())] == [record.id]
    with pytest.raises(InvalidArgument, match="unknown model"):
        run(service.steering.list_vectors("other"))
    assert run(service.steering.delete_vector(record.id)) is True
    with pytest.raises(NotFound):
        run(service.steering.delete_vector(record.id))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"corrupted": PromptInput(text="abcdef")}, "same number of tokens"),
        ({"hook": "hook_nope"}, "unknown patch hook"),
        ({"metric": "kl"}, "unknown metric"),
        ({"foil": None}, "needs a foil"),
        ({"target": "ab"}, "exactly one"),
        ({"layers": (5,)}, "out of range"),
    ],
)
def test_patch_validation(kwargs: dict, message: str) -> None:
    from interpgw.core.requests import PatchInput

    request = {"clean": PromptInput(text="abcd"), "corrupted": PromptInput(text="abce"), "target": 3, "foil": 4}
    with pytest.raises(InvalidArgument, match=message):
        run(make_service().steering.patch(PatchInput(**(request | kwargs))))
