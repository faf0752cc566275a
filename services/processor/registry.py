"""The processor registry: a processor is a function registered with its name, help and typed
arguments. Adding one is adding a module that registers itself (in `processors/`, or named by
`--plugins`); nothing else changes.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from services.common.api.baton.v1 import handles_pb2 as pb
from services.common.api.baton.v1 import processor_pb2 as ppb
from services.common.processor_uri import BASE_ARGS


@dataclass
class Latents:
    """A tensor with the handle that says what it is; processors update both."""

    tensor: torch.Tensor
    handle: pb.LatentHandle

    def with_tensor(self, tensor: torch.Tensor) -> Latents:
        handle = pb.LatentHandle()
        handle.CopyFrom(self.handle)
        handle.ClearField("blob")
        return Latents(tensor, handle)


@dataclass
class Context:
    """What a processor may use besides its inputs."""

    device: str
    model_offload: bool = False
    # Converts a handle's latents to another space through the interposer service.
    convert: Callable[..., pb.LatentHandle] | None = None
    store: Any = None
    # The Process call's deadline (a time.time()), for calls to other workers.
    deadline: float = 0.0


@dataclass(frozen=True)
class ProcessorDef:
    name: str
    help: str
    args: tuple[ppb.ProcessorArg, ...]
    inputs: int
    fn: Callable[..., Latents]

    def info(self) -> ppb.ProcessorInfo:
        return ppb.ProcessorInfo(name=self.name, help=self.help, args=[*self.args, *BASE_ARGS], inputs=self.inputs)


REGISTRY: dict[str, ProcessorDef] = {}


def arg(
    name: str,
    type: str,
    default: str = "",
    help: str = "",
    *,
    required: bool = False,
    min: float | None = None,
    max: float | None = None,
    choices: tuple[str, ...] = (),
) -> ppb.ProcessorArg:
    """One declared argument: its type (int, float, bool, str), default in URI form, range, choices."""
    out = ppb.ProcessorArg(name=name, type=type, default=default, help=help, required=required, choices=choices)
    if min is not None:
        out.min = min
    if max is not None:
        out.max = max
    return out


def processor(name: str, help: str, *args: ppb.ProcessorArg, inputs: int = 1) -> Callable:
    """Registers `fn(ctx, latents, *more_latents, **args) -> Latents` as processor `name`."""

    def register(fn: Callable[..., Latents]) -> Callable[..., Latents]:
        REGISTRY[name] = ProcessorDef(name, help, tuple(args), inputs, fn)
        return fn

    return register


def load_builtin() -> None:
    """Imports every module of services.processor.processors (each registers itself)."""
    from services.processor import processors

    for module in pkgutil.iter_modules(processors.__path__):
        importlib.import_module(f"{processors.__name__}.{module.name}")


def load_plugins(names: str) -> None:
    """Imports extra processor modules (comma-separated dotted names)."""
    for name in filter(None, (n.strip() for n in names.split(","))):
        importlib.import_module(name)
