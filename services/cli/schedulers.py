"""`baton schedulers`: the schedulers a denoise stage may name, how each splits across windows
(exact, state, or never, and why), whether it draws noise, and its scheduler_config keys."""

from __future__ import annotations

import argparse
import textwrap

from services.cli.gateway_arg import add_gateway, client_for


def register(subparsers) -> None:
    p = subparsers.add_parser("schedulers", help="list the schedulers a denoise stage may name", description=__doc__)
    add_gateway(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from services.cli.table import table

    with client_for(args) as client:
        schedulers = client.list_schedulers()
    rows = [(s.name, s.split, "stochastic" if s.stochastic else "deterministic") for s in schedulers]
    header, *lines = table(("NAME", "SPLIT", "NOISE"), rows).splitlines()
    print(header)
    # The reason and the option keys run long: each goes under its row, wrapped.
    for line, s in zip(lines, schedulers, strict=True):
        print(line)
        if s.why:
            print(textwrap.fill(s.why, 100, initial_indent="    why: ", subsequent_indent="         "))
        if s.options:
            print(textwrap.fill(", ".join(s.options), 100, initial_indent="    options: ", subsequent_indent=" " * 13))
    return 0
