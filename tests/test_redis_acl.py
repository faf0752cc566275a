"""Baton as a least-privilege Redis user (README, Security): the README's ACL line runs the demo job
and every store, refuses the rest, and works on a Redis Cluster and over mutual TLS."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis
import torch

from services.common import redis_conn
from services.common.api.baton.v1 import jobs_pb2 as jpb
from services.common.api.baton.v1 import workers_pb2 as wpb
from services.common.blobs import BlobStore
from services.common.redis_conn import connect, connect_async
from services.common.registry import WorkerRegistry
from services.devkit.cluster import LocalCluster, RedisServer, free_port
from services.gateway.jobs import JobStore
from tests.gateway_kit import aliases, demo_models
from tests.service_procs import REPO, TEST_ENV

PASSWORD = "baton-test-password"
ADMIN_PASSWORD = "admin-test-password"
CLUSTER_COMMANDS = "+cluster|info +cluster|slots +command"
# redis-py names itself with CLIENT SETINFO on each connection and goes on when Redis 7.2+
# refuses it (7.0 does not know it).
IGNORED = {"client|setinfo"}


def acl_rules() -> list[str]:
    """The rules of the README's ACL line (after `user baton`), with the test's password."""
    readme = (REPO / "README.md").read_text()
    line = next(t.strip() for t in readme.splitlines() if t.strip().startswith("user baton on >PASSWORD "))
    return line.replace(">PASSWORD", f">{PASSWORD}").split()[2:]


def refused(admin: redis.Redis) -> set[str]:
    """What Redis refused since the last ACL LOG RESET, less what redis-py shrugs off."""
    return {entry["object"] for entry in admin.acl_log()} - IGNORED


def baton_url(port: int, scheme: str = "redis", query: str = "") -> str:
    return f"{scheme}://baton:{PASSWORD}@127.0.0.1:{port}/0" + (f"?{query}" if query else "")


def write_acl_file(path: Path) -> Path:
    # Unauthenticated clients may only PING (the harness's readiness check); an admin reads the
    # ACL LOG; Baton is the README's user.
    path.write_text(
        "user default on nopass resetchannels -@all +ping\n"
        f"user admin on >{ADMIN_PASSWORD} ~* &* +@all\n"
        f"user baton {' '.join(acl_rules())}\n"
    )
    return path


@pytest.fixture(scope="module")
def acl_redis(tmp_path_factory):
    root = tmp_path_factory.mktemp("redis-acl")
    with RedisServer(root / "data", extra_args=["--aclfile", str(write_acl_file(root / "users.acl"))]) as server:
        yield server


@pytest.fixture
def admin(acl_redis):
    with redis.Redis(port=acl_redis.port, username="admin", password=ADMIN_PASSWORD) as client:
        client.acl_log_reset()
        yield client


def use_every_store(url: str) -> None:
    """Every kind of Redis call Baton makes: blobs, the worker registry, jobs, queue, leases, events."""
    client = connect(url, "auto")
    store = BlobStore(client, chunk_bytes=1024, ttl_s=60)
    store.put_tensor(torch.zeros(512), name="acl")
    handle = store.put_tensor(torch.arange(512.0), name="acl")  # a second generation retires the first
    assert torch.equal(store.get_tensor("acl"), torch.arange(512.0))
    handle = store.keep_until(handle, int(time.time() * 1000) + 120_000)
    assert store.exists(handle)
    store.delete(handle)
    assert store.get_bytes(store.put_bytes(b"anonymous")) == b"anonymous"
    registry = WorkerRegistry(client)
    registry.announce(wpb.WorkerInfo(kind="denoiser", worker_id="acl-worker"))
    assert [w.worker_id for w in registry.workers("denoiser")] == ["acl-worker"]
    registry.withdraw("denoiser", "acl-worker")
    client.close()

    async def jobs() -> None:
        async_client = connect_async(url, "auto")
        store = JobStore(async_client, retention_s=60)
        job, _ = await store.create(store.new_job(jpb.JobSpec(name="acl"), "acl-key"), "acl-key", time.time() + 60)
        assert (await store.create(store.new_job(jpb.JobSpec(name="acl"), "acl-key"), "acl-key", 0))[0].id == job.id
        assert await store.position(job.id) >= 1 and await store.is_queued(job.id)
        assert job.id in [i for i, _ in await store.queue_head(100)] and await store.queued_past(time.time()) == []
        assert await store.acquire(job.id, "me", 5) and await store.renew(job.id, "me", 5) == 1
        assert await store.holder(job.id) == "me" and await store.submitted_at(job.id)
        job.state = jpb.JOB_STATE_SUCCEEDED
        assert await store.save(job) == 1
        assert [e.job_state for e in await store.events(job.id, "0", block_ms=10)] == [jpb.JOB_STATE_QUEUED]
        assert job.id in [j.id for j in (await store.list_jobs(0, 10, ""))[0]]
        await store.request_cancel(job.id, "because")
        assert await store.cancel_reason(job.id) == "because" and await store.exists(job.id)
        await store.release(job.id, "me")
        assert job.id not in await store.active()
        await store.forget(job.id)
        await async_client.aclose()

    asyncio.run(jobs())


def test_the_demo_job_runs_as_the_least_privilege_user(acl_redis, admin, tmp_path):
    models = demo_models(tmp_path / "models")
    logs = tmp_path / "logs"
    with LocalCluster(
        ["gateway", "denoiser"],
        redis_url=baton_url(acl_redis.port),
        log_dir=logs,
        env=TEST_ENV,
        service_env={"denoiser": {"BATON_MODELS": aliases(models)}},
        default_ports=False,
    ) as cluster:
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "services.cli.main",
                "run",
                str(REPO / "examples" / "sd1-two-model.yaml"),
                "--out",
                str(tmp_path / "out"),
                "--gateway",
                cluster.address("gateway"),
                "--quiet",
            ],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=300,
            env={**os.environ, "HF_HUB_OFFLINE": "1"},
        )
    assert result.returncode == 0, result.stderr
    assert {p.name for p in (tmp_path / "out").iterdir()} >= {"draft.safetensors", "finish.safetensors", "picture.png"}
    # Nothing was refused but the cluster question, which each service asked and logged once.
    assert refused(admin) == {"cluster|info"}
    gateway_log = (logs / "gateway.log").read_text()
    assert gateway_log.count("CLUSTER INFO") == 1 and PASSWORD not in gateway_log
    assert all(key.startswith(b"baton:") for key in admin.keys("*"))


def test_every_store_works_as_the_least_privilege_user(acl_redis, admin):
    use_every_store(baton_url(acl_redis.port))
    assert refused(admin) == {"cluster|info"}


@pytest.mark.parametrize(
    "command",
    [
        ("FLUSHALL",),
        ("KEYS", "*"),
        ("INFO",),
        ("CONFIG", "GET", "*"),
        ("SET", "other:key", "1"),
        ("GET", "other:key"),
        ("PUBLISH", "baton:channel", "1"),
        ("EVAL", "return 1", "0"),
    ],
    ids=lambda c: " ".join(c[:2]),
)
def test_what_the_acl_leaves_out_is_refused(acl_redis, command):
    with redis.Redis(port=acl_redis.port, username="baton", password=PASSWORD) as baton:
        assert baton.set("baton:allowed", b"1")
        with pytest.raises(redis.exceptions.NoPermissionError):
            baton.execute_command(*command)


def test_an_unauthenticated_client_may_only_ping(acl_redis):
    with redis.Redis(port=acl_redis.port) as anonymous:
        assert anonymous.ping()
        with pytest.raises(redis.exceptions.NoPermissionError):
            anonymous.get("baton:allowed")


def test_cluster_detection_without_cluster_info_picks_a_single_server_and_says_so_once(acl_redis, caplog, monkeypatch):
    monkeypatch.setattr(redis_conn, "_SAID_SINGLE", set())  # as in a fresh process
    with caplog.at_level(logging.INFO, logger="baton.redis"):
        clients = [connect(baton_url(acl_redis.port), "auto") for _ in range(2)]
    assert all(type(c) is redis.Redis and c.ping() for c in clients)
    said = [r.getMessage() for r in caplog.records if r.name == "baton.redis"]
    assert len(said) == 1 and "single server" in said[0] and PASSWORD not in said[0]


def test_a_redis_cluster_serves_baton_with_the_acl_and_the_cluster_commands(redis_cluster_url):
    nodes = redis.RedisCluster.from_url(redis_cluster_url)
    admins = [redis.Redis(host=n.host, port=n.port) for n in nodes.get_nodes()]
    nodes.close()
    assert len(admins) == 3 and "+cluster|slots" in (REPO / "README.md").read_text()
    try:
        for admin in admins:
            admin.execute_command("ACL", "SETUSER", "baton", "reset", *acl_rules(), *CLUSTER_COMMANDS.split())
            admin.acl_log_reset()
        url = baton_url(admins[0].connection_pool.connection_kwargs["port"])
        assert isinstance(connect(url, "auto"), redis.RedisCluster)
        use_every_store(url)
        assert set().union(*(refused(a) for a in admins)) == set()
    finally:
        for admin in admins:
            admin.acl_deluser("baton")
            admin.close()


def _certificates(root: Path) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, made with openssl."""
    openssl = shutil.which("openssl") or pytest.skip("no openssl on PATH")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]

    def run(*args: str) -> None:
        subprocess.run([openssl, *args], cwd=root, check=True, capture_output=True)

    run("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=baton-test-ca")
    for name, extensions in (("server", "subjectAltName=IP:127.0.0.1"), ("client", "extendedKeyUsage=clientAuth")):
        (root / f"{name}.ext").write_text(extensions + "\n")
        run("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN=baton-{name}")
        run(
            "x509",
            "-req",
            "-in",
            f"{name}.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-out",
            f"{name}.crt",
            "-extfile",
            f"{name}.ext",
        )
    return {name: root / name for name in ("ca.pem", "server.crt", "server.key", "client.crt", "client.key")}


def test_rediss_with_a_ca_and_a_client_certificate_carries_the_acl_user(tmp_path):
    certs = _certificates(tmp_path)
    tls_port = free_port()
    tls = [
        "--tls-port",
        str(tls_port),
        "--tls-cert-file",
        str(certs["server.crt"]),
        "--tls-key-file",
        str(certs["server.key"]),
        "--tls-ca-cert-file",
        str(certs["ca.pem"]),
        "--tls-auth-clients",
        "yes",
    ]
    acl = write_acl_file(tmp_path / "users.acl")
    ca = f"ssl_ca_certs={certs['ca.pem']}"
    with RedisServer(tmp_path / "data", extra_args=[*tls, "--aclfile", str(acl)]):
        url = baton_url(
            tls_port, "rediss", f"{ca}&ssl_certfile={certs['client.crt']}&ssl_keyfile={certs['client.key']}"
        )
        store = BlobStore(connect(url, "auto"))
        assert store.get_bytes(store.put_bytes(b"over tls")) == b"over tls"
        with pytest.raises(redis.exceptions.ConnectionError):  # no client certificate: the handshake fails
            connect(baton_url(tls_port, "rediss", ca), "no").ping()
