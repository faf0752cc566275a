"""Seeds over a batch (`seeds`, dgenerate's --seeds): image i of the batch is the image a job with
`seed: seeds[i]` and one image gives, bit for bit, in every mode that draws noise; continued
latents keep their seeds; `seeds` with `seed`, or with another num_images, is refused the same
way by the gateway's planner and the denoiser."""

from __future__ import annotations

import pytest
import torch
from diffusers import FluxPipeline
from google.protobuf import json_format

from services.common.api.baton.v1 import denoiser_pb2 as dpb
from services.common.api.baton.v1 import handles_pb2 as pb
from services.common.api.baton.v1 import jobs_pb2 as jpb
from services.common.errors import InvalidArgument
from services.common.job_files import read_latents_file, write_output
from services.denoiser.models import LoadOptions, inspect_model
from services.denoiser.servicer import model_info
from services.gateway.planner import Planner
from tests.denoise_kit import NEGATIVE, PROMPT, make_engine, png, sample_image
from tests.test_batching import RELATIVE

STEPS = 4
SEEDS = [7, 1234]


@pytest.fixture(scope="module")
def engine(single_store):
    return make_engine(single_store)


def window(model: str, **fields) -> dpb.DenoiseRequest:
    fields.setdefault("width", 64)
    fields.setdefault("height", 64)
    return dpb.DenoiseRequest(model=model, prompt=PROMPT, negative_prompt=NEGATIVE, steps=STEPS, **fields)


def latents(engine, req: dpb.DenoiseRequest) -> torch.Tensor:
    return engine.store.get_tensor(engine.denoise(req).blob)


def one_by_one(engine, model: str, **fields) -> torch.Tensor:
    """The batch as separate one-image jobs, one per seed."""
    return torch.cat([latents(engine, window(model, seed=seed, **fields)) for seed in SEEDS])


def assert_each_image_equal(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    assert ours.shape == theirs.shape and ours.shape[0] == len(SEEDS)
    assert not torch.equal(ours[0], ours[1])
    for i in range(len(SEEDS)):
        assert torch.equal(ours[i], theirs[i]), f"image {i}: max diff {(ours[i] - theirs[i]).abs().max():.3g}"


def test_sd1_batch_from_seed_list_equals_separate_seeded_jobs(engine, models):
    handle = engine.denoise(window(models["sd1"], seeds=SEEDS))
    assert_each_image_equal(engine.store.get_tensor(handle.blob), one_by_one(engine, models["sd1"]))
    assert list(handle.seeds) == SEEDS and handle.seed == SEEDS[0]


def test_flux_batch_from_seed_list_equals_diffusers_with_a_generator_per_image(engine, flow_models):
    """Bit-exact against FluxPipeline given one generator per image; against separate jobs within
    test_batching's RELATIVE, since a transformer row's last bits depend on its batchmates on CPU
    (measured: 7.2e-7 on latents of magnitude ~4)."""
    path, side = flow_models["flux"], 128
    ours = latents(engine, window(path, seeds=SEEDS, width=side, height=side))
    pipe = FluxPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    gens = [torch.Generator("cpu").manual_seed(seed) for seed in SEEDS]
    packed = pipe(PROMPT, num_inference_steps=STEPS, generator=gens, output_type="latent", width=side,
                  height=side, num_images_per_prompt=len(SEEDS)).images  # fmt: skip
    assert torch.equal(ours, pipe._unpack_latents(packed, side, side, pipe.vae_scale_factor))
    alone = one_by_one(engine, path, width=side, height=side)
    assert (ours - alone).abs().max() <= RELATIVE * alone.abs().max()


def test_sd1_img2img_from_seed_list_equals_separate_seeded_jobs(engine, models):
    image = engine.store.put_bytes(png(sample_image()), media_type="image/png")
    ours = latents(engine, window(models["sd1"], seeds=SEEDS, image=image, strength=0.75))
    assert_each_image_equal(ours, one_by_one(engine, models["sd1"], image=image, strength=0.75))


def test_flux_img2img_from_seed_list_is_each_seeds_image(engine, flow_models):
    """Each image encoded with its own generator (the flow pipelines need the image once per
    generator); within RELATIVE, as above."""
    path, size = flow_models["flux"], {"width": 128, "height": 128, "strength": 0.75}
    image = engine.store.put_bytes(png(sample_image(128, 128)), media_type="image/png")
    ours = latents(engine, window(path, seeds=SEEDS, image=image, **size))
    alone = one_by_one(engine, path, image=image, **size)
    assert not torch.equal(ours[0], ours[1])
    assert (ours - alone).abs().max() <= RELATIVE * alone.abs().max()


def test_split_keeps_the_seeds_and_equals_the_unsplit_run(engine, models):
    whole = latents(engine, window(models["sd1"], seeds=SEEDS))
    first = engine.denoise(window(models["sd1"], seeds=SEEDS, denoising_end=0.5))
    assert list(first.seeds) == SEEDS
    second = engine.denoise(window(models["sd1"], latents=first, width=0, height=0))
    assert list(second.seeds) == SEEDS
    assert torch.equal(engine.store.get_tensor(second.blob), whole)


@pytest.mark.parametrize(
    ("fields", "message"),
    [({"seed": 3}, "not both"), ({"num_images": 3}, "num_images is 3")],
    ids=["with-seed", "other-num-images"],
)
def test_engine_refuses_ambiguous_seeds(engine, models, fields, message):
    with pytest.raises(InvalidArgument, match=message) as refused:
        engine.denoise(window(models["sd1"], seeds=SEEDS, **fields))
    assert refused.value.field == "seeds"


def test_engine_refuses_seeds_that_do_not_fit_continued_latents(engine, models):
    first = engine.denoise(window(models["sd1"], seeds=SEEDS, denoising_end=0.5))
    with pytest.raises(InvalidArgument, match="batch of 2") as refused:
        engine.denoise(window(models["sd1"], latents=first, seeds=[1, 2, 3], width=0, height=0))
    assert refused.value.field == "seeds"


@pytest.fixture(scope="module")
def planner(models) -> Planner:
    catalog = {"sd1": model_info(inspect_model("sd1", models["sd1"], LoadOptions()), "available")}
    return Planner(catalog, {"denoiser"})


def job(stage: dict, finish: dict | None = None, **top) -> jpb.JobSpec:
    stages = [{"name": "draw", "denoise": {"model": "sd1", "prompt": "a cat", "steps": 4, **stage}}]
    if finish is not None:
        stages.append({"name": "finish", "denoise": {"model": "sd1", "steps": 4, "latents": "draw", **finish}})
    return json_format.ParseDict({"name": "seeds", **top, "stages": stages}, jpb.JobSpec())


def test_planner_hands_the_seed_list_to_the_worker(planner):
    request = planner.plan(job({"seeds": SEEDS}, seed=9)).stages["draw"].request
    assert list(request.seeds) == SEEDS and not request.HasField("seed") and request.num_images == 2


def test_planner_gives_the_jobs_seeds_to_stages_without_their_own(planner):
    plan = planner.plan(job({"denoising_end": 0.5}, {}, seeds=SEEDS))
    assert [list(plan.stages[s].request.seeds) for s in ("draw", "finish")] == [SEEDS, SEEDS]


@pytest.mark.parametrize("own", [{"seeds": SEEDS}, {"seed": 5}], ids=["seeds", "seed"])
def test_a_continuation_without_its_own_seed_keeps_the_seeds_of_the_stage_it_continues(planner, own):
    """The job's seed does not replace them: the denoiser takes the continued images' seeds from their handle."""
    plan = planner.plan(job({"denoising_end": 0.5, **own}, {}, seed=9))
    finish = plan.stages["finish"].request
    assert not finish.HasField("seed") and not finish.seeds
    told = planner.plan(job({"denoising_end": 0.5, **own}, {"seed": 9}))  # a seed of its own still wins
    assert told.stages["finish"].request.seed == 9


def test_latents_files_record_each_image_s_seed(tmp_path):
    handle = pb.LatentHandle(space="sd1", seed=SEEDS[0], seeds=SEEDS, noise=pb.NoiseLevel(fraction=1.0))
    path = write_output(tmp_path / "l.safetensors", latents=torch.zeros(2, 4, 8, 8), handle=handle)
    assert list(read_latents_file(path)[1].seeds) == SEEDS


@pytest.mark.parametrize(
    ("spec", "stage", "fld"),
    [
        (job({"seeds": SEEDS, "seed": 3}), "draw", "denoise.seeds"),
        (job({"seeds": SEEDS, "num_images": 3}), "draw", "denoise.seeds"),
        (job({"num_images": 3, "denoising_end": 0.5}, {"seeds": SEEDS}), "finish", "denoise.seeds"),
        (job({}, seeds=SEEDS, seed=3), "", "seeds"),
    ],
    ids=["with-seed", "other-num-images", "other-incoming-batch", "job-with-seed"],
)
def test_planner_refuses_ambiguous_seeds(planner, spec, stage, fld):
    with pytest.raises(InvalidArgument) as refused:
        planner.plan(spec)
    assert (refused.value.stage, refused.value.field) == (stage, fld)
