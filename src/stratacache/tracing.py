"""OpenTelemetry tracing of calls (the optional ``otel`` extra): one span per call, a child span
per stage of it.

A :class:`Tracer` belongs to one server (never the global OTel provider: one process runs many
servers in tests). :meth:`Tracer.span` starts a call's span and makes it the current call of the
task (a context variable), so :func:`stage`, which the per-stage timer calls for every stage,
opens a child of it, and a stage inside a stage nests. Without an active call (tracing off, or
code outside a call) :func:`stage` returns a shared no-op context manager: one context-variable
read, and nothing of OpenTelemetry is imported.

Spans carry the method, namespace, outcome, tier, similarity, request id and status; never prompt
or response text. A caller's W3C ``traceparent`` (gRPC metadata) makes the call's span a child
of the caller's trace.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext
from contextvars import ContextVar, Token
from typing import TYPE_CHECKING, Any, NamedTuple

import grpc

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import Span
    from opentelemetry.trace import Tracer as OtelTracer

#: ``service.name`` of the spans (OTEL_SERVICE_NAME / OTEL_RESOURCE_ATTRIBUTES may override it).
SERVICE_NAME = "stratacache"
_MISSING = ("OpenTelemetry tracing needs the 'otel' extra, which is not installed: run "
            "pip install 'stratacache[otel]' (opentelemetry-sdk and "
            "opentelemetry-exporter-otlp-proto-grpc), or start without --otlp-endpoint")


class _Active(NamedTuple):
    """The current call's tracer and the OTel context whose span is the parent of new stages."""

    tracer: OtelTracer
    context: Context


_active: ContextVar[_Active | None] = ContextVar("stratacache_trace", default=None)
_NOOP: AbstractContextManager[None] = nullcontext()  # stateless, so one serves every caller


def stage(name: str) -> AbstractContextManager[None]:
    """A child span named ``name`` of the current call's span (or of the enclosing stage) for the
    body of a ``with`` block; a no-op when no traced call is active in this task.

    Args:
        name: the stage, e.g. "embed" or "search_hot" (the names of the stage histogram).

    Returns:
        A context manager; the span ends when the block does, with status ERROR and the
        exception recorded if the body raises.
    """
    active = _active.get()
    return _NOOP if active is None else _child(active, name)


@contextmanager
def _child(active: _Active, name: str) -> Iterator[None]:
    from opentelemetry.trace import set_span_in_context  # loaded already: a Tracer exists

    span = active.tracer.start_span(name, context=active.context)
    token = _active.set(_Active(active.tracer, set_span_in_context(span)))
    try:
        yield
    except Exception as exc:
        _fail(span, exc)
        raise
    finally:
        _active.reset(token)
        span.end()


def _fail(span: Span, exc: BaseException) -> None:
    from opentelemetry.trace import Status, StatusCode

    span.record_exception(exc)
    span.set_status(Status(StatusCode.ERROR, type(exc).__name__))


class CallSpan:
    """The span of one call, from :meth:`Tracer.span` to :meth:`end`; meanwhile the current call
    of its task (the parent of :func:`stage` spans). ``end`` must run in the task that started it.
    """

    __slots__ = ("_span", "_token")

    def __init__(self, tracer: OtelTracer, span: Span) -> None:
        from opentelemetry.trace import set_span_in_context

        self._span = span
        self._token: Token[_Active | None] | None = _active.set(
            _Active(tracer, set_span_in_context(span)))

    def set_attributes(self, attributes: Mapping[str, Any]) -> None:
        """Adds attributes (values: str, bool, int or float; None values are skipped)."""
        self._span.set_attributes({k: v for k, v in attributes.items() if v is not None})

    def end(self, status: str = "OK") -> None:
        """Ends the span (once; later calls do nothing) and stops it being the current call.

        Args:
            status: the call's gRPC status name ("OK", "INVALID_ARGUMENT", ...); any other than
                OK sets the span's status to ERROR.
        """
        if self._token is None:
            return
        _active.reset(self._token)
        self._token = None
        code = grpc.StatusCode.__members__.get(status)
        if code is not None:
            self._span.set_attribute("rpc.grpc.status_code", code.value[0])
        if status != "OK":
            from opentelemetry.trace import Status, StatusCode

            self._span.set_status(Status(StatusCode.ERROR, status))
        self._span.end()

    def __enter__(self) -> CallSpan:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: object) -> None:
        if exc is not None:
            _fail(self._span, exc)
        self.end("OK" if exc is None else "UNKNOWN")


class Tracer:
    """Makes the spans of one server's calls, through its own OpenTelemetry TracerProvider."""

    def __init__(self, provider: TracerProvider) -> None:
        """Args:
            provider: where spans go, e.g. a TracerProvider with a SimpleSpanProcessor over an
                InMemorySpanExporter in tests (:meth:`from_endpoint` builds the production one).
        """
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        from . import __version__

        self._provider = provider
        self._tracer = provider.get_tracer("stratacache", __version__)
        self._propagator = TraceContextTextMapPropagator()

    @classmethod
    def from_endpoint(cls, endpoint: str) -> Tracer:
        """A tracer that batches spans and exports them by OTLP/gRPC.

        Args:
            endpoint: the collector, e.g. "http://127.0.0.1:4317" (plaintext) or
                "https://collector:4317" (TLS); a bare "host:port" is TLS unless
                OTEL_EXPORTER_OTLP_INSECURE=true. Other OTEL_* variables (headers, timeout,
                sampler, resource attributes) apply as the SDK documents them.

        Returns:
            The tracer; call :meth:`shutdown` at exit to send what is still queued.

        Raises:
            ImportError: the ``otel`` extra is not installed (the message says how to fix it).
            ValueError: ``endpoint`` is empty.
        """
        if not endpoint or not endpoint.strip():
            raise ValueError("the OTLP endpoint is empty: give the collector's address, e.g. "
                             "http://127.0.0.1:4317, or leave it unset to trace nothing")
        try:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
            from opentelemetry.sdk.resources import Resource
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor
        except ImportError as exc:
            raise ImportError(_MISSING) from exc
        from . import __version__

        provider = TracerProvider(resource=Resource.create(
            {"service.name": SERVICE_NAME, "service.version": __version__}))
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
        return cls(provider)

    def span(self, name: str, attributes: Mapping[str, Any],
             carrier: Mapping[str, str] | None = None) -> CallSpan:
        """Starts the span of a call (kind SERVER) and makes it the current call of this task.

        Args:
            name: the span name; for RPCs "package.Service/Method".
            attributes: rpc.method and the like; None values are skipped. Never prompt text.
            carrier: the call's ``traceparent``/``tracestate`` metadata, if the caller sent them:
                the span then joins the caller's trace.

        Returns:
            The span; :meth:`CallSpan.end` it with the call's status when the call is answered.
        """
        from opentelemetry.trace import SpanKind

        parent = self._propagator.extract(carrier) if carrier else None
        span = self._tracer.start_span(
            name, context=parent, kind=SpanKind.SERVER,
            attributes={k: v for k, v in attributes.items() if v is not None})
        return CallSpan(self._tracer, span)

    def shutdown(self) -> None:
        """Sends the spans still queued and stops the exporter. Blocks until they are sent or the
        exporter gives up (OTEL_EXPORTER_OTLP_TIMEOUT, 10 s by default, when the collector is
        unreachable): from async code, run it in a thread."""
        self._provider.shutdown()
