"""TLS for every gRPC server and channel, with certificates re-read when their files change.

A server with `--tls-cert`/`--tls-key` serves TLS; with `--tls-client-ca` too, a client must
present a certificate that CA signed (mTLS). Kubernetes rotates a Secret by swapping the files
under its mount, so the server asks for its certificates on every new handshake (gRPC's
dynamic credentials) and reads them again when a file's modification time or size changed.

A channel (ClientTLS) verifies the server with a CA, may present a client certificate, and may
check the server under another name than the address's host (`server_name`). Channels read
their files when made; WorkerPool makes new ones when the files change (`fingerprint`).

Plaintext stays fine on loopback; a server that listens elsewhere without TLS says so in its log.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import grpc

from services.common.errors import InvalidArgument

log = logging.getLogger("baton.tls")

LOOPBACK = ("127.0.0.1", "localhost", "::1", "[::1]")


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise InvalidArgument(f"cannot read the {what} {path!r}: {exc.strerror}", field=what) from exc


def file_stamp(*paths: str) -> tuple[tuple[int, int], ...]:
    """What changes when a file is rewritten or a Secret's symlinks are swapped."""
    out = []
    for p in paths:
        try:
            st = os.stat(p)
            out.append((st.st_mtime_ns, st.st_size))
        except OSError:
            out.append((0, 0))
    return tuple(out)


class ServerCertificates:
    """The server's key pair and client CA, as gRPC asks for them on each handshake."""

    def __init__(self, cert: str, key: str, client_ca: str = ""):
        self.cert, self.key, self.client_ca = cert, key, client_ca
        self._seen = file_stamp(*self._paths())

    def _paths(self) -> list[str]:
        return [p for p in (self.cert, self.key, self.client_ca) if p]

    def configuration(self) -> grpc.ServerCertificateConfiguration:
        pair = (_read(self.key, "tls-key"), _read(self.cert, "tls-cert"))
        roots = _read(self.client_ca, "tls-client-ca") if self.client_ca else None
        return grpc.ssl_server_certificate_configuration([pair], root_certificates=roots)

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """None while nothing changed (gRPC keeps what it has); the new files once they did."""
        now = file_stamp(*self._paths())
        if now == self._seen:
            return None
        try:
            config = self.configuration()
        except InvalidArgument as exc:  # half-written during a rotation: keep serving the old ones
            log.warning("TLS files changed but cannot be read yet: %s", exc)
            return None
        self._seen = now
        log.info("TLS certificates reloaded", extra={"cert": self.cert})
        return config

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.dynamic_ssl_server_credentials(
            self.configuration(), self.fetch, require_client_authentication=bool(self.client_ca)
        )


def server_credentials(cert: str, key: str, client_ca: str = "") -> grpc.ServerCredentials | None:
    """Credentials for a server's port, or None for plaintext (no certificate configured)."""
    if not cert and not key:
        if client_ca:
            raise InvalidArgument("tls-client-ca needs tls-cert and tls-key: mTLS runs over TLS", field="tls-cert")
        return None
    if not (cert and key):
        raise InvalidArgument("tls-cert and tls-key go together", field="tls-key" if cert else "tls-cert")
    return ServerCertificates(cert, key, client_ca).credentials()


def add_port(server: grpc.aio.Server, host: str, port: int, credentials: grpc.ServerCredentials | None) -> int:
    address = f"{host}:{port}"
    if credentials is None:
        if host not in LOOPBACK:
            log.warning(
                "serving plaintext gRPC on %s: anyone who can reach it can call it; set --tls-cert and --tls-key "
                "(and --tls-client-ca for mTLS) outside a trusted network",
                address,
            )
        return server.add_insecure_port(address)
    return server.add_secure_port(address, credentials)


@dataclass(frozen=True)
class ClientTLS:
    """What a channel trusts and presents: a CA for the server, a client certificate (mTLS), the
    server name to verify. Empty fields mean the system's roots, no client certificate, the host."""

    ca: str = ""
    cert: str = ""
    key: str = ""
    server_name: str = ""
    enabled: bool = False

    @classmethod
    def of(cls, ca: str = "", cert: str = "", key: str = "", server_name: str = "", tls: bool = False) -> ClientTLS:
        """`tls` alone: TLS verified against the system's roots (a gateway behind a public CA)."""
        if bool(cert) != bool(key):
            raise InvalidArgument("a client certificate and its key go together", field="key" if cert else "cert")
        return cls(ca, cert, key, server_name, enabled=bool(tls or ca or cert or server_name))

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=_read(self.ca, "ca") if self.ca else None,
            private_key=_read(self.key, "key") if self.key else None,
            certificate_chain=_read(self.cert, "cert") if self.cert else None,
        )

    def options(self) -> list[tuple[str, str]]:
        return [("grpc.ssl_target_name_override", self.server_name)] if self.server_name else []

    def fingerprint(self) -> tuple:
        return file_stamp(*(p for p in (self.ca, self.cert, self.key) if p))


PLAINTEXT = ClientTLS()


def channel_credentials(tls: ClientTLS, token: str = "") -> grpc.ChannelCredentials | None:
    """The channel's credentials, the bearer token riding on every call; None for plaintext.

    A token is sent only over TLS: on a plaintext connection anyone on the path could replay it.
    """
    if not tls.enabled:
        if token:
            raise InvalidArgument(
                "a token is sent only over TLS: give the server's CA (--ca / BATON_CA), or --tls for the system's "
                "roots",
                field="token",
            )
        return None
    creds = tls.credentials()
    if token:
        creds = grpc.composite_channel_credentials(creds, grpc.access_token_call_credentials(token))
    return creds


def open_channel(address: str, options: list, tls: ClientTLS = PLAINTEXT, token: str = "") -> grpc.Channel:
    creds = channel_credentials(tls, token)
    if creds is None:
        return grpc.insecure_channel(address, options=options)
    return grpc.secure_channel(address, creds, options=[*options, *tls.options()])


def open_aio_channel(
    address: str, options: list, tls: ClientTLS = PLAINTEXT, token: str = "", interceptors: list | None = None
) -> grpc.aio.Channel:
    creds = channel_credentials(tls, token)
    if creds is None:
        return grpc.aio.insecure_channel(address, options=options, interceptors=interceptors or None)
    return grpc.aio.secure_channel(
        address, creds, options=[*options, *tls.options()], interceptors=interceptors or None
    )
