"""The service runtime, through a real server subprocess: statuses, limits, metrics, drain."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.cli.cluster import free_port, health_status
from services.common.api.baton.v1 import processor_pb2, processor_pb2_grpc
from tests.reflection import list_services

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Probe:
    def __init__(self, redis_url: str, grace: float):
        self.port, self.metrics_port = free_port(), free_port()
        env = {
            **os.environ,
            "BATON_HOST": "127.0.0.1",
            "BATON_PORT": str(self.port),
            "BATON_METRICS_PORT": str(self.metrics_port),
            "BATON_REDIS_URL": redis_url,
            "BATON_GRACE_PERIOD": str(grace),
        }
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.probe_service"], cwd=REPO, env=env,
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        self.address = f"127.0.0.1:{self.port}"
        deadline = time.monotonic() + 30
        while health_status(self.address) != "SERVING":
            assert self.process.poll() is None, self.process.stderr.read()
            assert time.monotonic() < deadline, "probe service never became SERVING"
            time.sleep(0.1)
        self.channel = grpc.insecure_channel(self.address)
        self.stub = processor_pb2_grpc.ProcessorStub(self.channel)

    def call(self, command: str, timeout: float = 30, **fields):
        return self.stub.Process(processor_pb2.ProcessRequest(processors=[command], **fields), timeout=timeout)

    def stop(self):
        self.channel.close()
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()


@pytest.fixture(scope="module")
def probe(redis_url):
    p = Probe(redis_url, grace=5.0)
    yield p
    p.stop()


@pytest.mark.parametrize(
    "error,code",
    [
        ("InvalidArgument", grpc.StatusCode.INVALID_ARGUMENT),
        ("NotFound", grpc.StatusCode.NOT_FOUND),
        ("FailedPrecondition", grpc.StatusCode.FAILED_PRECONDITION),
        ("ResourceExhausted", grpc.StatusCode.RESOURCE_EXHAUSTED),
        ("BlobCorrupt", grpc.StatusCode.DATA_LOSS),
        ("BlobNotFound", grpc.StatusCode.NOT_FOUND),
        ("Unimplemented", grpc.StatusCode.UNIMPLEMENTED),
    ],
)
def test_errors_become_their_status_codes_naming_stage_and_field(probe, error, code):
    with pytest.raises(grpc.RpcError) as info:
        probe.call(f"raise:{error}")
    assert info.value.code() == code
    assert info.value.details() == "stage 'probe', field 'processors': probe says no"
    assert probe.call("echo")  # still serving


def test_an_unexpected_exception_is_internal_and_the_service_keeps_serving(probe):
    with pytest.raises(grpc.RpcError) as info:
        probe.call("crash")
    assert info.value.code() == grpc.StatusCode.INTERNAL
    assert "ValueError" in info.value.details()
    assert probe.call("echo")


def test_messages_above_grpcs_4_mib_default_are_accepted(probe):
    big = "x" * (6 << 20)
    reply = probe.call("echo", output_key=big)
    assert int(reply.latents.model) > 6 << 20


def test_deadline_is_enforced(probe):
    with pytest.raises(grpc.RpcError) as info:
        probe.call("sleep:3", timeout=0.3)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


def test_reflection_lists_the_service_and_health(probe):
    names = list_services(probe.address)
    assert {"baton.v1.Processor", "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= set(names)


def scrape(probe: Probe) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{probe.metrics_port}/metrics", timeout=5).read().decode()
    samples = (line.rsplit(" ", 1) for line in text.splitlines() if line and not line.startswith("#"))
    return {name: float(value) for name, value in samples}


def test_metrics_count_calls_by_method_and_code(probe):
    ok = 'baton_grpc_requests_total{code="OK",method="/baton.v1.Processor/Process"}'
    not_found = 'baton_grpc_requests_total{code="NOT_FOUND",method="/baton.v1.Processor/Process"}'
    before = scrape(probe)
    probe.call("echo")
    probe.call("echo")
    with pytest.raises(grpc.RpcError):
        probe.call("raise:NotFound")
    after = scrape(probe)
    assert after[ok] - before.get(ok, 0) == 2
    assert after[not_found] - before.get(not_found, 0) == 1
    assert 'baton_grpc_request_duration_seconds_count{method="/baton.v1.Processor/Process"}' in after


def test_sigterm_drains_in_flight_calls_and_reports_not_serving(redis_url):
    probe = Probe(redis_url, grace=10.0)
    try:
        result: dict = {}

        def slow_call():
            try:
                result["reply"] = probe.call("sleep:2")
            except grpc.RpcError as exc:
                result["error"] = exc

        caller = threading.Thread(target=slow_call)
        caller.start()
        time.sleep(0.5)
        health = health_pb2_grpc.HealthStub(probe.channel)
        watch = health.Watch(health_pb2.HealthCheckRequest(service=""), timeout=10)
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        probe.process.send_signal(signal.SIGTERM)
        assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
        caller.join(10)
        assert "reply" in result, result.get("error")
        assert probe.process.wait(15) == 0
    finally:
        probe.stop()


def test_calls_outliving_the_grace_period_are_cut_off(redis_url):
    probe = Probe(redis_url, grace=0.5)
    try:
        errors: list = []
        caller = threading.Thread(target=lambda: _expect_error(probe, errors))
        caller.start()
        time.sleep(0.5)
        started = time.monotonic()
        probe.process.send_signal(signal.SIGTERM)
        assert probe.process.wait(15) == 0
        assert time.monotonic() - started < 5
        caller.join(10)
        assert errors and errors[0].code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
    finally:
        probe.stop()


def _expect_error(probe: Probe, errors: list) -> None:
    try:
        probe.call("sleep:30")
    except grpc.RpcError as exc:
        errors.append(exc)
