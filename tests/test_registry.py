"""Steering-vector registry: record serialization and both stores (memory, Redis) behind one protocol."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterator

import pytest
import redis
import torch

from interpgw.registry.errors import CorruptRecord, RegistryFull, RegistryUnavailable
from interpgw.registry.records import VectorRecord, new_vector_id
from interpgw.registry.store import (
    MemoryVectorStore,
    RedisVectorStore,
    VectorStore,
    open_vector_store,
)

REDIS_URL = os.environ.get("INTERPGW_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def make_record(
    model: str = "smollm2", created: float = 1_700_000_000.0, n_hooks: int = 2, d_model: int = 8, **kw
) -> VectorRecord:
    hooks = tuple(f"blocks.{i}.hook_resid_post" for i in range(n_hooks))
    tensor = torch.randn(n_hooks, d_model)  # [n_hooks, d_model]
    defaults = dict(
        id=new_vector_id(),
        model=model,
        d_model=d_model,
        hooks=hooks,
        tensor=tensor,
        method="mean_diff",
        n_pairs=4,
        created=created,
        name="happy",
        description="happy minus sad",
        separation=tuple(0.5 + i for i in range(n_hooks)),
        owner="",
    )
    defaults.update(kw)
    return VectorRecord(**defaults)


@pytest.fixture(params=["memory", "redis"])
def store_factory(request: pytest.FixtureRequest) -> Iterator:
    """Builds a fresh store of the parametrized kind (called inside the test's event loop)."""
    if request.param == "memory":
        yield MemoryVectorStore
        return
    prefix = request.getfixturevalue("redis_prefix")
    yield lambda: RedisVectorStore(REDIS_URL, prefix=prefix)


# ---------------------------------------------------------------- records


def test_new_vector_id() -> None:
    ids = {new_vector_id() for _ in range(100)}
    assert len(ids) == 100
    for id in ids:
        assert id.startswith("vec_") and len(id) == 20
        int(id[4:], 16)


def test_record_bytes_round_trip() -> None:
    r = make_record()
    back = VectorRecord.from_bytes(r.to_bytes())
    assert back == r
    assert back.tensor.dtype == torch.float32 and back.tensor.is_contiguous()
    assert back.hooks == r.hooks and back.separation == r.separation and back.created == r.created


def test_record_equality_is_bitwise() -> None:
    r = make_record()
    other = VectorRecord(**{**r.metadata(), "tensor": r.tensor.clone()})
    assert other == r
    other.tensor[0, 0] = torch.nextafter(other.tensor[0, 0], torch.tensor(1e9))
    assert other != r


def test_record_normalises_and_validates_tensor() -> None:
    r = make_record(tensor=torch.randn(8, 2, dtype=torch.float64).t())  # non-contiguous float64 [2, 8]
    assert r.tensor.dtype == torch.float32 and r.tensor.is_contiguous()
    with pytest.raises(ValueError, match="shape"):
        make_record(tensor=torch.randn(3, 8))
    with pytest.raises(ValueError, match="method"):
        make_record(method="magic")


def test_vector_for() -> None:
    r = make_record(n_hooks=3)
    assert torch.equal(r.vector_for("blocks.1.hook_resid_post"), r.tensor[1])
    assert r.vector_for("blocks.2.hook_resid_post").shape == (r.d_model,)
    with pytest.raises(KeyError):
        r.vector_for("blocks.9.hook_resid_post")


def test_truncated_bytes_are_corrupt() -> None:
    data = make_record().to_bytes()
    for cut in (0, 4, 8, 20, len(data) // 2, len(data) - 1):
        with pytest.raises(CorruptRecord):
            VectorRecord.from_bytes(data[:cut])


def test_flipped_tensor_byte_is_corrupt() -> None:
    data = bytearray(make_record().to_bytes())
    data[-3] ^= 0x10  # the tensor bytes are the tail of a safetensors blob
    with pytest.raises(CorruptRecord, match="checksum"):
        VectorRecord.from_bytes(bytes(data))


def test_garbage_is_corrupt() -> None:
    for data in (b"", b"not a safetensors blob at all", b"\xff" * 64):
        with pytest.raises(CorruptRecord):
            VectorRecord.from_bytes(data)
    assert issubclass(CorruptRecord, ValueError)


# ---------------------------------------------------------------- both stores


def test_store_round_trip(store_factory) -> None:
    async def scenario() -> None:
        store: VectorStore = store_factory()
        try:
            r = make_record()
            await store.put(r)
            back = await store.get(r.id)
            assert back == r
            assert torch.equal(back.tensor.view(torch.int32), r.tensor.view(torch.int32))
            assert back.metadata() == r.metadata()
            assert await store.get("vec_0000000000000000") is None
        finally:
            await store.close()

    asyncio.run(scenario())


def test_store_list_filters_and_orders(store_factory) -> None:
    async def scenario() -> None:
        store: VectorStore = store_factory()
        try:
            old = make_record(model="a", created=100.0)
            mid = make_record(model="b", created=200.0)
            new = make_record(model="a", created=300.0)
            for r in (mid, new, old):
                await store.put(r)
            assert [r.id for r in await store.list()] == [new.id, mid.id, old.id]
            assert [r.id for r in await store.list("a")] == [new.id, old.id]
            assert [r.id for r in await store.list(model="b")] == [mid.id]
            assert await store.list("nope") == []
            assert (await store.list())[0] == new
        finally:
            await store.close()

    asyncio.run(scenario())


def test_store_put_replaces(store_factory) -> None:
    async def scenario() -> None:
        store: VectorStore = store_factory()
        try:
            r = make_record(name="first")
            await store.put(r)
            r2 = make_record(id=r.id, name="second", created=r.created + 1)
            await store.put(r2)
            assert await store.get(r.id) == r2
            assert [x.id for x in await store.list()] == [r.id]
        finally:
            await store.close()

    asyncio.run(scenario())


def test_store_delete(store_factory) -> None:
    async def scenario() -> None:
        store: VectorStore = store_factory()
        try:
            r = make_record()
            await store.put(r)
            assert await store.delete(r.id) is True
            assert await store.delete(r.id) is False
            assert await store.get(r.id) is None
            assert await store.list() == []
        finally:
            await store.close()

    asyncio.run(scenario())


# ---------------------------------------------------------------- memory store


def test_memory_store_cap_and_isolation() -> None:
    async def scenario() -> None:
        store = MemoryVectorStore(max_records=2)
        a, b = make_record(), make_record()
        await store.put(a)
        await store.put(b)
        with pytest.raises(RegistryFull):
            await store.put(make_record())
        await store.put(make_record(id=a.id))  # replacing does not grow the store
        assert await store.delete(b.id)
        await store.put(make_record())

        c = make_record()
        await store.delete(a.id)
        await store.put(c)
        c.tensor.zero_()  # the caller's tensor, not the stored copy
        assert not torch.equal((await store.get(c.id)).tensor, c.tensor)

    asyncio.run(scenario())


def test_open_vector_store() -> None:
    for url in (None, ""):
        store = open_vector_store(url)
        assert isinstance(store, MemoryVectorStore) and store.describe() == "memory"
    store = open_vector_store("redis://127.0.0.1:6379/3", prefix="x:")
    assert isinstance(store, RedisVectorStore) and store.describe() == "redis://127.0.0.1:6379/3"
    assert isinstance(store, VectorStore)
    asyncio.run(store.close())


# ---------------------------------------------------------------- redis store


def test_redis_survives_restart(redis_prefix: str) -> None:
    r = make_record()

    async def write() -> None:
        store = RedisVectorStore(REDIS_URL, prefix=redis_prefix)
        await store.put(r)
        await store.close()

    async def read() -> None:
        store = RedisVectorStore(REDIS_URL, prefix=redis_prefix)
        try:
            assert await store.get(r.id) == r
            assert [x.id for x in await store.list()] == [r.id]
        finally:
            await store.close()

    asyncio.run(write())
    asyncio.run(read())


def test_redis_key_layout(redis_prefix: str) -> None:
    r = make_record(created=1234.5)

    async def scenario() -> None:
        store = RedisVectorStore(REDIS_URL, prefix=redis_prefix)
        try:
            await store.put(r)
        finally:
            await store.close()

    asyncio.run(scenario())
    client = redis.Redis.from_url(REDIS_URL)
    try:
        assert VectorRecord.from_bytes(client.get(f"{redis_prefix}vec:{r.id}")) == r
        assert client.zrange(f"{redis_prefix}vecs", 0, -1, withscores=True) == [(r.id.encode(), 1234.5)]
    finally:
        client.close()


def test_redis_corrupt_values(redis_prefix: str, caplog: pytest.LogCaptureFixture) -> None:
    good, truncated, flipped = make_record(created=1.0), make_record(created=2.0), make_record(created=3.0)

    async def put_all() -> None:
        store = RedisVectorStore(REDIS_URL, prefix=redis_prefix)
        for r in (good, truncated, flipped):
            await store.put(r)
        await store.close()

    asyncio.run(put_all())
    client = redis.Redis.from_url(REDIS_URL)
    try:
        data = client.get(f"{redis_prefix}vec:{truncated.id}")
        client.set(f"{redis_prefix}vec:{truncated.id}", data[: len(data) // 2])
        data = bytearray(client.get(f"{redis_prefix}vec:{flipped.id}"))
        data[-1] ^= 0x01
        client.set(f"{redis_prefix}vec:{flipped.id}", bytes(data))
    finally:
        client.close()

    async def check() -> None:
        store = RedisVectorStore(REDIS_URL, prefix=redis_prefix)
        try:
            for bad in (truncated, flipped):
                with pytest.raises(CorruptRecord):
                    await store.get(bad.id)
            with caplog.at_level("WARNING", logger="interpgw.registry.store"):
                assert [r.id for r in await store.list()] == [good.id]
                assert [r.id for r in await store.list()] == [good.id]
            corrupt_logs = [rec for rec in caplog.records if "corrupt" in rec.getMessage()]
            assert len(corrupt_logs) == 2  # one per corrupt id, not one per list call
            assert await store.delete(flipped.id) is True  # corrupt records can still be removed
        finally:
            await store.close()

    asyncio.run(check())


def test_redis_list_drops_dangling_ids(redis_prefix: str) -> None:
    r = make_record(created=10.0)
    client = redis.Redis.from_url(REDIS_URL)
    client.zadd(f"{redis_prefix}vecs", {"vec_dangling0000000": 5.0})

    async def scenario() -> None:
        store = RedisVectorStore(REDIS_URL, prefix=redis_prefix)
        try:
            await store.put(r)
            assert [x.id for x in await store.list()] == [r.id]
        finally:
            await store.close()

    try:
        asyncio.run(scenario())
        assert client.zrange(f"{redis_prefix}vecs", 0, -1) == [r.id.encode()]
    finally:
        client.close()


def test_redis_list_batches(redis_prefix: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import interpgw.registry.store as store_module

    monkeypatch.setattr(store_module, "MGET_BATCH", 3)
    records = [make_record(created=float(i), d_model=4, n_hooks=1) for i in range(8)]

    async def scenario() -> None:
        store = RedisVectorStore(REDIS_URL, prefix=redis_prefix)
        try:
            for r in records:
                await store.put(r)
            assert [x.id for x in await store.list()] == [r.id for r in reversed(records)]
        finally:
            await store.close()

    asyncio.run(scenario())


def test_redis_unreachable_raises_quickly() -> None:
    async def scenario() -> None:
        store = RedisVectorStore("redis://127.0.0.1:1/0", prefix="interpgw-test:unreachable:")
        assert store.describe() == "redis://127.0.0.1:1/0"
        try:
            calls = (
                store.ping,
                lambda: store.put(make_record()),
                lambda: store.get("vec_x"),
                lambda: store.delete("vec_x"),
                store.list,
            )
            for call in calls:
                with pytest.raises(RegistryUnavailable, match="127.0.0.1:1"):
                    await call()
        finally:
            await store.close()

    start = time.monotonic()
    asyncio.run(scenario())
    assert time.monotonic() - start < 5.0


def test_redis_url_password_not_described() -> None:
    store = RedisVectorStore("redis://user:s3cret@127.0.0.1:1/2")
    assert store.describe() == "redis://127.0.0.1:1/2"
    asyncio.run(store.close())
