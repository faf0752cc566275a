"""What a live gateway refuses at Submit, before any GPU work: limits, rules and inputs, each
named by stage and field (and in google.rpc.BadRequest), and what a window that overflows says."""

from __future__ import annotations

import grpc
import pytest
import torch
from google.protobuf import json_format

from services.client import field_violations
from services.common.api.baton.v1 import handles_pb2 as pb
from services.common.api.baton.v1 import jobs_pb2 as jpb
from tests.gateway_kit import wait_for_job
from tests.test_uploads import png_bomb


@pytest.fixture(scope="module")
def client(checked_cluster):
    with checked_cluster.client() as c:
        yield c


def spec(*stages: dict, inputs: list | None = None, **top) -> jpb.JobSpec:
    return json_format.ParseDict({"name": "limits", **top, "inputs": inputs or [], "stages": list(stages)},
                                 jpb.JobSpec())  # fmt: skip


def den(name: str = "d", **fields) -> dict:
    return {"name": name, "denoise": {"model": "sd1-a", "prompt": "a cat", "steps": 2, **fields}}


def refused(client, job: jpb.JobSpec, stage: str, field: str, *needles: str) -> str:
    """Submit is refused INVALID_ARGUMENT naming `stage` and `field`, in the text and in BadRequest."""
    with pytest.raises(grpc.RpcError) as info:
        client.submit(job)
    error = info.value
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    details = error.details()
    assert f"field {field!r}" in details, details
    if stage:
        assert f"stage {stage!r}" in details, details
    violations = field_violations(error)
    assert [v.field for v in violations] == [f"stages[{stage}].{field}" if stage else field]
    for needle in needles:
        assert needle in details, details
    return details


def test_a_huge_batch_of_huge_images_is_refused_by_max_pixels(client):
    refused(client, spec(den(width=8192, height=8192, num_images=64)), "d", "denoise.width", "max-pixels")


def test_a_batch_past_max_latent_elements_is_refused_naming_num_images(client):
    refused(client, spec(den(width=2048, height=2048, num_images=64)), "d", "denoise.num_images",
            "max-latent-elements")  # fmt: skip


def test_steps_past_max_steps_are_refused(client):
    refused(client, spec(den(steps=100000)), "d", "denoise.steps", "1..1000")


@pytest.mark.parametrize("timeout", [-1, "NaN", 1e10, "Infinity"])
def test_a_timeout_that_is_not_a_positive_finite_bounded_number_is_refused(client, timeout):
    refused(client, spec(den(), timeout_s=timeout), "", "timeout_s", "86400")


@pytest.mark.parametrize("guidance", [1e308, "NaN", -1e6])
def test_guidance_past_max_guidance_or_not_finite_is_refused(client, guidance):
    refused(client, spec(den(guidance_scale=guidance)), "d", "denoise.guidance_scale")


def test_a_nan_processor_argument_is_refused(client):
    job = spec(den("a"), {"name": "p", "process": {"latents": "a", "processors": ["scale;factor=NaN"]}})
    refused(client, job, "p", "process.processors", "finite")


def test_a_device_the_settings_do_not_allow_is_refused(client):
    job = spec(den("a"), {"name": "p", "process": {"latents": "a", "processors": ["scale;device=meta"]}})
    refused(client, job, "p", "process.processors", "device='meta'", "cuda:N")


def test_img2img_whose_strength_runs_no_step_is_refused(client):
    job = spec(den("a"), den("b", latents="a", strength=0.1, steps=4))
    refused(client, job, "b", "denoise.strength", "runs no step")


@pytest.mark.parametrize(
    ("name", "hint"),
    [("euler", "'euler' is EulerDiscreteScheduler here"), ("EulerDiscreteSchedular", "EulerDiscreteScheduler?")],
)
def test_an_unknown_scheduler_in_a_single_window_is_refused_with_a_suggestion(client, name, hint):
    refused(client, spec(den(scheduler=name)), "d", "denoise.scheduler", hint, "Supported: ")


def test_a_misspelt_scheduler_option_is_refused_with_a_suggestion(client):
    job = spec(den(scheduler="EulerDiscreteScheduler", scheduler_config={"use_karras_sigma": True}))
    refused(client, job, "d", "denoise.scheduler_config.use_karras_sigma", "did you mean use_karras_sigmas?")


def test_dpm_sde_in_a_split_is_refused_at_submit_though_dpm_splits_by_default(client):
    config = {"algorithm_type": "sde-dpmsolver++"}
    job = spec(den(scheduler="DPMSolverMultistepScheduler", scheduler_config=config, denoising_end=0.6))
    refused(client, job, "d", "denoise.scheduler", "sde-dpmsolver++", "dpmsolver++' to split")


def test_a_png_bomb_input_is_refused_at_submit_from_its_recorded_size(client):
    handle = client.put_bytes(png_bomb(), "image/png")
    job = spec(den(image="init", strength=0.5), inputs=[{"name": "init", "blob": json_format.MessageToDict(handle)}])
    refused(client, job, "", "inputs[0].blob", "9000x9000", "max-pixels")


def test_int8_latents_are_refused_at_submit(client):
    blob = client.put_tensor(torch.zeros(1, 4, 32, 32, dtype=torch.int8))
    handle = pb.LatentHandle(blob=blob, space="sd1", noise=pb.NoiseLevel(fraction=1.0))
    job = spec(den(latents="start", strength=0.5),
               inputs=[{"name": "start", "latents": json_format.MessageToDict(handle)}])  # fmt: skip
    refused(client, job, "", "inputs[0].latents.blob", "int8")


def test_a_handle_that_lies_about_its_blob_is_refused(client):
    blob = client.put_tensor(torch.zeros(1, 4, 8, 8))
    lying = pb.LatentHandle(blob=blob, space="sd1", noise=pb.NoiseLevel(fraction=1.0))
    lying.blob.shape[:] = [1, 4, 64, 64]
    job = spec(den(latents="start", strength=0.5),
               inputs=[{"name": "start", "latents": json_format.MessageToDict(lying)}])  # fmt: skip
    refused(client, job, "", "inputs[0].latents.blob.shape", "[1, 4, 64, 64]", "1024 were sent")


def test_a_window_that_overflows_fails_naming_the_stage_and_cause_not_succeeded(client):
    # Finite latents at the edge of float32: the UNet's first layers overflow them to inf.
    blob = client.put_tensor(torch.full((1, 4, 32, 32), 3e38))
    handle = pb.LatentHandle(blob=blob, space="sd1", noise=pb.NoiseLevel(fraction=1.0), model="sd1-a")
    job = client.submit(spec(den("hot", latents="start", strength=1.0),
                             inputs=[{"name": "start", "latents": json_format.MessageToDict(handle)}]))  # fmt: skip
    ended = wait_for_job(client, job.id)
    assert ended.state == jpb.JOB_STATE_FAILED, ended
    assert "stage 'hot'" in ended.error and "NaN or inf" in ended.error and "likely causes" in ended.error
