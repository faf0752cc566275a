"""`noise`: add noise up to a noise level, on the schedule of the latents' own model.

The formula follows the scheduler the latents carry (so that the next denoise stage, which
continues on that scheduler, finds them where it expects): flow matching mixes
`(1 - s) x + s e`; schedulers that work on sigma-scaled samples (Euler, Heun, LMS, ...) add
`sigma e`; the others (DDIM, DPM++, UniPC, PNDM, ...) use DDPM's `sqrt(a) x + sqrt(1 - a) e`.
The new level is recorded in the handle: the next window starts at the first step at or below it.
"""

from __future__ import annotations

import json
import math
from typing import Any

import torch

from services.common.api.baton.v1 import handles_pb2 as pb
from services.common.errors import InvalidArgument
from services.processor.registry import Context, Latents, arg, processor

FLOW_SPACES = ("sd3", "flux", "flux2")
SIGMA_SCALED = (
    "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler",
    "HeunDiscreteScheduler",
    "KDPM2DiscreteScheduler",
    "KDPM2AncestralDiscreteScheduler",
    "LMSDiscreteScheduler",
    "DPMSolverSDEScheduler",
)
# SD 1.x/SDXL's training schedule, for latents that name no scheduler.
DEFAULT_BETAS = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
}


def alphas_cumprod(config: dict) -> torch.Tensor:
    from diffusers import DDPMScheduler

    keys = ("beta_start", "beta_end", "beta_schedule", "num_train_timesteps", "trained_betas")
    scheduler: Any = DDPMScheduler(**{k: config[k] for k in keys if config.get(k) is not None})
    return scheduler.alphas_cumprod


@processor(
    "noise",
    "add noise up to `timestep` (training units) or `sigma`, on the latents' own schedule",
    arg("timestep", "int", "", "noise level in training timesteps", min=0, max=999),
    arg("sigma", "float", "", "noise level as a sigma", min=0.0),
    arg("seed", "int", "0", "seed of the noise (a CPU generator, as diffusers draws it)", min=0),
)
def noise(ctx: Context, x: Latents, *, timestep, sigma, seed: int) -> Latents:
    if (timestep is None) == (sigma is None):
        raise InvalidArgument("noise takes one of timestep or sigma")
    spec = x.handle.scheduler
    config = json.loads(spec.config_json) if spec.config_json else {}
    T = int(config.get("num_train_timesteps") or 1000)
    latents = x.tensor.to(ctx.device, torch.float32)
    e = torch.randn(latents.shape, generator=torch.Generator("cpu").manual_seed(seed)).to(latents.device)
    if x.handle.space in FLOW_SPACES or "FlowMatch" in spec.class_name:
        s = float(sigma) if sigma is not None else timestep / T
        if not 0.0 <= s <= 1.0:
            raise InvalidArgument(f"flow-matching sigmas are in [0, 1], got {s}")
        out, level_t, level_sigma = (1 - s) * latents + s * e, s * T, s
    else:
        alphas = alphas_cumprod(config or DEFAULT_BETAS)
        sigmas = ((1 - alphas) / alphas) ** 0.5
        t = int(timestep) if timestep is not None else int((sigmas - float(sigma)).abs().argmin())
        level_sigma = float(sigma) if sigma is not None else float(sigmas[t])
        if spec.class_name in SIGMA_SCALED:
            out = latents + level_sigma * e
        else:
            a = 1.0 / (1.0 + level_sigma**2)
            out = math.sqrt(a) * latents + math.sqrt(1 - a) * e
        level_t = float(t)
    result = x.with_tensor(out.to(x.tensor.dtype))
    cutoff = math.floor(level_t) + 1  # the next window runs the steps at or below the level
    result.handle.noise.CopyFrom(
        pb.NoiseLevel(
            fraction=max(T - cutoff, 0) / T,
            cutoff_timestep=cutoff,
            timestep=level_t,
            sigma=level_sigma,
            num_train_timesteps=T,
        )
    )
    result.handle.scheduler.ClearField("state")  # a multistep history does not survive new noise
    return result
