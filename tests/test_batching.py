"""Step-level batching: windows in flight on one model share each step's forward, and each ends
as it would have alone (in process, real Redis, tiny models of every family).

Tolerance: a window's latents batched are within RELATIVE (1e-5) of their largest magnitude from
the same window alone. Not bit-exact, measured: CPU GEMM kernels pick another path by the number
of rows (the first difference is the UNet's time-embedding Linear at 6 rows against 2: 9e-8), so
a row's output depends on its batchmates in the last bits. Measured after 6 steps on 2 threads:
at most 3.5e-5 on latents of magnitude 17-32 (1.4e-6 relative) for sd1/sdxl with CFG, 3.5e-6 on
sd3, 7e-7 on flux; a window whose forward ran alone is bit-identical. Windows that end alone are
untouched by batching, and every single-window test against diffusers stays bit-exact.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from services.common.api.baton.v1 import denoiser_pb2 as dpb
from services.common.errors import Cancelled
from services.denoiser.batching import NetCall, StepBatcher, forward
from services.denoiser.cache import ModelCache
from services.denoiser.engine import DenoiseEngine
from services.denoiser.models import LoadOptions, load_model
from tests.denoise_kit import request

STEPS = 6
RELATIVE = 1e-5
# Flow models take DPM++ 2M on flow sigmas, as diffusers documents for flow-matching models.
FLOW_DPM = {"use_flow_sigmas": True, "prediction_type": "flow_prediction", "flow_shift": 3.0}
SCHEDULERS = {
    "euler": {"unet": ("EulerDiscreteScheduler", {}), "flow": ("FlowMatchEulerDiscreteScheduler", {})},
    "dpm++2m": {"unet": ("DPMSolverMultistepScheduler", {}), "flow": ("DPMSolverMultistepScheduler", FLOW_DPM)},
}


@pytest.fixture(scope="module")
def engine(single_store):
    cache = ModelCache(load_model, defaults=LoadOptions(), max_models=6)
    # The fill wait lets windows that start together share from their first step, as they would
    # on a busy worker; without it the first one in may finish a short window alone.
    return DenoiseEngine(single_store, cache, batch_wait_s=0.5)


@pytest.fixture(scope="module")
def paths(models, flow_models):
    return {"sd1": models["sd1"], "sdxl": models["sdxl"], "sd3": flow_models["sd3"], "flux": flow_models["flux"]}


def requests(path: str, family: str, scheduler: str) -> list[dpb.DenoiseRequest]:
    """Four windows that can share forwards: other prompts, seeds, guidance scales and windows."""
    name, config = SCHEDULERS[scheduler]["flow" if family in ("sd3", "flux") else "unet"]
    side = 128 if family == "flux" else 64
    common = {"steps": STEPS, "scheduler": name, "width": side, "height": side}
    if config:
        from google.protobuf.struct_pb2 import Struct

        struct = Struct()
        struct.update(config)
        common["scheduler_config"] = struct
    return [
        request(path, seed=1, prompt="a red fox", **common),
        request(path, seed=2, prompt="a lighthouse at dusk", guidance_scale=4.0, **common),
        request(path, seed=3, prompt="a red fox", denoising_end=0.5, **common),
        request(path, seed=4, prompt="snow", num_images=2, **common),
    ]


def result(engine: DenoiseEngine, req: dpb.DenoiseRequest, **kwargs) -> torch.Tensor:
    return engine.store.get_tensor(engine.denoise(req, **kwargs).blob)


def concurrently(engine: DenoiseEngine, reqs: list[dpb.DenoiseRequest]) -> list[torch.Tensor]:
    start = threading.Barrier(len(reqs))

    def one(req: dpb.DenoiseRequest) -> torch.Tensor:
        start.wait()
        return result(engine, req)

    with ThreadPoolExecutor(len(reqs)) as pool:
        return list(pool.map(one, reqs))


@pytest.mark.parametrize("scheduler", ["euler", "dpm++2m"])
@pytest.mark.parametrize("family", ["sd1", "sdxl", "sd3", "flux"])
def test_windows_batched_together_equal_each_window_run_alone(engine, paths, family, scheduler):
    reqs = requests(paths[family], family, scheduler)
    alone = [result(engine, r) for r in reqs]
    batcher = engine.batcher(engine.cache.load(paths[family]))
    forwards, calls = batcher.forwards, batcher.calls
    together = concurrently(engine, reqs)
    shared = (batcher.calls - calls) - (batcher.forwards - forwards)
    assert shared > 0, "no forward served two windows"
    for i, (a, b) in enumerate(zip(alone, together, strict=True)):
        difference = (a - b).abs().max().item()
        assert difference <= RELATIVE * a.abs().max().item(), f"window {i}: max difference {difference}"


def test_a_window_that_joins_mid_flight_and_one_cancelled_mid_flight_leave_the_others_unchanged(engine, paths):
    path = paths["sd1"]
    long = request(path, seed=11, prompt="a long window", steps=24, width=64, height=64)
    joiner = request(path, seed=12, prompt="joins late", steps=12, width=64, height=64)
    doomed = request(path, seed=13, prompt="cancelled", steps=24, width=64, height=64)
    alone = {"long": result(engine, long), "joiner": result(engine, joiner)}

    stepped = {name: threading.Event() for name in ("long5", "doomed3")}
    cancel = threading.Event()

    def watch(name: str, at: int):
        def on_step(event: dpb.StepEvent) -> None:
            if event.step == at:
                stepped[f"{name}{at}"].set()
            time.sleep(0.002)  # a little between-step work, as checkpoints and previews take

        return on_step

    with ThreadPoolExecutor(3) as pool:
        first = pool.submit(result, engine, long, on_step=watch("long", 5))
        stepped["long5"].wait(60)
        second = pool.submit(result, engine, joiner)
        third = pool.submit(result, engine, doomed, on_step=watch("doomed", 3), cancelled=cancel.is_set)
        stepped["doomed3"].wait(60)
        cancel.set()
        with pytest.raises(Cancelled):
            third.result(60)
        for name, future in (("long", first), ("joiner", second)):
            got, want = future.result(60), alone[name]
            assert (got - want).abs().max() <= RELATIVE * want.abs().max(), name


def test_forwards_of_other_shapes_or_guidance_modes_are_not_shared():
    net = torch.nn.Identity()

    class Echo(torch.nn.Module):
        def forward(self, sample, timestep, scale=None, return_dict=False):
            return (sample * 2 + timestep.reshape(-1, 1),)

    echo = Echo()
    a = NetCall(echo, {"sample": torch.ones(2, 3), "timestep": torch.tensor(1.0)})
    b = NetCall(echo, {"sample": torch.ones(1, 3), "timestep": torch.tensor(5.0)})
    c = NetCall(echo, {"sample": torch.ones(1, 4), "timestep": torch.tensor(5.0)})
    d = NetCall(echo, {"sample": torch.ones(1, 3), "timestep": torch.tensor(5.0), "scale": None})
    assert a.key() == b.key() != c.key() and b.key() != d.key() and net is not None
    ab = forward([a, b])  # per-row timesteps: a 0-d one is every row of its call
    assert torch.equal(ab[0], torch.full((2, 3), 3.0)) and torch.equal(ab[1], torch.full((1, 3), 7.0))


def test_a_batch_never_exceeds_the_sample_limit():
    from services.denoiser.batching import SampleBudget

    sizes = []

    class Count(torch.nn.Module):
        def forward(self, sample, return_dict=False):
            sizes.append(sample.shape[0])
            return (sample,)

    net = Count()
    batcher = StepBatcher(SampleBudget(max_samples=4))
    start = threading.Barrier(5)

    def window(rows: int) -> None:
        with batcher.window() as member:
            start.wait()
            for _ in range(3):
                member.forward(NetCall(net, {"sample": torch.zeros(rows, 2)}))

    with ThreadPoolExecutor(5) as pool:
        list(pool.map(window, [2, 2, 1, 3, 1]))
    assert max(sizes) <= 4 and sum(sizes) == 3 * 9
