"""Authentication, roles, tenancy and per-key limits against a real gateway with API keys in the real Redis.

One gateway (tiny random Llama) serves every test here: keys of two tenants are written to Redis before it starts,
more are created over the API. `--key-cache-ttl 0` makes revocation immediate, so the revocation test need not wait.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest
import redis

from gateway_process import GatewayProcess, free_port
from interpgw.auth.keys import KeyLimits, new_api_key
from interpgw.auth.keystore import RedisKeyStore
from interpgw_client import (
    Client,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    ResourceExhaustedError,
    UnauthenticatedError,
)
from interpgw_client.client import GenerateStream
from tiny_models import TINY_SERVER_ARGS

pytestmark = pytest.mark.engine

REDIS_URL = os.environ.get("INTERPGW_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
D_MODEL = 128
HOOK = "blocks.1.hook_resid_post"
PROMPT = "The quick brown fox"

# name -> (tenant, roles, limits)
KEYS = {
    "a_read": ("acme", "read", None),
    "a_steer": ("acme", "read,steer", None),
    "a_admin": ("acme", "read,steer,admin", None),
    "b_admin": ("beta", "read,steer,admin", None),
    "slow": ("beta", "read", KeyLimits(requests_per_s=0.5, burst=1)),
    "single": ("beta", "read", KeyLimits(max_concurrent=1)),
    "short": ("beta", "read", KeyLimits(max_tokens=4)),
    "frugal": ("beta", "read", KeyLimits(capture_bytes_per_min=20_000)),
}


@pytest.fixture(scope="module")
def access_gateway(tiny_llama_dir: Path):
    prefix = f"interpgw-test-access-{uuid.uuid4().hex[:8]}:"
    secrets: dict[str, str] = {}

    async def write_keys() -> None:
        store = RedisKeyStore(REDIS_URL, prefix)
        for name, (tenant, roles, limits) in KEYS.items():
            secret, key = new_api_key(tenant, roles.split(","), name=name, limits=limits)
            await store.add(key)
            secrets[name] = secret
        await store.close()

    asyncio.run(write_keys())
    args = ("--model", str(tiny_llama_dir), *TINY_SERVER_ARGS, "--redis-url", REDIS_URL, "--redis-prefix", prefix)
    gateway = GatewayProcess(
        *args,
        "--api-keys-in-redis",
        "--key-cache-ttl",
        "0",
        "--max-active-requests",
        "2",
        "--max-queued-requests",
        "1",
        "--max-message-bytes",
        str(2 * 2**20),
    )
    gateway.secrets = secrets
    yield gateway
    gateway.stop()
    r = redis.Redis.from_url(REDIS_URL)
    keys = list(r.scan_iter(match=f"{prefix}*"))
    if keys:
        r.delete(*keys)
    r.close()


def client_for(gateway: GatewayProcess, key: str | None) -> Client:
    return Client(gateway.address, api_key=gateway.secrets[key] if key else None, timeout=120)


def random_vector(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(D_MODEL).astype(np.float32)


# ---------------------------------------------------------------------- authentication


def test_calls_without_a_valid_key_are_unauthenticated_but_health_needs_none(access_gateway) -> None:
    with Client(access_gateway.address, timeout=60) as anonymous:
        anonymous.wait_ready(timeout=10)  # health checking stays open for load balancers and probes
        with pytest.raises(UnauthenticatedError, match="missing API key"):
            anonymous.models()
    with Client(access_gateway.address, api_key="igw_not-a-real-key", timeout=60) as wrong:
        with pytest.raises(UnauthenticatedError, match="unknown or revoked"):
            wrong.generate(PROMPT, max_tokens=2, temperature=0)
    with client_for(access_gateway, "a_read") as reader:
        assert reader.generate(PROMPT, max_tokens=3, temperature=0).token_ids


def test_each_role_opens_exactly_its_methods(access_gateway) -> None:
    with client_for(access_gateway, "a_admin") as admin:
        vector = admin.steering.create(random_vector(0), HOOK, name="acme-vector")
    steer = [{"vector": vector.id, "scale": 2.0}]
    with client_for(access_gateway, "a_read") as reader:
        reader.trace(PROMPT, [HOOK], positions="last")
        assert reader.steering.get(vector.id).id == vector.id  # reading the registry is `read`
        with pytest.raises(PermissionDeniedError, match="'steer' role"):
            reader.generate(PROMPT, max_tokens=3, temperature=0, steer=steer)
        with pytest.raises(PermissionDeniedError, match="'steer' role"):
            reader.trace(PROMPT, [HOOK], steer=steer)
        with pytest.raises(PermissionDeniedError, match="'admin' role"):
            reader.steering.create(random_vector(1), HOOK)
        with pytest.raises(PermissionDeniedError, match="'admin' role"):
            reader.steering.delete(vector.id)
        with pytest.raises(PermissionDeniedError, match="'steer' role"):
            reader.patch(PROMPT, "The slow brown fox", target=" jumps", foil=" runs", layers=[0], positions=[1])
    with client_for(access_gateway, "a_steer") as steerer:
        steered = steerer.generate(PROMPT, max_tokens=4, temperature=0, steer=steer)
        plain = steerer.generate(PROMPT, max_tokens=4, temperature=0)
        assert steered.token_ids and plain.token_ids
        with pytest.raises(PermissionDeniedError, match="'admin' role"):
            steerer.steering.create(random_vector(2), HOOK)


# ---------------------------------------------------------------------- tenancy


def test_a_tenants_vectors_probes_and_traces_are_invisible_to_another_unless_published(access_gateway) -> None:
    with client_for(access_gateway, "a_admin") as a, client_for(access_gateway, "b_admin") as b:
        private = a.steering.create(random_vector(3), HOOK, name="private")
        published = a.steering.create(random_vector(4), HOOK, name="published", public=True)
        assert (private.owner, private.public) == ("acme", False)
        assert (published.owner, published.public) == ("acme", True)

        seen_by_b = {v.id for v in b.steering.list()}
        assert published.id in seen_by_b and private.id not in seen_by_b
        with pytest.raises(NotFoundError):
            b.steering.get(private.id)
        with pytest.raises(NotFoundError):  # nor usable in an intervention
            b.generate(PROMPT, max_tokens=2, temperature=0, steer=private.id)
        with pytest.raises(NotFoundError):
            b.steering.delete(private.id)
        assert b.steering.get(published.id).id == published.id
        assert b.generate(PROMPT, max_tokens=2, temperature=0, steer=published.id).token_ids
        with pytest.raises(PermissionDeniedError, match="only its owner"):
            b.steering.delete(published.id)
        assert a.steering.get(private.id).id == private.id  # untouched by b's attempts

        # stored traces: a handle of one tenant is nothing to another
        stored = a.trace(PROMPT, [HOOK], positions="last", store=True)[0]
        with pytest.raises(NotFoundError):
            b.get_trace(stored.handle)
        again = a.get_trace(stored.handle)
        assert np.array_equal(again.activations[HOOK], stored.activations[HOOK])
        shared = a.trace(PROMPT, [HOOK], positions="last", store=True, public=True)[0]
        assert np.array_equal(b.get_trace(shared.handle).activations[HOOK], stored.activations[HOOK])

        # probes follow the same rules
        examples = [(f"statement number {i}", i % 2 == 0) for i in range(16)]
        probe = a.probes.train(examples, layer=1, name="acme-probe")
        assert probe.owner == "acme"
        assert probe.id not in {p.id for p in b.probes.list()}
        with pytest.raises(NotFoundError):
            b.probes.get(probe.id)
        with pytest.raises(NotFoundError):
            b.trace(PROMPT, [HOOK], probes=[probe.id])
        assert a.probes.delete(probe.id)
        assert a.steering.delete(private.id) and a.steering.delete(published.id)


# ---------------------------------------------------------------------- key management over the API


def test_an_admin_manages_only_its_own_tenants_keys(access_gateway) -> None:
    with client_for(access_gateway, "a_admin") as admin:
        secret, info = admin.keys.create(["read"], name="notebook", max_tokens=8)
        assert info.tenant == "acme" and info.roles == ["read"] and info.limits == {"max_tokens": 8}
        assert secret not in repr(admin.keys.list())
        listed = {k.id: k for k in admin.keys.list()}
        assert info.id in listed and {k.tenant for k in listed.values()} == {"acme"}

        with Client(access_gateway.address, api_key=secret, timeout=60) as fresh:
            assert fresh.generate(PROMPT, max_tokens=2, temperature=0).token_ids
            with pytest.raises(PermissionDeniedError):
                fresh.keys.list()

        with client_for(access_gateway, "b_admin") as other:
            b_ids = {k.id for k in other.keys.list()}
        assert info.id not in b_ids
        with pytest.raises(NotFoundError):
            admin.keys.revoke(next(iter(b_ids)))

        assert admin.keys.revoke(info.id)
        with Client(access_gateway.address, api_key=secret, timeout=60) as revoked:
            with pytest.raises(UnauthenticatedError):
                revoked.models()

    with client_for(access_gateway, "a_steer") as steerer:
        with pytest.raises(PermissionDeniedError, match="'admin' role"):
            steerer.keys.create(["read"])


def test_a_key_cannot_grant_more_than_it_has(access_gateway) -> None:
    with client_for(access_gateway, "a_admin") as admin:
        with pytest.raises(InvalidArgumentError, match="read"):
            admin.keys.create(["superuser"])
    secret = access_gateway.secrets["b_admin"]
    with Client(access_gateway.address, api_key=secret, timeout=60) as b:
        limited_secret, limited = b.keys.create(["read", "admin"], name="limited-admin")
        try:
            # a key without `steer` cannot mint one with it
            with Client(access_gateway.address, api_key=limited_secret, timeout=60) as limited_client:
                with pytest.raises(PermissionDeniedError, match="lacks steer"):
                    limited_client.keys.create(["read", "steer"])
        finally:
            b.keys.revoke(limited.id)


# ---------------------------------------------------------------------- per-key limits and admission


def test_rate_limit_answers_resource_exhausted_with_retry_info(access_gateway) -> None:
    with client_for(access_gateway, "slow") as slow:
        slow.models()
        with pytest.raises(ResourceExhaustedError, match="rate limit") as refused:
            slow.models()
        assert refused.value.retry_after is not None and 0 < refused.value.retry_after <= 2.0


def held_stream(client: Client) -> GenerateStream:
    """A running Generate stream whose call lasts until the test reads it: it captures every hook point at every
    position (22 x ~1000 x 128 float32, ~11 MB), more than HTTP/2 flow control lets the server send unread, so its
    handler cannot finish. A stream of 1000 tokens alone ends in seconds unread, and slow CI machines outlasted it."""
    stream = client.generate_stream(
        PROMPT,
        max_tokens=1000,
        temperature=0,
        ignore_eos=True,
        capture=client.model_info().hook_points,
        capture_generated=True,
        capture_dtype="float32",
    )
    next(iter(stream))
    return stream


def test_concurrency_limit_refuses_the_second_stream_of_a_key(access_gateway) -> None:
    with client_for(access_gateway, "single") as single:
        first = held_stream(single)  # running until read below
        with pytest.raises(ResourceExhaustedError, match="concurrency limit"):
            single.generate(PROMPT, max_tokens=2, temperature=0)
        result = first.collect()
        assert len(result.token_ids) == 1000
        assert single.generate(PROMPT, max_tokens=2, temperature=0).token_ids  # freed when the first ended


def test_max_tokens_and_capture_budget_of_a_key(access_gateway) -> None:
    with client_for(access_gateway, "short") as short:
        assert len(short.generate(PROMPT, max_tokens=4, temperature=0, ignore_eos=True).token_ids) == 4
        with pytest.raises(ResourceExhaustedError, match="limit of 4 tokens"):
            short.generate(PROMPT, max_tokens=5, temperature=0)
    with client_for(access_gateway, "frugal") as frugal:
        # one position of one hook: 128 floats = 512 bytes, fits; all 4 layers x 40 positions do not
        frugal.trace(PROMPT, [HOOK], positions="last", cache="bypass")
        hooks = [f"blocks.{layer}.hook_resid_post" for layer in range(4)]
        with pytest.raises(ResourceExhaustedError, match="per minute"):
            frugal.trace(PROMPT * 10, hooks, cache="bypass")


def wait_for_admission_queue(gateway: GatewayProcess, waiting: int, timeout_s: float = 30.0) -> None:
    """Until the gateway reports `waiting` calls queued for admission (a fixed sleep raced a loaded CI machine)."""
    sample = ("interpgw_admission_requests", (("state", "waiting"),))
    samples = gateway.scrape_until(lambda s: s.get(sample) == waiting, timeout_s)
    assert samples.get(sample) == waiting, f"no {waiting} call(s) waiting for admission after {timeout_s} s"


def test_a_full_admission_queue_refuses_at_once_and_loses_nothing(access_gateway) -> None:
    """2 running + 1 waiting fit (--max-active-requests 2 --max-queued-requests 1); the 4th call is refused."""
    with client_for(access_gateway, "b_admin") as b:
        streams = [held_stream(b) for _ in range(2)]  # both slots, until read below
        queued = b.generate_stream(PROMPT, max_tokens=5, temperature=0, ignore_eos=True)
        wait_for_admission_queue(access_gateway, waiting=1)  # the third call reached the gateway and waits
        with pytest.raises(ResourceExhaustedError, match="busy") as refused:
            b.generate(PROMPT, max_tokens=2, temperature=0)
        assert refused.value.retry_after is not None
        results = [s.collect() for s in streams]
        assert [len(r.token_ids) for r in results] == [1000, 1000]
        assert all(sorted(r.activations) == sorted(b.model_info().hook_points) for r in results)
        assert len(queued.collect().token_ids) == 5


def test_an_oversized_message_is_refused_by_size(access_gateway) -> None:
    with client_for(access_gateway, "a_admin") as admin:
        huge = np.zeros((3 * 2**20) // 4, dtype=np.float32)  # 3 MiB, over --max-message-bytes 2 MiB
        with pytest.raises(ResourceExhaustedError):
            admin.steering.create(huge, HOOK)
        assert admin.steering.create(random_vector(5), HOOK).id  # the connection and the server are fine


# ---------------------------------------------------------------------- start-up configuration


def test_listening_beyond_loopback_without_keys_refuses_to_start(tiny_llama_dir: Path) -> None:
    command = [sys.executable, "-m", "interpgw.serve", "--model", str(tiny_llama_dir), "--host", "0.0.0.0"]
    done = subprocess.run(command + ["--port", str(free_port())], capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "no API keys are configured" in done.stderr and "--auth off" in done.stderr


def test_key_management_needs_a_writable_key_store(tiny_gateway) -> None:
    """Authentication off (the loopback default): there are no keys to manage, and every call is the local user."""
    with Client(tiny_gateway.address, timeout=60) as local:
        with pytest.raises(FailedPreconditionError, match="authentication is off"):
            local.keys.list()
