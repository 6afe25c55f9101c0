"""Interventions, the steering-vector registry, side-by-side generation and patching, end to end.

Real gateway processes (vLLM engines, the real Redis for the registry), the SDK, and a Hugging Face
transformers forward of the same weights with the same edits as the reference (fp32).
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch

from interpgw_client import AsyncClient, Intervention
from interpgw_client.errors import InvalidArgumentError, NotFoundError
from reference import hf_activations, hf_greedy

pytestmark = pytest.mark.engine

TINY_LAYERS, TINY_D = 4, 128
PROMPTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Paris is the capital of France and",
    "In 1969, Neil Armstrong became the first person to walk on the Moon. Then",
    "Water boils at",
]


def unit(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm()


def random_vector(seed: int, d: int = TINY_D, scale: float = 4.0) -> torch.Tensor:
    return torch.randn(d, generator=torch.Generator().manual_seed(seed)) * scale


# ---------------------------------------------------------------------- edits equal a reference forward


EDIT_CASES = {
    "add resid_post (all)": (
        Intervention("add", "blocks.1.hook_resid_post", random_vector(1), scale=2.0),
        lambda x: x + 2.0 * random_vector(1),
    ),
    "project_out resid_pre 0": (
        Intervention("project_out", "blocks.0.hook_resid_pre", random_vector(2)),
        lambda x: x - (x @ unit(random_vector(2)))[:, None] * unit(random_vector(2)),
    ),
    "clamp attn_out at indices": (
        Intervention("clamp", "blocks.2.hook_attn_out", random_vector(3), value=5.0, positions=[0, -1]),
        "clamp",
    ),
    "set resid_mid last 2, norm-preserving": (
        Intervention("set", "blocks.1.hook_resid_mid", random_vector(4), positions=("last", 2), norm_preserving=True),
        "set",
    ),
    "scale mlp_out": (Intervention("scale", "blocks.3.hook_mlp_out", scale=0.5), lambda x: 0.5 * x),
    "zero embed window": (Intervention("zero", "hook_embed", window=(2, 4)), "zero"),
    "add ln_final": (
        Intervention("add", "ln_final.hook_normalized", random_vector(5, scale=0.3)),
        lambda x: x + random_vector(5, scale=0.3),
    ),
}


def expected_edit(case: str, x: torch.Tensor) -> torch.Tensor:
    """The hand-written meaning of the position-restricted cases (x: [n_tokens, d_model])."""
    x = x.clone()
    n = x.shape[0]
    if case == "clamp":
        u = unit(random_vector(3))
        for p in (0, n - 1):
            x[p] = x[p] + (5.0 - x[p] @ u) * u
    elif case == "set":
        v = random_vector(4)
        for p in (n - 2, n - 1):
            x[p] = v * (x[p].norm() / v.norm())
    elif case == "zero":
        x[2:4] = 0
    return x


@pytest.mark.parametrize("case", list(EDIT_CASES))
def test_each_op_matches_a_transformers_forward_with_the_same_edit(case: str, tiny_client, hf_tiny) -> None:  # noqa: ANN001
    intervention, meaning = EDIT_CASES[case]
    fn = meaning if callable(meaning) else (lambda x, name=meaning: expected_edit(name, x))
    hooks = tiny_client.model_info().hook_points
    trace = tiny_client.trace(PROMPTS[2], hooks, interventions=[intervention], dtype="float32")[0]
    expected = hf_activations(hf_tiny, trace.token_ids, edits={intervention.hook: fn})
    unedited = hf_activations(hf_tiny, trace.token_ids)
    for hook in hooks:
        if hook == intervention.hook.replace("resid_mid", "attn_out") and "resid_mid" in intervention.hook:
            continue  # the reference edits resid_mid through attn_out (see reference.edit_hooks)
        diff = float((trace.activations[hook] - expected[hook]).abs().max())
        assert diff < 1e-4, f"{hook}: {diff}"
    edited = trace.activations[intervention.hook]
    assert float((edited - unedited[intervention.hook]).abs().max()) > 1e-2, "the edit changed nothing"


def test_project_out_leaves_no_component_on_the_default_model(client) -> None:  # noqa: ANN001
    hook = "blocks.10.hook_resid_post"
    direction = torch.randn(576, generator=torch.Generator().manual_seed(0))
    before = client.trace(PROMPTS[1], hook, dtype="float32")[0].activations[hook]
    after = client.trace(
        PROMPTS[1], hook, dtype="float32", interventions=[Intervention("project_out", hook, direction)]
    )[0].activations[hook]
    u = unit(direction)
    assert float((before @ u).abs().max()) > 0.1, "the direction had no component to remove"
    assert float((after @ u).abs().max()) < 1e-5 * float(after.norm(dim=1).max())


# ---------------------------------------------------------------------- per request inside the batch


def mixed_interventions(i: int, hook: str) -> list[Intervention]:
    kinds = [
        [],
        [Intervention("add", hook, random_vector(10 + i % 3), scale=1.0 + i % 4)],
        [Intervention("project_out", hook, random_vector(20 + i % 2))],
        [
            Intervention("add", "blocks.0.hook_resid_post", random_vector(30), scale=0.5, positions="generated"),
            Intervention("clamp", hook, random_vector(31), value=-2.0, positions="prompt"),
        ],
    ]
    return kinds[i % len(kinds)]


def test_sixteen_concurrent_requests_with_mixed_interventions_each_get_their_own(tiny_gateway, hf_tiny) -> None:  # noqa: ANN001
    hook = "blocks.2.hook_resid_post"
    capture = ["blocks.1.hook_resid_post", hook, "blocks.3.hook_resid_post"]
    prompts = [" ".join([PROMPTS[i % 4]] * (1 + i % 5)) for i in range(16)]

    async def run(i: int, client: AsyncClient):
        return await client.generate(
            prompts[i],
            max_tokens=8,
            temperature=0,
            ignore_eos=True,
            capture=capture,
            capture_generated=True,
            capture_dtype="float32",
            interventions=mixed_interventions(i, hook),
        )

    async def main():
        async with AsyncClient(tiny_gateway.address, as_torch=True, timeout=300) as client:
            together = await asyncio.gather(*(run(i, client) for i in range(16)))
            alone = [await run(i, client) for i in range(16)]
        return together, alone

    together, alone = asyncio.run(main())
    for i, (a, b) in enumerate(zip(together, alone, strict=True)):
        assert a.token_ids == b.token_ids, f"request {i}: batch changed its tokens"
        for name in capture:
            assert float((a.activations[name] - b.activations[name]).abs().max()) < 1e-4, f"request {i} {name}"
    # the steering itself is right: compare a few with a transformers greedy generation under the same edits
    for i in (1, 5):
        (edit,) = mixed_interventions(i, hook)
        vector = torch.as_tensor(edit.vector)
        expected = hf_greedy(
            hf_tiny, together[i].prompt_token_ids, 8, {hook: lambda x, v=vector, s=edit.scale: x + s * v}
        )
        assert together[i].token_ids == expected, f"request {i}"
    assert len({tuple(r.token_ids) for r in together}) > 4, "the interventions did not change generations"


def test_scale_zero_equals_no_intervention(tiny_client) -> None:  # noqa: ANN001
    hook = "blocks.1.hook_resid_post"
    kwargs = dict(max_tokens=12, temperature=0, ignore_eos=True, capture=hook, capture_dtype="float32")
    plain = tiny_client.generate(PROMPTS[0], **kwargs)
    zero = tiny_client.generate(
        PROMPTS[0], interventions=[Intervention("add", hook, random_vector(7), scale=0)], **kwargs
    )
    assert zero.token_ids == plain.token_ids
    assert torch.equal(zero.activations[hook], plain.activations[hook])


def test_steering_does_not_leak_through_the_prefix_cache(tiny_client) -> None:  # noqa: ANN001
    """A long prompt (several KV blocks) steered first must not hand its edited KV to a plain request."""
    prompt = " ".join([PROMPTS[2]] * 20)  # ~400 tokens: three 128-token blocks
    steer = [Intervention("add", "blocks.1.hook_resid_post", random_vector(8), scale=3.0, positions="prompt")]
    kwargs = dict(max_tokens=10, temperature=0, ignore_eos=True)
    steered = tiny_client.generate(prompt, interventions=steer, **kwargs)
    plain_after = tiny_client.generate(prompt, **kwargs)
    steered_again = tiny_client.generate(prompt, interventions=steer, **kwargs)
    plain_again = tiny_client.generate(prompt, **kwargs)
    assert len(steered.prompt_token_ids) > 3 * 128
    assert plain_after.cached_prompt_tokens == 0, "the plain request read the steered request's KV blocks"
    assert steered_again.cached_prompt_tokens > 0, "equal interventions should share their cache"
    assert steered_again.token_ids == steered.token_ids
    assert plain_again.cached_prompt_tokens > 0 and plain_again.token_ids == plain_after.token_ids
    assert steered.token_ids != plain_after.token_ids, "the steering had no effect: the test proves nothing"


# ---------------------------------------------------------------------- side by side


def test_compare_unsteered_streams_both_with_the_same_seed(tiny_client) -> None:  # noqa: ANN001
    steer = {"vector": random_vector(9).numpy(), "hook": "blocks.2.hook_resid_post", "scale": 3.0}
    capture = {"capture": "blocks.3.hook_resid_post", "capture_generated": True, "capture_dtype": "float32"}
    kwargs = dict(max_tokens=12, temperature=0.8, ignore_eos=True, **capture)
    stream = tiny_client.generate_stream(PROMPTS[3], steer=steer, compare_unsteered=True, **kwargs)
    variants = {event.variant for event in stream}
    result = stream.result
    assert variants == {0, 1} and result.baseline is not None and result.seed is not None
    plain = tiny_client.generate(PROMPTS[3], seed=result.seed, **kwargs)
    steered = tiny_client.generate(PROMPTS[3], seed=result.seed, steer=steer, **kwargs)
    assert result.baseline.token_ids == plain.token_ids
    assert result.token_ids == steered.token_ids
    assert result.token_ids != plain.token_ids
    # each variant's captured activations come back with it
    hook = "blocks.3.hook_resid_post"
    assert float((result.activations[hook] - steered.activations[hook]).abs().max()) < 1e-4
    assert float((result.baseline.activations[hook] - plain.activations[hook]).abs().max()) < 1e-4


# ---------------------------------------------------------------------- registry and training


def test_registry_create_get_list_delete_and_use(tiny_client) -> None:  # noqa: ANN001
    hooks = ["blocks.1.hook_resid_post", "blocks.-1.hook_resid_post"]
    tensor = np.stack([random_vector(40).numpy(), random_vector(41).numpy()])
    created = tiny_client.steering.create(tensor, hooks, name="test-vector", description="two rows")
    assert created.hooks == ["blocks.1.hook_resid_post", "blocks.3.hook_resid_post"]
    assert created.method == "tensor" and created.d_model == TINY_D and created.created is not None
    fetched = tiny_client.steering.get(created.id)
    np.testing.assert_array_equal(np.asarray(fetched.vector), tensor)
    assert created.id in [v.id for v in tiny_client.steering.list()]
    # by id without a hook: added at both of its hooks
    by_id = tiny_client.generate(PROMPTS[0], max_tokens=8, temperature=0, ignore_eos=True, steer=created.id)
    inline = tiny_client.generate(
        PROMPTS[0],
        max_tokens=8,
        temperature=0,
        ignore_eos=True,
        interventions=[
            Intervention("add", h, torch.as_tensor(row)) for h, row in zip(created.hooks, tensor, strict=True)
        ],
    )
    assert by_id.token_ids == inline.token_ids
    assert tiny_client.steering.delete(created.id) is True
    with pytest.raises(NotFoundError):
        tiny_client.steering.get(created.id)
    with pytest.raises(NotFoundError, match="no steering vector"):
        tiny_client.generate(PROMPTS[0], max_tokens=2, steer=created.id)


@pytest.mark.parametrize("method", ["mean_diff", "pca"])
def test_training_equals_the_contrast_of_transformers_activations(method: str, tiny_client, hf_tiny) -> None:  # noqa: ANN001
    pairs = [
        ("I love this, it is wonderful", "I hate this, it is terrible"),
        ("What a great day", "What an awful day"),
        ("The food was delicious", "The food was disgusting"),
        ("She was very happy", "She was very sad"),
    ]
    record = tiny_client.steering.train(pairs, layers=[1, 2], method=method, name=f"sentiment-{method}")
    assert record.hooks == ["blocks.1.hook_resid_post", "blocks.2.hook_resid_post"]
    assert record.n_pairs == 4 and record.method == method and len(record.separation) == 2
    encode = tiny_client.trace  # token ids as the gateway tokenizes them
    for row, hook in enumerate(record.hooks):
        diffs = []
        for pos, neg in pairs:
            ids_pos, ids_neg = encode(pos)[0].token_ids, encode(neg)[0].token_ids
            diffs.append(
                hf_activations(hf_tiny, ids_pos)[hook][-1].double()
                - hf_activations(hf_tiny, ids_neg)[hook][-1].double()
            )
        diffs = torch.stack(diffs)
        if method == "mean_diff":
            expected = diffs.mean(0)
        else:
            direction = torch.linalg.svd(diffs, full_matrices=False)[2][0]
            direction = direction if (diffs @ direction).mean() > 0 else -direction
            expected = direction * (diffs @ direction).mean()
        got = torch.as_tensor(np.asarray(tiny_client.steering.get(record.id).vector))[row].double()
        assert float((got - expected).abs().max()) < 1e-4 * max(1.0, float(expected.abs().max())), hook


def test_mean_ablation_sets_the_mean_of_the_reference_prompts(tiny_client) -> None:  # noqa: ANN001
    hook = "blocks.1.hook_resid_post"
    refs = PROMPTS[:3]
    traces = tiny_client.trace(refs, hook, dtype="float32")
    mean = torch.cat([t.activations[hook][1:] for t in traces]).mean(0)  # first token skipped, as documented
    ablated = tiny_client.trace(
        PROMPTS[3], hook, dtype="float32", interventions=[Intervention("mean_ablate", hook, reference_prompts=refs)]
    )[0].activations[hook]
    assert float((ablated - mean).abs().max()) < 1e-4


# ---------------------------------------------------------------------- bad input


def test_bad_interventions_get_clear_errors_and_hurt_no_one(tiny_gateway, default_gateway) -> None:  # noqa: ANN001
    from interpgw_client import Client

    hook = "blocks.1.hook_resid_post"
    with Client(tiny_gateway.address, timeout=120) as tiny, Client(default_gateway.address, timeout=120) as default:
        other = default.steering.create(np.ones(576, dtype=np.float32), ["blocks.1.hook_resid_post"])
        nan = random_vector(0).numpy()
        nan[3] = np.nan
        cases = [
            (InvalidArgumentError, "d_model", [Intervention("add", hook, np.ones(64, dtype=np.float32))]),
            (InvalidArgumentError, "NaN or Inf", [Intervention("add", hook, nan)]),
            (NotFoundError, "no steering vector", [Intervention("add", hook, "vec_doesnotexist00")]),
            (InvalidArgumentError, "belongs to model", [Intervention("add", hook, other.id)]),
            (InvalidArgumentError, "scale must be", [Intervention("add", hook, random_vector(0), scale=1e9)]),
            (InvalidArgumentError, "at most 32", [Intervention("scale", hook, scale=1.0)] * 33),
            (InvalidArgumentError, "unknown hook", [Intervention("scale", "blocks.1.hook_nope", scale=1.0)]),
            (InvalidArgumentError, "non-zero direction", [Intervention("project_out", hook, np.zeros(TINY_D))]),
            (InvalidArgumentError, "target index", [Intervention("zero", hook, positions=[999])]),
        ]

        async def good():
            async with AsyncClient(tiny_gateway.address, timeout=120) as client:
                return await client.generate(PROMPTS[1], max_tokens=16, temperature=0, ignore_eos=True)

        async def all_together():
            task = asyncio.ensure_future(good())
            for error, message, interventions in cases:
                with pytest.raises(error, match=message):
                    tiny.generate(PROMPTS[1], max_tokens=4, interventions=interventions)
            return await task

        during = asyncio.run(all_together())
        after = tiny.generate(PROMPTS[1], max_tokens=16, temperature=0, ignore_eos=True)
        assert during.token_ids == after.token_ids and len(after.token_ids) == 16
        default.steering.delete(other.id)


# ---------------------------------------------------------------------- patching


@torch.no_grad()
def hf_patched_logit_diff(hf, clean, corrupted, layer, position, target, foil) -> float:  # noqa: ANN001
    clean_pre = hf_activations(hf, clean)[f"blocks.{layer}.hook_resid_pre"][position]

    def patch(x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        x[position] = clean_pre
        return x

    logits = hf_activations(hf, corrupted, edits={f"blocks.{layer}.hook_resid_pre": patch})["logits"][-1]
    return float(logits[target] - logits[foil])


def test_patching_grid_equals_transformers_patching(tiny_client, hf_tiny) -> None:  # noqa: ANN001
    clean, corrupted = "The Eiffel Tower is in the city of", "The Colosseum is in the city of"
    result = tiny_client.patch(clean, corrupted, target=" Paris", foil=" Rome", layers=[0, 2], positions=[1, 2, -1])
    n = len(result.tokens)
    assert result.layers == [0, 2] and result.positions == [1, 2, n - 1]
    metric = np.asarray(result.metric)
    assert metric.shape == (2, 3)
    ids_clean, ids_corrupted = tiny_client.trace(clean)[0].token_ids, tiny_client.trace(corrupted)[0].token_ids
    for i, layer in enumerate(result.layers):
        for j, position in enumerate(result.positions):
            expected = hf_patched_logit_diff(
                hf_tiny, ids_clean, ids_corrupted, layer, position, result.target_id, result.foil_id
            )
            assert abs(metric[i, j] - expected) < 1e-3, (layer, position)
    full = tiny_client.patch(clean, corrupted, target=" Paris", foil=" Rome", layers=[0], positions="all")
    assert abs(full.clean_metric - full.corrupted_metric) > 1e-3


def test_patching_a_factual_pair_shows_the_known_shape(client) -> None:  # noqa: ANN001
    """Causal tracing (Meng et al., ROME): early-middle layers carry the fact at the subject's last token, late
    layers at the final token. SmolLM2 (30 layers) moves it between layers 23 and 24 on this pair."""
    result = client.patch(
        "The capital of France is the city of",
        "The capital of Italy is the city of",
        target=" Paris",
        foil=" Rome",
        layers=[0, 5, 10, 15, 20, 27, 29],
    )
    subject, final = result.tokens.index(" Italy"), len(result.tokens) - 1
    restored = np.asarray(result.restored)  # [n_layers, n_positions]
    assert result.clean_metric > 2 and result.corrupted_metric < -2
    for row, layer in enumerate(result.layers):
        best = int(np.argmax(restored[row]))
        if layer <= 20:
            assert best == subject and restored[row, subject] > 0.8, (layer, restored[row])
        else:
            assert best == final and restored[row, final] > 0.5, (layer, restored[row])


# ---------------------------------------------------------------------- CLI and persistence


def test_cli_steer_train_list_generate_delete(tiny_gateway, tmp_path) -> None:  # noqa: ANN001
    import json

    from test_api import run_cli

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(
        "\n".join(json.dumps({"positive": p, "negative": n}) for p, n in [("good", "bad"), ("happy", "sad")])
    )
    out = run_cli(tiny_gateway.address, "steer", "train", "--pairs", str(pairs), "--layers", "1,2", "--name", "cli")
    assert out.returncode == 0, out.stderr
    vector_id = out.stdout.split()[0]
    assert vector_id.startswith("vec_")
    listed = run_cli(tiny_gateway.address, "steer", "list")
    assert listed.returncode == 0 and vector_id in listed.stdout and "cli" in listed.stdout
    steered = run_cli(
        tiny_gateway.address,
        "generate",
        "Hello",
        "--max-tokens",
        "4",
        "--steer",
        vector_id,
        "--scale",
        "2",
        "--compare",
    )
    assert steered.returncode == 0 and "unsteered" in steered.stdout, steered.stderr
    assert run_cli(tiny_gateway.address, "steer", "delete", vector_id).returncode == 0
    gone = run_cli(tiny_gateway.address, "steer", "delete", vector_id)
    assert gone.returncode == 1 and "no steering vector" in gone.stderr


def test_patching_probability_metric(tiny_client, hf_tiny) -> None:  # noqa: ANN001
    clean, corrupted = "The Eiffel Tower is in the city of", "The Colosseum is in the city of"
    result = tiny_client.patch(
        clean, corrupted, target=" Paris", metric="prob", hook="hook_resid_post", layers=[-1], positions="last"
    )
    assert result.layers == [TINY_LAYERS - 1]
    ids_corrupted = tiny_client.trace(corrupted)[0].token_ids
    expected = torch.softmax(hf_activations(hf_tiny, ids_corrupted)["logits"][-1].double(), 0)[result.target_id]
    assert abs(result.corrupted_metric - float(expected)) < 1e-5
    # the last layer's output at the last position is all the unembedding sees: patched, p equals the clean p
    ids_clean = tiny_client.trace(clean)[0].token_ids
    clean_p = torch.softmax(hf_activations(hf_tiny, ids_clean)["logits"][-1].double(), 0)[result.target_id]
    assert abs(float(np.asarray(result.metric)[0, 0]) - float(clean_p)) < 1e-5
