"""A shared cluster made safe: TLS everywhere, tenants by token or certificate, workers only for the cluster.

One cluster of real processes: a gateway serving TLS that authenticates tokens (and a second
one that asks for client certificates), and a denoiser that serves mTLS and takes only the
cluster's certificate. Certificates are made here (services.devkit.certs).
"""

from __future__ import annotations

import hashlib
import time

import grpc
import pytest
import torch
import yaml
from google.protobuf import json_format

from services.client import BatonClient
from services.common.api.baton.v1 import denoiser_pb2 as dpb
from services.common.api.baton.v1 import denoiser_pb2_grpc
from services.common.api.baton.v1 import gateway_pb2 as gpb
from services.common.api.baton.v1 import handles_pb2 as pb
from services.common.api.baton.v1 import jobs_pb2 as jpb
from services.common.tls import PLAINTEXT, ClientTLS, open_channel
from services.devkit.certs import Authority
from services.devkit.cluster import health_status
from tests.gateway_kit import Cluster, demo_models, wait_for_job

TOKENS = {"alpha": "alpha-secret", "beta": "beta-secret", "ops": "ops-secret"}


def identities(extra: list[dict] | None = None) -> str:
    entries = [
        {"tenant": "alpha", "role": "user", "token_sha256": hashlib.sha256(b"alpha-secret").hexdigest()},
        {"tenant": "beta", "role": "user", "token_sha256": hashlib.sha256(b"beta-secret").hexdigest()},
        {"tenant": "ops", "role": "admin", "token_sha256": hashlib.sha256(b"ops-secret").hexdigest()},
        {"tenant": "cluster", "role": "cluster", "subject": "cluster"},
        {"tenant": "cluster", "role": "cluster", "token_sha256": hashlib.sha256(b"cluster-secret").hexdigest()},
        {"tenant": "gamma", "role": "user", "subject": "gamma"},
        *(extra or []),
    ]
    return yaml.safe_dump({"identities": entries})


def job(steps: int = 2, seed: int = 1) -> jpb.JobSpec:
    body = {"model": "sd1-a", "prompt": "a lighthouse", "steps": steps}
    return json_format.ParseDict(
        {"name": "secure", "seed": seed, "width": 64, "height": 64, "stages": [{"name": "a", "denoise": body}],
         "outputs": [{"stage": "a", "format": "safetensors"}]},
        jpb.JobSpec(),
    )  # fmt: skip


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    root = tmp_path_factory.mktemp("pki")
    ca = Authority(root / "ca")
    rogue = Authority(root / "rogue", name="rogue-ca")
    server = ca.issue("baton-server", server=True)
    auth_file = root / "auth.yaml"
    auth_file.write_text(identities())
    return {
        "root": root,
        "ca": ca,
        "rogue": rogue,
        "server": server,
        "cluster": ca.issue("cluster"),
        "gamma": ca.issue("gamma"),
        "auth": auth_file,
    }


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, pki):
    server, cluster_cert = pki["server"], pki["cluster"]
    serve_tls = {
        "BATON_TLS_CERT": str(server.cert),
        "BATON_TLS_KEY": str(server.key),
        "BATON_AUTH_FILE": str(pki["auth"]),
    }
    c = Cluster(
        tmp_path_factory.mktemp("secure"), demo_models(tmp_path_factory.mktemp("secure-models")),
        gateway_env={
            **serve_tls,
            "BATON_CLUSTER_CA": str(pki["ca"].ca),
            "BATON_CLUSTER_CERT": str(cluster_cert.cert),
            "BATON_CLUSTER_KEY": str(cluster_cert.key),
        },
        denoiser_env={**serve_tls, "BATON_TLS_CLIENT_CA": str(pki["ca"].ca)},
        probe_tls=ClientTLS.of(str(pki["ca"].ca), str(cluster_cert.cert), str(cluster_cert.key)),
    )  # fmt: skip
    yield c
    c.stop()


def tls(pki, cert: str = "") -> ClientTLS:
    issued = pki[cert] if cert else None
    return ClientTLS.of(str(pki["ca"].ca), str(issued.cert) if issued else "", str(issued.key) if issued else "")


def client(cluster, pki, tenant: str | None = "alpha", **kw) -> BatonClient:
    return BatonClient(cluster.gateway.address, tls=kw.pop("tls", tls(pki)), token=TOKENS.get(tenant or "", ""), **kw)


def code_of(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value.code()


# -- TLS ----------------------------------------------------------------------------------------
def test_a_plaintext_client_is_refused(cluster, pki):
    with BatonClient(cluster.gateway.address, tls=PLAINTEXT, token="", timeout=5) as plain:
        assert code_of(lambda: list(plain.list(page_size=1))) == grpc.StatusCode.UNAVAILABLE


def test_a_client_trusting_another_ca_is_refused(cluster, pki):
    rogue = ClientTLS.of(str(pki["rogue"].ca))
    with BatonClient(cluster.gateway.address, tls=rogue, token=TOKENS["alpha"], timeout=5) as c:
        assert code_of(lambda: list(c.list(page_size=1))) == grpc.StatusCode.UNAVAILABLE


def test_with_mtls_a_client_without_a_certificate_is_refused(cluster, pki):
    denoiser = cluster.denoisers[0].address
    assert health_status(denoiser, timeout=5, tls=tls(pki)) == "UNREACHABLE"  # TLS, but no certificate
    assert health_status(denoiser, timeout=5, tls=tls(pki, "cluster")) == "SERVING"


def test_a_job_runs_end_to_end_over_tls(cluster, pki):
    with client(cluster, pki) as alpha:
        done = wait_for_job(alpha, alpha.submit(job()).id)
        assert done.state == jpb.JOB_STATE_SUCCEEDED, done.error
        assert done.tenant == "alpha"
        out = alpha.get_tensor(done.outputs[0].latents.blob)
        assert out.shape[:2] == (1, 4) and torch.isfinite(out).all()
        assert done.outputs[0].latents.blob.key.startswith("baton:blob:{alpha/")


# -- tokens ---------------------------------------------------------------------------------------
def test_a_missing_or_wrong_token_is_unauthenticated_and_health_stays_open(cluster, pki):
    with client(cluster, pki, tenant=None, timeout=5) as anonymous:
        assert code_of(lambda: list(anonymous.list(page_size=1))) == grpc.StatusCode.UNAUTHENTICATED
    with BatonClient(cluster.gateway.address, tls=tls(pki), token="not-a-token", timeout=5) as wrong:
        assert code_of(lambda: wrong.submit(job())) == grpc.StatusCode.UNAUTHENTICATED
    assert health_status(cluster.gateway.address, timeout=5, tls=tls(pki)) == "SERVING"


def test_tenant_b_sees_nothing_of_tenant_a(cluster, pki):
    with client(cluster, pki, "alpha") as alpha, client(cluster, pki, "beta") as beta:
        upload = alpha.put_tensor(torch.ones(1, 4, 8, 8))
        done = wait_for_job(alpha, alpha.submit(job(), idempotency_key="same-key").id)
        blob = done.outputs[0].latents.blob
        guessed = pb.BlobHandle(key=f"baton:blob:{{alpha/{done.id}/a}}")
        refused = {
            "Get": lambda: beta.get(done.id),
            "Watch": lambda: list(beta.watch(done.id)),
            "Cancel": lambda: beta.cancel(done.id),
            "GetBlob output": lambda: beta.get_bytes(blob),
            "GetBlob guessed key": lambda: beta.get_bytes(guessed),
            "GetBlob upload": lambda: beta.get_bytes(upload),
        }
        assert {name: code_of(call) for name, call in refused.items()} == dict.fromkeys(
            refused, grpc.StatusCode.NOT_FOUND
        )
        with pytest.raises(grpc.RpcError) as err:
            beta.get(done.id)
        with pytest.raises(grpc.RpcError) as unknown:
            beta.get("0" * 32)
        assert err.value.details().replace(done.id, "0" * 32) == unknown.value.details(), "no hint that it exists"
        assert done.id not in {j.id for j in beta.list(page_size=1000)}
        # Beta's Submit naming alpha's upload as an input: NOT_FOUND, before any work.
        spec = job()
        spec.inputs.add(name="init", latents=pb.LatentHandle(blob=upload))
        with pytest.raises(grpc.RpcError) as stolen:
            beta.submit(spec)
        assert stolen.value.code() == grpc.StatusCode.NOT_FOUND and "inputs[0]" in stolen.value.details()
        # One tenant's idempotency key neither finds nor blocks another's job.
        assert beta.submit(job(), idempotency_key="same-key").id != done.id
        # Alpha still reads its own.
        assert alpha.get_bytes(upload) and alpha.get(done.id).state == jpb.JOB_STATE_SUCCEEDED
    with client(cluster, pki, "ops") as admin:
        tenants = {j.tenant for j in admin.list(page_size=1000)}
        assert {"alpha", "beta"} <= tenants
        assert admin.get(done.id).id == done.id and admin.get_bytes(blob)


def test_the_identities_file_is_reloaded_when_it_changes(cluster, pki):
    late = {"tenant": "delta", "role": "user", "token_sha256": hashlib.sha256(b"delta-secret").hexdigest()}
    with BatonClient(cluster.gateway.address, tls=tls(pki), token="delta-secret", timeout=5) as delta:
        assert code_of(lambda: list(delta.list(page_size=1))) == grpc.StatusCode.UNAUTHENTICATED
        pki["auth"].write_text(identities([late]))
        try:
            deadline = time.monotonic() + 10
            while True:
                try:
                    assert list(delta.list(page_size=1)) == []
                    break
                except grpc.RpcError as exc:
                    assert exc.code() == grpc.StatusCode.UNAUTHENTICATED and time.monotonic() < deadline
                    time.sleep(0.2)
        finally:
            pki["auth"].write_text(identities())


# -- workers serve only the cluster ---------------------------------------------------------------
def denoiser_stub(cluster, pki, cert: str, token: str = "") -> denoiser_pb2_grpc.DenoiserStub:
    channel = open_channel(cluster.denoisers[0].address, [], tls(pki, cert), token)
    return denoiser_pb2_grpc.DenoiserStub(channel)


def test_a_tenant_cannot_call_a_worker_or_choose_an_output_key(cluster, pki):
    # A tenant's own certificate (same CA) and its token: the worker knows it is not the cluster.
    forged = dpb.DenoiseRequest(model="sd1-a", output_key="alpha/some-job/a")
    for token in ("", TOKENS["alpha"]):
        stub = denoiser_stub(cluster, pki, "gamma", token)
        calls = {
            "ListModels": lambda s=stub: s.ListModels(dpb.ListModelsRequest(), timeout=5),
            "Denoise with an output_key": lambda s=stub: list(s.Denoise(forged, timeout=5)),
        }
        codes = {name: code_of(call) for name, call in calls.items()}
        assert codes == dict.fromkeys(calls, grpc.StatusCode.PERMISSION_DENIED), token
    assert denoiser_stub(cluster, pki, "cluster").ListModels(dpb.ListModelsRequest(), timeout=5).models
    # The cluster token admits a caller whatever certificate it holds (a gateway without mTLS credentials).
    assert denoiser_stub(cluster, pki, "gamma", "cluster-secret").ListModels(dpb.ListModelsRequest(), timeout=5).models


def test_loading_models_needs_the_admin_role(cluster, pki):
    as_cluster = denoiser_stub(cluster, pki, "cluster")
    request = dpb.LoadModelRequest(model="sd1-b")
    assert code_of(lambda: as_cluster.LoadModel(request, timeout=5)) == grpc.StatusCode.PERMISSION_DENIED
    assert code_of(lambda: as_cluster.UnloadModel(dpb.UnloadModelRequest(model="sd1-b"), timeout=5)) == (
        grpc.StatusCode.PERMISSION_DENIED
    )
    as_admin = denoiser_stub(cluster, pki, "cluster", TOKENS["ops"])
    assert as_admin.LoadModel(request, timeout=120).name == "sd1-b"


# -- a gateway that asks for client certificates --------------------------------------------------
@pytest.fixture(scope="module")
def mtls_gateway(cluster, pki):
    own = pki["ca"].issue("mtls-gateway", server=True)  # its own files: the rotation test swaps them
    env = {"BATON_TLS_CLIENT_CA": str(pki["ca"].ca), "BATON_TLS_CERT": str(own.cert), "BATON_TLS_KEY": str(own.key)}
    pki["mtls-gateway"] = own
    return cluster.local.add("gateway", env=env)


def test_an_mtls_gateway_takes_the_tenant_from_the_certificate(cluster, pki, mtls_gateway):
    with BatonClient(mtls_gateway.address, tls=tls(pki), token="", timeout=5) as bare:
        assert code_of(lambda: list(bare.list(page_size=1))) == grpc.StatusCode.UNAVAILABLE
    with BatonClient(mtls_gateway.address, tls=tls(pki, "gamma"), token="") as gamma:
        done = wait_for_job(gamma, gamma.submit(job()).id)
        assert done.state == jpb.JOB_STATE_SUCCEEDED and done.tenant == "gamma"
        assert {j.tenant for j in gamma.list(page_size=1000)} == {"gamma"}


def test_rotated_server_certificates_are_served_without_a_restart(cluster, pki, mtls_gateway):
    """The mTLS gateway's server certificate is replaced by one from another CA, in place."""
    server = pki["mtls-gateway"]
    old_cert, old_key = server.cert.read_bytes(), server.key.read_bytes()
    renewed = pki["rogue"].issue("baton-server-renewed", server=True)
    gamma_tls = ClientTLS.of(str(pki["rogue"].ca), str(pki["gamma"].cert), str(pki["gamma"].key))
    try:
        server.key.write_bytes(renewed.key.read_bytes())
        server.cert.write_bytes(renewed.cert.read_bytes())
        deadline = time.monotonic() + 10
        while health_status(mtls_gateway.address, timeout=2, tls=gamma_tls) != "SERVING":
            assert time.monotonic() < deadline, "the renewed certificate was not served"
            time.sleep(0.2)
        with BatonClient(mtls_gateway.address, tls=gamma_tls, token="", timeout=10) as gamma:
            assert gamma.stub.ListSchedulers(gpb.ListSchedulersRequest(), timeout=10).schedulers
    finally:
        server.key.write_bytes(old_key)
        server.cert.write_bytes(old_cert)
    deadline = time.monotonic() + 10
    while health_status(mtls_gateway.address, timeout=2, tls=tls(pki, "gamma")) != "SERVING":
        assert time.monotonic() < deadline, "the original certificate did not come back"
        time.sleep(0.2)


def test_baton_health_probes_over_tls_with_the_service_s_own_cluster_credentials(cluster, pki, monkeypatch, capsys):
    from services.cli.main import main

    denoiser = cluster.denoisers[0].address
    monkeypatch.setenv("BATON_TLS_CERT", str(pki["server"].cert))  # as inside the denoiser's container
    monkeypatch.setenv("BATON_CLUSTER_CA", str(pki["ca"].ca))
    assert main(["health", denoiser]) == 1, "mTLS: no client certificate, no answer"
    monkeypatch.setenv("BATON_CLUSTER_CERT", str(pki["cluster"].cert))
    monkeypatch.setenv("BATON_CLUSTER_KEY", str(pki["cluster"].key))
    assert main(["health", denoiser]) == 0
    assert capsys.readouterr().out.splitlines() == [f"{denoiser} UNREACHABLE", f"{denoiser} SERVING"]


def test_the_cli_takes_ca_and_token_flags_and_says_a_refusal_in_one_line(cluster, pki, capsys):
    from services.cli.main import main

    flags = ["--gateway", cluster.gateway.address, "--ca", str(pki["ca"].ca)]
    assert main(["ls", *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("baton ls: UNAUTHENTICATED: ") and "\n" not in err, err
    assert main(["ls", *flags, "--token", TOKENS["alpha"]]) == 0


def test_listing_workers_needs_the_admin_role_and_listing_models_does_not(cluster, pki):
    with client(cluster, pki, "alpha") as alpha, client(cluster, pki, "ops") as ops:
        assert code_of(alpha.list_workers) == grpc.StatusCode.PERMISSION_DENIED
        assert "sd1-a" in {m.model.name for m in alpha.list_models()}
        assert [w.kind for w in ops.list_workers()] == ["denoiser"]
