"""OpenTelemetry spans of calls and stages (stratacache.tracing), through the SDK's in-memory
exporter, and the OTLP/gRPC export of Tracer.from_endpoint to a real loopback collector."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from stratacache import tracing
from stratacache.logs import RequestLog
from stratacache.tracing import Tracer, stage

SERVICE = "stratacache.v1.SemanticCache"
SECRET = "my card number is 4111 1111 1111 1111"


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
def requests(exporter: InMemorySpanExporter) -> Iterator[RequestLog]:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = Tracer(provider)
    yield RequestLog(log_prompts=True, tracer=tracer)
    tracer.shutdown()


def _by_name(exporter: InMemorySpanExporter) -> dict[str, ReadableSpan]:
    spans = exporter.get_finished_spans()
    named = {span.name: span for span in spans}
    assert len(named) == len(spans), [span.name for span in spans]
    return named


def test_a_call_span_has_a_child_span_per_stage(requests: RequestLog,
                                                exporter: InMemorySpanExporter) -> None:
    call = requests.begin("Lookup", [("x-request-id", "req-7")], service=SERVICE)
    with stage("validate"):
        pass
    with stage("lookup"), stage("embed"):  # a stage inside a stage nests
        pass
    call.note(namespace="docs", outcome="hot", tier="hot", similarity=0.93, prompt=SECRET,
              response=SECRET)
    call.finish("OK")

    spans = _by_name(exporter)
    root = spans[f"{SERVICE}/Lookup"]
    assert root.parent is None and root.kind is SpanKind.SERVER
    assert root.status.status_code is StatusCode.UNSET
    assert dict(root.attributes or {}) == {
        "rpc.system": "grpc", "rpc.service": SERVICE, "rpc.method": "Lookup",
        "stratacache.request_id": "req-7", "stratacache.namespace": "docs",
        "stratacache.outcome": "hot", "stratacache.tier": "hot", "stratacache.similarity": 0.93,
        "rpc.grpc.status_code": 0}
    trace_id = root.context.trace_id
    assert spans["validate"].parent.span_id == root.context.span_id
    assert spans["lookup"].parent.span_id == root.context.span_id
    assert spans["embed"].parent.span_id == spans["lookup"].context.span_id
    assert {span.context.trace_id for span in spans.values()} == {trace_id}
    for span in spans.values():  # the prompt was noted (log_prompts) but never reaches a span
        assert all("4111" not in str(value) for value in (span.attributes or {}).values())


def test_a_failed_call_and_a_failed_stage_are_errors(requests: RequestLog,
                                                     exporter: InMemorySpanExporter) -> None:
    call = requests.begin("Store", (), service=SERVICE)
    with pytest.raises(ValueError), stage("validate"):
        raise ValueError("namespace is malformed")
    call.finish("INVALID_ARGUMENT")

    spans = _by_name(exporter)
    root, validate = spans[f"{SERVICE}/Store"], spans["validate"]
    assert root.status.status_code is StatusCode.ERROR
    assert root.status.description == "INVALID_ARGUMENT"
    assert root.attributes["rpc.grpc.status_code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert validate.status.status_code is StatusCode.ERROR
    assert [event.name for event in validate.events] == ["exception"]
    assert validate.parent.span_id == root.context.span_id


def test_stage_is_a_no_op_outside_a_call(requests: RequestLog,
                                         exporter: InMemorySpanExporter) -> None:
    assert stage("embed") is stage("validate")  # the one shared no-op
    with stage("embed"):
        pass
    requests.begin("Stats", ()).finish("OK")
    with stage("embed"):  # the call has finished: no longer current
        pass
    assert [span.name for span in exporter.get_finished_spans()] == ["Stats"]


def test_a_callers_traceparent_makes_the_call_span_its_child(
        requests: RequestLog, exporter: InMemorySpanExporter) -> None:
    trace_id, parent_id = "0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331"
    call = requests.begin("Lookup", [("traceparent", f"00-{trace_id}-{parent_id}-01")])
    call.finish("OK")
    (span,) = exporter.get_finished_spans()
    assert span.context.trace_id == int(trace_id, 16)
    assert span.parent is not None and span.parent.span_id == int(parent_id, 16)


def test_concurrent_calls_parent_their_own_stages(requests: RequestLog,
                                                  exporter: InMemorySpanExporter) -> None:
    async def call(name: str, mine: asyncio.Event, other: asyncio.Event) -> None:
        c = requests.begin(name, ())
        mine.set()
        await other.wait()  # both calls are open now, in two tasks
        with stage(f"{name}-stage"):
            pass
        c.finish("OK")

    async def both() -> None:
        a, b = asyncio.Event(), asyncio.Event()
        await asyncio.gather(call("first", a, b), call("second", b, a))

    asyncio.run(both())
    spans = _by_name(exporter)
    for name in ("first", "second"):
        assert spans[f"{name}-stage"].parent.span_id == spans[name].context.span_id


class _Collector(trace_service_pb2_grpc.TraceServiceServicer):
    """A real OTLP/gRPC trace collector on loopback: keeps what it is sent."""

    def __init__(self) -> None:
        self.requests: list[trace_service_pb2.ExportTraceServiceRequest] = []
        self.endpoint = ""

    def Export(self, request, context):  # type: ignore[no-untyped-def]  # noqa: N802
        self.requests.append(request)
        return trace_service_pb2.ExportTraceServiceResponse()

    def spans(self) -> list:  # type: ignore[type-arg]
        return [span for request in self.requests for resource in request.resource_spans
                for scope in resource.scope_spans for span in scope.spans]


@pytest.fixture
def collector() -> Iterator[_Collector]:
    collector = _Collector()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(collector, server)
    collector.endpoint = f"http://127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
    server.start()
    yield collector
    server.stop(None)


def test_from_endpoint_exports_by_otlp_grpc_on_shutdown(collector: _Collector) -> None:
    tracer = Tracer.from_endpoint(collector.endpoint)
    call = RequestLog(log_prompts=False, tracer=tracer).begin("Lookup", (), service=SERVICE)
    with stage("exact"):
        pass
    call.finish("OK")
    tracer.shutdown()  # sends what the batch processor still holds, before it returns

    spans = collector.spans()
    assert sorted(span.name for span in spans) == ["exact", f"{SERVICE}/Lookup"]
    resource = collector.requests[0].resource_spans[0].resource
    assert {"service.name": "stratacache"}.items() <= {
        a.key: a.value.string_value for a in resource.attributes}.items()


def test_from_endpoint_refuses_an_empty_endpoint() -> None:
    with pytest.raises(ValueError, match="OTLP endpoint is empty"):
        Tracer.from_endpoint(" ")


def test_from_endpoint_without_the_otel_extra_says_how_to_install_it() -> None:
    # A fresh interpreter where the opentelemetry packages cannot be imported, as when the extra
    # is not installed (a None entry in sys.modules is how Python marks a module unimportable).
    script = ("import sys; sys.modules['opentelemetry'] = None\n"
              "from stratacache.tracing import Tracer, stage\n"
              "with stage('embed'): pass\n"  # tracing off works without the packages
              "Tracer.from_endpoint('http://127.0.0.1:4317')\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 1
    assert done.stderr.rstrip().splitlines()[-1] == f"ImportError: {tracing._MISSING}"
    assert "pip install 'stratacache[otel]'" in tracing._MISSING


def test_a_server_with_an_otlp_endpoint_traces_each_call_and_its_stages(
        start_server, collector: _Collector,
        namespace: str) -> None:  # type: ignore[no-untyped-def]
    server = start_server(otlp_endpoint=collector.endpoint)
    with server.client() as client:
        client.store("How do I reset my password?", "Use the login page.", namespace=namespace)
        assert client.lookup("How can I reset my password?", namespace=namespace,
                             min_similarity=0.7).hit
    server.stop()  # flushes the spans the batch processor holds

    spans = collector.spans()
    (lookup,) = [s for s in spans if s.name == f"{SERVICE}/Lookup"]
    children = {s.name for s in spans if s.parent_span_id == lookup.span_id}
    assert {"validate", "exact", "embed", "search_hot"} <= children
    attributes = {a.key: a.value for a in lookup.attributes}
    assert attributes["stratacache.namespace"].string_value == namespace
    assert attributes["stratacache.outcome"].string_value in ("hot", "warm")
    assert all("password" not in str(s.attributes) for s in spans)  # never the prompt
