"""Which diffusers schedulers a denoise window may split, by class name and config: plain data.

The planner (gateway) and the denoiser both consult this table; it imports no diffusers.
A split is exact when the second window, on a fresh scheduler of the same class and config,
continues as the unsplit run would: always for stateless schedulers, and for multistep ones once
their history travels with the latents. Schedulers that draw noise in `step()` cannot split.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from services.common.errors import InvalidArgument

EXACT, STATE, NEVER = "exact", "state", "never"


@dataclass(frozen=True)
class SchedulerCaps:
    name: str
    split: str  # "exact" | "state" | "never"
    state: tuple[str, ...]  # attributes to carry across a split (split == "state")
    stochastic: bool  # step() draws noise: pass a generator for full runs
    why: str  # for "never": the reason, for the user


def _noisy(name: str, advice: str, how: str = "draws fresh noise at every step", setting: str = "") -> SchedulerCaps:
    why = f"{name}{setting} {how}, so a window boundary changes the result; {advice}"
    return SchedulerCaps(name, NEVER, (), True, why)


_SPLITTERS = "EulerDiscreteScheduler or DPMSolverMultistepScheduler"
# Stateless, but diffusers' window rule compares timesteps with cutoffs in 0..T: every step would land in one window.
_LOG_SIGMA = (
    "{} passes log-sigma noise conditioning as its timesteps, not 0..num_train_timesteps, so the noise-level "
    f"window rule cannot place a boundary; use {_SPLITTERS} to split"
)
_MULTISTEP = ("model_outputs", "lower_order_nums")
_TABLE = {
    caps.name: caps
    for caps in (
        SchedulerCaps("EulerDiscreteScheduler", EXACT, (), False, ""),
        SchedulerCaps("DDIMScheduler", EXACT, (), False, ""),
        SchedulerCaps("FlowMatchEulerDiscreteScheduler", EXACT, (), False, ""),
        # Second order: stateless between whole steps. A window must stop where the next begins (the start rule's
        # index); diffusers' denoising_end count can stop after a step's first half, which the next window repeats.
        SchedulerCaps("HeunDiscreteScheduler", EXACT, (), False, ""),
        SchedulerCaps("KDPM2DiscreteScheduler", EXACT, (), False, ""),
        SchedulerCaps("DPMSolverMultistepScheduler", STATE, _MULTISTEP, False, ""),
        SchedulerCaps("DEISMultistepScheduler", STATE, _MULTISTEP, False, ""),
        SchedulerCaps("DPMSolverSinglestepScheduler", STATE, ("model_outputs", "sample"), False, ""),
        SchedulerCaps(
            "UniPCMultistepScheduler",
            STATE,
            (*_MULTISTEP, "timestep_list", "last_sample", "this_order"),
            False,
            "",
        ),
        SchedulerCaps("LMSDiscreteScheduler", STATE, ("derivatives",), False, ""),
        SchedulerCaps("PNDMScheduler", STATE, ("ets", "counter", "cur_model_output", "cur_sample"), False, ""),
        SchedulerCaps("EDMEulerScheduler", NEVER, (), False, _LOG_SIGMA.format("EDMEulerScheduler")),
        _noisy("EulerAncestralDiscreteScheduler", f"use {_SPLITTERS} to split"),
        _noisy("KDPM2AncestralDiscreteScheduler", "use KDPM2DiscreteScheduler or DPMSolverMultistepScheduler to split"),
        _noisy("DPMSolverSDEScheduler", f"use {_SPLITTERS} to split", "draws Brownian-tree noise at every step"),
        _noisy("DDPMScheduler", "use DDIMScheduler to split", "adds fresh noise at every step (ancestral sampling)"),
        _noisy("LCMScheduler", "use one window for LCM models", "re-noises its estimate with fresh noise every step"),
        _noisy("TCDScheduler", "use one window for TCD models", "injects fresh noise at every step (gamma > 0)"),
    )
}


def capabilities(class_name: str, config: Mapping) -> SchedulerCaps:
    """How `class_name` configured by `config` splits across windows."""
    algorithm = str(config.get("algorithm_type", ""))
    if class_name.startswith("DPMSolver") and algorithm.startswith("sde-"):
        return _noisy(
            class_name, "use algorithm_type 'dpmsolver++' to split", setting=f" with algorithm_type={algorithm!r}"
        )
    if class_name == "FlowMatchEulerDiscreteScheduler" and config.get("stochastic_sampling"):
        return _noisy(class_name, "use stochastic_sampling=False to split", setting=" with stochastic_sampling")
    if class_name == "EulerDiscreteScheduler" and (
        config.get("timestep_type") == "continuous" and config.get("prediction_type") == "v_prediction"
    ):
        return SchedulerCaps(class_name, NEVER, (), False, _LOG_SIGMA.format(f"{class_name} with continuous timesteps"))
    if class_name in _TABLE:
        return _TABLE[class_name]
    return SchedulerCaps(class_name, NEVER, (), False, f"{class_name} is not known to split exactly")


def check_can_split(caps: SchedulerCaps, *, field: str = "scheduler") -> None:
    """Raise InvalidArgument when a partial window is asked of a scheduler that cannot split: the
    request cannot run as written, on any worker (the gateway refuses it alike at Submit)."""
    if caps.split == NEVER:
        raise InvalidArgument(caps.why, field=field)


KNOWN = frozenset(_TABLE)
