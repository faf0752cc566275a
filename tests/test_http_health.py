"""The metrics port, against real services: `/livez` says whether the process and its event loop
run, `/readyz` whether it should get calls (warm, Redis reachable, not draining, as gRPC health
says), `/metrics` serves Prometheus; nothing else answers.

A gateway and a denoiser share a cluster whose Redis the tests kill and restart. Warming up and
draining are watched on a service of this module's own (`python -m tests.test_http_health`):
the runtime, with a warm-up and a drain that wait for the test's word.
"""

from __future__ import annotations

import asyncio
import http.client
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import pytest

from services.common import http_endpoints
from services.common.config import service_settings
from services.common.server import Service, main
from services.devkit.cluster import LocalCluster, ServiceProcess
from tests import probe_service
from tests.service_procs import REPO, TEST_ENV

# -- the held service: warm when the file `warm` appears, drained when `drained` does -----------


def wait_for_file(path: Path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.05)


def build_held(settings, runtime):
    held = Path(os.environ["HELD_DIR"])
    runtime.before_serving(lambda: wait_for_file(held / "warm"))

    async def drain(deadline: float) -> None:
        await asyncio.to_thread(wait_for_file, held / "drained", deadline - time.monotonic())

    runtime.on_drain(drain)
    return probe_service.build(settings, runtime)


HELD = Service("held", "a runtime whose warm-up and drain wait for files", service_settings(0, 0), build_held)


# -- helpers ---------------------------------------------------------------------------------
class Answer(NamedTuple):
    status: int
    text: str
    headers: dict[str, str]


def fetch(process: ServiceProcess | int, path: str, method: str = "GET", accept: str = "") -> Answer:
    """`path` on a service's metrics port (or on a port)."""
    port = process if isinstance(process, int) else process.metrics_port
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request(method, path, headers={"Accept": accept} if accept else {})
        reply = conn.getresponse()
        return Answer(reply.status, reply.read().decode(), dict(reply.getheaders()))
    finally:
        conn.close()


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> float:
    """Seconds until `condition()` held; fails the test after `timeout`."""
    start = time.monotonic()
    while True:
        try:
            if condition():
                return time.monotonic() - start
        except OSError:  # the HTTP server is not up yet
            pass
        assert time.monotonic() - start < timeout, f"not {what} within {timeout:.0f} s"
        time.sleep(0.1)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = LocalCluster(
        ["gateway", "denoiser"], log_dir=tmp_path_factory.mktemp("http-health"), env=TEST_ENV, default_ports=False,
        cwd=REPO,
    ).start()  # fmt: skip
    yield c
    c.stop()


@pytest.fixture
def services(cluster) -> list[ServiceProcess]:
    return cluster.processes()


@pytest.fixture
def held(cluster, tmp_path):
    """Starts the held service (not waiting for it to serve); its warm-up and drain wait for files."""
    started: list[ServiceProcess] = []

    def start(warm: bool = False) -> ServiceProcess:
        if warm:
            (tmp_path / "warm").touch()
        env = {**TEST_ENV, "HELD_DIR": str(tmp_path)}
        process = ServiceProcess(
            "held", cluster.redis_url or "", env, module=__name__, log=tmp_path / "held.log", cwd=REPO
        )
        started.append(process.start())
        return process

    yield start
    (tmp_path / "warm").touch()
    (tmp_path / "drained").touch()
    for p in started:
        p.stop()


# -- serving ---------------------------------------------------------------------------------
def test_a_serving_service_is_alive_and_ready(services):
    for p in services:
        assert fetch(p, "/livez")[:2] == (200, "ok"), p.name
        assert fetch(p, "/readyz")[:2] == (200, "ready"), p.name


@pytest.mark.parametrize("path", ["/", "/healthz", "/metricsx", "/livez/", "/metrics/x", "/favicon.ico"])
def test_any_other_path_is_404_so_a_misdirected_probe_fails(services, path):
    assert fetch(services[0], path).status == 404


def test_metrics_are_prometheus_text_saying_ready_and_redis_up(services):
    for p in services:
        answer = fetch(p, "/metrics")
        assert answer.status == 200 and answer.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        samples = p.metrics()
        assert samples["baton_ready"] == 1.0 and samples["baton_redis_up"] == 1.0, p.name


def test_metrics_are_openmetrics_when_the_accept_header_asks(services):
    answer = fetch(services[0], "/metrics", accept="application/openmetrics-text; version=1.0.0")
    assert answer.status == 200 and answer.headers["Content-Type"].startswith("application/openmetrics-text")
    assert "baton_ready 1.0" in answer.text and answer.text.endswith("# EOF\n")


@pytest.mark.parametrize("path", ["/livez", "/readyz", "/metrics", "/nope"])
def test_head_answers_what_get_would_without_the_body(services, path):
    get, head = fetch(services[0], path), fetch(services[0], path, "HEAD")
    assert (head.status, head.text) == (get.status, "")
    assert head.headers["Content-Type"] == get.headers["Content-Type"]
    assert int(head.headers["Content-Length"]) > 0


# -- not ready, still alive ------------------------------------------------------------------
def test_without_redis_readyz_is_503_naming_it_while_livez_stays_200(cluster, services):
    cluster.redis.kill()
    try:
        noticed = wait_until(lambda: all(fetch(p, "/readyz").status == 503 for p in services), 10, "unready")
        for p in services:
            assert fetch(p, "/readyz")[:2] == (503, "Redis unreachable"), p.name
            assert fetch(p, "/livez")[:2] == (200, "ok"), p.name
            assert p.health() == "NOT_SERVING", p.name
            samples = p.metrics()
            assert samples["baton_redis_up"] == 0.0 and samples["baton_ready"] == 0.0, p.name
    finally:
        cluster.redis.restart()
    back = wait_until(lambda: all(fetch(p, "/readyz").status == 200 for p in services), 15, "ready again")
    assert all(p.health() == "SERVING" and p.metrics()["baton_redis_up"] == 1.0 for p in services)
    print(f"readyz noticed Redis gone in {noticed:.1f} s, back in {back:.1f} s")


def test_alive_but_not_ready_while_warming_up(held, tmp_path):
    process = held()
    wait_until(lambda: fetch(process, "/livez").status == 200, 30, "alive")
    assert fetch(process, "/readyz")[:2] == (503, "warming up")
    assert process.health() == "NOT_SERVING"
    assert process.metrics()["baton_ready"] == 0.0
    (tmp_path / "warm").touch()
    wait_until(lambda: fetch(process, "/readyz")[:2] == (200, "ready"), 10, "ready once warm")
    assert process.health() == "SERVING"


def test_draining_is_not_ready_but_alive(held, tmp_path):
    process = held(warm=True).wait_serving(30)
    process.signal(signal.SIGTERM)
    wait_until(lambda: fetch(process, "/readyz").status == 503, 10, "unready on SIGTERM")
    assert fetch(process, "/readyz")[:2] == (503, "draining")
    assert fetch(process, "/livez")[:2] == (200, "ok")
    assert process.health() == "NOT_SERVING"
    (tmp_path / "drained").touch()
    assert process.wait(30) == 0


# -- the state behind them -------------------------------------------------------------------
def test_livez_is_503_once_the_event_loop_has_not_ticked_for_10_s():
    state = http_endpoints.ProbeState()
    server = http_endpoints.start("127.0.0.1", 0, state)
    try:
        assert fetch(server.server_port, "/livez").status == 200
        state.last_tick -= http_endpoints.STALLED_AFTER_S + 1
        assert fetch(server.server_port, "/livez")[:2] == (503, "event loop has not run for 11 s")
    finally:
        server.shutdown()
        server.server_close()


def test_draining_is_the_reason_given_whatever_else_is_wrong():
    state = http_endpoints.ProbeState()
    assert state.not_ready_because() == "warming up"
    state.update(warm=True, redis_up=False)
    assert state.not_ready_because() == "Redis unreachable"
    state.update(draining=True)
    assert state.not_ready_because() == "draining" and not state.ready


if __name__ == "__main__":
    sys.exit(main(HELD))
