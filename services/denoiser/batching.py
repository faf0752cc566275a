"""Step-level batching: the windows in flight on one model run each step as one network call.

Each window runs in its own thread as before: it prepares its inputs, steps its own scheduler
(with its own state), reports progress and checkpoints. Only the denoising network's forward
pass is shared. A window hands its step's inputs to the model's StepBatcher as a NetCall and
waits; the batcher groups the calls that can share a forward (the same network and the same
shapes, dtype and arguments after the batch dimension: so the same resolution, guidance mode and
prompt length; and the same LoRAs at the same weights, adapters.py), concatenates their
per-sample inputs along the batch dimension, runs one forward, and hands each window its own
rows back. Classifier-free guidance halves stay each window's own
rows, so they batch too.

Windows step in lockstep: a batch starts once every window that has begun stepping has its next
call in (or STRAGGLER_S has passed, so one slow window never stalls the rest), after an optional
wait (`wait_s`, counted from the oldest call) for windows that are in but still preparing. A new
window joins at the next step boundary: its first call lands in the next batch. A window leaves
when its loop ends, fails or is cancelled, and the others go on without it. A call that ends up
alone runs exactly as it would without batching.

Exactness: each row of a batched forward is what a forward of that window alone gives, up to the
last bits: CPU (and GPU) GEMM kernels choose their path by the number of rows, so a row can differ
from its alone value by float rounding (tests/test_batching.py measures it and states the
tolerance). A window whose forwards all ran alone is bit-identical to a run without batching.
Cancel inside a step (interrupt.py) stops a batched forward only when every window in it is
cancelled; otherwise a cancelled window leaves at its next step boundary.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from services.denoiser import interrupt

# A window that has stepped before but has not sent its next call within this long is left for
# the next batch (its between-step work: a checkpoint snapshot, a preview, a slow hook).
STRAGGLER_S = 0.5
# Samples (rows, both halves of classifier-free guidance counted) per forward on a CPU; on an
# accelerator the limit comes from its free memory (SampleBudget).
CPU_MAX_SAMPLES = 32


@dataclass
class NetCall:
    """One window's network call for one step: keyword arguments with a batch dimension (`rows`,
    concatenated across windows; a 0-d tensor is one value for every row), and arguments that are
    the same for every row (`same`, which batchmates must have equal)."""

    network: Any
    rows: dict[str, Any]
    same: dict[str, Any] = field(default_factory=dict)
    # Cuts a shared forward's output into each call's part, given their row counts, where the
    # output is not one tensor (a VAE's posterior); calls on one network share it.
    split: Callable[[Any, list[int]], list[Any]] | None = None
    # The adapters (LoRAs) the network runs with for this call, set before its forward: an object
    # with `apply(network)`, hashable (adapters.ActiveLoras); batchmates have equal ones.
    adapters: Any = None

    @property
    def size(self) -> int:
        for value in _tensors(self.rows):
            if value.dim() > 0:
                return int(value.shape[0])
        raise ValueError("a NetCall needs one argument with a batch dimension")

    def key(self) -> tuple:
        """What batchmates must share: the network, each argument's shape after the batch
        dimension, dtype and device, and the shared arguments' shapes (their values are compared
        where a batch forms: StepBatcher._chunks)."""
        rows = tuple(sorted((name, _signature(value)) for name, value in _flat(self.rows)))
        same = tuple(sorted((name, _signature(value, whole=True)) for name, value in self.same.items()))
        return id(self.network), rows, same, self.adapters

    def alone(self) -> torch.Tensor:
        """The forward as the window would run it without batching."""
        if self.adapters is not None:
            self.adapters.apply(self.network)
        return self.network(**self.rows, **self.same, return_dict=False)[0]


def forward(calls: list[NetCall]) -> list[torch.Tensor]:
    """One forward for `calls` (which share a key), each call's rows of the output back."""
    if len(calls) == 1:
        return [calls[0].alone()]
    sizes = [call.size for call in calls]
    if calls[0].adapters is not None:
        calls[0].adapters.apply(calls[0].network)
    rows = _concat([call.rows for call in calls], sizes)
    out = calls[0].network(**rows, **calls[0].same, return_dict=False)[0]
    if calls[0].split is not None:
        return calls[0].split(out, sizes)
    return list(out.split(sizes))


class SampleBudget:
    """How many samples one forward may take: fixed on a CPU (or when given), else from the
    accelerator's free memory and what one sample's forward cost the first time it was measured."""

    def __init__(self, max_samples: int = 0, device: str = "cpu"):
        self.fixed = max_samples
        self.device = torch.device(device)
        self.per_sample: int | None = None

    def limit(self) -> int:
        if self.fixed > 0:
            return self.fixed
        if self.device.type != "cuda" or self.per_sample is None:
            return CPU_MAX_SAMPLES if self.device.type != "cuda" else 1
        free, _total = torch.cuda.mem_get_info(self.device)
        return max(1, int(0.8 * free / self.per_sample))

    @contextlib.contextmanager
    def measure(self, samples: int) -> Iterator[None]:
        """Measures one forward's peak memory per sample (accelerators, until measured once)."""
        if self.fixed > 0 or self.device.type != "cuda" or self.per_sample is not None:
            yield
            return
        torch.cuda.reset_peak_memory_stats(self.device)
        before = torch.cuda.memory_allocated(self.device)
        yield
        peak = torch.cuda.max_memory_allocated(self.device) - before
        self.per_sample = max(1, peak // max(samples, 1))


class Member:
    """A window in the batcher, from its first step to its loop's end; `check` raises when the
    window is cancelled or past its deadline (the window's check inside a step, interrupt.py)."""

    def __init__(self, batcher: StepBatcher, check: Callable[[], None]):
        self.batcher = batcher
        self.check = check
        self.stepping = False

    def forward(self, call: NetCall) -> torch.Tensor:
        """The network's output for this window's call, from a forward it may share with others."""
        return self.batcher._submit(self, call)


@dataclass
class _Pending:
    member: Member
    call: NetCall
    at: float
    result: torch.Tensor | None = None
    error: BaseException | None = None
    done: bool = False


class StepBatcher:
    """One model's shared forward passes (see the module docstring)."""

    def __init__(
        self,
        budget: SampleBudget | None = None,
        wait_s: float = 0.0,
        on_forward: Callable[[int], None] = lambda calls: None,
    ):
        self.budget = budget or SampleBudget()
        self.wait_s = wait_s
        # Told how many calls each forward served (the denoiser's metrics count its network's).
        self.on_forward = on_forward
        self._cond = threading.Condition()
        self._members: set[Member] = set()
        self._pending: list[_Pending] = []
        self._busy = False
        self._free_at = 0.0  # when the last forward ended
        # How many forwards ran and how many calls they served, for tests and benchmarks.
        self.forwards = 0
        self.calls = 0

    @contextlib.contextmanager
    def window(self, check: Callable[[], None] = lambda: None) -> Iterator[Member]:
        """A window's membership while its loop runs; it leaves however the loop ends."""
        member = Member(self, check)
        with self._cond:
            self._members.add(member)
        try:
            yield member
        finally:
            with self._cond:
                self._members.discard(member)
                self._cond.notify_all()

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        """No forward runs while the block does (loading an adapter changes the network's layers)."""
        with self._cond:
            while self._busy:
                self._cond.wait()
            self._busy = True
        try:
            yield
        finally:
            with self._cond:
                self._busy = False
                self._cond.notify_all()

    @property
    def windows(self) -> int:
        with self._cond:
            return len(self._members)

    # -- the batch loop: whichever waiting window finds a batch ready runs it ---------------
    def _submit(self, member: Member, call: NetCall) -> torch.Tensor:
        pending = _Pending(member, call, time.monotonic())
        with self._cond:
            member.stepping = True
            self._pending.append(pending)
            self._cond.notify_all()
            while not pending.done:
                wait = self._ready_in()
                if wait == 0.0:
                    self._lead()
                else:
                    self._cond.wait(wait)
        if pending.error is not None:
            raise pending.error
        assert pending.result is not None
        return pending.result

    def _ready_in(self) -> float | None:
        """0 when a batch should start now; else how long to wait before asking again (None: until
        something changes). Called with the lock held."""
        if self._busy or not self._pending:
            return None
        now = time.monotonic()
        oldest = min(p.at for p in self._pending)
        waiting_for = [m for m in self._members if m.stepping and not any(p.member is m for p in self._pending)]
        # Counted from when the last forward ended, not from the oldest call: a call that came in
        # during a long forward must still wait for the windows that were in that forward.
        since = max(oldest, self._free_at)
        if waiting_for and now - since < STRAGGLER_S:
            return STRAGGLER_S - (now - since)
        # The fill wait is for windows about to join: ones that are in but have not stepped yet.
        joining = any(not m.stepping for m in self._members)
        samples = sum(p.call.size for p in self._pending)
        if self.wait_s > 0 and joining and samples < self.budget.limit() and now - oldest < self.wait_s:
            return self.wait_s - (now - oldest)
        return 0.0

    def _lead(self) -> None:
        """Runs every pending call, in forwards of compatible calls, with the lock released while
        a forward runs. Called with the lock held."""
        batch, self._pending, self._busy = self._pending, [], True
        try:
            for chunk in self._chunks(batch):
                self._cond.release()
                try:
                    self._run(chunk)
                finally:
                    self._cond.acquire()
                self._cond.notify_all()  # its windows go on while the next chunk runs
        finally:
            self._busy, self._free_at = False, time.monotonic()
            self._cond.notify_all()

    def _chunks(self, batch: list[_Pending]) -> list[list[_Pending]]:
        groups: dict[tuple, list[list[_Pending]]] = {}
        for pending in batch:  # arrival order within a group; groups in order of their first call
            alike = groups.setdefault(pending.call.key(), [])
            # Shared arguments must be equal, not only alike: compared only where a group forms.
            group = next((g for g in alike if _same_equal(g[0].call, pending.call)), None)
            if group is None:
                alike.append([pending])
            else:
                group.append(pending)
        limit = self.budget.limit()
        chunks = []
        for group in (g for alike in groups.values() for g in alike):
            chunk: list[_Pending] = []
            for pending in group:
                if chunk and sum(p.call.size for p in chunk) + pending.call.size > limit:
                    chunks.append(chunk)
                    chunk = []
                chunk.append(pending)
            chunks.append(chunk)
        return chunks

    def _run(self, chunk: list[_Pending]) -> None:
        members = [p.member for p in chunk]

        def all_cancelled() -> None:
            """Stops the forward when every window in it stopped, with the first one's reason."""
            first: Exception | None = None
            for member in members:
                try:
                    member.check()
                except Exception as exc:
                    first = first or exc
                else:
                    return
            if first is not None:
                raise first

        try:
            # On the thread of the window that leads the batch: a dedicated forward thread would
            # add an OpenMP team beside the windows' own (measured on 2 cores: a lone tiny-UNet
            # step 30 ms inline, 56 ms handed to another thread).
            samples = sum(p.call.size for p in chunk)
            with interrupt.checking(all_cancelled), self.budget.measure(samples), torch.no_grad():
                outputs = forward([p.call for p in chunk])
            for pending, output in zip(chunk, outputs, strict=True):
                pending.result = output
        except BaseException as exc:
            for pending in chunk:
                pending.error = exc
        for pending in chunk:
            pending.done = True
        self.forwards += 1
        self.calls += len(chunk)
        self.on_forward(len(chunk))


def _flat(rows: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    for name, value in rows.items():
        if isinstance(value, dict):
            yield from _flat(value, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}", value


def _tensors(rows: dict[str, Any]) -> Iterator[torch.Tensor]:
    return (value for _, value in _flat(rows) if isinstance(value, torch.Tensor))


def _signature(value: Any, whole: bool = False) -> Any:
    if not isinstance(value, torch.Tensor):
        return repr(value)
    shape = tuple(value.shape) if whole or value.dim() == 0 else tuple(value.shape[1:])
    return shape, value.dim() == 0, str(value.dtype), str(value.device)


def _same_equal(a: NetCall, b: NetCall) -> bool:
    return all(
        torch.equal(value, b.same[name]) if isinstance(value, torch.Tensor) else value == b.same[name]
        for name, value in a.same.items()
    )


def _concat(all_rows: list[dict[str, Any]], sizes: list[int]) -> dict[str, Any]:
    """The calls' rows as one set of arguments: tensors concatenated along the batch dimension
    (a 0-d one expanded to its call's rows first), nested dicts (added_cond_kwargs) alike."""
    out: dict[str, Any] = {}
    for name, first in all_rows[0].items():
        values = [rows[name] for rows in all_rows]
        if isinstance(first, dict):
            out[name] = _concat(values, sizes)
        elif isinstance(first, torch.Tensor):
            pairs = zip(values, sizes, strict=True)
            out[name] = torch.cat([v.reshape(1).expand(n) if v.dim() == 0 else v for v, n in pairs])
        else:  # None (or a plain value), the same for every call: the key says so
            out[name] = first
    return out
