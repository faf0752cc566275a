"""What a client presents to the gateway: TLS trust, a client certificate, a bearer token.

Each comes from an argument or, when that is not given, an env var, so a batch job configured
by its environment needs no code:

    BATON_GATEWAY       the gateway's host:port (default 127.0.0.1:50051, where `baton up` puts it)
    BATON_CA            PEM CA that signed the gateway's certificate (turns TLS on)
    BATON_TLS           1: TLS verified against the system's roots (a gateway behind a public CA)
    BATON_CLIENT_CERT   PEM client certificate, for a gateway that asks for one (mTLS)
    BATON_CLIENT_KEY    its private key
    BATON_SERVER_NAME   the name the gateway's certificate is checked against, if not the host
    BATON_TOKEN         bearer token (sent only over TLS)
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from services.common.config import parse_bool
from services.common.tls import ClientTLS

# Where `baton up` serves the gateway; the address every client defaults to.
DEFAULT_GATEWAY = "127.0.0.1:50051"
ENV = {
    "gateway": "BATON_GATEWAY",
    "ca": "BATON_CA",
    "tls": "BATON_TLS",
    "cert": "BATON_CLIENT_CERT",
    "key": "BATON_CLIENT_KEY",
    "server_name": "BATON_SERVER_NAME",
    "token": "BATON_TOKEN",
}


def gateway_address(address: str | None = None, environ: Mapping[str, str] | None = None) -> str:
    """`address`, else BATON_GATEWAY, else DEFAULT_GATEWAY."""
    env = os.environ if environ is None else environ
    return address or env.get(ENV["gateway"], "") or DEFAULT_GATEWAY


def resolve(
    tls: ClientTLS | None = None, token: str | None = None, environ: Mapping[str, str] | None = None
) -> tuple[ClientTLS, str]:
    """The given `tls` and `token`, each defaulting to the env vars above."""
    env = os.environ if environ is None else environ
    if tls is None:
        tls = ClientTLS.of(
            ca=env.get(ENV["ca"], ""),
            cert=env.get(ENV["cert"], ""),
            key=env.get(ENV["key"], ""),
            server_name=env.get(ENV["server_name"], ""),
            tls=parse_bool(env.get(ENV["tls"], "")),
        )
    return tls, env.get(ENV["token"], "") if token is None else token
