"""What a client presents to the gateway: TLS trust, a client certificate, a bearer token.

Each comes from an argument or, when that is not given, an env var, so a batch job configured
by its environment needs no code:

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

ENV = {
    "ca": "BATON_CA",
    "tls": "BATON_TLS",
    "cert": "BATON_CLIENT_CERT",
    "key": "BATON_CLIENT_KEY",
    "server_name": "BATON_SERVER_NAME",
    "token": "BATON_TOKEN",
}


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
