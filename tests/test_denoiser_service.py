"""The Denoiser service as a real server subprocess with a real Redis and tiny real models."""

from __future__ import annotations

import io
import time
from pathlib import Path

import grpc
import pytest
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image

from services.common.api.baton.v1 import denoiser_pb2 as dpb
from services.common.api.baton.v1 import denoiser_pb2_grpc
from services.common.api.baton.v1 import handles_pb2 as pb
from services.common.redis_conn import connect
from tests.denoise_kit import diffusers_latents, png, request, sample_image
from tests.service_procs import ServiceProcess

STEPS = 8
STEP_COUNTER = "baton_denoise_steps_total"


@pytest.fixture(scope="module")
def store(single_store):
    return single_store


@pytest.fixture(scope="module")
def denoiser(redis_url, models, tmp_path_factory):
    env = {
        "BATON_MODELS": f"sd1={models['sd1']},sdxl={models['sdxl']}",
        "BATON_PRELOAD": "sd1",
        # Its tests also name a model by folder, and hub ids that are not there.
        "BATON_MODEL_SOURCES": f"{Path(models['sdxl']).parent},hub:*",
    }
    proc = ServiceProcess("denoiser", redis_url, env, tmp_path_factory.mktemp("logs") / "denoiser.log")
    yield proc.wait_serving()
    proc.stop()


@pytest.fixture(scope="module")
def stub(denoiser):
    return denoiser_pb2_grpc.DenoiserStub(denoiser.channel)


def denoise(stub, req, timeout: float = 120) -> tuple[list[dpb.StepEvent], pb.LatentHandle]:
    steps, result = [], None
    for event in stub.Denoise(req, timeout=timeout):
        if event.HasField("step"):
            steps.append(event.step)
        else:
            result = event.result.latents
    assert result is not None
    return steps, result


def assert_fails(call, code: grpc.StatusCode, *needles: str) -> str:
    with pytest.raises(grpc.RpcError) as info:
        result = call()
        if hasattr(result, "__iter__"):
            list(result)
    assert info.value.code() == code, info.value.details()
    for needle in needles:
        assert needle in info.value.details()
    return info.value.details()


def test_denoise_streams_a_step_event_per_step_then_the_result(stub):
    steps, handle = denoise(stub, request("sd1", steps=STEPS, denoising_end=0.6, preview_every=2))
    total = len(steps)
    assert 0 < total < STEPS
    assert [s.step for s in steps] == list(range(1, total + 1))
    assert all(s.total == total for s in steps)
    assert [s.timestep for s in steps] == sorted((s.timestep for s in steps), reverse=True)
    previews = [s for s in steps if s.preview_png]
    assert [s.step for s in previews] == [s for s in range(1, total + 1) if s % 2 == 0 or s == total]
    assert Image.open(io.BytesIO(previews[0].preview_png)).size == (32, 32)
    assert handle.space == "sd1" and handle.noise.fraction == pytest.approx(0.6)
    assert handle.scheduler.class_name == "EulerDiscreteScheduler" and handle.model == "sd1"


def test_a_full_run_through_the_service_equals_diffusers(stub, store, models):
    _, handle = denoise(stub, request("sd1", steps=STEPS, width=64, height=64))
    pipe = StableDiffusionPipeline.from_pretrained(models["sd1"])
    pipe.set_progress_bar_config(disable=True)
    theirs = diffusers_latents(pipe, STEPS, width=64, height=64)
    # Another process: equal up to thread-count effects (reference/tiny_models.md).
    torch.testing.assert_close(store.get_tensor(handle.blob), theirs, rtol=0, atol=1e-5)


def test_a_split_through_the_service_equals_the_unsplit_run(stub, store):
    _, whole = denoise(stub, request("sd1", steps=STEPS, scheduler="DPMSolverMultistepScheduler"))
    _, first = denoise(stub, request("sd1", steps=STEPS, scheduler="DPMSolverMultistepScheduler", denoising_end=0.6))
    _, second = denoise(stub, request("sd1", steps=STEPS, latents=first))
    assert second.noise.fraction == 1.0
    assert torch.equal(store.get_tensor(second.blob), store.get_tensor(whole.blob))


def test_an_output_key_names_the_result_blob(stub, store):
    _, handle = denoise(stub, request("sd1", steps=2, output_key="job-1/draft"))
    assert handle.blob.key == "baton:blob:{job-1/draft}"
    assert torch.equal(store.get_tensor("job-1/draft"), store.get_tensor(handle.blob))


def sd1_latents(stub, **fields) -> pb.LatentHandle:
    return denoise(stub, request("sd1", steps=STEPS, **fields))[1]


def test_bad_inputs_get_clear_statuses_and_the_service_keeps_serving(stub, store):
    partial = sd1_latents(stub, denoising_end=0.5)
    nan = pb.LatentHandle()
    nan.CopyFrom(partial)
    nan.blob.CopyFrom(store.put_tensor(torch.full((1, 4, 32, 32), float("nan"))))
    expired = pb.LatentHandle()
    expired.CopyFrom(partial)
    expired.blob.CopyFrom(store.put_tensor(torch.zeros(1, 4, 32, 32), ttl_s=0.1))
    time.sleep(0.3)
    cases = [
        (request("no/such-model", steps=4), grpc.StatusCode.NOT_FOUND, "field 'model'", "no/such-model"),
        (request("sdxl", steps=4, latents=partial), grpc.StatusCode.INVALID_ARGUMENT, "latents.space", "interpose"),
        (request("sd1", steps=4, width=65), grpc.StatusCode.INVALID_ARGUMENT, "field 'width'", "multiple of 2"),
        (request("sd1", steps=0), grpc.StatusCode.INVALID_ARGUMENT, "field 'steps'"),
        (request("sd1", steps=4, denoising_end=1.5), grpc.StatusCode.INVALID_ARGUMENT, "denoising_end", "[0, 1]"),
        (
            request("sd1", steps=4, denoising_start=0.7, denoising_end=0.6, latents=partial),
            grpc.StatusCode.INVALID_ARGUMENT,
            "denoising_start",
        ),
        (
            request("sd1", steps=4, denoising_end=0.5, scheduler="EulerAncestralDiscreteScheduler"),
            grpc.StatusCode.INVALID_ARGUMENT,
            "field 'scheduler'",
            "EulerAncestralDiscreteScheduler",
        ),
        (
            request("sd1", steps=4, scheduler="NoSuchScheduler"),
            grpc.StatusCode.INVALID_ARGUMENT,
            "EulerDiscreteScheduler",
        ),
        (request("sd1", steps=4, latents=nan), grpc.StatusCode.INVALID_ARGUMENT, "field 'latents'", "NaN"),
        (request("sd1", steps=4, latents=expired), grpc.StatusCode.NOT_FOUND, "field 'latents'", "expired"),
        (request("sd1", steps=4, denoising_start=0.5), grpc.StatusCode.INVALID_ARGUMENT, "field 'latents'"),
    ]
    for req, code, *needles in cases:
        assert_fails(lambda req=req: stub.Denoise(req, timeout=60), code, *needles)
    assert denoise(stub, request("sd1", steps=2))[1].noise.fraction == 1.0


def test_a_mismatched_denoising_start_names_the_recorded_level(stub):
    partial = sd1_latents(stub, denoising_end=0.6)
    details = assert_fails(
        lambda: stub.Denoise(request("sd1", steps=STEPS, latents=partial, denoising_start=0.5), timeout=60),
        grpc.StatusCode.INVALID_ARGUMENT,
        "denoising_start",
    )
    assert "0.6" in details


def slow_request(**fields) -> dpb.DenoiseRequest:
    """~1 s per step on a CPU: 128x128 latents through the tiny UNet with guidance."""
    return request("sd1", steps=40, width=256, height=256, **fields)


def steps_counter(denoiser) -> float:
    return denoiser.metrics().get(STEP_COUNTER, 0.0)


def stopped_windows(denoiser) -> float:
    return denoiser.metrics().get('baton_denoise_windows_total{outcome="cancelled"}', 0.0)


def wait_for_stop(denoiser, already: float, timeout: float = 60) -> None:
    """Waits until the worker has left a cancelled window (the counter goes up when it does)."""
    deadline = time.monotonic() + timeout
    while stopped_windows(denoiser) <= already:
        assert time.monotonic() < deadline, "the window never stopped"
        time.sleep(0.1)


def test_cancel_stops_the_window_within_a_step(stub, denoiser):
    stopped = stopped_windows(denoiser)
    call = stub.Denoise(slow_request(), timeout=120)
    for received, _ in enumerate(call, start=1):
        if received == 2:
            at_cancel = steps_counter(denoiser)
            call.cancel()
            break
    with pytest.raises(grpc.RpcError) as info:
        next(call)
    assert info.value.code() == grpc.StatusCode.CANCELLED
    wait_for_stop(denoiser, stopped)
    # The step running when the cancel arrived may finish; no other step starts.
    assert steps_counter(denoiser) - at_cancel <= 1


def test_a_deadline_is_honoured_and_stops_the_work(stub, denoiser):
    stopped = stopped_windows(denoiser)
    started = time.monotonic()
    assert_fails(lambda: stub.Denoise(slow_request(), timeout=3), grpc.StatusCode.DEADLINE_EXCEEDED)
    wait_for_stop(denoiser, stopped)
    steps = steps_counter(denoiser)
    time.sleep(1)
    assert steps_counter(denoiser) == steps
    assert time.monotonic() - started < 30


def listed(stub) -> dict[str, dpb.ModelInfo]:
    return {m.name: m for m in stub.ListModels(dpb.ListModelsRequest()).models}


def test_list_load_and_unload_models(stub, models):
    sd1 = listed(stub)["sd1"]
    assert sd1.family == "sd1" and sd1.space == "sd1" and sd1.state == dpb.MODEL_STATE_READY
    assert sd1.vae_scale_factor == 2 and sd1.latent_channels == 4 and sd1.memory_bytes > 0
    assert "sdxl" in listed(stub), "a configured alias is listed, loaded or not"
    info = stub.LoadModel(dpb.LoadModelRequest(model="sdxl"))
    assert info.family == "sdxl" and info.source == models["sdxl"] and info.state == dpb.MODEL_STATE_READY
    assert listed(stub)["sdxl"].state == dpb.MODEL_STATE_READY
    stub.UnloadModel(dpb.UnloadModelRequest(model="sdxl"))
    assert listed(stub)["sdxl"].state == dpb.MODEL_STATE_AVAILABLE
    assert_fails(lambda: stub.UnloadModel(dpb.UnloadModelRequest(model="sdxl")), grpc.StatusCode.NOT_FOUND, "sdxl")


def test_inspect_model_reads_configs_without_loading(stub, models):
    info = stub.InspectModel(dpb.InspectModelRequest(model=models["sdxl"]))
    assert (info.family, info.space, info.vae_scale_factor, info.default_width) == ("sdxl", "sdxl", 2, 64)
    assert info.default_scheduler == "EulerDiscreteScheduler"
    assert models["sdxl"] not in {name for name, info in listed(stub).items() if info.memory_bytes}
    assert_fails(lambda: stub.InspectModel(dpb.InspectModelRequest(model="no/such")), grpc.StatusCode.NOT_FOUND)


def test_the_denoiser_registers_as_a_worker_with_its_models(denoiser, redis_url):
    from services.common.registry import WorkerRegistry

    workers = WorkerRegistry(connect(redis_url, "no")).workers("denoiser")
    mine = [w for w in workers if w.address == denoiser.address]
    assert len(mine) == 1 and mine[0].load_on_demand and mine[0].accepting
    assert {m.name for m in mine[0].models} >= {"sd1", "sdxl"}


def test_encode_and_decode_work_on_a_loaded_model(stub, store):
    image = store.put_bytes(png(sample_image()), media_type="image/png")
    latents = stub.Encode(dpb.EncodeRequest(model="sd1", images=[image])).latents
    assert latents.space == "sd1" and latents.noise.fraction == 1.0
    assert list(store.get_tensor(latents.blob).shape) == [1, 4, 32, 32]
    decoded = stub.Decode(dpb.DecodeRequest(model="sd1", latents=latents))
    assert (decoded.width, decoded.height) == (64, 64)
    picture = Image.open(io.BytesIO(bytes(store.get_bytes(decoded.images[0]))))
    assert picture.format == "PNG" and picture.size == (64, 64)
