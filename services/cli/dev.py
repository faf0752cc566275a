"""`baton dev <tool>`: developer tools. `baton dev tiny-models DIR` builds random pipelines offline."""

from __future__ import annotations

import argparse

FAMILIES = ("sd1", "sdxl", "sd3", "flux")


def register(subparsers) -> None:
    p = subparsers.add_parser("dev", help="developer tools (tiny random models, ...)")
    tools = p.add_subparsers(dest="tool", metavar="<tool>", required=True)
    tiny = tools.add_parser(
        "tiny-models",
        help="build tiny random SD 1.x / SDXL / SD3 / Flux pipelines into DIR/<family>",
        description="Build randomly initialised diffusers pipelines offline (no downloads), one folder per "
        "family, loadable like any diffusers folder. Lets you try Baton without weights.",
    )
    tiny.add_argument("dir", help="parent folder; each family goes into DIR/<family>")
    tiny.add_argument("--family", action="append", choices=FAMILIES, help="family to build (repeatable; default all)")
    tiny.add_argument(
        "--size", choices=("tiny", "medium"), default="tiny", help="tiny for tests, medium for benchmarks"
    )
    tiny.add_argument("--seed", type=int, default=0, help="weight seed; the same seed gives the same bytes")
    tiny.set_defaults(func=run_tiny_models)


def run_tiny_models(args: argparse.Namespace) -> int:
    from pathlib import Path

    from services.devkit.tiny_models import build

    for family in args.family or FAMILIES:
        print(build(family, Path(args.dir) / family, size=args.size, seed=args.seed), flush=True)
    return 0
