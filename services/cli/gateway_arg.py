"""The flags every client verb takes to reach the gateway: --gateway and its credentials.

Each flag's default is its env var (services.common.credentials), so `baton ls` in a shell or
a batch job configured by its environment reads the same.
"""

from __future__ import annotations

import os

from services.common.config import parse_bool
from services.common.credentials import DEFAULT_GATEWAY, ENV, gateway_address

CREDENTIAL_FLAGS = (
    ("--ca", "ca", "PEM CA that signed the gateway's certificate (turns TLS on)"),
    ("--client-cert", "cert", "PEM client certificate, for a gateway that asks for one (mTLS)"),
    ("--client-key", "key", "private key of --client-cert"),
    ("--server-name", "server_name", "name the gateway's certificate is checked against, if not the host"),
    ("--token", "token", "bearer token; sent only over TLS"),
)


def add_gateway(parser) -> None:
    parser.add_argument(
        "--gateway",
        default=gateway_address(),
        help=f"gateway address host:port [env BATON_GATEWAY; `baton up` serves it at {DEFAULT_GATEWAY}]",
    )
    add_credentials(parser)


def add_credentials(parser) -> None:
    for flag, name, text in CREDENTIAL_FLAGS:
        parser.add_argument(flag, default=os.environ.get(ENV[name], ""), help=f"{text} [env {ENV[name]}]")
    parser.add_argument(
        "--tls",
        action="store_true",
        default=parse_bool(os.environ.get(ENV["tls"], "")),
        help=f"TLS verified against the system's roots [env {ENV['tls']}]",
    )


def client_for(args, address: str | None = None):
    """A BatonClient for the verb's --gateway (or `address`) with its credential flags."""
    from services.client import BatonClient
    from services.common.tls import ClientTLS

    tls = ClientTLS.of(args.ca, args.client_cert, args.client_key, args.server_name, args.tls)
    return BatonClient(address or args.gateway, tls=tls, token=args.token)
