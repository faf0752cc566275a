"""The Denoiser gRPC servicer: a few lines per RPC over DenoiseEngine and VaeCodec.

Denoise, Encode and Decode take one of the worker's slots (WorkSlots: `concurrency` running,
`max-queued` waiting, Busy beyond). A Denoise call says what it waits for (queued, preparing)
every few seconds until its first step; from then on its step events are the proof of progress.
On SIGTERM the drain refuses what waits, lets running windows finish while the grace period
allows, then has each hand off at its next step boundary, checkpointed for another worker.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from services.common.admission import Ticket, WorkSlots
from services.common.api.baton.v1 import denoiser_pb2 as dpb
from services.common.api.baton.v1 import denoiser_pb2_grpc
from services.common.api.baton.v1 import workers_pb2 as wpb
from services.common.auth import ADMIN, requires
from services.common.errors import Cancelled, DeadlineExceeded, Draining
from services.denoiser.adapter_check import AdapterInspector
from services.denoiser.cache import AVAILABLE, OFFLOADED, READY, ModelCache
from services.denoiser.codec import VaeCodec
from services.denoiser.engine import DenoiseEngine
from services.denoiser.metrics import STEPS, WINDOWS, watch_slots
from services.denoiser.models import LoadedModel, ModelCard, card_of, parse_dtype

log = logging.getLogger("baton.denoiser")

# Seconds between WindowStatus events while a call waits for a slot or prepares its window.
STATUS_EVERY_S = 2.0
# At most this long before the drain deadline, running windows hand off instead of finishing.
HANDOFF_MARGIN_S = 5.0


def status(phase: str, *, queue_position: int = 0, resumed_from: int = 0) -> dpb.DenoiseEvent:
    return dpb.DenoiseEvent(
        status=dpb.WindowStatus(phase=phase, queue_position=queue_position, resumed_from=resumed_from)
    )


class DenoiserServicer(denoiser_pb2_grpc.DenoiserServicer):
    def __init__(
        self, engine: DenoiseEngine, codec: VaeCodec, cache: ModelCache, executor: ThreadPoolExecutor, slots: WorkSlots
    ):
        self.engine = engine
        self.codec = codec
        self.cache = cache
        self.adapters = AdapterInspector(cache, engine.adapter_files)
        self.executor = executor
        # Denoise, Encode and Decode share the executor, so they share its slots and queue.
        self.slots = slots
        watch_slots(lambda: slots.running, lambda: slots.queued)
        # Set late in a drain: every running window hands off at its next step boundary.
        self.handoff = threading.Event()

    async def _run(self, fn, *args):
        # In the call's context, as the window's run below: the work's log lines name the job and stage.
        call = contextvars.copy_context()
        return await asyncio.get_running_loop().run_in_executor(self.executor, call.run, fn, *args)

    def worker_info(self, address: str) -> wpb.WorkerInfo:
        """This worker's registry record: its models and how busy it is."""
        loaded = {m.name: m for m, _ in self.cache.entries()}
        return self.slots.worker_info(
            self.cache.defaults.device,
            models=[model_info(card, state, loaded.get(card.name)) for card, state in self.cache.cards()],
            load_on_demand=self.cache.load_on_demand,
        )

    async def drain(self, deadline: float) -> None:
        """SIGTERM: refuse what waits, let running windows finish while there is time, then hand each
        off at its next step boundary (checkpointed when it can resume) and wait for them until `deadline`."""
        self.slots.drain()
        margin = min(HANDOFF_MARGIN_S, max(deadline - time.monotonic(), 0.0) / 3)
        if await self.slots.wait_idle(deadline - margin - time.monotonic()):
            return
        log.info("handing off the running windows", extra={"running": self.slots.running})
        self.handoff.set()
        await self.slots.wait_idle(deadline - time.monotonic())

    async def Denoise(self, request, context):
        ticket = self.slots.enter("denoise window")  # refused here, before any work, when full or draining
        try:
            if not ticket.granted:
                yield status("queued", queue_position=ticket.position)
                while not await ticket.turn(STATUS_EVERY_S):
                    yield status("queued", queue_position=ticket.position)
        except BaseException:
            ticket.release()
            raise
        async for event in self._window(request, context, ticket):
            yield event

    async def _window(self, request, context, ticket: Ticket):
        """The window on the executor, its events as they come; the slot is freed when the work ends."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        stop = threading.Event()
        # The call's end (a Cancel, a client gone, its deadline) stops the window at the network's next
        # block (interrupt.py): set from the call itself, so it never waits for this generator's close.
        context.add_done_callback(lambda _: stop.set())
        remaining = context.time_remaining()
        deadline = time.monotonic() + remaining if remaining is not None else None
        started = time.monotonic()
        resumed_from = 0

        def on_step(event: dpb.StepEvent) -> None:
            STEPS.inc()
            loop.call_soon_threadsafe(events.put_nowait, dpb.DenoiseEvent(step=event))

        def on_resume(step: int) -> None:
            nonlocal resumed_from
            resumed_from = step
            loop.call_soon_threadsafe(events.put_nowait, status("preparing", resumed_from=step))

        def run():
            try:
                latents = self.engine.denoise(request, on_step, stop.is_set, deadline, self.handoff.is_set, on_resume)
            except (Cancelled, DeadlineExceeded):
                WINDOWS.labels("cancelled").inc()
                raise
            except Draining:
                WINDOWS.labels("handed_off").inc()
                raise
            except BaseException:
                WINDOWS.labels("error").inc()
                raise
            WINDOWS.labels("ok").inc()
            return latents

        work = loop.run_in_executor(self.executor, contextvars.copy_context().run, run)

        def ended(done: asyncio.Future) -> None:
            # Not before: a window whose client went away runs to the next block of its network first.
            ticket.release()
            if not done.cancelled():
                done.exception()  # retrieved here when nobody waits for it any more (the client left)

        work.add_done_callback(ended)
        try:
            yield status("preparing")
            # Until the first step, a status every few seconds says the worker is alive; after it,
            # only step events prove progress.
            stepped = False
            while not work.done() or not events.empty():
                waiter = asyncio.ensure_future(events.get())
                timeout = None if stepped else STATUS_EVERY_S
                await asyncio.wait({waiter, work}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
                if waiter.done():
                    event = waiter.result()
                    stepped = stepped or event.HasField("step")
                    yield event
                else:
                    waiter.cancel()
                    if not work.done() and not stepped:
                        yield status("preparing", resumed_from=resumed_from)
            latents = work.result()
            result = dpb.DenoiseResult(latents=latents, elapsed_s=time.monotonic() - started, resumed_from=resumed_from)
            yield dpb.DenoiseEvent(result=result)
        finally:
            stop.set()  # the window's own end (an error in this generator) stops it too

    async def Encode(self, request, context):
        async with self.slots.admit("encode"):
            return dpb.EncodeResponse(latents=await self._run(self.codec.encode, request))

    async def Decode(self, request, context):
        async with self.slots.admit("decode"):
            return await self._run(self.codec.decode, request)

    async def ListModels(self, request, context):
        loaded = {m.name: m for m, _ in self.cache.entries()}
        return dpb.ListModelsResponse(
            models=[model_info(card, state, loaded.get(card.name)) for card, state in self.cache.cards()]
        )

    async def InspectModel(self, request, context):
        card = await self._run(self.cache.inspect, request.model)
        return model_info(card, AVAILABLE)

    async def InspectAdapter(self, request, context):
        # Beside the windows, not in their executor: reading a file and building layers on the
        # meta device does no compute, and Submit must not wait for a running window.
        return await asyncio.to_thread(self.adapters.inspect, request)

    @requires(ADMIN)  # changes what the worker holds
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

    @requires(ADMIN)  # changes what the worker holds
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
