"""The gateway end to end: real Redis, a real gateway and real denoisers, tiny real models."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline
from google.protobuf import json_format
from PIL import Image

from services.common.api.baton.v1 import jobs_pb2 as jpb
from services.common.job_files import load_spec, read_latents_file
from tests.gateway_kit import Cluster, demo_models, sd1_window_reference, wait_for_job, wait_for_progress

REPO = Path(__file__).resolve().parents[1]
DENOISE_CALLS = (  # the exposition sorts labels by name
    'grpc_server_handled_total{grpc_code="OK",grpc_method="Denoise",grpc_service="baton.v1.Denoiser",'
    'grpc_type="server_stream"}'
)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return demo_models(tmp_path_factory.mktemp("demo-models"))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, models):
    c = Cluster(tmp_path_factory.mktemp("cluster"), models)
    yield c
    c.stop()


@pytest.fixture
def client(cluster):
    with cluster.client() as c:
        yield c


def baton_run(spec: Path, out: Path, gateway: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "services.cli.main", "run", str(spec), "--out", str(out), "--gateway", gateway,
         "--quiet"],
        cwd=REPO, capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip


def slow_spec(steps: int = 40) -> jpb.JobSpec:
    """~1 s a step on a CPU (128x128 latents), long enough to act in the middle of it."""
    return json_format.ParseDict(
        {"name": "slow", "seed": 1, "width": 256, "height": 256,
         "stages": [{"name": "slow", "denoise": {"model": "sd1-a", "prompt": "a cat", "steps": steps}}]},
        jpb.JobSpec(),
    )  # fmt: skip


def test_sd1_demo_spec_equals_the_in_process_reference(cluster, models, tmp_path):
    result = baton_run(REPO / "examples" / "sd1-two-model.yaml", tmp_path, cluster.gateway.address)
    assert result.returncode == 0, result.stderr
    assert "succeeded" in result.stdout
    assert {p.name for p in tmp_path.iterdir()} >= {"draft.safetensors", "finish.safetensors", "picture.png"}
    spec = load_spec(REPO / "examples" / "sd1-two-model.yaml")
    a, b = spec.stages[0].denoise, spec.stages[1].denoise
    draft = sd1_window_reference(models["sd1-a"], a.prompt, a.negative_prompt, a.steps, a.guidance_scale, spec.seed,
                                 0.0, a.denoising_end, None)  # fmt: skip
    finish = sd1_window_reference(models["sd1-b"], b.prompt, b.negative_prompt, b.steps, b.guidance_scale, spec.seed,
                                  b.denoising_start, 1.0, draft)  # fmt: skip
    ours_draft, draft_meta = read_latents_file(tmp_path / "draft.safetensors")
    ours_draft = ours_draft.torch()
    ours_finish, finish_meta = read_latents_file(tmp_path / "finish.safetensors")
    ours_finish = ours_finish.torch()
    # Computed in the denoiser's process: equal up to thread effects (reference/tiny_models.md).
    torch.testing.assert_close(ours_draft, draft, rtol=0, atol=1e-5)
    torch.testing.assert_close(ours_finish, finish, rtol=0, atol=1e-5)
    assert draft_meta.noise.fraction == pytest.approx(0.6) and draft_meta.space == "sd1"
    assert finish_meta.noise.fraction == 1.0 and finish_meta.model == "sd1-b"


def test_a_batch_runs_through_two_models_and_decodes_to_one_file_per_image(cluster, models, tmp_path):
    spec = tmp_path / "batch.yaml"
    spec.write_text(
        """
name: batch
seed: 7
stages:
  - name: draft
    denoise: {model: sd1-a, prompt: a lighthouse, negative_prompt: blurry, steps: 10, denoising_end: 0.6, num_images: 2}
  - name: finish
    denoise: {model: sd1-b, prompt: a lighthouse, negative_prompt: blurry, steps: 10, latents: draft}
  - name: picture
    decode: {latents: finish}
outputs:
  - {stage: finish, format: safetensors}
  - {stage: picture, format: png}
"""
    )
    out = tmp_path / "out"
    result = baton_run(spec, out, cluster.gateway.address)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["finish.safetensors", "picture-0.png", "picture-1.png"]
    draft = sd1_window_reference(models["sd1-a"], "a lighthouse", "blurry", 10, 7.5, 7, 0.0, 0.6, None, batch=2)
    finish = sd1_window_reference(models["sd1-b"], "a lighthouse", "blurry", 10, 7.5, 7, 0.6, 1.0, draft, batch=2)
    ours, _ = read_latents_file(out / "finish.safetensors")
    ours = ours.torch()
    torch.testing.assert_close(ours, finish, rtol=0, atol=1e-5)  # across processes, as above
    first, second = (np.asarray(Image.open(out / f"picture-{i}.png")) for i in range(2))
    assert first.shape == (64, 64, 3) and not np.array_equal(first, second)


def test_sdxl_demo_spec_equals_diffusers_base_and_second_pair(cluster, models, tmp_path):
    result = baton_run(REPO / "examples" / "sdxl-base-second.yaml", tmp_path, cluster.gateway.address)
    assert result.returncode == 0, result.stderr
    spec = load_spec(REPO / "examples" / "sdxl-base-second.yaml")
    base, second = spec.stages[0].denoise, spec.stages[1].denoise
    kw = dict(negative_prompt=base.negative_prompt, num_inference_steps=base.steps, guidance_scale=base.guidance_scale,
              output_type="latent")  # fmt: skip
    pipe = StableDiffusionXLPipeline.from_pretrained(models["sdxl-base"])
    handoff = pipe(base.prompt, denoising_end=base.denoising_end, generator=torch.Generator().manual_seed(spec.seed),
                   **kw).images  # fmt: skip
    refiner = StableDiffusionXLImg2ImgPipeline.from_pretrained(models["sdxl-second"])
    theirs = refiner(second.prompt, image=handoff, denoising_start=second.denoising_start,
                     generator=torch.Generator().manual_seed(spec.seed), **kw).images  # fmt: skip
    ours, _ = read_latents_file(tmp_path / "second.safetensors")
    ours = ours.torch()
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    assert (tmp_path / "picture.png").stat().st_size > 0


def test_baton_run_without_a_gateway_runs_on_its_own_local_cluster(models, tmp_path):
    from tests.gateway_kit import aliases

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "BATON_MODELS": aliases(models)}
    env.pop("BATON_GATEWAY", None)
    result = subprocess.run(
        [sys.executable, "-m", "services.cli.main", "run", str(REPO / "examples" / "sd1-two-model.yaml"),
         "--out", str(tmp_path), "--quiet"],
        cwd=REPO, capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "starting a local cluster" in result.stderr
    assert (tmp_path / "picture.png").exists() and (tmp_path / "finish.safetensors").exists()


def bad(stages: list[dict], outputs: list[dict] | None = None, **job) -> jpb.JobSpec:
    return json_format.ParseDict({"name": "bad", "seed": 1, "stages": stages, "outputs": outputs or [], **job},
                                 jpb.JobSpec())  # fmt: skip


def den(name: str, model: str = "sd1-a", **fields) -> dict:
    return {"name": name, "denoise": {"model": model, "prompt": "x", "steps": 10, **fields}}


INVALID = [
    ("duplicate name", bad([den("a"), den("a")]), "stage 'a'", "stages[1].name"),
    ("unknown reference", bad([den("a", latents="nope")]), "stage 'a'", "denoise.latents"),
    ("cycle", bad([den("a", latents="b", denoising_start=0.5), den("b", latents="a", denoising_start=0.5)]),
     "cycle", "field"),
    ("space mismatch", bad([den("a", denoising_end=0.6), den("b", "sdxl-base", latents="a")]), "stage 'b'",
     "denoise.latents"),
    ("windows do not join", bad([den("a", denoising_end=0.6), den("b", "sd1-b", latents="a", denoising_start=0.5)]),
     "stage 'b'", "denoise.denoising_start"),
    ("size", bad([den("a", width=65)]), "stage 'a'", "denoise.width"),
    ("scheduler cannot split", bad([den("a", denoising_end=0.5, scheduler="EulerAncestralDiscreteScheduler")]),
     "stage 'a'", "denoise.scheduler"),
    ("unknown model", bad([den("a", "no/such-model")]), "stage 'a'", "denoise.model"),
    ("steps", bad([den("a", steps=0)]), "stage 'a'", "denoise.steps"),
    ("output format", bad([den("a")], [{"stage": "a", "format": "png"}]), "stage 'a'", "outputs[0].format"),
    ("start without latents", bad([den("a", denoising_start=0.4)]), "stage 'a'", "denoise.latents"),
    ("num_images", bad([den("a", num_images=-1)]), "stage 'a'", "denoise.num_images"),
    ("batch size changes", bad([den("a", num_images=2, denoising_end=0.6),
                                den("b", "sd1-b", latents="a", num_images=3)]), "stage 'b'", "denoise.num_images"),
    ("img2img from a batch", bad([den("a", num_images=2), {"name": "d", "decode": {"latents": "a"}},
                                  den("b", image="d")]), "stage 'b'", "denoise.image"),
]  # fmt: skip


@pytest.mark.parametrize("spec,stage,field", [c[1:] for c in INVALID], ids=[c[0] for c in INVALID])
def test_invalid_specs_are_rejected_at_submit_naming_stage_and_field(cluster, client, spec, stage, field):
    before = sum(d.metrics().get(DENOISE_CALLS, 0) for d in cluster.denoisers)
    with pytest.raises(grpc.RpcError) as info:
        client.submit(spec)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert stage in info.value.details() and field in info.value.details(), info.value.details()
    assert sum(d.metrics().get(DENOISE_CALLS, 0) for d in cluster.denoisers) == before, "no worker was called"


def test_a_stage_kind_no_worker_serves_yet_is_unavailable_not_the_spec_s_fault(client):
    spec = bad([den("a"), {"name": "p", "process": {"latents": "a", "processors": ["scale"]}}])
    with pytest.raises(grpc.RpcError) as info:
        client.submit(spec)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "stage 'p'" in info.value.details() and "no processor worker" in info.value.details()


def test_the_same_idempotency_key_gives_one_job(client):
    spec = bad([den("a", steps=2)])
    first = client.submit(spec, idempotency_key="batch-7/item-1")
    second = client.submit(spec, idempotency_key="batch-7/item-1")
    assert first.id == second.id
    assert wait_for_job(client, first.id).state == jpb.JOB_STATE_SUCCEEDED
    assert client.submit(spec, idempotency_key="batch-7/item-2").id != first.id


def test_watch_resumes_from_an_event_id_without_losing_or_repeating(client):
    job = client.submit(bad([den("a", steps=12, denoising_end=0.5), den("b", "sd1-b", latents="a")]))
    head = wait_for_progress(client, job.id, steps=3)  # a stream cut in the middle of the job
    tail = list(client.watch(job.id, after_event_id=head[-1].id))
    everything = list(client.watch(job.id))
    assert [e.id for e in head + tail] == [e.id for e in everything]
    assert everything[-1].job_state == jpb.JOB_STATE_SUCCEEDED
    assert len({e.id for e in everything}) == len(everything)


def test_cancel_mid_job_ends_it_cancelled_and_stops_the_worker(cluster, client):
    denoiser = cluster.denoisers[0]
    stopped = 'baton_denoise_windows_total{outcome="cancelled"}'
    stopped_before = denoiser.metrics().get(stopped, 0)
    job = client.submit(slow_spec())
    wait_for_progress(client, job.id, steps=1)
    at_cancel = denoiser.metrics()["baton_denoise_steps_total"]
    cancelled = client.cancel(job.id, "changed my mind")
    assert cancelled.state == jpb.JOB_STATE_CANCELLED and cancelled.error == "changed my mind"
    wait_until(lambda: denoiser.metrics().get(stopped, 0) > stopped_before, "the denoiser never stopped the window")
    # The step running when the cancel arrived may finish; no other step starts.
    assert denoiser.metrics()["baton_denoise_steps_total"] - at_cancel <= 1


def test_get_shows_the_step_a_running_stage_is_at(client):
    job = client.submit(slow_spec(steps=12))
    wait_for_progress(client, job.id, steps=3)
    time.sleep(1.5)  # the running gateway saves progress about once a second
    stage = client.get(job.id).stages[0]
    client.cancel(job.id)
    assert stage.total == 12 and stage.step >= 3, (stage.step, stage.total)


def test_run_streams_the_job_from_submit_to_its_end(client):
    events = list(client.run(bad([den("a", steps=3)])))
    kinds = [e.WhichOneof("event") for e in events]
    assert kinds[0] == "job_state" and events[0].job_state == jpb.JOB_STATE_QUEUED
    assert kinds.count("progress") == 3
    assert events[-1].job_state == jpb.JOB_STATE_SUCCEEDED


def test_the_asyncio_client_submits_watches_and_gets(cluster):
    import asyncio

    from services.client import AsyncBatonClient

    async def go() -> tuple[jpb.Job, list[jpb.JobEvent]]:
        async with AsyncBatonClient(cluster.gateway.address) as client:
            job = await client.submit(bad([den("a", steps=2)]))
            events = [e async for e in client.watch(job.id)]
            return await client.get(job.id), events

    job, events = asyncio.run(go())
    assert job.state == jpb.JOB_STATE_SUCCEEDED and events[-1].job_state == jpb.JOB_STATE_SUCCEEDED
    assert job.stages[0].latents.noise.fraction == 1.0


def test_puts_and_gets_blobs_through_the_gateway(client):
    t = torch.randn(2, 4, 8, 8, dtype=torch.float16)
    assert torch.equal(client.get_tensor(client.put_tensor(t)), t)
    handle = client.put_bytes(b"any bytes at all", "application/octet-stream")
    assert client.get_bytes(handle)[1] == b"any bytes at all"


def test_list_shows_jobs_newest_first(client):
    ids = [client.submit(bad([den("a", steps=1)])).id for _ in range(3)]
    listed = [j.id for j in client.list(page_size=2)]
    assert listed[:3] == ids[::-1]


def wait_until(check, message: str, timeout: float = 60) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, message
        time.sleep(0.2)


# -- failures: each test makes its own cluster, since it kills parts of it ----------------
@pytest.fixture
def failing(tmp_path, models, request):
    """A cluster with `request.param` denoisers and a slow job running its first step on it."""
    cluster = Cluster(tmp_path, models, denoisers=request.param, gateway_env={"BATON_WORKER_WAIT": "3"})
    with cluster.client() as client:
        job = client.submit(slow_spec(steps=6))
        wait_for_progress(client, job.id, steps=1)
        worker = client.get(job.id).stages[0].worker
    yield cluster, job.id, worker
    cluster.stop()


def finished(cluster: Cluster, job_id: str) -> jpb.Job:
    with cluster.client() as client:
        return wait_for_job(client, job_id, timeout=240)


@pytest.mark.parametrize("failing", [2], indirect=True)
def test_a_killed_worker_is_replaced_by_another_one(failing):
    cluster, job_id, worker = failing
    next(d for d in cluster.denoisers if d.address == worker).process.send_signal(signal.SIGKILL)
    done = finished(cluster, job_id)
    assert done.state == jpb.JOB_STATE_SUCCEEDED, done.error
    assert done.stages[0].attempts == 2 and done.stages[0].worker != worker


@pytest.mark.parametrize("failing", [1], indirect=True)
def test_a_killed_only_worker_that_never_comes_back_fails_the_job_naming_the_cause(failing):
    cluster, job_id, worker = failing
    cluster.denoisers[0].process.send_signal(signal.SIGKILL)
    done = finished(cluster, job_id)  # the gateway waits BATON_WORKER_WAIT (3 s here) for one
    assert done.state == jpb.JOB_STATE_FAILED
    assert "stage 'slow'" in done.error and "no denoiser worker is available" in done.error, done.error
    assert f"{worker}: UNAVAILABLE" in done.error, done.error


@pytest.mark.parametrize("failing", [1], indirect=True)
def test_a_gateway_restarted_mid_job_leaves_no_job_running(failing):
    cluster, job_id, _ = failing
    cluster.gateway.process.send_signal(signal.SIGKILL)
    cluster.gateway.process.wait()
    cluster.gateway = cluster.start_gateway()
    done = finished(cluster, job_id)
    assert done.state == jpb.JOB_STATE_SUCCEEDED, done.error
