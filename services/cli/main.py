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
    try:
        return int(args.func(args) or 0)
    except Exception as exc:
        # A refusal the user can act on (no token, not found, bad input) is one line, not a traceback.
        code = getattr(exc, "code", None)
        if not callable(code) or not hasattr(exc, "details"):
            raise
        print(f"baton {args.verb}: {code().name}: {exc.details()}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
