"""Latents processors in process (real Redis): each one's math, the noise formulas, URIs and chains."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, EulerDiscreteScheduler

from services.common.api.baton.v1 import handles_pb2 as pb
from services.common.api.baton.v1 import processor_pb2 as ppb
from services.common.errors import InvalidArgument
from services.processor.engine import ProcessorEngine
from services.processor.registry import REGISTRY, load_builtin, load_plugins

SD_BETAS = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000}


@pytest.fixture(scope="module")
def engine(single_store):
    load_builtin()
    return ProcessorEngine(single_store, "cpu")


def latents(store, space: str = "sd1", channels: int = 4, scheduler: str = "", config: dict | None = None, seed=1):
    t = torch.randn(1, channels, 16, 24, generator=torch.Generator().manual_seed(seed))
    spec = pb.SchedulerSpec(class_name=scheduler, config_json=json.dumps(config) if config else "", steps=10)
    handle = pb.LatentHandle(blob=store.put_tensor(t), space=space, scaling=pb.LATENT_SCALING_MODEL, width=48,
                             height=32, scheduler=spec, noise=pb.NoiseLevel(fraction=1.0), model="m")  # fmt: skip
    return t, handle


def run(engine, store, inputs: list[pb.LatentHandle], *uris: str) -> tuple[torch.Tensor, pb.LatentHandle]:
    reply = engine.process(ppb.ProcessRequest(inputs=inputs, processors=list(uris)))
    return store.get_tensor(reply.latents.blob), reply.latents


def test_scale_normalize_and_clamp(engine, single_store):
    t, h = latents(single_store)
    out, _ = run(engine, single_store, [h], "scale;factor=1.5;normalize=true;clamp-min=-1;clamp_max=2")
    torch.testing.assert_close(out, (t / t.std() * 1.5).clamp(-1, 2))


def test_a_chain_runs_in_order(engine, single_store):
    t, h = latents(single_store)
    out, _ = run(engine, single_store, [h], "scale;factor=2", "scale;clamp-max=0.5")
    torch.testing.assert_close(out, (t * 2).clamp(max=0.5))


def test_resize_by_scale_and_to_pixels(engine, single_store):
    t, h = latents(single_store)
    out, handle = run(engine, single_store, [h], "resize;scale=2;mode=bicubic")
    torch.testing.assert_close(out, F.interpolate(t, size=(32, 48), mode="bicubic", align_corners=False))
    assert (handle.width, handle.height) == (96, 64)  # 2 pixels per latent cell, read off the handle
    out, handle = run(engine, single_store, [h], "resize;width=24;height=8;mode=area")
    torch.testing.assert_close(out, F.interpolate(t, size=(4, 12), mode="area"))


def test_crop_takes_pixels_in_whole_cells(engine, single_store):
    t, h = latents(single_store)
    out, handle = run(engine, single_store, [h], "crop;left=4;top=2;width=20;height=10")
    assert torch.equal(out, t[..., 1:6, 2:12])
    assert (handle.width, handle.height) == (20, 10)
    with pytest.raises(InvalidArgument, match="multiples of 2"):
        run(engine, single_store, [h], "crop;left=3;width=20;height=10")


def test_blend_mixes_the_second_chains_result(engine, single_store):
    a, ha = latents(single_store, seed=1)
    b, hb = latents(single_store, seed=2)
    reply = engine.process(ppb.ProcessRequest(inputs=[ha, hb], processors=["blend;weight=0.25", "+", "scale;factor=2"]))
    torch.testing.assert_close(single_store.get_tensor(reply.latents.blob), 0.75 * a + 0.25 * (2 * b))
    assert len(reply.outputs) == 2
    torch.testing.assert_close(single_store.get_tensor(reply.outputs[1].blob), 2 * b)


def test_a_chain_count_that_does_not_match_the_inputs_is_an_error(engine, single_store):
    _, ha = latents(single_store)
    _, hb = latents(single_store, seed=2)
    with pytest.raises(InvalidArgument, match=r"1 processor chain\(s\) for 2 input\(s\)"):
        run(engine, single_store, [ha, hb], "scale;factor=2")


@pytest.mark.parametrize("space,scheduler,config", [
    ("sd1", "DDIMScheduler", {**SD_BETAS, "_class_name": "DDIMScheduler"}),
    ("sdxl", "", None),
])  # fmt: skip
def test_noise_on_a_ddpm_style_schedule_equals_the_schedulers_add_noise(engine, single_store, space, scheduler, config):
    t, h = latents(single_store, space, scheduler=scheduler, config=config)
    out, handle = run(engine, single_store, [h], "noise;timestep=600;seed=3")
    e = torch.randn(t.shape, generator=torch.Generator("cpu").manual_seed(3))
    expected = DDPMScheduler(**SD_BETAS).add_noise(t, e, torch.tensor([600]))
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)
    assert handle.noise.timestep == 600 and handle.noise.cutoff_timestep == 601
    assert handle.noise.fraction == pytest.approx(0.399) and handle.noise.sigma > 0


def test_noise_for_sigma_scaled_schedulers_equals_eulers_add_noise(engine, single_store):
    euler = EulerDiscreteScheduler(**SD_BETAS, timestep_spacing="leading", steps_offset=1)
    euler.set_timesteps(10)
    t_step = int(euler.timesteps[4])  # a timestep on the schedule: add_noise finds its sigma
    t, h = latents(single_store, scheduler="EulerDiscreteScheduler", config=dict(euler.config))
    out, handle = run(engine, single_store, [h], f"noise;timestep={t_step};seed=3")
    e = torch.randn(t.shape, generator=torch.Generator("cpu").manual_seed(3))
    torch.testing.assert_close(out, euler.add_noise(t, e, torch.tensor([t_step])), rtol=0, atol=1e-5)
    assert handle.noise.sigma == pytest.approx(float(euler.sigmas[4]), rel=1e-5)


@pytest.mark.parametrize("space", ["sd3", "flux"])
def test_noise_on_flow_matching_latents_mixes_toward_noise(engine, single_store, space):
    t, h = latents(single_store, space, channels=16, scheduler="FlowMatchEulerDiscreteScheduler")
    out, handle = run(engine, single_store, [h], "noise;timestep=700;seed=5")
    e = torch.randn(t.shape, generator=torch.Generator("cpu").manual_seed(5))
    torch.testing.assert_close(out, 0.3 * t + 0.7 * e, rtol=0, atol=1e-6)
    out, handle = run(engine, single_store, [h], "noise;sigma=0.25;seed=5")
    torch.testing.assert_close(out, 0.75 * t + 0.25 * e, rtol=0, atol=1e-6)
    assert handle.noise.timestep == pytest.approx(250) and handle.noise.fraction == pytest.approx(0.749)


def test_noise_drops_a_multistep_history(engine, single_store):
    _, h = latents(single_store, scheduler="DPMSolverMultistepScheduler", config=SD_BETAS)
    h.scheduler.state.CopyFrom(single_store.put_bytes(b"history"))
    _, handle = run(engine, single_store, [h], "noise;timestep=500")
    assert not handle.scheduler.state.key and handle.scheduler.class_name == "DPMSolverMultistepScheduler"


@pytest.mark.parametrize("uri,needles", [
    ("sharpen", ["unknown processor 'sharpen'", "noise", "scale"]),
    ("scale;strength=2", ["no argument 'strength'", "factor", "clamp-min", "model-offload"]),
    ("scale;factor=big", ["factor='big' is not a valid float"]),
    ("scale;factor=0", ["out of range [1e-12, inf]"]),
    ("noise;timestep=1200", ["timestep=1200 is out of range [0, 999]"]),
    ("resize;scale=2;mode=lanczos", ["choose one of nearest, bilinear, bicubic, area"]),
    ("crop;left=2", ["crop needs width"]),
    ("scale;factor", ["not arg=value"]),
])  # fmt: skip
def test_uri_errors_say_what_is_accepted(engine, single_store, uri, needles):
    _, h = latents(single_store)
    with pytest.raises(InvalidArgument) as info:
        run(engine, single_store, [h], uri)
    assert info.value.field == "processors"
    for needle in needles:
        assert needle in str(info.value)


def test_hyphenated_and_underscored_argument_names_are_the_same(engine, single_store):
    t, h = latents(single_store)
    a, _ = run(engine, single_store, [h], "scale;clamp-min=0")
    b, _ = run(engine, single_store, [h], "scale;clamp_min=0")
    assert torch.equal(a, b) and torch.equal(a, t.clamp(min=0))


def test_a_processor_from_another_module_registers_itself(engine, single_store):
    load_plugins("tests.plugin_processor")
    assert "invert" in REGISTRY
    t, h = latents(single_store)
    out, _ = run(engine, single_store, [h], "invert;gain=2")
    assert torch.equal(out, -2 * t)
