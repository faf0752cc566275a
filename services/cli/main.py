"""`baton <verb>`: a registry of subcommands, each in its own module with `register(subparsers)`."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# Verb modules; each defines register(subparsers) and sets `func` on its parser.
VERBS = ("run", "submit", "watch", "get", "cancel", "ls", "up", "serve", "health", "interposer", "dev")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="baton", description="Multi-model cooperative denoising as a cluster of gRPC services."
    )
    subparsers = parser.add_subparsers(dest="verb", metavar="<verb>", required=True)
    for verb in VERBS:
        importlib.import_module(f"services.cli.{verb}").register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    # Verbs that hand their arguments to a tool of their own take whatever argparse did not know.
    args, rest = parser.parse_known_args(argv)
    if rest and not getattr(args, "passthrough", False):
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    args.rest = rest
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
