"""SD3 and Flux inpainting against diffusers' own inpaint pipelines (in process, real Redis, tiny models).

Tolerance: bit-exact (torch.equal), both sides in this process with the same thread count.

diffusers' SD3 and Flux inpaint pipelines have no denoising_start/denoising_end, so a split
inpaint has no diffusers equivalent: it is held to Baton's own unsplit run, which is held to the
pipeline.
"""

from __future__ import annotations

import functools

import pytest
import torch
from diffusers import FluxInpaintPipeline, SD3Transformer2DModel, StableDiffusion3InpaintPipeline

from services.common.api.baton.v1 import handles_pb2 as pb
from services.common.errors import Cancelled
from services.denoiser.cache import ModelCache
from services.denoiser.checkpoints import blob_name
from services.denoiser.engine import DenoiseEngine
from services.denoiser.models import LoadOptions, load_model
from tests.denoise_kit import NEGATIVE, PROMPT, generator, make_engine, png, request, sample_image, sample_mask

STEPS = 4
SIDE = 32
PIPELINES = {
    "sd3": StableDiffusion3InpaintPipeline,
    "sd3_33": StableDiffusion3InpaintPipeline,
    "flux": FluxInpaintPipeline,
}


@pytest.fixture(scope="module")
def engine(single_store):
    return make_engine(single_store)


@pytest.fixture(scope="module")
def paths(flow_models, tmp_path_factory) -> dict[str, str]:
    """The tiny SD3 and Flux models, and the SD3 one with a 33-channel transformer (latents, mask and
    masked image latents in), as SD3 inpainting models have."""
    base = StableDiffusion3InpaintPipeline.from_pretrained(flow_models["sd3"])
    config = {k: v for k, v in base.transformer.config.items() if not k.startswith("_")}
    torch.manual_seed(33)
    transformer = SD3Transformer2DModel(**{**config, "in_channels": 33, "out_channels": 16})
    folder = tmp_path_factory.mktemp("sd3-inpainting") / "model"
    StableDiffusion3InpaintPipeline(**{**base.components, "transformer": transformer}).save_pretrained(folder)
    return {"sd3": flow_models["sd3"], "sd3_33": str(folder), "flux": flow_models["flux"]}


@pytest.fixture(scope="module")
def inputs(single_store) -> dict[str, pb.BlobHandle]:
    return {
        "image": single_store.put_bytes(png(sample_image(SIDE, SIDE)), media_type="image/png"),
        "mask": single_store.put_bytes(png(sample_mask(SIDE, SIDE)), media_type="image/png"),
    }


@functools.cache
def pipeline(name: str, path: str):
    pipe = PIPELINES[name].from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def reference(name: str, path: str, **kw) -> torch.Tensor:
    """diffusers' own inpaint run, latents as Baton stores them ([B, 16, H, W])."""
    pipe = pipeline(name, path)
    if name != "flux":
        kw["negative_prompt"] = NEGATIVE  # Flux has no classifier-free guidance to take one
    out = pipe(PROMPT, image=sample_image(SIDE, SIDE), mask_image=sample_mask(SIDE, SIDE), num_inference_steps=STEPS,
               generator=generator(), output_type="latent", width=SIDE, height=SIDE, **kw).images  # fmt: skip
    return pipe._unpack_latents(out, SIDE, SIDE, pipe.vae_scale_factor) if name == "flux" else out


def inpaint(engine, store, path: str, inputs, **fields) -> tuple[torch.Tensor, pb.LatentHandle, int]:
    """Baton's inpaint window: the latents, their handle and how many steps it ran."""
    steps: list = []
    handle = engine.denoise(request(path, steps=STEPS, **inputs, **fields), on_step=steps.append)
    return store.get_tensor(handle.blob), handle, len(steps)


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_inpainting_with_the_defaults_equals_the_inpaint_pipeline_with_its_own(paths, engine, single_store, inputs,
                                                                                name):  # fmt: skip
    # Neither side names strength or guidance: the defaults table must hold the pipeline's (0.6, 7.0).
    ours, handle, ran = inpaint(engine, single_store, paths[name], inputs)
    assert ran == 3  # strength 0.6 of 4 steps, on the unrounded count
    assert torch.equal(ours, reference(name, paths[name]))
    assert handle.noise.fraction == 1.0


@pytest.mark.parametrize("name", ["sd3", "sd3_33", "flux"])
def test_inpainting_a_batch_at_full_strength_equals_the_inpaint_pipeline(paths, engine, single_store, inputs, name):
    ours, _, ran = inpaint(engine, single_store, paths[name], inputs, strength=1.0, guidance_scale=4.0, num_images=2)
    assert ran == STEPS and ours.shape[:2] == (2, 16)
    theirs = reference(name, paths[name], strength=1.0, guidance_scale=4.0, num_images_per_prompt=2)
    assert torch.equal(ours, theirs)


def test_the_33_channel_sd3_model_at_part_strength_equals_the_inpaint_pipeline(paths, engine, single_store, inputs):
    ours, _, _ = inpaint(engine, single_store, paths["sd3_33"], inputs, strength=0.7)
    assert torch.equal(ours, reference("sd3_33", paths["sd3_33"], strength=0.7))


@pytest.mark.parametrize("name", ["sd3", "sd3_33", "flux"])
def test_a_split_inpaint_equals_the_unsplit_run(paths, engine, single_store, inputs, name):
    whole, _, _ = inpaint(engine, single_store, paths[name], inputs, strength=0.7)
    first, handle, ran_first = inpaint(engine, single_store, paths[name], inputs, strength=0.7, denoising_end=0.3)
    assert 0 < handle.noise.fraction < 1 and not torch.equal(first, whole)
    # The continuation names the same image, mask and strength, and draws the same noise from the seed.
    split, _, ran_second = inpaint(engine, single_store, paths[name], inputs, strength=0.7, latents=handle)
    assert ran_first >= 1 and ran_second >= 1 and ran_first + ran_second == 3
    assert torch.equal(split, whole)


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_noise_given_to_an_inpaint_is_the_pipelines_latents_argument(paths, engine, single_store, inputs, name):
    # diffusers starts from given latents as they are and keeps the unmasked area on them as its noise.
    side = SIDE // pipeline(name, paths[name]).vae_scale_factor
    noise = torch.randn([1, 16, side, side], generator=generator(7))
    handle = pb.LatentHandle(blob=single_store.put_tensor(noise), space=name)  # noise level 0: initial noise
    ours, _, _ = inpaint(engine, single_store, paths[name], inputs, latents=handle)
    assert torch.equal(ours, reference(name, paths[name], latents=noise))


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_a_stopped_inpaint_resumes_at_its_checkpoint_with_the_same_bits(paths, single_store, inputs, name):
    engine = DenoiseEngine(
        single_store, ModelCache(load_model, defaults=LoadOptions(), max_models=2), checkpoint_every=1
    )
    req = request(paths[name], steps=STEPS, strength=1.0, output_key=f"ckpt/inpaint-{name}", **inputs)
    steps: list = []
    with pytest.raises(Cancelled):
        engine.denoise(req, on_step=steps.append, cancelled=lambda: len(steps) >= 2)
    engine.writer.settle(blob_name(req.output_key), drop=False)
    resumed: list[int] = []
    handle = engine.denoise(req, on_resume=resumed.append)
    assert resumed and 0 < resumed[0] < STEPS
    assert torch.equal(single_store.get_tensor(handle.blob), reference(name, paths[name], strength=1.0))
