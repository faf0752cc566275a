"""Cancel and deadline checks inside a model call, not only between the steps of a window.

A window checks its cancel flag and deadline before every step (EngineHooks.before), but one step
of a large image can take minutes: a 4096x4096 job cancelled right after Submit kept its worker
busy for over four minutes, and every later job waited behind it. So, while a window runs, a
forward pre-hook on every block of its networks makes the same check, and a cancel takes effect
within one block instead of one step.

The rule: the blocks are the elements of the networks' nn.ModuleList attributes, found by structure
down to two lists deep (a UNet's down/mid/up blocks and their resnets and attentions, SD3's and
Flux's transformer blocks, the VAE's encoder and decoder blocks), never by one model's names, so it
holds for every family. The check is a flag read and a monotonic clock, and a pre-hook that returns
None passes the block's inputs on untouched, so results stay bit-for-bit what they were. The hooks
are installed while any window runs on the networks and removed when the last one ends; each
runs the check of whoever makes the call (a context variable): the window's own, or, for a
forward that several windows share (batching.py), one that stops it only when all of them are
cancelled. A drain's hand-off is not checked here: it needs a step boundary to checkpoint at.

On an accelerator the host queues kernels ahead of the device: unheld, it would pass every block of
a step long before the device ran them, and a cancel seen at a block would leave the rest of the
step queued. So at each block the host also waits until the device has begun the block AHEAD blocks
back (DevicePace); the device's queue never runs dry, so windows run as fast as before.
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

# nn.ModuleList levels that blocks are taken from: a UNet's down_blocks[i], then their resnets[j].
DEPTH = 2
# Blocks the host may run ahead of an accelerator: a cancel leaves at most this much queued work.
AHEAD = 4


def blocks(network: nn.Module, depth: int = DEPTH) -> list[nn.Module]:
    """The elements of `network`'s nn.ModuleLists, down to `depth` lists deep, in module order."""
    found: dict[int, nn.Module] = {}

    def walk(module: nn.Module, level: int) -> None:
        for child in module.children():
            if not isinstance(child, nn.ModuleList):
                walk(child, level)  # a mid block or an encoder: its lists are on this level
                continue
            for block in child:
                found.setdefault(id(block), block)
                if level + 1 < depth:
                    walk(block, level + 1)

    walk(network, 0)
    return list(found.values())


class DevicePace:
    """Holds the host at most `ahead` blocks ahead of the device's queue; nothing to do on a CPU."""

    def __init__(self, device: torch.device, ahead: int = AHEAD) -> None:
        self.stream = None if device.type in ("cpu", "meta") else torch.accelerator.current_stream(device)
        self.ahead = ahead
        self.marks: deque[torch.Event] = deque()
        self.lock = threading.Lock()

    def __call__(self) -> None:
        if self.stream is None:
            return
        with self.lock:  # windows on one network share it (a VAE: a window's input and a Decode)
            self.marks.append(self.stream.record_event())
            oldest = self.marks.popleft() if len(self.marks) > self.ahead else None
        if oldest is not None:
            oldest.synchronize()


def _device(network: nn.Module) -> torch.device:
    return next((p.device for p in network.parameters()), torch.device("cpu"))


# The check that the blocks now running call: set by the window (or the batch) making the call.
_CHECK: contextvars.ContextVar[Callable[[], None] | None] = contextvars.ContextVar("baton_interrupt", default=None)


class _Hooks:
    """The hooks on one network's blocks, installed once for every window that uses it."""

    def __init__(self, network: nn.Module):
        pace = DevicePace(_device(network))

        def hook(module: nn.Module, args: Any) -> None:
            pace()
            check = _CHECK.get()
            if check is not None:
                check()

        self.users = 0
        self.handles: list[RemovableHandle] = [block.register_forward_pre_hook(hook) for block in blocks(network)]

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


_installed: dict[int, _Hooks] = {}
_lock = threading.Lock()


@contextlib.contextmanager
def checking(check: Callable[[], None]) -> Iterator[None]:
    """Runs `check` before every block of the hooked networks that this context calls."""
    token = _CHECK.set(check)
    try:
        yield
    finally:
        _CHECK.reset(token)


@contextlib.contextmanager
def checked(networks: Iterable[nn.Module | None], check: Callable[[], None]) -> Iterator[None]:
    """Runs `check` before every block of `networks` that this context calls, while it lasts; `check`
    raises to stop."""
    used = [n for n in networks if n is not None]
    with _lock:
        for network in used:
            if id(network) not in _installed:
                _installed[id(network)] = _Hooks(network)
            _installed[id(network)].users += 1
    try:
        with checking(check):
            yield
    finally:
        with _lock:
            for network in used:
                hooks = _installed[id(network)]
                hooks.users -= 1
                if hooks.users == 0:
                    hooks.remove()
                    del _installed[id(network)]
