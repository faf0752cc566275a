"""BlobStore: tensors and bytes in Redis, chunked, digest-checked, with a TTL on everything.

Layout for a blob named N (all keys share the hash tag {N}, so one blob sits on one Redis
Cluster slot):
  <prefix>:blob:{N}                the manifest: a serialized BlobHandle (the header)
  <prefix>:blob:{N}:<gen>:<i>      chunk i of generation gen, at most chunk_bytes long

The header travels in the handle; a reader with a handle reads the chunks and checks the
digest. A named blob (e.g. "<job>/<stage>") also gets a manifest, so that it can be found by
name: chunks and manifest are written in one MULTI/EXEC, so the name only ever points at a
complete blob. Each write is a new generation, so rewriting N never changes the bytes a reader
of an older generation is reading; the old chunks get a short grace TTL instead. An anonymous
blob (no name given) has no manifest: nobody can find it before its handle is returned.

Big blobs stream: a BlobWriter (open_writer) SETs each chunk as its bytes arrive and hashes on
the way, and iter_chunks reads one chunk at a time, so neither holds more than a chunk of a blob.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Iterator
from typing import cast

import redis
import torch
import xxhash
from google.protobuf.timestamp_pb2 import Timestamp
from prometheus_client import Counter

from services.common.api.baton.v1 import handles_pb2 as pb
from services.common.errors import BlobCorrupt, BlobNotFound, InvalidArgument, ResourceExhausted, Unavailable
from services.common.raw_tensor import TENSOR
from services.common.redis_conn import Client
from services.common.tensors import tensor_bytes, tensor_from_bytes

OCTET = "application/octet-stream"
DIGEST_PREFIX = "xxh3-128:"
# The default key prefix of a store's blobs: <prefix>:blob:{N}.
PREFIX = "baton"
# How long the chunks of an overwritten generation stay readable for readers already holding it.
OVERWRITE_GRACE_S = 60.0
# How often keep_until rereads a manifest that changed between its read and its write.
KEEP_ATTEMPTS = 8
# How long the chunks of an unfinished BlobWriter live (renewed while it writes): a writer whose
# process dies mid-upload leaves them this long at most.
UPLOAD_TTL_S = 120.0

WRITTEN_BYTES = Counter("baton_blob_written_bytes", "Bytes written to the blob store")
READ_BYTES = Counter("baton_blob_read_bytes", "Bytes read from the blob store")
DIGEST_FAILURES = Counter(
    "baton_blob_digest_failures", "Blob reads whose bytes did not match their handle's size or digest (DATA_LOSS)"
)

# keep_until in one step: KEYS = manifest, chunks...; ARGV = expiry (ms), the manifest as read,
# the manifest to write. The chunks always get the expiry; the manifest is replaced only if it
# still holds exactly the bytes read (so a new generation put in between is left alone), and
# only when the caller read one naming its generation (ARGV[2] non-empty). allow-oom: a full
# Redis must still let retention be set, as plain PEXPIREATs did; the new manifest is about the
# size of the old one.
_KEEP_UNTIL_LUA = """#!lua flags=allow-oom
for i = 2, #KEYS do
  redis.call('PEXPIREAT', KEYS[i], ARGV[1])
end
if ARGV[2] == '' then
  return 1
end
if redis.call('GET', KEYS[1]) ~= ARGV[2] then
  return 0
end
redis.call('SET', KEYS[1], ARGV[3], 'PXAT', ARGV[1])
return 1
"""


def digest(data: bytes | bytearray | memoryview) -> str:
    return DIGEST_PREFIX + xxhash.xxh3_128_hexdigest(data)


def _mismatch(message: str) -> BlobCorrupt:
    """The error for a read whose bytes are not what its handle says, counted: corruption in the
    store then shows on a dashboard, not only in the error of the job that met it."""
    DIGEST_FAILURES.inc()
    return BlobCorrupt(message)


@contextlib.contextmanager
def _redis_errors(key: str) -> Iterator[None]:
    """Redis failures as Baton errors: a full Redis is RESOURCE_EXHAUSTED, a gone one UNAVAILABLE."""
    try:
        yield
    except redis.exceptions.ResponseError as exc:
        if isinstance(exc, redis.exceptions.OutOfMemoryError) or "maxmemory" in str(exc) or str(exc).startswith("OOM"):
            raise ResourceExhausted(f"Redis is out of memory writing {key}: {exc}") from exc
        raise
    except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
        raise Unavailable(f"Redis unreachable for {key}: {exc}") from exc


class BlobStore:
    def __init__(
        self,
        client: Client,
        *,
        prefix: str = PREFIX,
        chunk_bytes: int = 4 << 20,
        ttl_s: float = 3600.0,
    ):
        if chunk_bytes <= 0:
            raise ValueError("chunk_bytes must be positive")
        self.redis = client
        self.prefix = prefix
        self.chunk_bytes = chunk_bytes
        self.ttl_s = ttl_s
        self._keep_until = client.register_script(_KEEP_UNTIL_LUA)

    # -- keys ------------------------------------------------------------------------------
    def key_for(self, name: str) -> str:
        if not name or "{" in name or "}" in name:
            raise InvalidArgument(f"blob name {name!r} must be non-empty and free of braces")
        return f"{self.prefix}:blob:{{{name}}}"

    @staticmethod
    def _chunk_keys(handle: pb.BlobHandle) -> list[str]:
        count = max(1, -(-handle.byte_size // handle.chunk_bytes)) if handle.chunk_bytes else 1
        return [f"{handle.key}:{handle.generation}:{i}" for i in range(count)]

    # -- write -----------------------------------------------------------------------------
    def put_bytes(
        self,
        data: bytes | bytearray | memoryview,
        *,
        media_type: str = OCTET,
        name: str | None = None,
        ttl_s: float | None = None,
        dtype: pb.DType = pb.DTYPE_UNSPECIFIED,
        shape: list[int] | None = None,
    ) -> pb.BlobHandle:
        """Writes `data` under `name` (a fresh one when None) and returns its handle."""
        view = memoryview(data).cast("B")
        ttl = self.ttl_s if ttl_s is None else ttl_s
        if ttl <= 0:
            raise InvalidArgument(f"blob TTL must be positive, got {ttl}")
        now_ms = time.time_ns() // 1_000_000
        expire_ms = now_ms + int(ttl * 1000)
        handle = pb.BlobHandle(
            key=self.key_for(name or uuid.uuid4().hex),
            generation=time.time_ns(),
            media_type=media_type,
            dtype=dtype,
            shape=shape or [],
            byte_size=len(view),
            digest=digest(view),
            chunk_bytes=self.chunk_bytes,
            expires_at=Timestamp(seconds=expire_ms // 1000, nanos=(expire_ms % 1000) * 1_000_000),
        )
        chunks = [view[i : i + self.chunk_bytes] for i in range(0, max(len(view), 1), self.chunk_bytes)]
        keys = self._chunk_keys(handle)
        with _redis_errors(handle.key):
            if name is None:
                self._write_chunks(keys, chunks, expire_ms)
                WRITTEN_BYTES.inc(len(view))
                return handle
            # MULTI/EXEC: chunks first, manifest last, all or nothing. Out of memory, Redis
            # refuses a command at queue time, which discards the whole transaction.
            pipe = self.redis.pipeline(transaction=True)
            for key, chunk in zip(keys, chunks, strict=True):
                pipe.set(key, chunk, pxat=expire_ms)
            pipe.set(handle.key, handle.SerializeToString(), pxat=expire_ms, get=True)
            previous = pipe.execute()[-1]
        WRITTEN_BYTES.inc(len(view))
        if previous is not None:
            self._retire(_parse_manifest(handle.key, previous), now_ms)
        return handle

    def _write_chunks(self, keys: list[str], chunks: list[memoryview], expire_ms: int) -> None:
        """Writes an anonymous blob: nobody can name it before its handle is returned."""
        if len(keys) == 1:
            self.redis.set(keys[0], chunks[0], pxat=expire_ms)
            return
        pipe = self.redis.pipeline(transaction=False)
        for key, chunk in zip(keys, chunks, strict=True):
            pipe.set(key, chunk, pxat=expire_ms)
        try:
            pipe.execute()
        except redis.exceptions.RedisError:
            with contextlib.suppress(redis.exceptions.RedisError):  # free the chunks that did land
                self.redis.unlink(*keys)
            raise

    def open_writer(
        self,
        *,
        media_type: str = OCTET,
        ttl_s: float | None = None,
        dtype: pb.DType = pb.DTYPE_UNSPECIFIED,
        shape: list[int] | None = None,
        tenant: str = "",
    ) -> BlobWriter:
        """A writer of a new anonymous blob whose bytes arrive in pieces (BlobWriter); named
        `<tenant>/<random>` when it is a tenant's upload."""
        ttl = self.ttl_s if ttl_s is None else ttl_s
        if ttl <= 0:
            raise InvalidArgument(f"blob TTL must be positive, got {ttl}")
        header = pb.BlobHandle(
            key=self.key_for(f"{tenant}/{uuid.uuid4().hex}" if tenant else uuid.uuid4().hex),
            generation=time.time_ns(),
            media_type=media_type,
            dtype=dtype,
            shape=shape or [],
            chunk_bytes=self.chunk_bytes,
        )
        return BlobWriter(self.redis, header, ttl)

    def put_tensor(self, t: torch.Tensor, *, name: str | None = None, ttl_s: float | None = None) -> pb.BlobHandle:
        raw, dtype, shape = tensor_bytes(t)
        return self.put_bytes(raw, media_type=TENSOR, name=name, ttl_s=ttl_s, dtype=dtype, shape=shape)

    def _retire(self, old: pb.BlobHandle, now_ms: int) -> None:
        """Lets an overwritten generation's chunks live only a grace period longer."""
        old_expiry_ms = old.expires_at.seconds * 1000 + old.expires_at.nanos // 1_000_000
        until = min(old_expiry_ms, now_ms + int(OVERWRITE_GRACE_S * 1000))
        with _redis_errors(old.key):
            pipe = self.redis.pipeline(transaction=False)
            for key in self._chunk_keys(old):
                pipe.pexpireat(key, until)
            pipe.execute()

    # -- read ------------------------------------------------------------------------------
    def head(self, key_or_name: str) -> pb.BlobHandle:
        """The handle of the latest generation under a key (or blob name)."""
        key = key_or_name if key_or_name.startswith(f"{self.prefix}:blob:{{") else self.key_for(key_or_name)
        with _redis_errors(key):
            raw = cast(bytes | None, self.redis.get(key))
        if raw is None:
            raise BlobNotFound(f"blob {key} does not exist or has expired")
        return _parse_manifest(key, raw)

    def resolve(self, ref: pb.BlobHandle | str) -> pb.BlobHandle:
        """A full handle: as given, or the latest one for a key, name, or key-only handle."""
        if isinstance(ref, str):
            return self.head(ref)
        if not ref.digest:
            return self.head(ref.key)
        return ref

    def get_bytes(self, ref: pb.BlobHandle | str) -> bytearray:
        """The blob's bytes, verified against the handle's digest."""
        handle = self.resolve(ref)
        keys = self._chunk_keys(handle)
        with _redis_errors(handle.key):
            if len(keys) == 1:
                parts = [cast(bytes | None, self.redis.get(keys[0]))]
            else:
                pipe = self.redis.pipeline(transaction=False)
                for key in keys:
                    pipe.get(key)
                parts = pipe.execute()
        out = bytearray(handle.byte_size)
        pos = 0
        for key, part in zip(keys, parts, strict=True):
            if part is None:
                raise BlobNotFound(
                    f"blob {handle.key} (generation {handle.generation}) has expired or was deleted: {key} is gone"
                )
            READ_BYTES.inc(len(part))
            if pos + len(part) > len(out):
                raise _mismatch(
                    f"blob {handle.key}: chunks hold more than the {handle.byte_size} bytes its header says"
                )
            out[pos : pos + len(part)] = part
            pos += len(part)
        if pos != handle.byte_size:
            raise _mismatch(f"blob {handle.key}: chunks hold {pos} bytes, header says {handle.byte_size}")
        found = digest(out)
        if found != handle.digest:
            raise _mismatch(f"blob {handle.key}: digest {found} does not match the handle's {handle.digest}")
        return out

    def iter_chunks(self, ref: pb.BlobHandle | str) -> Iterator[bytes]:
        """The blob's chunks in order, one Redis read each, never the whole blob at once. The digest
        is checked on the way: the last chunk comes only if all of them match (else BlobCorrupt)."""
        handle = self.resolve(ref)
        keys = self._chunk_keys(handle)
        hasher, pos = xxhash.xxh3_128(), 0
        for n, key in enumerate(keys):
            with _redis_errors(handle.key):
                part = cast(bytes | None, self.redis.get(key))
            if part is None:
                raise BlobNotFound(
                    f"blob {handle.key} (generation {handle.generation}) has expired or was deleted: {key} is gone"
                )
            pos += len(part)
            READ_BYTES.inc(len(part))
            if pos > handle.byte_size:
                raise _mismatch(
                    f"blob {handle.key}: chunks hold more than the {handle.byte_size} bytes its header says"
                )
            hasher.update(part)
            if n == len(keys) - 1:
                if pos != handle.byte_size:
                    raise _mismatch(f"blob {handle.key}: chunks hold {pos} bytes, header says {handle.byte_size}")
                found = DIGEST_PREFIX + hasher.hexdigest()
                if found != handle.digest:
                    raise _mismatch(f"blob {handle.key}: digest {found} does not match the handle's {handle.digest}")
            yield part

    def get_tensor(self, ref: pb.BlobHandle | str) -> torch.Tensor:
        handle = self.resolve(ref)
        if handle.media_type != TENSOR:
            raise InvalidArgument(f"blob {handle.key} holds {handle.media_type!r}, not a tensor")
        return tensor_from_bytes(self.get_bytes(handle), handle.dtype, list(handle.shape))

    # -- lifetime --------------------------------------------------------------------------
    def delete(self, ref: pb.BlobHandle | str) -> None:
        """Frees a blob (its manifest, and the chunks of the named generation) with UNLINK."""
        try:
            handle = self.resolve(ref)
        except BlobNotFound:
            return
        with _redis_errors(handle.key):
            latest = cast(bytes | None, self.redis.get(handle.key))
            keys = self._chunk_keys(handle)
            if latest is not None and _parse_manifest(handle.key, latest).generation == handle.generation:
                keys.append(handle.key)
            self.redis.unlink(*keys)

    def keep_until(self, handle: pb.BlobHandle, expires_ms: int) -> pb.BlobHandle:
        """Sets the blob's expiry (e.g. to its job's retention); returns the handle saying so.
        The manifest states the new expiry too, if it still names this generation."""
        if expires_ms <= 0:
            raise InvalidArgument(f"blob {handle.key}: expiry must be a positive Unix time in ms, got {expires_ms}")
        keys = [handle.key, *self._chunk_keys(handle)]
        with _redis_errors(handle.key):
            for _ in range(KEEP_ATTEMPTS):
                raw = cast(bytes | None, self.redis.get(handle.key))
                seen, kept = b"", b""  # no manifest, or another generation's: the chunks only
                if raw is not None:
                    manifest = _parse_manifest(handle.key, raw)
                    if manifest.generation == handle.generation:
                        manifest.expires_at.FromMilliseconds(expires_ms)
                        seen, kept = raw, manifest.SerializeToString()
                if self._keep_until(keys=keys, args=[expires_ms, seen, kept]):
                    break
            else:
                raise Unavailable(f"blob {handle.key}: its manifest kept changing while its expiry was set")
        out = pb.BlobHandle()
        out.CopyFrom(handle)
        out.expires_at.FromMilliseconds(expires_ms)
        return out

    def exists(self, ref: pb.BlobHandle | str) -> bool:
        try:
            handle = self.resolve(ref)
        except BlobNotFound:
            return False
        with _redis_errors(handle.key):
            return self.redis.exists(*self._chunk_keys(handle)) == len(self._chunk_keys(handle))


class BlobWriter:
    """One anonymous blob written as its bytes arrive: each full chunk is SET at once, under a short
    TTL (UPLOAD_TTL_S, renewed as it goes), and hashed on the way; close() writes the last chunk,
    gives all of them the blob's TTL and returns the handle. Until then nobody can read the blob
    (its handle does not exist yet); abort() deletes what was written."""

    def __init__(self, client: Client, header: pb.BlobHandle, ttl_s: float):
        self.redis = client
        self.header = header
        self.ttl_s = ttl_s
        self.byte_size = 0
        self._hasher = xxhash.xxh3_128()
        self._buffer = bytearray(header.chunk_bytes)  # one chunk, reused: the writer's whole footprint
        self._filled = 0
        self._keys: list[str] = []
        self._pending_until_ms = 0

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Adds the next bytes; SETs every chunk they complete."""
        view = memoryview(data).cast("B")
        self._hasher.update(view)
        self.byte_size += len(view)
        size = self.header.chunk_bytes
        while view:
            if self._filled == 0 and len(view) >= size:  # a whole chunk in hand: no copy
                self._set(view[:size])
                view = view[size:]
                continue
            take = min(len(view), size - self._filled)
            self._buffer[self._filled : self._filled + take] = view[:take]
            self._filled += take
            view = view[take:]
            if self._filled == size:
                self._set(memoryview(self._buffer))
                self._filled = 0

    def _set(self, chunk: memoryview) -> None:
        now_ms = time.time_ns() // 1_000_000
        key = f"{self.header.key}:{self.header.generation}:{len(self._keys)}"
        with _redis_errors(self.header.key):
            if now_ms > self._pending_until_ms - int(UPLOAD_TTL_S * 500):  # half the TTL gone: renew it
                self._pending_until_ms = now_ms + int(UPLOAD_TTL_S * 1000)
                if self._keys:
                    self._expire(self._pending_until_ms)
            self._keys.append(key)
            self.redis.set(key, chunk, pxat=self._pending_until_ms)
        WRITTEN_BYTES.inc(len(chunk))

    def _expire(self, at_ms: int) -> list[bool]:
        pipe = self.redis.pipeline(transaction=False)
        for key in self._keys:
            pipe.pexpireat(key, at_ms)
        return pipe.execute()

    def digest(self) -> str:
        """The digest of the bytes written so far."""
        return DIGEST_PREFIX + self._hasher.hexdigest()

    def close(self, shape: list[int] | None = None) -> pb.BlobHandle:
        """Ends the blob and returns its handle (with `shape`, when the bytes decided it)."""
        if self._filled or not self._keys:  # the last, short chunk; an empty blob has one empty chunk
            self._set(memoryview(self._buffer)[: self._filled])
            self._filled = 0
        now_ms = time.time_ns() // 1_000_000
        expire_ms = now_ms + int(self.ttl_s * 1000)
        with _redis_errors(self.header.key):
            kept = self._expire(expire_ms)
        if not all(kept):
            self.abort()
            raise BlobNotFound(f"blob {self.header.key}: chunks of the upload expired before it ended")
        handle = pb.BlobHandle()
        handle.CopyFrom(self.header)
        if shape is not None:
            handle.shape[:] = shape
        handle.byte_size = self.byte_size
        handle.digest = self.digest()
        handle.expires_at.FromMilliseconds(expire_ms)
        return handle

    def abort(self) -> None:
        """Deletes the chunks written so far (best effort: they expire within UPLOAD_TTL_S anyway)."""
        if self._keys:
            with contextlib.suppress(redis.exceptions.RedisError):
                self.redis.unlink(*self._keys)
            self._keys = []


def _parse_manifest(key: str, raw: bytes) -> pb.BlobHandle:
    handle = pb.BlobHandle()
    try:
        handle.ParseFromString(raw)
    except Exception as exc:  # protobuf raises DecodeError, and more on garbage
        raise BlobCorrupt(f"blob {key}: manifest is not a BlobHandle") from exc
    if handle.key != key:
        raise BlobCorrupt(f"blob {key}: manifest names {handle.key!r}")
    return handle
