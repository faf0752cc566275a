"""Who is calling: bearer tokens and mTLS subjects mapped to tenants and roles.

The identities file (`--auth-file`, YAML) lists who may call:

    identities:
      - {tenant: alpha, role: user, token_sha256: <hex sha256 of the token>}
      - {tenant: ops, role: admin, token_sha256: <hex>}
      - {tenant: cluster, role: cluster, token_sha256: <hex>}
      - {tenant: beta, role: user, subject: beta}   # an mTLS client certificate's common name

Tokens are stored hashed, so the file does not give them away, and a presented token is
compared with every entry in constant time (hmac.compare_digest), so timing tells nothing.
The file is re-read when it changes (Kubernetes rotates Secrets in place).

Roles: `user` sees its own tenant's jobs and blobs; `admin` sees every tenant's and may load
and unload models; `cluster` is what gateways and workers present to workers, which serve
nobody else. Without an identities file, a verified mTLS client certificate is trusted as far as
its CA vouches for it: at a worker it is the cluster ("mTLS with the cluster CA"), at the
gateway a user tenant named by its common name.

Without an identities file or a client CA, the service is open as before: every caller is
the `default` tenant with the admin role.
"""

from __future__ import annotations

import contextvars
import hashlib
import hmac
import logging
import re
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import yaml

from services.common.errors import InvalidArgument, PermissionDenied, Unauthenticated
from services.common.tls import file_stamp

log = logging.getLogger("baton.auth")

USER, ADMIN, CLUSTER = "user", "admin", "cluster"
ROLES = (USER, ADMIN, CLUSTER)
# Who may call a service's methods unless a method says otherwise (`requires`).
TENANTS = frozenset({USER, ADMIN})
CLUSTER_ONLY = frozenset({CLUSTER, ADMIN})
DEFAULT_TENANT = "default"
TENANT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


@dataclass(frozen=True)
class Identity:
    tenant: str
    role: str

    @property
    def sees_all(self) -> bool:
        return self.role == ADMIN

    def owns(self, tenant: str) -> bool:
        """True when this caller may see what `tenant` made."""
        return self.sees_all or tenant == self.tenant


OPEN = Identity(DEFAULT_TENANT, ADMIN)
# The caller of the RPC being served; set by the status interceptor before the servicer runs.
CALLER: contextvars.ContextVar[Identity] = contextvars.ContextVar("baton_caller", default=OPEN)


def caller() -> Identity:
    return CALLER.get()


def requires(*roles: str) -> Callable:
    """Marks an RPC that only callers with one of `roles` may make (e.g. LoadModel: admin)."""

    def mark(rpc: Callable) -> Callable:
        rpc.baton_roles = frozenset(roles)  # type: ignore[attr-defined]
        return rpc

    return mark


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class _Entry:
    identity: Identity
    digest: bytes = b""
    subject: str = ""


def load_identities(path: str) -> list[_Entry]:
    """The file's entries, each checked; an error names the entry and field."""
    try:
        doc = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise InvalidArgument(f"cannot read the identities file {path!r}: {exc}", field="auth-file") from exc
    entries = []
    for i, item in enumerate(doc.get("identities") or []):
        where = f"identities[{i}]"
        tenant, role = str(item.get("tenant", "")), str(item.get("role", USER))
        if not TENANT_NAME.match(tenant):
            raise InvalidArgument(
                f"{where}.tenant {tenant!r} must be 1-63 letters, digits, '_', '.' or '-'", field="auth-file"
            )
        if role not in ROLES:
            raise InvalidArgument(f"{where}.role {role!r} is not one of {list(ROLES)}", field="auth-file")
        digest, subject = str(item.get("token_sha256", "")).lower(), str(item.get("subject", ""))
        if bool(digest) == bool(subject):
            raise InvalidArgument(f"{where} needs exactly one of token_sha256 and subject", field="auth-file")
        if digest and not re.fullmatch(r"[0-9a-f]{64}", digest):
            raise InvalidArgument(
                f"{where}.token_sha256 must be 64 hex digits (sha256 of the token)", field="auth-file"
            )
        entries.append(_Entry(Identity(tenant, role), bytes.fromhex(digest) if digest else b"", subject))
    return entries


class Authenticator:
    """Identities from a file (reloaded on change) and the mTLS subject gRPC verified."""

    def __init__(self, auth_file: str = "", client_ca: str = "", cert_role: str = USER):
        self.path = auth_file
        self.mtls = bool(client_ca)
        # The role of a verified certificate the identities file does not name (none is given).
        self.cert_role = cert_role
        self._lock = threading.Lock()
        self.file_stamp = file_stamp(auth_file) if auth_file else ()
        self._entries = load_identities(auth_file) if auth_file else []

    @property
    def enabled(self) -> bool:
        return bool(self.path or self.mtls)

    def _current(self) -> list[_Entry]:
        if self.path and file_stamp(self.path) != self.file_stamp:
            with self._lock:
                stamp = file_stamp(self.path)
                try:
                    self._entries = load_identities(self.path)
                    log.info("identities reloaded", extra={"auth_file": self.path, "count": len(self._entries)})
                except InvalidArgument as exc:  # mid-rotation: keep the ones we have
                    log.warning("identities file changed but cannot be used: %s", exc)
                self.file_stamp = stamp
        return self._entries

    def identify(self, metadata: Iterable[tuple[str, str | bytes]], subjects: Iterable[str]) -> Identity:
        """The caller, from `authorization: Bearer <token>` metadata and the verified certificate's
        common names; Unauthenticated when neither is known."""
        if not self.enabled:
            return OPEN
        entries = self._current()
        token = _bearer(metadata)
        if token:  # an explicit token outranks the certificate the connection came with
            presented = hashlib.sha256(token.encode()).digest()
            found = None
            for e in entries:  # every entry compared: the time does not depend on which matched
                if e.digest and hmac.compare_digest(e.digest, presented) and found is None:
                    found = e.identity
            if found is not None:
                return found
            raise Unauthenticated("the token is not known here; check BATON_TOKEN")
        subjects = list(subjects)
        for subject in subjects:
            for e in entries:
                if e.subject and hmac.compare_digest(e.subject.encode(), subject.encode()):
                    return e.identity
        if subjects and self.mtls and not self.path:
            return Identity(subjects[0] if TENANT_NAME.match(subjects[0]) else DEFAULT_TENANT, self.cert_role)
        raise Unauthenticated(
            "this service needs credentials: a bearer token in `authorization` metadata (BATON_TOKEN) or a "
            "client certificate its CA signed"
        )


def _bearer(metadata: Iterable[tuple[str, str | bytes]]) -> str:
    for key, value in metadata:
        if key == "authorization":
            text = value.decode() if isinstance(value, bytes) else value
            scheme, _, token = text.partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
            raise Unauthenticated("authorization metadata must be `Bearer <token>`")
    return ""


def check_role(identity: Identity, allowed: frozenset[str], method: str) -> None:
    if identity.role not in allowed:
        who = "tenants" if identity.role == USER else f"the {identity.role} role"
        raise PermissionDenied(
            f"{method} is not for {who}: it needs the {' or '.join(sorted(allowed))} role", field="authorization"
        )


# Open to anyone when `auth-open-health` is on: probes and tools must work without credentials.
OPEN_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")


class Gate:
    """Admits a call: identifies the caller, checks the method's roles, sets CALLER."""

    def __init__(
        self,
        authenticator: Authenticator,
        roles: dict[str, frozenset[str]],
        default: frozenset[str] = CLUSTER_ONLY,
        open_health: bool = True,
    ):
        self.auth = authenticator
        self.roles = roles
        self.default = default
        self.open_prefixes = OPEN_PREFIXES if open_health else ()

    def __call__(self, method: str, context) -> None:
        if not self.auth.enabled or method.startswith(self.open_prefixes):
            CALLER.set(OPEN if not self.auth.enabled else Identity(DEFAULT_TENANT, USER))
            return
        subjects = [v.decode() for v in (context.auth_context() or {}).get("x509_common_name", [])]
        identity = self.auth.identify(context.invocation_metadata() or (), subjects)
        check_role(identity, self.roles.get(method, self.default), method)
        CALLER.set(identity)


def method_roles(service_name: str, servicer: object, callers: frozenset[str]) -> dict[str, frozenset[str]]:
    """Each RPC of `servicer` under its full gRPC name: its `requires` roles, else `callers`."""
    out = {}
    for name in dir(type(servicer)):
        if name[:1].isupper():
            rpc = getattr(type(servicer), name)
            if callable(rpc):
                out[f"/{service_name}/{name}"] = getattr(rpc, "baton_roles", callers)
    return out
