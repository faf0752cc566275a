"""The Processor service as a real process, and processors in jobs through the gateway."""

from __future__ import annotations

import grpc
import pytest
import torch
from google.protobuf import json_format

from services.common.api.baton.v1 import handles_pb2 as pb
from services.common.api.baton.v1 import jobs_pb2 as jpb
from services.common.api.baton.v1 import processor_pb2 as ppb
from services.common.api.baton.v1 import processor_pb2_grpc
from services.common.blobs import BlobStore
from services.common.redis_conn import connect
from services.devkit.tiny_models import build
from tests.gateway_kit import Cluster, wait_for_job


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    root = tmp_path_factory.mktemp("processor-cluster")
    c = Cluster(
        root, {"sd1": str(build("sd1", root / "sd1"))}, processor_env={"BATON_PLUGINS": "tests.plugin_processor"}
    )
    yield c
    c.stop()


@pytest.fixture(scope="module")
def stub(cluster):
    return processor_pb2_grpc.ProcessorStub(cluster.processor.channel)


@pytest.fixture(scope="module")
def store(cluster):
    return BlobStore(connect(cluster.redis_url, "no"))


def handle_of(store, t: torch.Tensor) -> pb.LatentHandle:
    return pb.LatentHandle(blob=store.put_tensor(t), space="sd1", width=t.shape[-1] * 2, height=t.shape[-2] * 2,
                           noise=pb.NoiseLevel(fraction=1.0))  # fmt: skip


def test_list_processors_describes_names_args_defaults_and_help(stub):
    infos = {p.name: p for p in stub.ListProcessors(ppb.ListProcessorsRequest()).processors}
    assert {"scale", "noise", "interposer", "resize", "crop", "blend", "invert"} <= set(infos)
    factor = next(a for a in infos["scale"].args if a.name == "factor")
    assert (factor.type, factor.default, factor.min) == ("float", "1.0", 1e-12) and factor.help
    assert {"device", "model-offload"} <= {a.name for a in infos["noise"].args}
    assert infos["blend"].inputs == 2


def test_bad_uris_are_invalid_argument_and_the_service_keeps_serving(stub, store):
    handle = handle_of(store, torch.randn(1, 4, 8, 8))
    for uri, needle in [("sharpen", "unknown processor 'sharpen'"), ("scale;gain=2", "accepts: clamp-max"),
                        ("noise;timestep=5000", "out of range [0, 999]")]:  # fmt: skip
        with pytest.raises(grpc.RpcError) as info:
            stub.Process(ppb.ProcessRequest(inputs=[handle], processors=[uri]))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert needle in info.value.details() and "field 'processors'" in info.value.details()
    reply = stub.Process(ppb.ProcessRequest(inputs=[handle], processors=["invert"]))
    assert torch.equal(store.get_tensor(reply.latents.blob), -store.get_tensor(handle.blob))


def test_plus_chains_map_to_inputs_in_order(stub, store):
    a, b = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    request = ppb.ProcessRequest(inputs=[handle_of(store, a), handle_of(store, b)],
                                 processors=["blend;weight=0.5", "+", "invert"])  # fmt: skip
    reply = stub.Process(request)
    torch.testing.assert_close(store.get_tensor(reply.latents.blob), 0.5 * a + 0.5 * -b)
    mismatch = ppb.ProcessRequest(inputs=[handle_of(store, a), handle_of(store, b)], processors=["scale"])
    with pytest.raises(grpc.RpcError) as info:
        stub.Process(mismatch)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "2 input(s)" in info.value.details()


def spec(stages: list[dict], outputs: list[dict] | None = None) -> jpb.JobSpec:
    return json_format.ParseDict({"name": "p", "seed": 2, "stages": stages, "outputs": outputs or []}, jpb.JobSpec())


def test_denoise_then_noise_back_then_denoise_from_the_recorded_level(cluster):
    steps = 10
    job_spec = spec([
        {"name": "first", "denoise": {"model": "sd1", "prompt": "a city", "steps": steps, "denoising_end": 0.6}},
        {"name": "renoise", "process": {"latents": "first", "processors": ["noise;timestep=600;seed=9"]}},
        {"name": "again", "denoise": {"model": "sd1", "prompt": "a city", "steps": steps, "latents": "renoise"}},
    ])  # fmt: skip
    with cluster.client() as client:
        job = client.submit(job_spec)
        events = list(client.watch(job.id))
        done = wait_for_job(client, job.id)
    assert done.state == jpb.JOB_STATE_SUCCEEDED, done.error
    renoised = next(s for s in done.stages if s.name == "renoise").latents
    assert renoised.noise.timestep == 600 and renoised.noise.cutoff_timestep == 601
    again = [e.progress for e in events if e.WhichOneof("event") == "progress" and e.progress.stage == "again"]
    # The tiny model's Euler schedule ("leading", 10 steps): 901, 801, ..., 1. The second window
    # starts at the first step at or below the recorded level, 600: 501, and runs to the end.
    assert [p.timestep for p in again] == [501, 401, 301, 201, 101, 1]


def test_a_denoise_stage_runs_its_latents_processors_first(cluster):
    job_spec = spec([
        {"name": "first", "denoise": {"model": "sd1", "prompt": "x", "steps": 6, "denoising_end": 0.5}},
        {"name": "second", "denoise": {"model": "sd1", "prompt": "x", "steps": 6, "latents": "first",
                                       "latents_processors": ["scale;factor=1.02"]}},
    ])  # fmt: skip
    with cluster.client() as client:
        done = wait_for_job(client, client.submit(job_spec).id)
    assert done.state == jpb.JOB_STATE_SUCCEEDED, done.error


@pytest.mark.parametrize(
    "processors,needle", [(["sharpen"], "unknown processor"), (["scale;factor=-1"], "out of range")]
)
def test_processor_uris_are_checked_at_submit(cluster, processors, needle):
    job_spec = spec([
        {"name": "first", "denoise": {"model": "sd1", "prompt": "x", "steps": 2}},
        {"name": "post", "process": {"latents": "first", "processors": processors}},
    ])  # fmt: skip
    with cluster.client() as client, pytest.raises(grpc.RpcError) as info:
        client.submit(job_spec)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "stage 'post'" in info.value.details() and "process.processors" in info.value.details()
    assert needle in info.value.details()
