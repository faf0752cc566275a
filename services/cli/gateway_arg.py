"""The --gateway flag every client verb takes (also BATON_GATEWAY)."""

from __future__ import annotations

import os


def add_gateway(parser, required: bool = True) -> None:
    default = os.environ.get("BATON_GATEWAY", "")
    parser.add_argument(
        "--gateway",
        default=default or None,
        required=required and not default,
        help="gateway address host:port [env BATON_GATEWAY]",
    )
