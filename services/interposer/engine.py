"""InterposerEngine: fully denoised latents from one latent space to another.

By network (city96's v4.0 interposers: model space -> raw with the source constants, the
net, raw -> model space with the target's) or by VAE round trip (the source model's VAE
decodes, the target model's encodes, through a denoiser), chosen per request.
"""

from __future__ import annotations

import asyncio
import contextvars
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import torch

from services.common.api.baton.v1 import denoiser_pb2 as dpb
from services.common.api.baton.v1 import denoiser_pb2_grpc
from services.common.api.baton.v1 import handles_pb2 as pb
from services.common.api.baton.v1 import interposer_pb2 as ipb
from services.common.blobs import BlobStore
from services.common.errors import BatonError, FailedPrecondition, InvalidArgument, NotFound
from services.common.latent_spaces import LatentSpace, get_space
from services.common.tensors import check_finite
from services.common.workers import WorkerPool
from services.interposer.net import PUBLISHED_PAIRS, SPACE_TO_PUBLISHED, InterposerNet, convert, load_interposer
from services.interposer.weights import WeightsLocator

NET, VAE, AUTO = ipb.CONVERSION_METHOD_NET, ipb.CONVERSION_METHOD_VAE, ipb.CONVERSION_METHOD_AUTO


def _space(space_id: str, field: str) -> LatentSpace:
    try:
        return get_space(space_id)
    except NotFound as exc:
        raise InvalidArgument(exc.detail, field=field) from exc


class InterposerEngine:
    def __init__(self, store: BlobStore, locator: WeightsLocator, denoisers: WorkerPool, device: str, dtype):
        self.store = store
        self.locator = locator
        self.denoisers = denoisers
        self.device = device
        self.dtype = dtype
        self._nets: dict[tuple[str, str], InterposerNet] = {}
        self._lock = threading.Lock()
        # All torch work on one thread: each thread that runs torch ops gets its own OpenMP
        # team, and several teams fight over the cores.
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="interposer")

    def published_pair(self, source: str, target: str) -> tuple[str, str] | None:
        pair = (SPACE_TO_PUBLISHED.get(source, ""), SPACE_TO_PUBLISHED.get(target, ""))
        return pair if pair in PUBLISHED_PAIRS else None

    def net(self, pair: tuple[str, str]) -> InterposerNet:
        with self._lock:
            if pair not in self._nets:
                net = load_interposer(self.locator.find(*pair), *pair)
                self._nets[pair] = net.to(self.device, self.dtype)
            return self._nets[pair]

    async def convert(self, req: ipb.ConvertRequest, timeout_s: float | None = None) -> tuple[pb.LatentHandle, int]:
        """The converted latents and the method used; `timeout_s` bounds the VAE round trip's calls."""
        handle = req.latents
        if not handle.blob.key:
            raise InvalidArgument("the latents to convert are required", field="latents")
        if not handle.space:
            raise InvalidArgument("the latents' space is unknown; say which space they are in", field="latents.space")
        source, target = _space(handle.space, "latents.space"), _space(req.target, "target")
        if handle.noise.fraction < 1.0 and handle.HasField("noise"):
            raise FailedPrecondition(
                f"the interposer converts finished latents only; these stop at {handle.noise.fraction} of their "
                "schedule. Convert after the last window in their own space, then continue in the target space "
                "with img2img (strength)",
                field="latents",
            )
        if source.id == target.id:
            return handle, req.method
        method = req.method or AUTO
        pair = self.published_pair(source.id, target.id)
        loop = asyncio.get_running_loop()
        if method == AUTO:
            # In the call's context: the work's log lines name the job and stage.
            call = contextvars.copy_context()
            usable = pair is not None and await loop.run_in_executor(self.executor, call.run, self._can_load, pair)
            method = NET if usable else VAE
        if method == NET:
            if pair is None:
                raise FailedPrecondition(
                    f"no published interposer converts {source.id} -> {target.id} (none converts into Flux or "
                    "Cascade); use method vae with a source_model and a target_model",
                    field="method",
                )
            call = contextvars.copy_context()
            return await loop.run_in_executor(self.executor, call.run, self._by_net, req, pair, source, target), NET
        deadline = time.time() + (timeout_s if timeout_s is not None and timeout_s < 1e6 else 600.0)
        return await self._by_vae(req, target, deadline), VAE

    def _can_load(self, pair: tuple[str, str]) -> bool:
        try:
            self.net(pair)
        except BatonError:
            return False
        return True

    @torch.no_grad()
    def _by_net(self, req: ipb.ConvertRequest, pair, source: LatentSpace, target: LatentSpace) -> pb.LatentHandle:
        latents = self.store.get_tensor(req.latents.blob)
        if latents.ndim != 4 or latents.shape[1] != source.channels:
            raise InvalidArgument(
                f"{source.id} latents are [B, {source.channels}, H, W], got {list(latents.shape)}", field="latents"
            )
        if req.latents.scaling == pb.LATENT_SCALING_RAW:
            latents = source.to_model(latents)
        out = convert(self.net(pair), latents.to(self.device), source, target).cpu()
        check_finite(
            out,
            "the conversion's output",
            "input latents far outside the source space's range, or "
            "float16 interposer weights that overflowed (the dtype setting)",
        )
        return self._handle(req, out, target.id, req.target_model)

    def _handle(self, req: ipb.ConvertRequest, latents: torch.Tensor, space: str, model: str) -> pb.LatentHandle:
        blob = self.store.put_tensor(latents, name=req.output_key or None)
        return pb.LatentHandle(
            blob=blob,
            space=space,
            scaling=pb.LATENT_SCALING_MODEL,
            noise=pb.NoiseLevel(fraction=1.0),
            seed=req.latents.seed,
            width=req.latents.width,
            height=req.latents.height,
            model=model,
        )

    async def _by_vae(self, req: ipb.ConvertRequest, target: LatentSpace, deadline: float) -> pb.LatentHandle:
        source_model = req.source_model or req.latents.model
        if not source_model:
            raise InvalidArgument(
                "the VAE round trip decodes with a source model's VAE: name one", field="source_model"
            )
        if not req.target_model:
            raise InvalidArgument(
                f"the VAE round trip encodes with a target model's VAE: name a {target.id} model", field="target_model"
            )
        key = req.output_key

        async def decode(channel, worker, timeout: float):
            # Pixels travel as a float tensor: no 8-bit rounding between the two VAEs.
            request = dpb.DecodeRequest(
                model=source_model, latents=req.latents, format="tensor", output_key=f"{key}/decoded" if key else ""
            )
            return await denoiser_pb2_grpc.DenoiserStub(channel).Decode(request, timeout=timeout)

        async def encode(channel, worker, timeout: float):
            request = dpb.EncodeRequest(model=req.target_model, images=decoded.images, output_key=key)
            return await denoiser_pb2_grpc.DenoiserStub(channel).Encode(request, timeout=timeout)

        try:
            decoded = await self.denoisers.call(
                "denoiser", decode, deadline=deadline, model=source_model, what="the VAE round trip's decode"
            )
            encoded = await self.denoisers.call(
                "denoiser", encode, deadline=deadline, model=req.target_model, what="the VAE round trip's encode"
            )
        except grpc.aio.AioRpcError as exc:
            raise FailedPrecondition(f"the VAE round trip failed: {exc.details()}", field="source_model") from exc
        latents = encoded.latents
        if latents.space != target.id:
            raise InvalidArgument(
                f"{req.target_model} encodes into {latents.space!r}, not {target.id!r}", field="target_model"
            )
        latents.seed, latents.width, latents.height = req.latents.seed, req.latents.width, req.latents.height
        return latents

    def conversions(self) -> list[ipb.Conversion]:
        """Pairs a network converts here (weights in the folder), and the VAE round trip for any pair."""
        published = {v: k for k, v in SPACE_TO_PUBLISHED.items()}
        out = [
            ipb.Conversion(source=published.get(src, src), target=published.get(dst, dst), method=NET, weights=str(p))
            for src, dst, p in self.locator.available()
        ]
        out.append(ipb.Conversion(source="*", target="*", method=VAE))
        return out
