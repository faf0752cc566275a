"""Overrides of a JobSpec's fields by dotted path, as batch rows, `--set` and `every_row` give them,
applied to the spec's JSON mapping (json_format.MessageToDict with proto field names).

Override paths (a JSONL key or a CSV column; also `--set` / `every_row`, which rows override):
  name, seed, width, height, timeout_s     the JobSpec's own fields (seed -1: a random seed)
  labels.<key>                             one label
  inputs.<input>                           that input's file path (relative: to the rows file's folder;
                                           in every_row, to the current one)
  stages.<stage>.<kind>.<field>            any field of that stage (a list for repeated ones: processors)
  stages.<stage>.<field>                   the same, the kind taken from the stage
  <denoise field>                          prompt, negative_prompt, steps, guidance_scale, scheduler, ...:
                                           that field in every denoise stage (model, latents, image, mask
                                           and the window's ends only where the spec has one denoise stage)
A string for a field that is not a string (a CSV cell, a --set value) is read as YAML (`4`, `7.5`,
`[a, b]`); an empty CSV cell and a null leave the field as the spec has it; seed -1 unsets it
(a random seed, as in a spec file).
"""

from __future__ import annotations

import contextlib
import difflib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import yaml
from google.protobuf.descriptor import Descriptor, FieldDescriptor

from services.common.api.baton.v1 import jobs_pb2 as jpb
from services.common.errors import InvalidArgument
from services.common.spec_document import check_value

_F = FieldDescriptor
_JOB = cast(Descriptor, jpb.JobSpec.DESCRIPTOR)
_STAGE = cast(Descriptor, jpb.StageSpec.DESCRIPTOR)
_DENOISE = cast(Descriptor, jpb.DenoiseStage.DESCRIPTOR)
KINDS = tuple(f.name for f in _STAGE.oneofs_by_name["kind"].fields)
JOB_SCALARS = ("name", "seed", "width", "height", "timeout_s")
# Denoise fields that place a stage in its pipeline: the same value in every stage means nothing.
PER_STAGE = ("model", "latents", "image", "mask", "denoising_start", "denoising_end")


@dataclass
class Target:
    """Where an override goes: a key of a dict in the spec's JSON mapping, and its field."""

    holder: dict[str, Any]
    key: str
    field: FieldDescriptor
    is_input: bool = False  # an input's path: resolved against the rows' folder; its blob dropped


def apply_override(data: dict[str, Any], path: str, value: Any, base: Path) -> None:
    """Sets `path` (see the module docstring) to `value` in a JobSpec's JSON-mapping dict; an
    InvalidArgument names the path and what would do."""
    targets = _targets(data, path)
    if value is None:
        return  # a null, like an empty CSV cell, leaves the field as the spec has it
    checked = check_value(_coerce(value, targets[0].field), targets[0].field, path)
    for target in targets:
        if checked is None:
            target.holder.pop(target.key, None)
        elif target.is_input:
            for rival in ("blob", "latents"):  # the other members of the input's oneof
                target.holder.pop(rival, None)
            target.holder[target.key] = str(_resolved(checked, base))
        else:
            target.holder[target.key] = checked


def _targets(data: dict[str, Any], path: str) -> list[Target]:
    head, _, rest = path.partition(".")
    if head == "labels" and rest:
        labels = data.setdefault("labels", {})
        return [Target(labels, rest, _message(_JOB.fields_by_name["labels"]).fields_by_name["value"])]
    if head == "inputs" and rest:
        found = next((i for i in data.get("inputs", []) if i.get("name") == rest), None)
        if found is None:
            names = ", ".join(i.get("name", "") for i in data.get("inputs", [])) or "none"
            raise InvalidArgument(f"{path}: the spec has no input {rest!r}; its inputs: {names}")
        return [Target(found, "path", cast(Descriptor, jpb.InputSpec.DESCRIPTOR).fields_by_name["path"], True)]
    if head == "stages" and rest:
        return [_stage_target(data, path, rest)]
    name = _field(_JOB, head)
    if rest == "" and name is not None and name.name in JOB_SCALARS:
        return [Target(data, name.name, name)]
    name = _field(_DENOISE, head)
    if rest == "" and name is not None:
        return _denoise_targets(data, path, name)
    if head in ("stages", "inputs", "labels", "outputs"):
        raise InvalidArgument(f"{path}: name a field inside it: stages.<stage>.<field>, inputs.<input>, labels.<key>")
    close = difflib.get_close_matches(path, [*JOB_SCALARS, *(f.name for f in _DENOISE.fields)], n=1)
    hint = (
        f'did you mean "{close[0]}"?'
        if close
        else (
            f"paths are {', '.join(JOB_SCALARS)}, a denoise field (prompt, steps, ...), labels.<key>, inputs.<input>, "
            "stages.<stage>.<kind>.<field>"
        )
    )
    raise InvalidArgument(f"{path}: unknown path; {hint}")


def _stage_target(data: dict[str, Any], path: str, rest: str) -> Target:
    stages = data.get("stages", [])
    named = [s for s in stages if rest.startswith(s.get("name", "") + ".")]
    if not named:
        names = ", ".join(s.get("name", "") for s in stages)
        raise InvalidArgument(f"{path}: no stage {rest.split('.')[0]!r} with a field after it; the stages: {names}")
    stage = max(named, key=lambda s: len(s.get("name", "")))  # stage names may hold dots
    kind = next((k for k in KINDS if k in stage), None)
    if kind is None:
        raise InvalidArgument(f"{path}: stage {stage['name']!r} has no kind ({', '.join(KINDS)})")
    head, _, tail = rest[len(stage["name"]) + 1 :].partition(".")
    if tail and head != kind:
        raise InvalidArgument(
            f"{path}: stage {stage['name']!r} is a {kind} stage: stages.{stage['name']}.{kind}.<field>"
        )
    desc = _message(_STAGE.fields_by_name[kind])
    found = _field(desc, tail or head)
    if found is None:
        close = difflib.get_close_matches(tail or head, [f.name for f in desc.fields], n=1)
        hint = f'did you mean "{close[0]}"?' if close else f"its fields: {', '.join(f.name for f in desc.fields)}"
        raise InvalidArgument(f"{path}: {desc.name} has no field {tail or head!r}; {hint}")
    return Target(stage.setdefault(kind, {}), found.name, found)


def _denoise_targets(data: dict[str, Any], path: str, found: FieldDescriptor) -> list[Target]:
    stages = [s for s in data.get("stages", []) if "denoise" in s]
    if not stages:
        raise InvalidArgument(f"{path}: the spec has no denoise stage to set it in")
    if found.name in PER_STAGE and len(stages) > 1:
        paths = " or ".join(f"stages.{s.get('name', '')}.denoise.{found.name}" for s in stages)
        names = ", ".join(s.get("name", "") for s in stages)
        raise InvalidArgument(f"{path}: ambiguous, the spec has {len(stages)} denoise stages ({names}); use {paths}")
    return [Target(s["denoise"], found.name, found) for s in stages]


def _coerce(value: Any, target: FieldDescriptor) -> Any:
    """Text for a field that is not text, read as YAML; one item for a repeated field, a list of one."""
    repeated = target.is_repeated and not _is_map(target)
    if repeated and isinstance(value, str) and value.lstrip().startswith("["):
        value = _yaml(value)
    if repeated and value is not None and not isinstance(value, list | tuple):
        value = [value]
    if repeated and isinstance(value, list | tuple):
        return [_coerce_one(v, target) for v in value]
    return _coerce_one(value, target)


def _coerce_one(value: Any, target: FieldDescriptor) -> Any:
    if not isinstance(value, str) or target.cpp_type in (_F.CPPTYPE_STRING, _F.CPPTYPE_ENUM):
        return value
    value = _yaml(value)
    if isinstance(value, str) and target.cpp_type in (_F.CPPTYPE_FLOAT, _F.CPPTYPE_DOUBLE):
        with contextlib.suppress(ValueError):
            return float(value)  # YAML 1.1 reads 1e39 as text
    return value


def _yaml(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text  # the check then says what the field expects


def _resolved(value: str, base: Path) -> Path:
    path = Path(value).expanduser()
    return path if path.is_absolute() else base / path


def _field(desc: Descriptor, name: str) -> FieldDescriptor | None:
    return desc.fields_by_name.get(name) or next((f for f in desc.fields if f.json_name == name), None)


def _message(found: FieldDescriptor) -> Descriptor:
    return cast(Descriptor, found.message_type)


def _is_map(found: FieldDescriptor) -> bool:
    return found.message_type is not None and bool(found.message_type.GetOptions().map_entry)
