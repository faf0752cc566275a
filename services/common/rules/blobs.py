"""The rules of a blob: an upload's header against its bytes, a client's handle against the bounds of
a read, and an image's size from its header.

PutBlob runs the upload rules on every upload as its bytes arrive (UploadCheck), so a header that
lies is refused there, naming its field, and never reaches a worker to fail as INTERNAL; workers
run the image and latents rules again on what they read, since a handle in a request can come
from anywhere. A handle from a client or a spec is checked (check_handle) before anything is read
for it, so a forged one costs a refusal, not a read. Fields are named as the PutBlob header (a
BlobHandle) and its data spell them, or under the field a handle was given in (`blob.chunk_bytes`).
"""

from __future__ import annotations

import io
import math
import re
from typing import NamedTuple

from PIL import ImageFile, JpegImagePlugin, PngImagePlugin

from services.common.api.baton.v1 import handles_pb2 as pb
from services.common.blobs import DIGEST_PREFIX, PREFIX, TENSOR, BlobStore, digest
from services.common.errors import InvalidArgument
from services.common.limits import Limits

ITEMSIZE: dict[int, int] = {
    pb.DTYPE_FLOAT32: 4,
    pb.DTYPE_FLOAT16: 2,
    pb.DTYPE_BFLOAT16: 2,
    pb.DTYPE_FLOAT64: 8,
    pb.DTYPE_UINT8: 1,
    pb.DTYPE_INT8: 1,
    pb.DTYPE_INT16: 2,
    pb.DTYPE_INT32: 4,
    pb.DTYPE_INT64: 8,
    pb.DTYPE_BOOL: 1,
}
LATENT_DTYPES = (pb.DTYPE_FLOAT32, pb.DTYPE_FLOAT16, pb.DTYPE_BFLOAT16, pb.DTYPE_FLOAT64)
# The image media types Baton reads, and the format (PIL's name) the bytes must be in.
IMAGE_FORMATS = {"image/png": "PNG", "image/jpeg": "JPEG", "image/webp": "WEBP"}


def dtype_name(dtype: int) -> str:
    """A DType as users write it ("float32"), or the bare number of one the enum lacks."""
    return pb.DType.Name(dtype).removeprefix("DTYPE_").lower() if dtype in pb.DType.values() else str(dtype)


def check_tensor_header(media_type: str, dtype: int, shape: list[int], byte_size: int) -> None:
    """A tensor's dtype and shape describe exactly its bytes; other blobs carry neither (an image's
    shape, as a handle from GetBlob has it, is ignored: PutBlob reads it from the image)."""
    expected = tensor_byte_size(media_type, dtype, shape)
    if expected is not None and byte_size != expected:
        raise InvalidArgument(
            f"a {dtype_name(dtype)} tensor of shape {list(shape)} is {expected} bytes; {byte_size} were sent",
            field="header.shape",
        )


def tensor_byte_size(media_type: str, dtype: int, shape: list[int]) -> int | None:
    """The bytes a tensor header says its blob holds (None for a blob that is not a tensor), once
    its dtype and shape are ones a tensor can have."""
    if media_type != TENSOR:
        if dtype != pb.DTYPE_UNSPECIFIED:
            raise InvalidArgument(
                f"only tensor blobs ({TENSOR}) have a dtype; this is {media_type!r}", field="header.dtype"
            )
        if shape and not media_type.startswith("image/"):  # an image's shape is read from its header
            raise InvalidArgument(
                f"only tensor blobs ({TENSOR}) are sent with a shape; this is {media_type!r}", field="header.shape"
            )
        return None
    if dtype not in ITEMSIZE:
        known = ", ".join(dtype_name(d) for d in ITEMSIZE)
        got = "no dtype" if dtype == pb.DTYPE_UNSPECIFIED else f"dtype {dtype_name(dtype)}"
        raise InvalidArgument(f"a tensor blob needs one of {known}; got {got}", field="header.dtype")
    for i, n in enumerate(shape):
        if n < 0:
            raise InvalidArgument(f"dimension {i} of {list(shape)} is negative", field="header.shape")
    return math.prod(shape) * ITEMSIZE[dtype]


def check_digest(expected: str, data: bytes | bytearray | memoryview) -> None:
    """The bytes have the digest the header gives, when it gives one."""
    if expected:
        check_digest_found(expected, digest(data))


def check_digest_found(expected: str, found: str) -> None:
    """`found`, the digest of the bytes sent, is the one the header gives, when it gives one."""
    if expected and found != expected:
        raise InvalidArgument(
            f"the bytes sent have digest {found}, the header says {expected!r} (digests are {DIGEST_PREFIX}<hex>)",
            field="header.digest",
        )


# The chunk sizes a handle may give. Below 64 KiB a blob of max-blob-bytes becomes thousands of
# Redis round trips and keys (a forged chunk_bytes of 1 on a 1 MB byte_size cost a gateway 12 s
# and hundreds of MB); no store writes chunks that small (the default is 4 MiB). Above 64 MiB one
# Redis value is a slow, blocking transfer; a store configured with larger chunks raises the
# ceiling to its own (the gateway passes it).
MIN_CHUNK_BYTES = 64 << 10
MAX_CHUNK_BYTES = 64 << 20
_DIGEST = re.compile(re.escape(DIGEST_PREFIX) + "[0-9a-f]{32}")


def check_handle(
    handle: pb.BlobHandle,
    max_bytes: int,
    max_chunk_bytes: int = MAX_CHUNK_BYTES,
    *,
    min_chunk_bytes: int = MIN_CHUNK_BYTES,
    key_prefix: str = PREFIX,
    field: str = "blob",
) -> None:
    """A handle from a client or a spec, before anything is read for it: a blob key of this store,
    and a read bounded by max_bytes in at most max_bytes / min_chunk_bytes chunks. A key-only handle
    (no digest, no size: the latest generation, whose manifest gives the rest) is checked for its
    key alone."""
    _check_key(handle.key, key_prefix, f"{field}.key")
    if not handle.digest:
        if handle.byte_size or handle.chunk_bytes:
            raise InvalidArgument(
                "a handle that gives its size gives its digest too: send the handle as PutBlob or a job "
                "returned it, or its key alone for the latest write",
                field=f"{field}.digest",
            )
        return
    if not min_chunk_bytes <= handle.chunk_bytes <= max_chunk_bytes:
        raise InvalidArgument(
            f"chunk_bytes is {handle.chunk_bytes}; blobs here are chunked in {min_chunk_bytes} to "
            f"{max_chunk_bytes} bytes",
            field=f"{field}.chunk_bytes",
        )
    if not 0 <= handle.byte_size <= max_bytes:
        raise InvalidArgument(
            f"byte_size is {handle.byte_size}; blobs here are 0 to {max_bytes} bytes (max-blob-bytes)",
            field=f"{field}.byte_size",
        )
    try:
        check_tensor_header(handle.media_type, handle.dtype, list(handle.shape), handle.byte_size)
    except InvalidArgument as exc:
        raise InvalidArgument(exc.detail, field=f"{field}.{exc.field.removeprefix('header.')}") from exc
    if not _DIGEST.fullmatch(handle.digest):
        raise InvalidArgument(
            f"digest {handle.digest[:80]!r} is not {DIGEST_PREFIX} and 32 lowercase hex digits",
            field=f"{field}.digest",
        )


def check_store_handle(handle: pb.BlobHandle, store: BlobStore, max_bytes: int, field: str = "blob") -> None:
    """check_handle with `store`'s key prefix and chunk bounds (widened to its own chunk size)."""
    check_handle(
        handle,
        max_bytes,
        max(MAX_CHUNK_BYTES, store.chunk_bytes),
        min_chunk_bytes=min(MIN_CHUNK_BYTES, store.chunk_bytes),
        key_prefix=store.prefix,
        field=field,
    )


def _check_key(key: str, prefix: str, field: str) -> None:
    # The one place a handle's key is judged: a check that the key lies inside the caller's
    # tenant (its name under the hash tag) belongs here, beside this one.
    head = f"{prefix}:blob:{{"
    name = key[len(head) : -1] if key.startswith(head) and key.endswith("}") else ""
    if not name or "{" in name or "}" in name:
        raise InvalidArgument(
            f"key {key[:120]!r} is not a blob key of this store ({prefix}:blob:{{<name>}})", field=field
        )


def check_message_bytes(requested: int, default: int, field: str = "chunk_bytes") -> int:
    """The size of GetBlob's data messages: `default` for 0, else one within the chunk bounds (one
    byte a message would make a blob millions of messages)."""
    if requested == 0:
        return default
    if not MIN_CHUNK_BYTES <= requested <= MAX_CHUNK_BYTES:
        raise InvalidArgument(
            f"data messages are {MIN_CHUNK_BYTES} to {MAX_CHUNK_BYTES} bytes (0 for the default); got {requested}",
            field=field,
        )
    return requested


class ImageSize(NamedTuple):
    width: int
    height: int
    format: str  # PIL's name: PNG, JPEG, WEBP
    channels: int  # bands as stored: a palette image has 1


PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
JPEG_MAGIC = b"\xff\xd8\xff"


def image_size(data: bytes | bytearray) -> ImageSize:
    """An encoded image's size, format and channels, read from its header alone: nothing is decoded."""
    head = bytes(data[:30])
    if head.startswith(b"RIFF") and head[8:12] == b"WEBP":
        size = _webp_size(head)
    elif head.startswith(PNG_MAGIC):
        size = _pil_size(PngImagePlugin.PngImageFile, data)
    elif head.startswith(JPEG_MAGIC):
        size = _pil_size(JpegImagePlugin.JpegImageFile, data)
    else:
        raise InvalidArgument(
            f"not a readable image: the bytes are none of {', '.join(IMAGE_FORMATS.values())}", field="data"
        )
    if size.width < 1 or size.height < 1:
        raise InvalidArgument(f"not a readable image: its header says {size.width}x{size.height}", field="data")
    return size


def _pil_size(plugin: type[ImageFile.ImageFile], data: bytes | bytearray) -> ImageSize:
    # The plugin itself, not Image.open: Image.open runs PIL's own pixel guard (MAX_IMAGE_PIXELS),
    # which would refuse or warn on sizes that only max-pixels may decide.
    try:
        with plugin(io.BytesIO(data)) as image:
            width, height = image.size
            return ImageSize(width, height, str(plugin.format), len(image.getbands()))
    except Exception as exc:  # PIL raises several types for a header it cannot parse
        raise InvalidArgument(f"not a readable {plugin.format} image: {exc}", field="data") from exc


def _webp_size(head: bytes) -> ImageSize:
    # Read here, not by PIL: opening a WebP in PIL creates libwebp's decoder, which allocates the
    # whole canvas. Layout: the RIFF header (12 bytes), then the first chunk's tag, size and payload.
    tag = head[12:16]
    if tag == b"VP8 " and len(head) >= 30 and head[23:26] == b"\x9d\x01\x2a":
        return ImageSize(_le(head[26:28]) & 0x3FFF, _le(head[28:30]) & 0x3FFF, "WEBP", 3)
    if tag == b"VP8L" and len(head) >= 25 and head[20] == 0x2F:
        bits = _le(head[21:25])
        return ImageSize((bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1, "WEBP", 4 if (bits >> 28) & 1 else 3)
    if tag == b"VP8X" and len(head) >= 30:
        return ImageSize(_le(head[24:27]) + 1, _le(head[27:30]) + 1, "WEBP", 4 if head[20] & 0x10 else 3)
    raise InvalidArgument("not a readable WEBP image: its header is cut short or of an unknown kind", field="data")


def _le(raw: bytes) -> int:
    return int.from_bytes(raw, "little")


def check_image_upload(media_type: str, data: bytes | bytearray) -> ImageSize:
    """An image upload is PNG, JPEG or WebP, in the format its media type says, with a readable header."""
    if media_type not in IMAGE_FORMATS:
        raise InvalidArgument(f"images are {', '.join(IMAGE_FORMATS)}; got {media_type!r}", field="header.media_type")
    size = image_size(data)
    if size.format != IMAGE_FORMATS[media_type]:
        # Refused, not relabelled: a client that mislabels one file mislabels others.
        real = next(t for t, f in IMAGE_FORMATS.items() if f == size.format)
        raise InvalidArgument(
            f"the bytes are a {size.format} image, not {media_type}; send it as {real}", field="header.media_type"
        )
    return size


def check_image_pixels(width: int, height: int, limits: Limits, field: str) -> None:
    """An image within max-pixels: the bound on what decoding it may allocate."""
    if width * height > limits.max_pixels:
        raise InvalidArgument(
            f"a {width}x{height} image is {width * height} pixels; max-pixels allows {limits.max_pixels}",
            field=field,
        )


def check_latents_blob(dtype: int, shape: list[int], field: str) -> None:
    """Latents are a float tensor, [C, H, W] or [B, C, H, W], with no empty dimension."""
    if dtype not in LATENT_DTYPES:
        accepted = ", ".join(dtype_name(d) for d in LATENT_DTYPES)
        raise InvalidArgument(f"latents are {accepted} tensors; got {dtype_name(dtype)}", field=field)
    if len(shape) not in (3, 4) or min(shape) < 1:
        raise InvalidArgument(
            f"latents are [C, H, W] or [B, C, H, W] with no empty dimension; got {list(shape)}", field=field
        )


# How much of an image upload its header is read from: PNG and JPEG give their size before the
# pixels, after metadata (EXIF, ICC profiles) that stays well inside this.
IMAGE_HEAD_BYTES = 1 << 20


class UploadCheck:
    """The checks of one PutBlob, run as its bytes arrive so that none needs the whole upload: the
    header at once, the size on every message, an image's header from its first IMAGE_HEAD_BYTES,
    the tensor's size and the digest at the end. max_bytes None: no bound (the bytes are in hand)."""

    def __init__(self, media_type: str, dtype: int, shape: list[int], expected_digest: str, max_bytes: int | None):
        self.media_type, self.dtype, self.shape = media_type, dtype, list(shape)
        self.expected_digest = expected_digest
        self.max_bytes = max_bytes
        self.byte_size = 0
        self.tensor_bytes = tensor_byte_size(media_type, dtype, self.shape)
        if self.tensor_bytes is not None and max_bytes is not None and self.tensor_bytes > max_bytes:
            raise InvalidArgument(
                f"a {dtype_name(dtype)} tensor of shape {self.shape} is {self.tensor_bytes} bytes; blobs are "
                f"limited to {max_bytes} bytes here",
                field="header.shape",
            )
        self.head: bytearray | None = bytearray() if media_type.startswith("image/") else None
        self.image: ImageSize | None = None

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Counts and checks the next bytes of the upload."""
        self.byte_size += len(data)
        if self.max_bytes is not None and self.byte_size > self.max_bytes:
            raise InvalidArgument(f"blobs are limited to {self.max_bytes} bytes here", field="data")
        if self.tensor_bytes is not None and self.byte_size > self.tensor_bytes:
            check_tensor_header(self.media_type, self.dtype, self.shape, self.byte_size)  # refuses: too many
        if self.head is not None and self.image is None:
            self.head += memoryview(data)[: IMAGE_HEAD_BYTES - len(self.head)]
            if len(self.head) >= IMAGE_HEAD_BYTES:
                self.image = check_image_upload(self.media_type, self.head)

    def finish(self, found_digest: str) -> list[int]:
        """The last checks, given the digest of all the bytes; the shape to record: a tensor's, or
        an image's [H, W, C]."""
        check_tensor_header(self.media_type, self.dtype, self.shape, self.byte_size)
        check_digest_found(self.expected_digest, found_digest)
        if self.head is None:
            return self.shape
        size = self.image or check_image_upload(self.media_type, self.head)
        return [size.height, size.width, size.channels]


def check_upload(media_type: str, dtype: int, shape: list[int], expected_digest: str, data: bytes) -> list[int]:
    """All the checks of one PutBlob whose bytes are in hand; the shape to record (UploadCheck.finish)."""
    upload = UploadCheck(media_type, dtype, shape, expected_digest, None)
    upload.feed(data)
    return upload.finish(digest(data) if expected_digest else "")
