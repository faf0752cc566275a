"""What every model family gets from the engine, and what it gives back."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image

# The modes are the gateway's too; families import them from here.
from services.common.family_defaults import CONTINUE as CONTINUE
from services.common.family_defaults import DEFAULTS
from services.common.family_defaults import FROM_NOISE as FROM_NOISE
from services.common.family_defaults import IMG2IMG as IMG2IMG
from services.common.family_defaults import INPAINT as INPAINT
from services.common.family_defaults import TXT2IMG as TXT2IMG
from services.common.latent_spaces import LatentSpace
from services.denoiser.batching import NetCall
from services.denoiser.window import DenoiseWindow, strength_begin

if TYPE_CHECKING:
    from services.denoiser.checkpoints import Checkpoint


# The diffusers pipeline (a window_pipe kind) that prepares each mode's inputs.
PIPELINE_FOR_MODE = {
    TXT2IMG: "txt2img",
    FROM_NOISE: "txt2img",
    CONTINUE: "img2img",
    IMG2IMG: "img2img",
    INPAINT: "inpaint",
}


@dataclass
class WindowJob:
    """One window of one model's schedule, with every input resolved to tensors and images."""

    mode: str
    steps: int
    window: DenoiseWindow
    scheduler: Any
    # Restores a multistep scheduler's state after set_timesteps/set_begin_index, when given.
    restore_state: Callable[[Any], None] | None
    seed: int
    width: int
    height: int
    num_images: int = 1
    # One seed per image (DenoiseRequest.seeds), num_images of them; empty: all from `seed`.
    seeds: list[int] = field(default_factory=list)
    prompt: str = ""
    negative_prompt: str = ""
    prompt_2: str = ""
    negative_prompt_2: str = ""
    prompt_3: str = ""
    negative_prompt_3: str = ""
    guidance_scale: float | None = None
    guidance_rescale: float = 0.0
    max_sequence_length: int = 0
    # Model-space latents: initial noise (FROM_NOISE), part-way (CONTINUE, INPAINT), or
    # finished ones that img2img decodes with this model's VAE (IMG2IMG).
    latents: torch.Tensor | None = None
    image: Image.Image | None = None
    mask: Image.Image | None = None
    strength: float = 1.0
    # Flow-matching schedule shift the producer used (Flux's resolution-dependent mu): a
    # continuation reuses it so that both windows sit on one schedule.
    mu: float | None = None
    # An earlier attempt's checkpoint of this very window: the loop prepares everything as usual,
    # then goes on from there (checkpoints.resume_window).
    resume: Checkpoint | None = None


def generators(job: WindowJob) -> torch.Generator | list[torch.Generator]:
    """The job's noise source as diffusers' pipelines take it: one CPU generator for the batch, or
    one per image (`seeds`), each drawing what it would draw for a batch of one."""
    if job.seeds:
        return [torch.Generator("cpu").manual_seed(seed) for seed in job.seeds]
    return torch.Generator("cpu").manual_seed(job.seed)


def per_image(image: torch.Tensor, gen: torch.Generator | list[torch.Generator]) -> torch.Tensor:
    """img2img's image once per generator, so that image i is encoded with generator i (the flow
    pipelines' prepare_latents do not repeat it themselves)."""
    return image.repeat(len(gen), 1, 1, 1) if isinstance(gen, list) and image.shape[0] == 1 else image


def prompt_key(job: WindowJob, *more: object) -> tuple:
    """What a window's text encoding depends on (PromptCache's key, with the family and device)."""
    texts = (job.prompt, job.negative_prompt, job.prompt_2, job.negative_prompt_2, job.prompt_3, job.negative_prompt_3)
    return (*texts, job.max_sequence_length, job.num_images, *more)


@dataclass
class WindowResult:
    latents: torch.Tensor
    scheduler: Any
    # The whole schedule and the [begin, stop) part of it this window ran.
    timesteps: torch.Tensor
    begin: int
    stop: int
    mu: float | None = None


class StepHooks:
    """Called around every step: `before` may raise to cancel; `after` reports progress and checkpoints."""

    def before(self, index: int, total: int) -> None:
        pass

    def inside(self) -> None:
        """Called before every block of the window's networks (interrupt.py): may raise to cancel."""

    def forward(self, call: NetCall) -> torch.Tensor:
        """The denoising network's output for this step's call: alone here, or in a forward shared
        with the other windows in flight on the model (batching.py)."""
        return call.alone()

    def after(
        self,
        index: int,
        total: int,
        timestep: float,
        latents: torch.Tensor,
        scheduler: Any,
        preview: Callable[[], torch.Tensor] | None = None,
    ) -> None:
        """`latents` as the loop holds them and `scheduler` after the step: what a checkpoint saves;
        `preview` gives the [B, C, H, W] form when the loop holds another (Flux packs its latents)."""

    def resumed(self, step: int, total: int) -> None:
        """The window goes on after `step` of its `total` steps, from an earlier attempt's checkpoint."""


class Family:
    """A model family: how to load its pipelines and run a window of its schedule."""

    name: str = ""
    # Pipeline class for single-file loading and the default text-to-image runs.
    pipeline_class: Any = None
    pipeline_names: tuple[str, ...] = ()

    def load(self, source: str, class_name: str, kwargs: dict[str, Any]) -> Any:
        """The family's text-to-image pipeline from a folder or hub id."""
        return self.pipeline_class.from_pretrained(source, **kwargs)

    # Where the denoising network's config lives in a diffusers folder.
    denoiser_subfolder: str = "unet"

    def networks(self, model: Any) -> list[Any]:
        """What a window runs that can take long: the denoising network, and the VAE (img2img's input)."""
        return [getattr(model.pipe, self.denoiser_subfolder, None), getattr(model.pipe, "vae", None)]

    def latent_space(self, vae_config: dict) -> LatentSpace:
        """The model's latent space, with the constants its VAE config states."""
        raise NotImplementedError

    def default_size(self, denoiser_config: dict, vae_scale_factor: int) -> tuple[int, int]:
        """diffusers' default output size: the network's sample size in pixels."""
        side = int(denoiser_config["sample_size"]) * vae_scale_factor
        return side, side

    def default_guidance(self, mode: str) -> float:
        """diffusers' default guidance scale for the pipeline that runs `mode` (the gateway's table)."""
        return DEFAULTS[self.name].guidance_for(mode)

    def default_strength(self, mode: str) -> float:
        """diffusers' default strength for img2img / inpainting in this family."""
        return DEFAULTS[self.name].strength_for(mode)

    def size_multiple(self, vae_scale_factor: int) -> int:
        """Image sizes must be multiples of this (in pixels)."""
        return vae_scale_factor

    def window_indices(self, job: WindowJob, scheduler: Any) -> tuple[int, int]:
        """[begin, stop) of the schedule this job runs: from strength (img2img) or the window."""
        ts = scheduler.timesteps
        T = scheduler.config.num_train_timesteps
        if job.mode in (IMG2IMG, INPAINT) and job.window.start == 0.0:
            begin = self.strength_begin(job.steps, job.strength, scheduler.order)
            return begin, max(job.window.stop(ts, T, scheduler.order), begin)
        return job.window.indices(ts, T, scheduler.order)

    def strength_begin(self, steps: int, strength: float, order: int) -> int:
        """img2img: where the schedule starts for `strength` (UNet pipelines round the step count down)."""
        return strength_begin(steps, strength, order)

    def img2img_input(self, model: Any, pipe: Any, job: WindowJob) -> torch.Tensor:
        """The image to start from: the given one, or finished latents decoded by this model's VAE."""
        if job.image is not None:
            return pipe.image_processor.preprocess(job.image)
        from services.denoiser.vae import decode_to_tensor

        assert job.latents is not None
        return decode_to_tensor(model, job.latents)

    def run(self, model: Any, job: WindowJob, hooks: StepHooks) -> WindowResult:
        raise NotImplementedError
