"""`baton interposer train ...`: train a latent interposer for a pair nobody publishes."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    p = subparsers.add_parser("interposer", help="latent interposer tools (train)")
    tools = p.add_subparsers(dest="tool", metavar="<tool>", required=True)
    train = tools.add_parser(
        "train",
        help="train a v4.0-layout interposer between two VAEs' latent spaces",
        description="Encode an image folder with both VAEs and train the forward and reverse networks; the output "
        "file loads in the interposer service like a published one.",
        add_help=False,
    )
    train.set_defaults(func=run, passthrough=True)


def run(args: argparse.Namespace) -> int:
    from services.interposer.training import main

    return main(args.rest)
