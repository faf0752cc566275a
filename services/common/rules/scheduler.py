"""Which scheduler a window may name, with which options, and whether it may split.

Baton supports the schedulers of scheduler_caps' table: it knows how each splits. Any other
name, a typo, or an A1111/ComfyUI sampler name ("euler", "dpm++ 2m") is refused with the
closest supported class, and so is an option the class does not take. A partial window's
scheduler must split exactly, as configured: DPM++ with algorithm_type sde-dpmsolver++ draws
noise at every step, so it cannot, whatever its class can do by default.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Mapping
from typing import Any

from services.common.errors import FailedPrecondition, InvalidArgument
from services.common.scheduler_caps import KNOWN, NEVER, STATE, SchedulerCaps, capabilities
from services.common.scheduler_options import OPTIONS

SUPPORTED = tuple(sorted(KNOWN))
# Sampler names people bring from A1111 and ComfyUI, and the class each means here.
SAMPLER_NAMES = {
    "euler": "EulerDiscreteScheduler",
    "euler a": "EulerAncestralDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "euler_ancestral": "EulerAncestralDiscreteScheduler",
    "heun": "HeunDiscreteScheduler",
    "dpm2": "KDPM2DiscreteScheduler",
    "dpm2 a": "KDPM2AncestralDiscreteScheduler",
    "dpm2_ancestral": "KDPM2AncestralDiscreteScheduler",
    "dpm++ 2m": "DPMSolverMultistepScheduler",
    "dpmpp_2m": "DPMSolverMultistepScheduler",
    "dpm++ 2m karras": "DPMSolverMultistepScheduler",
    "dpm++ sde": "DPMSolverSDEScheduler",
    "dpmpp_sde": "DPMSolverSDEScheduler",
    "dpm++ 2s": "DPMSolverSinglestepScheduler",
    "lms": "LMSDiscreteScheduler",
    "ddim": "DDIMScheduler",
    "ddpm": "DDPMScheduler",
    "pndm": "PNDMScheduler",
    "plms": "PNDMScheduler",
    "unipc": "UniPCMultistepScheduler",
    "uni_pc": "UniPCMultistepScheduler",
    "deis": "DEISMultistepScheduler",
    "lcm": "LCMScheduler",
    "tcd": "TCDScheduler",
}


def suggest(word: str, choices: list[str] | tuple[str, ...] | frozenset[str]) -> str:
    """'; did you mean X?' for the choice closest to `word`, or ''."""
    by_lower = {c.lower(): c for c in choices}
    close = difflib.get_close_matches(word.lower(), list(by_lower), n=1, cutoff=0.6)
    return f"; did you mean {by_lower[close[0]]}?" if close else ""


def check_name(name: str) -> None:
    """A supported scheduler class name; else the closest one, or the class a sampler name means."""
    if name not in KNOWN:
        word = name.strip().lower()
        meant = SAMPLER_NAMES.get(word)
        if meant:
            hint = f"; {name!r} is {meant} here"
        else:  # "EulerScheduler" means Euler's class more likely than the closest spelling
            meant = SAMPLER_NAMES.get(word.removesuffix("scheduler").strip(" _-"))
            hint = f"; did you mean {meant}?" if meant else suggest(name, SUPPORTED)
        raise InvalidArgument(f"unknown scheduler {name!r}{hint}. Supported: {', '.join(SUPPORTED)}", field="scheduler")


def check_scheduler(name: str, config: Mapping[str, Any], partial: bool) -> SchedulerCaps:
    """How the window's scheduler splits; InvalidArgument for an unsupported name or option, or a
    partial window on a scheduler that cannot split as configured."""
    check_name(name)
    options = OPTIONS[name]
    for key, value in config.items():
        if key not in options:
            raise InvalidArgument(
                f"{name} has no option {key!r}{suggest(key, options)} (options: {', '.join(sorted(options))})",
                field=f"scheduler_config.{key}",
            )
        _check_value(key, value)
    caps = capabilities(name, config)
    if partial and caps.split == NEVER:
        raise InvalidArgument(caps.why, field="scheduler")
    return caps


def check_solver_history(caps: SchedulerCaps, has_state: bool, restart: bool) -> None:
    """A multistep scheduler continuing its own partly denoised latents needs the history it left
    (latents.scheduler.state) to continue exactly; without it, only `restart_solver_history` may go on."""
    if caps.split == STATE and not has_state and not restart:
        raise FailedPrecondition(
            f"the latents stand part way through a {caps.name} schedule but carry no scheduler state, so the "
            "continuation cannot be exact (a file from an older Baton or another tool?); write them with a Baton "
            "that keeps the state in the file, or set restart_solver_history to continue with the solver's "
            "history restarted",
            field="latents.scheduler.state",
        )


def _check_value(key: str, value: Any) -> None:
    """Options are numbers, booleans, strings or lists of numbers (trained_betas); all finite."""
    values = value if isinstance(value, list) else [value]
    for v in values:
        if isinstance(v, dict | list):
            raise InvalidArgument(
                "scheduler options are numbers, booleans, strings or lists of numbers", field=f"scheduler_config.{key}"
            )
        if isinstance(v, float) and not math.isfinite(v):
            raise InvalidArgument(f"must be finite, got {v}", field=f"scheduler_config.{key}")
