"""API keys: records, the three key stores, the authenticator's caching and outage behaviour, and `interpgw keys`."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import logging
import os
import socket
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from interpgw.auth import (
    LOCAL_CALLER,
    ROLES,
    ApiKey,
    Authenticator,
    Caller,
    FileKeyStore,
    KeyLimits,
    KeyStore,
    MemoryKeyStore,
    RedisKeyStore,
    check_roles,
    check_tenant,
    hash_secret,
    new_api_key,
    open_key_store,
    read_key_file,
    write_key_file,
)
from interpgw.auth.cli import main
from interpgw.core.errors import FailedPrecondition, InvalidArgument, Unauthenticated, Unavailable

REDIS_URL = os.environ.get("INTERPGW_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")  # as in conftest.py


@pytest.fixture(params=["memory", "redis"])
def writable_store(request: pytest.FixtureRequest) -> Iterator:
    """Builds a fresh writable store of the parametrized kind (called inside the test's event loop)."""
    if request.param == "memory":
        yield MemoryKeyStore
        return
    prefix = request.getfixturevalue("redis_prefix")
    yield lambda: RedisKeyStore(REDIS_URL, prefix=prefix)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class CountingStore:
    """Wraps a store, counting lookups; `down` makes lookups fail as an unreachable Redis would."""

    writable = True

    def __init__(self, inner: KeyStore) -> None:
        self.inner = inner
        self.lookups = 0
        self.down = False

    async def lookup(self, sha256: str) -> ApiKey | None:
        self.lookups += 1
        if self.down:
            raise Unavailable("key store unreachable: test")
        return await self.inner.lookup(sha256)

    async def add(self, key: ApiKey) -> None:
        await self.inner.add(key)

    async def revoke(self, key_id: str) -> bool:
        return await self.inner.revoke(key_id)

    async def list(self, tenant: str | None = None) -> list[ApiKey]:
        return await self.inner.list(tenant)

    async def ping(self) -> None:
        await self.inner.ping()

    async def close(self) -> None:
        await self.inner.close()

    def describe(self) -> str:
        return "counting " + self.inner.describe()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_key(tenant: str = "acme", roles: str = "read", created: float | None = None, **kw) -> tuple[str, ApiKey]:
    secret, key = new_api_key(tenant, roles, **kw)
    if created is not None:
        key = dataclasses.replace(key, created=created)
    return secret, key


# ---------------------------------------------------------------- records


def test_new_api_key_holds_only_the_hash() -> None:
    limits = KeyLimits(requests_per_s=5, burst=10)
    secret, key = new_api_key("acme", ["read", "steer"], name="notebook", limits=limits)
    assert secret.startswith("igw_") and len(secret) >= 4 + 43
    assert key.id.startswith("key_") and len(key.id) == 16 and int(key.id[4:], 16) >= 0
    assert key.sha256 == hashlib.sha256(secret.encode()).hexdigest() == hash_secret(secret) != secret
    assert key.tenant == "acme" and key.roles == frozenset({"read", "steer"}) and key.name == "notebook"
    assert key.has("steer") and not key.has("admin")
    assert key.limits == limits and key.created > 1.7e9
    data = key.to_json()
    assert secret not in json.dumps(data)
    assert data["roles"] == ["read", "steer"] and data["limits"] == {"requests_per_s": 5.0, "burst": 10}
    assert ApiKey.from_json(data) == key
    assert ApiKey.from_json(json.loads(json.dumps(data))) == key
    other_secret, other = new_api_key("acme", "read")
    assert other_secret != secret and other.id != key.id
    assert "limits" not in other.to_json()  # no overrides: nothing to store


def test_key_limits_round_trip_and_validation() -> None:
    assert KeyLimits.from_json(None) == KeyLimits() and KeyLimits().to_json() == {}
    full = {"requests_per_s": 5, "burst": 10, "max_concurrent": 4, "capture_bytes_per_min": 2**30, "max_tokens": 512}
    limits = KeyLimits.from_json(full)
    assert limits.requests_per_s == 5.0 and isinstance(limits.requests_per_s, float)
    assert limits.to_json() == full and KeyLimits.from_json(limits.to_json()) == limits
    assert KeyLimits.from_json({"requests_per_s": 0.5}).to_json() == {"requests_per_s": 0.5}
    with pytest.raises(InvalidArgument, match="unknown key limit 'rate': valid limits are requests_per_s, burst"):
        KeyLimits.from_json({"rate": 5})
    for field, value in [
        ("burst", 0),
        ("burst", -3),
        ("burst", 1.5),
        ("burst", "10"),
        ("max_tokens", True),
        ("requests_per_s", float("inf")),
        ("requests_per_s", -1.0),
    ]:
        with pytest.raises(InvalidArgument, match=f"key limit {field} must be a positive"):
            KeyLimits.from_json({field: value})
    with pytest.raises(InvalidArgument, match="must be a mapping"):
        KeyLimits.from_json([1, 2])  # type: ignore[arg-type]


def test_roles_and_tenant_validation() -> None:
    assert check_roles(["read", "admin"]) == frozenset({"read", "admin"})
    assert check_roles("read, steer") == frozenset({"read", "steer"})
    assert check_roles(ROLES) == frozenset(ROLES)
    with pytest.raises(InvalidArgument, match="unknown role 'write': valid roles are read, steer, admin"):
        check_roles(["read", "write"])
    with pytest.raises(InvalidArgument, match="at least one role: valid roles are read, steer, admin"):
        check_roles([])
    with pytest.raises(InvalidArgument, match="valid roles are read, steer, admin"):
        new_api_key("acme", ["superuser"])
    assert check_tenant("Team_a.b-1") == "Team_a.b-1" and check_tenant("x" * 64) == "x" * 64
    for bad in ("", "x" * 65, "has space", "a/b", "a:b", "é"):
        with pytest.raises(InvalidArgument, match="invalid tenant"):
            check_tenant(bad)
    with pytest.raises(InvalidArgument, match="invalid tenant"):
        new_api_key("acme corp", ["read"])


def test_api_key_from_json_rejects_bad_records() -> None:
    _, key = make_key()
    good = key.to_json()
    cases = [
        ({**good, "id": "key_XYZ"}, "invalid key id"),
        ({**good, "tenant": "a b"}, "invalid tenant"),
        ({**good, "roles": ["read", "root"]}, "unknown role 'root': valid roles are read, steer, admin"),
        ({**good, "roles": "read"}, "roles must be a list"),
        ({**good, "roles": []}, "at least one role"),
        ({**good, "sha256": "abc"}, "sha256 must be 64 lowercase hex"),
        ({**good, "created": "yesterday"}, "created must be unix seconds"),
        ({**good, "name": 3}, "name must be a string"),
        ({**good, "limits": {"burst": -1}}, "key limit burst must be a positive int"),
        ({**good, "secret": "igw_x"}, "unknown API key field 'secret': valid fields are id, tenant, roles"),
        ({k: v for k, v in good.items() if k != "sha256"}, "lacks field 'sha256'"),
    ]
    for data, message in cases:
        with pytest.raises(InvalidArgument, match=message):
            ApiKey.from_json(data)
    with pytest.raises(InvalidArgument, match="must be a mapping"):
        ApiKey.from_json(["not", "a", "record"])  # type: ignore[arg-type]


# ---------------------------------------------------------------- stores


def test_writable_store_add_lookup_list_revoke(writable_store) -> None:
    async def scenario() -> None:
        store: KeyStore = writable_store()
        try:
            assert store.writable and isinstance(store, KeyStore)
            await store.ping()
            _, old = make_key("acme", "read", created=100.0)
            _, mid = make_key("other", "steer,admin", created=200.0, limits=KeyLimits(max_tokens=7))
            new_secret, new = make_key("acme", "read,steer", created=300.0, name="nb")
            for key in (mid, new, old):
                await store.add(key)
            assert await store.lookup(hash_secret(new_secret)) == new
            assert await store.lookup(mid.sha256) == mid
            assert await store.lookup(hash_secret("igw_nope")) is None
            assert [k.id for k in await store.list()] == [new.id, mid.id, old.id]
            assert [k.id for k in await store.list("acme")] == [new.id, old.id]
            assert await store.list("nobody") == []
            with pytest.raises(InvalidArgument, match=f"id {old.id} already exists|duplicate key id {old.id}"):
                _, clash = make_key()
                await store.add(dataclasses.replace(clash, id=old.id))
            assert await store.revoke(old.id) is True
            assert await store.revoke(old.id) is False
            assert await store.revoke("key_000000000000") is False
            assert await store.lookup(old.sha256) is None
            assert [k.id for k in await store.list()] == [new.id, mid.id]
        finally:
            await store.close()

    asyncio.run(scenario())


def test_redis_store_layout_and_corrupt_values(redis_prefix: str, caplog: pytest.LogCaptureFixture) -> None:
    _, key = make_key("acme", "admin", limits=KeyLimits(burst=3))
    _, other = make_key()

    async def add() -> None:
        store = RedisKeyStore(REDIS_URL, prefix=redis_prefix)
        try:
            await store.add(key)
            await store.add(other)
        finally:
            await store.close()

    asyncio.run(add())
    client = redis.Redis.from_url(REDIS_URL)
    try:
        assert json.loads(client.get(f"{redis_prefix}apikey:{key.sha256}")) == key.to_json()
        assert client.get(f"{redis_prefix}apikey-id:{key.id}") == key.sha256.encode()
        client.set(f"{redis_prefix}apikey:{other.sha256}", b"{not json")
    finally:
        client.close()

    async def read() -> None:
        store = RedisKeyStore(REDIS_URL, prefix=redis_prefix)
        try:
            with caplog.at_level(logging.WARNING, logger="interpgw.auth.keystore"):
                assert await store.lookup(other.sha256) is None
                assert await store.list() == [key]
        finally:
            await store.close()

    asyncio.run(read())
    assert sum("corrupt API key record" in r.getMessage() for r in caplog.records) == 1


def test_redis_store_unreachable_and_describe() -> None:
    async def scenario() -> None:
        store = RedisKeyStore(f"redis://:hunter2@127.0.0.1:{closed_port()}/0")
        try:
            assert "hunter2" not in store.describe() and "127.0.0.1" in store.describe()
            with pytest.raises(Unavailable, match="key store unreachable"):
                await store.lookup("0" * 64)
            with pytest.raises(Unavailable, match="key store unreachable"):
                await store.ping()
        finally:
            await store.close()

    asyncio.run(scenario())
    with pytest.raises(InvalidArgument, match="invalid Redis URL"):
        RedisKeyStore("http://example.com")


def test_key_file_write_and_read(tmp_path: Path) -> None:
    path = tmp_path / "keys.yaml"
    assert read_key_file(path) == []
    _, a = make_key("acme", "read,steer", limits=KeyLimits(requests_per_s=5, capture_bytes_per_min=2**30))
    _, b = make_key("beta", "admin", name="ops")
    write_key_file(path, [a, b])
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    text = path.read_text()
    assert text.startswith("# interpgw API keys: only sha256 hashes")
    assert "roles: [read, steer]" in text and "limits: {requests_per_s: 5.0" in text
    assert read_key_file(path) == [a, b]
    os.chmod(path, 0o644)
    write_key_file(path, [b])
    assert read_key_file(path) == [b] and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keys.yaml"]  # no temp file left behind


def test_file_store_is_read_only_and_lists(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    secret, a = make_key("acme", "read", created=10.0)
    _, b = make_key("beta", "steer", created=20.0)
    path.write_text(json.dumps({"keys": [a.to_json(), b.to_json()]}))  # JSON is YAML

    async def scenario() -> None:
        store = FileKeyStore(path)
        assert not store.writable and isinstance(store, KeyStore)
        assert store.describe() == f"file {path}"
        await store.ping()
        assert await store.lookup(hash_secret(secret)) == a
        assert await store.lookup(hash_secret("igw_other")) is None
        assert await store.list() == [b, a] and await store.list("acme") == [a]
        with pytest.raises(FailedPrecondition, match="read-only"):
            await store.add(make_key()[1])
        with pytest.raises(FailedPrecondition, match="interpgw keys"):
            await store.revoke(a.id)
        await store.close()

    asyncio.run(scenario())


def test_file_store_rejects_bad_files_at_start(tmp_path: Path) -> None:
    _, key = make_key()
    cases = {
        "missing.yaml": None,
        "empty.yaml": "",
        "syntax.yaml": "keys: [unclosed",
        "list.yaml": "- a\n- b\n",
        "entry.yaml": json.dumps({"keys": [{**key.to_json(), "roles": ["root"]}]}),
        "duplicate.yaml": json.dumps({"keys": [key.to_json(), {**key.to_json(), "sha256": "1" * 64}]}),
    }
    reasons = {
        "missing.yaml": "cannot read",
        "empty.yaml": "must be a mapping with a 'keys' list",
        "syntax.yaml": "not valid YAML",
        "list.yaml": "must be a mapping with a 'keys' list",
        "entry.yaml": "entry 0: unknown role 'root'",
        "duplicate.yaml": f"duplicate key id {key.id}",
    }
    for name, text in cases.items():
        path = tmp_path / name
        if text is not None:
            path.write_text(text)
        with pytest.raises(InvalidArgument, match=reasons[name]) as info:
            FileKeyStore(path)
        assert str(path) in str(info.value)


def test_file_store_reloads_when_the_file_changes(tmp_path: Path) -> None:
    path = tmp_path / "keys.yaml"
    old_secret, old = make_key("acme", "read")
    new_secret, new = make_key("acme", "steer")
    write_key_file(path, [old])
    clock = FakeClock()

    async def scenario() -> None:
        store = FileKeyStore(path, clock=clock)
        assert await store.lookup(hash_secret(old_secret)) == old
        write_key_file(path, [new])
        os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
        clock.now += 0.5  # checked at most once per second: still the old keys
        assert await store.lookup(hash_secret(new_secret)) is None
        assert await store.lookup(hash_secret(old_secret)) == old
        clock.now += 0.6
        assert await store.lookup(hash_secret(new_secret)) == new
        assert await store.lookup(hash_secret(old_secret)) is None
        assert await store.list() == [new]

    asyncio.run(scenario())


def test_file_store_keeps_last_good_keys(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "keys.yaml"
    secret, key = make_key()
    other_secret, other = make_key()
    write_key_file(path, [key])
    clock = FakeClock()

    async def scenario() -> None:
        store = FileKeyStore(path, clock=clock)
        with caplog.at_level(logging.WARNING, logger="interpgw.auth.keystore"):
            path.write_text("keys: [unclosed")
            for _ in range(3):
                clock.now += 2
                assert await store.lookup(hash_secret(secret)) == key
            assert sum("keeping the 1 API keys" in r.getMessage() for r in caplog.records) == 1
            path.unlink()
            clock.now += 2
            assert await store.lookup(hash_secret(secret)) == key
            assert sum("keeping the 1 API keys" in r.getMessage() for r in caplog.records) == 2
        write_key_file(path, [other])
        clock.now += 2
        assert await store.lookup(hash_secret(other_secret)) == other
        assert await store.lookup(hash_secret(secret)) is None

    asyncio.run(scenario())
    assert secret not in caplog.text


def test_open_key_store(tmp_path: Path) -> None:
    assert open_key_store(None, None) is None and open_key_store("", "") is None
    with pytest.raises(InvalidArgument, match="choose one of --api-keys-file and --api-keys-redis"):
        open_key_store(str(tmp_path / "k.yaml"), REDIS_URL)
    path = tmp_path / "k.yaml"
    write_key_file(path, [])
    assert isinstance(open_key_store(str(path), None), FileKeyStore)
    store = open_key_store(None, "redis://:pw@127.0.0.1:6379/2", prefix="x:")
    assert isinstance(store, RedisKeyStore) and store.describe() == "redis://127.0.0.1:6379/2 (prefix 'x:')"
    asyncio.run(store.close())


# ---------------------------------------------------------------- authenticator


def test_authenticate_missing_malformed_unknown_known() -> None:
    secret, key = make_key("acme", "read,steer", limits=KeyLimits(max_concurrent=2))

    async def scenario() -> None:
        auth = Authenticator(MemoryKeyStore([key]))
        for header in (None, ""):
            with pytest.raises(Unauthenticated, match="missing API key: send gRPC metadata 'authorization: Bearer"):
                await auth.authenticate(header)
        for header in (secret, f"Basic {secret}", "Bearer", "Bearer ", f"Bearer{secret}", f"Bearer {secret} x"):
            with pytest.raises(Unauthenticated, match="expected 'Bearer <key>'") as info:
                await auth.authenticate(header)
            assert secret not in str(info.value)
        with pytest.raises(Unauthenticated, match="unknown or revoked API key") as info:
            await auth.authenticate("Bearer igw_wrong")
        assert "igw_wrong" not in str(info.value)
        expected = Caller(tenant="acme", roles=frozenset({"read", "steer"}), key_id=key.id, limits=key.limits)
        for header in (f"Bearer {secret}", f"bearer   {secret}", f"BEARER {secret}"):
            assert await auth.authenticate(header) == expected
        caller = await auth.authenticate(f"Bearer {secret}")
        assert caller.has("steer") and not caller.has("admin")
        assert secret not in repr(auth.__dict__)  # cached by hash only

    asyncio.run(scenario())
    assert LOCAL_CALLER.tenant == "" and all(LOCAL_CALLER.has(r) for r in ROLES)


def test_authenticate_caches_positive_and_negative_lookups() -> None:
    secret, key = make_key()
    clock = FakeClock()

    async def scenario() -> None:
        store = CountingStore(MemoryKeyStore([key]))
        auth = Authenticator(store, cache_ttl_s=10.0, clock=clock)
        for _ in range(5):
            await auth.authenticate(f"Bearer {secret}")
        assert store.lookups == 1
        clock.now += 9.9
        await auth.authenticate(f"Bearer {secret}")
        assert store.lookups == 1
        clock.now += 0.2
        await auth.authenticate(f"Bearer {secret}")
        assert store.lookups == 2

        for _ in range(5):
            with pytest.raises(Unauthenticated):
                await auth.authenticate("Bearer igw_wrong")
        assert store.lookups == 3
        clock.now += 1.0
        with pytest.raises(Unauthenticated):
            await auth.authenticate("Bearer igw_wrong")
        assert store.lookups == 4

    asyncio.run(scenario())


def test_a_new_key_works_at_once_despite_negative_caching_of_others() -> None:
    async def scenario() -> None:
        store = MemoryKeyStore()
        auth = Authenticator(store, clock=FakeClock())
        secret, key = make_key()
        with pytest.raises(Unauthenticated):
            await auth.authenticate(f"Bearer {secret}")
        await store.add(key)
        other_secret, other = make_key()
        await store.add(other)
        assert (await auth.authenticate(f"Bearer {other_secret}")).key_id == other.id

    asyncio.run(scenario())


def test_cache_is_bounded() -> None:
    keys = [make_key() for _ in range(3)]
    clock = FakeClock()

    async def scenario() -> None:
        store = CountingStore(MemoryKeyStore([k for _, k in keys]))
        auth = Authenticator(store, clock=clock, max_cached=2)
        for secret, _ in keys:
            await auth.authenticate(f"Bearer {secret}")
        await auth.authenticate(f"Bearer {keys[2][0]}")
        await auth.authenticate(f"Bearer {keys[1][0]}")
        assert store.lookups == 3
        await auth.authenticate(f"Bearer {keys[0][0]}")  # evicted, least recently used
        assert store.lookups == 4
        for i in range(5):
            with pytest.raises(Unauthenticated):
                await auth.authenticate(f"Bearer igw_wrong{i}")
        assert len(auth._unknown) == 2 and len(auth._known) == 2

    asyncio.run(scenario())


def test_revocation_takes_effect_after_the_cache_ttl() -> None:
    secret, key = make_key()
    clock = FakeClock()

    async def scenario() -> None:
        store = MemoryKeyStore([key])
        auth = Authenticator(store, cache_ttl_s=10.0, clock=clock)
        await auth.authenticate(f"Bearer {secret}")
        assert await store.revoke(key.id)
        clock.now += 5
        assert (await auth.authenticate(f"Bearer {secret}")).key_id == key.id
        clock.now += 5
        with pytest.raises(Unauthenticated, match="unknown or revoked API key"):
            await auth.authenticate(f"Bearer {secret}")

    asyncio.run(scenario())


def test_store_outage_keeps_known_keys_working(caplog: pytest.LogCaptureFixture) -> None:
    secret, key = make_key("acme", "steer")
    clock = FakeClock()

    async def scenario() -> None:
        store = CountingStore(MemoryKeyStore([key]))
        auth = Authenticator(store, cache_ttl_s=10.0, clock=clock)
        await auth.authenticate(f"Bearer {secret}")
        store.down = True
        with caplog.at_level(logging.WARNING, logger="interpgw.auth.authenticator"):
            for _ in range(4):
                clock.now += 11  # cache entry expired: the store is asked, fails, the last record serves
                caller = await auth.authenticate(f"Bearer {secret}")
                assert caller.key_id == key.id and caller.tenant == "acme"
            with pytest.raises(Unavailable, match="cannot verify the API key now: key store unreachable"):
                await auth.authenticate("Bearer igw_never_seen")
            assert sum("unreachable" in r.getMessage() for r in caplog.records) == 2  # at 11 s and at 44 s
        store.down = False
        await store.revoke(key.id)
        clock.now += 11
        with pytest.raises(Unauthenticated):
            await auth.authenticate(f"Bearer {secret}")

    asyncio.run(scenario())
    assert secret not in caplog.text and "igw_never_seen" not in caplog.text


def test_unreachable_redis_rejects_unknown_keys_as_unavailable() -> None:
    async def scenario() -> None:
        store = RedisKeyStore(f"redis://127.0.0.1:{closed_port()}/0")
        try:
            with pytest.raises(Unavailable, match="cannot verify the API key now"):
                await Authenticator(store).authenticate("Bearer igw_whatever")
        finally:
            await store.close()

    asyncio.run(scenario())


# ---------------------------------------------------------------- CLI


def authenticates(store: KeyStore, secret: str) -> Caller:
    async def scenario() -> Caller:
        try:
            return await Authenticator(store).authenticate(f"Bearer {secret}")
        finally:
            await store.close()

    return asyncio.run(scenario())


def cli_round_trip(where: list[str], capsys: pytest.CaptureFixture[str], open_store) -> None:
    assert main(["create", "--tenant", "acme", "--roles", "read,steer", "--name", "nb", "--rate", "2.5"] + where) == 0
    out, err = capsys.readouterr()
    secret = out.splitlines()[0]
    assert out == secret + "\n" and secret.startswith("igw_")
    key_id = err.split()[0]
    assert key_id.startswith("key_") and "tenant=acme roles=read,steer" in err and secret not in err
    caller = authenticates(open_store(), secret)
    assert caller.key_id == key_id and caller.tenant == "acme" and caller.limits == KeyLimits(requests_per_s=2.5)
    assert main(["create", "--tenant", "beta", "--roles", "admin", "--max-tokens", "64"] + where) == 0
    other_secret = capsys.readouterr().out.strip()

    assert main(["list"] + where) == 0
    table = capsys.readouterr().out
    for text in (key_id, "acme", "read,steer", "nb", "requests_per_s=2.5", "beta", "max_tokens=64", "ID", "CREATED"):
        assert text in table
    for text in (secret, other_secret, hash_secret(secret), hash_secret(other_secret)):
        assert text not in table
    assert main(["list", "--json", "--tenant", "acme"] + where) == 0
    out = capsys.readouterr().out
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["id"] for r in rows] == [key_id] and rows[0]["roles"] == ["read", "steer"]
    assert "sha256" not in rows[0] and hash_secret(secret) not in out and secret not in out

    assert main(["revoke", key_id] + where) == 0
    assert key_id in capsys.readouterr().out
    assert main(["revoke", key_id] + where) == 1
    assert f"no API key '{key_id}'" in capsys.readouterr().err
    with pytest.raises(Unauthenticated):
        authenticates(open_store(), secret)
    assert authenticates(open_store(), other_secret).tenant == "beta"


def test_cli_on_a_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "keys.yaml"
    cli_round_trip(["--file", str(path)], capsys, lambda: FileKeyStore(path))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert "igw_" not in path.read_text()


def test_cli_on_redis(redis_prefix: str, capsys: pytest.CaptureFixture[str]) -> None:
    where = ["--redis-url", REDIS_URL, "--redis-prefix", redis_prefix]
    cli_round_trip(where, capsys, lambda: RedisKeyStore(REDIS_URL, prefix=redis_prefix))


def test_cli_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "keys.yaml"
    file = ["--file", str(path)]
    cases = [
        (["create", "--tenant", "acme", "--roles", "read,root"] + file, "valid roles are read, steer, admin"),
        (["create", "--tenant", "acme corp", "--roles", "read"] + file, "invalid tenant"),
        (
            ["create", "--tenant", "acme", "--roles", "read", "--burst", "0"] + file,
            "key limit burst must be a positive int",
        ),
        (["create", "--tenant", "acme", "--roles", "read", "--burst", "many"] + file, "invalid int value"),
        (["create", "--tenant", "acme", "--roles", "read"], "one of the arguments --file --redis-url is required"),
        (["create", "--tenant", "a", "--roles", "read", "--redis-url", REDIS_URL] + file, "not allowed with"),
        (["list", "--tenant", "a/b"] + file, "invalid tenant"),
        (["rotate"] + file, "invalid choice"),
        ([], "required"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        out, err = capsys.readouterr()
        assert message in err, (argv, err)
        assert "Traceback" not in err and out == ""
    assert not path.exists()
    path.write_text("keys: [unclosed")
    assert main(["list"] + file) == 2
    assert "not valid YAML" in capsys.readouterr().err
    assert main(["list", "--redis-url", f"redis://127.0.0.1:{closed_port()}/0"]) == 1
    assert "key store unreachable" in capsys.readouterr().err
