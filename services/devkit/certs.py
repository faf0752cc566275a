"""Certificates for local TLS and mTLS: a CA, and server and client certificates it signs.

For tests and a local cluster only; production certificates come from the operator's PKI
(cert-manager, a Vault, openssl). Needs the `cryptography` package (a dev dependency).
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Issued:
    cert: Path
    key: Path


class Authority:
    """A CA in `folder` (ca.crt, ca.key) that issues certificates next to it."""

    def __init__(self, folder: Path, name: str = "baton-test-ca"):
        from cryptography import x509
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.name = name
        self._key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        self._subject = subject
        builder = self._builder(subject, self._key.public_key()).add_extension(
            x509.BasicConstraints(ca=True, path_length=None), critical=True
        )
        self._cert = builder.sign(self._key, _sha256())
        self.ca = self.folder / f"{name}.crt"
        self._write(self.ca, self.folder / f"{name}.key", self._cert, self._key)

    @staticmethod
    def _builder(subject, public_key, issuer=None):
        from cryptography import x509

        now = datetime.datetime.now(datetime.UTC)
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(issuer or subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=2))
        )

    @staticmethod
    def _write(cert_path: Path, key_path: Path, cert, key) -> None:
        from cryptography.hazmat.primitives import serialization

        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        key_path.chmod(0o600)

    def issue(self, common_name: str, *, server: bool = False, hosts: tuple[str, ...] = ("127.0.0.1", "localhost")):
        """A certificate for `common_name`: a server's (valid for `hosts`) or a client's."""
        from cryptography import x509
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = self._builder(subject, key.public_key(), self._subject).add_extension(
            x509.ExtendedKeyUsage([usage]), critical=False
        )
        if server:
            names: list[x509.GeneralName] = []
            for h in hosts:
                try:
                    names.append(x509.IPAddress(ipaddress.ip_address(h)))
                except ValueError:
                    names.append(x509.DNSName(h))
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        issued = Issued(self.folder / f"{common_name}.crt", self.folder / f"{common_name}.key")
        self._write(issued.cert, issued.key, builder.sign(self._key, _sha256()), key)
        return issued


def _sha256():
    from cryptography.hazmat.primitives import hashes

    return hashes.SHA256()
