"""Kolors: an SDXL UNet in SDXL's latent space, conditioned on one ChatGLM3 text encoder instead of two CLIPs.

Text-to-image and img2img are prepared by diffusers' Kolors pipelines. diffusers has no Kolors inpainting
pipeline; Kwai-Kolors' own is SDXL's inpainting pipeline over Kolors' components with Kolors' prompt encoding,
and so is this family's (SDXLInpaintForKolors). Kolors and SDXL share the sdxl space, so a Kolors window hands
its latents to an SDXL model (and back) with no interposer.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import KolorsImg2ImgPipeline, KolorsPipeline

# From its module, not diffusers' lazy top level, which type checkers read as a placeholder class.
from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl_inpaint import (
    StableDiffusionXLInpaintPipeline,
)

from services.common.errors import InvalidArgument
from services.denoiser.families.base import WindowJob
from services.denoiser.families.unet import UNetFamily

# KolorsPipeline's default and its ceiling: ChatGLM reads at most 256 prompt tokens there.
MAX_SEQUENCE_LENGTH = 256


class SDXLInpaintForKolors(StableDiffusionXLInpaintPipeline):
    """diffusers' SDXL inpainting pipeline over a Kolors pipeline's components, for its latents and masks.

    Kolors has no second text encoder: `from_pipe` leaves SDXL's `text_encoder_2`/`tokenizer_2` empty,
    which diffusers refuses unless told. The family encodes prompts with Kolors' rule, never this
    pipeline's encode_prompt (which expects CLIP encoders).
    """

    @classmethod
    def from_pipe(cls, pipeline: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("text_encoder_2", None)
        kwargs.setdefault("tokenizer_2", None)
        return super().from_pipe(pipeline, **kwargs)


class Kolors(UNetFamily):
    name = "kolors"
    space_id = "sdxl"
    pipeline_class = KolorsPipeline
    pipeline_classes = {
        "txt2img": KolorsPipeline,
        "img2img": KolorsImg2ImgPipeline,
        "inpaint": SDXLInpaintForKolors,
    }
    pipeline_names = ("KolorsPipeline", "KolorsImg2ImgPipeline")

    def encode_prompt(self, pipe: Any, job: WindowJob, device: str, do_cfg: bool) -> tuple[torch.Tensor, Any]:
        """ChatGLM's penultimate hidden states, pooled from the last token's final state: KolorsPipeline's rule,
        in every mode (the inpainting pipeline is SDXL's, so the rule is called on it, not taken from it)."""
        length = job.max_sequence_length or MAX_SEQUENCE_LENGTH
        if length > MAX_SEQUENCE_LENGTH:
            raise InvalidArgument(
                f"Kolors reads at most {MAX_SEQUENCE_LENGTH} prompt tokens; max_sequence_length must be in "
                f"0..{MAX_SEQUENCE_LENGTH} (0 = {MAX_SEQUENCE_LENGTH}), got {job.max_sequence_length}",
                field="max_sequence_length",
            )
        embeds, negative, pooled, negative_pooled = KolorsPipeline.encode_prompt(
            pipe,
            prompt=job.prompt,
            device=device,
            num_images_per_prompt=job.num_images,
            do_classifier_free_guidance=do_cfg,
            negative_prompt=job.negative_prompt or None,
            max_sequence_length=length,
        )
        if do_cfg:
            return torch.cat([negative, embeds]), (pooled, negative_pooled)
        return embeds, (pooled, negative_pooled)

    def added_cond(self, pipe: Any, extras: Any, job: WindowJob, size: tuple[int, int], do_cfg: bool) -> dict:
        """Size and crop time ids in every mode: Kolors' pipelines take no aesthetic score (SDXL's inpainting
        pipeline over Kolors, with requires_aesthetics_score off, builds the same ids)."""
        pooled, negative_pooled = extras
        time_ids = KolorsPipeline._get_add_time_ids(
            pipe, size, (0, 0), size, dtype=pooled.dtype, text_encoder_projection_dim=int(pooled.shape[-1])
        )
        time_ids = time_ids.repeat(job.num_images, 1)
        text_embeds = pooled
        if do_cfg:
            time_ids = torch.cat([time_ids, time_ids])
            text_embeds = torch.cat([negative_pooled, pooled])
        device = pipe.unet.device
        return {"text_embeds": text_embeds.to(device), "time_ids": time_ids.to(device)}
