"""The identities file and who a call is from (services.common.auth), without a cluster."""

from __future__ import annotations

import hashlib

import pytest

from services.common.auth import ADMIN, CLUSTER, OPEN, USER, Authenticator, Identity, check_role
from services.common.errors import InvalidArgument, PermissionDenied, Unauthenticated


def write(tmp_path, text: str):
    path = tmp_path / "auth.yaml"
    path.write_text(text)
    return str(path)


def sha(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@pytest.fixture
def auth(tmp_path):
    text = f"""
identities:
  - {{tenant: alpha, role: user, token_sha256: {sha("a-token")}}}
  - {{tenant: ops, role: admin, token_sha256: {sha("ops-token")}}}
  - {{tenant: beta, role: user, subject: beta-client}}
"""
    return Authenticator(write(tmp_path, text))


def test_tokens_and_subjects_name_their_tenant_and_role(auth):
    assert auth.identify([("authorization", "Bearer a-token")], []) == Identity("alpha", USER)
    assert auth.identify([("authorization", "bearer ops-token")], []) == Identity("ops", ADMIN)
    assert auth.identify([], ["beta-client"]) == Identity("beta", USER)
    # A token outranks the connection's certificate.
    assert auth.identify([("authorization", "Bearer a-token")], ["beta-client"]) == Identity("alpha", USER)


@pytest.mark.parametrize(
    "metadata, subjects",
    [([], []), ([("authorization", "Bearer wrong")], []), ([("authorization", "Basic YTpi")], []), ([], ["stranger"])],
)
def test_unknown_credentials_are_unauthenticated(auth, metadata, subjects):
    with pytest.raises(Unauthenticated):
        auth.identify(metadata, subjects)


def test_without_a_file_or_client_ca_everyone_is_the_default_admin():
    assert Authenticator().identify([], []) == OPEN


def test_mtls_without_a_file_trusts_the_ca_with_the_service_s_role():
    worker = Authenticator(client_ca="/ca.pem", cert_role=CLUSTER)
    assert worker.identify([], ["gateway-1"]) == Identity("gateway-1", CLUSTER)
    with pytest.raises(Unauthenticated):
        worker.identify([], [])


@pytest.mark.parametrize(
    "entry, says",
    [
        ("{tenant: 'a b', token_sha256: " + "0" * 64 + "}", "identities[0].tenant"),
        ("{tenant: a, role: root, subject: x}", "identities[0].role"),
        ("{tenant: a, token_sha256: abc}", "identities[0].token_sha256"),
        ("{tenant: a}", "exactly one of token_sha256 and subject"),
    ],
)
def test_a_bad_entry_is_refused_naming_it(tmp_path, entry, says):
    with pytest.raises(InvalidArgument, match=r"identities\[0\]") as err:
        Authenticator(write(tmp_path, f"identities:\n  - {entry}\n"))
    assert says in str(err.value)


def test_the_file_is_reread_when_it_changes_and_a_broken_rewrite_keeps_the_old(tmp_path):
    path = write(tmp_path, f"identities:\n  - {{tenant: a, token_sha256: {sha('one')}}}\n")
    auth = Authenticator(path)
    write(tmp_path, f"identities:\n  - {{tenant: b, token_sha256: {sha('two')}}}\n")
    assert auth.identify([("authorization", "Bearer two")], []).tenant == "b"
    write(tmp_path, "identities: [{tenant: b, role: nope, subject: x}]  # half a rotation\n")
    assert auth.identify([("authorization", "Bearer two")], []).tenant == "b"


def test_roles_are_checked_with_a_reason():
    check_role(Identity("ops", ADMIN), frozenset({ADMIN}), "/baton.v1.Denoiser/LoadModel")
    with pytest.raises(PermissionDenied, match="not for tenants"):
        check_role(Identity("alpha", USER), frozenset({CLUSTER, ADMIN}), "/baton.v1.Denoiser/Denoise")
