"""SD3 and Flux through the gateway: a two-model Flux job, and spaces the planner keeps apart."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
import torch
from google.protobuf import json_format

from services.common.api.baton.v1 import jobs_pb2 as jpb
from services.common.job_files import load_spec, read_latents_file
from services.devkit.tiny_models import build
from tests.gateway_kit import Cluster, flux_window_reference

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    root = tmp_path_factory.mktemp("flow-cluster")
    models = {
        "flux-a": str(build("flux", root / "a" / "flux", seed=0)),
        "flux-b": str(build("flux", root / "b" / "flux", seed=1)),
        "sd3": str(build("sd3", root / "a" / "sd3")),
    }
    c = Cluster(root, models)
    yield c
    c.stop()


def test_a_two_stage_flux_job_equals_the_in_process_reference(cluster, tmp_path):
    spec_path = REPO / "examples" / "flux-two-model.yaml"
    result = subprocess.run(
        [sys.executable, "-m", "services.cli.main", "run", str(spec_path), "--out", str(tmp_path), "--gateway",
         cluster.gateway.address, "--quiet"],
        cwd=REPO, capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    spec = load_spec(spec_path)
    a, b = spec.stages[0].denoise, spec.stages[1].denoise
    side = 256  # the tiny Flux model's default size: FluxPipeline's 128 x VAE factor 2
    layout = flux_window_reference(cluster.models["flux-a"], a.prompt, a.steps, a.guidance_scale, spec.seed, side,
                                   0.0, a.denoising_end, None)  # fmt: skip
    detail = flux_window_reference(cluster.models["flux-b"], b.prompt, b.steps, b.guidance_scale, spec.seed, side,
                                   a.denoising_end, 1.0, layout)  # fmt: skip
    ours, meta = read_latents_file(tmp_path / "detail.safetensors")
    ours = ours.torch()
    assert list(ours.shape) == [1, 16, 128, 128] and meta.space == "flux"
    torch.testing.assert_close(ours, detail, rtol=0, atol=1e-5)  # another process: thread effects only
    assert (tmp_path / "picture.png").exists()


def test_partial_sd3_latents_handed_to_flux_are_rejected_at_submit(cluster):
    spec = json_format.ParseDict(
        {"name": "mixed", "seed": 1, "stages": [
            {"name": "sd3", "denoise": {"model": "sd3", "prompt": "x", "steps": 8, "denoising_end": 0.5}},
            {"name": "flux", "denoise": {"model": "flux-a", "prompt": "x", "steps": 8, "latents": "sd3"}}]},
        jpb.JobSpec(),
    )  # fmt: skip
    with cluster.client() as client, pytest.raises(grpc.RpcError) as info:
        client.submit(spec)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = info.value.details()
    assert "stage 'flux'" in details and "denoise.latents" in details
    assert "'sd3' latent space" in details and "'flux'" in details and "interpose" in details
