"""SD3 / SD3.5: an MMDiT transformer on 16-channel latents, three text encoders, flow matching."""

from __future__ import annotations

import functools
from typing import Any

import torch
from diffusers import StableDiffusion3Img2ImgPipeline, StableDiffusion3Pipeline
from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift

from services.common.errors import FailedPrecondition
from services.common.latent_spaces import LatentSpace, get_space
from services.denoiser.batching import NetCall
from services.denoiser.checkpoints import resume_window
from services.denoiser.families.base import (
    CONTINUE,
    FROM_NOISE,
    IMG2IMG,
    INPAINT,
    TXT2IMG,
    StepHooks,
    WindowJob,
    WindowResult,
    prompt_key,
)
from services.denoiser.families.flow import FlowFamily


class SD3(FlowFamily):
    name = "sd3"
    pipeline_class = StableDiffusion3Pipeline
    pipeline_classes = {"txt2img": StableDiffusion3Pipeline, "img2img": StableDiffusion3Img2ImgPipeline}
    pipeline_names = ("StableDiffusion3Pipeline", "StableDiffusion3Img2ImgPipeline")

    def latent_space(self, vae_config: dict) -> LatentSpace:
        return get_space("sd3").with_vae_config(vae_config)

    def schedule_kwargs(self, pipe: Any, job: WindowJob) -> dict:
        """set_timesteps arguments: the producer's mu, else the pipeline's own (dynamic shifting only)."""
        if job.mu is not None:
            return {"mu": job.mu}
        config = pipe.scheduler.config
        if not config.get("use_dynamic_shifting"):
            return {}
        patch = pipe.transformer.config.patch_size
        seq_len = (job.height // pipe.vae_scale_factor // patch) * (job.width // pipe.vae_scale_factor // patch)
        mu = calculate_shift(
            seq_len,
            config.get("base_image_seq_len", 256),
            config.get("max_image_seq_len", 4096),
            config.get("base_shift", 0.5),
            config.get("max_shift", 1.16),
        )
        return {"mu": mu}

    def run(self, model: Any, job: WindowJob, hooks: StepHooks) -> WindowResult:
        if job.mode == INPAINT:
            raise FailedPrecondition("inpainting is not supported for SD3 models yet", field="mask")
        device = model.device
        kind = "img2img" if job.mode in (IMG2IMG, CONTINUE) else "txt2img"
        pipe = model.window_pipe(kind, self.pipeline_classes[kind])
        scheduler = pipe.scheduler = job.scheduler
        gen = torch.Generator("cpu").manual_seed(job.seed)
        guidance = self.default_guidance(job.mode) if job.guidance_scale is None else job.guidance_scale
        do_cfg = guidance > 1
        encode = functools.partial(
            pipe.encode_prompt,
            prompt=job.prompt,
            prompt_2=job.prompt_2 or None,
            prompt_3=job.prompt_3 or None,
            device=device,
            num_images_per_prompt=job.num_images,
            do_classifier_free_guidance=do_cfg,
            negative_prompt=job.negative_prompt or None,
            negative_prompt_2=job.negative_prompt_2 or None,
            negative_prompt_3=job.negative_prompt_3 or None,
            max_sequence_length=job.max_sequence_length or 256,
        )
        key = prompt_key(job, self.name, str(device), do_cfg)
        embeds, negative, pooled, negative_pooled = model.prompts.encode(key, encode)
        if do_cfg:
            embeds, pooled = torch.cat([negative, embeds]), torch.cat([negative_pooled, pooled])
        dtype = embeds.dtype
        if job.mode == TXT2IMG:  # the pipeline draws its noise before it sets the schedule
            channels = pipe.transformer.config.in_channels
            latents = pipe.prepare_latents(job.num_images, channels, job.height, job.width, dtype, device, gen)
        kwargs = self.schedule_kwargs(pipe, job)
        scheduler.set_timesteps(job.steps, device=device, **kwargs)
        begin, stop = self.window_indices(job, scheduler)
        scheduler.set_begin_index(begin)
        if job.restore_state is not None:
            job.restore_state(scheduler)
        timesteps = scheduler.timesteps
        if job.mode in (FROM_NOISE, CONTINUE):  # flow matching: no init_noise_sigma to apply
            assert job.latents is not None
            latents = job.latents.to(device, dtype)
        elif job.mode == IMG2IMG:
            image = self.img2img_input(model, pipe, job)
            first = timesteps[begin : begin + 1].repeat(job.num_images)
            latents = pipe.prepare_latents(image, first, job.num_images, 1, dtype, device, gen)
        latents, skip = resume_window(job, hooks, scheduler, begin, stop, latents)
        window = timesteps[begin:stop]
        for i, t in enumerate(window[skip:], start=skip):
            hooks.before(i, len(window))
            x = torch.cat([latents] * 2) if do_cfg else latents
            rows = {"hidden_states": x, "timestep": t.expand(x.shape[0])}
            v = hooks.forward(
                NetCall(pipe.transformer, {**rows, "encoder_hidden_states": embeds, "pooled_projections": pooled})
            )
            if do_cfg:
                uncond, text = v.chunk(2)
                v = uncond + guidance * (text - uncond)
            latents = scheduler.step(v, t, latents, return_dict=False)[0]
            hooks.after(i, len(window), float(t), latents, scheduler)
        return WindowResult(latents, scheduler, timesteps, begin, stop, mu=kwargs.get("mu"))
