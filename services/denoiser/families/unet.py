"""The denoise window for UNet families (SD 1.x/2.x, SDXL), step for step as diffusers runs it.

Inputs are prepared with the family's own diffusers pipelines (text-to-image, img2img,
inpaint: one set of weights shared through `from_pipe`), so each mode draws its noise and
encodes its images exactly as the matching diffusers pipeline does; the loop itself is ours,
so that it can stop at a window's end, report every step, and be cancelled between steps (and
inside them: interrupt.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

from services.common.latent_spaces import LatentSpace, get_space
from services.denoiser.batching import NetCall
from services.denoiser.checkpoints import resume_window
from services.denoiser.families.base import (
    CONTINUE,
    FROM_NOISE,
    IMG2IMG,
    PIPELINE_FOR_MODE,
    TXT2IMG,
    Family,
    StepHooks,
    WindowJob,
    WindowResult,
    generators,
    prompt_key,
)


@dataclass
class Inpainting:
    """What the inpaint loop needs besides the latents."""

    mask: torch.Tensor
    masked_image_latents: torch.Tensor | None
    image_latents: torch.Tensor | None
    noise: torch.Tensor


class UNetFamily(Family):
    space_id = "sd1"
    pipeline_classes: dict[str, Any] = {}

    # -- family specifics (sd1.py, sdxl.py) -----------------------------------------------
    def encode_prompt(self, pipe: Any, job: WindowJob, device: str, do_cfg: bool) -> tuple[torch.Tensor, Any]:
        """(prompt embeddings, family extras), both already doubled for classifier-free guidance."""
        raise NotImplementedError

    def added_cond(self, pipe: Any, extras: Any, job: WindowJob, size: tuple[int, int], do_cfg: bool) -> dict | None:
        return None

    def noise_image(self, pipe: Any, image: torch.Tensor, timestep: torch.Tensor, job: WindowJob, dtype, device, gen):
        """img2img: the image encoded by the VAE and noised to `timestep`."""
        return pipe.prepare_latents(image, timestep, job.num_images, 1, dtype, device, gen)

    # -- shared ----------------------------------------------------------------------------
    def latent_space(self, vae_config: dict) -> LatentSpace:
        return get_space(self.space_id).with_vae_config(vae_config)

    def pipeline(self, model: Any, mode: str) -> Any:
        kind = PIPELINE_FOR_MODE[mode]
        return model.window_pipe(kind, self.pipeline_classes[kind])

    def run(self, model: Any, job: WindowJob, hooks: StepHooks) -> WindowResult:
        device = model.device
        pipe = self.pipeline(model, job.mode)
        scheduler = job.scheduler
        # The pipeline's helpers (prepare_latents, add_noise) read pipe.scheduler; the model
        # lock makes this job its only user.
        pipe.scheduler = scheduler
        gen = generators(job)
        guidance = self.default_guidance(job.mode) if job.guidance_scale is None else job.guidance_scale
        do_cfg = guidance > 1 and pipe.unet.config.time_cond_proj_dim is None

        key = prompt_key(job, self.name, str(device), do_cfg)
        embeds, extras = model.prompts.encode(key, lambda: self.encode_prompt(pipe, job, device, do_cfg))
        dtype = embeds.dtype
        scheduler.set_timesteps(job.steps, device=device)
        begin, stop = self.window_indices(job, scheduler)
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(begin)
        if job.restore_state is not None:
            job.restore_state(scheduler)
        timesteps = scheduler.timesteps
        first = timesteps[begin : begin + 1].repeat(job.num_images)

        inpaint = None
        if job.mode == TXT2IMG:
            channels = pipe.unet.config.in_channels
            latents = pipe.prepare_latents(job.num_images, channels, job.height, job.width, dtype, device, gen)
        elif job.mode == FROM_NOISE:
            assert job.latents is not None
            latents = job.latents.to(device, dtype) * scheduler.init_noise_sigma
        elif job.mode == CONTINUE:
            assert job.latents is not None
            latents = job.latents.to(device, dtype)
        elif job.mode == IMG2IMG:
            latents = self.noise_image(pipe, self.img2img_input(model, pipe, job), first, job, dtype, device, gen)
        else:
            latents, inpaint = self.prepare_inpaint(model, pipe, job, first, dtype, device, gen, do_cfg)
        added = self.added_cond(pipe, extras, job, (job.height, job.width), do_cfg)
        timestep_cond = None
        if pipe.unet.config.time_cond_proj_dim is not None:  # guidance-distilled (LCM) UNets
            scale = torch.tensor(guidance - 1).repeat(job.num_images)
            timestep_cond = pipe.get_guidance_scale_embedding(
                scale, embedding_dim=pipe.unet.config.time_cond_proj_dim
            ).to(device=device, dtype=latents.dtype)
        extra_step = pipe.prepare_extra_step_kwargs(gen, 0.0)
        latents, skip = resume_window(job, hooks, scheduler, begin, stop, latents)

        window = timesteps[begin:stop]
        for i, t in enumerate(window[skip:], start=skip):
            hooks.before(i, len(window))
            x = torch.cat([latents] * 2) if do_cfg else latents
            x = scheduler.scale_model_input(x, t)
            if inpaint is not None and inpaint.masked_image_latents is not None:
                x = torch.cat([x, inpaint.mask, inpaint.masked_image_latents], dim=1)
            rows = {"sample": x, "timestep": t, "encoder_hidden_states": embeds, "timestep_cond": timestep_cond}
            noise_pred = hooks.forward(NetCall(pipe.unet, {**rows, "added_cond_kwargs": added}))
            if do_cfg:
                uncond, text = noise_pred.chunk(2)
                noise_pred = uncond + guidance * (text - uncond)
                if job.guidance_rescale > 0:
                    noise_pred = rescale_noise_cfg(noise_pred, text, guidance_rescale=job.guidance_rescale)
            latents = scheduler.step(noise_pred, t, latents, **extra_step, return_dict=False)[0]
            if inpaint is not None and inpaint.image_latents is not None:
                latents = self.blend(scheduler, inpaint, latents, window, i, do_cfg)
            hooks.after(i, len(window), float(t), latents, scheduler)
        return WindowResult(latents=latents, scheduler=scheduler, timesteps=timesteps, begin=begin, stop=stop)

    # -- inpainting ------------------------------------------------------------------------
    def prepare_inpaint(self, model, pipe, job, first, dtype, device, gen, do_cfg):
        init_image = pipe.image_processor.preprocess(job.image, height=job.height, width=job.width).to(torch.float32)
        unet_channels = pipe.unet.config.in_channels
        channels = pipe.vae.config.latent_channels
        strength_max = job.strength == 1.0 and job.latents is None
        latents, noise, *rest = pipe.prepare_latents(
            job.num_images,
            channels,
            job.height,
            job.width,
            dtype,
            device,
            gen,
            image=init_image,
            timestep=first,
            is_strength_max=strength_max,
            return_noise=True,
            return_image_latents=unet_channels == 4,
        )
        if job.latents is not None:  # continuing a partial inpaint: its latents, this mask
            latents = job.latents.to(device, dtype)
        mask_condition = pipe.mask_processor.preprocess(job.mask, height=job.height, width=job.width)
        masked_image = init_image * (mask_condition < 0.5)
        mask, masked_image_latents = pipe.prepare_mask_latents(
            mask_condition, masked_image, job.num_images, job.height, job.width, dtype, device, gen, do_cfg
        )
        return latents, Inpainting(
            mask=mask,
            masked_image_latents=masked_image_latents if unet_channels == 9 else None,
            image_latents=rest[0] if unet_channels == 4 else None,
            noise=noise,
        )

    @staticmethod
    def blend(scheduler, inpaint: Inpainting, latents, window, i: int, do_cfg: bool) -> torch.Tensor:
        """Keeps the unmasked area on the image's own noise path (diffusers' 4-channel inpainting)."""
        init_mask = inpaint.mask.chunk(2)[0] if do_cfg else inpaint.mask
        proper = inpaint.image_latents
        assert proper is not None
        if i < len(window) - 1:
            proper = scheduler.add_noise(proper, inpaint.noise, window[i + 1].reshape(1))
        return (1 - init_mask) * proper + init_mask * latents
