"""A Cancel (or a passed deadline) stops a window inside a long step, not after it, and frees the worker.

One step of a tiny SD 1.x model at 384x384 (192x192 latents) takes several seconds on a 2-core CPU,
almost all of it in four self-attention blocks of about 2 s each; a cancel takes effect at the next
block. The bounds below are safety bounds, far above what is measured (bench/cancel.py).
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable

import pytest
import torch
from google.protobuf import json_format

from services.common.api.baton.v1 import denoiser_pb2_grpc
from services.common.api.baton.v1 import jobs_pb2 as jpb
from services.common.errors import Cancelled, DeadlineExceeded
from services.denoiser import interrupt
from services.denoiser.cache import ModelCache
from services.denoiser.engine import DenoiseEngine
from services.denoiser.models import LoadOptions, load_model
from services.devkit.tiny_models import build
from tests.denoise_kit import make_engine, png, request, sample_image
from tests.gateway_kit import Cluster, wait_for_job
from tests.service_procs import ServiceProcess

# A long step: the tiny VAE scales by 2, so 384 px are 192x192 latents (a real SD 1.x at 1536 px).
LONG_SIDE = 384
# From the cancel to the window's end (or the next job's first step): a safety bound, not a measurement.
CANCEL_BOUND_S = 5.0


class CancelInsideFirstStep:
    """A `cancelled` callable that another thread turns true once the window is inside its first
    model call (the engine has asked twice: before step 1, then before the network's first block)."""

    def __init__(self) -> None:
        self.asks = 0
        self.flag = threading.Event()
        self.set_at = 0.0
        self.thread = threading.Thread(target=self._cancel, daemon=True)
        self.thread.start()

    def __call__(self) -> bool:
        self.asks += 1
        return self.flag.is_set()

    def _cancel(self) -> None:
        while self.asks < 2:
            time.sleep(0.005)
        self.set_at = time.monotonic()
        self.flag.set()


@pytest.fixture(scope="module")
def sd1(tmp_path_factory) -> str:
    return str(build("sd1", tmp_path_factory.mktemp("cancel-models") / "sd1"))


@pytest.fixture(scope="module")
def engine(single_store):
    return make_engine(single_store)


def test_blocks_are_found_by_structure_in_every_kind_of_network():
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel, UNet2DConditionModel

    with torch.device("meta"):  # full-size configs, no weights
        unet = UNet2DConditionModel(cross_attention_dim=768)
        sd3 = SD3Transformer2DModel(num_layers=4)
        flux = FluxTransformer2DModel(num_layers=2, num_single_layers=3)
    found = interrupt.blocks(unet)
    assert {*unet.down_blocks, unet.mid_block.resnets[0], *unet.up_blocks[1].attentions} <= set(found)
    assert {*sd3.transformer_blocks} <= set(interrupt.blocks(sd3))
    assert {*flux.transformer_blocks, *flux.single_transformer_blocks} <= set(interrupt.blocks(flux))


def asked_twice() -> Callable[[], bool]:
    """A `cancelled` that turns true on its second call: the first is before step 1, the second before
    the first block of the network."""
    asks = itertools.count(1)
    return lambda: next(asks) >= 2


@pytest.mark.parametrize("family", ["sd1", "sdxl", "sd3", "flux"])
def test_every_family_checks_inside_its_network(models, flow_models, engine, family):
    path = {**models, **flow_models}[family]
    with pytest.raises(Cancelled, match="inside step 1 of 2"):
        engine.denoise(request(path, steps=2), cancelled=asked_twice())


def test_the_hooks_live_for_one_window_and_go_when_it_fails(engine, sd1):
    with pytest.raises(Cancelled):
        engine.denoise(request(sd1, steps=2), cancelled=asked_twice())
    with engine.cache.use(sd1) as model:
        networks = [c for c in model.pipe.components.values() if isinstance(c, torch.nn.Module)]
    assert not any(m._forward_pre_hooks for network in networks for m in network.modules())
    engine.denoise(request(sd1, steps=1), cancelled=lambda: False)  # and the next window runs as usual


def test_a_cancel_inside_the_first_long_step_stops_the_window_within_a_block(engine, sd1):
    cancel, steps = CancelInsideFirstStep(), []
    with pytest.raises(Cancelled, match="inside step 1 of 4") as info:
        engine.denoise(request(sd1, steps=4, width=LONG_SIDE, height=LONG_SIDE), on_step=steps.append,
                       cancelled=cancel)  # fmt: skip
    latency = time.monotonic() - cancel.set_at
    assert steps == [], "the first step finished before the cancel took effect"
    assert latency < CANCEL_BOUND_S, f"{latency:.2f} s from the cancel to the end of the window ({info.value})"


ACCELERATOR = torch.accelerator.current_accelerator() if torch.accelerator.is_available() else None


@pytest.mark.skipif(ACCELERATOR is None, reason="needs an accelerator (a GPU)")
def test_on_an_accelerator_a_cancel_leaves_only_a_few_blocks_of_queued_work(sd1, single_store):
    assert ACCELERATOR is not None
    cache = ModelCache(load_model, defaults=LoadOptions(device=ACCELERATOR.type), max_models=1)
    engine, cancel, steps = DenoiseEngine(single_store, cache), CancelInsideFirstStep(), []
    side = 2048  # 1024x1024 latents: a step of seconds on a GPU
    with pytest.raises(Cancelled, match="inside step 1 of 4"):
        engine.denoise(request(sd1, steps=4, width=side, height=side), on_step=steps.append, cancelled=cancel)
    torch.accelerator.synchronize()  # the device's queued work is done too
    latency = time.monotonic() - cancel.set_at
    assert steps == [], "the first step finished before the cancel took effect"
    assert latency < CANCEL_BOUND_S, f"{latency:.2f} s from the cancel to an idle device"


def test_a_deadline_passing_inside_a_step_stops_the_window(engine, sd1):
    engine.cache.load(sd1)  # loaded beforehand, so that the deadline passes in a step, not in the loading
    with pytest.raises(DeadlineExceeded, match=r"deadline passed inside step \d+ of 50"):
        engine.denoise(request(sd1, steps=50, width=LONG_SIDE, height=LONG_SIDE), deadline=time.monotonic() + 2.0)


def test_a_cancel_while_the_img2img_input_is_encoded_stops_the_window_there(engine, sd1, single_store):
    image = single_store.put_bytes(png(sample_image(64, 64)), media_type="image/png")
    # The first check of an img2img window is the VAE's encoder's, before step 1's.
    with pytest.raises(Cancelled, match="while the window prepared its inputs, before its first step"):
        engine.denoise(request(sd1, steps=4, image=image), cancelled=lambda: True)


# -- through the services: real processes ------------------------------------------------------
STEPS_DONE = "baton_denoise_steps_total"
WINDOWS_CANCELLED = 'baton_denoise_windows_total{outcome="cancelled"}'
# From the cancel to the next small job's first step: the cancel (one block), then that window's
# preparation and one 32x32-latent step; a safety bound, far below the cancelled window's 4 long steps.
NEXT_JOB_BOUND_S = 10.0


def job_spec(name: str, side: int, steps: int) -> jpb.JobSpec:
    return json_format.ParseDict(
        {"name": name, "seed": 1, "width": side, "height": side,
         "stages": [{"name": "draw", "denoise": {"model": "sd1", "prompt": "a cat", "steps": steps}}]},
        jpb.JobSpec(),
    )  # fmt: skip


def first(events, field: str) -> float:
    """When the first event with `field` came: a Denoise stream's "step", a Watch's "progress"."""
    for event in events:
        if event.HasField(field):
            return time.monotonic()
    raise AssertionError(f"the stream ended without a {field} event")


@pytest.fixture(scope="module")
def denoiser(redis_url, sd1, tmp_path_factory):
    env = {"BATON_MODELS": f"sd1={sd1}", "BATON_PRELOAD": "sd1"}
    proc = ServiceProcess("denoiser", redis_url, env, tmp_path_factory.mktemp("logs") / "denoiser.log")
    yield proc.wait_serving()
    proc.stop()


def test_cancelling_the_denoise_stream_frees_the_worker_inside_a_long_step(denoiser):
    stub = denoiser_pb2_grpc.DenoiserStub(denoiser.channel)
    before = denoiser.metrics()
    call = stub.Denoise(request("sd1", steps=4, width=LONG_SIDE, height=LONG_SIDE), timeout=300)
    assert next(call).status.phase == "preparing"  # it holds the worker's only slot
    time.sleep(1.0)  # well into its first step
    call.cancel()
    cancelled_at = time.monotonic()
    following = stub.Denoise(request("sd1", steps=2), timeout=300)
    waited = first(following, "step") - cancelled_at
    assert list(following)[-1].HasField("result")
    after = denoiser.metrics()
    assert after.get(WINDOWS_CANCELLED, 0) == before.get(WINDOWS_CANCELLED, 0) + 1
    assert after[STEPS_DONE] == before.get(STEPS_DONE, 0) + 2, "a step of the cancelled window finished"
    assert waited < NEXT_JOB_BOUND_S, f"the next window's first step came {waited:.1f} s after the cancel"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, sd1):
    c = Cluster(tmp_path_factory.mktemp("cancel-cluster"), {"sd1": sd1}, denoiser_env={"BATON_PRELOAD": "sd1"})
    yield c
    c.stop()


def test_a_job_cancelled_inside_its_first_long_step_lets_the_next_job_start_at_once(cluster):
    denoiser = cluster.denoisers[0]
    with cluster.client() as client:
        assert wait_for_job(client, client.submit(job_spec("warm", 64, 1)).id).state == jpb.JOB_STATE_SUCCEEDED
        before = denoiser.metrics()
        long = client.submit(job_spec("long", LONG_SIDE, 4))
        for event in client.watch(long.id):
            if event.HasField("stage") and event.stage.worker:  # its denoise call has started
                break
        time.sleep(1.0)  # well into its first step
        cancelled_at = time.monotonic()
        assert client.cancel(long.id, "changed my mind").state == jpb.JOB_STATE_CANCELLED
        small = client.submit(job_spec("small", 64, 2))
        waited = first(client.watch(small.id), "progress") - cancelled_at
        assert wait_for_job(client, small.id).state == jpb.JOB_STATE_SUCCEEDED
    after = denoiser.metrics()
    assert after[STEPS_DONE] == before[STEPS_DONE] + 2, "a step of the cancelled job finished"
    assert after.get(WINDOWS_CANCELLED, 0) == before.get(WINDOWS_CANCELLED, 0) + 1
    assert waited < NEXT_JOB_BOUND_S, f"the next job's first step came {waited:.1f} s after the cancel"
