"""Encode (image -> model-space latents) and decode (latents -> image) with a model's own VAE."""

from __future__ import annotations

from typing import Any

import torch
from diffusers.image_processor import VaeImageProcessor
from PIL import Image

from services.common.errors import InvalidArgument


def _vae_dtype(model: Any) -> torch.dtype:
    # Some VAEs (SDXL's) overflow in float16 and say so with force_upcast.
    vae = model.pipe.vae
    if vae.dtype == torch.float16 and vae.config.get("force_upcast", False):
        return torch.float32
    return vae.dtype


def _processor(model: Any) -> VaeImageProcessor:
    return VaeImageProcessor(vae_scale_factor=model.vae_scale_factor)


@torch.no_grad()
def decode_to_tensor(model: Any, latents: torch.Tensor) -> torch.Tensor:
    """Model-space latents -> images in [-1, 1], [B, 3, H, W]."""
    vae = model.pipe.vae
    dtype = _vae_dtype(model)
    raw = model.space.to_raw(latents.to(model.device, torch.float32))
    vae.to(dtype=dtype)
    try:
        return vae.decode(raw.to(dtype), return_dict=False)[0]
    finally:
        vae.to(dtype=model.dtype)


def to_images(model: Any, pixels: torch.Tensor) -> list[Image.Image]:
    """Pixels [B, 3, H, W] in [-1, 1] -> B 8-bit RGB images, as the pipelines' postprocess makes them."""
    images = _processor(model).postprocess(pixels.float(), output_type="pil")
    return list(images)  # type: ignore[arg-type]  # a list of PIL images for output_type="pil"


def to_pixels(model: Any, image: Image.Image, *, width: int = 0, height: int = 0) -> torch.Tensor:
    """An image -> [1, 3, H, W] in [-1, 1], resized as the model's pipelines do."""
    multiple = model.vae_scale_factor
    if (width and width % multiple) or (height and height % multiple):
        raise InvalidArgument(f"width and height must be multiples of {multiple} for {model.name}", field="width")
    return _processor(model).preprocess(image.convert("RGB"), height=height or None, width=width or None)


@torch.no_grad()
def encode(model: Any, pixels: torch.Tensor, *, seed: int | None = None) -> torch.Tensor:
    """Pixels [B, 3, H, W] in [-1, 1] -> model-space latents: the distribution's mode, or a sample when seeded."""
    vae = model.pipe.vae
    dtype = _vae_dtype(model)
    vae.to(dtype=dtype)
    try:
        dist = vae.encode(pixels.to(model.device, dtype)).latent_dist
    finally:
        vae.to(dtype=model.dtype)
    # A CPU generator, as diffusers uses: the same seed samples the same latents on any device.
    raw = dist.mode() if seed is None else dist.sample(generator=torch.Generator("cpu").manual_seed(seed))
    return model.space.to_model(raw.float()).to(model.dtype)
