"""The denoise engine against diffusers' own pipelines on tiny models (in process, real Redis).

Tolerance: bit-exact (torch.equal). Both sides run in this process with the same torch thread
count, which is what makes bits comparable (see reference/tiny_models.md).
"""

from __future__ import annotations

import pytest
import torch
from diffusers import (
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLInpaintPipeline,
    StableDiffusionXLPipeline,
)

from services.common.api.baton.v1 import handles_pb2 as pb
from services.common.errors import InvalidArgument
from services.denoiser.schedulers import make_scheduler
from tests.denoise_kit import (
    diffusers_latents,
    make_engine,
    png,
    request,
    sample_image,
    sample_mask,
)

STEPS = 10


@pytest.fixture(scope="module")
def store(single_store):
    return single_store


@pytest.fixture(scope="module")
def engine(store):
    return make_engine(store)


def pipeline(cls, path, scheduler: str | None = None):
    pipe = cls.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    if scheduler:
        pipe.scheduler = make_scheduler(scheduler, dict(pipe.scheduler.config))
    return pipe


def run(engine, store, model, **fields) -> tuple[torch.Tensor, pb.LatentHandle]:
    handle = engine.denoise(request(model, steps=STEPS, **fields))
    return store.get_tensor(handle.blob), handle


def chain(engine, store, model, cuts, **fields) -> torch.Tensor:
    """Runs one model's schedule as consecutive windows split at `cuts`, handing latents on."""
    handle = None
    for end in [*cuts, 1.0]:
        window = {"denoising_end": end} if end < 1 else {}
        if handle is not None:
            window["latents"] = handle
        handle = engine.denoise(request(model, steps=STEPS, **window, **fields))
    return store.get_tensor(handle.blob)


@pytest.mark.parametrize(
    "family,cls,guidance", [("sd1", StableDiffusionPipeline, 7.5), ("sdxl", StableDiffusionXLPipeline, 5.0)]
)
def test_full_run_equals_the_text_to_image_pipeline(models, engine, store, family, cls, guidance):
    ours, handle = run(engine, store, models[family], guidance_scale=guidance, width=64, height=64)
    pipe = pipeline(cls, models[family])
    theirs = diffusers_latents(pipe, STEPS, guidance_scale=guidance, width=64, height=64)
    assert torch.equal(ours, theirs)
    assert handle.noise.fraction == 1.0 and handle.space == family and handle.seed == 42
    assert (handle.width, handle.height) == (64, 64)


@pytest.mark.parametrize("family,cls", [("sd1", StableDiffusionPipeline), ("sdxl", StableDiffusionXLPipeline)])
def test_a_batch_equals_the_pipeline_with_num_images_per_prompt_and_splits_exactly(models, engine, store, family, cls):
    ours, _ = run(engine, store, models[family], num_images=2, width=64, height=64)
    pipe = pipeline(cls, models[family])
    theirs = diffusers_latents(pipe, STEPS, width=64, height=64, num_images_per_prompt=2)
    assert ours.shape[0] == 2 and not torch.equal(ours[0], ours[1])
    assert torch.equal(ours, theirs)
    assert torch.equal(chain(engine, store, models[family], [0.6], num_images=2, width=64, height=64), ours)


def test_continued_latents_keep_their_batch_size(models, engine, store):
    first = engine.denoise(request(models["sd1"], steps=STEPS, num_images=2, denoising_end=0.5))
    with pytest.raises(InvalidArgument, match="batch of 2") as info:
        engine.denoise(request(models["sd1"], steps=STEPS, num_images=3, latents=first))
    assert info.value.field == "num_images"


@pytest.mark.parametrize(
    "scheduler",
    ["EulerDiscreteScheduler", "DDIMScheduler", "DPMSolverMultistepScheduler", "UniPCMultistepScheduler"],
)
def test_split_at_0_6_equals_the_unsplit_run(models, engine, store, scheduler):
    whole, _ = run(engine, store, models["sd1"], scheduler=scheduler)
    assert torch.equal(chain(engine, store, models["sd1"], [0.6], scheduler=scheduler), whole)


@pytest.mark.parametrize(
    "scheduler", ["EulerDiscreteScheduler", "DPMSolverMultistepScheduler", "UniPCMultistepScheduler"]
)
def test_three_way_split_equals_the_unsplit_run(models, engine, store, scheduler):
    whole, _ = run(engine, store, models["sdxl"], scheduler=scheduler)
    assert torch.equal(chain(engine, store, models["sdxl"], [0.3, 0.7], scheduler=scheduler), whole)


def test_partial_latents_record_where_they_stand(models, engine, store):
    _, handle = run(engine, store, models["sd1"], denoising_end=0.6, scheduler="DPMSolverMultistepScheduler")
    assert handle.noise.fraction == pytest.approx(0.6)
    assert handle.noise.cutoff_timestep == 400
    assert 0 < handle.noise.timestep < 400 and handle.noise.sigma > 0
    assert handle.scheduler.class_name == "DPMSolverMultistepScheduler" and handle.scheduler.steps == STEPS
    assert handle.scheduler.state.key, "a multistep scheduler's state travels with the latents"


@pytest.mark.parametrize("f", [0.5, 0.8])
def test_sdxl_base_then_second_model_equals_diffusers_pair(models, engine, store, f):
    first = engine.denoise(request(models["sdxl"], steps=STEPS, denoising_end=f, width=64, height=64))
    second = engine.denoise(request(models["sdxl_b"], steps=STEPS, latents=first, denoising_start=f))
    ours = store.get_tensor(second.blob)

    base = pipeline(StableDiffusionXLPipeline, models["sdxl"])
    refiner = pipeline(StableDiffusionXLImg2ImgPipeline, models["sdxl_b"])
    handoff = diffusers_latents(base, STEPS, denoising_end=f, width=64, height=64)
    theirs = diffusers_latents(refiner, STEPS, image=handoff, denoising_start=f)
    assert torch.equal(store.get_tensor(first.blob), handoff)
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize(
    "family,cls,strength",
    [("sd1", StableDiffusionImg2ImgPipeline, 0.7), ("sdxl", StableDiffusionXLImg2ImgPipeline, 0.6)],
)
def test_img2img_equals_img2img_pipeline(models, engine, store, family, cls, strength):
    image = sample_image()
    blob = store.put_bytes(png(image), media_type="image/png")
    ours, handle = run(engine, store, models[family], image=blob, strength=strength)
    pipe = pipeline(cls, models[family])
    theirs = diffusers_latents(pipe, STEPS, image=image, strength=strength)
    assert torch.equal(ours, theirs)
    assert handle.noise.fraction == 1.0


@pytest.mark.parametrize(
    "family,cls,strength",
    [
        ("sd1", StableDiffusionInpaintPipeline, 1.0),
        ("sd1", StableDiffusionInpaintPipeline, 0.75),
        ("sdxl", StableDiffusionXLInpaintPipeline, 0.9),
    ],
)
def test_inpainting_equals_inpaint_pipeline(models, engine, store, family, cls, strength):
    image, mask = sample_image(), sample_mask()
    image_blob = store.put_bytes(png(image), media_type="image/png")
    mask_blob = store.put_bytes(png(mask), media_type="image/png")
    ours, _ = run(engine, store, models[family], image=image_blob, mask=mask_blob, strength=strength)
    pipe = pipeline(cls, models[family])
    theirs = diffusers_latents(pipe, STEPS, image=image, mask_image=mask, strength=strength, width=64, height=64)
    assert torch.equal(ours, theirs)


def test_img2img_from_finished_latents_decodes_with_the_receiving_vae(models, engine, store):
    finished = engine.denoise(request(models["sd1"], steps=STEPS, seed=5))
    ours = store.get_tensor(engine.denoise(request(models["sd1"], steps=STEPS, latents=finished, strength=0.5)).blob)
    pipe = pipeline(StableDiffusionImg2ImgPipeline, models["sd1"])
    with torch.no_grad():
        latents = store.get_tensor(finished.blob)
        decoded = pipe.vae.decode(latents / pipe.vae.config.scaling_factor, return_dict=False)[0]
    theirs = diffusers_latents(pipe, STEPS, image=decoded, strength=0.5)
    assert torch.equal(ours, theirs)
