"""The Encode and Decode RPCs: images (or pixel tensors) to model-space latents and back, with
the model's own VAE. Batches stay whole: B latents decode to B images, B images encode to B latents."""

from __future__ import annotations

import functools
import io

import torch

from services.common.api.baton.v1 import denoiser_pb2 as dpb
from services.common.api.baton.v1 import handles_pb2 as pb
from services.common.blobs import BlobStore
from services.common.errors import InvalidArgument
from services.common.limits import DEFAULT, Limits
from services.denoiser import vae
from services.denoiser.cache import ModelCache
from services.denoiser.inputs import located, read_image, read_latents, read_pixels
from services.denoiser.models import LoadedModel

IMAGE_FORMATS = {"png": "PNG", "jpeg": "JPEG", "jpg": "JPEG", "webp": "WEBP"}
TENSOR_FORMAT = "tensor"


class VaeCodec:
    def __init__(self, store: BlobStore, cache: ModelCache, *, limits: Limits = DEFAULT):
        self.store = store
        self.cache = cache
        self.limits = limits  # max-pixels of the images Encode decodes

    def encode(self, req: dpb.EncodeRequest) -> pb.LatentHandle:
        handles = list(req.images)
        if not handles:
            raise InvalidArgument("an image to encode is required", field="images")
        with self.cache.use(req.model) as model:
            parts: list[torch.Tensor] = []
            for i, handle in enumerate(handles):
                parts.append(located(f"images[{i}]", functools.partial(self._pixels, model, handle, req)))
            sizes = {tuple(p.shape[-2:]) for p in parts}
            if len(sizes) > 1:
                raise InvalidArgument(f"a batch is one size; got {sorted(sizes)} (H, W)", field="images")
            seed = req.seed if req.HasField("seed") else None
            with model.lock:
                latents = vae.encode(model, torch.cat(parts), seed=seed)
            blob = self.store.put_tensor(latents, name=req.output_key or None)
            h, w = latents.shape[-2:]
            return pb.LatentHandle(
                blob=blob,
                space=model.space.id,
                scaling=pb.LATENT_SCALING_MODEL,
                noise=pb.NoiseLevel(fraction=1.0),
                seed=seed or 0,
                width=w * model.vae_scale_factor,
                height=h * model.vae_scale_factor,
                model=req.model,
            )

    def _pixels(self, model: LoadedModel, handle: pb.BlobHandle, req: dpb.EncodeRequest) -> torch.Tensor:
        pixels = read_pixels(self.store, handle)
        if pixels is None:
            image = read_image(self.store, handle, "RGB", limits=self.limits)
            return vae.to_pixels(model, image, width=req.width, height=req.height)
        h, w = pixels.shape[-2:]
        if (req.width and req.width != w) or (req.height and req.height != h):
            raise InvalidArgument(f"a pixel tensor is not resized: it is {w}x{h}, not {req.width}x{req.height}")
        if h % model.vae_scale_factor or w % model.vae_scale_factor:
            raise InvalidArgument(f"{w}x{h} pixels are not multiples of {model.vae_scale_factor} for {model.name}")
        return pixels

    def decode(self, req: dpb.DecodeRequest) -> dpb.DecodeResponse:
        fmt = (req.format or "png").lower()
        if fmt not in IMAGE_FORMATS and fmt != TENSOR_FORMAT:
            raise InvalidArgument(f"unknown format {fmt!r}; accepted: png, jpeg, webp, tensor", field="format")
        with self.cache.use(req.model) as model:
            incoming = read_latents(self.store, req.latents, req.model, model)
            if incoming is None:
                raise InvalidArgument("latents to decode are required", field="latents")
            with model.lock:
                pixels = vae.decode_to_tensor(model, incoming.tensor).float().cpu()
        height, width = pixels.shape[-2:]
        key = req.output_key
        if fmt == TENSOR_FORMAT:
            blob = self.store.put_tensor(pixels.clamp(-1, 1), name=key or None)
            return dpb.DecodeResponse(images=[blob], width=width, height=height)
        blobs = []
        for i, image in enumerate(vae.to_images(model, pixels)):
            buf = io.BytesIO()
            image.save(buf, format=IMAGE_FORMATS[fmt])
            # One image keeps the plain key; a batch names each image under it.
            name = (key if len(pixels) == 1 else f"{key}/{i}") if key else None
            blobs.append(
                self.store.put_bytes(buf.getvalue(), media_type=f"image/{IMAGE_FORMATS[fmt].lower()}", name=name)
            )
        return dpb.DecodeResponse(images=blobs, width=width, height=height)
