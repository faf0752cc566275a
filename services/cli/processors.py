"""`baton processors [NAME]`: the latents processors a processor worker declares. Without NAME,
one line each; with NAME, its help page: what it does, then each argument with its type, default,
range or choices, and help (as dgenerate's --latents-processor-help)."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from services.cli.gateway_arg import add_gateway, client_for

if TYPE_CHECKING:
    from services.common.api.baton.v1 import processor_pb2 as ppb


def register(subparsers) -> None:
    p = subparsers.add_parser("processors", help="list the latents processors, or show one's help", description=__doc__)
    p.add_argument("name", nargs="?", help="a processor to show in full")
    add_gateway(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    with client_for(args) as client:
        processors = client.list_processors()
    if not args.name:
        width = max((len(p.name) for p in processors), default=0)
        for p in processors:
            inputs = f" ({p.inputs} latent inputs)" if p.inputs > 1 else ""
            print(f"{p.name.ljust(width)}  {p.help}{inputs}")
        return 0
    found = [p for p in processors if p.name == args.name]
    if not found:
        from services.cli import outcome

        known = ", ".join(p.name for p in processors)
        return outcome.fail("processors", "NOT_FOUND", f"no processor {args.name!r}; there are: {known}")
    print(help_page(found[0]))
    return 0


def help_page(info: ppb.ProcessorInfo) -> str:
    """A ProcessorInfo as a help page: the URI form, what it does, then its arguments."""
    uri = ";".join([info.name, *(f"{a.name}=<{a.type}>" for a in info.args if a.required)])
    if any(not a.required for a in info.args):
        uri += "[;<argument>=<value>...]"
    lines = [f"{info.name}:", f"    {info.help}", ""]
    if info.inputs > 1:
        lines += [f"    takes {info.inputs} latent inputs", ""]
    lines += [f"    URI: {uri}", "", "    arguments:"]
    for a in info.args:
        lines.append(f"        {a.name}: {_describe(a)}")
        if a.help:
            lines.append(f"            {a.help}")
    if not info.args:
        lines.append("        none")
    return "\n".join(lines)


def _describe(a: ppb.ProcessorArg) -> str:
    """`type`, then `= default` or `(required)`, then its range or choices."""
    parts = [a.type]
    if a.required:
        parts.append("(required)")
    elif a.default:
        parts.append(f"= {a.default}")
    else:
        parts.append("(optional, no default)")
    if a.HasField("min") or a.HasField("max"):
        low = _number(a.min) if a.HasField("min") else "-inf"
        high = _number(a.max) if a.HasField("max") else "inf"
        parts.append(f"in [{low}, {high}]")
    if a.choices:
        parts.append("one of: " + ", ".join(a.choices))
    return " ".join(parts)


def _number(x: float) -> str:
    return f"{x:g}"
