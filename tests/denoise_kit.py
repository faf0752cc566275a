"""Shared pieces of the denoiser tests: tiny models on disk, an in-process engine, references."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from services.common.api.baton.v1 import denoiser_pb2 as dpb
from services.common.blobs import BlobStore
from services.denoiser.cache import ModelCache
from services.denoiser.engine import DenoiseEngine
from services.denoiser.models import LoadOptions, load_model
from services.devkit.tiny_models import build

PROMPT = "a photo of a mountain landscape at night"
NEGATIVE = "blurry"


def build_models(root: Path) -> dict[str, str]:
    """Tiny sd1 and two different tiny SDXL models (base and a second one), as folders."""
    return {
        "sd1": str(build("sd1", root / "sd1")),
        "sdxl": str(build("sdxl", root / "sdxl")),
        "sdxl_b": str(build("sdxl", root / "sdxl_b", seed=7)),
    }


def make_engine(store: BlobStore) -> DenoiseEngine:
    cache = ModelCache(load_model, defaults=LoadOptions(), max_models=4)
    return DenoiseEngine(store, cache)


def request(model: str, **fields) -> dpb.DenoiseRequest:
    fields.setdefault("prompt", PROMPT)
    fields.setdefault("negative_prompt", NEGATIVE)
    fields.setdefault("seed", 42)
    return dpb.DenoiseRequest(model=model, **fields)


def generator(seed: int = 42) -> torch.Generator:
    return torch.Generator("cpu").manual_seed(seed)


def diffusers_latents(pipe, steps: int, **kw) -> torch.Tensor:
    """diffusers' own run of `pipe` with `request`'s defaults (prompt, negative prompt, seed 42), as latents."""
    return pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=steps, generator=generator(),
                output_type="latent", **kw).images  # fmt: skip


def sample_image(width: int = 64, height: int = 64, seed: int = 3) -> Image.Image:
    """A deterministic picture with structure (gradients and a block), not noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([x * 255 / width, y * 255 / height, (x + y) * 127 / (width + height)], axis=-1)
    rgb[height // 4 : height // 2, width // 4 : width // 2] = rng.integers(0, 255, 3)
    return Image.fromarray(rgb.astype(np.uint8), "RGB")


def sample_mask(width: int = 64, height: int = 64) -> Image.Image:
    mask = np.zeros((height, width), np.uint8)
    mask[height // 3 : 2 * height // 3, width // 3 : 2 * width // 3] = 255
    return Image.fromarray(mask, "L")


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()
