"""SD 1.x / 2.x: one CLIP text encoder, a UNet, the sd1 latent space."""

from __future__ import annotations

from typing import Any

import torch
from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline, StableDiffusionPipeline

from services.denoiser.families.base import WindowJob
from services.denoiser.families.unet import UNetFamily


class SD1(UNetFamily):
    name = "sd1"
    space_id = "sd1"
    pipeline_class = StableDiffusionPipeline
    pipeline_classes = {
        "txt2img": StableDiffusionPipeline,
        "img2img": StableDiffusionImg2ImgPipeline,
        "inpaint": StableDiffusionInpaintPipeline,
    }
    pipeline_names = ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline", "StableDiffusionInpaintPipeline")

    def load(self, source: str, class_name: str, kwargs: dict[str, Any]) -> Any:
        # Baton hands back latents and images as they are; no safety checker is loaded.
        pipe = self.pipeline_classes["txt2img"].from_pretrained(
            source, safety_checker=None, requires_safety_checker=False, **kwargs
        )
        return pipe

    def encode_prompt(self, pipe: Any, job: WindowJob, device: str, do_cfg: bool) -> tuple[torch.Tensor, Any]:
        embeds, negative = pipe.encode_prompt(job.prompt, device, job.num_images, do_cfg, job.negative_prompt or None)
        if do_cfg:
            embeds = torch.cat([negative, embeds])
        return embeds, None
