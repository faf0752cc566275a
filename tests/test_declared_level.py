"""Latents another tool wrote part way through its schedule (diffusers' output_type="latent" with
denoising_end, dgenerate's latents files), continued in Baton with a declared noise level.

Tolerances: bit-exact (torch.equal) in process; 1e-5 across processes (the cluster's denoiser
runs its own torch threads), as for every cross-process comparison with diffusers.
"""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
import torch
from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline
from google.protobuf import json_format
from safetensors.torch import save_file

from services.client import error_info
from services.common.api.baton.v1 import handles_pb2 as pb
from services.common.api.baton.v1 import jobs_pb2 as jpb
from services.common.errors import InvalidArgument
from services.common.job_files import read_latents_file, read_latents_with_state
from services.common.rules.declared import apply_declarations, apply_declared, declared_level
from services.denoiser.window import DenoiseWindow
from tests.denoise_kit import diffusers_latents, make_engine, request
from tests.test_latents_interchange import job, run_all, submit

STEPS = 10


def declared(**fields) -> jpb.DeclaredLevel:
    return json_format.ParseDict({"space": "sdxl", **fields}, jpb.DeclaredLevel())


# -- the rule, no models -----------------------------------------------------------------------


def test_denoising_end_is_the_fraction_on_diffusers_cutoff_rule():
    level = declared_level(declared(denoising_end=0.8))
    assert (level.fraction, level.cutoff_timestep, level.num_train_timesteps) == (0.8, 200, 1000)


@pytest.mark.parametrize("steps", [7, 10, 25])
@pytest.mark.parametrize("scheduler", ["leading", "trailing", "linspace"])
def test_a_declared_timestep_continues_at_exactly_that_timestep(steps: int, scheduler: str):
    """Whatever the spacing, declaring timesteps[i] makes the continuation run timesteps[i:]."""
    from diffusers import EulerDiscreteScheduler

    euler = EulerDiscreteScheduler(timestep_spacing=scheduler, steps_offset=1 if scheduler == "leading" else 0)
    euler.set_timesteps(steps)
    timesteps = euler.timesteps
    for i in range(1, steps):
        level = declared_level(declared(timestep=float(timesteps[i])))
        window = DenoiseWindow(start=level.fraction)
        assert window.indices(timesteps, 1000) == (i, steps), (scheduler, steps, i, level)


def test_a_sigma_is_a_flow_schedule_s_timestep_over_t():
    level = declared_level(declared(space="flux", sigma=0.75))
    assert (level.timestep, level.sigma, level.cutoff_timestep) == (750.0, 0.75, 751)
    with pytest.raises(InvalidArgument, match="depends on the producer's betas; declare its timestep") as refused:
        declared_level(declared(sigma=0.75))
    assert refused.value.field == "sigma"


@pytest.mark.parametrize(
    ("fields", "field", "words"),
    [
        ({}, "denoising_end", "say where the latents stand"),
        ({"denoising_end": 1.0}, "denoising_end", "not part way"),
        ({"denoising_end": 0.0}, "denoising_end", "not part way"),
        ({"timestep": 999.0}, "timestep", "not part way"),
        ({"timestep": -1.0}, "timestep", "not part way"),
        ({"space": "flux", "sigma": 1.0}, "sigma", "not part way"),
        ({"denoising_end": 0.5, "num_train_timesteps": -3}, "num_train_timesteps", "positive"),
    ],
)
def test_a_level_that_is_not_part_way_is_refused_naming_the_field(fields: dict, field: str, words: str):
    with pytest.raises(InvalidArgument, match=words) as refused:
        declared_level(declared(**fields))
    assert refused.value.field == field


def test_the_declaration_fills_the_handle_and_applying_it_twice_changes_nothing():
    handle = pb.LatentHandle(scaling=pb.LATENT_SCALING_MODEL, noise=pb.NoiseLevel(fraction=1.0))
    decl = declared(denoising_end=0.8, scheduler="DPMSolverMultistepScheduler", steps=30)
    apply_declared(handle, decl)
    once = handle.SerializeToString(deterministic=True)
    apply_declared(handle, decl)
    assert handle.SerializeToString(deterministic=True) == once
    assert (handle.space, handle.noise.fraction, handle.scheduler.class_name, handle.scheduler.steps) == (
        "sdxl", 0.8, "DPMSolverMultistepScheduler", 30
    )  # fmt: skip
    assert not handle.scheduler.state.key and handle.scaling == pb.LATENT_SCALING_MODEL
    raw = pb.LatentHandle(scaling=pb.LATENT_SCALING_RAW)  # a ComfyUI file keeps its raw scale
    apply_declared(raw, declared(denoising_end=0.5))
    assert raw.scaling == pb.LATENT_SCALING_RAW


@pytest.mark.parametrize(
    ("handle", "fields", "field", "words"),
    [
        (pb.LatentHandle(model="sdxl-base"), {"denoising_end": 0.5}, "space", "made by sdxl-base in Baton"),
        (pb.LatentHandle(), {"space": "sdxxl", "denoising_end": 0.5}, "space", "unknown latent space 'sdxxl'"),
        (pb.LatentHandle(space="sd1"), {"denoising_end": 0.5}, "space", "'sd1' space, not 'sdxl'"),
        (pb.LatentHandle(), {"denoising_end": 0.5, "scheduler": "dpm++ 2m"}, "scheduler", "DPMSolverMultistep"),
        (pb.LatentHandle(), {"denoising_end": 0.5, "steps": 30}, "scheduler", "name it too"),
    ],
)
def test_a_declaration_that_disagrees_or_names_nothing_known_is_refused(handle, fields, field, words):
    with pytest.raises(InvalidArgument, match=words) as refused:
        apply_declared(handle, declared(**fields))
    assert refused.value.field == field


def test_errors_name_the_input_and_an_image_takes_no_declaration():
    spec = jpb.JobSpec(inputs=[jpb.InputSpec(name="a", latents=pb.LatentHandle(), declared=declared())])
    with pytest.raises(InvalidArgument) as refused:
        apply_declarations(spec)
    assert refused.value.field == "inputs[0].declared.denoising_end"
    image = jpb.InputSpec(name="b", blob=pb.BlobHandle(key="k", media_type="image/png"), declared=declared())
    with pytest.raises(InvalidArgument, match="for latents inputs") as refused:
        apply_declarations(jpb.JobSpec(inputs=[image]))
    assert refused.value.field == "inputs[0].declared"


# -- diffusers' denoising_end latents, saved plainly, continued in Baton ---------------------------------


@pytest.fixture(scope="module")
def handoff(models, tmp_path_factory) -> tuple[Path, torch.Tensor]:
    """SDXL base with denoising_end=0.8 as diffusers runs it, saved as dgenerate saves latents (a plain
    `latents` tensor, no metadata), and diffusers' own continuation with denoising_start=0.8."""
    base = StableDiffusionXLPipeline.from_pretrained(models["sdxl"])
    second = StableDiffusionXLImg2ImgPipeline.from_pretrained(models["sdxl_b"])
    for pipe in (base, second):
        pipe.set_progress_bar_config(disable=True)
    latents = diffusers_latents(base, STEPS, denoising_end=0.8, width=64, height=64)
    theirs = diffusers_latents(second, STEPS, image=latents, denoising_start=0.8)
    path = tmp_path_factory.mktemp("foreign") / "base.safetensors"
    save_file({"latents": latents.contiguous()}, str(path))
    return path, theirs


def test_diffusers_denoising_end_latents_continue_in_process_bit_for_bit(models, single_store, handoff):
    path, theirs = handoff
    tensor, handle, state = read_latents_with_state(path)
    assert handle.noise.fraction == 1.0 and state is None  # undeclared, a bare file reads as finished
    apply_declared(handle, declared(denoising_end=0.8, scheduler="EulerDiscreteScheduler", steps=STEPS))
    handle.blob.CopyFrom(single_store.put_tensor(tensor.torch()))
    out = make_engine(single_store).denoise(request(models["sdxl_b"], steps=STEPS, latents=handle))
    assert torch.equal(single_store.get_tensor(out.blob), theirs)


def spec_for(path: Path, decl: dict, **stage) -> jpb.JobSpec:
    body = {"model": "sdxl-second", "prompt": "a red fox", "steps": STEPS, "latents": "base", **stage}
    inputs = [{"name": "base", "path": str(path), "declared": {"space": "sdxl", **decl}}]
    return job("declared", [{"name": "second", "denoise": body}], [{"stage": "second", "format": "safetensors"}],
               inputs)  # fmt: skip


def test_a_declared_file_continues_on_the_cluster_as_diffusers_denoising_start_does(checked_cluster, tmp_path: Path):
    """The demo cluster's sdxl-base/sdxl-second are their own tiny models: diffusers runs them here."""
    from tests.denoise_kit import generator

    paths = checked_cluster.models
    base = StableDiffusionXLPipeline.from_pretrained(paths["sdxl-base"])
    second = StableDiffusionXLImg2ImgPipeline.from_pretrained(paths["sdxl-second"])
    for pipe in (base, second):
        pipe.set_progress_bar_config(disable=True)
    common = {"negative_prompt": None, "num_inference_steps": STEPS, "output_type": "latent"}
    latents = base("a red fox", denoising_end=0.8, width=64, height=64, generator=generator(), **common).images
    theirs = second("a red fox", image=latents, denoising_start=0.8, generator=generator(), **common).images
    save_file({"latents": latents.contiguous()}, str(tmp_path / "base.safetensors"))

    spec = spec_for(tmp_path / "base.safetensors", {"denoising_end": 0.8, "scheduler": "EulerDiscreteScheduler",
                                                    "steps": STEPS})  # fmt: skip
    with checked_cluster.client() as client:
        done = run_all(client, {"declared": spec}, tmp_path, tmp_path)["declared"]
    ours, meta = read_latents_file(tmp_path / "declared" / "second.safetensors")
    assert done.spec.inputs[0].latents.noise.fraction == 0.8  # the job records the level it ran from
    assert meta.noise.fraction == 1.0 and meta.space == "sdxl"
    torch.testing.assert_close(ours.torch(), theirs, rtol=0, atol=1e-5)


def test_a_declared_multistep_producer_needs_the_solver_restart_and_a_bad_level_is_refused_at_submit(
    checked_cluster, tmp_path: Path
):
    save_file({"latents": torch.randn(1, 4, 8, 8)}, str(tmp_path / "base.safetensors"))
    dpm = {"denoising_end": 0.5, "scheduler": "DPMSolverMultistepScheduler", "steps": STEPS}
    stage = {"scheduler": "DPMSolverMultistepScheduler"}
    with checked_cluster.client() as client:
        with pytest.raises(grpc.RpcError) as info:
            submit(client, spec_for(tmp_path / "base.safetensors", dpm, **stage), tmp_path)
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert dict(error_info(info.value).metadata) == {"stage": "second", "field": "denoise.latents.scheduler.state"}

        with pytest.raises(grpc.RpcError) as info:
            submit(client, spec_for(tmp_path / "base.safetensors", {"denoising_end": 1.5}), tmp_path)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert dict(error_info(info.value).metadata) == {"field": "inputs[0].declared.denoising_end"}

        restarted = spec_for(tmp_path / "base.safetensors", dpm, restart_solver_history=True, **stage)
        done = run_all(client, {"restarted": restarted}, tmp_path, tmp_path)["restarted"]
    assert done.state == jpb.JOB_STATE_SUCCEEDED
