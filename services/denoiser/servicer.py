"""The Denoiser gRPC servicer: a few lines per RPC over DenoiseEngine and VaeCodec."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from prometheus_client import Counter

from services.common.api.baton.v1 import denoiser_pb2 as dpb
from services.common.api.baton.v1 import denoiser_pb2_grpc
from services.common.api.baton.v1 import workers_pb2 as wpb
from services.common.errors import Cancelled, DeadlineExceeded
from services.denoiser.cache import AVAILABLE, OFFLOADED, READY, ModelCache
from services.denoiser.codec import VaeCodec
from services.denoiser.engine import DenoiseEngine
from services.denoiser.models import LoadedModel, ModelCard, card_of, parse_dtype

STEPS = Counter("baton_denoise_steps", "Denoising steps run")
WINDOWS = Counter("baton_denoise_windows", "Denoise windows by outcome", ["outcome"])


class DenoiserServicer(denoiser_pb2_grpc.DenoiserServicer):
    def __init__(self, engine: DenoiseEngine, codec: VaeCodec, cache: ModelCache, executor: ThreadPoolExecutor):
        self.engine = engine
        self.codec = codec
        self.cache = cache
        self.executor = executor
        self.in_flight = 0

    async def _run(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    def worker_info(self, address: str) -> wpb.WorkerInfo:
        """This worker's registry record: its models and how busy it is."""
        loaded = {m.name: m for m, _ in self.cache.entries()}
        return wpb.WorkerInfo(
            models=[model_info(card, state, loaded.get(card.name)) for card, state in self.cache.cards()],
            load_on_demand=self.cache.load_on_demand,
            in_flight=self.in_flight,
            capacity=self.executor._max_workers,
            device=self.cache.defaults.device,
            accepting=True,
        )

    async def Denoise(self, request, context):
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        stop = threading.Event()
        remaining = context.time_remaining()
        deadline = time.monotonic() + remaining if remaining is not None else None
        started = time.monotonic()

        def on_step(event: dpb.StepEvent) -> None:
            STEPS.inc()
            loop.call_soon_threadsafe(events.put_nowait, event)

        def run():
            try:
                latents = self.engine.denoise(request, on_step, stop.is_set, deadline)
            except (Cancelled, DeadlineExceeded):
                WINDOWS.labels("cancelled").inc()
                raise
            except BaseException:
                WINDOWS.labels("error").inc()
                raise
            WINDOWS.labels("ok").inc()
            return latents

        work = loop.run_in_executor(self.executor, run)
        self.in_flight += 1
        try:
            while not work.done() or not events.empty():
                waiter = asyncio.ensure_future(events.get())
                await asyncio.wait({waiter, work}, return_when=asyncio.FIRST_COMPLETED)
                if waiter.done():
                    yield dpb.DenoiseEvent(step=waiter.result())
                else:
                    waiter.cancel()
            latents = work.result()
            yield dpb.DenoiseEvent(result=dpb.DenoiseResult(latents=latents, elapsed_s=time.monotonic() - started))
        finally:
            # A client that went away (or a passed deadline) stops the window at its next step.
            stop.set()
            self.in_flight -= 1

    async def Encode(self, request, context):
        return dpb.EncodeResponse(latents=await self._run(self.codec.encode, request))

    async def Decode(self, request, context):
        return await self._run(self.codec.decode, request)

    async def ListModels(self, request, context):
        loaded = {m.name: m for m, _ in self.cache.entries()}
        return dpb.ListModelsResponse(
            models=[model_info(card, state, loaded.get(card.name)) for card, state in self.cache.cards()]
        )

    async def InspectModel(self, request, context):
        card = await self._run(self.cache.inspect, request.model)
        return model_info(card, AVAILABLE)

    async def LoadModel(self, request, context):
        options = {}
        if request.dtype:
            options["dtype"] = parse_dtype(request.dtype)
        if request.variant:
            options["variant"] = request.variant
        if request.family:
            options["family"] = request.family
        model = await self._run(lambda: self.cache.load(request.model, **options))
        return model_info(card_of(model), READY, model)

    async def UnloadModel(self, request, context):
        await self._run(self.cache.unload, request.model)
        return dpb.UnloadModelResponse()


MODEL_STATES = {
    READY: dpb.MODEL_STATE_READY,
    OFFLOADED: dpb.MODEL_STATE_OFFLOADED,
    AVAILABLE: dpb.MODEL_STATE_AVAILABLE,
}


def model_info(card: ModelCard, state: str, model: LoadedModel | None = None) -> dpb.ModelInfo:
    info = dpb.ModelInfo(
        name=card.name,
        source=card.source,
        family=card.family,
        space=card.space,
        state=MODEL_STATES[state],
        vae_scale_factor=card.vae_scale_factor,
        latent_channels=card.latent_channels,
        default_width=card.default_size[0],
        default_height=card.default_size[1],
        default_scheduler=card.scheduler_class,
        size_multiple=card.size_multiple,
    )
    if model is not None:
        info.dtype = str(model.dtype).removeprefix("torch.")
        info.device = "cpu" if state == OFFLOADED else str(model.device)
        info.memory_bytes = model.memory_bytes
    return info
