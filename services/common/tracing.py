"""Traces across client, gateway and workers (OpenTelemetry), named for the job and stage they serve.

Every service creates spans: the gRPC instrumentation's for each call served and made, a `job`
span for each run of a job, and a span per stage attempt. They are exported over OTLP/gRPC
only when `--otlp-endpoint` is set; without one they are still created (and dropped as they
end), because their trace ids are what Get's `info` and the log lines name, so that one job's
lines on every replica and worker can be found together, and a collector added later joins
the same traces. The standard OTEL_* variables (sampler, service name, resource attributes,
exporter headers and certificates, OTEL_SDK_DISABLED) work through the SDK's defaults.

A job outlives its Submit call and may run on another gateway: Submit records the caller's
trace context in the job's `info` (`trace_id`, `traceparent`), and whichever gateway runs the
job continues that trace. Workers' requests do not carry the job id, so the gateway sends job
id and stage as baggage (`baton.job_id`, `baton.stage`); every span started under them carries
them as attributes, and log lines as fields (logs.py). A tenant-facing service (the gateway)
takes its callers' trace context but not their baggage, which could name any job.
"""

from __future__ import annotations

import contextvars
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from google.protobuf import struct_pb2
from opentelemetry import baggage, propagate, trace
from opentelemetry import context as otel_context
from opentelemetry.instrumentation.grpc import aio_client_interceptors, aio_server_interceptor, filters
from opentelemetry.propagators.textmap import (
    CarrierT,
    Getter,
    Setter,
    TextMapPropagator,
    default_getter,
    default_setter,
)
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

log = logging.getLogger("baton.tracing")

JOB_ID, STAGE = "baton.job_id", "baton.stage"
# The baggage Baton sets (spans get it as attributes), and the log field each entry becomes.
BAGGAGE = {JOB_ID: "job_id", STAGE: "stage"}
# Health checks and reflection are probes, not work: no spans.
_UNTRACED = filters.negate(filters.any_of(filters.health_check(), filters.service_prefix("grpc.reflection")))
_W3C = TraceContextTextMapPropagator()


def setup(service: str, endpoint: str, *, tenant_facing: bool = False) -> None:
    """Tracing for this process (see tracer_provider); a `tenant_facing` service drops its callers' baggage."""
    trace.set_tracer_provider(tracer_provider(service, endpoint))
    if tenant_facing:
        propagate.set_global_textmap(_NoCallerBaggage(propagate.get_global_textmap()))
    if endpoint:
        log.info("exporting traces to %s", endpoint)


def tracer_provider(service: str, endpoint: str) -> TracerProvider:
    """Spans of service.name `baton-<service>` (unless OTEL_SERVICE_NAME or OTEL_RESOURCE_ATTRIBUTES
    name it), exported to the OTLP `endpoint` in batches when there is one, else only created."""
    resource = Resource.create()
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: f"baton-{service}"}))
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(_BaggageAttributes())
    if endpoint:
        # Imported only here: the exporter is needed only by a process that exports.
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
    return provider


def server_interceptor() -> Any:
    """The instrumentation's server interceptor; it goes first, so its span sees the final status."""
    return aio_server_interceptor(filter_=_UNTRACED)


def client_interceptors() -> list[Any]:
    """The instrumentation's interceptors for a channel to workers: they send the trace and baggage on."""
    return aio_client_interceptors(filter_=_UNTRACED)


def record_trace(info: struct_pb2.Struct) -> None:
    """Keeps the current trace (Submit's) in a job's info: `trace_id` for people, `traceparent` to continue it."""
    carrier: dict[str, str] = {}
    _W3C.inject(carrier)
    if "traceparent" in carrier:
        info["trace_id"] = trace.format_trace_id(trace.get_current_span().get_span_context().trace_id)
        info["traceparent"] = carrier["traceparent"]


@contextmanager
def job_span(job_id: str, info: struct_pb2.Struct) -> Iterator[None]:
    """This gateway's run of a job: a `job` span in the trace its Submit recorded, with the job id as baggage."""
    fields = info.fields
    carrier = {"traceparent": fields["traceparent"].string_value} if "traceparent" in fields else {}
    parent = _W3C.extract(carrier, context=otel_context.Context())
    token = otel_context.attach(baggage.set_baggage(JOB_ID, job_id, parent))
    try:
        with trace.get_tracer("baton").start_as_current_span("job", attributes={JOB_ID: job_id}):
            yield
    finally:
        otel_context.detach(token)


def stage_context(stage: str) -> contextvars.Context:
    """A copy of the current context with `stage` in its baggage, for the stage's task to run in:
    its worker calls and log lines then name the stage."""
    ctx = contextvars.copy_context()
    ctx.run(otel_context.attach, baggage.set_baggage(STAGE, stage))
    return ctx


def stage_span(job_id: str, stage: str, kind: str, model: str, attempt: int, worker: str):
    """A span for one attempt of a stage on a worker; the worker calls made in it are its children."""
    attributes: dict[str, str | int] = {
        JOB_ID: job_id,
        STAGE: stage,
        "baton.stage.kind": kind,
        "baton.attempt": attempt,
        "baton.worker": worker,
    }
    if model:
        attributes["baton.model"] = model
    return trace.get_tracer("baton").start_as_current_span(f"stage {kind}", attributes=attributes)


def log_fields() -> dict[str, str]:
    """What the current context says about the work at hand: job_id and stage (from the baggage)
    and trace_id, for every log line."""
    fields = {BAGGAGE[k]: str(v) for k, v in baggage.get_all().items() if k in BAGGAGE}
    span = trace.get_current_span().get_span_context()
    if span.is_valid:
        fields["trace_id"] = trace.format_trace_id(span.trace_id)
    return fields


class _BaggageAttributes(SpanProcessor):
    """Copies baton.job_id and baton.stage from the baggage onto every span started under them: a
    worker's server span for a stage's call names the stage that made it."""

    def on_start(self, span: Span, parent_context: otel_context.Context | None = None) -> None:
        for key in BAGGAGE:
            value = baggage.get_baggage(key, parent_context)
            if value is not None:
                span.set_attribute(key, str(value))

    def on_end(self, span: ReadableSpan) -> None:
        pass


class _NoCallerBaggage(TextMapPropagator):
    """A tenant-facing service's propagator: it continues its callers' traces but drops their baggage,
    which could name any job or stage; the baggage it sets itself still goes to the workers it calls."""

    def __init__(self, inner: TextMapPropagator):
        self.inner = inner

    def extract(
        self,
        carrier: CarrierT,
        context: otel_context.Context | None = None,
        getter: Getter[CarrierT] = default_getter,
    ) -> otel_context.Context:
        return baggage.clear(self.inner.extract(carrier, context, getter))

    def inject(
        self,
        carrier: CarrierT,
        context: otel_context.Context | None = None,
        setter: Setter[CarrierT] = default_setter,
    ) -> None:
        self.inner.inject(carrier, context, setter)

    @property
    def fields(self) -> set[str]:
        return self.inner.fields
