"""SD3 and Flux windows against diffusers' own pipelines (in process, real Redis, tiny models).

Tolerance: bit-exact (torch.equal), both sides in this process with the same thread count.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import FluxImg2ImgPipeline, FluxPipeline, StableDiffusion3Img2ImgPipeline, StableDiffusion3Pipeline

from services.common.api.baton.v1 import denoiser_pb2 as dpb
from services.common.errors import FailedPrecondition
from tests.denoise_kit import NEGATIVE, PROMPT, generator, make_engine, png, request, sample_image

STEPS = 8


@pytest.fixture(scope="module")
def engine(single_store):
    return make_engine(single_store)


def pipeline(cls, path):
    pipe = cls.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def reference(family: str, path: str, side: int, **kw) -> torch.Tensor:
    """diffusers' own text-to-image run, latents as Baton stores them ([B, 16, H, W])."""
    if family == "sd3":
        pipe = pipeline(StableDiffusion3Pipeline, path)
        return pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=STEPS, generator=generator(),
                    output_type="latent", width=side, height=side, **kw).images  # fmt: skip
    pipe = pipeline(FluxPipeline, path)
    packed = pipe(PROMPT, num_inference_steps=STEPS, generator=generator(), output_type="latent", width=side,
                  height=side, **kw).images  # fmt: skip
    return pipe._unpack_latents(packed, side, side, pipe.vae_scale_factor)


def chain(engine, store, model: str, cuts: list[float], **fields) -> tuple[torch.Tensor, list]:
    handles, handle = [], None
    for end in [*cuts, 1.0]:
        window = {"denoising_end": end} if end < 1 else {}
        if handle is not None:
            window["latents"] = handle
        handle = engine.denoise(request(model, steps=STEPS, **window, **fields))
        handles.append(handle)
    return store.get_tensor(handle.blob), handles


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_full_run_equals_the_diffusers_pipeline(flow_models, engine, single_store, family):
    handle = engine.denoise(request(flow_models[family], steps=STEPS, width=64, height=64))
    ours = single_store.get_tensor(handle.blob)
    assert list(ours.shape) == [1, 16, 32, 32], "Flux latents are stored unpacked, [B, 16, H, W]"
    assert torch.equal(ours, reference(family, flow_models[family], 64))
    assert handle.space == family and handle.noise.fraction == 1.0


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_a_batch_equals_the_pipeline_with_num_images_per_prompt_and_splits_exactly(flow_models, engine, single_store,
                                                                                   family):  # fmt: skip
    handle = engine.denoise(request(flow_models[family], steps=STEPS, width=64, height=64, num_images=2))
    ours = single_store.get_tensor(handle.blob)
    assert list(ours.shape) == [2, 16, 32, 32] and not torch.equal(ours[0], ours[1])
    assert torch.equal(ours, reference(family, flow_models[family], 64, num_images_per_prompt=2))
    split, _ = chain(engine, single_store, flow_models[family], [0.6], width=64, height=64, num_images=2)
    assert torch.equal(split, ours)


@pytest.mark.parametrize(
    "family,side,cuts",
    [("sd3", 64, [0.6]), ("sd3", 64, [0.3, 0.7]), ("flux", 64, [0.6]), ("flux", 96, [0.6]), ("flux", 64, [0.3, 0.7])],
)
def test_split_equals_the_unsplit_run(flow_models, engine, single_store, family, side, cuts):
    whole = single_store.get_tensor(engine.denoise(request(flow_models[family], steps=STEPS, width=side,
                                                           height=side)).blob)  # fmt: skip
    split, handles = chain(engine, single_store, flow_models[family], cuts, width=side, height=side)
    assert torch.equal(split, whole)
    if family == "flux":  # the resolution-dependent shift is recorded and reused
        assert all(h.scheduler.HasField("mu") for h in handles)
        assert len({round(h.scheduler.mu, 12) for h in handles}) == 1


def test_sd3_split_keeps_its_shift_in_the_handle(flow_models, engine):
    handle = engine.denoise(request(flow_models["sd3"], steps=STEPS, denoising_end=0.6))
    assert '"shift": 3.0' in handle.scheduler.config_json
    assert 0 < handle.noise.sigma < 1 and handle.noise.fraction == pytest.approx(0.6)


def test_flux_at_two_resolutions_uses_two_shifts(flow_models, engine):
    small = engine.denoise(request(flow_models["flux"], steps=STEPS, width=64, height=64, denoising_end=0.5))
    large = engine.denoise(request(flow_models["flux"], steps=STEPS, width=128, height=128, denoising_end=0.5))
    assert small.scheduler.mu < large.scheduler.mu


def test_flux_to_a_second_flux_model_continues_on_the_producers_schedule(flow_models, engine, single_store):
    first = engine.denoise(request(flow_models["flux"], steps=STEPS, width=64, height=64, denoising_end=0.6))
    second = engine.denoise(request(flow_models["flux_b"], steps=STEPS, latents=first))
    assert second.scheduler.mu == first.scheduler.mu and second.noise.fraction == 1.0


def test_a_schedule_that_does_not_line_up_is_refused(flow_models, engine):
    from google.protobuf.struct_pb2 import Struct

    first = engine.denoise(request(flow_models["sd3"], steps=STEPS, denoising_end=0.6))
    other = Struct()
    other.update({"shift": 1.0})
    bad = dpb.DenoiseRequest()
    bad.CopyFrom(request(flow_models["sd3"], steps=STEPS, latents=first, scheduler_config=other))
    with pytest.raises(FailedPrecondition, match=r"shift=3\.0"):
        engine.denoise(bad)


@pytest.mark.parametrize("family,cls", [("sd3", StableDiffusion3Img2ImgPipeline), ("flux", FluxImg2ImgPipeline)])
def test_img2img_equals_the_img2img_pipeline(flow_models, engine, single_store, family, cls):
    image = sample_image()
    blob = single_store.put_bytes(png(image), media_type="image/png")
    ours = single_store.get_tensor(engine.denoise(request(flow_models[family], steps=STEPS, image=blob,
                                                          strength=0.65)).blob)  # fmt: skip
    pipe = pipeline(cls, flow_models[family])
    kw = {"negative_prompt": NEGATIVE} if family == "sd3" else {}
    theirs = pipe(PROMPT, image=image, strength=0.65, num_inference_steps=STEPS, generator=generator(),
                  output_type="latent", width=64, height=64, **kw).images  # fmt: skip
    if family == "flux":
        theirs = pipe._unpack_latents(theirs, 64, 64, pipe.vae_scale_factor)
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_encode_and_decode_use_the_vae_shift_and_scale(flow_models, engine, single_store, family):
    from services.common.api.baton.v1 import denoiser_pb2
    from services.denoiser.codec import VaeCodec

    codec = VaeCodec(single_store, engine.cache)
    image = single_store.put_bytes(png(sample_image()), media_type="image/png")
    latents = codec.encode(denoiser_pb2.EncodeRequest(model=flow_models[family], images=[image]))
    tensor = single_store.get_tensor(latents.blob)
    assert list(tensor.shape) == [1, 16, 32, 32] and latents.space == family
    with engine.cache.use(flow_models[family]) as model:
        vae = model.pipe.vae
        raw = vae.encode(model.pipe.image_processor.preprocess(sample_image())).latent_dist.mode()
    expected = (raw - vae.config.shift_factor) * vae.config.scaling_factor
    torch.testing.assert_close(tensor, expected, rtol=0, atol=1e-6)
    decoded = codec.decode(denoiser_pb2.DecodeRequest(model=flow_models[family], latents=latents))
    assert (decoded.width, decoded.height) == (64, 64)
