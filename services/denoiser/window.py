"""DenoiseWindow: which steps of a schedule a stage runs, on diffusers' noise-level rule.

The split is on noise level, not step index (`cutoff = round(T - f * T)` training timesteps),
so models with different step counts hand off at the same level. A window that ends early
keeps the steps at or above the end cutoff; one that starts late keeps the steps below the
start cutoff (one more for second-order schedulers, so a split never falls between the two
halves of a step). These are StableDiffusionXL(Img2Img)Pipeline's `denoising_end` /
`denoising_start` rules, applied to every family.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from services.common.rules.denoise import check_strength, check_window, cutoff


@dataclass(frozen=True)
class DenoiseWindow:
    """Run the steps of [start, end) on the noise level of a `steps`-step schedule."""

    start: float = 0.0
    end: float = 1.0

    def __post_init__(self) -> None:
        check_window(self.start, self.end)

    @property
    def partial(self) -> bool:
        return self.start > 0.0 or self.end < 1.0

    def indices(self, timesteps: torch.Tensor, num_train_timesteps: int, order: int = 1) -> tuple[int, int]:
        """[begin, stop) indices into the scheduler's timesteps that this window runs."""
        begin = boundary(self.start, timesteps, num_train_timesteps, order) if self.start else 0
        return begin, max(self.stop(timesteps, num_train_timesteps, order), begin)

    def stop(self, timesteps: torch.Tensor, num_train_timesteps: int, order: int = 1) -> int:
        """The index this window stops before (the end of the schedule for end = 1)."""
        return boundary(self.end, timesteps, num_train_timesteps, order) if self.end < 1 else len(timesteps)


def boundary(fraction: float, timesteps: torch.Tensor, num_train_timesteps: int, order: int = 1) -> int:
    """The index where `fraction` of the schedule is done: one window stops and the next begins there."""
    return max(len(timesteps) - _steps_below(fraction, timesteps, num_train_timesteps, order), 0)


def _steps_below(fraction: float, timesteps: torch.Tensor, num_train_timesteps: int, order: int) -> int:
    """Steps left after `fraction` of the schedule: those below its cutoff, whole steps only.

    Second-order schedulers list every timestep but the first twice; an even count would cut a
    step between its two halves, so it takes one more. Using the same count for where one window
    ends and the next begins is what makes the two meet exactly (diffusers' own end rule,
    `count(ts >= cutoff)`, equals this for first-order schedulers but splits a Heun step).
    """
    n = int((timesteps < cutoff(fraction, num_train_timesteps)).sum().item())
    if order == 2 and n % 2 == 0:
        n += 1
    return n


def strength_begin(steps: int, strength: float, order: int = 1) -> int:
    """img2img: the index the schedule starts at for `strength` (diffusers' get_timesteps)."""
    check_strength(strength)
    init_timestep = min(int(steps * strength), steps)
    return max(steps - init_timestep, 0) * order


def flow_strength_begin(steps: int, strength: float, order: int = 1) -> int:
    """img2img start as the flow-matching pipelines (SD3, Flux) compute it: on the unrounded step count."""
    check_strength(strength)
    return int(max(steps - min(steps * strength, steps), 0)) * order
