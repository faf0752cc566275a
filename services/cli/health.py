"""`baton health [ADDRESS | --service NAME]`: exit 0 when a service's gRPC health says SERVING.

For container HEALTHCHECKs and scripts. The address defaults to 127.0.0.1 and $BATON_PORT,
or the named service's default port.
"""

from __future__ import annotations

import argparse
import os


def register(subparsers) -> None:
    p = subparsers.add_parser("health", help="check a service's gRPC health", description=__doc__)
    p.add_argument("address", nargs="?", help="host:port")
    p.add_argument("--service", choices=("gateway", "denoiser", "interposer", "processor"))
    p.add_argument("--timeout", type=float, default=3.0)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from services.devkit.cluster import DEFAULT_PORTS, health_status

    address = args.address
    if not address:
        port = os.environ.get("BATON_PORT") or DEFAULT_PORTS[args.service or "gateway"]
        address = f"127.0.0.1:{port}"
    status = health_status(address, timeout=args.timeout)
    print(f"{address} {status}")
    return 0 if status == "SERVING" else 1
