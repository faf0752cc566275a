"""`baton up`: a real local cluster of subprocesses, SERVING, and gone after a signal."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest

from services.common.api.baton.v1 import (
    denoiser_pb2,
    denoiser_pb2_grpc,
    gateway_pb2,
    gateway_pb2_grpc,
    interposer_pb2,
    interposer_pb2_grpc,
    processor_pb2,
    processor_pb2_grpc,
)
from services.devkit.cluster import health_status
from tests.reflection import list_services

REPO = Path(__file__).resolve().parents[1]
SERVICES = {
    "gateway": "baton.v1.Gateway",
    "denoiser": "baton.v1.Denoiser",
    "interposer": "baton.v1.Interposer",
    "processor": "baton.v1.Processor",
}


def alive(pid: int) -> bool:
    """True while `pid` runs (a zombie no one has reaped yet counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def start_up(tmp_path: Path) -> tuple[subprocess.Popen, dict]:
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "BATON_REDIS_URL")}
    process = subprocess.Popen(
        [sys.executable, "-m", "services.cli.main", "up", "--json", "--log-dir", str(tmp_path / "logs")],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    line = process.stdout.readline()
    assert line, f"baton up printed nothing: {process.stderr.read()}"
    return process, json.loads(line)


def wait_gone(pids: list[int], timeout: float = 20) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(alive(p) for p in pids):
        time.sleep(0.1)
    return [p for p in pids if alive(p)]


def _started(tmp_path):
    process, info = start_up(tmp_path)
    yield process, info
    if process.poll() is None:
        process.kill()
        process.wait()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """One `baton up` for the tests that only look at it."""
    yield from _started(tmp_path_factory.mktemp("up"))


@pytest.fixture
def fresh(tmp_path):
    """A `baton up` of a test's own, for the tests that stop it."""
    yield from _started(tmp_path)


def test_up_serves_all_four_services_with_health_and_reflection(cluster):
    _, info = cluster
    assert set(info) == {"redis", *SERVICES}
    assert info["redis"]["url"].startswith("redis://127.0.0.1:")
    for name, full_name in SERVICES.items():
        address = info[name]["address"]
        assert health_status(address) == "SERVING"
        assert health_status(address, service=full_name) == "SERVING"
        assert full_name in list_services(address)


def test_the_processor_lists_its_built_in_processors(cluster):
    _, info = cluster
    with grpc.insecure_channel(info["processor"]["address"]) as channel:
        stub = processor_pb2_grpc.ProcessorStub(channel)
        reply = stub.ListProcessors(processor_pb2.ListProcessorsRequest(), timeout=10)
    assert {"scale", "noise", "interposer", "resize", "crop", "blend"} <= {p.name for p in reply.processors}


def test_the_gateway_answers_not_found_for_an_unknown_job(cluster):
    _, info = cluster
    with grpc.insecure_channel(info["gateway"]["address"]) as channel, pytest.raises(grpc.RpcError) as err:
        gateway_pb2_grpc.GatewayStub(channel).Get(gateway_pb2.GetJobRequest(job_id="nope"), timeout=10)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND and "nope" in err.value.details()


def test_the_interposer_lists_the_vae_round_trip_with_no_weights_here(cluster):
    _, info = cluster
    with grpc.insecure_channel(info["interposer"]["address"]) as channel:
        stub = interposer_pb2_grpc.InterposerStub(channel)
        reply = stub.ListConversions(interposer_pb2.ListConversionsRequest(), timeout=10)
    assert [c.method for c in reply.conversions] == [interposer_pb2.CONVERSION_METHOD_VAE]


def test_the_denoiser_answers_with_no_models_loaded(cluster):
    _, info = cluster
    with grpc.insecure_channel(info["denoiser"]["address"]) as channel:
        reply = denoiser_pb2_grpc.DenoiserStub(channel).ListModels(denoiser_pb2.ListModelsRequest(), timeout=10)
    assert list(reply.models) == []


def test_sigterm_stops_every_process(fresh):
    process, info = fresh
    pids = [entry["pid"] for entry in info.values()]
    process.send_signal(signal.SIGTERM)
    assert process.wait(30) == 0
    assert wait_gone(pids) == []


def test_a_killed_up_leaves_no_process_behind(fresh):
    process, info = fresh
    pids = [entry["pid"] for entry in info.values()]
    process.kill()
    process.wait()
    assert wait_gone(pids) == []


def test_baton_health_exits_zero_only_for_a_serving_service(cluster):
    _, info = cluster
    ok = subprocess.run([sys.executable, "-m", "services.cli.main", "health", info["gateway"]["address"]],
                        cwd=REPO, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert ok.returncode == 0 and "SERVING" in ok.stdout
    down = subprocess.run([sys.executable, "-m", "services.cli.main", "health", "127.0.0.1:1", "--timeout", "0.5"],
                          cwd=REPO, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert down.returncode == 1 and "UNREACHABLE" in down.stdout
