"""The rules of a blob: an upload's header against its bytes, and an image's size from its header.

PutBlob runs them on every upload, so a header that lies is refused there, naming its field, and
never reaches a worker to fail as INTERNAL; workers run the image and latents rules again on what
they read, since a handle in a request can come from anywhere. Fields are named as the PutBlob
header (a BlobHandle) and its data spell them.
"""

from __future__ import annotations

import io
import math
from typing import NamedTuple

from PIL import ImageFile, JpegImagePlugin, PngImagePlugin

from services.common.api.baton.v1 import handles_pb2 as pb
from services.common.blobs import DIGEST_PREFIX, TENSOR, digest
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
    if media_type != TENSOR:
        if dtype != pb.DTYPE_UNSPECIFIED:
            raise InvalidArgument(
                f"only tensor blobs ({TENSOR}) have a dtype; this is {media_type!r}", field="header.dtype"
            )
        if shape and not media_type.startswith("image/"):  # an image's shape is read from its header
            raise InvalidArgument(
                f"only tensor blobs ({TENSOR}) are sent with a shape; this is {media_type!r}", field="header.shape"
            )
        return
    if dtype not in ITEMSIZE:
        known = ", ".join(dtype_name(d) for d in ITEMSIZE)
        got = "no dtype" if dtype == pb.DTYPE_UNSPECIFIED else f"dtype {dtype_name(dtype)}"
        raise InvalidArgument(f"a tensor blob needs one of {known}; got {got}", field="header.dtype")
    for i, n in enumerate(shape):
        if n < 0:
            raise InvalidArgument(f"dimension {i} of {list(shape)} is negative", field="header.shape")
    expected = math.prod(shape) * ITEMSIZE[dtype]
    if byte_size != expected:
        raise InvalidArgument(
            f"a {dtype_name(dtype)} tensor of shape {list(shape)} is {expected} bytes; {byte_size} were sent",
            field="header.shape",
        )


def check_digest(expected: str, data: bytes | bytearray | memoryview) -> None:
    """The bytes have the digest the header gives, when it gives one."""
    if not expected:
        return
    found = digest(data)
    if found != expected:
        raise InvalidArgument(
            f"the bytes sent have digest {found}, the header says {expected!r} (digests are {DIGEST_PREFIX}<hex>)",
            field="header.digest",
        )


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


def check_upload(media_type: str, dtype: int, shape: list[int], expected_digest: str, data: bytes) -> list[int]:
    """All the checks of one PutBlob; the shape to record: a tensor's, or an image's [H, W, C]."""
    check_tensor_header(media_type, dtype, shape, len(data))
    check_digest(expected_digest, data)
    if media_type.startswith("image/"):
        size = check_image_upload(media_type, data)
        return [size.height, size.width, size.channels]
    return list(shape)
