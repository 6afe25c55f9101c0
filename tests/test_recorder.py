"""Unit tests of the worker-side recorder on a small vLLM-shaped module (no vLLM, fast).

The fake model mixes no information across tokens, so each token's activations depend only on its own id
and position: any mix-up of rows between requests in a flat batch shows up as a mismatch.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from interpgw.core.capture import HookOrder
from interpgw.core.hookpoints import all_hook_names
from interpgw.core.interventions import EditOp, EditOrder
from interpgw.core.positions import RowFilter
from interpgw.engine.recorder import ActivationRecorder, StepLayout

D_MODEL, N_LAYERS, VOCAB = 8, 3, 50


class FakeLayer(nn.Module):
    """Like vLLM's Llama layer: takes (positions, hidden, residual), returns (mlp_out, resid_mid)."""

    def __init__(self) -> None:
        super().__init__()
        self.self_attn = nn.Linear(D_MODEL, D_MODEL)
        self.mlp = nn.Linear(D_MODEL, D_MODEL)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, residual: torch.Tensor | None):
        resid_pre = hidden if residual is None else hidden + residual
        resid_mid = resid_pre + self.self_attn(resid_pre + positions[:, None].float())
        return self.mlp(resid_mid), resid_mid


class FakeNorm(nn.Module):
    def forward(self, hidden: torch.Tensor, residual: torch.Tensor):
        total = hidden + residual
        return total / total.norm(dim=-1, keepdim=True), total


class FakeInner(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(VOCAB, D_MODEL)
        self.layers = nn.ModuleList(FakeLayer() for _ in range(N_LAYERS))
        self.norm = FakeNorm()


class FakeModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.model = FakeInner()

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        hidden, residual = self.model.embed_tokens(input_ids), None
        for layer in self.model.layers:
            hidden, residual = layer(positions, hidden, residual)
        return self.model.norm(hidden, residual)[0]


class FakeRunner:
    """Feeds a recorder the way vLLM's runner does: flat batches, request ids, query_start_loc."""

    def __init__(self, allow_faults: bool = False) -> None:
        self.model = FakeModel()
        self.orders: dict[str, dict] = {}
        self.layout = StepLayout([], np.zeros(1, dtype=np.int32))
        self.recorder = ActivationRecorder(
            self.model, layout_fn=lambda: self.layout, order_fn=self.orders.get, allow_faults=allow_faults
        )

    @torch.no_grad()
    def step(self, scheduled: list[tuple[str, list[int], int]]) -> None:
        """scheduled: (req_id, token ids of this chunk, position of the chunk's first token)."""
        ids, positions, qsl = [], [], [0]
        for _, chunk, start in scheduled:
            ids += chunk
            positions += list(range(start, start + len(chunk)))
            qsl.append(len(ids))
        self.layout = StepLayout([r for r, _, _ in scheduled], np.array(qsl, dtype=np.int32))
        self.model(torch.tensor(ids), positions=torch.tensor(positions))


@torch.no_grad()
def alone(runner: FakeRunner, tokens: list[int]) -> dict[str, torch.Tensor]:
    """Reference: every hook point of one request run by itself, without the recorder."""
    runner.recorder.remove()
    store: dict[str, torch.Tensor] = {}
    inner = runner.model.model
    positions = torch.arange(len(tokens))
    hidden, residual = inner.embed_tokens(torch.tensor(tokens)), None
    store["hook_embed"] = hidden
    for i, layer in enumerate(inner.layers):
        pre = hidden if residual is None else hidden + residual
        attn = layer.self_attn(pre + positions[:, None].float())
        hidden, residual = layer(positions, hidden, residual)
        store |= {
            f"blocks.{i}.hook_resid_pre": pre,
            f"blocks.{i}.hook_attn_out": attn,
            f"blocks.{i}.hook_resid_mid": residual,
            f"blocks.{i}.hook_mlp_out": hidden,
            f"blocks.{i}.hook_resid_post": hidden + residual,
        }
    store["ln_final.hook_normalized"] = inner.norm(hidden, residual)[0]
    return store


def order(key: str, n_prompt: int, positions=None, generated=False, fault="", hooks=None) -> dict:  # noqa: ANN001
    hooks = tuple(hooks or all_hook_names(N_LAYERS))
    return HookOrder(key, hooks, n_prompt, positions, generated, fault=fault).to_extra_args()


def test_interleaved_chunked_requests_get_their_own_rows() -> None:
    runner = FakeRunner()
    a, b, c = [3, 4, 5, 6, 7, 8, 9], [10, 11, 12], [20, 21, 22, 23, 24]
    runner.orders |= {"ra": order("A", 7), "rb": order("B", 3, positions=(0, 2)), "rc": order("C", 5)}
    # step 1: a's first chunk, all of b, and an uncaptured request; step 2: a's rest and c; step 3: c decodes
    runner.step([("ra", a[:4], 0), ("rb", b, 0), ("plain", [1, 2], 0)])
    runner.step([("rc", c, 0), ("ra", a[4:], 4)])
    runner.step([("rc", [30], 5)])
    results = runner.recorder.pop(["A", "B", "C"])
    ref_a, ref_b, ref_c = alone(runner, a), alone(runner, b), alone(runner, c)
    assert results["A"]["positions"] == list(range(7))
    assert results["B"]["positions"] == [0, 2]
    assert results["C"]["positions"] == list(range(5)), "generated position 5 was not asked for"
    for hook in all_hook_names(N_LAYERS):
        torch.testing.assert_close(results["A"]["tensors"][hook], ref_a[hook])
        torch.testing.assert_close(results["B"]["tensors"][hook], ref_b[hook][[0, 2]])
        torch.testing.assert_close(results["C"]["tensors"][hook], ref_c[hook])


def test_generated_tokens_and_recomputation_after_preemption() -> None:
    runner = FakeRunner()
    tokens = [5, 6, 7]
    runner.orders["r"] = order("K", 3, positions=(2,), generated=True, hooks=["blocks.1.hook_resid_post"])
    runner.step([("r", tokens, 0)])
    runner.step([("r", [8], 3)])
    runner.step([("r", tokens + [8, 9], 0)])  # preempted, then recomputed from scratch
    result = runner.recorder.pop(["K"])["K"]
    assert result["positions"] == [2, 3, 4]
    expected = alone(runner, tokens + [8, 9])["blocks.1.hook_resid_post"][[2, 3, 4]]
    torch.testing.assert_close(result["tensors"]["blocks.1.hook_resid_post"], expected)


def test_overlapping_hook_sets_over_many_steps() -> None:
    """Requests recording different but overlapping hook points share each hook point's gather; one of them gets
    its rows into planes that are not consecutive in its buffer; 20 decode steps outgrow the first buffer."""
    runner = FakeRunner()
    subset = ["hook_embed", "blocks.1.hook_resid_post", "ln_final.hook_normalized"]
    runner.orders |= {
        "ra": order("A", 5, generated=True),
        "rb": order("B", 7, generated=True, hooks=subset),
        "rc": order("C", 3, generated=True, hooks=["blocks.1.hook_resid_post"]),
    }
    tokens = {"ra": [3, 4, 5, 6, 7], "rb": [10, 11, 12, 13, 14, 15, 16], "rc": [20, 21, 22]}
    runner.step([(req, ids, 0) for req, ids in tokens.items()])
    for step in range(20):
        scheduled = []
        for req, ids in tokens.items():
            ids.append(30 + step)
            scheduled.append((req, [ids[-1]], len(ids) - 1))
        runner.step(scheduled)
    results = runner.recorder.pop(["A", "B", "C"])
    for key, req, hooks in (("A", "ra", all_hook_names(N_LAYERS)), ("B", "rb", subset), ("C", "rc", subset[1:2])):
        reference = alone(runner, tokens[req])
        assert results[key]["error"] is None
        assert results[key]["positions"] == list(range(len(tokens[req])))
        assert sorted(results[key]["tensors"]) == sorted(hooks)
        for hook in hooks:
            torch.testing.assert_close(results[key]["tensors"][hook], reference[hook])


def test_a_failing_hook_fails_only_its_request() -> None:
    runner = FakeRunner(allow_faults=True)
    runner.orders |= {"bad": order("BAD", 2, fault="hook"), "good": order("GOOD", 3)}
    runner.step([("bad", [1, 2], 0), ("good", [3, 4, 5], 0)])
    results = runner.recorder.pop(["BAD", "GOOD"])
    assert "fault injected" in results["BAD"]["error"]
    assert results["GOOD"]["error"] is None
    torch.testing.assert_close(results["GOOD"]["tensors"]["hook_embed"], alone(runner, [3, 4, 5])["hook_embed"])


def test_faults_are_ignored_unless_enabled() -> None:
    runner = FakeRunner(allow_faults=False)
    runner.orders["bad"] = order("BAD", 2, fault="hook")
    runner.step([("bad", [1, 2], 0)])
    assert runner.recorder.pop(["BAD"])["BAD"]["error"] is None


def test_dtype_conversion_discard_and_unknown_keys() -> None:
    runner = FakeRunner()
    runner.orders |= {"r": HookOrder("K", ("hook_embed",), 2, None, False, dtype="bfloat16").to_extra_args()}
    runner.orders |= {"gone": order("GONE", 2)}
    runner.step([("r", [1, 2], 0), ("gone", [3, 4], 0)])
    runner.recorder.discard(["GONE"])
    results = runner.recorder.pop(["K", "GONE", "NEVER"])
    assert results["K"]["tensors"]["hook_embed"].dtype == torch.bfloat16
    assert results["GONE"] == results["NEVER"] == {"positions": [], "tensors": {}, "error": None}


@pytest.mark.parametrize("hook", ["blocks.0.hook_attn_out", "ln_final.hook_normalized"])
def test_only_requested_hooks_fire(hook: str) -> None:
    runner = FakeRunner()
    runner.orders["r"] = order("K", 2, hooks=[hook])
    runner.step([("r", [1, 2], 0)])
    assert set(runner.recorder.fire_counts) == {hook}
    assert set(runner.recorder.pop(["K"])["K"]["tensors"]) == {hook}


# ---------------------------------------------------------------------- edits


@torch.no_grad()
def reference(runner: FakeRunner, tokens: list[int], edits: dict) -> dict[str, torch.Tensor]:  # noqa: ANN001
    """Every hook point of one request run alone, each hook's stream passed through `edits[hook]` if given
    (TransformerLens semantics: the edited value flows on and is what that hook records)."""
    runner.recorder.remove()

    def at(hook: str, x: torch.Tensor) -> torch.Tensor:
        return edits[hook](x) if hook in edits else x

    store: dict[str, torch.Tensor] = {}
    inner = runner.model.model
    positions = torch.arange(len(tokens))
    stream = store["hook_embed"] = at("hook_embed", inner.embed_tokens(torch.tensor(tokens)))
    for i, layer in enumerate(inner.layers):
        pre = store[f"blocks.{i}.hook_resid_pre"] = at(f"blocks.{i}.hook_resid_pre", stream)
        attn = store[f"blocks.{i}.hook_attn_out"] = at(
            f"blocks.{i}.hook_attn_out", layer.self_attn(pre + positions[:, None].float())
        )
        mid = store[f"blocks.{i}.hook_resid_mid"] = at(f"blocks.{i}.hook_resid_mid", pre + attn)
        mlp = store[f"blocks.{i}.hook_mlp_out"] = at(f"blocks.{i}.hook_mlp_out", layer.mlp(mid))
        stream = store[f"blocks.{i}.hook_resid_post"] = at(f"blocks.{i}.hook_resid_post", mlp + mid)
    store["ln_final.hook_normalized"] = at("ln_final.hook_normalized", stream / stream.norm(dim=-1, keepdim=True))
    return store


def edit(op: str, hook: str, n_prompt: int, vector=None, positions=None, generated=True, **kw) -> EditOrder:  # noqa: ANN001, ANN003
    rows = RowFilter(prompt_len=n_prompt, prompt_positions=positions, generated=generated)
    vec = None if vector is None else tuple(float(v) for v in vector)
    return EditOrder(op=EditOp(op), hook=hook, rows=rows, vector=vec, **kw)


def edit_order(key: str, n_prompt: int, edits: list[EditOrder], hooks=None, fault="") -> dict:  # noqa: ANN001
    hooks = tuple(all_hook_names(N_LAYERS) if hooks is None else hooks)
    return HookOrder(key, hooks, n_prompt, None, True, fault=fault, edits=tuple(edits)).to_extra_args()


@pytest.mark.parametrize("hook", all_hook_names(N_LAYERS))
def test_an_edit_at_any_hook_point_matches_the_reference_and_stays_in_its_request(hook: str) -> None:
    runner = FakeRunner()
    vector = torch.randn(D_MODEL)
    a, b = [3, 4, 5, 6, 7], [10, 11, 12]
    runner.orders |= {
        "ra": edit_order("A", 5, [edit("add", hook, 5, vector, scale=2.0)]),
        "rb": edit_order("B", 3, []),
        "rc": edit_order("C", 3, [edit("project_out", hook, 3, vector)]),
    }
    runner.step([("ra", a[:2], 0), ("rb", b, 0), ("rc", b, 0)])  # chunked: a spans two steps
    runner.step([("ra", a[2:], 2)])
    results = runner.recorder.pop(["A", "B", "C"])
    unit = vector / vector.norm()
    ref_a = reference(runner, a, {hook: lambda x: x + 2.0 * vector})
    ref_b = reference(runner, b, {})
    ref_c = reference(runner, b, {hook: lambda x: x - (x @ unit)[:, None] * unit})
    for name in all_hook_names(N_LAYERS):
        torch.testing.assert_close(results["A"]["tensors"][name], ref_a[name], msg=f"A at {name}")
        torch.testing.assert_close(results["B"]["tensors"][name], ref_b[name], msg=f"B at {name}")
        torch.testing.assert_close(results["C"]["tensors"][name], ref_c[name], msg=f"C at {name}")
    assert results["C"]["tensors"][hook] @ unit == pytest.approx(torch.zeros(3), abs=1e-5)


def test_ops_in_order_at_one_hook_positions_and_generated_tokens() -> None:
    runner = FakeRunner()
    hook = "blocks.1.hook_resid_post"
    v, w = torch.randn(D_MODEL), torch.randn(D_MODEL)
    u = v / v.norm()
    ops = [
        edit("clamp", hook, 4, v, positions=(1, 3), generated=False, value=3.0),
        edit("add", hook, 4, w, positions=(3,), generated=False, scale=0.5),
        edit("scale", hook, 4, positions=(), generated=True, scale=-1.0),
        edit("set", hook, 4, w, positions=(0,), generated=False, norm_preserving=True),
    ]
    runner.orders["r"] = edit_order("K", 4, ops)
    tokens = [5, 6, 7, 8, 9]
    runner.step([("r", tokens[:4], 0)])
    runner.step([("r", tokens[4:], 4)])
    result = runner.recorder.pop(["K"])["K"]

    def expected(x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        x[[1, 3]] = x[[1, 3]] + (3.0 - x[[1, 3]] @ u)[:, None] * u
        x[3] = x[3] + 0.5 * w
        x[4] = -x[4]
        x[0] = w * (x[0].norm() / w.norm())
        return x

    ref = reference(runner, tokens, {hook: expected})
    for name in all_hook_names(N_LAYERS):
        torch.testing.assert_close(result["tensors"][name], ref[name], msg=name)
    assert float(result["tensors"][hook][1] @ u) == pytest.approx(3.0, abs=1e-5)


def test_a_failing_edit_fails_only_its_request() -> None:
    runner = FakeRunner(allow_faults=True)
    hook = "blocks.0.hook_resid_post"
    bad = edit("project_out", hook, 2, torch.ones(D_MODEL))
    runner.orders |= {"bad": edit_order("BAD", 2, [bad], fault="edit"), "good": edit_order("GOOD", 3, [bad])}
    runner.step([("bad", [1, 2], 0), ("good", [3, 4, 5], 0)])
    results = runner.recorder.pop(["BAD", "GOOD"])
    assert "fault injected into edit" in results["BAD"]["error"]
    unit = torch.ones(D_MODEL) / D_MODEL**0.5
    ref = reference(runner, [3, 4, 5], {hook: lambda x: x - (x @ unit)[:, None] * unit})
    torch.testing.assert_close(results["GOOD"]["tensors"]["ln_final.hook_normalized"], ref["ln_final.hook_normalized"])


def test_edit_only_requests_record_nothing_but_are_edited() -> None:
    runner = FakeRunner()
    vector = torch.randn(D_MODEL)
    runner.orders |= {
        "r": edit_order("K", 2, [edit("add", "hook_embed", 2, vector)], hooks=()),
        "watch": edit_order("W", 2, [edit("add", "hook_embed", 2, vector)], hooks=["hook_embed"]),
    }
    runner.step([("r", [1, 2], 0), ("watch", [1, 2], 0)])
    results = runner.recorder.pop(["K", "W"])
    assert results["K"] == {"positions": [], "tensors": {}, "error": None}
    torch.testing.assert_close(
        results["W"]["tensors"]["hook_embed"], runner.model.model.embed_tokens.weight[[1, 2]] + vector
    )
