"""The service runtime, through a real server subprocess: statuses, limits, metrics, drain."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.api.baton.v1 import processor_pb2, processor_pb2_grpc
from services.devkit.cluster import ServiceProcess
from tests.reflection import list_services

REPO = Path(__file__).resolve().parents[1]


def start_probe(redis_url: str, grace: float, log: Path) -> ServiceProcess:
    """tests/probe_service.py as a real server process, SERVING."""
    env = {"BATON_GRACE_PERIOD": str(grace)}
    probe = ServiceProcess("probe", redis_url, env, module="tests.probe_service", log=log, cwd=REPO)
    return probe.start().wait_serving(timeout=30)


def call(probe: ServiceProcess, command: str, timeout: float = 30, **fields):
    stub = processor_pb2_grpc.ProcessorStub(probe.channel)
    return stub.Process(processor_pb2.ProcessRequest(processors=[command], **fields), timeout=timeout)


@pytest.fixture(scope="module")
def probe(redis_url, tmp_path_factory):
    p = start_probe(redis_url, 5.0, tmp_path_factory.mktemp("probe") / "probe.log")
    yield p
    p.stop(grace=0)


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
        call(probe, f"raise:{error}")
    assert info.value.code() == code
    assert info.value.details() == "stage 'probe', field 'processors': probe says no"
    assert call(probe, "echo")  # still serving


def test_an_unexpected_exception_is_internal_and_the_service_keeps_serving(probe):
    with pytest.raises(grpc.RpcError) as info:
        call(probe, "crash")
    assert info.value.code() == grpc.StatusCode.INTERNAL
    assert "ValueError" in info.value.details()
    assert call(probe, "echo")


def test_messages_above_grpcs_4_mib_default_are_accepted(probe):
    big = "x" * (6 << 20)
    reply = call(probe, "echo", output_key=big)
    assert int(reply.latents.model) > 6 << 20


def test_deadline_is_enforced(probe):
    with pytest.raises(grpc.RpcError) as info:
        call(probe, "sleep:3", timeout=0.3)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


def test_reflection_lists_the_service_and_health(probe):
    names = list_services(probe.address)
    assert {"baton.v1.Processor", "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= set(names)


def test_metrics_count_calls_by_method_and_code(probe):
    # The exposition sorts labels by name.
    process = 'grpc_method="Process",grpc_service="baton.v1.Processor",grpc_type="unary"'
    ok = f'grpc_server_handled_total{{grpc_code="OK",{process}}}'
    not_found = f'grpc_server_handled_total{{grpc_code="NOT_FOUND",{process}}}'
    before = probe.metrics()
    call(probe, "echo")
    call(probe, "echo")
    with pytest.raises(grpc.RpcError):
        call(probe, "raise:NotFound")
    after = probe.metrics()
    assert after[ok] - before.get(ok, 0) == 2
    assert after[not_found] - before.get(not_found, 0) == 1
    assert f"grpc_server_handling_seconds_count{{{process}}}" in after


def test_sigterm_drains_in_flight_calls_and_reports_not_serving(redis_url, tmp_path):
    probe = start_probe(redis_url, 10.0, tmp_path / "probe.log")
    try:
        result: dict = {}

        def slow_call():
            try:
                result["reply"] = call(probe, "sleep:2")
            except grpc.RpcError as exc:
                result["error"] = exc

        caller = threading.Thread(target=slow_call)
        caller.start()
        time.sleep(0.5)
        health = health_pb2_grpc.HealthStub(probe.channel)
        watch = health.Watch(health_pb2.HealthCheckRequest(service=""), timeout=10)
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        probe.signal(signal.SIGTERM)
        assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
        caller.join(10)
        assert "reply" in result, result.get("error")
        assert probe.wait(15) == 0
    finally:
        probe.stop(grace=0)


def test_calls_outliving_the_grace_period_are_cut_off(redis_url, tmp_path):
    probe = start_probe(redis_url, 0.5, tmp_path / "probe.log")
    try:
        errors: list = []
        caller = threading.Thread(target=lambda: _expect_error(probe, errors))
        caller.start()
        time.sleep(0.5)
        started = time.monotonic()
        probe.signal(signal.SIGTERM)
        assert probe.wait(15) == 0
        assert time.monotonic() - started < 5
        caller.join(10)
        assert errors and errors[0].code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
    finally:
        probe.stop(grace=0)


def _expect_error(probe: ServiceProcess, errors: list) -> None:
    try:
        call(probe, "sleep:30")
    except grpc.RpcError as exc:
        errors.append(exc)
