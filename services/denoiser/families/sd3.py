"""SD3 / SD3.5: an MMDiT transformer on 16-channel latents, three text encoders, flow matching."""

from __future__ import annotations

import functools
from typing import Any

import torch
from diffusers import StableDiffusion3Img2ImgPipeline, StableDiffusion3InpaintPipeline, StableDiffusion3Pipeline
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


class SD3(FlowFamily):
    name = "sd3"
    pipeline_class = StableDiffusion3Pipeline
    pipeline_classes = {
        "txt2img": StableDiffusion3Pipeline,
        "img2img": StableDiffusion3Img2ImgPipeline,
        "inpaint": StableDiffusion3InpaintPipeline,
    }
    pipeline_names = ("StableDiffusion3Pipeline", "StableDiffusion3Img2ImgPipeline", "StableDiffusion3InpaintPipeline")

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
        device = model.device
        kind = PIPELINE_FOR_MODE[job.mode]
        pipe = model.window_pipe(kind, self.pipeline_classes[kind])
        scheduler = pipe.scheduler = job.scheduler
        self.check_scheduler(job, scheduler)
        gen = generators(job)
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
        first = timesteps[begin : begin + 1].repeat(job.num_images)
        inpaint = None
        if job.mode in (FROM_NOISE, CONTINUE):  # flow matching: no init_noise_sigma to apply
            assert job.latents is not None
            latents = job.latents.to(device, dtype)
        elif job.mode == IMG2IMG:
            image = per_image(self.img2img_input(model, pipe, job), gen)
            latents = pipe.prepare_latents(image, first, job.num_images, 1, dtype, device, gen)
        elif job.mode == INPAINT:
            latents, inpaint = self.prepare_inpaint(pipe, job, first, dtype, device, gen, do_cfg)
        latents, skip = resume_window(job, hooks, scheduler, begin, stop, latents)
        window = timesteps[begin:stop]
        for i, t in enumerate(window[skip:], start=skip):
            hooks.before(i, len(window))
            x = torch.cat([latents] * 2) if do_cfg else latents
            rows = {"hidden_states": x, "timestep": t.expand(x.shape[0])}
            if inpaint is not None and inpaint.channels is not None:
                rows["hidden_states"] = torch.cat([x, *inpaint.channels], dim=1)
            v = hooks.forward(
                NetCall(pipe.transformer, {**rows, "encoder_hidden_states": embeds, "pooled_projections": pooled})
            )
            if do_cfg:
                uncond, text = v.chunk(2)
                v = uncond + guidance * (text - uncond)
            latents = scheduler.step(v, t, latents, return_dict=False)[0]
            if inpaint is not None and inpaint.image_latents is not None:
                latents = inpaint.blend(scheduler, latents, timesteps, begin + i)
            hooks.after(i, len(window), float(t), latents, scheduler)
        return WindowResult(latents, scheduler, timesteps, begin, stop, mu=kwargs.get("mu"))

    def prepare_inpaint(self, pipe, job, first, dtype, device, gen, do_cfg) -> tuple[torch.Tensor, FlowInpainting]:
        """Starting latents and the inpaint inputs, drawn and encoded as StableDiffusion3InpaintPipeline does:
        a 16-channel transformer keeps the unmasked area on the image's noise path after every step; a
        33-channel (inpainting) one takes the mask and the masked image's latents as extra channels."""
        in_channels = pipe.transformer.config.in_channels
        if in_channels not in (16, 33):
            raise FailedPrecondition(
                f"SD3 inpainting takes a transformer with 16 input channels (blending) or 33 (an inpainting "
                f"model); this one has {in_channels}",
                field="mask",
            )
        blends = in_channels == 16
        image, mask_condition = self.inpaint_inputs(pipe, job)
        latents, noise, *image_latents = pipe.prepare_latents(
            job.num_images,
            pipe.vae.config.latent_channels,
            job.height,
            job.width,
            dtype,
            device,
            gen,
            self.inpaint_noise(job, device, dtype),
            image=image,
            timestep=first,
            # The pipeline's rule; it also makes a window continuing this inpaint draw from the
            # generator as the first window did (given the same strength).
            is_strength_max=job.strength == 1.0,
            return_noise=True,
            return_image_latents=blends,
        )
        if job.latents is not None and job.window.start > 0:  # continuing a partial inpaint: its latents
            latents = job.latents.to(device, dtype)
        # The blending loop never reads the masked image's latents: handing the pipeline latents it
        # already has in their place (16 channels) skips a VAE encode that would come to nothing.
        masked_image = image_latents[0] if blends else image * (mask_condition < 0.5)
        mask, masked_image_latents = pipe.prepare_mask_latents(
            mask_condition, masked_image, 1, job.num_images, job.height, job.width, dtype, device, gen, do_cfg
        )
        if blends:
            return latents, FlowInpainting(mask.chunk(2)[0] if do_cfg else mask, image_latents[0], noise)
        return latents, FlowInpainting(mask, None, noise, channels=(mask, masked_image_latents))
