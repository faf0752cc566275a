"""Tracing: one trace from the app through the gateway's job and stage spans to the denoiser's calls,
exported over OTLP when an endpoint is set; the job id and stage on spans and on log lines."""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc
import pytest
from google.protobuf import json_format
from opentelemetry import baggage, trace
from opentelemetry import context as otel_context
from opentelemetry.propagate import get_global_textmap
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from services.client.sync_client import app_tracing
from services.common import tracing
from services.common.api.baton.v1 import jobs_pb2 as jpb
from services.common.logs import ContextFields, JsonFormatter, TextFormatter
from services.devkit.tiny_models import build
from tests.gateway_kit import Cluster, wait_for_job
from tests.service_procs import REPO

SPEC = {
    "name": "traced",
    "seed": 3,
    "width": 64,
    "height": 64,
    "stages": [
        {"name": "draft", "denoise": {"model": "sd1-a", "prompt": "a cat", "steps": 2}},
        {"name": "picture", "decode": {"latents": "draft"}},
    ],
}


@dataclass
class ExportedSpan:
    service: str
    name: str
    trace_id: str
    span_id: str
    parent_id: str
    attributes: dict


class Collector(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP trace receiver that keeps what it is sent."""

    def __init__(self) -> None:
        self.requests: list[trace_service_pb2.ExportTraceServiceRequest] = []

    def Export(self, request, context):
        self.requests.append(request)
        return trace_service_pb2.ExportTraceServiceResponse()

    def spans(self) -> list[ExportedSpan]:
        out = []
        for request in list(self.requests):
            for resource_spans in request.resource_spans:
                service = _attributes(resource_spans.resource.attributes)["service.name"]
                for scope in resource_spans.scope_spans:
                    out += [
                        ExportedSpan(
                            service,
                            s.name,
                            s.trace_id.hex(),
                            s.span_id.hex(),
                            s.parent_span_id.hex(),
                            _attributes(s.attributes),
                        )
                        for s in scope.spans
                    ]
        return out


def _attributes(pairs) -> dict:
    return {kv.key: getattr(kv.value, kv.value.WhichOneof("value")) for kv in pairs}


@pytest.fixture
def collector():
    server = grpc.server(ThreadPoolExecutor(max_workers=2))
    receiver = Collector()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(receiver, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield receiver, port
    server.stop(0)


@pytest.fixture
def app_provider(monkeypatch):
    """The test process as an app that traces: a TracerProvider of its own (not set globally, so
    other tests see none)."""
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(InMemorySpanExporter()))
    monkeypatch.setattr(trace, "get_tracer_provider", lambda: provider)
    return provider


def wait_for_spans(collector: Collector, ready, timeout: float = 15.0) -> list[ExportedSpan]:
    deadline = time.monotonic() + timeout
    while True:
        spans = collector.spans()
        if ready(spans) or time.monotonic() > deadline:
            return spans
        time.sleep(0.1)


def test_a_job_is_one_trace_from_the_app_through_gateway_and_denoiser(collector, app_provider, tmp_path):
    receiver, port = collector
    env = {"BATON_OTLP_ENDPOINT": f"http://127.0.0.1:{port}", "OTEL_BSP_SCHEDULE_DELAY": "200"}
    models = {"sd1-a": str(build("sd1", tmp_path / "sd1", seed=0))}
    cluster = Cluster(tmp_path / "cluster", models, gateway_env={**env, "BATON_LOG_FORMAT": "json"}, denoiser_env=env)
    try:
        with cluster.client() as client:  # made after the app's provider: its calls carry the app's trace
            forged = otel_context.attach(baggage.set_baggage(tracing.JOB_ID, "forged"))  # a tenant's baggage
            try:
                with app_provider.get_tracer("app").start_as_current_span("app") as root:
                    job = client.submit(json_format.ParseDict(SPEC, jpb.JobSpec()))
            finally:
                otel_context.detach(forged)
            done = wait_for_job(client, job.id, timeout=60)
        assert done.state == jpb.JOB_STATE_SUCCEEDED, done.error
        trace_id = trace.format_trace_id(root.get_span_context().trace_id)
        assert done.info["trace_id"] == trace_id

        def ready(spans):
            names = {(s.service, s.name) for s in spans}
            return {("baton-denoiser", "/baton.v1.Denoiser/Decode"), ("baton-gateway", "job")} <= names

        spans = wait_for_spans(receiver, ready)
        ours = [s for s in spans if s.attributes.get("baton.job_id") == job.id]
        assert {s.service for s in ours} == {"baton-gateway", "baton-denoiser"}
        assert {s.trace_id for s in ours} == {trace_id}
        submit = next(s for s in spans if s.name == "/baton.v1.Gateway/Submit")
        assert submit.trace_id == trace_id  # the app's span is the parent of the gateway's
        assert not [s for s in spans if s.attributes.get("baton.job_id") == "forged"]  # the gateway took no baggage

        stage = next(s for s in ours if s.service == "baton-gateway" and s.name == "stage denoise")
        assert stage.attributes["baton.stage"] == "draft"
        assert stage.attributes["baton.stage.kind"] == "denoise"
        assert stage.attributes["baton.model"] == "sd1-a"
        assert stage.attributes["baton.attempt"] == 1
        served = {s.name: s for s in ours if s.service == "baton-denoiser"}  # the server spans
        denoise, decode = served["/baton.v1.Denoiser/Denoise"], served["/baton.v1.Denoiser/Decode"]
        assert denoise.attributes["baton.stage"] == "draft" and decode.attributes["baton.stage"] == "picture"
        # The worker's server span is a child of the gateway's client span inside the stage span.
        by_id = {s.span_id: s for s in spans}
        client_span = by_id[denoise.parent_id]
        assert client_span.service == "baton-gateway" and client_span.parent_id == stage.span_id
    finally:
        cluster.stop()

    gateway_lines = [json.loads(line) for line in (cluster.root / "logs" / "gateway.log").read_text().splitlines()
                     if line.startswith("{")]  # fmt: skip
    succeeded = [line for line in gateway_lines if line["msg"].startswith("stage draft succeeded")]
    assert succeeded and succeeded[0]["job_id"] == job.id and succeeded[0]["stage"] == "draft"
    assert succeeded[0]["trace_id"] == trace_id
    # The denoiser logs in text; its model load ran in the call (on its executor), for the stage.
    loaded = [
        line for line in (cluster.root / "logs" / "denoiser.log").read_text().splitlines() if "loaded sd1-a" in line
    ]
    assert loaded and f"job_id={job.id}" in loaded[0] and "stage=draft" in loaded[0]


def test_without_an_endpoint_spans_are_made_but_none_exported(monkeypatch):
    made: list[str] = []

    class Exporter(InMemorySpanExporter):  # stands in for the OTLP exporter
        def __init__(self, endpoint: str):
            super().__init__()
            made.append(endpoint)

    monkeypatch.setattr("opentelemetry.exporter.otlp.proto.grpc.trace_exporter.OTLPSpanExporter", Exporter)
    provider = tracing.tracer_provider("gateway", "")
    with provider.get_tracer("t").start_as_current_span("s") as span:
        assert span.get_span_context().is_valid  # a trace id for logs and Get's info
    assert made == []
    tracing.tracer_provider("gateway", "http://127.0.0.1:1").shutdown()
    assert made == ["http://127.0.0.1:1"]  # the control: an endpoint makes one


def test_service_name_is_baton_service_unless_otel_service_name_says(monkeypatch):
    monkeypatch.delenv("OTEL_SERVICE_NAME", raising=False)
    monkeypatch.delenv("OTEL_RESOURCE_ATTRIBUTES", raising=False)
    assert tracing.tracer_provider("denoiser", "").resource.attributes["service.name"] == "baton-denoiser"
    monkeypatch.setenv("OTEL_SERVICE_NAME", "render-farm")
    assert tracing.tracer_provider("denoiser", "").resource.attributes["service.name"] == "render-farm"


def _logged(formatter: logging.Formatter, **extra) -> str:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(formatter)
    handler.addFilter(ContextFields())
    logger = logging.getLogger("test.tracing")
    logger.addHandler(handler)
    try:
        logger.warning("about the stage", extra=extra)
    finally:
        logger.removeHandler(handler)
    return out.getvalue()


def test_log_lines_in_a_stage_carry_its_job_id_stage_and_trace_id():
    ctx = baggage.set_baggage(tracing.STAGE, "draft", baggage.set_baggage(tracing.JOB_ID, "j1"))
    token = otel_context.attach(ctx)
    try:
        with TracerProvider().get_tracer("t").start_as_current_span("s") as span:
            line = json.loads(_logged(JsonFormatter()))
            text = _logged(TextFormatter())
            passed = json.loads(_logged(JsonFormatter(), job_id="given"))
    finally:
        otel_context.detach(token)
    assert (line["job_id"], line["stage"]) == ("j1", "draft")
    assert line["trace_id"] == trace.format_trace_id(span.get_span_context().trace_id)
    assert "job_id=j1 stage=draft trace_id=" in text
    assert passed["job_id"] == "given"  # a field passed with extra= is kept as passed
    assert "job_id" not in json.loads(_logged(JsonFormatter()))  # outside the stage, none


def test_a_tenant_facing_service_continues_callers_traces_but_drops_their_baggage():
    propagator = tracing._NoCallerBaggage(get_global_textmap())
    carrier = {
        "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        "baggage": "baton.job_id=someone-elses",
    }
    ctx = propagator.extract(carrier)
    assert trace.get_current_span(ctx).get_span_context().trace_id == 0x0AF7651916CD43DD8448EB211C80319C
    assert baggage.get_all(ctx) == {}
    sent: dict[str, str] = {}
    propagator.inject(sent, baggage.set_baggage(tracing.STAGE, "draft"))
    assert sent["baggage"] == "baton.stage=draft"  # its own baggage still goes to the workers


def test_the_client_traces_only_when_the_app_set_a_tracer_provider(monkeypatch):
    assert app_tracing() is None  # no provider set in this process
    monkeypatch.setattr(trace, "get_tracer_provider", lambda: TracerProvider())
    assert app_tracing() is not None


def test_the_cli_never_imports_opentelemetry():
    code = (
        "import sys\n"
        "import services.cli.main as m\n"
        "m.build_parser()\n"  # imports every verb module
        "from services.client import BatonClient\n"
        "BatonClient('127.0.0.1:1').close()\n"
        "print(sorted(k for k in sys.modules if k.startswith('opentelemetry')))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_a_job_span_continues_the_trace_its_submit_recorded(app_provider):
    info = jpb.Job().info
    with app_provider.get_tracer("t").start_as_current_span("submit") as submit:
        tracing.record_trace(info)
    with tracing.job_span("j1", info):  # later, maybe on another gateway, in another task
        job = trace.get_current_span()
        stage = tracing.stage_context("draft")
    assert info["trace_id"] == trace.format_trace_id(submit.get_span_context().trace_id)
    assert job.parent.span_id == submit.get_span_context().span_id
    assert job.attributes["baton.job_id"] == "j1"
    assert stage.run(baggage.get_all) == {"baton.job_id": "j1", "baton.stage": "draft"}
    assert baggage.get_all() == {}  # only inside the job
