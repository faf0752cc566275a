"""Bounded handles: a handle from a client is checked before anything is read for it, and blobs
stream through the gateway chunk by chunk, so neither a forged handle nor a big upload or download
costs the gateway more than a few chunks of memory."""

from __future__ import annotations

import io
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from PIL import Image

from services.common.api.baton.v1 import gateway_pb2 as gpb
from services.common.api.baton.v1 import gateway_pb2_grpc
from services.common.api.baton.v1 import handles_pb2 as pb
from services.common.blobs import OCTET, TENSOR, UPLOAD_TTL_S, BlobStore, digest
from services.common.errors import BlobCorrupt, InvalidArgument
from services.common.redis_conn import connect
from services.common.rules import blobs as rules

MIB = 1 << 20
MAX_BYTES = 256 * MIB  # the gateway's max-blob-bytes default
BIG = 96 * MIB


def refused(fn, field: str, match: str | None = None) -> InvalidArgument:
    with pytest.raises(InvalidArgument, match=match) as info:
        fn()
    assert info.value.field == field, info.value
    return info.value


def changed(handle: pb.BlobHandle, **change) -> pb.BlobHandle:
    out = pb.BlobHandle()
    out.CopyFrom(handle)
    for name, value in change.items():
        if name == "shape":
            out.shape[:] = value
        else:
            setattr(out, name, value)
    return out


def stored_handle(**change) -> pb.BlobHandle:
    """A handle as a 4 MiB-chunk store writes one for 1000 bytes, with `change` made to it."""
    handle = pb.BlobHandle(
        key="baton:blob:{5f1d}",
        generation=1,
        media_type=OCTET,
        byte_size=1000,
        digest=digest(bytes(1000)),
        chunk_bytes=4 * MIB,
    )
    return changed(handle, **change)


FORGED = {
    "one-byte-chunks": (dict(chunk_bytes=1, byte_size=1_000_000), "blob.chunk_bytes"),
    "zero-chunk": (dict(chunk_bytes=0), "blob.chunk_bytes"),
    "negative-chunk": (dict(chunk_bytes=-4 * MIB), "blob.chunk_bytes"),
    "huge-chunk": (dict(chunk_bytes=1 << 40), "blob.chunk_bytes"),
    "past-max-blob-bytes": (dict(byte_size=MAX_BYTES + 1), "blob.byte_size"),
    "negative-size": (dict(byte_size=-1), "blob.byte_size"),
    "malformed-digest": (dict(digest="xxh3-128:not-hex"), "blob.digest"),
    "other-hash": (dict(digest="sha256:" + "0" * 64), "blob.digest"),
    "upper-case-digest": (dict(digest=digest(b"x").upper()), "blob.digest"),
    "size-without-digest": (dict(digest=""), "blob.digest"),
    "tensor-shape-not-its-size": (
        dict(media_type=TENSOR, dtype=pb.DTYPE_FLOAT32, shape=[1, 4, 64, 64], byte_size=1000),
        "blob.shape",
    ),
    "tensor-without-dtype": (dict(media_type=TENSOR, shape=[250]), "blob.dtype"),
    "key-outside-blobs": (dict(key="baton:job:j1"), "blob.key"),
    "key-of-a-chunk": (dict(key="baton:blob:{5f1d}:1:0"), "blob.key"),
    "key-of-another-prefix": (dict(key="other:blob:{5f1d}"), "blob.key"),
}


# -- the rules, in process --------------------------------------------------------------
def test_a_handle_as_the_store_writes_it_passes():
    rules.check_handle(stored_handle(), MAX_BYTES)
    tensor = stored_handle(media_type=TENSOR, dtype=pb.DTYPE_FLOAT16, shape=[1, 4, 8, 8], byte_size=512)
    rules.check_handle(tensor, MAX_BYTES)
    rules.check_handle(stored_handle(byte_size=0, digest=digest(b"")), MAX_BYTES)


def test_a_key_only_handle_is_checked_for_its_key_alone():
    rules.check_handle(pb.BlobHandle(key="baton:blob:{job/stage}", media_type="image/png"), MAX_BYTES)
    refused(lambda: rules.check_handle(pb.BlobHandle(key="job/stage"), MAX_BYTES), "blob.key")


@pytest.mark.parametrize("change,field", FORGED.values(), ids=FORGED.keys())
def test_a_forged_handle_is_refused_naming_its_field(change, field):
    refused(lambda: rules.check_handle(stored_handle(**change), MAX_BYTES), field)


def test_a_handle_s_field_is_named_where_it_was_given():
    forged = stored_handle(chunk_bytes=1)
    refused(lambda: rules.check_handle(forged, MAX_BYTES, field="inputs[0].blob"), "inputs[0].blob.chunk_bytes")


def test_chunk_bounds_follow_the_caller_s_store():
    big_chunks = stored_handle(chunk_bytes=128 * MIB)
    refused(lambda: rules.check_handle(big_chunks, MAX_BYTES), "blob.chunk_bytes", "65536 to 67108864")
    rules.check_handle(big_chunks, MAX_BYTES, 128 * MIB)
    rules.check_handle(stored_handle(chunk_bytes=4096), MAX_BYTES, min_chunk_bytes=4096)


def test_get_blob_message_size_is_the_default_or_within_the_chunk_bounds():
    assert rules.check_message_bytes(0, MIB) == MIB
    assert rules.check_message_bytes(64 << 10, MIB) == 64 << 10
    refused(lambda: rules.check_message_bytes(1, MIB), "chunk_bytes")
    refused(lambda: rules.check_message_bytes(-5, MIB), "chunk_bytes")


def test_an_upload_past_its_tensor_size_is_refused_at_the_message_that_overshoots():
    upload = rules.UploadCheck(TENSOR, pb.DTYPE_FLOAT32, [4, 1024], "", MAX_BYTES)
    upload.feed(bytes(16384))
    refused(lambda: upload.feed(b"\0"), "header.shape", "is 16384 bytes; 16385 were sent")


def test_a_tensor_header_past_max_blob_bytes_is_refused_before_any_byte():
    shape = [MIB, 65]  # 260 MiB of float32
    refused(lambda: rules.UploadCheck(TENSOR, pb.DTYPE_FLOAT32, shape, "", MAX_BYTES), "header.shape", "268435456")


def test_an_upload_past_max_blob_bytes_is_refused_as_it_arrives():
    upload = rules.UploadCheck(OCTET, pb.DTYPE_UNSPECIFIED, [], "", 2 * MIB)
    upload.feed(bytes(2 * MIB))
    refused(lambda: upload.feed(b"\0"), "data", "limited to 2097152 bytes")


def test_an_image_upload_is_judged_by_its_first_bytes_before_its_end():
    upload = rules.UploadCheck("image/png", pb.DTYPE_UNSPECIFIED, [], "", MAX_BYTES)
    refused(lambda: upload.feed(b"not a png" * (rules.IMAGE_HEAD_BYTES // 9 + 1)), "data", "none of PNG")


def test_a_streamed_upload_checks_as_the_whole_one_does():
    buf = io.BytesIO()
    Image.new("RGBA", (48, 32), 90).save(buf, format="PNG")
    data = buf.getvalue()
    upload = rules.UploadCheck("image/png", pb.DTYPE_UNSPECIFIED, [], digest(data), MAX_BYTES)
    for start in range(0, len(data), 7):
        upload.feed(data[start : start + 7])
    assert upload.finish(digest(data)) == rules.check_upload("image/png", 0, [], digest(data), data) == [32, 48, 4]
    refused(lambda: upload.finish(digest(b"other")), "header.digest")


# -- the store streams ------------------------------------------------------------------
def chunk_keys(store: BlobStore, handle: pb.BlobHandle) -> list[str]:
    return [f"{handle.key}:{handle.generation}:{i}" for i in range(max(1, -(-handle.byte_size // store.chunk_bytes)))]


@pytest.mark.parametrize("size", [0, 100, 1 << 20, (3 << 20) + 5], ids=["empty", "small", "one-chunk", "four"])
def test_a_written_blob_reads_back_as_put_bytes_would_store_it(store, size):
    data = os.urandom(size)
    writer = store.open_writer(media_type=OCTET)
    for start in range(0, size, 300_000):
        writer.write(data[start : start + 300_000])
    handle = writer.close()
    assert (handle.byte_size, handle.digest, handle.chunk_bytes) == (size, digest(data), store.chunk_bytes)
    assert store.get_bytes(handle) == data
    assert b"".join(store.iter_chunks(handle)) == data
    assert store.exists(handle) and len(list(store.iter_chunks(handle))) == len(chunk_keys(store, handle))
    store.delete(handle)


def test_a_writer_s_chunks_land_as_they_arrive_under_a_short_ttl(store):
    writer = store.open_writer()
    writer.write(bytes(2 * store.chunk_bytes + 10))
    keys = [f"{writer.header.key}:{writer.header.generation}:{i}" for i in range(3)]
    assert [store.redis.exists(k) for k in keys] == [1, 1, 0]
    assert 0 < store.redis.pttl(keys[0]) <= UPLOAD_TTL_S * 1000
    handle = writer.close()
    assert store.redis.pttl(keys[2]) > UPLOAD_TTL_S * 1000  # the blob's own TTL (600 s) once closed
    store.delete(handle)


def test_an_aborted_writer_leaves_nothing(store):
    writer = store.open_writer()
    writer.write(bytes(3 * store.chunk_bytes))
    keys = [f"{writer.header.key}:{writer.header.generation}:{i}" for i in range(3)]
    writer.abort()
    assert store.redis.exists(*keys) == 0


def test_iter_chunks_withholds_the_last_chunk_of_a_blob_whose_digest_fails(store):
    handle = store.put_bytes(os.urandom(3 * store.chunk_bytes))
    store.redis.setrange(chunk_keys(store, handle)[1], 0, b"\0\0\0\0")
    chunks = store.iter_chunks(handle)
    assert len(next(chunks)) == len(next(chunks)) == store.chunk_bytes
    with pytest.raises(BlobCorrupt, match="digest"):
        next(chunks)
    store.delete(handle)


# -- against a real gateway ------------------------------------------------------------
class PeakRss:
    """The peak growth of a process's resident memory over a block, sampled every few ms."""

    def __init__(self, pid: int):
        self.path = Path(f"/proc/{pid}/status")
        self.base = self.peak = 0
        self._stop = threading.Event()

    def rss(self) -> int:
        line = next(ln for ln in self.path.read_text().splitlines() if ln.startswith("VmRSS:"))
        return int(line.split()[1]) << 10

    def _sample(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, self.rss())

    def __enter__(self) -> PeakRss:
        self.base = self.peak = self.rss()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss())

    @property
    def growth(self) -> int:
        return self.peak - self.base


@pytest.fixture(scope="module")
def stub(checked_cluster):
    with checked_cluster.client() as client:
        yield gateway_pb2_grpc.GatewayStub(client.channel)


@pytest.fixture(scope="module")
def redis_of(checked_cluster):
    client = connect(checked_cluster.redis_url, "auto")
    yield BlobStore(client)
    client.close()


@pytest.fixture(scope="module")
def small(stub, redis_of) -> Iterator[pb.BlobHandle]:
    data = os.urandom(1000)
    handle = stub.PutBlob(iter([gpb.BlobChunk(header=pb.BlobHandle(media_type=OCTET)), gpb.BlobChunk(data=data)]))
    yield handle
    redis_of.delete(handle)


def messages(data: bytes | memoryview, header: pb.BlobHandle | None = None) -> Iterator[gpb.BlobChunk]:
    """A PutBlob stream: the header, then `data` in 1 MiB messages."""
    yield gpb.BlobChunk(header=header or pb.BlobHandle(media_type=OCTET))
    view = memoryview(data)
    for start in range(0, len(view), MIB):
        yield gpb.BlobChunk(data=bytes(view[start : start + MIB]))


def read_all(stub, handle: pb.BlobHandle, **request) -> tuple[pb.BlobHandle, bytearray]:
    header, data = pb.BlobHandle(), bytearray()
    for message in stub.GetBlob(gpb.GetBlobRequest(blob=handle, **request), timeout=120):
        if message.HasField("header"):
            header = message.header
        else:
            data += message.data
    return header, data


def blob_keys(store: BlobStore) -> set[bytes]:
    return set(store.redis.scan_iter(match=f"{store.prefix}:blob:*", count=1000))


@pytest.mark.parametrize("change,field", FORGED.values(), ids=FORGED.keys())
def test_get_blob_refuses_a_forged_handle_at_once_without_growing(checked_cluster, stub, small, change, field):
    forged = changed(small, **change)
    with PeakRss(checked_cluster.gateway.pid) as rss:
        started = time.perf_counter()
        with pytest.raises(grpc.RpcError) as info:
            read_all(stub, forged)
        took = time.perf_counter() - started
    print(f"forged {field}: refused in {took * 1e3:.1f} ms, gateway RSS +{rss.growth / MIB:.2f} MiB")
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    assert f"field {field!r}" in info.value.details(), info.value.details()
    assert took < 1.0  # about a millisecond; generous for a loaded CI machine
    assert rss.growth < 4 * MIB


def test_get_blob_refuses_one_byte_messages(stub, small):
    with pytest.raises(grpc.RpcError) as info:
        read_all(stub, small, chunk_bytes=1)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "field 'chunk_bytes'" in info.value.details()


def test_get_blob_by_key_alone_reads_the_latest_write(stub, redis_of):
    redis_of.put_bytes(b"first", name="bounds/named")
    latest = redis_of.put_bytes(b"second", name="bounds/named")
    header, data = read_all(stub, pb.BlobHandle(key=latest.key))
    redis_of.delete(latest)
    assert header == latest and data == b"second"


@pytest.fixture(scope="module")
def big(checked_cluster, stub, redis_of):
    """96 MiB put through the gateway in 1 MiB messages, with the gateway's peak RSS growth."""
    data = os.urandom(BIG)
    with PeakRss(checked_cluster.gateway.pid) as rss:
        started = time.perf_counter()
        handle = stub.PutBlob(messages(data), timeout=120)
        took = time.perf_counter() - started
    print(f"PutBlob 96 MiB: {took:.2f} s, gateway RSS +{rss.growth / MIB:.1f} MiB ({rss.growth / BIG:.3f}x)")
    yield data, handle, rss.growth
    redis_of.delete(handle)


def bound(chunk_bytes: int) -> int:
    # A few chunks in flight (the one being filled or read, gRPC's buffers on both sides of it),
    # plus slack for allocator arenas: far below the blob's own 96 MiB.
    return 6 * chunk_bytes + 32 * MIB


def test_a_96_mib_put_blob_grows_the_gateway_by_a_few_chunks(big):
    data, handle, growth = big
    assert handle.byte_size == BIG and handle.digest == digest(data)
    assert growth < bound(handle.chunk_bytes), f"{growth / MIB:.1f} MiB"


def test_a_96_mib_get_blob_returns_the_bytes_growing_the_gateway_by_a_few_chunks(checked_cluster, stub, big):
    data, handle, _ = big
    with PeakRss(checked_cluster.gateway.pid) as rss:
        started = time.perf_counter()
        header, back = read_all(stub, handle)
        took = time.perf_counter() - started
    print(f"GetBlob 96 MiB: {took:.2f} s, gateway RSS +{rss.growth / MIB:.1f} MiB ({rss.growth / BIG:.3f}x)")
    assert header == handle and back == data
    assert rss.growth < bound(handle.chunk_bytes), f"{rss.growth / MIB:.1f} MiB"


def test_get_blob_of_a_corrupted_blob_ends_in_data_loss_before_its_last_bytes(stub, redis_of):
    data = os.urandom(12 * MIB)
    handle = stub.PutBlob(messages(data), timeout=60)
    first = f"{handle.key}:{handle.generation}:0"
    redis_of.redis.setrange(first, 0, b"\0\0\0\0")
    received = bytearray()
    with pytest.raises(grpc.RpcError) as info:
        for message in stub.GetBlob(gpb.GetBlobRequest(blob=handle), timeout=60):
            received += message.data
    redis_of.delete(handle)
    assert info.value.code() == grpc.StatusCode.DATA_LOSS, info.value.details()
    assert len(received) <= len(data) - (len(data) % handle.chunk_bytes or handle.chunk_bytes)  # not the last chunk


def test_an_upload_cut_off_mid_stream_leaves_no_readable_blob(stub, redis_of):
    before = blob_keys(redis_of)
    sent, release = threading.Event(), threading.Event()

    def stream() -> Iterator[gpb.BlobChunk]:
        yield from messages(os.urandom(12 * MIB))
        sent.set()
        release.wait(60)  # the upload never ends: the client gives up first

    call = stub.PutBlob.future(stream(), timeout=120)
    assert sent.wait(30)
    deadline = time.monotonic() + 10
    while not (written := blob_keys(redis_of) - before) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert written, "no chunk reached Redis while the upload was under way"
    assert all(redis_of.redis.pttl(k) <= UPLOAD_TTL_S * 1000 for k in written)
    call.cancel()
    release.set()
    deadline = time.monotonic() + 10
    while (left := blob_keys(redis_of) & written) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not left, f"{len(left)} chunks of the cut-off upload are still in Redis"


def test_put_blob_refuses_a_second_header(stub):
    def stream() -> Iterator[gpb.BlobChunk]:
        yield from messages(b"abc")
        yield gpb.BlobChunk(header=pb.BlobHandle(media_type=OCTET))

    with pytest.raises(grpc.RpcError) as info:
        stub.PutBlob(stream(), timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "field 'header'" in info.value.details()


def test_put_blob_refuses_a_tensor_past_max_blob_bytes_before_its_bytes(stub):
    header = pb.BlobHandle(media_type=TENSOR, dtype=pb.DTYPE_FLOAT32, shape=[MAX_BYTES // 4 + 1])
    started = time.perf_counter()
    with pytest.raises(grpc.RpcError) as info:
        stub.PutBlob(iter([gpb.BlobChunk(header=header)]), timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "field 'header.shape'" in info.value.details()
    assert time.perf_counter() - started < 1.0
