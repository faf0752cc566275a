"""The Encode and Decode RPCs: images (or pixel tensors) to model-space latents and back, with
the model's own VAE. Batches stay whole: B latents decode to B images, B images encode to B latents.

Requests on one model share VAE forwards (batching.py, through the model's VaeBatcher): the
Decodes pending at once whose latents have one shape after the batch dimension run one
`vae.decode` over their latents concatenated, each taking its own rows back; Encodes of one size
run one `vae.encode`, and each gets its rows of the posterior's parameters as a posterior of its
own, so its mode, or its seeded sample (its own generator over its own rows), is what it was
alone. A request alone runs exactly as before; a batched row can differ from its alone value in
the last bits (CPU conv kernels choose their path by batch size: tests/test_vae_batching.py).

No lockstep: a call is in the batcher only while it waits, so the first one in runs its forward at
once, on its own thread, and the calls that come in meanwhile form the next batch. The forward
(vae.Forward) takes the model's lock and upcasts the VAE once for the whole batch. It takes the
lock with the batcher's own released, and nothing that holds the model's lock waits on this
batcher (a preparing window calls the VAE itself), so a Decode beside a preparing window waits
for the window's first forward and goes on.
"""

from __future__ import annotations

import functools
import io
import threading
from typing import Any

import torch

from services.common.api.baton.v1 import denoiser_pb2 as dpb
from services.common.api.baton.v1 import handles_pb2 as pb
from services.common.blobs import BlobStore
from services.common.errors import InvalidArgument
from services.common.limits import DEFAULT, Limits
from services.denoiser import vae
from services.denoiser.batching import NetCall, SampleBudget, StepBatcher
from services.denoiser.cache import ModelCache
from services.denoiser.inputs import located, read_image, read_latents, read_pixels
from services.denoiser.models import LoadedModel

IMAGE_FORMATS = {"png": "PNG", "jpeg": "JPEG", "jpg": "JPEG", "webp": "WEBP"}
TENSOR_FORMAT = "tensor"


class VaeBatcher(StepBatcher):
    """A model's Encode and Decode calls, sharing VAE forwards; forwards run on a waiting call's
    thread. One network per method, made once: NetCall.key groups calls by their network."""

    def __init__(self, model: LoadedModel, max_batch: int = 0):
        super().__init__(SampleBudget(max_batch, model.device))
        self.decode = vae.Forward(model, "decode")
        self.encode = vae.Forward(model, "encode")


class VaeCodec:
    def __init__(self, store: BlobStore, cache: ModelCache, *, limits: Limits = DEFAULT, max_batch: int = 0):
        """`max_batch`: samples per shared VAE forward, as the engine's (0: from the device, 1: each
        request alone)."""
        self.store = store
        self.cache = cache
        self.limits = limits  # max-pixels of the images Encode decodes
        self.max_batch = max_batch
        self._batchers = threading.Lock()

    def batcher(self, model: LoadedModel) -> VaeBatcher:
        """The model's VaeBatcher, made on first use."""
        with self._batchers:
            if model.vae_batcher is None:
                model.vae_batcher = VaeBatcher(model, self.max_batch)
            return model.vae_batcher

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
            batcher = self.batcher(model)
            call = NetCall(batcher.encode, {"x": vae.encode_input(model, torch.cat(parts))}, split=vae.split_posterior)
            with batcher.window() as member:
                posterior: Any = member.forward(call)  # a DiagonalGaussianDistribution: the call's split
            latents = vae.latents_of(model, posterior, seed=seed)
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
            batcher = self.batcher(model)
            call = NetCall(batcher.decode, {"z": vae.decode_input(model, incoming.tensor)})
            with batcher.window() as member:
                pixels = member.forward(call).float().cpu()
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
