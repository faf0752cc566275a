"""Encode and Decode (services/denoiser/codec.py) on tiny models, in process with real Redis:
batches stay whole, the tensor format skips 8-bit rounding, and bad input names its field.

Tolerance: bit-exact where both sides run the same VAE call on the same batch (torch.equal),
1e-6 between a batch and one of its images alone; PNGs compare 8-bit pixels exactly."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from PIL import Image

from services.common.api.baton.v1 import denoiser_pb2 as dpb
from services.common.api.baton.v1 import handles_pb2 as pb
from services.common.errors import InvalidArgument
from services.denoiser.codec import VaeCodec
from tests.denoise_kit import make_engine, png, sample_image


@pytest.fixture(scope="module")
def store(single_store):
    return single_store


@pytest.fixture(scope="module")
def codec(store):
    return VaeCodec(store, make_engine(store).cache)


@pytest.fixture(scope="module")
def vae(models):
    return AutoencoderKL.from_pretrained(models["sd1"], subfolder="vae").eval()


def latents(store, batch: int) -> pb.LatentHandle:
    tensor = torch.randn(batch, 4, 32, 32, generator=torch.Generator().manual_seed(5))
    return pb.LatentHandle(blob=store.put_tensor(tensor), space="sd1", scaling=pb.LATENT_SCALING_MODEL,
                           noise=pb.NoiseLevel(fraction=1.0))  # fmt: skip


def expected_pixels(vae, store, handle) -> torch.Tensor:
    with torch.no_grad():
        return vae.decode(store.get_tensor(handle.blob) / vae.config.scaling_factor, return_dict=False)[0]


def test_a_batch_decodes_to_one_image_per_latent(models, codec, store, vae):
    handle = latents(store, 3)
    reply = codec.decode(dpb.DecodeRequest(model=models["sd1"], latents=handle, output_key="job/decode"))
    assert len(reply.images) == 3
    assert [h.key for h in reply.images] == [f"baton:blob:{{job/decode/{i}}}" for i in range(3)]
    pixels = expected_pixels(vae, store, handle)
    for i, blob in enumerate(reply.images):
        ours = np.asarray(Image.open(io.BytesIO(bytes(store.get_bytes(blob)))))
        theirs = ((pixels[i] / 2 + 0.5).clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        assert np.array_equal(ours, theirs), f"image {i}"


def test_the_tensor_format_keeps_the_vae_output_unrounded(models, codec, store, vae):
    handle = latents(store, 2)
    reply = codec.decode(dpb.DecodeRequest(model=models["sd1"], latents=handle, format="tensor"))
    assert len(reply.images) == 1 and reply.images[0].media_type == "application/x-baton-tensor"
    assert torch.equal(store.get_tensor(reply.images[0]), expected_pixels(vae, store, handle).clamp(-1, 1))


def test_a_pixel_tensor_encodes_like_the_vae_and_a_batch_like_its_parts(models, codec, store, vae):
    pixels = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(2)) * 2 - 1
    whole = codec.encode(dpb.EncodeRequest(model=models["sd1"], images=[store.put_tensor(pixels)]))
    with torch.no_grad():
        theirs = vae.encode(pixels).latent_dist.mode() * vae.config.scaling_factor
    assert torch.equal(store.get_tensor(whole.blob), theirs)
    assert (whole.width, whole.height, whole.space) == (64, 64, "sd1")
    parts = [store.put_tensor(pixels[i : i + 1]) for i in range(2)]
    batch = codec.encode(dpb.EncodeRequest(model=models["sd1"], images=parts))
    assert torch.equal(store.get_tensor(batch.blob), theirs)


def test_a_batch_of_image_files_encodes_in_order(models, codec, store):
    images = [store.put_bytes(png(sample_image(seed=s)), media_type="image/png") for s in (1, 2)]
    batch = store.get_tensor(codec.encode(dpb.EncodeRequest(model=models["sd1"], images=images)).blob)
    second = store.get_tensor(codec.encode(dpb.EncodeRequest(model=models["sd1"], images=[images[1]])).blob)
    assert batch.shape[0] == 2
    # A batch of 2 and a batch of 1 take different conv kernels: equal to float32 rounding.
    torch.testing.assert_close(batch[1:], second, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize(
    "make,field,message",
    [
        (lambda s: {"images": [s.put_tensor(torch.zeros(1, 3, 64, 64)), s.put_tensor(torch.zeros(1, 3, 32, 32))]},
         "images", "one size"),
        (lambda s: {"images": [s.put_tensor(torch.zeros(1, 4, 64, 64))]}, "images[0]", "[B, 3, H, W]"),
        (lambda s: {"images": [s.put_bytes(b"not a png", media_type="image/png")]}, "images[0]", "not a readable"),
        (lambda s: {"images": [s.put_tensor(torch.zeros(1, 3, 64, 64))], "width": 32}, "images[0]", "not resized"),
        (lambda s: {}, "images", "required"),
    ],
)  # fmt: skip
def test_bad_encode_input_names_its_field(models, codec, store, make, field, message):
    with pytest.raises(InvalidArgument, match=message.replace("[", r"\[")) as info:
        codec.encode(dpb.EncodeRequest(model=models["sd1"], **make(store)))
    assert info.value.field == field


def test_an_unknown_decode_format_lists_the_accepted_ones(models, codec, store):
    with pytest.raises(InvalidArgument, match="png, jpeg, webp, tensor") as info:
        codec.decode(dpb.DecodeRequest(model=models["sd1"], latents=latents(store, 1), format="gif"))
    assert info.value.field == "format"
