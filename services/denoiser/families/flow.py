"""What the flow-matching families (SD3, Flux) share: their img2img rules and 2x2 patch sizes."""

from __future__ import annotations

from typing import Any

import torch

from services.denoiser.families.base import Family, WindowJob
from services.denoiser.window import flow_strength_begin


class FlowFamily(Family):
    denoiser_subfolder = "transformer"

    def size_multiple(self, vae_scale_factor: int) -> int:
        return vae_scale_factor * 2  # latents go through the transformer in 2x2 patches

    def strength_begin(self, steps: int, strength: float, order: int) -> int:
        return flow_strength_begin(steps, strength, order)

    def img2img_input(self, model: Any, pipe: Any, job: WindowJob) -> torch.Tensor:
        if job.image is not None:  # these pipelines resize the image to the requested size
            return pipe.image_processor.preprocess(job.image, height=job.height, width=job.width)
        return super().img2img_input(model, pipe, job)
