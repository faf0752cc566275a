"""The rules of a denoise window, on plain values: what a model can take, within the limits.

Fields are named as DenoiseStage and DenoiseRequest spell them. Each rule says why it exists
when the reason is not the bound itself.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from services.common.errors import InvalidArgument
from services.common.limits import Limits

PROMPTS = ("prompt", "negative_prompt", "prompt_2", "negative_prompt_2", "prompt_3", "negative_prompt_3")
# T5's longest sequence in SD3 and Flux.
MAX_SEQUENCE_LENGTH = 512


def cutoff(fraction: float, num_train_timesteps: int) -> int:
    """The training timestep at which `fraction` of the schedule is done (diffusers' denoising_end /
    denoising_start rule): a window ending at `fraction` keeps the timesteps at or above it, one
    starting there runs those strictly below it."""
    return round(num_train_timesteps - fraction * num_train_timesteps)


def finite(value: float, fld: str) -> None:
    if not math.isfinite(value):
        raise InvalidArgument(f"must be a finite number, got {value}", field=fld)


def check_steps(steps: int, limits: Limits) -> None:
    if not 0 < steps <= limits.max_steps:
        raise InvalidArgument(f"steps must be in 1..{limits.max_steps}, got {steps}", field="steps")


def check_window(start: float | None, end: float | None) -> tuple[float, float]:
    """[start, end) as fractions of the noise schedule; unset start 0 (or the latents' level), end 1."""
    for fld, value in (("denoising_start", start), ("denoising_end", end)):
        if value is not None and not 0.0 <= value <= 1.0:  # NaN fails this too
            raise InvalidArgument(f"{fld} must be in [0, 1], got {value}", field=fld)
    lo, hi = start or 0.0, 1.0 if end is None else end
    if lo >= hi:
        raise InvalidArgument(f"denoising_start ({lo}) must be below denoising_end ({hi})", field="denoising_start")
    return lo, hi


def check_strength(strength: float | None) -> None:
    if strength is not None and not 0.0 < strength <= 1.0:
        raise InvalidArgument(f"strength must be in (0, 1], got {strength}", field="strength")


def check_runs_a_step(steps: int, strength: float, flow: bool) -> None:
    """img2img runs int(steps x strength) steps (flow-matching pipelines: the unrounded count, so
    any strength runs one): fewer than one would hand the input back as if denoised."""
    if not flow and int(steps * strength) < 1:
        least = math.ceil(1 / strength) if strength > 0 else steps
        raise InvalidArgument(
            f"strength {strength} x {steps} steps runs no step; raise strength to at least {1 / steps:.3g} "
            f"or steps to at least {least}",
            field="strength",
        )


def check_guidance(guidance: float | None, rescale: float, limits: Limits) -> None:
    if guidance is not None and not abs(guidance) <= limits.max_guidance:
        raise InvalidArgument(
            f"guidance_scale must be finite and at most {limits.max_guidance:g} in size, got {guidance}",
            field="guidance_scale",
        )
    if not 0.0 <= rescale <= 1.0:
        raise InvalidArgument(f"guidance_rescale must be in [0, 1], got {rescale}", field="guidance_rescale")


def check_text(prompts: dict[str, str], max_sequence_length: int, limits: Limits) -> None:
    for fld, text in prompts.items():
        if len(text) > limits.max_prompt_chars:
            raise InvalidArgument(
                f"{len(text)} characters; prompts are limited to {limits.max_prompt_chars}", field=fld
            )
    if not 0 <= max_sequence_length <= MAX_SEQUENCE_LENGTH:
        raise InvalidArgument(
            f"max_sequence_length must be in 0..{MAX_SEQUENCE_LENGTH} (0 = the family's default), got "
            f"{max_sequence_length}",
            field="max_sequence_length",
        )


def check_preview_every(preview_every: int) -> None:
    if preview_every < 0:
        raise InvalidArgument(
            f"preview_every must be 0 (none) or a step count, got {preview_every}", field="preview_every"
        )


def check_num_images(num_images: int, limits: Limits) -> None:
    if not 0 <= num_images <= limits.max_num_images:
        raise InvalidArgument(
            f"num_images must be in 0..{limits.max_num_images} (0 = 1), got {num_images}", field="num_images"
        )


# LoRAs and embeddings a stage may bring: each costs a load the first time and a pass per layer.
MAX_ADAPTERS = 16
# A LoRA's weight beyond this is a typo: the adapter's change would swamp the model.
MAX_LORA_SCALE = 100.0


def check_adapters(body) -> None:
    """A stage's (or request's) `loras` and `textual_inversions`, as far as no file is read."""
    loras = [(lora.source, lora.scale if lora.HasField("scale") else None) for lora in body.loras]
    inversions = [(inversion.source, inversion.token) for inversion in body.textual_inversions]
    if len(loras) > MAX_ADAPTERS or len(inversions) > MAX_ADAPTERS:
        raise InvalidArgument(f"at most {MAX_ADAPTERS} LoRAs and {MAX_ADAPTERS} embeddings a stage", field="loras")
    for i, (source, scale) in enumerate(loras):
        if not source:
            raise InvalidArgument("a LoRA needs a source: a hub repo id, a folder or a .safetensors file",
                                  field=f"loras[{i}].source")  # fmt: skip
        if scale is not None:
            finite(scale, f"loras[{i}].scale")
            if abs(scale) > MAX_LORA_SCALE:
                raise InvalidArgument(
                    f"scale must be within ±{MAX_LORA_SCALE:g}, got {scale}", field=f"loras[{i}].scale"
                )
    for i, (source, token) in enumerate(inversions):
        if not source:
            raise InvalidArgument("an embedding needs a source", field=f"textual_inversions[{i}].source")
        if token and (token != token.strip() or " " in token):
            raise InvalidArgument(f"a token is one word, got {token!r}", field=f"textual_inversions[{i}].token")


def check_seeds(seeds: Sequence[int], seed: int | None, num_images: int, limits: Limits) -> None:
    """`seeds` draws image i from seeds[i]: with `seed` too, or a num_images of another count, the
    batch would be ambiguous."""
    if not seeds:
        return
    if seed is not None:
        raise InvalidArgument(
            "give either seed (every image from one seed) or seeds (one seed per image), not both", field="seeds"
        )
    if num_images and num_images != len(seeds):
        raise InvalidArgument(
            f"seeds lists {len(seeds)} seed(s) but num_images is {num_images}: leave num_images unset or make it "
            "the number of seeds",
            field="seeds",
        )
    if len(seeds) > limits.max_num_images:
        raise InvalidArgument(
            f"seeds lists {len(seeds)} seeds; a stage draws at most {limits.max_num_images} images", field="seeds"
        )


def check_batch(num_images: int, incoming: int, seeds: int = 0) -> int:
    """The window's batch: the incoming latents' (`incoming`, 0 when none), else num_images, else
    the number of `seeds` (check_seeds has made the two agree)."""
    if seeds and incoming and seeds != incoming:
        raise InvalidArgument(
            f"seeds lists {seeds} seed(s) but the latents hold a batch of {incoming}: continued latents keep their "
            "batch, one seed per image",
            field="seeds",
        )
    num_images = num_images or seeds
    if not incoming:
        return max(num_images, 1)
    if num_images and num_images != incoming:
        raise InvalidArgument(
            f"num_images is {num_images} but the latents hold a batch of {incoming}: continued latents keep "
            "their batch size",
            field="num_images",
        )
    return incoming


def check_sources(has_latents: bool, has_image: bool, has_mask: bool, start: float | None) -> None:
    """What a window starts from: latents, an image (img2img) or an image and mask (inpainting)."""
    if has_mask and not has_image:
        raise InvalidArgument("inpainting needs the image the mask applies to", field="image")
    if has_image and has_latents and not has_mask:
        raise InvalidArgument("give either an image or latents to start from, not both", field="image")
    if start and not has_latents:
        raise InvalidArgument(
            f"a window starting at {start} continues latents: give the latents of the stage that ran up to {start}",
            field="latents",
        )


def check_join(start: float | None, level: float) -> None:
    """A window continuing partly denoised latents begins at the level they were left at."""
    if start is not None and not math.isclose(start, level, abs_tol=1e-6):
        raise InvalidArgument(
            f"denoising_start {start} does not match the noise level the latents were left at ({level}); leave it "
            "unset to continue from there",
            field="denoising_start",
        )


def check_size(width: int, height: int, multiple: int, limits: Limits) -> None:
    for fld, value in (("width", width), ("height", height)):
        if value < multiple or value % multiple:
            raise InvalidArgument(
                f"{fld} {value} is not a positive multiple of {multiple}, which the model needs", field=fld
            )
    if width * height > limits.max_pixels:
        raise InvalidArgument(
            f"{width}x{height} is {width * height} pixels; images are limited to {limits.max_pixels} "
            "(the max-pixels setting)",
            field="width",
        )


def check_latent_elements(
    batch: int, channels: int, width: int, height: int, vae_scale_factor: int, limits: Limits
) -> None:
    """A batch's latents bound the worker's memory (activations grow with them): batch x channels x
    (height / f) x (width / f) values at most."""
    f = max(vae_scale_factor, 1)
    elements = batch * channels * (height // f) * (width // f)
    if elements > limits.max_latent_elements:
        raise InvalidArgument(
            f"{batch} image(s) of {width}x{height} make {elements} latent values; a batch is limited to "
            f"{limits.max_latent_elements} (the max-latent-elements setting): draw fewer images per stage",
            field="num_images",
        )


def window_start(start: float | None, level: float | None, from_image: bool) -> float | None:
    """Where the window begins given what it starts from (`level`: the incoming latents' noise
    level, None when unknown or none): partly denoised latents are continued from their level;
    img2img and inpainting begin where strength says."""
    if level is not None and 0.0 < level < 1.0:
        check_join(start, level)
        return level
    if start and (from_image or (level is not None and level >= 1.0)):
        raise InvalidArgument(
            "img2img and inpainting start where `strength` says; denoising_start continues partly denoised latents",
            field="denoising_start",
        )
    return start


def check_same_size(width: int, height: int, latents_width: int, latents_height: int) -> None:
    """Continued latents keep their size: a width or height set on the window must be theirs."""
    for fld, mine, theirs in (("width", width, latents_width), ("height", height, latents_height)):
        if mine and mine != theirs:
            raise InvalidArgument(f"{fld} {mine} differs from the latents' {theirs}", field=fld)
