"""Reading a request's inputs from blobs: starting latents, images and masks, each checked
against the model, with the request field named in every error."""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image, ImageFile, JpegImagePlugin, PngImagePlugin, WebPImagePlugin

from services.common.api.baton.v1 import handles_pb2 as pb
from services.common.blobs import TENSOR, BlobStore
from services.common.errors import BatonError, InvalidArgument
from services.common.limits import DEFAULT, Limits
from services.common.rules.blobs import check_image_pixels, check_latents_blob, image_size
from services.denoiser.models import LoadedModel

# Opened by the plugin, not Image.open, so that max-pixels decides and not PIL's own guard.
IMAGE_FILES: dict[str, type[ImageFile.ImageFile]] = {
    "PNG": PngImagePlugin.PngImageFile,
    "JPEG": JpegImagePlugin.JpegImageFile,
    "WEBP": WebPImagePlugin.WebPImageFile,
}


def located(field: str, fn: Callable[[], Any]) -> Any:
    """fn(), with any Baton error it raises pinned to `field`."""
    try:
        return fn()
    except BatonError as exc:
        raise exc.at(field=field) from exc


@dataclass
class Incoming:
    """The starting latents of a request, read and checked."""

    handle: pb.LatentHandle
    tensor: torch.Tensor

    @property
    def level(self) -> float:
        return self.handle.noise.fraction


def read_latents(store: BlobStore, handle: pb.LatentHandle, model_name: str, model: LoadedModel) -> Incoming | None:
    """The latents `handle` names, in model space, [B, C, H, W]; None when it names none."""
    if not handle.blob.key:
        return None
    if handle.space and handle.space != model.space.id:
        raise InvalidArgument(
            f"latents are in the {handle.space!r} latent space but {model_name} works in {model.space.id!r}; "
            "convert them with an interpose stage first",
            field="latents.space",
        )
    blob = located("latents", lambda: store.resolve(handle.blob))
    if blob.media_type == TENSOR:  # anything else get_tensor refuses, saying what the blob holds
        check_latents_blob(blob.dtype, list(blob.shape), "latents")
    tensor = located("latents", lambda: store.get_tensor(blob))
    if tensor.ndim == 3:
        tensor = tensor.unsqueeze(0)
    if tensor.shape[1] != model.latent_channels:
        raise InvalidArgument(
            f"latents of shape {list(tensor.shape)} do not fit {model_name}: "
            f"it takes [B, {model.latent_channels}, H, W]",
            field="latents",
        )
    if not torch.isfinite(tensor).all():
        raise InvalidArgument("latents contain NaN or inf values", field="latents")
    if handle.scaling == pb.LATENT_SCALING_RAW:
        tensor = model.space.to_model(tensor)
    return Incoming(handle, tensor)


def read_image(store: BlobStore, handle: pb.BlobHandle, mode: str, *, limits: Limits = DEFAULT) -> Image.Image:
    """An encoded image blob (PNG/JPEG/WebP), converted to PIL `mode`; its size is checked
    against max-pixels from its header, before anything is decoded."""
    data = bytes(store.get_bytes(handle))
    size = image_size(data)
    check_image_pixels(size.width, size.height, limits, "")  # the caller names the field (located)
    try:
        image = IMAGE_FILES[size.format](io.BytesIO(data))
        image.load()
    except Exception as exc:  # PIL raises several types for bad data
        raise InvalidArgument(f"not a readable image ({handle.media_type or 'unknown type'}): {exc}") from exc
    return image.convert(mode)


def read_pixels(store: BlobStore, handle: pb.BlobHandle) -> torch.Tensor | None:
    """A float pixel tensor blob ([B, 3, H, W] or [3, H, W], values in [-1, 1]); None for an encoded image."""
    if handle.media_type != TENSOR:
        return None
    pixels = store.get_tensor(handle)
    if pixels.ndim == 3:
        pixels = pixels.unsqueeze(0)
    if pixels.ndim != 4 or pixels.shape[1] != 3 or not pixels.is_floating_point():
        raise InvalidArgument(
            f"a pixel tensor is float [B, 3, H, W] in [-1, 1], got {pixels.dtype} {list(pixels.shape)}"
        )
    return pixels.float()
