"""Scheduler capabilities: which splits are exact, and the multistep state that makes them exact.

Runs a hand-written SD 1.x loop (hand_loop.md) over a tiny real pipeline: a window [start, end) on the noise
level, the second window on a FRESH scheduler built from the model's config, as another process would.
"""

from __future__ import annotations

import importlib.util
import itertools
import json

import pytest
import torch
from diffusers import StableDiffusionPipeline
from diffusers.utils.torch_utils import randn_tensor
from safetensors import safe_open
from safetensors.torch import load

from services.common.errors import FailedPrecondition, InvalidArgument
from services.denoiser.schedulers import (
    SchedulerCaps,
    capabilities,
    check_can_split,
    config_json,
    make_scheduler,
    restore_state,
    save_state,
    scheduler_class,
    scheduler_from_json,
)
from services.devkit.tiny_models import build_sd1

STEPS = 10
GUIDANCE = 5.0
SEED = 7
# LMSDiscreteScheduler is a diffusers dummy without scipy, which Baton does not depend on.
needs_scipy = pytest.mark.skipif(importlib.util.find_spec("scipy") is None, reason="LMSDiscreteScheduler needs scipy")

EXACT = [
    ("EulerDiscreteScheduler", {}),
    ("DDIMScheduler", {}),
    ("FlowMatchEulerDiscreteScheduler", {}),
    ("HeunDiscreteScheduler", {}),
    ("KDPM2DiscreteScheduler", {}),
]
STATEFUL = [
    ("DPMSolverMultistepScheduler", {}),
    ("DPMSolverMultistepScheduler", {"solver_order": 3}),
    ("UniPCMultistepScheduler", {}),
    ("DEISMultistepScheduler", {}),
    ("DPMSolverSinglestepScheduler", {}),
    pytest.param("LMSDiscreteScheduler", {}, marks=needs_scipy),
    ("PNDMScheduler", {}),  # Runge-Kutta warm-up, whose 4-call groups a boundary can cut
    ("PNDMScheduler", {"skip_prk_steps": True}),  # as SD 1.x ships it
]
NEVER = [
    "EulerAncestralDiscreteScheduler",
    "KDPM2AncestralDiscreteScheduler",
    "DPMSolverSDEScheduler",
    "DDPMScheduler",
    "LCMScheduler",
    "TCDScheduler",
    "EDMEulerScheduler",
]


# diffusers' schedulers trip numpy 2 deprecation warnings by the thousand.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Results differ by ~1e-6 across torch thread counts, and these tests compare bits."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    """The tiny pipeline and its CFG condition [negative, positive]."""
    pipe = StableDiffusionPipeline.from_pretrained(build_sd1(tmp_path_factory.mktemp("sd1")))
    with torch.no_grad():
        positive, negative = pipe.encode_prompt("a photo of a cat", "cpu", 1, True, "")
    return pipe, torch.cat([negative, positive])


def window_indices(scheduler, start: float, end: float) -> tuple[int, int]:
    """[begin, stop) of the window on diffusers' noise-level rule; an order-2 window stops where the next begins."""
    ts, total = scheduler.timesteps, scheduler.config.num_train_timesteps

    def below(fraction: float) -> int:
        n = int((ts < round(total - fraction * total)).sum())
        return n + 1 if scheduler.order == 2 and n % 2 == 0 else n

    # For first-order schedulers len - below(end) is count(ts >= cutoff), diffusers' denoising_end rule; for
    # order 2 that count can end on the first half of a step, which the next window's begin would repeat.
    return (0 if start == 0 else len(ts) - below(start)), (len(ts) if end == 1 else len(ts) - below(end))


def denoise(pipe, cond, scheduler, latents, begin: int, stop: int) -> torch.Tensor:
    """Steps [begin, stop) of the hand loop: scale, UNet on [uncond, cond], CFG, scheduler step."""
    with torch.no_grad():
        for t in scheduler.timesteps[begin:stop]:
            x = torch.cat([latents] * 2)
            if hasattr(scheduler, "scale_model_input"):  # flow-matching schedulers have none
                x = scheduler.scale_model_input(x, t)
            uncond, text = pipe.unet(x, t, encoder_hidden_states=cond, return_dict=False)[0].chunk(2)
            latents = scheduler.step(uncond + GUIDANCE * (text - uncond), t, latents, return_dict=False)[0]
    return latents


def run(sd1, name: str, overrides: dict, bounds: tuple[float, ...], carry_state: bool = True) -> torch.Tensor:
    """Denoise through windows between `bounds`, each on a fresh scheduler; state travels as bytes when asked."""
    pipe, cond = sd1
    caps = capabilities(name, {**pipe.scheduler.config, **overrides})
    latents = randn_tensor((1, 4, 32, 32), generator=torch.Generator("cpu").manual_seed(SEED), dtype=torch.float32)
    blob = None
    for start, end in itertools.pairwise(bounds):
        scheduler = make_scheduler(name, pipe.scheduler.config, overrides)
        scheduler.set_timesteps(STEPS)
        begin, stop = window_indices(scheduler, start, end)
        if start > 0:
            if hasattr(scheduler, "set_begin_index"):  # DDIM and PNDM step by the timestep they are given
                scheduler.set_begin_index(begin)
            if blob is not None:
                restore_state(scheduler, caps, blob)
        else:
            latents = latents * getattr(scheduler, "init_noise_sigma", 1.0)
        latents = denoise(pipe, cond, scheduler, latents, begin, stop)
        blob = save_state(scheduler, caps) if carry_state else None
    return latents


@pytest.fixture(scope="module")
def unsplit(sd1):
    """The one-window result per scheduler, computed once."""
    cache: dict[str, torch.Tensor] = {}

    def get(name: str, overrides: dict) -> torch.Tensor:
        key = name + json.dumps(overrides, sort_keys=True)
        if key not in cache:
            cache[key] = run(sd1, name, overrides, (0.0, 1.0))
        return cache[key]

    return get


@pytest.mark.parametrize(("name", "overrides"), EXACT)
def test_stateless_schedulers_split_bit_exactly_on_a_fresh_scheduler(sd1, unsplit, name, overrides):
    caps = capabilities(name, {})
    assert (caps.split, caps.state) == ("exact", ())
    expected = unsplit(name, overrides)
    assert torch.equal(run(sd1, name, overrides, (0.0, 0.6, 1.0), carry_state=False), expected)
    assert torch.equal(run(sd1, name, overrides, (0.0, 0.3, 0.7, 1.0), carry_state=False), expected)


@pytest.mark.parametrize(("name", "overrides"), STATEFUL)
def test_multistep_schedulers_split_bit_exactly_when_their_state_travels(sd1, unsplit, name, overrides):
    assert capabilities(name, overrides).split == "state"
    assert torch.equal(run(sd1, name, overrides, (0.0, 0.6, 1.0)), unsplit(name, overrides))


@pytest.mark.parametrize(("name", "overrides"), STATEFUL)
def test_multistep_schedulers_lose_exactness_without_their_state(sd1, unsplit, name, overrides):
    split = run(sd1, name, overrides, (0.0, 0.6, 1.0), carry_state=False)
    assert (split - unsplit(name, overrides)).abs().max() > 1e-4


@pytest.mark.parametrize(
    ("name", "overrides"),
    [
        ("DPMSolverMultistepScheduler", {}),
        ("UniPCMultistepScheduler", {}),
        ("PNDMScheduler", {}),
        pytest.param("LMSDiscreteScheduler", {}, marks=needs_scipy),
    ],
)
def test_state_carries_through_three_windows(sd1, unsplit, name, overrides):
    assert torch.equal(run(sd1, name, overrides, (0.0, 0.3, 0.7, 1.0)), unsplit(name, overrides))


def _dpm_state_after_three_steps(sd1) -> tuple[object, bytes]:
    pipe, cond = sd1
    scheduler = make_scheduler("DPMSolverMultistepScheduler", pipe.scheduler.config)
    scheduler.set_timesteps(STEPS)
    denoise(pipe, cond, scheduler, torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(0)), 0, 3)
    blob = save_state(scheduler, capabilities("DPMSolverMultistepScheduler", {}))
    assert blob is not None
    return scheduler, blob


def test_state_is_a_safetensors_file_with_json_structure(sd1, tmp_path):
    scheduler, blob = _dpm_state_after_three_steps(sd1)
    tensors = load(blob)  # safetensors parses it: tensors and a JSON header, nothing to unpickle
    assert sorted(tensors) == ["model_outputs.0", "model_outputs.1"]
    assert torch.equal(tensors["model_outputs.1"], scheduler.model_outputs[1])
    (tmp_path / "state.safetensors").write_bytes(blob)
    with safe_open(tmp_path / "state.safetensors", "pt") as f:
        header = json.loads(f.metadata()["baton"])
    assert header["class"] == "DPMSolverMultistepScheduler"
    assert header["state"]["lower_order_nums"] == {"value": 2}
    assert header["step_index"] == 3


def test_state_round_trips_none_numbers_and_tensors_with_their_dtypes(sd1):
    pipe, _ = sd1
    names = ("listed", "count", "ratio", "flag", "nothing", "scalar", "half")
    caps = SchedulerCaps("EulerDiscreteScheduler", "state", names, False, "")
    values = {
        "listed": [None, torch.tensor([-0.0, float("nan"), float("inf")], dtype=torch.bfloat16), [3, None]],
        "count": 2,
        "ratio": 0.1,
        "flag": True,
        "nothing": None,
        "scalar": torch.tensor(981, dtype=torch.int64),
        "half": torch.randn(2, 3, dtype=torch.float16).t(),  # not contiguous
    }
    source = make_scheduler("EulerDiscreteScheduler", pipe.scheduler.config)
    for name, value in values.items():
        setattr(source, name, value)
    target = make_scheduler("EulerDiscreteScheduler", pipe.scheduler.config)
    restore_state(target, caps, save_state(source, caps))
    assert target.listed[0] is None and target.listed[2] == [3, None]
    assert target.listed[1].dtype == torch.bfloat16
    assert target.listed[1].view(torch.int16).tolist() == values["listed"][1].view(torch.int16).tolist()
    assert (target.count, target.ratio, target.flag, target.nothing) == (2, 0.1, True, None)
    assert type(target.count) is int and type(target.flag) is bool
    assert target.scalar.dtype == torch.int64 and target.scalar.shape == () and target.scalar.item() == 981
    assert target.half.dtype == torch.float16 and torch.equal(target.half, values["half"])


def test_stateless_schedulers_save_no_state(sd1):
    scheduler = make_scheduler("EulerDiscreteScheduler", sd1[0].scheduler.config)
    assert save_state(scheduler, capabilities("EulerDiscreteScheduler", {})) is None


def test_restore_refuses_state_of_another_scheduler_class(sd1):
    _, blob = _dpm_state_after_three_steps(sd1)
    unipc = make_scheduler("UniPCMultistepScheduler", sd1[0].scheduler.config)
    unipc.set_timesteps(STEPS)
    with pytest.raises(FailedPrecondition, match="saved by DPMSolverMultistepScheduler"):
        restore_state(unipc, capabilities("UniPCMultistepScheduler", {}), blob)


def test_restore_refuses_state_saved_at_another_step(sd1):
    _, blob = _dpm_state_after_three_steps(sd1)
    scheduler = make_scheduler("DPMSolverMultistepScheduler", sd1[0].scheduler.config)
    scheduler.set_timesteps(STEPS)
    scheduler.set_begin_index(4)
    with pytest.raises(FailedPrecondition, match="saved after step 3, but this window begins at step 4"):
        restore_state(scheduler, capabilities("DPMSolverMultistepScheduler", {}), blob)


@pytest.mark.parametrize("name", NEVER)
def test_schedulers_that_cannot_split_are_refused_with_the_reason(name):
    caps = capabilities(name, {})
    assert caps.split == "never"
    with pytest.raises(InvalidArgument, match=name) as refused:
        check_can_split(caps)
    assert refused.value.code == "INVALID_ARGUMENT" and refused.value.field == "scheduler"
    assert "noise" in refused.value.detail and "use " in refused.value.detail


def test_sde_algorithm_types_are_refused_but_the_default_splits():
    check_can_split(capabilities("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}))
    for name in ("DPMSolverMultistepScheduler", "DPMSolverSinglestepScheduler"):
        caps = capabilities(name, {"algorithm_type": "sde-dpmsolver++"})
        assert caps.stochastic
        with pytest.raises(InvalidArgument, match="sde-dpmsolver\\+\\+"):
            check_can_split(caps)


@pytest.mark.parametrize(
    ("name", "config"),
    [
        ("FlowMatchEulerDiscreteScheduler", {"stochastic_sampling": True}),
        ("EulerDiscreteScheduler", {"timestep_type": "continuous", "prediction_type": "v_prediction"}),
    ],
)
def test_configs_that_make_a_splittable_scheduler_unsplittable_are_refused(name, config):
    check_can_split(capabilities(name, {}))
    with pytest.raises(InvalidArgument, match=name):
        check_can_split(capabilities(name, config))


def test_ancestral_schedulers_are_flagged_stochastic():
    assert capabilities("EulerAncestralDiscreteScheduler", {}).stochastic
    assert not capabilities("EulerDiscreteScheduler", {}).stochastic


def test_other_diffusers_schedulers_are_not_known_to_split():
    caps = capabilities("DDIMInverseScheduler", {})
    assert (caps.split, caps.why) == ("never", "DDIMInverseScheduler is not known to split exactly")


def test_unknown_scheduler_names_suggest_the_closest_supported_one():
    with pytest.raises(InvalidArgument, match="unknown scheduler 'EulerScheduler'") as refused:
        scheduler_class("EulerScheduler")
    assert "did you mean EulerDiscreteScheduler?" in str(refused.value)
    supported = str(refused.value).split("Supported: ")[1].split(", ")
    assert supported == sorted(supported) and "EulerDiscreteScheduler" in supported
    assert "SchedulerMixin" not in supported and "DDIMInverseScheduler" not in supported
    with pytest.raises(InvalidArgument):
        scheduler_class("SchedulerMixin")


def test_unknown_override_keys_are_named_with_the_accepted_ones(sd1):
    with pytest.raises(InvalidArgument, match=r"no option 'solver_ordr'; accepted: .*solver_order"):
        make_scheduler("DPMSolverMultistepScheduler", sd1[0].scheduler.config, {"solver_ordr": 3})


def test_overrides_win_over_keys_a_model_config_leaves_at_default():
    # Hub configs (SD 1.5's) omit keys such as prediction_type; diffusers lists them in `_use_default_values`, and
    # from_config drops those keys even when an override is merged into the config by hand.
    base = make_scheduler("PNDMScheduler", {"beta_schedule": "scaled_linear", "skip_prk_steps": True}).config
    assert "prediction_type" in base["_use_default_values"]
    dpm = make_scheduler("DPMSolverMultistepScheduler", base, {"prediction_type": "v_prediction"})
    assert (dpm.config.prediction_type, dpm.config.beta_schedule) == ("v_prediction", "scaled_linear")


def test_config_json_round_trips_and_compares(sd1):
    dpm = make_scheduler("DPMSolverMultistepScheduler", sd1[0].scheduler.config, {"solver_order": 3})
    text = config_json(dpm)
    assert json.loads(text)["_class_name"] == "DPMSolverMultistepScheduler"
    assert not [k for k in json.loads(text) if k.startswith("_") and k != "_class_name"]
    rebuilt = scheduler_from_json("DPMSolverMultistepScheduler", text)
    assert config_json(rebuilt) == text
    assert config_json(make_scheduler("DPMSolverMultistepScheduler", sd1[0].scheduler.config)) != text
    with pytest.raises(InvalidArgument):
        scheduler_from_json("UniPCMultistepScheduler", text)
