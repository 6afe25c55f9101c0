"""Activation-trace cache: entry byte form and integrity, content keys, the memory LRU, and the Redis backend against
the real Redis and against a throwaway redis-server that is killed, paused and restarted under it."""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import logging
import os
import signal
import socket
import subprocess
import time
import warnings
from collections.abc import Iterator
from uuid import uuid4

import numpy as np
import pytest
import redis
import torch
from safetensors.torch import save as st_save

from interpgw.cache.backends import (
    _FAILED,
    READ_PIECE_BYTES,
    CacheStats,
    MemoryTraceCache,
    RedisTraceCache,
    TieredTraceCache,
    TraceCache,
    open_trace_cache,
)
from interpgw.cache.entries import CachedTrace, CorruptEntry, cache_key
from interpgw.core.errors import Internal

REDIS_URL = os.environ.get("INTERPGW_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
HOOKS = ("blocks.0.hook_resid_post", "blocks.1.hook_resid_post")


def random_bits(n_positions: int, d_model: int, dtype: torch.dtype) -> torch.Tensor:
    """[n_positions, d_model] of arbitrary bit patterns (NaN payloads, infinities, -0.0, subnormals included)."""
    raw = torch.randint(0, 256, (n_positions, d_model * dtype.itemsize), dtype=torch.uint8)
    return raw.view(dtype)


def make_entry(
    dtype: torch.dtype = torch.float32, n_positions: int = 3, d_model: int = 8, seed: int = 0, **kw
) -> CachedTrace:
    torch.manual_seed(seed)
    defaults = dict(
        token_ids=[*range(100, 100 + n_positions), seed],
        positions=list(range(n_positions)),
        tensors={hook: random_bits(n_positions, d_model, dtype) for hook in HOOKS},
        top_logits=None,
        meta={"model": "smollm2", "seed": seed},
    )
    defaults.update(kw)
    return CachedTrace(**defaults)


def assert_bit_identical(a: CachedTrace, b: CachedTrace) -> None:
    assert a == b
    for name, tensor in a.tensors.items():
        other = b.tensors[name]
        assert tensor.dtype == other.dtype and tensor.shape == other.shape
        assert bytes(tensor.reshape(-1).view(torch.uint8).numpy()) == bytes(other.reshape(-1).view(torch.uint8).numpy())


# ---------------------------------------------------------------- entries


@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.float8_e4m3fn], ids=str
)
def test_entry_round_trip_bit_identical(dtype: torch.dtype) -> None:
    entry = make_entry(dtype, n_positions=5, d_model=16)
    data = entry.to_bytes()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. torch's "non-writable buffer" warning
        back = CachedTrace.from_bytes(data)
    assert_bit_identical(back, entry)
    assert back.token_ids == entry.token_ids and back.positions == entry.positions and back.meta == entry.meta
    assert entry.nbytes == 2 * 5 * 16 * dtype.itemsize
    assert CachedTrace.from_bytes(bytearray(data)) == entry and CachedTrace.from_bytes(memoryview(data)) == entry
    # Own, writable memory: editing the result changes neither the input bytes nor a second decode.
    back.tensors[HOOKS[0]].view(torch.uint8).fill_(0)
    assert CachedTrace.from_bytes(data) == entry


def test_entry_decodes_from_pieces_split_anywhere() -> None:
    entry = make_entry(torch.bfloat16, top_logits={"x": [1.5]})
    data = entry.to_bytes()
    header_end = 8 + int.from_bytes(data[:8], "little")
    rng = np.random.default_rng(0)
    # cuts inside the length prefix, the header, at the header's end, inside and between tensors; empty pieces too
    splits = [[3], [header_end // 2], [header_end], [header_end, header_end], list(range(0, len(data), 7))]
    splits += [sorted(rng.integers(0, len(data), size=n).tolist()) for n in (1, 5, 50)]
    for cuts in splits:
        bounds = [0, *cuts, len(data)]
        pieces = [data[a:b] for a, b in itertools.pairwise(bounds)]
        assert_bit_identical(CachedTrace.from_pieces(pieces), entry)
        flipped = [bytearray(p) for p in pieces]
        last = max(i for i, p in enumerate(flipped) if p)
        flipped[last][-1] ^= 0x10  # the last tensor byte
        with pytest.raises(CorruptEntry, match="checksum"):
            CachedTrace.from_pieces(flipped)
    with pytest.raises(CorruptEntry, match="truncated"):
        CachedTrace.from_pieces([data[:100], data[100:-1]])


def format_1_bytes(entry: CachedTrace) -> bytes:
    """What a format 1 gateway wrote (sha256 instead of CRC-32), computed here independently of the module."""
    names = {torch.bfloat16: "BF16", torch.float32: "F32"}
    body = {"format": 1, "token_ids": entry.token_ids, "positions": entry.positions}
    body |= {"top_logits": entry.top_logits, "meta": entry.meta}
    text = json.dumps(body, separators=(",", ":"))
    digest = hashlib.sha256(text.encode())
    for name, tensor in sorted(entry.tensors.items()):
        digest.update(json.dumps([name, names[tensor.dtype], list(tensor.shape)], separators=(",", ":")).encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    header = json.dumps({**body, "sha256": digest.hexdigest()}, separators=(",", ":"))
    return st_save(dict(entry.tensors), metadata={"interpgw": header})


def test_format_1_entries_are_still_read_and_checked() -> None:
    entry = make_entry(torch.bfloat16, top_logits={"x": [1.5]})
    old = format_1_bytes(entry)
    assert_bit_identical(CachedTrace.from_bytes(old), entry)
    flipped = bytearray(old)
    flipped[-3] ^= 0x04
    with pytest.raises(CorruptEntry, match="checksum"):
        CachedTrace.from_bytes(bytes(flipped))
    written = entry.to_bytes()  # format 2
    meta = json.loads(json.loads(written[8 : 8 + int.from_bytes(written[:8], "little")])["__metadata__"]["interpgw"])
    assert meta["format"] == 2 and len(meta["crc32"]) == 8 and "sha256" not in meta


def test_entry_is_plain_safetensors() -> None:
    from safetensors.torch import load

    entry = make_entry(torch.bfloat16)
    loaded = load(entry.to_bytes())
    assert set(loaded) == set(HOOKS)
    assert all(torch.equal(loaded[h].view(torch.int16), entry.tensors[h].view(torch.int16)) for h in HOOKS)


def test_entry_empty_tensors_round_trip() -> None:
    entry = CachedTrace(
        token_ids=[5, 6],
        positions=[],
        tensors={HOOKS[0]: torch.empty(0, 64, dtype=torch.bfloat16), HOOKS[1]: torch.empty(0, 64)},
    )
    back = CachedTrace.from_bytes(entry.to_bytes())
    assert_bit_identical(back, entry)
    assert back.tensors[HOOKS[0]].shape == (0, 64) and back.tensors[HOOKS[0]].dtype == torch.bfloat16
    assert entry.nbytes == 0
    no_tensors = CachedTrace(token_ids=[1], positions=[0], tensors={}, meta={"note": "logits only"})
    assert CachedTrace.from_bytes(no_tensors.to_bytes()) == no_tensors


def test_entry_top_logits_and_meta_round_trip() -> None:
    top_logits = {
        "positions": [0, 1, 2],
        "token_ids": [[5, 9], [1, 2], [7, 3]],
        "logits": [[12.5, -3.25], [0.1, 1e-7], [float("inf"), -0.0]],
    }
    meta = {"model": "smollm2", "revision": "abc123", "nested": {"ünïcode": "✓", "list": [1, 2.5, None, True]}}
    entry = make_entry(torch.float16, top_logits=top_logits, meta=meta)
    back = CachedTrace.from_bytes(entry.to_bytes())
    assert_bit_identical(back, entry)
    assert back.top_logits == top_logits and back.meta == meta
    assert repr(back).startswith("CachedTrace(n_tokens=")


def test_entry_tensors_sharing_memory() -> None:
    capture = torch.randn(2, 3, 8)  # [n_hooks, n_positions, d_model]: one buffer, one view per hook
    same = torch.randn(3, 8)
    entry = CachedTrace(
        token_ids=[1, 2, 3],
        positions=[0, 1, 2],
        tensors={"a": capture[0], "b": capture[1], "c": same, "d": same},
    )
    back = CachedTrace.from_bytes(entry.to_bytes())
    assert back == entry and torch.equal(back.tensors["c"], back.tensors["d"])


def test_entry_validation() -> None:
    good = torch.zeros(2, 4)
    with pytest.raises(ValueError, match="shape"):
        CachedTrace(token_ids=[1], positions=[0, 1, 2], tensors={"h": good})
    with pytest.raises(ValueError, match="shape"):
        CachedTrace(token_ids=[1], positions=[0], tensors={"h": torch.zeros(4)})
    with pytest.raises(ValueError, match="int64"):
        CachedTrace(token_ids=[1], positions=[0, 1], tensors={"h": good.long()})
    with pytest.raises(ValueError, match="hook name"):
        CachedTrace(token_ids=[1], positions=[0, 1], tensors={"__metadata__": good})
    with pytest.raises(TypeError):
        make_entry(meta={"x": object()}).to_bytes()  # not JSON-safe: a caller bug, raised


def test_entry_truncated_raises_corrupt() -> None:
    data = make_entry(torch.bfloat16, top_logits={"x": [1.5]}).to_bytes()
    for length in range(len(data)):
        with pytest.raises(CorruptEntry):
            CachedTrace.from_bytes(data[:length])
    with pytest.raises(CorruptEntry):
        CachedTrace.from_bytes(data + b"\0")


def test_entry_bit_flips_never_decode_to_other_data() -> None:
    entry = make_entry(torch.float32, n_positions=2, d_model=4, top_logits={"logits": [[1.5, -2.0]]})
    data = entry.to_bytes()
    tensor_start = len(data) - entry.nbytes
    n_detected = 0
    for i in range(len(data)):
        flipped = bytearray(data)
        flipped[i] ^= 1 << (i % 8)
        try:
            back = CachedTrace.from_bytes(bytes(flipped))
        except CorruptEntry:
            n_detected += 1
            continue
        # A flip may only survive where it changes no value (e.g. "e" -> "E" in a JSON exponent).
        assert i < tensor_start and back == entry, f"flip at byte {i} decoded to different data"
    assert n_detected >= len(data) - 2


def test_entry_foreign_data_raises_corrupt() -> None:
    assert issubclass(CorruptEntry, Internal) and issubclass(CorruptEntry, ValueError)
    assert CorruptEntry("x").code == "INTERNAL"
    entry = make_entry()
    foreign = [
        b"",
        b"not a safetensors value",
        os.urandom(4096),
        st_save({HOOKS[0]: torch.zeros(3, 8)}),  # safetensors without our metadata
        st_save({HOOKS[0]: torch.zeros(3, 8)}, metadata={"interpgw": "[1, 2]"}),
        st_save({HOOKS[0]: torch.zeros(3, 8)}, metadata={"interpgw": '{"format": 99}'}),
        st_save({HOOKS[0]: torch.zeros(3, 8)}, metadata={"interpgw": '{"format": true}'}),  # True == 1 in Python
        st_save(dict(entry.tensors), metadata={"interpgw": "{"}),
    ]
    # A valid entry's metadata attached to other tensor values: the checksum catches it.
    header = bytes(entry.to_bytes())
    meta_json = header[8 : 8 + int.from_bytes(header[:8], "little")]
    interpgw_meta = json.loads(meta_json)["__metadata__"]["interpgw"]
    foreign.append(st_save({h: t + 1 for h, t in entry.tensors.items()}, metadata={"interpgw": interpgw_meta}))
    foreign.append(st_save({h: t.to(torch.float64) for h, t in entry.tensors.items()}, metadata={"interpgw": "{}"}))
    for data in foreign:
        with pytest.raises(CorruptEntry):
            CachedTrace.from_bytes(data)


# ---------------------------------------------------------------- cache keys


BASE_PARTS = {
    "model": "smollm2-135m",
    "revision": "0123abcd",
    "token_ids": [1, 2, 3, 4],
    "hooks": list(HOOKS),
    "positions": [-1],
    "interventions": [{"hook": HOOKS[0], "op": "add", "scale": 4.0, "vector": "vec_0"}],
    "dtype": "bfloat16",
}


def test_cache_key_stable() -> None:
    key = cache_key(BASE_PARTS)
    assert key.startswith("tr_") and len(key) == 43
    int(key[3:], 16)
    assert cache_key(dict(reversed(list(BASE_PARTS.items())))) == key  # dict order does not matter
    assert cache_key(json_copy(BASE_PARTS)) == key
    # Pinned: a change here silently invalidates (or worse, aliases) every entry already in a shared Redis.
    # (Format 1's key was tr_8b58f3467b54ea572902bd38ea7e7a70ed51f6ab: format 2 entries live under other keys.)
    assert cache_key({"a": 1, "b": [1, 2]}) == "tr_04199fe5fb84dccdc4088dc7144758a569bb9a12"


def json_copy(value: dict) -> dict:
    return json.loads(json.dumps(value))


@pytest.mark.parametrize(
    "change",
    [
        {"model": "smollm2-360m"},
        {"revision": "0123abce"},
        {"token_ids": [1, 2, 3, 5]},
        {"token_ids": [2, 1, 3, 4]},
        {"hooks": [HOOKS[0]]},
        {"hooks": list(reversed(HOOKS))},
        {"positions": [-2]},
        {"positions": None},
        {"interventions": []},
        {"interventions": [{"hook": HOOKS[0], "op": "add", "scale": 4.5, "vector": "vec_0"}]},
        {"dtype": "float32"},
        {"top_k": 5},
    ],
    ids=lambda change: next(iter(change)),
)
def test_cache_key_sensitive_to_every_part(change: dict) -> None:
    assert cache_key({**BASE_PARTS, **change}) != cache_key(BASE_PARTS)


# ---------------------------------------------------------------- memory cache


def serialized_size(entry: CachedTrace) -> int:
    return len(entry.to_bytes())


def test_memory_lru_eviction_and_byte_accounting() -> None:
    entries = {name: make_entry(seed=i) for i, name in enumerate("abcd")}
    size = serialized_size(entries["a"])
    assert all(serialized_size(e) == size for e in entries.values())
    events: list[tuple[str, int]] = []

    async def scenario() -> None:
        cache = MemoryTraceCache(max_bytes=3 * size)
        assert isinstance(cache, TraceCache) and cache.describe() == "memory"
        cache.stats.on_event = lambda kind, nbytes: events.append((kind, nbytes))
        for name in "abc":
            assert await cache.put(name, entries[name])
        assert cache.nbytes == 3 * size and len(cache) == 3
        assert_bit_identical(await cache.get("a"), entries["a"])  # "a" becomes the most recently used
        assert await cache.put("d", entries["d"])  # evicts "b", the least recently used
        assert "b" not in cache and all(k in cache for k in "acd")
        assert await cache.put("e", entries["a"])  # evicts "c"
        assert "c" not in cache and all(k in cache for k in "ade")
        assert cache.nbytes == 3 * size and cache.stats.evictions == 2
        assert await cache.get("b") is None
        # Replacing a key and deleting keep the byte count exact.
        assert await cache.put("d", entries["d"])
        assert cache.nbytes == 3 * size and len(cache) == 3
        await cache.delete("a")
        await cache.delete("missing")
        assert cache.nbytes == 2 * size and len(cache) == 2
        await cache.close()
        assert cache.nbytes == 0 and len(cache) == 0

    asyncio.run(scenario())
    assert events[:4] == [("write", size)] * 3 + [("hit", size)]
    assert events[4:6] == [("eviction", size), ("write", size)]
    assert ("miss", 0) in events


def test_memory_stats_counts() -> None:
    async def scenario() -> CacheStats:
        cache = MemoryTraceCache(max_bytes=1 << 20)
        entry = make_entry()
        await cache.put("k", entry)
        await cache.get("k")
        await cache.get("k")
        await cache.get("nope")
        return cache.stats

    stats = asyncio.run(scenario())
    size = serialized_size(make_entry())
    assert (stats.hits, stats.misses, stats.writes, stats.errors) == (2, 1, 1, 0)
    assert stats.bytes_read == 2 * size and stats.bytes_written == size
    assert stats.as_dict()["hits"] == 2 and set(stats.as_dict()) >= {"evictions", "corrupt", "skipped_too_large"}


def test_memory_hit_is_an_independent_copy() -> None:
    async def scenario() -> None:
        cache = MemoryTraceCache()
        entry = make_entry()
        await cache.put("k", entry)
        entry.tensors[HOOKS[0]].fill_(1.0)  # the caller's tensor changes after caching
        first = await cache.get("k")
        assert_bit_identical(first, make_entry())
        first.tensors[HOOKS[1]].fill_(2.0)  # and the caller edits what it got
        assert_bit_identical(await cache.get("k"), make_entry())

    asyncio.run(scenario())


def test_memory_too_large_skipped() -> None:
    async def scenario() -> None:
        entry = make_entry(n_positions=16, d_model=64)  # 8 KiB of tensors
        cache = MemoryTraceCache(max_bytes=1 << 20, max_entry_bytes=4096)
        assert not await cache.put("big", entry)
        assert cache.stats.skipped_too_large == 1 and len(cache) == 0 and cache.nbytes == 0
        # Tensors fit but the serialized entry (header included) does not.
        cache = MemoryTraceCache(max_bytes=1 << 20, max_entry_bytes=entry.nbytes)
        assert not await cache.put("big", entry)
        assert cache.stats.skipped_too_large == 1 and len(cache) == 0
        # Larger than the whole cache.
        cache = MemoryTraceCache(max_bytes=4096)
        assert not await cache.put("big", entry)
        assert cache.stats.skipped_too_large == 1 and await cache.get("big") is None
        cache = MemoryTraceCache(max_bytes=1 << 20, max_entry_bytes=serialized_size(entry))
        assert await cache.put("big", entry)

    asyncio.run(scenario())


def test_memory_ttl() -> None:
    async def scenario() -> None:
        cache = MemoryTraceCache(ttl_s=0.2)
        await cache.put("k", make_entry())
        assert await cache.get("k") is not None
        await asyncio.sleep(0.3)
        assert "k" not in cache
        assert await cache.get("k") is None
        assert len(cache) == 0 and cache.nbytes == 0 and cache.stats.misses == 1

    asyncio.run(scenario())


def test_memory_large_entry_offloaded_round_trip() -> None:
    async def scenario() -> None:
        cache = MemoryTraceCache()
        entry = make_entry(torch.bfloat16, n_positions=256, d_model=4096)  # 4 MiB: (de)serialized off the loop
        assert await cache.put("k", entry)
        assert_bit_identical(await cache.get("k"), entry)

    asyncio.run(scenario())


def test_stats_listener_failure_does_not_break_cache(caplog: pytest.LogCaptureFixture) -> None:
    def broken(kind: str, nbytes: int) -> None:
        raise RuntimeError("metrics down")

    async def scenario() -> None:
        cache = MemoryTraceCache()
        cache.stats.on_event = broken
        assert await cache.put("k", make_entry())
        assert await cache.get("k") is not None
        assert cache.stats.hits == 1 and cache.stats.writes == 1

    with caplog.at_level(logging.WARNING, logger="interpgw.cache.backends"):
        asyncio.run(scenario())
    assert sum("listener" in r.getMessage() for r in caplog.records) == 1


def test_constructor_validation_and_open() -> None:
    with pytest.raises(ValueError):
        MemoryTraceCache(max_bytes=0)
    with pytest.raises(ValueError):
        MemoryTraceCache(ttl_s=0)
    with pytest.raises(ValueError, match="Redis URL"):
        RedisTraceCache("nonsense://x")
    memory = open_trace_cache(None, "p:", max_bytes=1000, max_entry_bytes=100, ttl_s=5.0)
    assert isinstance(memory, MemoryTraceCache) and (memory.max_bytes, memory.max_entry_bytes) == (1000, 100)
    assert memory.ttl_s == 5.0
    remote = open_trace_cache("redis://user:s3cret@127.0.0.1:6379/3", "p:", 1000, 100, None, near=False)
    assert isinstance(remote, RedisTraceCache) and isinstance(remote, TraceCache)
    assert remote.describe() == "redis://127.0.0.1:6379/3" and remote.prefix == "p:" and remote.ttl_s is None
    asyncio.run(remote.close())
    alone = open_trace_cache("redis://127.0.0.1:6379/3", "p:", 0, 100, None)  # no in-process budget: Redis alone
    assert isinstance(alone, RedisTraceCache)
    asyncio.run(alone.close())
    tiered = open_trace_cache("redis://127.0.0.1:6379/3", "p:", 1000, 100, 7.0)
    assert isinstance(tiered, TieredTraceCache) and isinstance(tiered, TraceCache)
    assert isinstance(tiered.near, MemoryTraceCache) and isinstance(tiered.far, RedisTraceCache)
    assert (tiered.near.max_bytes, tiered.near.max_entry_bytes, tiered.near.ttl_s) == (1000, 100, 7.0)
    assert (tiered.far.max_entry_bytes, tiered.far.ttl_s) == (100, 7.0)
    assert tiered.describe() == "memory+redis://127.0.0.1:6379/3"
    asyncio.run(tiered.close())


# ---------------------------------------------------------------- redis cache (the real server)


@pytest.fixture
def redis_prefix() -> Iterator[str]:
    """A key prefix unique to the test; every key under it is deleted afterwards. Fails if Redis is not running."""
    client = redis.Redis.from_url(REDIS_URL)
    client.ping()  # the suite needs the real Redis; fail loudly rather than skip
    prefix = f"interpgw-test:{uuid4().hex}:"
    yield prefix
    keys = list(client.scan_iter(match=prefix + "*"))
    if keys:
        client.delete(*keys)
    client.close()


def test_redis_hit_miss_and_layout(redis_prefix: str) -> None:
    entry = make_entry(torch.bfloat16, top_logits={"logits": [[1.0]]})
    key = cache_key({"test": redis_prefix})

    async def scenario() -> CacheStats:
        cache = RedisTraceCache(REDIS_URL, prefix=redis_prefix, ttl_s=60)
        try:
            assert await cache.get(key) is None
            assert await cache.put(key, entry)
            assert_bit_identical(await cache.get(key), entry)
            return cache.stats
        finally:
            await cache.close()

    stats = asyncio.run(scenario())
    size = serialized_size(entry)
    assert (stats.hits, stats.misses, stats.writes, stats.errors, stats.corrupt) == (1, 1, 1, 0, 0)
    assert stats.bytes_read == size and stats.bytes_written == size
    client = redis.Redis.from_url(REDIS_URL)
    try:
        stored = client.get(f"{redis_prefix}trace:{key}")
        assert CachedTrace.from_bytes(stored) == entry
        assert 0 < client.pttl(f"{redis_prefix}trace:{key}") <= 60_000
    finally:
        client.close()


def test_redis_no_ttl_delete_and_too_large(redis_prefix: str) -> None:
    entry = make_entry()

    async def scenario() -> None:
        cache = RedisTraceCache(REDIS_URL, prefix=redis_prefix, ttl_s=None, max_entry_bytes=4096)
        try:
            assert await cache.put("k", entry)
            client = redis.Redis.from_url(REDIS_URL)
            assert client.pttl(f"{redis_prefix}trace:k") == -1  # no expiry
            await cache.delete("k")
            assert not client.exists(f"{redis_prefix}trace:k")
            client.close()
            assert not await cache.put("big", make_entry(n_positions=16, d_model=64))
            assert cache.stats.skipped_too_large == 1 and await cache.get("big") is None
        finally:
            await cache.close()

    asyncio.run(scenario())


def test_redis_large_value_is_read_in_pieces_bit_identical_and_checked(redis_prefix: str) -> None:
    entry = make_entry(torch.bfloat16, n_positions=256, d_model=4096)  # 2 MiB of tensors: read in pieces
    assert serialized_size(entry) > READ_PIECE_BYTES
    client = redis.Redis.from_url(REDIS_URL)
    rkey = f"{redis_prefix}trace:big"

    async def scenario() -> CacheStats:
        cache = RedisTraceCache(REDIS_URL, prefix=redis_prefix)
        try:
            assert await cache.put("big", entry)
            assert_bit_identical(await cache.get("big"), entry)
            data = client.get(rkey)
            assert await cache._get_in_pieces(rkey, len(data) + 1) is None  # replaced since its size was read
            flipped = bytearray(data)
            flipped[len(data) // 2] ^= 0x01  # one bit in a middle piece
            client.set(rkey, bytes(flipped))
            assert await cache.get("big") is None and not client.exists(rkey)
            return cache.stats
        finally:
            await cache.close()

    try:
        stats = asyncio.run(scenario())
        assert (stats.hits, stats.corrupt, stats.errors) == (1, 1, 0)
    finally:
        client.close()


def test_redis_corrupt_value_is_a_miss_and_deleted(redis_prefix: str, caplog: pytest.LogCaptureFixture) -> None:
    entry = make_entry(torch.bfloat16)
    client = redis.Redis.from_url(REDIS_URL)

    async def put_all() -> None:
        cache = RedisTraceCache(REDIS_URL, prefix=redis_prefix)
        try:
            for name in ("truncated", "flipped", "junk"):
                assert await cache.put(name, entry)
        finally:
            await cache.close()

    async def get_all() -> CacheStats:
        cache = RedisTraceCache(REDIS_URL, prefix=redis_prefix)
        try:
            for name in ("truncated", "flipped", "junk"):
                assert await cache.get(name) is None
            return cache.stats
        finally:
            await cache.close()

    try:
        asyncio.run(put_all())
        data = client.get(f"{redis_prefix}trace:truncated")
        client.set(f"{redis_prefix}trace:truncated", data[: len(data) - 7])
        flipped = bytearray(data)
        flipped[-5] ^= 0x10  # inside the tensor bytes
        client.set(f"{redis_prefix}trace:flipped", bytes(flipped))
        client.set(f"{redis_prefix}trace:junk", b"junk")
        with caplog.at_level(logging.WARNING, logger="interpgw.cache.backends"):
            stats = asyncio.run(get_all())
        assert (stats.corrupt, stats.misses, stats.hits, stats.errors) == (3, 3, 0, 0)
        for name in ("truncated", "flipped", "junk"):
            assert not client.exists(f"{redis_prefix}trace:{name}")
        assert sum("corrupt" in r.getMessage() for r in caplog.records) == 1  # rate-limited
    finally:
        client.close()


def test_tiered_reads_near_first_and_copies_far_hits_near(redis_prefix: str) -> None:
    """The near tier answers what it holds without Redis; a far hit is copied near after it is returned."""
    small, large = make_entry(torch.bfloat16, seed=1), make_entry(n_positions=256, d_model=2048, seed=2)
    assert serialized_size(large) > READ_PIECE_BYTES  # read from Redis in pieces, joined for the near copy
    client = redis.Redis.from_url(REDIS_URL)

    async def scenario() -> None:
        writer = TieredTraceCache(MemoryTraceCache(), RedisTraceCache(REDIS_URL, prefix=redis_prefix))
        reader = TieredTraceCache(MemoryTraceCache(), RedisTraceCache(REDIS_URL, prefix=redis_prefix))
        try:
            for key, entry in (("small", small), ("large", large)):
                assert await reader.get(key) is None  # a miss in both tiers
                assert await writer.put(key, entry)  # serialized once, stored in both
                assert client.get(f"{redis_prefix}trace:{key}") == writer.near._entries[key][0]
                assert_bit_identical(await reader.get(key), entry)  # from Redis (far)
                await asyncio.gather(*reader._fills.values())  # the copy into near, after the hit was returned
                assert key in reader.near and not reader._fills
                client.delete(f"{redis_prefix}trace:{key}")  # gone from Redis: both still hit, from memory
                for cache in (reader, writer):
                    assert_bit_identical(await cache.get(key), entry)
            assert (reader.far.stats.hits, reader.far.stats.misses) == (2, 2)  # Redis was read twice only
            assert (reader.near.stats.hits, reader.near.stats.misses, reader.near.stats.writes) == (2, 4, 2)
            assert (reader.stats.hits, reader.stats.misses) == (4, 2)  # the whole: a hit in either tier
            assert (writer.near.stats.writes, writer.far.stats.writes) == (2, 2)
            got = await reader.get("small")
            got.tensors[HOOKS[0]].zero_()  # a hit is the caller's own copy, near too
            assert_bit_identical(await reader.get("small"), small)
            await reader.delete("small")
            assert await reader.get("small") is None and await writer.get("small") is not None  # near is per replica
        finally:
            await reader.close()
            await writer.close()

    try:
        asyncio.run(scenario())
    finally:
        client.close()


def test_tiered_with_redis_down_keeps_serving_and_storing_near() -> None:
    entry = make_entry(seed=3)

    async def scenario() -> TieredTraceCache:
        cache = TieredTraceCache(MemoryTraceCache(), RedisTraceCache(f"redis://127.0.0.1:{free_port()}/0"))
        try:
            assert await cache.get("k") is None
            assert await cache.put("k", entry)  # Redis refused it; memory kept it
            assert_bit_identical(await cache.get("k"), entry)
            too_large = make_entry(n_positions=64, d_model=64)
            small_tiers = TieredTraceCache(
                MemoryTraceCache(max_entry_bytes=1024), RedisTraceCache(REDIS_URL, max_entry_bytes=2048)
            )
            assert not await small_tiers.put("big", too_large)  # too large for either tier: not serialized
            assert (small_tiers.near.stats.skipped_too_large, small_tiers.far.stats.skipped_too_large) == (1, 1)
            await small_tiers.close()
            return cache
        finally:
            await cache.close()

    cache = asyncio.run(scenario())
    assert cache.far.stats.errors >= 2 and (cache.near.stats.hits, cache.near.stats.writes) == (1, 1)


def test_redis_unreachable_never_raises(caplog: pytest.LogCaptureFixture) -> None:
    port = free_port()
    entry = make_entry()

    async def scenario() -> RedisTraceCache:
        cache = RedisTraceCache(f"redis://127.0.0.1:{port}/0", retry_interval_s=0.0)
        try:
            for _ in range(3):
                assert await cache.get("k") is None
                assert not await cache.put("k", entry)
                await cache.delete("k")
            return cache
        finally:
            await cache.close()

    start = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="interpgw.cache.backends"):
        cache = asyncio.run(scenario())
    assert time.monotonic() - start < 3.0
    assert cache.stats.errors == 9 and cache.stats.misses == 0 and cache.stats.writes == 0
    warnings_logged = [
        r for r in caplog.records if r.name == "interpgw.cache.backends" and r.levelno == logging.WARNING
    ]
    assert len(warnings_logged) == 1 and f"127.0.0.1:{port}" in warnings_logged[0].getMessage()


# ---------------------------------------------------------------- redis cache (a throwaway server, killed)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """A redis-server subprocess without persistence, on a fixed port so that it can be restarted in place."""

    def __init__(self, port: int, *extra: str) -> None:
        self.port = port
        self.extra = extra
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        args = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        self.proc = subprocess.Popen([*args, *self.extra], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis(port=self.port, socket_connect_timeout=0.2)
        deadline = time.monotonic() + 10
        try:
            while True:
                try:
                    client.ping()
                    return
                except redis.ConnectionError:
                    if time.monotonic() > deadline or self.proc.poll() is not None:
                        raise
                    time.sleep(0.02)
        finally:
            client.close()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)  # in case it was paused
            self.proc.kill()
            self.proc.wait(timeout=10)


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer(free_port())
    server.start()
    try:
        yield server
    finally:
        server.kill()


async def timed(call) -> tuple[object, float]:
    start = time.monotonic()
    result = await call
    return result, time.monotonic() - start


def test_redis_killed_paused_and_restarted(redis_server: RedisServer) -> None:
    entry = make_entry(torch.bfloat16)
    retry = 0.5

    async def scenario() -> None:
        cache = RedisTraceCache(redis_server.url, prefix="t:", retry_interval_s=retry)
        try:
            assert await cache.put("k1", entry)
            assert_bit_identical(await cache.get("k1"), entry)

            # Killed: calls come back quickly with misses / not stored, never raising.
            redis_server.kill()
            result, elapsed = await timed(cache.get("k1"))
            assert result is None and elapsed < 1.5
            assert cache.stats.errors == 1 and cache.skipped_while_down == 0
            # The breaker is open: Redis is not tried again until the retry interval has passed.
            for call in (cache.put("k2", entry), cache.get("k1"), cache.delete("k1")):
                result, elapsed = await timed(call)
                assert not result and elapsed < 0.1
            assert cache.stats.errors == 4 and cache.skipped_while_down == 3
            await asyncio.sleep(retry + 0.1)
            result, elapsed = await timed(cache.put("k2", entry))  # the probe: still down
            assert result is False and elapsed < 1.5 and cache.skipped_while_down == 3
            assert cache.stats.errors == 5

            # Restarted (empty, no persistence): caching resumes by itself after the retry interval.
            redis_server.start()
            await asyncio.sleep(retry + 0.1)
            assert await cache.put("k3", entry)
            assert_bit_identical(await cache.get("k3"), entry)
            assert await cache.get("k1") is None  # the old server's data is gone: a plain miss

            # Paused (accepts connections, never answers): one call pays the ~1 s deadline, the next ones nothing.
            os.kill(redis_server.proc.pid, signal.SIGSTOP)
            errors = cache.stats.errors
            result, elapsed = await timed(cache.get("k3"))
            assert result is None and 0.8 < elapsed < 1.5
            result, elapsed = await timed(cache.get("k3"))
            assert result is None and elapsed < 0.1
            assert cache.stats.errors == errors + 2
            os.kill(redis_server.proc.pid, signal.SIGCONT)
            await asyncio.sleep(retry + 0.1)
            assert_bit_identical(await cache.get("k3"), entry)
        finally:
            await cache.close()

    asyncio.run(scenario())


def test_redis_large_read_in_a_thread_fails_like_any_command(redis_server: RedisServer) -> None:
    """Large values are read by the synchronous client in a worker thread: a Redis that dies or stops answering
    there costs the command's deadline, counts as an error and opens the breaker, as on the asyncio client."""
    entry = make_entry(torch.bfloat16, n_positions=256, d_model=4096, seed=4)  # 2 MiB: read in pieces
    rkey = "t:trace:big"

    async def scenario() -> None:
        cache = RedisTraceCache(redis_server.url, prefix="t:", retry_interval_s=60.0)
        try:
            assert await cache.put("big", entry)
            assert_bit_identical(await cache.get("big"), entry)
            size = serialized_size(entry)
            assert size > READ_PIECE_BYTES
            os.kill(redis_server.proc.pid, signal.SIGSTOP)  # after its size was read, before its pieces
            try:
                read = cache._exec("get", lambda: cache._get_in_pieces(rkey, size), "send", nbytes=size)
                result, elapsed = await timed(read)
                assert result is _FAILED and elapsed < cache._deadline_s(size) + 0.5  # failed, at its deadline
                assert cache.stats.errors == 1 and cache._skipping()
                assert await cache.get("big") is None and cache.skipped_while_down == 1  # the breaker is open
            finally:
                os.kill(redis_server.proc.pid, signal.SIGCONT)
        finally:
            await cache.close()

    asyncio.run(scenario())


def test_redis_full_fails_puts_but_keeps_reading() -> None:
    server = RedisServer(free_port(), "--maxmemory", "4mb", "--maxmemory-policy", "noeviction")
    server.start()
    entries = [make_entry(n_positions=64, d_model=1024, seed=i) for i in range(16)]  # 512 KiB each

    async def scenario() -> None:
        cache = RedisTraceCache(server.url, prefix="t:")
        try:
            stored = 0
            for i, entry in enumerate(entries):  # until Redis is over maxmemory and refuses writes (OOM)
                result, elapsed = await timed(cache.put(f"k{i}", entry))
                assert elapsed < 1.5
                if not result:
                    break
                stored += 1
            assert 0 < stored < len(entries)
            assert cache.stats.errors == 1 and cache.stats.writes == stored  # counted, not raised
            # The server answered, so the breaker stays closed: reads go on at once.
            assert cache.skipped_while_down == 0
            for i in range(stored):
                assert_bit_identical(await cache.get(f"k{i}"), entries[i])
            assert await cache.get(f"k{stored}") is None
            assert cache.stats.hits == stored and cache.skipped_while_down == 0
        finally:
            await cache.close()

    try:
        asyncio.run(scenario())
    finally:
        server.kill()


def test_the_gateway_puts_memory_in_front_of_redis_for_cached_traces_only() -> None:
    from interpgw.config import CacheConfig, ServerConfig
    from interpgw.serve import _trace_repository

    with pytest.raises(SystemExit, match="--cache-max-bytes must be positive without --redis-url"):
        _trace_repository(ServerConfig(cache=CacheConfig(max_bytes=0)), None)
    tiered = _trace_repository(ServerConfig(redis_url=REDIS_URL), None)
    redis_only = _trace_repository(ServerConfig(redis_url=REDIS_URL, cache=CacheConfig(max_bytes=0)), None)
    try:
        assert isinstance(tiered.cache, TieredTraceCache) and isinstance(tiered.stored, RedisTraceCache)
        assert tiered.cache.near.max_bytes == CacheConfig().max_bytes
        assert isinstance(redis_only.cache, RedisTraceCache) and isinstance(redis_only.stored, RedisTraceCache)
    finally:
        for repository in (tiered, redis_only):
            asyncio.run(repository.close())
