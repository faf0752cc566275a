"""`baton <verb>`: a registry of subcommands, each in its own module with `register(subparsers)`.

Verb modules import only the standard library at load time (their work imports inside `run`),
so that `baton ls` starts in a fraction of a second; every verb ends through `outcome`.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import traceback
from collections.abc import Sequence

from services.cli import outcome

# Verb modules; each defines register(subparsers) and sets `func` on its parser.
VERBS = (
    "run",
    "submit",
    "watch",
    "get",
    "cancel",
    "ls",
    "up",
    "serve",
    "health",
    "interposer",
    "dev",
    "models",
    "processors",
    "schedulers",
    "workers",
    "batch",
)


class DefaultsFormatter(argparse.HelpFormatter):
    """Help that shows each flag's default, where it has a meaningful one (never a token's value)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        shown = default not in (None, "", False, argparse.SUPPRESS) and not isinstance(default, list)
        if shown and action.option_strings and "%(default)" not in text and action.dest not in ("token", "rest"):
            text += " (default: %(default)s)"
        return text


class VerbParser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", DefaultsFormatter)
        super().__init__(*args, **kwargs)


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return installed("baton")
    except PackageNotFoundError:
        return "unknown (not installed)"


class VersionAction(argparse.Action):
    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"baton {version()}")
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="baton",
        description="Multi-model cooperative denoising as a cluster of gRPC services.",
        epilog=f"exit codes:\n{outcome.EXIT_CODES}\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action=VersionAction, help="print the version and exit")
    parser.add_argument(
        "--debug",
        action="store_true",
        default=os.environ.get("BATON_DEBUG", "") not in ("", "0", "false", "no"),
        help="show tracebacks of errors [env BATON_DEBUG]",
    )
    subparsers = parser.add_subparsers(dest="verb", metavar="<verb>", required=True, parser_class=VerbParser)
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
    except BaseException as exc:  # every way a verb ends goes through `ended`
        return ended(args, exc)


def ended(args: argparse.Namespace, exc: BaseException) -> int:
    """The exit code for a verb that raised `exc`, after one line on stderr (and the traceback with --debug)."""
    if isinstance(exc, SystemExit):
        raise exc
    if args.debug:
        traceback.print_exception(exc)
    verb, gateway = args.verb, getattr(args, "gateway", None) or ""
    code = getattr(exc, "code", None)
    if isinstance(exc, KeyboardInterrupt):
        print(f"baton {verb}: interrupted", file=sys.stderr)
        return outcome.INTERRUPTED
    if callable(code) and hasattr(exc, "details"):  # grpc.RpcError, without importing grpc here
        return outcome.fail(verb, code().name, exc.details() or "", gateway)
    if isinstance(code, str) and hasattr(exc, "detail"):  # a BatonError raised on this side
        return outcome.fail(verb, code, str(exc), gateway)
    if isinstance(exc, ModuleNotFoundError) and (missing := outcome.missing_server(verb, exc)) is not None:
        return missing
    if isinstance(exc, TimeoutError):
        return outcome.fail(verb, "DEADLINE_EXCEEDED", str(exc), gateway)
    if isinstance(exc, OSError):
        return outcome.fail(verb, "FAILED_PRECONDITION", str(exc), gateway)
    where = "" if args.debug else " (run with --debug for the traceback)"
    print(f"baton {verb}: INTERNAL: {type(exc).__name__}: {exc}{where}", file=sys.stderr)
    return outcome.BUG


if __name__ == "__main__":
    sys.exit(main())
