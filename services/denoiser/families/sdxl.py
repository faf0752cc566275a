"""SDXL (and models built on it): two CLIP text encoders, size/crop conditioning, the sdxl space."""

from __future__ import annotations

from typing import Any

import torch
from diffusers import (
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLInpaintPipeline,
    StableDiffusionXLPipeline,
)

from services.common.latent_spaces import LatentSpace, get_space
from services.denoiser.families.base import TXT2IMG, WindowJob
from services.denoiser.families.unet import UNetFamily


class SDXL(UNetFamily):
    name = "sdxl"
    space_id = "sdxl"
    pipeline_class = StableDiffusionXLPipeline
    pipeline_classes = {
        "txt2img": StableDiffusionXLPipeline,
        "img2img": StableDiffusionXLImg2ImgPipeline,
        "inpaint": StableDiffusionXLInpaintPipeline,
    }
    pipeline_names = (
        "StableDiffusionXLPipeline",
        "StableDiffusionXLImg2ImgPipeline",
        "StableDiffusionXLInpaintPipeline",
    )

    def load(self, source: str, class_name: str, kwargs: dict[str, Any]) -> Any:
        # A refiner repo (img2img class, no first text encoder) loads as itself; from_pipe
        # derives the other modes from whatever was loaded.
        cls = next((c for c in self.pipeline_classes.values() if c.__name__ == class_name), self.pipeline_class)
        return cls.from_pretrained(source, **kwargs)

    def latent_space(self, vae_config: dict) -> LatentSpace:
        # Playground 2.5 is an SDXL pipeline whose VAE normalises latents per channel.
        if vae_config.get("latents_mean") is not None:
            return get_space("pg25").with_vae_config(vae_config)
        return super().latent_space(vae_config)

    def encode_prompt(self, pipe: Any, job: WindowJob, device: str, do_cfg: bool) -> tuple[torch.Tensor, Any]:
        embeds, negative, pooled, negative_pooled = pipe.encode_prompt(
            prompt=job.prompt,
            prompt_2=job.prompt_2 or None,
            device=device,
            num_images_per_prompt=job.num_images,
            do_classifier_free_guidance=do_cfg,
            negative_prompt=job.negative_prompt or None,
            negative_prompt_2=job.negative_prompt_2 or None,
        )
        if do_cfg:
            return torch.cat([negative, embeds]), (pooled, negative_pooled)
        return embeds, (pooled, negative_pooled)

    def added_cond(self, pipe: Any, extras: Any, job: WindowJob, size: tuple[int, int], do_cfg: bool) -> dict:
        pooled, negative_pooled = extras
        dtype = pooled.dtype
        if pipe.text_encoder_2 is None:
            projection_dim = int(pooled.shape[-1])
        else:
            projection_dim = pipe.text_encoder_2.config.projection_dim
        if job.mode == TXT2IMG or type(pipe) is StableDiffusionXLPipeline:
            time_ids = pipe._get_add_time_ids(
                size, (0, 0), size, dtype=dtype, text_encoder_projection_dim=projection_dim
            )
            negative_time_ids = time_ids
        else:  # img2img / inpaint pipelines condition on an aesthetic score when the model wants one
            time_ids, negative_time_ids = pipe._get_add_time_ids(
                size,
                (0, 0),
                size,
                6.0,
                2.5,
                size,
                (0, 0),
                size,
                dtype=dtype,
                text_encoder_projection_dim=projection_dim,
            )
        time_ids = time_ids.repeat(job.num_images, 1)
        text_embeds = pooled
        if do_cfg:
            negative_time_ids = negative_time_ids.repeat(job.num_images, 1)
            time_ids = torch.cat([negative_time_ids, time_ids])
            text_embeds = torch.cat([negative_pooled, pooled])
        device = pipe.unet.device
        return {"text_embeds": text_embeds.to(device), "time_ids": time_ids.to(device)}

    def noise_image(self, pipe: Any, image: torch.Tensor, timestep: torch.Tensor, job: WindowJob, dtype, device, gen):
        return pipe.prepare_latents(image, timestep, job.num_images, 1, dtype, device, gen, add_noise=True)
