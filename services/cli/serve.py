"""`baton serve <service> [flags]`: run one service in the foreground."""

from __future__ import annotations

import argparse
import importlib

SERVICES = ("gateway", "denoiser", "interposer", "processor")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "serve",
        help="run one service",
        description="Run one Baton service. Flags after the service name are the service's own "
        "(see `baton serve <service> --help`); each is also a BATON_* env var.",
    )
    p.add_argument("service", choices=SERVICES)
    p.add_argument("flags", nargs=argparse.REMAINDER, help="the service's flags")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from services.common.server import main

    service = importlib.import_module(f"services.{args.service}.service").SERVICE
    return main(service, args.flags)
