"""The planner and the denoiser run one set of rules: each bad input is refused by both, with the
same field (the planner's under `denoise.`), and the same code."""

from __future__ import annotations

import dataclasses

import pytest
from google.protobuf import json_format

from services.common.api.baton.v1 import denoiser_pb2 as dpb
from services.common.api.baton.v1 import jobs_pb2 as jpb
from services.common.errors import BatonError
from services.common.limits import DEFAULT
from services.denoiser.cache import ModelCache
from services.denoiser.engine import DenoiseEngine
from services.denoiser.models import LoadOptions, inspect_model, load_model
from services.denoiser.servicer import model_info
from services.gateway.planner import Planner
from tests.denoise_kit import png, sample_image

# Small enough that the size and batch limits are reached with a tiny model.
LIMITS = dataclasses.replace(DEFAULT, max_pixels=96 * 96, max_latent_elements=4 * 4 * 32 * 32, max_prompt_chars=40)

# (case, DenoiseStage/DenoiseRequest fields, field both must name)
CASES = [
    ("no steps", {"steps": 0}, "steps"),
    ("too many steps", {"steps": 1001}, "steps"),
    ("end past 1", {"denoising_end": 1.5}, "denoising_end"),
    ("NaN end", {"denoising_end": "NaN"}, "denoising_end"),
    ("start after end", {"denoising_start": 0.7, "denoising_end": 0.6}, "denoising_start"),
    ("start without latents", {"denoising_start": 0.5}, "latents"),
    ("zero strength", {"strength": 0.0}, "strength"),
    ("huge guidance", {"guidance_scale": 1e308}, "guidance_scale"),
    ("NaN guidance", {"guidance_scale": "NaN"}, "guidance_scale"),
    ("guidance rescale past 1", {"guidance_rescale": 2.0}, "guidance_rescale"),
    ("long prompt", {"prompt": "x" * 41}, "prompt"),
    ("long negative prompt", {"negative_prompt": "x" * 41}, "negative_prompt"),
    ("long T5 sequence", {"max_sequence_length": 513}, "max_sequence_length"),
    ("negative preview_every", {"preview_every": -1}, "preview_every"),
    ("too many images", {"num_images": 65}, "num_images"),
    ("negative num_images", {"num_images": -1}, "num_images"),
    ("seeds with seed", {"seeds": [1, 2], "seed": 3}, "seeds"),
    ("seeds with another num_images", {"seeds": [1, 2], "num_images": 3}, "seeds"),
    ("too many seeds", {"seeds": list(range(65))}, "seeds"),
    ("width not a multiple", {"width": 65, "height": 64}, "width"),
    ("height not a multiple", {"width": 64, "height": 65}, "height"),
    ("past max pixels", {"width": 128, "height": 128}, "width"),
    ("past max latent elements", {"width": 64, "height": 64, "num_images": 5}, "num_images"),
    ("unknown scheduler", {"scheduler": "euler"}, "scheduler"),
    (
        "misspelt scheduler option",
        {"scheduler_config": {"use_karras_sigma": True}},
        "scheduler_config.use_karras_sigma",
    ),
    ("nested scheduler option", {"scheduler_config": {"beta_start": {"a": 1}}}, "scheduler_config.beta_start"),
    (
        "SDE DPM++ split",
        {
            "scheduler": "DPMSolverMultistepScheduler",
            "scheduler_config": {"algorithm_type": "sde-dpmsolver++"},
            "denoising_end": 0.5,
        },
        "scheduler",
    ),
    ("ancestral split", {"scheduler": "EulerAncestralDiscreteScheduler", "denoising_end": 0.5}, "scheduler"),
    ("mask without image", {"mask": "picture"}, "image"),
    ("img2img running no step", {"image": "picture", "strength": 0.2, "steps": 4}, "strength"),
]


@pytest.fixture(scope="module")
def engine(single_store):
    return DenoiseEngine(single_store, ModelCache(load_model, defaults=LoadOptions(), max_models=2), limits=LIMITS)


@pytest.fixture(scope="module")
def picture(single_store):
    return single_store.put_bytes(png(sample_image()), media_type="image/png")


def planner_refusal(model: str, fields: dict, picture) -> BatonError:
    info = model_info(inspect_model("m", model, LoadOptions()), "available")
    body = {"model": "m", "prompt": "a cat", "steps": 4, **fields}
    spec = json_format.ParseDict(
        {"name": "parity", "stages": [{"name": "s", "denoise": body}],
         "inputs": [{"name": "picture", "blob": json_format.MessageToDict(picture)}]},
        jpb.JobSpec(),
    )  # fmt: skip
    with pytest.raises(BatonError) as refused:
        Planner({"m": info}, {"denoiser", "processor"}, {}, LIMITS).plan(spec)
    return refused.value


def worker_refusal(engine: DenoiseEngine, model: str, fields: dict, picture) -> BatonError:
    body = {"model": model, "prompt": "a cat", "steps": 4, **({} if "seeds" in fields else {"seed": 1}), **fields}
    for image_field in ("image", "mask"):
        if body.get(image_field) == "picture":
            body[image_field] = json_format.MessageToDict(picture)
    request = json_format.ParseDict(body, dpb.DenoiseRequest())
    with pytest.raises(BatonError) as refused:
        engine.denoise(request)
    return refused.value


@pytest.mark.parametrize(("fields", "field"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_the_planner_and_the_denoiser_refuse_alike(engine, models, picture, fields, field):
    planner = planner_refusal(models["sd1"], fields, picture)
    worker = worker_refusal(engine, models["sd1"], fields, picture)
    assert (planner.code, planner.stage, planner.field) == ("INVALID_ARGUMENT", "s", f"denoise.{field}"), planner
    assert (worker.code, worker.field) == ("INVALID_ARGUMENT", field), worker
    assert planner.detail == worker.detail or field.startswith("scheduler") or field == "image"


def test_a_spec_within_the_rules_is_accepted_by_both(engine, models, picture):
    fields = {"width": 64, "height": 64, "num_images": 2, "steps": 2}
    info = model_info(inspect_model("m", models["sd1"], LoadOptions()), "available")
    spec = json_format.ParseDict({"name": "ok", "stages": [{"name": "s", "denoise": {"model": "m", **fields}}]},
                                 jpb.JobSpec())  # fmt: skip
    plan = Planner({"m": info}, {"denoiser"}, {}, LIMITS).plan(spec)
    request = plan.stages["s"].request
    assert request.width == 64 and request.num_images == 2 and request.scheduler == info.default_scheduler
    request.model = models["sd1"]
    assert engine.denoise(request).blob.shape[0] == 2
