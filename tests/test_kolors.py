"""Kolors (ChatGLM text encoder, SDXL UNet, the sdxl space) against diffusers on a tiny model, in process.

Tolerance: bit-exact (torch.equal). Both sides run in this process with the same torch thread count.
The one exception is step-level batching, held to tests/test_batching.py's 1e-5 of the latents' magnitude
(a batched row can differ from its alone value in the last bits: see that file).
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from diffusers import (
    KolorsImg2ImgPipeline,
    KolorsPipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLInpaintPipeline,
    StableDiffusionXLPipeline,
)
from google.protobuf import json_format

from services.common.api.baton.v1 import jobs_pb2 as jpb
from services.common.errors import InvalidArgument
from services.denoiser.cache import ModelCache
from services.denoiser.engine import DenoiseEngine
from services.denoiser.models import LoadOptions, inspect_model, load_model
from services.denoiser.servicer import model_info
from services.devkit.tiny_models import build
from services.gateway.planner import Planner
from tests.denoise_kit import (
    NEGATIVE,
    PROMPT,
    diffusers_latents,
    generator,
    make_engine,
    png,
    request,
    sample_image,
    sample_mask,
)

STEPS = 6


@pytest.fixture(scope="module")
def kolors(tmp_path_factory) -> str:
    return str(build("kolors", tmp_path_factory.mktemp("kolors") / "kolors"))


@pytest.fixture(scope="module")
def store(single_store):
    return single_store


@pytest.fixture(scope="module")
def engine(store):
    return make_engine(store)


def pipeline(cls, path: str):
    pipe = cls.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run(engine, store, model: str, **fields) -> torch.Tensor:
    return store.get_tensor(engine.denoise(request(model, steps=STEPS, **fields)).blob)


def test_a_saved_kolors_pipeline_is_the_kolors_family_in_the_sdxl_space(kolors):
    card = inspect_model("k", kolors, LoadOptions())
    assert (card.family, card.space, card.scheduler_class) == ("kolors", "sdxl", "EulerDiscreteScheduler")
    assert card.default_size == (64, 64)


def test_full_run_equals_kolors_pipeline(kolors, engine, store):
    handle = engine.denoise(request(kolors, steps=STEPS, width=64, height=64))
    theirs = diffusers_latents(pipeline(KolorsPipeline, kolors), STEPS, width=64, height=64)
    assert torch.equal(store.get_tensor(handle.blob), theirs)
    assert handle.space == "sdxl" and handle.noise.fraction == 1.0


def test_split_at_0_5_equals_the_unsplit_run(kolors, engine, store):
    whole = run(engine, store, kolors)
    first = engine.denoise(request(kolors, steps=STEPS, denoising_end=0.5))
    # Kolors trains on 1100 timesteps: the cutoff is round(1100 - 0.5 * 1100), not SDXL's 500.
    assert first.noise.cutoff_timestep == 550
    assert torch.equal(run(engine, store, kolors, latents=first, denoising_start=0.5), whole)


def test_img2img_equals_kolors_img2img_pipeline(kolors, engine, store):
    image = sample_image()
    ours = run(engine, store, kolors, image=store.put_bytes(png(image), media_type="image/png"), strength=0.6)
    theirs = diffusers_latents(pipeline(KolorsImg2ImgPipeline, kolors), STEPS, image=image, strength=0.6)
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("strength", [1.0, 0.7])
def test_inpainting_equals_sdxl_inpaint_pipeline_on_kolors_prompt_embeddings(kolors, engine, store, strength):
    """Reference: diffusers has no Kolors inpainting pipeline; Kwai-Kolors' own is SDXL's with ChatGLM prompts.
    So the reference is diffusers' StableDiffusionXLInpaintPipeline over the Kolors components, fed the
    embeddings of KolorsPipeline.encode_prompt: every other step (latents, masks, time ids, loop) is diffusers'."""
    image, mask = sample_image(), sample_mask()
    ours = run(
        engine,
        store,
        kolors,
        image=store.put_bytes(png(image), media_type="image/png"),
        mask=store.put_bytes(png(mask), media_type="image/png"),
        strength=strength,
        guidance_scale=6.0,
    )
    base = pipeline(KolorsPipeline, kolors)
    inpaint = StableDiffusionXLInpaintPipeline.from_pipe(base, text_encoder_2=None, tokenizer_2=None)
    inpaint.set_progress_bar_config(disable=True)
    with torch.no_grad():
        embeds, negative, pooled, negative_pooled = base.encode_prompt(PROMPT, negative_prompt=NEGATIVE)
        theirs = inpaint(
            prompt_embeds=embeds,
            negative_prompt_embeds=negative,
            pooled_prompt_embeds=pooled,
            negative_pooled_prompt_embeds=negative_pooled,
            image=image,
            mask_image=mask,
            strength=strength,
            guidance_scale=6.0,
            num_inference_steps=STEPS,
            generator=generator(),
            width=64,
            height=64,
            output_type="latent",
        ).images
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize(
    "base,second",
    [
        ("kolors", "sdxl"),
        ("sdxl", "kolors"),
    ],
)
def test_a_handoff_between_kolors_and_sdxl_equals_the_diffusers_pair(kolors, models, engine, store, base, second):
    """The sdxl space is shared: partly denoised latents go straight from one family's model to the other's,
    as diffusers' text-to-image pipeline (denoising_end) then the other's img2img pipeline (denoising_start)
    hand them on."""
    paths = {"kolors": kolors, "sdxl": models["sdxl"]}
    txt2img = {"kolors": KolorsPipeline, "sdxl": StableDiffusionXLPipeline}
    img2img = {"kolors": KolorsImg2ImgPipeline, "sdxl": StableDiffusionXLImg2ImgPipeline}
    first = engine.denoise(request(paths[base], steps=STEPS, denoising_end=0.5, width=64, height=64))
    last = engine.denoise(request(paths[second], steps=STEPS, latents=first, denoising_start=0.5))
    handoff = diffusers_latents(pipeline(txt2img[base], paths[base]), STEPS, denoising_end=0.5, width=64, height=64)
    theirs = diffusers_latents(pipeline(img2img[second], paths[second]), STEPS, image=handoff, denoising_start=0.5)
    assert torch.equal(store.get_tensor(first.blob), handoff)
    assert torch.equal(store.get_tensor(last.blob), theirs)


def test_kolors_windows_batched_together_equal_each_run_alone(kolors, store):
    # The fill wait lets the two windows share from their first step.
    engine = DenoiseEngine(store, ModelCache(load_model, defaults=LoadOptions(), max_models=1), batch_wait_s=0.5)
    reqs = [
        request(kolors, steps=STEPS, seed=1, prompt="a red fox"),
        request(kolors, steps=STEPS, seed=2, prompt="a lighthouse at dusk", guidance_scale=4.0, num_images=2),
    ]
    alone = [store.get_tensor(engine.denoise(r).blob) for r in reqs]
    batcher = engine.batcher(engine.cache.load(kolors))
    start = threading.Barrier(len(reqs))

    def together(req):
        start.wait()
        return store.get_tensor(engine.denoise(req).blob)

    with ThreadPoolExecutor(len(reqs)) as pool:
        batched = list(pool.map(together, reqs))
    assert batcher.calls > batcher.forwards, "no forward served both windows"
    for a, b in zip(alone, batched, strict=True):
        assert (a - b).abs().max().item() <= 1e-5 * a.abs().max().item()


def test_a_prompt_window_past_256_tokens_is_refused(kolors, engine):
    with pytest.raises(InvalidArgument, match="at most 256") as refused:
        engine.denoise(request(kolors, steps=1, max_sequence_length=300))
    assert refused.value.field == "max_sequence_length"


def _handoff_spec(second: str) -> jpb.JobSpec:
    return json_format.ParseDict(
        {
            "name": "kolors-to-xl",
            "seed": 1,
            "stages": [
                {"name": "draft", "denoise": {"model": "kolors", "prompt": "a cat", "steps": 4, "denoising_end": 0.5}},
                {
                    "name": "finish",
                    "denoise": {"model": second, "latents": "draft", "steps": 4, "denoising_start": 0.5},
                },
            ],
        },
        jpb.JobSpec(),
    )


@pytest.fixture(scope="module")
def catalog(kolors, models) -> dict:
    return {
        name: model_info(inspect_model(name, path, LoadOptions()), "available")
        for name, path in {"kolors": kolors, "sdxl": models["sdxl"], "sd1": models["sd1"]}.items()
    }


def test_kolors_base_to_sdxl_plans_with_no_interpose_stage(catalog):
    plan = Planner(catalog, {"denoiser"}).plan(_handoff_spec("sdxl"))
    assert [plan.stages[name].kind for name in plan.order] == ["denoise", "denoise"]
    assert plan.stages["draft"].product.space == "sdxl"


def test_kolors_base_to_sd1_still_needs_an_interpose_stage(catalog):
    with pytest.raises(InvalidArgument, match="'sdxl' latent space but sd1 works in 'sd1'") as refused:
        Planner(catalog, {"denoiser"}).plan(_handoff_spec("sd1"))
    assert (refused.value.stage, refused.value.field) == ("finish", "denoise.latents")
