"""Uploads are checked at PutBlob: a header that lies about its bytes is refused there, naming the
field, and an image's size is read from its header (and recorded) without decoding it."""

from __future__ import annotations

import dataclasses
import io
import struct
import time
import zlib

import grpc
import pytest
import torch
from PIL import Image, ImageFile

from services.client.sync_client import blob_chunks
from services.common.api.baton.v1 import denoiser_pb2 as dpb
from services.common.api.baton.v1 import handles_pb2 as pb
from services.common.blobs import TENSOR, digest
from services.common.errors import InvalidArgument
from services.common.limits import DEFAULT
from services.common.rules import blobs as rules
from services.common.tensors import itemsize
from services.denoiser.codec import VaeCodec
from services.denoiser.inputs import read_image
from tests.denoise_kit import make_engine

LATENTS = [1, 4, 32, 32]


def encoded(fmt: str, mode: str = "RGB", size: tuple[int, int] = (48, 32), **save) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, 90).save(buf, format=fmt, **save)
    return buf.getvalue()


def png_file(width: int, height: int, idat: bytes) -> bytes:
    """A 1-bit greyscale PNG of width x height with the given compressed pixel data."""

    def chunk(tag: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def png_bomb(width: int = 9000, height: int = 9000) -> bytes:
    """A whole, valid, all-black PNG of width x height: ~10 KB that would decode to 81 MB (243 MB in RGB)."""
    rows = zlib.compressobj(9)
    row = b"\0" * (1 + (width + 7) // 8)  # the filter byte, then the row's bits
    return png_file(width, height, b"".join(rows.compress(row) for _ in range(height)) + rows.flush())


def refused(fn, field: str, match: str | None = None) -> InvalidArgument:
    with pytest.raises(InvalidArgument, match=match) as info:
        fn()
    assert info.value.field == field, info.value
    return info.value


# -- the rules, in process --------------------------------------------------------------
def test_a_tensor_header_that_matches_its_bytes_passes():
    rules.check_tensor_header(TENSOR, pb.DTYPE_FLOAT32, LATENTS, 4 * 4 * 32 * 32)
    rules.check_tensor_header(TENSOR, pb.DTYPE_INT64, [], 8)  # a scalar
    rules.check_tensor_header(TENSOR, pb.DTYPE_FLOAT16, [0, 4], 0)


@pytest.mark.parametrize(
    "dtype,shape,size,field,match",
    [
        (999, LATENTS, 16384, "header.dtype", "got dtype 999"),
        (pb.DTYPE_UNSPECIFIED, LATENTS, 16384, "header.dtype", "got no dtype"),
        (pb.DTYPE_FLOAT32, LATENTS, 10, "header.shape", "is 16384 bytes; 10 were sent"),
        (pb.DTYPE_FLOAT32, [1, -4, 32, 32], 16384, "header.shape", "dimension 1 .* is negative"),
        (pb.DTYPE_FLOAT32, [-1, -4], 16, "header.shape", "negative"),
    ],
    ids=["unknown-dtype", "no-dtype", "too-few-bytes", "negative-dimension", "two-negatives-multiply-positive"],
)
def test_a_tensor_header_that_lies_is_refused_naming_its_field(dtype, shape, size, field, match):
    refused(lambda: rules.check_tensor_header(TENSOR, dtype, shape, size), field, match)


def test_a_non_tensor_blob_carries_no_dtype_or_shape():
    refused(lambda: rules.check_tensor_header("image/png", pb.DTYPE_FLOAT32, [], 10), "header.dtype")
    refused(lambda: rules.check_tensor_header("application/octet-stream", 0, [2, 5], 10), "header.shape")
    rules.check_tensor_header("image/png", 0, [64, 64, 3], 10)  # a GetBlob handle's shape, sent back: ignored


def test_the_rules_item_sizes_are_the_tensor_codecs():
    assert {d: rules.ITEMSIZE[d] for d in rules.ITEMSIZE} == {d: itemsize(d) for d in rules.ITEMSIZE}
    assert set(rules.ITEMSIZE) == set(pb.DType.values()) - {pb.DTYPE_UNSPECIFIED}


def test_a_digest_is_checked_only_when_given():
    rules.check_digest("", b"abc")
    rules.check_digest(digest(b"abc"), b"abc")
    refused(lambda: rules.check_digest(digest(b"abd"), b"abc"), "header.digest", "xxh3-128:")


@pytest.mark.parametrize(
    "fmt,mode,save,channels",
    [
        ("PNG", "RGB", {}, 3),
        ("PNG", "RGBA", {}, 4),
        ("PNG", "P", {}, 1),
        ("JPEG", "L", {}, 1),
        ("JPEG", "RGB", {}, 3),
        ("WEBP", "RGB", {}, 3),
        ("WEBP", "RGB", {"lossless": True}, 3),
        ("WEBP", "RGBA", {"lossless": True}, 4),
        ("WEBP", "RGBA", {}, 4),
    ],
)
def test_an_image_s_size_format_and_channels_come_from_its_header(fmt, mode, save, channels):
    size = rules.image_size(encoded(fmt, mode, (37, 21), **save))
    assert size == rules.ImageSize(37, 21, fmt, channels)


def test_an_image_size_is_read_past_pil_s_own_pixel_guard():
    # 20000 x 20000 is beyond twice PIL's MAX_IMAGE_PIXELS, where Image.open raises: max-pixels decides.
    side = 20000
    assert side * side > 2 * (Image.MAX_IMAGE_PIXELS or 0)
    assert rules.image_size(png_file(side, side, b"never read")) == rules.ImageSize(side, side, "PNG", 1)


@pytest.mark.parametrize(
    "data,match",
    [
        (b"not a png", "none of PNG, JPEG, WEBP"),
        (b"\x89PNG\r\n\x1a\n garbage after the signature", "not a readable PNG"),
        (b"\xff\xd8\xff\xe0 and then nothing", "not a readable JPEG"),
        (b"RIFF\0\0\0\0WEBPVP8 ", "not a readable WEBP"),
        (encoded("GIF"), "none of PNG"),
    ],
    ids=["garbage", "bad-png", "bad-jpeg", "cut-webp", "gif"],
)
def test_an_image_whose_header_cannot_be_read_is_refused(data, match):
    refused(lambda: rules.image_size(data), "data", match)


def test_an_image_upload_must_be_what_its_media_type_says():
    assert rules.check_image_upload("image/jpeg", encoded("JPEG")).format == "JPEG"
    error = refused(lambda: rules.check_image_upload("image/png", encoded("JPEG")), "header.media_type")
    assert "send it as image/jpeg" in str(error)
    refused(lambda: rules.check_image_upload("image/gif", encoded("GIF")), "header.media_type", "image/png")


def test_an_image_upload_records_height_width_and_channels():
    shape = rules.check_upload("image/png", pb.DTYPE_UNSPECIFIED, [], "", encoded("PNG", "RGBA", (48, 32)))
    assert shape == [32, 48, 4]


def test_image_pixels_are_bounded_by_max_pixels():
    limits = dataclasses.replace(DEFAULT, max_pixels=64 * 64)
    rules.check_image_pixels(64, 64, limits, "image")
    refused(lambda: rules.check_image_pixels(65, 64, limits, "inputs[0]"), "inputs[0]", "max-pixels allows 4096")


@pytest.mark.parametrize("dtype", [pb.DTYPE_FLOAT32, pb.DTYPE_FLOAT16, pb.DTYPE_BFLOAT16, pb.DTYPE_FLOAT64])
def test_float_latents_pass(dtype):
    rules.check_latents_blob(dtype, LATENTS, "latents")
    rules.check_latents_blob(dtype, LATENTS[1:], "latents")


@pytest.mark.parametrize(
    "dtype,shape,match",
    [
        (pb.DTYPE_INT8, LATENTS, "got int8"),
        (pb.DTYPE_UINT8, LATENTS, "got uint8"),
        (pb.DTYPE_BOOL, LATENTS, "got bool"),
        (pb.DTYPE_FLOAT32, [4, 32], "got \\[4, 32\\]"),
        (pb.DTYPE_FLOAT32, [1, 1, 4, 32, 32], "no empty dimension"),
        (pb.DTYPE_FLOAT32, [1, 4, 0, 32], "no empty dimension"),
    ],
)
def test_latents_that_are_not_float_c_h_w_are_refused(dtype, shape, match):
    refused(lambda: rules.check_latents_blob(dtype, shape, "latents"), "latents", match)


# -- workers read an image's header before decoding it -----------------------------------
def test_read_image_refuses_a_png_bomb_from_its_header_without_decoding(single_store, monkeypatch):
    handle = single_store.put_bytes(png_bomb(), media_type="image/png")

    def decoded(self):
        raise AssertionError("the image was decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", decoded)
    started = time.monotonic()
    with pytest.raises(InvalidArgument, match="9000x9000 image is 81000000 pixels; max-pixels allows"):
        read_image(single_store, handle, "RGB")
    assert time.monotonic() - started < 2.0


def test_read_image_decodes_an_image_within_the_limit(single_store):
    handle = single_store.put_bytes(encoded("PNG", "RGBA", (20, 12)), media_type="image/png")
    image = read_image(single_store, handle, "RGB", limits=dataclasses.replace(DEFAULT, max_pixels=20 * 12))
    assert (image.mode, image.size) == ("RGB", (20, 12))
    with pytest.raises(InvalidArgument, match="max-pixels allows 239"):
        read_image(single_store, handle, "RGB", limits=dataclasses.replace(DEFAULT, max_pixels=239))


@pytest.fixture(scope="module")
def codec(single_store):
    return VaeCodec(single_store, make_engine(single_store).cache, limits=dataclasses.replace(DEFAULT, max_pixels=4096))


def test_decode_refuses_int8_latents_naming_latents(models, codec, single_store):
    blob = single_store.put_tensor(torch.zeros(LATENTS, dtype=torch.int8))
    request = dpb.DecodeRequest(model=models["sd1"], latents=pb.LatentHandle(blob=blob))
    refused(lambda: codec.decode(request), "latents", "latents are float32, float16, bfloat16, float64 tensors")


def test_encode_refuses_an_image_past_max_pixels_naming_it(models, codec, single_store):
    image = single_store.put_bytes(encoded("PNG", "RGB", (128, 64)), media_type="image/png")
    request = dpb.EncodeRequest(model=models["sd1"], images=[image])
    refused(lambda: codec.encode(request), "images[0]", "128x64 image is 8192 pixels; max-pixels allows 4096")


# -- against a real gateway ------------------------------------------------------------
@pytest.fixture(scope="module")
def gateway(checked_cluster):
    with checked_cluster.client() as client:
        yield client


def put(client, header: pb.BlobHandle, data: bytes) -> pb.BlobHandle:
    return client.stub.PutBlob(blob_chunks(header, data), timeout=60)


def refused_upload(client, header: pb.BlobHandle, data: bytes, field: str) -> str:
    with pytest.raises(grpc.RpcError) as info:
        put(client, header, data)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    assert f"field {field!r}" in info.value.details(), info.value.details()
    return info.value.details()


def tensor_header(dtype: int = pb.DTYPE_FLOAT32, shape: list[int] = LATENTS, **more) -> pb.BlobHandle:
    return pb.BlobHandle(media_type=TENSOR, dtype=dtype, shape=shape, **more)


def test_put_blob_refuses_an_unknown_dtype(gateway):
    refused_upload(gateway, tensor_header(dtype=999), bytes(16384), "header.dtype")


def test_put_blob_refuses_too_few_bytes_for_the_shape(gateway):
    details = refused_upload(gateway, tensor_header(), bytes(10), "header.shape")
    assert "16384 bytes; 10 were sent" in details


def test_put_blob_refuses_a_negative_dimension(gateway):
    refused_upload(gateway, tensor_header(shape=[1, -4, 32, 32]), bytes(16384), "header.shape")


def test_put_blob_refuses_a_wrong_digest(gateway):
    refused_upload(gateway, tensor_header(digest=digest(b"other bytes")), bytes(16384), "header.digest")


def test_put_blob_stores_a_tensor_whose_header_and_digest_match(gateway):
    t = torch.randn(LATENTS)
    raw = t.numpy().tobytes()
    handle = put(gateway, tensor_header(digest=digest(raw)), raw)
    assert list(handle.shape) == LATENTS and handle.digest == digest(raw)
    assert torch.equal(gateway.get_tensor(handle), t)


def test_put_blob_refuses_a_garbage_png(gateway):
    refused_upload(gateway, pb.BlobHandle(media_type="image/png"), b"\x89PNG not really", "data")


def test_put_blob_refuses_a_jpeg_sent_as_png_naming_the_real_type(gateway):
    details = refused_upload(gateway, pb.BlobHandle(media_type="image/png"), encoded("JPEG"), "header.media_type")
    assert "image/jpeg" in details


def test_put_blob_records_an_image_s_height_width_and_channels(gateway):
    handle = gateway.put_bytes(encoded("PNG", "RGB", (48, 32)), "image/png")
    assert list(handle.shape) == [32, 48, 3] and handle.media_type == "image/png"
    assert handle.dtype == pb.DTYPE_UNSPECIFIED


def test_put_blob_accepts_a_png_bomb_recording_its_size_without_decoding_it(gateway):
    # Its pixels are refused where it is used (Submit, a worker), naming that input; not here.
    data = png_bomb()
    assert len(data) < 100_000
    started = time.monotonic()
    handle = gateway.put_bytes(data, "image/png")
    assert list(handle.shape) == [9000, 9000, 1]
    assert time.monotonic() - started < 10.0
