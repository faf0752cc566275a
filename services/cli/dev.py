"""`baton dev <tool>`: developer tools. `baton dev tiny-models DIR` builds random pipelines offline."""

from __future__ import annotations

import argparse

FAMILIES = ("sd1", "sdxl", "sd3", "flux", "kolors")
# The model names the example specs use, and the tiny model each maps to: two of each family,
# `a` and `b` built from different weight seeds so that a handoff really changes model.
DEMO_ALIASES = {
    "sd1-a": ("a", "sd1"),
    "sd1-b": ("b", "sd1"),
    "sdxl-base": ("a", "sdxl"),
    "sdxl-second": ("b", "sdxl"),
    "flux-a": ("a", "flux"),
    "flux-b": ("b", "flux"),
}

# A random LoRA for sdxl-second, under DIR/loras: what examples/sdxl-lora-second.yaml names.
DEMO_LORA = "sdxl-second-style.safetensors"


def register(subparsers) -> None:
    p = subparsers.add_parser("dev", help="developer tools (tiny random models, ...)")
    tools = p.add_subparsers(dest="tool", metavar="<tool>", required=True)
    tiny = tools.add_parser(
        "tiny-models",
        help="build tiny random SD 1.x / SDXL / SD3 / Flux / Kolors pipelines into DIR/<family>",
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
    demo = tools.add_parser(
        "demo-models",
        help="build the tiny models the examples name and print the BATON_MODELS line for them",
        description="Build (once) tiny random SD 1.x, SDXL and Flux pipelines under DIR/a and DIR/b (and a LoRA "
        "for the second SDXL model under DIR/loras) and print the "
        "BATON_MODELS value that maps the example specs' names (sd1-a, sdxl-base, flux-b, ...) to them: "
        'export BATON_MODELS="$(baton dev demo-models models/tiny)" before `baton up`.',
    )
    demo.add_argument("dir", nargs="?", default="models/tiny", help="parent folder of the a/ and b/ sets")
    demo.set_defaults(func=run_demo_models)


def run_tiny_models(args: argparse.Namespace) -> int:
    from pathlib import Path

    from services.devkit.tiny_models import build

    for family in args.family or FAMILIES:
        print(build(family, Path(args.dir) / family, size=args.size, seed=args.seed), flush=True)
    return 0


def run_demo_models(args: argparse.Namespace) -> int:
    from pathlib import Path

    root = Path(args.dir).resolve()
    for half, family in sorted(set(DEMO_ALIASES.values())):
        if not (root / half / family / "model_index.json").is_file():
            from services.devkit.tiny_models import build

            build(family, root / half / family, seed=0 if half == "a" else 1)
    style = root / "loras" / DEMO_LORA
    if not style.is_file():  # the LoRA examples/sdxl-lora-second.yaml puts on sdxl-second
        from services.devkit.tiny_adapters import make_lora

        make_lora(root / "b" / "sdxl", style.parent, seed=11, text_encoders=False, weight_name=DEMO_LORA)
    print(",".join(f"{alias}={root / half / family}" for alias, (half, family) in DEMO_ALIASES.items()))
    return 0
