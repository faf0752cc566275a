"""The Interposer service through real processes: networks, the VAE round trip, and a job using it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
import torch
from diffusers import AutoencoderKL
from safetensors.torch import save_file

from services.common.api.baton.v1 import handles_pb2 as pb
from services.common.api.baton.v1 import interposer_pb2 as ipb
from services.common.api.baton.v1 import interposer_pb2_grpc
from services.common.blobs import BlobStore
from services.common.latent_spaces import get_space
from services.common.redis_conn import connect
from services.devkit.tiny_models import build
from services.interposer.net import InterposerNet, convert, load_interposer, weights_filename
from tests.gateway_kit import Cluster

REPO = Path(__file__).resolve().parents[1]


def random_interposer(folder: Path, src: str, dst: str, ch_in: int, ch_out: int) -> Path:
    """A v4.0 file with random weights and non-trivial BatchNorm statistics."""
    torch.manual_seed(0)
    net = InterposerNet(ch_in, ch_out)
    state = {k: v.clone() for k, v in net.state_dict().items()}
    for key, value in state.items():
        if key.endswith("running_mean"):
            state[key] = torch.randn_like(value) * 0.1
        elif key.endswith("running_var"):
            state[key] = torch.rand_like(value) + 0.5
    path = folder / weights_filename(src, dst)
    save_file(state, str(path))
    return path


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    root = tmp_path_factory.mktemp("interposer-cluster")
    weights = root / "weights"
    weights.mkdir()
    random_interposer(weights, "v1", "xl", 4, 4)
    models = {
        "sd1": str(build("sd1", root / "sd1")),
        "sdxl": str(build("sdxl", root / "sdxl")),
        "flux": str(build("flux", root / "flux")),
    }
    c = Cluster(root, models, interposer_env={"BATON_INTERPOSER_DIR": str(weights), "HF_HUB_OFFLINE": "1"},
                processor_env={})  # fmt: skip
    c.weights = weights
    yield c
    c.stop()


@pytest.fixture(scope="module")
def stub(cluster):
    return interposer_pb2_grpc.InterposerStub(cluster.interposer.channel)


@pytest.fixture(scope="module")
def store(cluster):
    return BlobStore(connect(cluster.redis_url, "no"))


def finished(store, space: str, channels: int, fraction: float = 1.0) -> pb.LatentHandle:
    latents = torch.randn(1, channels, 32, 32, generator=torch.Generator().manual_seed(1))
    return pb.LatentHandle(blob=store.put_tensor(latents), space=space, scaling=pb.LATENT_SCALING_MODEL,
                           noise=pb.NoiseLevel(fraction=fraction), width=64, height=64, model=space)  # fmt: skip


def test_a_network_converts_with_the_published_layout_and_scaling(cluster, stub, store):
    handle = finished(store, "sd1", 4)
    reply = stub.Convert(ipb.ConvertRequest(latents=handle, target="sdxl", method=ipb.CONVERSION_METHOD_NET))
    assert reply.method == ipb.CONVERSION_METHOD_NET
    assert reply.latents.space == "sdxl" and reply.latents.noise.fraction == 1.0
    net = load_interposer(cluster.weights / weights_filename("v1", "xl"), "v1", "xl")
    expected = convert(net, store.get_tensor(handle.blob), get_space("sd1"), get_space("sdxl"))
    torch.testing.assert_close(store.get_tensor(reply.latents.blob), expected, rtol=0, atol=1e-5)


def test_auto_uses_the_network_when_its_weights_are_here(stub, store):
    reply = stub.Convert(ipb.ConvertRequest(latents=finished(store, "sd1", 4), target="sdxl"))
    assert reply.method == ipb.CONVERSION_METHOD_NET


def test_partly_denoised_latents_are_refused(stub, store):
    with pytest.raises(grpc.RpcError) as info:
        stub.Convert(ipb.ConvertRequest(latents=finished(store, "sd1", 4, fraction=0.6), target="sdxl"))
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "finished latents only" in info.value.details() and "0.6" in info.value.details()


def test_missing_weights_name_the_file_and_where_they_were_looked_for(cluster, stub, store):
    request = ipb.ConvertRequest(latents=finished(store, "sdxl", 4), target="sd3", method=ipb.CONVERSION_METHOD_NET)
    with pytest.raises(grpc.RpcError) as info:
        stub.Convert(request)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert "xl-to-v3_interposer-v4.0.safetensors" in info.value.details()
    assert str(cluster.weights) in info.value.details()


def test_nothing_converts_into_flux_by_network(stub, store):
    request = ipb.ConvertRequest(latents=finished(store, "sd1", 4), target="flux", method=ipb.CONVERSION_METHOD_NET)
    with pytest.raises(grpc.RpcError) as info:
        stub.Convert(request)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "method vae" in info.value.details()


def test_the_vae_round_trip_converts_sd1_to_16_channel_flux_latents(cluster, stub, store):
    request = ipb.ConvertRequest(latents=finished(store, "sd1", 4), target="flux", source_model="sd1",
                                 target_model="flux")  # fmt: skip
    reply = stub.Convert(request)
    assert reply.method == ipb.CONVERSION_METHOD_VAE and reply.latents.space == "flux"
    out = store.get_tensor(reply.latents.blob)
    assert list(out.shape) == [1, 16, 32, 32]  # 64 px through a VAE factor of 2
    # Independently: sd1's VAE decodes, the pixels are clamped (no 8-bit rounding), flux's VAE
    # encodes (the distribution's mode), each space's published scaling on its own side.
    source = AutoencoderKL.from_pretrained(cluster.models["sd1"], subfolder="vae").eval()
    target = AutoencoderKL.from_pretrained(cluster.models["flux"], subfolder="vae").eval()
    sc, tc = source.config, target.config
    with torch.no_grad():
        latents = store.get_tensor(request.latents.blob)
        pixels = source.decode(latents / sc.scaling_factor, return_dict=False)[0].clamp(-1, 1)
        raw = target.encode(pixels).latent_dist.mode()
    expected = (raw - tc.shift_factor) * tc.scaling_factor
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-4)


def test_the_vae_round_trip_needs_a_target_model(stub, store):
    with pytest.raises(grpc.RpcError) as info:
        stub.Convert(ipb.ConvertRequest(latents=finished(store, "sd1", 4), target="flux"))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "target_model" in info.value.details()


def test_list_conversions_names_the_networks_here_and_the_vae_round_trip(cluster, stub):
    conversions = stub.ListConversions(ipb.ListConversionsRequest()).conversions
    nets = {(c.source, c.target) for c in conversions if c.method == ipb.CONVERSION_METHOD_NET}
    assert nets == {("sd1", "sdxl")}
    assert any(c.method == ipb.CONVERSION_METHOD_VAE for c in conversions)


def test_a_job_interposes_sd1_latents_into_sdxl_and_continues_with_img2img(cluster, tmp_path):
    spec = tmp_path / "job.yaml"
    spec.write_text(
        """
name: sd1-to-sdxl
seed: 4
stages:
  - name: draft
    denoise: {model: sd1, prompt: a cat in a city, steps: 8}
  - name: to_xl
    interpose: {latents: draft, target: sdxl}
  - name: refine
    denoise: {model: sdxl, prompt: a cat in a city, latents: to_xl, strength: 0.5, steps: 8}
outputs:
  - {stage: refine, format: safetensors}
"""
    )
    result = subprocess.run(
        [sys.executable, "-m", "services.cli.main", "run", str(spec), "--out", str(tmp_path / "out"), "--gateway",
         cluster.gateway.address, "--quiet"],
        cwd=REPO, capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr + result.stdout
    assert "to_xl" in result.stdout and "interpose" in result.stdout
    from services.common.job_files import read_latents_file

    latents, meta = read_latents_file(tmp_path / "out" / "refine.safetensors")

    assert meta.space == "sdxl" and meta.noise.fraction == 1.0 and list(latents.shape) == [1, 4, 32, 32]


def test_the_planner_asks_for_a_target_model_before_a_vae_round_trip(cluster):
    from google.protobuf import json_format

    from services.common.api.baton.v1 import jobs_pb2 as jpb

    interpose = {"latents": "draft", "target": "flux", "method": "CONVERSION_METHOD_VAE"}
    stages = [{"name": "draft", "denoise": {"model": "sd1", "prompt": "x", "steps": 2}},
              {"name": "to_flux", "interpose": interpose}]  # fmt: skip
    spec = json_format.ParseDict({"name": "x", "seed": 1, "stages": stages}, jpb.JobSpec())
    with cluster.client() as client, pytest.raises(grpc.RpcError) as info:
        client.submit(spec)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "stage 'to_flux'" in info.value.details() and "interpose.target_model" in info.value.details()


def test_the_interposer_processor_converts_through_the_interposer_service(cluster, store):
    from services.common.api.baton.v1 import processor_pb2 as ppb
    from services.common.api.baton.v1 import processor_pb2_grpc

    handle = finished(store, "sd1", 4)
    stub = processor_pb2_grpc.ProcessorStub(cluster.processor.channel)
    reply = stub.Process(ppb.ProcessRequest(inputs=[handle], processors=["interposer;target=sdxl;method=net"]))
    assert reply.latents.space == "sdxl"
    net = load_interposer(cluster.weights / weights_filename("v1", "xl"), "v1", "xl")
    expected = convert(net, store.get_tensor(handle.blob), get_space("sd1"), get_space("sdxl"))
    torch.testing.assert_close(store.get_tensor(reply.latents.blob), expected, rtol=0, atol=1e-5)
