"""Latents processor URIs, dgenerate's syntax: `name;arg=value;arg=value`.

A list of URIs is a chain; a `+` item starts the chain of the next input. The processor
service runs them; the gateway checks them against the processors' declared arguments before
any work, with the same code.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from services.common.api.baton.v1 import processor_pb2 as ppb
from services.common.config import parse_bool
from services.common.errors import InvalidArgument
from services.common.limits import DEFAULT, Limits

CHAIN_SEPARATOR = "+"
# Arguments every processor takes.
BASE_ARGS = (
    ppb.ProcessorArg(name="device", type="str", default="", help="torch device; default: the service's"),
    ppb.ProcessorArg(
        name="model-offload",
        type="bool",
        default="false",
        help="move any module the processor loaded off the GPU after it runs",
    ),
)
_TYPES: dict[str, Callable[[str], Any]] = {"int": int, "float": float, "bool": parse_bool, "str": str}


@dataclass(frozen=True)
class ProcessorCall:
    name: str
    # Argument names as written, normalised to hyphens; values as strings.
    args: tuple[tuple[str, str], ...]


def parse_uri(uri: str) -> ProcessorCall:
    parts = [p.strip() for p in uri.split(";")]
    name = parts[0].lower()
    if not name:
        raise InvalidArgument(f"{uri!r}: a processor URI starts with the processor's name")
    args: dict[str, str] = {}
    for part in parts[1:]:
        if not part:
            continue
        key, sep, value = part.partition("=")
        key = key.strip().lower().replace("_", "-")
        if not sep or not key:
            raise InvalidArgument(f"{uri!r}: {part!r} is not arg=value")
        if key in args:
            raise InvalidArgument(f"{uri!r}: {key} is given twice")
        args[key] = value.strip()
    return ProcessorCall(name, tuple(args.items()))


def split_chains(items: Sequence[str]) -> list[list[str]]:
    """The chains of a processors list: `+` items separate them."""
    chains: list[list[str]] = [[]]
    for item in items:
        if item.strip() == CHAIN_SEPARATOR:
            chains.append([])
        else:
            chains[-1].append(item)
    return chains


def bind(call: ProcessorCall, info: ppb.ProcessorInfo, limits: Limits = DEFAULT) -> dict[str, Any]:
    """Typed, range-checked arguments (defaults filled in), keyed with underscores. Numbers are
    finite (a NaN factor would pass every range and poison the latents); a device is one the
    processor-devices setting allows."""
    declared = {a.name: a for a in (*info.args, *BASE_ARGS)}
    given = dict(call.args)
    unknown = sorted(set(given) - set(declared))
    if unknown:
        raise InvalidArgument(
            f"{call.name} takes no argument {unknown[0]!r}; it accepts: {', '.join(sorted(declared))}"
        )
    out: dict[str, Any] = {}
    for name, arg in declared.items():
        if name not in given and arg.required:
            raise InvalidArgument(f"{call.name} needs {name} ({arg.help})")
        text = given.get(name, arg.default)
        if name not in given and text == "":
            out[name.replace("-", "_")] = None
            continue
        try:
            value = _TYPES[arg.type](text)
        except ValueError:
            raise InvalidArgument(f"{call.name}: {name}={text!r} is not a valid {arg.type}") from None
        if isinstance(value, float) and not math.isfinite(value):
            raise InvalidArgument(f"{call.name}: {name}={text!r}; numbers must be finite")
        if name == "device" and not limits.device_allowed(value):
            raise InvalidArgument(
                f"{call.name}: device={text!r}; allowed: {', '.join(limits.processor_devices)} (or leave it unset "
                "for the service's own)"
            )
        if arg.choices and str(value) not in arg.choices:
            raise InvalidArgument(f"{call.name}: {name}={text!r}; choose one of {', '.join(arg.choices)}")
        low = arg.min if arg.HasField("min") else None
        high = arg.max if arg.HasField("max") else None
        if (low is not None and value < low) or (high is not None and value > high):
            raise InvalidArgument(
                f"{call.name}: {name}={text} is out of range [{_bound(low, '-inf')}, {_bound(high, 'inf')}]"
            )
        out[name.replace("-", "_")] = value
    return out


def _bound(value: float | None, unbounded: str) -> str:
    return unbounded if value is None else f"{value:g}"


def check_chains(
    items: Sequence[str], inputs: int, known: Mapping[str, ppb.ProcessorInfo], limits: Limits = DEFAULT
) -> list[list[tuple[ProcessorCall, dict[str, Any]]]]:
    """Parsed and bound chains, one per input; every problem is an InvalidArgument."""
    chains = split_chains(items)
    if len(chains) != inputs:
        raise InvalidArgument(
            f"{len(chains)} processor chain(s) for {inputs} input(s): separate one chain per input with '+'"
        )
    out = []
    for chain in chains:
        bound = []
        for uri in chain:
            call = parse_uri(uri)
            if call.name not in known:
                raise InvalidArgument(f"unknown processor {call.name!r}; known: {', '.join(sorted(known))}")
            bound.append((call, bind(call, known[call.name], limits)))
        out.append(bound)
    return out
