"""FLUX.1: a guidance-distilled MMDiT on 16-channel latents packed 2x2 into a token sequence.

Latents enter and leave as [B, 16, H, W]; packing into the transformer's [B, H*W/4, 64]
sequence happens only inside this file.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import torch
from diffusers import FluxImg2ImgPipeline, FluxInpaintPipeline, FluxPipeline
from diffusers.pipelines.flux.pipeline_flux import calculate_shift

from services.common.latent_spaces import LatentSpace, get_space
from services.denoiser.batching import NetCall
from services.denoiser.checkpoints import resume_window
from services.denoiser.families.base import (
    CONTINUE,
    FROM_NOISE,
    IMG2IMG,
    INPAINT,
    PIPELINE_FOR_MODE,
    TXT2IMG,
    StepHooks,
    WindowJob,
    WindowResult,
    generators,
    per_image,
    prompt_key,
)
from services.denoiser.families.flow import FlowFamily, FlowInpainting


class Flux(FlowFamily):
    name = "flux"
    pipeline_class = FluxPipeline
    pipeline_classes = {"txt2img": FluxPipeline, "img2img": FluxImg2ImgPipeline, "inpaint": FluxInpaintPipeline}
    pipeline_names = ("FluxPipeline", "FluxImg2ImgPipeline", "FluxInpaintPipeline")

    def latent_space(self, vae_config: dict) -> LatentSpace:
        return get_space("flux").with_vae_config(vae_config)

    def default_size(self, denoiser_config: dict, vae_scale_factor: int) -> tuple[int, int]:
        side = 128 * vae_scale_factor  # FluxPipeline.default_sample_size: the transformer config has none
        return side, side

    def mu(self, pipe: Any, job: WindowJob) -> float:
        """The resolution-dependent shift, or the producer's when continuing its schedule."""
        if job.mu is not None:
            return job.mu
        config = pipe.scheduler.config
        seq_len = (job.height // pipe.vae_scale_factor // 2) * (job.width // pipe.vae_scale_factor // 2)
        return calculate_shift(
            seq_len,
            config.get("base_image_seq_len", 256),
            config.get("max_image_seq_len", 4096),
            config.get("base_shift", 0.5),
            config.get("max_shift", 1.15),
        )

    def run(self, model: Any, job: WindowJob, hooks: StepHooks) -> WindowResult:
        device = model.device
        kind = PIPELINE_FOR_MODE[job.mode]
        pipe = model.window_pipe(kind, self.pipeline_classes[kind])
        scheduler = pipe.scheduler = job.scheduler
        self.check_scheduler(job, scheduler)
        gen = generators(job)
        guidance = self.default_guidance(job.mode) if job.guidance_scale is None else job.guidance_scale
        encode = functools.partial(
            pipe.encode_prompt,
            prompt=job.prompt,
            prompt_2=job.prompt_2 or None,
            device=device,
            num_images_per_prompt=job.num_images,
            max_sequence_length=job.max_sequence_length or 512,
        )
        embeds, pooled, text_ids = model.prompts.encode(prompt_key(job, self.name, str(device)), encode)
        dtype = embeds.dtype
        channels = pipe.transformer.config.in_channels // 4
        vsf = pipe.vae_scale_factor
        h, w = 2 * (job.height // (vsf * 2)), 2 * (job.width // (vsf * 2))
        if job.mode == TXT2IMG:
            latents, image_ids = pipe.prepare_latents(
                job.num_images, channels, job.height, job.width, dtype, device, gen
            )
        mu = self.mu(pipe, job)
        # FluxPipeline's own sigmas, unless the scheduler makes its own flow sigmas.
        # (DPM++ on flow sigmas takes no `sigmas` argument at all.)
        own_sigmas = scheduler.config.get("use_flow_sigmas")
        sigmas = {} if own_sigmas else {"sigmas": np.linspace(1.0, 1 / job.steps, job.steps)}
        scheduler.set_timesteps(job.steps, device=device, mu=mu, **sigmas)
        begin, stop = self.window_indices(job, scheduler)
        scheduler.set_begin_index(begin)
        if job.restore_state is not None:
            job.restore_state(scheduler)
        timesteps = scheduler.timesteps
        first = timesteps[begin : begin + 1].repeat(job.num_images)
        inpaint = None
        if job.mode in (FROM_NOISE, CONTINUE):
            assert job.latents is not None
            latents = pipe._pack_latents(job.latents.to(device, dtype), job.num_images, channels, h, w)
            image_ids = pipe._prepare_latent_image_ids(job.num_images, h // 2, w // 2, device, dtype)
        elif job.mode == IMG2IMG:
            image = per_image(self.img2img_input(model, pipe, job), gen)
            latents, image_ids = pipe.prepare_latents(
                image, first, job.num_images, channels, job.height, job.width, dtype, device, gen
            )
        elif job.mode == INPAINT:
            latents, image_ids, inpaint = self.prepare_inpaint(pipe, job, first, channels, dtype, device, gen)
        embedded = None
        if pipe.transformer.config.guidance_embeds:
            embedded = torch.full([1], guidance, device=device, dtype=torch.float32).expand(latents.shape[0])
        latents, skip = resume_window(job, hooks, scheduler, begin, stop, latents)  # packed, as the loop holds them
        window = timesteps[begin:stop]
        for i, t in enumerate(window[skip:], start=skip):
            hooks.before(i, len(window))
            timestep = t.expand(latents.shape[0]).to(latents.dtype)
            rows = {"hidden_states": latents, "timestep": timestep / 1000, "guidance": embedded}
            rows |= {"pooled_projections": pooled, "encoder_hidden_states": embeds}
            # The rotary ids are one [tokens, 3] tensor for every row: batchmates must have equal ones.
            v = hooks.forward(NetCall(pipe.transformer, rows, same={"txt_ids": text_ids, "img_ids": image_ids}))
            latents = scheduler.step(v, t, latents, return_dict=False)[0]
            if inpaint is not None:
                latents = inpaint.blend(scheduler, latents, timesteps, begin + i)
            preview = functools.partial(pipe._unpack_latents, latents, job.height, job.width, vsf)
            hooks.after(i, len(window), float(t), latents, scheduler, preview=preview)
        unpacked = pipe._unpack_latents(latents, job.height, job.width, vsf)
        return WindowResult(unpacked, scheduler, timesteps, begin, stop, mu=mu)

    def prepare_inpaint(
        self, pipe, job, first, channels, dtype, device, gen
    ) -> tuple[torch.Tensor, Any, FlowInpainting]:
        """Packed starting latents, image ids and the inpaint inputs, as FluxInpaintPipeline makes them: it
        keeps the unmasked area on the image's noise path after every step (a 64-channel transformer;
        FLUX.1 Fill's is another pipeline)."""
        image, mask_condition = self.inpaint_inputs(pipe, job)
        latents, noise, image_latents, image_ids = pipe.prepare_latents(
            image, first, job.num_images, channels, job.height, job.width, dtype, device, gen,
            self.inpaint_noise(job, device, dtype),
        )  # fmt: skip
        if job.latents is not None and job.window.start > 0:  # continuing a partial inpaint: its latents
            vsf = pipe.vae_scale_factor
            h, w = 2 * (job.height // (vsf * 2)), 2 * (job.width // (vsf * 2))
            latents = pipe._pack_latents(job.latents.to(device, dtype), job.num_images, channels, h, w)
        # The loop never reads the masked image's latents: handing the pipeline latents it already has
        # in their place (16 channels) skips a VAE encode that would come to nothing.
        unpacked = pipe._unpack_latents(image_latents, job.height, job.width, pipe.vae_scale_factor)
        mask, _ = pipe.prepare_mask_latents(
            mask_condition, unpacked, 1, channels, job.num_images, job.height, job.width, dtype, device, gen
        )
        return latents, image_ids, FlowInpainting(mask, image_latents, noise)
