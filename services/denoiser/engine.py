"""DenoiseEngine: a DenoiseRequest in, a LatentHandle out. Plain Python: blobs, models, torch.

It resolves handles to tensors and images, checks everything a model cannot take (with the
field named), picks the scheduler and its carried-over state, runs the family's window (its
forwards shared with the model's other windows in flight: batching.py; or, with batching off,
under the model's lock), and writes the result with all the metadata a next stage needs. A window with
an output key checkpoints itself as it goes and resumes an earlier attempt's checkpoint of the
same request (checkpoints.py); on a drain it hands off at a step boundary.
"""

from __future__ import annotations

import contextlib
import json
import logging
import secrets
import threading
import time
from collections.abc import Callable
from typing import Any

import torch
from google.protobuf.json_format import MessageToDict
from PIL import Image

from services.common.api.baton.v1 import denoiser_pb2 as dpb
from services.common.api.baton.v1 import handles_pb2 as pb
from services.common.blobs import BlobStore
from services.common.errors import Cancelled, DeadlineExceeded, Draining, FailedPrecondition
from services.common.family_defaults import DEFAULTS
from services.common.limits import DEFAULT, Limits
from services.common.rules import denoise as rules
from services.common.rules.scheduler import check_scheduler, check_solver_history
from services.common.tensors import check_finite
from services.denoiser import checkpoints, interrupt, metrics, schedulers
from services.denoiser.adapter_files import AdapterFiles
from services.denoiser.adapters import ActiveLoras, ModelAdapters, TextAdapters, WindowAdapters
from services.denoiser.batching import Member, NetCall, SampleBudget, StepBatcher
from services.denoiser.cache import ModelCache
from services.denoiser.checkpoints import CheckpointWriter, WindowCheckpoints
from services.denoiser.families.base import (
    CONTINUE,
    FROM_NOISE,
    IMG2IMG,
    INPAINT,
    TXT2IMG,
    StepHooks,
    WindowJob,
    WindowResult,
)
from services.denoiser.inputs import Incoming, located, read_image, read_latents
from services.denoiser.metrics import WindowTiming
from services.denoiser.models import LoadedModel
from services.denoiser.prompt_cache import DEFAULT_BYTES as DEFAULT_PROMPT_CACHE_BYTES
from services.denoiser.window import DenoiseWindow

log = logging.getLogger("baton.denoiser")

OVERFLOW_CAUSES = (
    "float16 weights on a model that needs bfloat16 or float32 (the dtype setting), out-of-range input latents "
    "(a processor's scale), or an extreme guidance_scale"
)

STATE_MEDIA_TYPE = "application/x-safetensors"


class EngineHooks(StepHooks):
    """Cancellation and deadline (between steps and inside them), hand-off on drain (between steps),
    progress and checkpoints for one request."""

    def __init__(
        self,
        model: LoadedModel,
        on_step: Callable[[dpb.StepEvent], None],
        cancelled: Callable[[], bool],
        deadline: float | None,
        preview_every: int,
        handoff: Callable[[], bool] = lambda: False,
        checkpoints: WindowCheckpoints | None = None,
        on_resume: Callable[[int], None] = lambda step: None,
        timing: WindowTiming | None = None,
    ):
        self.model = model
        self.on_step = on_step
        self.cancelled = cancelled
        self.deadline = deadline
        self.preview_every = preview_every
        self.handoff = handoff
        self.checkpoints = checkpoints
        self.on_resume = on_resume
        self.timing = timing
        self.start = time.monotonic()
        # (index, total) of the step running now; None while the window prepares its inputs.
        self.step: tuple[int, int] | None = None
        # The window's place in its model's StepBatcher, while it runs with batching on.
        self.member: Member | None = None
        # Held while the window prepares (text encoders, VAE), released at its first forward.
        self.preparing: threading.Lock | None = None
        # The window's LoRAs: every forward runs with them (adapters.py).
        self.loras = ActiveLoras()

    def forward(self, call: NetCall) -> torch.Tensor:
        self.prepared()
        call.adapters = self.loras
        return self.member.forward(call) if self.member is not None else call.alone()

    def prepared(self) -> None:
        """The window is past its preparation: the model's other windows and codec calls may prepare."""
        lock, self.preparing = self.preparing, None
        if lock is not None:
            lock.release()

    def before(self, index: int, total: int) -> None:
        self.step = (index, total)
        if self.timing is not None:
            self.timing.step_began()
        self._stop_if_cancelled(lambda: f"before step {index + 1} of {total}")
        if self.handoff():
            if self.checkpoints is None:
                raise Draining(
                    f"this worker is shutting down before step {index + 1} of {total}; the window "
                    "restarts from its first step on another worker"
                )
            if self.checkpoints.can_hand_off():  # else the second half of a Heun step runs first
                raise self.checkpoints.hand_off()

    def inside(self) -> None:
        self._stop_if_cancelled(self._inside)

    def _inside(self) -> str:
        if self.step is None:
            return "while the window prepared its inputs, before its first step"
        return f"inside step {self.step[0] + 1} of {self.step[1]}"

    def _stop_if_cancelled(self, where: Callable[[], str]) -> None:
        # A flag read and a clock: this runs before every block of the networks, many times a step.
        if self.cancelled():
            raise Cancelled(f"cancelled {where()}")
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise DeadlineExceeded(f"deadline passed {where()}")

    def after(
        self,
        index: int,
        total: int,
        timestep: float,
        latents: torch.Tensor,
        scheduler: Any,
        preview: Callable[[], torch.Tensor] | None = None,
    ) -> None:
        if self.timing is not None:  # the step itself: its checkpoint and preview come after
            self.timing.step_ended()
        event = dpb.StepEvent(step=index + 1, total=total, timestep=timestep, elapsed_s=time.monotonic() - self.start)
        if self.checkpoints is not None:
            event.checkpoint = self.checkpoints.after_step(index + 1, total, latents, scheduler)
        if self.preview_every and ((index + 1) % self.preview_every == 0 or index + 1 == total):
            event.preview_png = self.model.space.preview_png(preview() if preview is not None else latents)
        self.on_step(event)

    def resumed(self, step: int, total: int) -> None:
        if self.checkpoints is not None:
            self.checkpoints.resumed(step, total)
        self.on_resume(step)


class DenoiseEngine:
    def __init__(
        self,
        store: BlobStore,
        cache: ModelCache,
        checkpoint_every: int = 0,
        limits: Limits = DEFAULT,
        max_batch: int = 0,
        batch_wait_s: float = 0.0,
        prompt_cache_bytes: int = DEFAULT_PROMPT_CACHE_BYTES,
        adapter_files: AdapterFiles | None = None,
    ):
        """`checkpoint_every`: window steps between checkpoints (0: only at a drain's hand-off); the
        service's `checkpoint-every` setting says what a good value costs. `limits`: the cluster's
        limits, applied to every request as the gateway applies them at Submit. `max_batch`:
        samples per shared forward (batching.py; 0: from the device, 1: no batching: windows on
        one model take turns, each whole); `batch_wait_s`: how long a batch waits to fill;
        `prompt_cache_bytes`: each model's prompt-embedding cache (prompt_cache.py; 0: off).
        `adapter_files`: where LoRAs and embeddings may come from (None: anywhere)."""
        self.store = store
        self.cache = cache
        self.limits = limits
        if checkpoint_every < 0:
            raise ValueError(f"checkpoint_every must be 0 (off) or a step count, got {checkpoint_every}")
        self.checkpoint_every = checkpoint_every
        self.writer = CheckpointWriter(store)
        if max_batch < 0 or batch_wait_s < 0:
            raise ValueError(f"max_batch and batch_wait_s must be 0 or more, got {max_batch}, {batch_wait_s}")
        self.max_batch = max_batch
        self.batch_wait_s = batch_wait_s
        self.prompt_cache_bytes = prompt_cache_bytes
        self.adapter_files = adapter_files or AdapterFiles()
        self._batchers = threading.Lock()

    @property
    def batching(self) -> bool:
        return self.max_batch != 1

    def batcher(self, model: LoadedModel) -> StepBatcher:
        """The model's StepBatcher, made on first use."""
        with self._batchers:
            if model.batcher is None:
                model.batcher = StepBatcher(
                    SampleBudget(self.max_batch, model.device), self.batch_wait_s, on_forward=metrics.forward_shared
                )
            return model.batcher

    # -- Denoise ---------------------------------------------------------------------------
    def denoise(
        self,
        req: dpb.DenoiseRequest,
        on_step: Callable[[dpb.StepEvent], None] = lambda e: None,
        cancelled: Callable[[], bool] = lambda: False,
        deadline: float | None = None,
        handoff: Callable[[], bool] = lambda: False,
        on_resume: Callable[[int], None] = lambda step: None,
    ) -> pb.LatentHandle:
        """Runs the window; `handoff` turning true (a drain) ends it at the next step boundary with
        Draining, checkpointed when it can resume; `on_resume(k)` says it goes on after step k."""
        self._check(req)
        window = DenoiseWindow(
            req.denoising_start if req.HasField("denoising_start") else 0.0,
            req.denoising_end if req.HasField("denoising_end") else 1.0,
        )
        with self.cache.use(req.model) as model:
            model.prompts.max_bytes, model.prompts.model = self.prompt_cache_bytes, model.name
            incoming = read_latents(self.store, req.latents, req.model, model)
            job, caps = self._job(req, model, window, incoming)
            wanted = None
            if req.loras or req.textual_inversions:
                wanted = WindowAdapters.read(self.adapter_files, model, req.loras, req.textual_inversions)
            saving = self._checkpoints(req, model, job, caps)
            timing = WindowTiming(req.model, job.width, job.height)
            hooks = EngineHooks(
                model, on_step, cancelled, deadline, req.preview_every, handoff, saving, on_resume, timing
            )
            # Cancel and deadline are checked inside the model calls too, not only between steps.
            with contextlib.ExitStack() as running:
                if self.batching:  # the model's other windows run at once, sharing each step's forward
                    hooks.member = running.enter_context(self.batcher(model).window(hooks.inside))
                    # Preparing is one window at a time (and not beside Encode or Decode): the
                    # tokenizers and the VAE's upcast for img2img are not safe to share.
                    model.lock.acquire()
                    hooks.preparing = model.lock
                    running.callback(hooks.prepared)
                    exclusive: Callable[[], contextlib.AbstractContextManager[Any]] = self.batcher(model).exclusive
                else:
                    running.enter_context(model.lock)
                    exclusive = contextlib.nullcontext
                if model.adapters is None:
                    model.adapters = ModelAdapters()
                if wanted is not None:  # LoRAs load once per model (with no forward running on it)
                    hooks.loras = model.adapters.activate(model, wanted.loras, exclusive)
                    running.callback(model.adapters.release, hooks.loras)
                text = wanted.text(hooks.loras) if wanted is not None else TextAdapters()
                running.enter_context(text.encoding(model.pipe))
                running.enter_context(torch.no_grad())
                running.enter_context(interrupt.checked(model.family.networks(model), hooks.inside))
                result = model.family.run(model, job, hooks)
            check_finite(result.latents, "the window's output", OVERFLOW_CAUSES)
            handle = self._output(req, model, job, caps, result)
            timing.window_ended()
        if saving is not None:
            saving.finish(self.store)
        return handle

    def _check(self, req: dpb.DenoiseRequest) -> None:
        """The rules that need no model: the gateway ran the same ones at Submit."""
        limits = self.limits
        rules.check_steps(req.steps, limits)
        rules.check_window(_optional(req, "denoising_start"), _optional(req, "denoising_end"))
        rules.check_strength(_optional(req, "strength"))
        rules.check_guidance(_optional(req, "guidance_scale"), req.guidance_rescale, limits)
        rules.check_text({f: getattr(req, f) for f in rules.PROMPTS}, req.max_sequence_length, limits)
        rules.check_preview_every(req.preview_every)
        rules.check_num_images(req.num_images, limits)
        rules.check_seeds(req.seeds, _optional(req, "seed"), req.num_images, limits)
        rules.check_adapters(req)
        rules.check_sources(
            bool(req.latents.blob.key), bool(req.image.key), bool(req.mask.key), _optional(req, "denoising_start")
        )

    def _checkpoints(
        self, req: dpb.DenoiseRequest, model: LoadedModel, job: WindowJob, caps: schedulers.SchedulerCaps
    ) -> WindowCheckpoints | None:
        """This window's checkpoints, when it has a name to keep them under and resumes exactly; an
        earlier attempt's checkpoint of the same request, found there, goes into the job."""
        if not req.output_key or not checkpoints.resumable(caps):
            return None
        name = checkpoints.blob_name(req.output_key)
        fingerprint = checkpoints.fingerprint(req, model.dtype, model.device)
        self.writer.settle(name, drop=False)  # a retry on this worker finds its own newest checkpoint
        found, exists = checkpoints.load(self.store, name, fingerprint, caps)
        if found is not None:
            job.resume = found
            job.seed = found.seed  # the seed the earlier attempt drew, when the request left it to chance
        return WindowCheckpoints(self.writer, name, fingerprint, caps, self.checkpoint_every, job.seed, exists)

    @staticmethod
    def _mode(req: dpb.DenoiseRequest, incoming: Incoming | None) -> str:
        if req.mask.key:
            return INPAINT
        if req.image.key:
            return IMG2IMG
        if incoming is None:
            return TXT2IMG
        if incoming.level >= 1.0:
            return IMG2IMG
        return CONTINUE if incoming.level > 0.0 else FROM_NOISE

    def _job(
        self, req: dpb.DenoiseRequest, model: LoadedModel, window: DenoiseWindow, incoming: Incoming | None
    ) -> tuple[WindowJob, schedulers.SchedulerCaps]:
        mode = self._mode(req, incoming)
        partial_in = incoming is not None and 0.0 < incoming.level < 1.0
        start = rules.window_start(
            _optional(req, "denoising_start"), incoming.level if incoming else None, bool(req.image.key)
        )
        window = DenoiseWindow(start or 0.0, window.end)
        scheduler, caps, restore = self._scheduler(req, model, incoming, window.partial)
        if window.partial:
            schedulers.check_can_split(caps)
        mu = None
        if partial_in:
            assert incoming is not None
            _check_same_schedule(incoming.handle.scheduler, scheduler)
            if incoming.handle.scheduler.HasField("mu"):
                mu = incoming.handle.scheduler.mu

        image = self._image(req.image, "image", "RGB")
        mask = self._image(req.mask, "mask", "L")
        width, height = self._size(req, model, incoming, image)
        batch = rules.check_batch(
            req.num_images, incoming.tensor.shape[0] if incoming is not None else 0, len(req.seeds)
        )
        rules.check_latent_elements(batch, model.latent_channels, width, height, model.vae_scale_factor, self.limits)
        strength = req.strength if req.HasField("strength") else model.family.default_strength(mode)
        if mode in (IMG2IMG, INPAINT):
            rules.check_runs_a_step(req.steps, strength, DEFAULTS[model.family.name].flow)
        seeds = list(req.seeds)
        if incoming is not None and not seeds and not req.HasField("seed"):
            seeds = list(incoming.handle.seeds)  # continued latents keep the seed of each image
        if seeds:
            seed = seeds[0]
        elif incoming is not None and incoming.handle.seed and not req.HasField("seed"):
            seed = incoming.handle.seed
        else:
            seed = req.seed if req.HasField("seed") else secrets.randbits(63)
        job = WindowJob(
            mode=mode,
            steps=req.steps,
            window=window,
            scheduler=scheduler,
            restore_state=restore,
            seed=seed,
            seeds=seeds if len(seeds) == batch else [],
            width=width,
            height=height,
            num_images=batch,
            prompt=req.prompt,
            negative_prompt=req.negative_prompt,
            prompt_2=req.prompt_2,
            negative_prompt_2=req.negative_prompt_2,
            prompt_3=req.prompt_3,
            negative_prompt_3=req.negative_prompt_3,
            guidance_scale=req.guidance_scale if req.HasField("guidance_scale") else None,
            guidance_rescale=req.guidance_rescale,
            max_sequence_length=req.max_sequence_length,
            latents=incoming.tensor if incoming is not None else None,
            image=image,
            mask=mask,
            strength=strength,
            mu=mu,
        )
        return job, caps

    def _scheduler(self, req: dpb.DenoiseRequest, model: LoadedModel, incoming: Incoming | None, partial: bool):
        """The scheduler for this window, and a restore function for carried-over state."""
        overrides = MessageToDict(req.scheduler_config) if req.HasField("scheduler_config") else {}
        before = incoming.handle.scheduler if incoming is not None else pb.SchedulerSpec()
        # The same model continuing its own latents keeps their schedule unless told otherwise.
        same_model = incoming is not None and bool(before.class_name) and incoming.handle.model == req.model
        name = req.scheduler or (before.class_name if same_model else "") or model.scheduler_class
        continuing = same_model and name == before.class_name and not overrides
        check_scheduler(name, overrides, partial)
        if continuing:
            scheduler = located("scheduler", lambda: schedulers.scheduler_from_json(name, before.config_json))
        else:
            scheduler = located("scheduler", lambda: schedulers.make_scheduler(name, model.scheduler_config, overrides))
        caps = schedulers.capabilities(name, scheduler.config)
        restore = None
        # A multistep scheduler continuing its own schedule gets its history back, which is what
        # makes the split exact; restore_state refuses state that does not fit this window.
        exact = continuing and before.steps == req.steps and incoming is not None and 0.0 < incoming.level < 1.0
        if exact:
            check_solver_history(caps, bool(before.state.key), req.restart_solver_history)
        if exact and caps.split == "state" and before.state.key and not req.restart_solver_history:
            state = located("latents.scheduler.state", lambda: bytes(self.store.get_bytes(before.state)))

            def restore(s: Any) -> None:
                schedulers.restore_state(s, caps, state, device=model.device)

        return scheduler, caps, restore

    def _image(self, handle: pb.BlobHandle, fld: str, mode: str) -> Image.Image | None:
        return located(fld, lambda: read_image(self.store, handle, mode, limits=self.limits)) if handle.key else None

    def _size(self, req, model: LoadedModel, incoming: Incoming | None, image: Image.Image | None) -> tuple[int, int]:
        multiple = model.family.size_multiple(model.vae_scale_factor)
        if incoming is not None:
            h, w = incoming.tensor.shape[-2:]
            size = (w * model.vae_scale_factor, h * model.vae_scale_factor)
            rules.check_same_size(req.width, req.height, *size)
            return size
        if image is not None:
            w, h = image.size
            size = (req.width or w - w % multiple, req.height or h - h % multiple)
        else:
            size = (req.width or model.default_size[0], req.height or model.default_size[1])
        rules.check_size(*size, multiple, self.limits)
        return size

    def _output(
        self, req: dpb.DenoiseRequest, model: LoadedModel, job: WindowJob, caps, result: WindowResult
    ) -> pb.LatentHandle:
        scheduler = result.scheduler
        timesteps = result.timesteps
        done = result.stop >= len(timesteps)
        T = int(scheduler.config.num_train_timesteps)
        if done:
            noise = pb.NoiseLevel(fraction=1.0, num_train_timesteps=T)
        else:
            noise = pb.NoiseLevel(
                fraction=job.window.end,
                cutoff_timestep=rules.cutoff(job.window.end, T),
                timestep=float(timesteps[result.stop]),
                sigma=_sigma_at(scheduler, result.stop),
                num_train_timesteps=T,
            )
        spec = pb.SchedulerSpec(
            class_name=type(scheduler).__name__, config_json=schedulers.config_json(scheduler), steps=job.steps
        )
        if result.mu is not None:
            spec.mu = result.mu
        if not done and caps.split == "state":
            state = schedulers.save_state(scheduler, caps)
            if state is not None:
                name = f"{req.output_key}/scheduler-state" if req.output_key else None
                spec.state.CopyFrom(self.store.put_bytes(state, media_type=STATE_MEDIA_TYPE, name=name))
        blob = self.store.put_tensor(result.latents, name=req.output_key or None)
        return pb.LatentHandle(
            blob=blob,
            space=model.space.id,
            scaling=pb.LATENT_SCALING_MODEL,
            noise=noise,
            scheduler=spec,
            seed=job.seed,
            seeds=job.seeds,
            width=job.width,
            height=job.height,
            model=req.model,
        )


# Scheduler settings that shape a flow-matching schedule: windows only line up when they agree.
SCHEDULE_SHAPE = (
    "shift",
    "use_dynamic_shifting",
    "base_shift",
    "max_shift",
    "base_image_seq_len",
    "max_image_seq_len",
    "num_train_timesteps",
)


def _optional(message: Any, fld: str) -> Any:
    return getattr(message, fld) if message.HasField(fld) else None


def _check_same_schedule(before: pb.SchedulerSpec, scheduler: Any) -> None:
    """A continuation must sit on its producer's noise schedule (SD3's shift, Flux's shifting)."""
    if not before.config_json or "FlowMatch" not in before.class_name + type(scheduler).__name__:
        return
    theirs = json.loads(before.config_json)
    for key in SCHEDULE_SHAPE:
        if key in theirs and theirs[key] != scheduler.config.get(key):
            raise FailedPrecondition(
                f"the latents were left on a schedule with {key}={theirs[key]!r}; this model's scheduler has "
                f"{key}={scheduler.config.get(key)!r}, so the windows would not line up. Set scheduler_config "
                f"{{{key}: {theirs[key]!r}}} on this stage",
                field="scheduler_config",
            )


def _sigma_at(scheduler: Any, index: int) -> float:
    """The noise level before step `index`, as a sigma."""
    sigmas = getattr(scheduler, "sigmas", None)
    if sigmas is not None and len(sigmas) > index:
        return float(sigmas[index])
    alphas = scheduler.alphas_cumprod[int(scheduler.timesteps[index])]
    return float(((1 - alphas) / alphas) ** 0.5)
