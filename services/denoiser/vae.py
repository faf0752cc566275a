"""Encode (image -> model-space latents) and decode (latents -> image) with a model's own VAE.

Each is a request's own part around one VAE call: latents (or pixels) to the VAE's input, and its
output back (pixels, or a posterior to latents). The call itself is a Forward, which the codec
shares among the requests pending at once on one model (codec.py); a window preparing img2img
calls decode_to_tensor alone, under the model's lock it holds.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from diffusers.image_processor import VaeImageProcessor
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
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


@contextlib.contextmanager
def upcast(model: Any) -> Iterator[None]:
    """The VAE in the dtype it runs in while the context lasts. The flip is in place, on weights
    every user of the model shares: callers hold the model's lock."""
    vae = model.pipe.vae
    dtype = _vae_dtype(model)
    if vae.dtype == dtype == model.dtype:  # nothing to flip or put back (and no diffusers warning about it)
        yield
        return
    vae.to(dtype=dtype)
    try:
        yield
    finally:
        vae.to(dtype=model.dtype)


class Forward:
    """A model's VAE `decode` or `encode` as a network a StepBatcher shares (codec.py): one call
    for every request in the batch, upcast once around it, under the model's lock (so it waits for
    a preparing window, which uses the VAE and flips its dtype too)."""

    def __init__(self, model: Any, method: str):
        self.model = model
        self.method = method

    def __call__(self, **kwargs: Any) -> Any:
        with self.model.lock, upcast(self.model):
            return getattr(self.model.pipe.vae, self.method)(**kwargs)


def decode_input(model: Any, latents: torch.Tensor) -> torch.Tensor:
    """Model-space latents -> the VAE decoder's input: raw latents on its device, in its dtype."""
    raw = model.space.to_raw(latents.to(model.device, torch.float32))
    return raw.to(_vae_dtype(model))


@torch.no_grad()
def decode_to_tensor(model: Any, latents: torch.Tensor) -> torch.Tensor:
    """Model-space latents -> images in [-1, 1], [B, 3, H, W], in one VAE call of their own (the
    caller holds the model's lock)."""
    z = decode_input(model, latents)
    with upcast(model):
        return model.pipe.vae.decode(z, return_dict=False)[0]


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


def encode_input(model: Any, pixels: torch.Tensor) -> torch.Tensor:
    """Pixels [B, 3, H, W] in [-1, 1] -> the VAE encoder's input: on its device, in its dtype."""
    return pixels.to(model.device, _vae_dtype(model))


def split_posterior(posterior: DiagonalGaussianDistribution, sizes: list[int]) -> list[DiagonalGaussianDistribution]:
    """A batch's posterior as each request's own: its rows of the parameters (mean and log-variance)."""
    return [DiagonalGaussianDistribution(part, posterior.deterministic) for part in posterior.parameters.split(sizes)]


@torch.no_grad()
def latents_of(model: Any, posterior: DiagonalGaussianDistribution, *, seed: int | None = None) -> torch.Tensor:
    """A request's posterior -> model-space latents: its mode, or a sample when seeded."""
    # A CPU generator, as diffusers uses: the same seed samples the same latents on any device.
    raw = posterior.mode() if seed is None else posterior.sample(generator=torch.Generator("cpu").manual_seed(seed))
    return model.space.to_model(raw.float()).to(model.dtype)
