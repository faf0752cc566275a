"""What the flow-matching families (SD3, Flux) share: their img2img and inpainting rules and 2x2 patch sizes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from services.common.errors import FailedPrecondition
from services.denoiser.families.base import IMG2IMG, INPAINT, Family, WindowJob
from services.denoiser.window import flow_strength_begin


@dataclass
class FlowInpainting:
    """What a flow inpaint loop needs besides the latents, in the form the loop holds them."""

    # 1 where the picture is repainted; one row per image (not doubled for guidance).
    mask: torch.Tensor
    # The image's latents and the noise the unmasked area is kept on (16-channel transformers).
    image_latents: torch.Tensor | None
    noise: torch.Tensor
    # Extra input channels of an inpainting transformer (SD3's 33-channel one): mask and masked
    # image latents, doubled for guidance as the transformer's input is.
    channels: tuple[torch.Tensor, torch.Tensor] | None = None

    def blend(self, scheduler: Any, latents: torch.Tensor, timesteps: torch.Tensor, index: int) -> torch.Tensor:
        """After the step at `index` of the whole schedule: the unmasked area put back on the image's
        noise path, as StableDiffusion3InpaintPipeline and FluxInpaintPipeline do."""
        proper = self.image_latents
        assert proper is not None
        # The next level of the whole schedule, not of the window: a window that ends early hands on
        # latents at that level. scale_noise reads it off the scheduler's step index.
        if index + 1 < len(timesteps):
            proper = scheduler.scale_noise(proper, timesteps[index + 1 : index + 2], self.noise)
        return (1 - self.mask) * proper + self.mask * latents


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

    @staticmethod
    def check_scheduler(job: WindowJob, scheduler: Any) -> None:
        """img2img and inpainting noise the image with the scheduler's scale_noise, which only the
        flow-matching schedulers have."""
        if job.mode in (IMG2IMG, INPAINT) and not hasattr(scheduler, "scale_noise"):
            raise FailedPrecondition(
                f"{type(scheduler).__name__} cannot noise an image for img2img or inpainting on a flow-matching "
                "model; use FlowMatchEulerDiscreteScheduler",
                field="scheduler",
            )

    @staticmethod
    def inpaint_inputs(pipe: Any, job: WindowJob) -> tuple[torch.Tensor, torch.Tensor]:
        """The image and mask as the inpaint pipelines preprocess them, at the window's size."""
        image = pipe.image_processor.preprocess(job.image, height=job.height, width=job.width)
        mask = pipe.mask_processor.preprocess(job.mask, height=job.height, width=job.width)
        return image.to(dtype=torch.float32), mask

    @staticmethod
    def inpaint_noise(job: WindowJob, device: Any, dtype: torch.dtype) -> torch.Tensor | None:
        """The `latents` argument of the inpaint pipelines: latents given at the start of an inpaint
        are its noise (the pipelines start from them as they are and keep the unmasked area on them).
        Latents that continue a partial inpaint are not: that window draws the first window's noise
        again from the seed and goes on from the latents."""
        if job.latents is None or job.window.start > 0:
            return None
        return job.latents.to(device, dtype)
