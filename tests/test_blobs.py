"""BlobStore against a real Redis and a real Redis Cluster (every test runs on both)."""

from __future__ import annotations

import threading
import time

import pytest
import redis
import torch
from redis.cluster import RedisCluster

from services.common.blobs import BlobStore, digest
from services.common.errors import BlobCorrupt, BlobNotFound

FLOATS = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
INTS = [torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64]


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality (NaN == NaN, -0.0 != 0.0)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))


def special_floats(dtype: torch.dtype) -> torch.Tensor:
    values = torch.tensor([float("nan"), float("inf"), float("-inf"), -0.0, 0.0, 1.5, -2.25, 1e-30, 7.0])
    return torch.cat([values.to(dtype), torch.randn(3, 38, dtype=torch.float32).to(dtype).reshape(-1)]).reshape(
        3, 1, -1
    )


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_float_round_trip_is_bit_exact_with_nan_inf_and_negative_zero(store, dtype):
    t = special_floats(dtype)
    back = store.get_tensor(store.put_tensor(t))
    assert same_bits(back, t)
    assert torch.signbit(back.reshape(-1)[3]) and not torch.signbit(back.reshape(-1)[4])


@pytest.mark.parametrize("dtype", INTS, ids=str)
def test_integer_round_trip_keeps_extremes(store, dtype):
    info = torch.iinfo(dtype)
    t = torch.tensor([info.min, info.max, 0, 1, -1 if info.min < 0 else 2], dtype=dtype).reshape(5, 1)
    assert same_bits(store.get_tensor(store.put_tensor(t)), t)


def test_bool_and_empty_and_scalar_tensors_round_trip(store):
    for t in (torch.tensor([True, False, True]), torch.empty(0, 4), torch.tensor(3.5)):
        assert same_bits(store.get_tensor(store.put_tensor(t)), t)


def test_non_contiguous_input_is_stored_in_logical_order(store):
    base = torch.arange(4 * 6 * 5, dtype=torch.float32).reshape(4, 6, 5)
    view = base.permute(2, 0, 1)[:, ::2]
    assert not view.is_contiguous()
    back = store.get_tensor(store.put_tensor(view))
    assert same_bits(back, view.contiguous())


def test_large_tensor_crosses_chunk_boundaries(redis_client):
    store = BlobStore(redis_client, chunk_bytes=4 << 20, ttl_s=120)
    t = torch.randn(75_000_000 + 3)  # ~300 MB, not a multiple of the chunk size
    handle = store.put_tensor(t)
    assert handle.byte_size == t.numel() * 4
    assert handle.byte_size > 70 * handle.chunk_bytes
    assert same_bits(store.get_tensor(handle), t)
    store.delete(handle)


def test_no_redis_value_exceeds_the_chunk_size_and_every_key_has_a_ttl(store, redis_client):
    handle = store.put_tensor(torch.randn(3 << 18), name="chunked")  # 3 MiB in 1 MiB chunks
    keys = [handle.key] + [f"{handle.key}:{handle.generation}:{i}" for i in range(3)]
    for key in keys[1:]:
        assert redis_client.strlen(key) == store.chunk_bytes
    for key in keys:
        assert 0 < redis_client.pttl(key) <= 600_000


def test_bytes_round_trip_with_media_type(store):
    data = bytes(range(256)) * 9000
    handle = store.put_bytes(data, media_type="image/png", name="pictures/one")
    assert handle.media_type == "image/png"
    assert bytes(store.get_bytes(handle)) == data
    assert bytes(store.get_bytes("pictures/one")) == data  # by name: the latest generation


def test_blob_of_one_name_lives_on_one_cluster_slot(store, redis_client):
    if not isinstance(redis_client, RedisCluster):
        pytest.skip("slots exist only in Redis Cluster")
    handle = store.put_tensor(torch.randn(3 << 18))
    slots = {
        redis_client.keyslot(k) for k in [handle.key, *(f"{handle.key}:{handle.generation}:{i}" for i in range(3))]
    }
    assert len(slots) == 1


def test_missing_blob_is_not_found_naming_the_key(store):
    with pytest.raises(BlobNotFound, match=r"baton:blob:\{never-written\}"):
        store.get_tensor("never-written")


def test_expired_blob_is_not_found_naming_the_key(store):
    handle = store.put_tensor(torch.randn(10), name="short-lived", ttl_s=0.2)
    time.sleep(0.5)
    with pytest.raises(BlobNotFound, match=r"baton:blob:\{short-lived\}"):
        store.get_tensor(handle)
    with pytest.raises(BlobNotFound, match=r"baton:blob:\{short-lived\}"):
        store.get_tensor("short-lived")


def test_corrupted_chunk_is_data_loss(store, redis_client):
    handle = store.put_tensor(torch.randn(3 << 18))
    redis_client.setrange(f"{handle.key}:{handle.generation}:1", 1000, b"\x00\x01\x02")
    with pytest.raises(BlobCorrupt, match="digest"):
        store.get_tensor(handle)


def test_truncated_chunk_is_data_loss(store, redis_client):
    handle = store.put_tensor(torch.randn(3 << 18))
    key = f"{handle.key}:{handle.generation}:2"
    redis_client.set(key, redis_client.get(key)[:-4], keepttl=True)
    with pytest.raises(BlobCorrupt):
        store.get_tensor(handle)


def test_delete_unlinks_manifest_and_chunks(store, redis_client):
    handle = store.put_tensor(torch.randn(3 << 18), name="to-delete")
    store.delete(handle)
    keys = [handle.key] + [f"{handle.key}:{handle.generation}:{i}" for i in range(3)]
    assert sum(redis_client.exists(k) for k in keys) == 0
    with pytest.raises(BlobNotFound):
        store.get_tensor(handle)


def test_rewrite_keeps_the_old_generation_readable(store):
    first = store.put_tensor(torch.zeros(1000), name="rewritten")
    second = store.put_tensor(torch.ones(1000), name="rewritten")
    assert second.generation != first.generation
    assert torch.equal(store.get_tensor(first), torch.zeros(1000))
    assert torch.equal(store.get_tensor(second), torch.ones(1000))
    assert torch.equal(store.get_tensor("rewritten"), torch.ones(1000))


def test_readers_never_see_a_half_written_blob(redis_client):
    """One writer rewrites a multi-chunk blob while readers read it by name: every read is a
    whole, uniform tensor from one write, or not-found before the first write."""
    store = BlobStore(redis_client, chunk_bytes=64 << 10, ttl_s=60)
    name = f"contended-{time.time_ns()}"
    stop = threading.Event()
    seen: list[float] = []
    errors: list[BaseException] = []

    def write():
        value = 0.0
        while not stop.is_set():
            value += 1
            store.put_tensor(torch.full((200_000,), value), name=name)  # 800 KB, 13 chunks

    def read():
        while not stop.is_set():
            try:
                t = store.get_tensor(name)
            except BlobNotFound:
                continue
            except BaseException as exc:
                errors.append(exc)
                return
            if not bool((t == t[0]).all()):
                errors.append(AssertionError(f"mixed generations: {t.unique()[:5]}"))
                return
            seen.append(float(t[0]))

    threads = [threading.Thread(target=write)] + [threading.Thread(target=read) for _ in range(3)]
    for th in threads:
        th.start()
    time.sleep(2.0)
    stop.set()
    for th in threads:
        th.join()
    assert not errors, errors[0]
    assert len(set(seen)) > 3, "readers should have seen several generations"


def test_a_full_redis_is_resource_exhausted(tmp_path):
    from services.common.errors import ResourceExhausted
    from services.devkit.cluster import RedisServer

    with RedisServer(tmp_path) as server:
        client = redis.Redis.from_url(server.url)
        client.config_set("maxmemory", 4 << 20)
        store = BlobStore(client, chunk_bytes=1 << 20)
        with pytest.raises(ResourceExhausted, match="out of memory"):
            store.put_tensor(torch.randn(4 << 20))
        assert client.dbsize() == 0, "a refused write leaves nothing behind"
        with pytest.raises(ResourceExhausted, match="out of memory"):
            store.put_tensor(torch.randn(4 << 20), name="named")
        assert client.dbsize() == 0, "a refused named write publishes no manifest"
        store.put_tensor(torch.randn(1000), name="named")  # Redis and the store still work


def chunk_keys(handle) -> list[str]:
    return [f"{handle.key}:{handle.generation}:{i}" for i in range(-(-handle.byte_size // handle.chunk_bytes))]


def ms_from_now(seconds: float) -> int:
    return time.time_ns() // 1_000_000 + int(seconds * 1000)


def assert_pttl_near(redis_client, key: str, expires_ms: int) -> None:
    remaining = expires_ms - time.time_ns() // 1_000_000
    assert abs(redis_client.pttl(key) - remaining) < 1000, key


def test_keep_until_on_a_named_blob_rewrites_its_manifest_with_the_new_expiry(store, redis_client):
    handle = store.put_tensor(torch.randn(3 << 18), name="kept")
    expires_ms = ms_from_now(7200)
    kept = store.keep_until(handle, expires_ms)
    assert kept.expires_at.ToMilliseconds() == expires_ms
    latest = store.resolve("kept")
    assert latest.expires_at.ToMilliseconds() == expires_ms
    assert latest.generation == handle.generation and latest.digest == handle.digest
    for key in [handle.key, *chunk_keys(handle)]:
        assert_pttl_near(redis_client, key, expires_ms)


def test_keep_until_with_an_overwritten_generation_leaves_the_new_manifest_alone(store, redis_client):
    first = store.put_tensor(torch.zeros(3 << 18), name="kept-old")
    second = store.put_tensor(torch.ones(3 << 18), name="kept-old")
    expires_ms = ms_from_now(7200)
    store.keep_until(first, expires_ms)
    latest = store.resolve("kept-old")
    assert latest.generation == second.generation
    assert latest.expires_at == second.expires_at
    assert_pttl_near(redis_client, second.key, second.expires_at.ToMilliseconds())
    for key in chunk_keys(first):
        assert_pttl_near(redis_client, key, expires_ms)
    for key in chunk_keys(second):
        assert_pttl_near(redis_client, key, second.expires_at.ToMilliseconds())


def test_a_kept_blob_still_reads_back_with_its_digest(store):
    data = bytes(range(256)) * 9000
    handle = store.put_bytes(data, name="kept-bytes")
    kept = store.keep_until(handle, ms_from_now(7200))
    assert kept.digest == handle.digest == digest(data)
    assert bytes(store.get_bytes(kept)) == data
    assert bytes(store.get_bytes("kept-bytes")) == data
    old = store.put_bytes(b"old", name="kept-bytes-2")
    store.put_bytes(b"new", name="kept-bytes-2")
    assert bytes(store.get_bytes(store.keep_until(old, ms_from_now(7200)))) == b"old"


def test_keep_until_racing_rewrites_never_touches_a_newer_generation(redis_client):
    """A keeper extends each handle a writer hands it while the writer goes on rewriting the
    name; whenever both pause, the manifest names the last write, and its TTL is its stated one."""
    store = BlobStore(redis_client, chunk_bytes=64 << 10, ttl_s=60)
    name = f"kept-contended-{time.time_ns()}"
    writing, keeping = threading.Lock(), threading.Lock()
    last: list = [store.put_tensor(torch.zeros(100_000), name=name)]
    stop = threading.Event()
    errors: list[BaseException] = []

    def write():
        while not stop.is_set():
            with writing:
                last.append(store.put_tensor(torch.full((100_000,), float(len(last))), name=name))
            time.sleep(0.001)  # let the checker in: Lock is not fair

    def keep():
        while not stop.is_set():
            with keeping:
                try:
                    store.keep_until(last[-1], ms_from_now(3600))
                except BaseException as exc:
                    errors.append(exc)
                    return
            time.sleep(0.001)

    threads = [threading.Thread(target=write), threading.Thread(target=keep)]
    for th in threads:
        th.start()
    try:
        for _ in range(40):
            time.sleep(0.03)
            with writing, keeping:
                latest = store.resolve(name)
                assert latest.generation == last[-1].generation
                assert_pttl_near(redis_client, latest.key, latest.expires_at.ToMilliseconds())
    finally:
        stop.set()
        for th in threads:
            th.join()
    assert not errors, errors[0]
    assert len(last) > 10, "the writer should have rewritten the name many times"


def test_keep_until_works_on_a_full_redis(tmp_path):
    from services.devkit.cluster import RedisServer

    with RedisServer(tmp_path) as server:
        client = redis.Redis.from_url(server.url)
        store = BlobStore(client, chunk_bytes=1 << 20)
        handle = store.put_tensor(torch.randn(1000), name="retained")
        client.config_set("maxmemory", 1)
        with pytest.raises(redis.exceptions.OutOfMemoryError):
            client.set("probe", b"x")  # Redis refuses writes now
        expires_ms = ms_from_now(7200)
        store.keep_until(handle, expires_ms)
        assert store.resolve("retained").expires_at.ToMilliseconds() == expires_ms
