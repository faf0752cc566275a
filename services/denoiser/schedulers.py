"""Which diffusers schedulers a denoise window may split, and the multistep state that travels with the latents.

A split is exact when the second window, on a fresh scheduler of the same class and config (`set_timesteps`,
`set_begin_index`), continues as the unsplit run would: always for stateless schedulers, and for multistep ones
once their history (`save_state` -> bytes -> `restore_state`) is put back. Schedulers that draw noise in `step()`
cannot split. The state blob is safetensors: tensors as tensors, structure as JSON metadata, never pickle; a
window checkpoint (checkpoints.py) packs the same header and tensors into a blob of its own.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Mapping
from typing import Any

import diffusers
import torch
from diffusers import SchedulerMixin
from safetensors.torch import load, save

from services.common import scheduler_caps
from services.common.errors import DataLoss, FailedPrecondition, InvalidArgument
from services.common.rules.scheduler import check_name
from services.common.scheduler_caps import EXACT, NEVER, STATE, SchedulerCaps, check_can_split

__all__ = ["EXACT", "NEVER", "STATE", "SchedulerCaps", "capabilities", "check_can_split"]

_FORMAT = "baton.scheduler_state.v1"


def capabilities(class_name: str, config: Mapping) -> SchedulerCaps:
    """The common table's answer, plus whether an unknown class draws noise in step()."""
    caps = scheduler_caps.capabilities(class_name, config)
    if class_name not in scheduler_caps.KNOWN and caps.split == NEVER and not caps.stochastic:
        noisy = "generator" in inspect.signature(scheduler_class(class_name).step).parameters
        return SchedulerCaps(class_name, NEVER, (), noisy, caps.why)
    return caps


def _resolve(name: str) -> type[Any] | None:
    cls = getattr(diffusers, name, None) if name.isidentifier() else None
    ok = isinstance(cls, type) and issubclass(cls, SchedulerMixin) and cls is not SchedulerMixin
    return cls if ok else None


def scheduler_class(name: str) -> type[Any]:
    """The diffusers scheduler class called `name`."""
    cls = _resolve(name)
    if cls is not None:
        return cls
    backends = getattr(getattr(diffusers, name, None), "_backends", None)  # a dummy for a missing optional package
    if backends:
        raise FailedPrecondition(f"{name} needs {', '.join(backends)}, not installed here", field="scheduler")
    check_name(name)  # names the closest supported class
    raise InvalidArgument(f"{name} is not a diffusers scheduler class", field="scheduler")


def make_scheduler(class_name: str, base_config: Mapping, overrides: Mapping | None = None) -> Any:
    """`class_name` built from a model's scheduler config plus `overrides`, as `Scheduler.from_config` does."""
    cls = scheduler_class(class_name)
    params = inspect.signature(cls).parameters.values()
    accepted = [p.name for p in params if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]
    for key in overrides or {}:
        if key not in accepted:
            raise InvalidArgument(
                f"{class_name} has no option {key!r}; accepted: {', '.join(sorted(accepted))}", field="scheduler"
            )
    try:
        # Overrides go in as kwargs: merged into the config, from_config would drop any key the base config lists
        # in `_use_default_values`, silently keeping the default.
        return cls.from_config(dict(base_config), **dict(overrides or {}))
    except (ValueError, NotImplementedError, TypeError) as e:
        raise InvalidArgument(f"{class_name} rejected its config: {e}", field="scheduler") from e


def config_json(scheduler: Any) -> str:
    """The scheduler's config as canonical JSON (sorted, no private keys but `_class_name`), for comparing."""
    config = json.loads(scheduler.to_json_string())
    return json.dumps({k: v for k, v in config.items() if k == "_class_name" or not k.startswith("_")}, sort_keys=True)


def scheduler_from_json(class_name: str, text: str) -> Any:
    """Rebuild the scheduler that `config_json` described."""
    config = json.loads(text)
    if config.get("_class_name", class_name) != class_name:
        raise InvalidArgument(f"config of {config['_class_name']} given for {class_name}", field="scheduler")
    return scheduler_class(class_name).from_config(config)


def pack_value(value: Any, key: str, tensors: dict[str, torch.Tensor]) -> Any:
    """A JSON spec of `value` (tensors, lists, numbers, None); its tensors go, copied to the CPU, into `tensors`."""
    if isinstance(value, torch.Tensor):
        # A copy: safetensors refuses views that share storage (UniPC's timesteps are views of one tensor).
        tensors[key] = value.detach().to("cpu", copy=True).contiguous()
        spec: dict[str, Any] = {"tensor": key}
        if not value.is_contiguous() and _dense(value):
            # Memory layout changes bits: convolutions on channels-last latents (img2img's) round otherwise.
            spec["stride"] = list(value.stride())
        return spec
    if isinstance(value, list):
        return {"list": [pack_value(v, f"{key}.{i}", tensors) for i, v in enumerate(value)]}
    if value is None or isinstance(value, bool | int | float):
        return {"value": value}  # JSON round-trips these exactly (floats by repr)
    raise TypeError(f"cannot carry scheduler state {key!r} of type {type(value).__name__}")


def unpack_value(spec: dict, tensors: dict[str, torch.Tensor], device: Any) -> Any:
    """The value `spec` (from pack_value) describes, its tensors on `device` in their saved memory layout."""
    if "tensor" in spec:
        t = tensors[spec["tensor"]]
        if "stride" in spec:
            laid = torch.empty_strided(t.shape, spec["stride"], dtype=t.dtype, device=device or t.device)
            return laid.copy_(t)
        return t.to(device) if device is not None else t
    if "list" in spec:
        return [unpack_value(s, tensors, device) for s in spec["list"]]
    return spec["value"]


def _dense(t: torch.Tensor) -> bool:
    """Whether `t` fills its memory without gaps or overlaps, in some order of its dimensions."""
    expected = 1
    for size, stride in sorted((p for p in zip(t.shape, t.stride(), strict=True) if p[0] != 1), key=lambda p: p[1]):
        if stride != expected:
            return False
        expected *= size
    return True


def _steps(scheduler: Any) -> int | None:
    timesteps = getattr(scheduler, "timesteps", None)
    return None if timesteps is None else len(timesteps)


def pack_state(scheduler: Any, caps: SchedulerCaps, tensors: dict[str, torch.Tensor], prefix: str = "") -> dict:
    """The scheduler's header (class, config, steps, step index, multistep state); its tensors go, copied to the
    CPU, into `tensors` under `prefix`, so that one safetensors blob can hold them with other tensors."""
    # UniPC sets `this_order` only in its first step.
    state = {
        n: pack_value(getattr(scheduler, n), prefix + n, tensors) if hasattr(scheduler, n) else {"absent": True}
        for n in caps.state
    }
    return {
        "format": _FORMAT,
        "class": type(scheduler).__name__,
        "config": config_json(scheduler),
        "steps": _steps(scheduler),
        "step_index": getattr(scheduler, "_step_index", None),
        "state": state,
    }


def save_state(scheduler: Any, caps: SchedulerCaps) -> bytes | None:
    """The scheduler's multistep state as a safetensors blob, or None when it has none to carry."""
    if not caps.state:
        return None
    tensors: dict[str, torch.Tensor] = {}
    header = pack_state(scheduler, caps, tensors)
    return save(tensors, metadata={"baton": json.dumps(header)})


def read_blob(data: bytes | bytearray, what: str, field: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """The JSON header (metadata key "baton") and the tensors of a Baton safetensors blob."""
    try:
        size = int.from_bytes(data[:8], "little")
        header = json.loads(json.loads(data[8 : 8 + size])["__metadata__"]["baton"])
        tensors = load(bytes(data))
    except Exception as e:
        raise DataLoss(f"{what} is not a Baton safetensors blob: {e}", field=field) from e
    return header, tensors


def restore_state(scheduler: Any, caps: SchedulerCaps, data: bytes, device: Any = None) -> None:
    """Put a saved state on a fresh scheduler after `set_timesteps` and `set_begin_index`; tensors go to `device`."""
    header, tensors = read_blob(data, "scheduler state", "scheduler")
    apply_state(scheduler, caps, header, tensors, device)


def check_state(scheduler: Any, header: dict) -> None:
    """Raises unless `header` (from pack_state) fits this scheduler now: class, config, schedule, step."""
    if header.get("format") != _FORMAT:
        raise DataLoss(f"scheduler state has format {header.get('format')!r}, expected {_FORMAT!r}", field="scheduler")
    name = type(scheduler).__name__
    if header["class"] != name:
        raise FailedPrecondition(
            f"scheduler state was saved by {header['class']}, cannot continue on {name}", field="scheduler"
        )
    if header["config"] != config_json(scheduler):
        raise FailedPrecondition(f"scheduler state was saved by {name} with another config", field="scheduler")
    if header["steps"] != _steps(scheduler):
        raise FailedPrecondition(
            f"scheduler state is from a {header['steps']}-step schedule, this one has {_steps(scheduler)}",
            field="scheduler",
        )
    begin = getattr(scheduler, "begin_index", None)
    if begin is not None and header["step_index"] is not None and begin != header["step_index"]:
        raise FailedPrecondition(
            f"scheduler state was saved after step {header['step_index']}, but this window begins at step {begin}",
            field="scheduler",
        )


def apply_state(
    scheduler: Any, caps: SchedulerCaps, header: dict, tensors: dict[str, torch.Tensor], device: Any = None
) -> None:
    """Puts the state `header` and `tensors` describe (from pack_state) on a scheduler, after checking it fits."""
    check_state(scheduler, header)
    values = {}
    for n in caps.state:
        spec = header["state"].get(n)
        if spec is None:
            raise DataLoss(f"scheduler state lacks {n!r}", field="scheduler")
        if "absent" not in spec:
            try:
                values[n] = unpack_value(spec, tensors, device)
            except (KeyError, TypeError, ValueError, RuntimeError) as e:
                raise DataLoss(f"scheduler state {n!r} is damaged: {e}", field="scheduler") from e
    for n, value in values.items():  # all or nothing: a damaged state leaves the scheduler as it was
        setattr(scheduler, n, value)
