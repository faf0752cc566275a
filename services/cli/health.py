"""`baton health [ADDRESS | --service NAME]`: exit 0 when a service's gRPC health says SERVING.

For container HEALTHCHECKs, Kubernetes exec probes and scripts. The address defaults to
127.0.0.1 and $BATON_PORT, or the named service's default port. Inside a service's container
that serves TLS (BATON_TLS_CERT set), it checks over TLS with the service's own cluster
credentials (BATON_CLUSTER_CA, BATON_CLUSTER_CERT/KEY, BATON_CLUSTER_SERVER_NAME) unless the
--ca flags say otherwise; kubelet's built-in gRPC probe speaks plaintext only.
"""

from __future__ import annotations

import argparse
import os

from services.cli.gateway_arg import add_credentials


def register(subparsers) -> None:
    p = subparsers.add_parser("health", help="check a service's gRPC health", description=__doc__)
    p.add_argument("address", nargs="?", help="host:port")
    p.add_argument("--service", choices=("gateway", "denoiser", "interposer", "processor"))
    p.add_argument("--timeout", type=float, default=3.0)
    add_credentials(p)
    p.set_defaults(func=run)


def probe_tls(args: argparse.Namespace, env=os.environ):
    from services.common.tls import ClientTLS

    if args.ca or args.client_cert or args.tls or not env.get("BATON_TLS_CERT"):
        return ClientTLS.of(args.ca, args.client_cert, args.client_key, args.server_name, args.tls)
    return ClientTLS.of(
        env.get("BATON_CLUSTER_CA", ""),
        env.get("BATON_CLUSTER_CERT", ""),
        env.get("BATON_CLUSTER_KEY", ""),
        env.get("BATON_CLUSTER_SERVER_NAME", ""),
        tls=True,
    )


def run(args: argparse.Namespace) -> int:
    from services.devkit.cluster import DEFAULT_PORTS, health_status

    address = args.address
    if not address:
        port = os.environ.get("BATON_PORT") or DEFAULT_PORTS[args.service or "gateway"]
        address = f"127.0.0.1:{port}"
    status = health_status(address, timeout=args.timeout, tls=probe_tls(args))
    print(f"{address} {status}")
    return 0 if status == "SERVING" else 1
