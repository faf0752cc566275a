"""Checkpoints inside a denoise window, so that a window cut short (a drained or lost worker, a
cancelled call) resumes on its next attempt where it stopped, with the bits an uninterrupted run has.

A checkpoint is one safetensors blob named `{output_key}/checkpoint`: the loop's latents as the
family holds them (Flux: packed), the scheduler's multistep state (schedulers.pack_state), and a
JSON header with the window steps done, the seed used and a fingerprint of everything that decides
the result. Only schedulers that resume exactly are checkpointed: those that split exactly, and
second-order ones only between whole steps. Ancestral and SDE schedulers draw noise from a
generator whose position does not travel; their windows restart from their first step instead.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import save

from services.common.api.baton.v1 import denoiser_pb2 as dpb
from services.common.blobs import BlobStore
from services.common.errors import BatonError, BlobNotFound, Draining
from services.denoiser import schedulers
from services.denoiser.schedulers import EXACT, STATE, SchedulerCaps

if TYPE_CHECKING:  # the families import this module
    from services.denoiser.families.base import StepHooks, WindowJob

log = logging.getLogger("baton.denoiser.checkpoints")

FORMAT = "baton.window_checkpoint.v1"
MEDIA_TYPE = "application/x-safetensors"
LATENTS = "latents"
STATE_PREFIX = "scheduler."
# Request fields that shape a call's progress events without changing its result.
NOT_IN_FINGERPRINT = ("preview_every",)


def blob_name(output_key: str) -> str:
    return f"{output_key}/checkpoint"


def fingerprint(req: dpb.DenoiseRequest, dtype: torch.dtype, device: str) -> str:
    """What decides a window's result: the request (less its labels), the model's dtype and device type."""
    essential = dpb.DenoiseRequest()
    essential.CopyFrom(req)
    for name in NOT_IN_FINGERPRINT:
        essential.ClearField(name)
    digest = hashlib.sha256(essential.SerializeToString(deterministic=True))
    digest.update(f"|{dtype}|{torch.device(device).type}".encode())
    return digest.hexdigest()


def resumable(caps: SchedulerCaps) -> bool:
    """Whether a fresh scheduler given this one's state continues exactly (no noise drawn in step())."""
    return caps.split in (EXACT, STATE)


def at_whole_step(scheduler: Any) -> bool:
    """Second-order schedulers (Heun, KDPM2) hold half a step between their two calls: no checkpoint there."""
    return bool(getattr(scheduler, "state_in_first_order", True))


@dataclass
class Snapshot:
    """A window's state after some steps, already copied to the CPU: serialising it can wait."""

    header: dict
    tensors: dict[str, torch.Tensor]

    def to_bytes(self) -> bytes:
        return save(self.tensors, metadata={"baton": json.dumps(self.header)})


def snapshot(
    latents: torch.Tensor, scheduler: Any, caps: SchedulerCaps, *, fingerprint: str, step: int, total: int, seed: int
) -> Snapshot:
    """Copies what resuming after `step` of `total` window steps needs; runs on the denoise thread."""
    tensors: dict[str, torch.Tensor] = {}
    header = {
        "format": FORMAT,
        "fingerprint": fingerprint,
        "step": step,
        "total": total,
        "seed": seed,
        "latents": schedulers.pack_value(latents, LATENTS, tensors),
        "scheduler": schedulers.pack_state(scheduler, caps, tensors, prefix=STATE_PREFIX),
    }
    return Snapshot(header, tensors)


@dataclass
class Checkpoint:
    """A checkpoint read back for this very request: where its window stood."""

    step: int
    total: int
    seed: int
    header: dict
    tensors: dict[str, torch.Tensor]
    caps: SchedulerCaps

    def misfit(self, scheduler: Any, begin: int, total: int, latents: torch.Tensor) -> str:
        """Why this checkpoint does not fit the window as prepared now; empty when it does."""
        if total != self.total:
            return f"it is from a {self.total}-step window, this one has {total} steps"
        saved = self.tensors[LATENTS]
        if latents.shape != saved.shape or latents.dtype != saved.dtype:
            return (
                f"its latents are {saved.dtype} {list(saved.shape)}, the window's are "
                f"{latents.dtype} {list(latents.shape)}"
            )
        step_index = self.header["scheduler"].get("step_index")
        if step_index is not None and hasattr(scheduler, "set_begin_index") and step_index != begin + self.step:
            return f"its scheduler stood at index {step_index}, this window's would at {begin + self.step}"
        return ""

    def resume(self, scheduler: Any, begin: int, device: Any) -> torch.Tensor:
        """Puts the scheduler where the checkpoint left it; returns the latents to go on from."""
        latents = schedulers.unpack_value(self.header["latents"], self.tensors, device)
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(begin + self.step)
        schedulers.apply_state(scheduler, self.caps, self.header["scheduler"], self.tensors, device)
        return latents


def load(store: BlobStore, name: str, fingerprint: str, caps: SchedulerCaps) -> tuple[Checkpoint | None, bool]:
    """The checkpoint under `name` when it was taken for this very request, and whether any blob is there.

    Anything that does not fit is logged and ignored: the window then runs from its first step,
    which is always right, only slower.
    """
    try:
        data = store.get_bytes(name)
    except BlobNotFound:
        return None, False
    except BatonError as exc:  # corrupt, or Redis away for a moment
        log.warning("cannot read checkpoint %s, running the window from its start: %s", name, exc)
        return None, True
    try:
        header, tensors = schedulers.read_blob(data, f"checkpoint {name}", "output_key")
        if header.get("format") != FORMAT:
            raise ValueError(f"format {header.get('format')!r}, expected {FORMAT!r}")
        if header["fingerprint"] != fingerprint:
            log.info("checkpoint %s belongs to another request; running the window from its start", name)
            return None, True
        if header["scheduler"]["class"] != caps.name:
            raise ValueError(f"saved by {header['scheduler']['class']}, this window runs {caps.name}")
        step, total = int(header["step"]), int(header["total"])
        if not 0 < step < total:
            raise ValueError(f"step {step} of {total}")
        if header["latents"].get("tensor") != LATENTS or LATENTS not in tensors:
            raise ValueError("it holds no latents")
        found = Checkpoint(step, total, int(header["seed"]), header, tensors, caps)
    except (BatonError, KeyError, TypeError, ValueError) as exc:
        log.warning("ignoring checkpoint %s, running the window from its start: %s", name, exc)
        return None, True
    return found, True


def resume_window(
    job: WindowJob, hooks: StepHooks, scheduler: Any, begin: int, stop: int, latents: torch.Tensor
) -> tuple[torch.Tensor, int]:
    """For a family's loop, after it prepared everything as usual: the latents to start from and the
    window step to start at, which are the checkpoint's when the job has one that fits."""
    found = job.resume
    if found is None:
        return latents, 0
    why = found.misfit(scheduler, begin, stop - begin, latents)
    if not why:
        try:
            resumed = found.resume(scheduler, begin, latents.device)
        except (BatonError, KeyError, RuntimeError) as exc:  # a damaged blob: never worth failing the window
            why = str(exc)
    if why:
        log.warning("not resuming from the checkpoint: %s; running the window from its start", why)
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(begin)
        return latents, 0
    hooks.resumed(found.step, found.total)
    return resumed, found.step


class CheckpointWriter:
    """Serialises and writes checkpoints on a thread of its own, so the denoise thread only copies.

    Only the newest checkpoint of a window waits: one that a newer one overtakes before its turn
    is dropped. A failed write is logged and the window goes on; its next checkpoint may land.
    """

    def __init__(self, store: BlobStore):
        self.store = store
        self._pending: dict[str, Snapshot] = {}
        self._writing = ""
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None

    def submit(self, name: str, snap: Snapshot) -> None:
        with self._cond:
            self._pending[name] = snap
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="checkpoint-writer", daemon=True)
                self._thread.start()
            self._cond.notify_all()

    def settle(self, name: str, *, drop: bool) -> None:
        """Waits until nothing of `name` is pending or being written; `drop` discards what still waits."""
        with self._cond:
            if drop:
                self._pending.pop(name, None)
            self._cond.wait_for(lambda: name not in self._pending and self._writing != name)

    def write(self, name: str, snap: Snapshot) -> None:
        self.store.put_bytes(snap.to_bytes(), media_type=MEDIA_TYPE, name=name)

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: bool(self._pending))
                name = next(iter(self._pending))
                snap = self._pending.pop(name)
                self._writing = name
            try:
                self.write(name, snap)
            except Exception as exc:  # Redis full or away: the window must not fail for it
                log.warning("checkpoint %s not written: %s", name, exc)
            finally:
                with self._cond:
                    self._writing = ""
                    self._cond.notify_all()


class WindowCheckpoints:
    """One window's checkpoints: every `every` steps in the background, and one at hand-off on drain."""

    def __init__(
        self,
        writer: CheckpointWriter,
        name: str,
        fingerprint: str,
        caps: SchedulerCaps,
        every: int,
        seed: int,
        found: bool,
    ):
        self.writer = writer
        self.name = name
        self.fingerprint = fingerprint
        self.caps = caps
        self.every = every
        self.seed = seed
        # Steps done in the newest checkpoint, written or resumed from (0: none).
        self.saved = 0
        # Whether a blob lies under `name` that the finished window should remove.
        self.found = found
        self.total = 0
        self._latest: tuple[int, int, torch.Tensor, Any] | None = None

    def resumed(self, step: int, total: int) -> None:
        self.saved, self.total = step, total

    def after_step(self, done: int, total: int, latents: torch.Tensor, scheduler: Any) -> bool:
        """Called after each step with the loop's latents; True when this step was checkpointed."""
        self._latest = (done, total, latents, scheduler)
        self.total = total
        due = self.every and done < total and done - self.saved >= self.every
        if not due or not at_whole_step(scheduler):
            return False
        self.writer.submit(self.name, self._snapshot(done, total, latents, scheduler))
        self.saved = done
        self.found = True
        return True

    def can_hand_off(self) -> bool:
        """False between the two halves of a second-order step, where no exact checkpoint exists."""
        return self._latest is None or at_whole_step(self._latest[3])

    def hand_off(self) -> Draining:
        """Makes sure the newest state is stored (writing it now if need be); the error that ends the window."""
        if self._latest is not None and self._latest[0] > self.saved:
            done, total, latents, scheduler = self._latest
            self.writer.settle(self.name, drop=True)  # an older write must not land after this one
            try:
                self.writer.write(self.name, self._snapshot(done, total, latents, scheduler))
            except Exception as exc:
                log.warning("checkpoint %s not written at hand-off: %s", self.name, exc)
                return Draining(
                    f"this worker is shutting down after step {done} of {total}; the checkpoint "
                    f"could not be written ({exc}), so another worker resumes from an earlier one "
                    "or the start"
                )
            self.saved = done
            self.found = True
        else:
            self.writer.settle(self.name, drop=False)
        if self.saved == 0:
            return Draining("this worker is shutting down before the window's first step; another worker runs it")
        return Draining(
            f"this worker is shutting down: checkpointed after step {self.saved} of {self.total}; "
            "another worker resumes it"
        )

    def finish(self, store: BlobStore) -> None:
        """The window is done: its checkpoint is of no more use. Removing it is tidiness, not a duty (it expires)."""
        if not self.found:
            return
        self.writer.settle(self.name, drop=True)
        try:
            store.delete(self.name)
        except BatonError as exc:
            log.info("checkpoint %s left to expire: %s", self.name, exc)

    def _snapshot(self, done: int, total: int, latents: torch.Tensor, scheduler: Any) -> Snapshot:
        return snapshot(
            latents, scheduler, self.caps, fingerprint=self.fingerprint, step=done, total=total, seed=self.seed
        )
