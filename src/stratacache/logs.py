"""Logging of the server: the root setup (text or JSON lines), the request id of each call, and
the access log (one line per call).

- :func:`configure` installs one stderr handler on the root logger, formatting text or JSON
  (stdlib ``json``: one flat object per line, so a library would only add a dependency).
- Each call lives in a context variable for the call's task: a filter on the handler copies its
  request id into every record logged meanwhile, whatever the logger, and :func:`note` reaches
  it from code that has no handle on it (the servicers).
- :class:`RequestLog` (one per server) begins a :class:`Call` per RPC: it takes the id from the
  caller's ``x-request-id`` metadata when valid (else generates one), starts the call's span when
  tracing is on (:mod:`stratacache.tracing`), and on ``finish`` writes the access line to the
  ``stratacache.access`` logger at INFO: method, status, latency, and the namespace, outcome,
  tier and similarity the call noted. Prompt and response text appear only with ``log_prompts``
  (they may hold personal data), clipped to :data:`FIELD_MAX_CHARS`.

Kept cheap because it runs on every call (an exact hit takes about a millisecond): nothing is
formatted unless the access logger is enabled, and a call allocates its :class:`Call` only.
"""

from __future__ import annotations

import json
import logging
import re
import secrets
import sys
import time
from collections.abc import Sequence
from contextvars import ContextVar, Token
from typing import TYPE_CHECKING, Any, TextIO

from .config import LOG_FORMATS

if TYPE_CHECKING:
    from .tracing import CallSpan, Tracer

#: The metadata key a caller sets to choose a call's request id; the server sends the id back
#: under the same key in trailing metadata.
REQUEST_ID_KEY = "x-request-id"
#: Longest request id taken from a caller, characters. Ids are 1 to this many visible ASCII
#: characters (no spaces or control characters, so a log line cannot be forged through one);
#: any other is replaced by a generated one.
REQUEST_ID_MAX_CHARS = 128
#: Longest string value (namespace, prompt, response, ...) written into an access line,
#: characters; longer ones are clipped and end with "…".
FIELD_MAX_CHARS = 200
#: The access log's logger: set it to WARNING to turn the access log off.
ACCESS_LOGGER = "stratacache.access"

_TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_VALID_ID = re.compile(rf"[\x21-\x7e]{{1,{REQUEST_ID_MAX_CHARS}}}")
_PLAIN = re.compile(r'[\x21-\x7e]+')  # a text-format value written without quotes
_IN_MESSAGE = frozenset({"method", "status", "latency_ms"})  # the access line's message says them

_current: ContextVar[Call | None] = ContextVar("stratacache_call", default=None)


def current_request_id() -> str | None:
    """The request id of the call running in this task, or None outside a call."""
    call = _current.get()
    return None if call is None else call.request_id


def note(*, namespace: str | None = None, outcome: str | None = None, tier: str | None = None,
         similarity: float | None = None, prompt: str | None = None,
         response: str | bytes | None = None) -> None:
    """:meth:`Call.note` on the call running in this task (so a servicer needs no handle on
    it); does nothing outside a call."""
    call = _current.get()
    if call is not None:
        call.note(namespace=namespace, outcome=outcome, tier=tier, similarity=similarity,
                  prompt=prompt, response=response)


class RequestIdFilter(logging.Filter):
    """Sets ``record.request_id`` to the current call's id (None outside a call); keeps every
    record. On a handler, it covers records of every logger that reach it."""

    def filter(self, record: logging.LogRecord) -> bool:
        call = _current.get()
        record.request_id = None if call is None else call.request_id
        return True


def _text_value(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    text = str(value)
    return text if _PLAIN.fullmatch(text) and '"' not in text else json.dumps(text)


class TextFormatter(logging.Formatter):
    """``<time> <LEVEL> <logger>: <message>[ key=value ...][ [req=<id>]]``; the access fields
    not in the message follow it, strings quoted (JSON-escaped) when they hold spaces, quotes or
    control characters."""

    def __init__(self) -> None:
        super().__init__(_TEXT_FORMAT)

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 (logging's name)
        line = super().formatMessage(record)
        access = getattr(record, "access", None)
        if access:
            line += "".join(f" {key}={_text_value(value)}" for key, value in access.items()
                            if key not in _IN_MESSAGE)
        request_id = getattr(record, "request_id", None)
        return line if request_id is None else f"{line} [req={request_id}]"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts (ISO 8601, UTC, milliseconds), level, logger, message,
    request_id (during a call), the access fields as top-level keys (access lines), exception
    and stack (when the record has them)."""

    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        line: dict[str, Any] = {"ts": f"{ts}.{int(record.msecs):03d}Z",
                                "level": record.levelname, "logger": record.name,
                                "message": record.getMessage()}
        request_id = getattr(record, "request_id", None)
        if request_id is not None:
            line["request_id"] = request_id
        access = getattr(record, "access", None)
        if access:
            line.update(access)
        if record.exc_info:
            if not record.exc_text:
                record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            line["exception"] = record.exc_text
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        return json.dumps(line, default=str)


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever ``sys.stderr`` is when a line is written, as logging's own last-resort
    handler does, not to the stream it was at set-up (which a caller such as pytest may have
    replaced, and closed, since)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property  # type: ignore[override]
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, _value: TextIO) -> None:
        pass


def configure(level: str, fmt: str, *, stream: TextIO | None = None) -> None:
    """Sets up the root logger for ``stratacache serve``: one handler writing ``fmt`` lines to
    ``stream``, with the request id of the current call. Replaces the root's handlers, so calling
    it again reconfigures rather than doubling every line.

    Args:
        level: "debug", "info", "warning", "error" or "critical" (any case).
        fmt: "text" (one human line per event) or "json" (one object per line).
        stream: where lines go; standard error by default.

    Raises:
        ValueError: an unknown level or format (the message lists the valid ones).
    """
    number = logging.getLevelNamesMapping().get(level.upper(), logging.NOTSET)
    if number == logging.NOTSET:
        raise ValueError(f"log level {level!r} is not one of debug, info, warning, error, "
                         "critical")
    if fmt not in LOG_FORMATS:
        raise ValueError(f"log format {fmt!r} is not one of {', '.join(LOG_FORMATS)}")
    handler = _StderrHandler() if stream is None else logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(RequestIdFilter())
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(number)


def _clip(value: str | bytes) -> str:
    if isinstance(value, bytes):  # a response: decode only the part that is kept
        value = value[:4 * FIELD_MAX_CHARS].decode("utf-8", errors="replace")
    return value if len(value) <= FIELD_MAX_CHARS else value[:FIELD_MAX_CHARS - 1] + "…"


def _given_id(metadata: Sequence[tuple[str, str | bytes]] | None) -> str | None:
    """The caller's valid ``x-request-id``, or None (absent, or not 1 to REQUEST_ID_MAX_CHARS
    visible ASCII characters)."""
    for key, value in metadata or ():
        if key == REQUEST_ID_KEY:
            if isinstance(value, bytes):
                value = value.decode("ascii", "replace")
            return value if _VALID_ID.fullmatch(value) else None
    return None


class RequestLog:
    """The request ids, access log and call spans of one server."""

    def __init__(self, *, log_prompts: bool, tracer: Tracer | None = None) -> None:
        """Args:
            log_prompts: write prompt and response text (clipped) into access lines.
            tracer: make a span per call (and per stage) with it; None = no tracing.
        """
        self.log_prompts = log_prompts
        self.tracer = tracer
        self._log = logging.getLogger(ACCESS_LOGGER)

    def begin(self, method: str, metadata: Sequence[tuple[str, str | bytes]] | None, *,
              service: str | None = None) -> Call:
        """Starts a call: picks its request id, makes it current in this task, starts its span.

        Args:
            method: the RPC's name as the access line and span show it, e.g. "Lookup".
            metadata: the call's invocation metadata (``context.invocation_metadata()``).
            service: the RPC's service, e.g. "stratacache.v1.SemanticCache": names the span
                "service/method" as OpenTelemetry's RPC conventions do.

        Returns:
            The call; :meth:`Call.finish` it in the same task once it is answered, also when it
            fails (``try``/``finally``).
        """
        given = _given_id(metadata)
        request_id = given or secrets.token_hex(16)
        if given is None and metadata and self._log.isEnabledFor(logging.DEBUG):
            if any(key == REQUEST_ID_KEY for key, _ in metadata):
                self._log.debug("%s: x-request-id is not 1-%d visible ASCII characters; using "
                                "%s instead", method, REQUEST_ID_MAX_CHARS, request_id)
        span = None
        if self.tracer is not None:
            carrier = {key: value for key, value in metadata or ()
                       if key in ("traceparent", "tracestate") and isinstance(value, str)}
            span = self.tracer.span(
                f"{service}/{method}" if service else method,
                {"rpc.system": "grpc", "rpc.service": service, "rpc.method": method,
                 "stratacache.request_id": request_id}, carrier)
        return Call(self, method, request_id, span)


class Call:
    """One call between :meth:`RequestLog.begin` and :meth:`finish`: its request id, and what it
    noted for the access line."""

    __slots__ = ("request_id", "method", "namespace", "outcome", "tier", "similarity", "prompt",
                 "response", "_owner", "_span", "_started", "_token")

    def __init__(self, owner: RequestLog, method: str, request_id: str,
                 span: CallSpan | None) -> None:
        self.request_id = request_id
        self.method = method
        self.namespace: str | None = None
        self.outcome: str | None = None
        self.tier: str | None = None
        self.similarity: float | None = None
        self.prompt: str | None = None
        self.response: str | bytes | None = None
        self._owner = owner
        self._span = span
        self._started = time.perf_counter()
        self._token: Token[Call | None] | None = _current.set(self)

    def note(self, *, namespace: str | None = None, outcome: str | None = None,
             tier: str | None = None, similarity: float | None = None,
             prompt: str | None = None, response: str | bytes | None = None) -> None:
        """Records what the access line and span say about the call; None leaves a field as it
        was. Prompt and response are kept only when the server logs prompts.

        Args:
            namespace: the namespace the call used.
            outcome: e.g. "exact", "hot", "miss_below_similarity" (the lookup result label of
                the metrics), or "stored".
            tier: "exact", "hot", "warm" or "cold".
            similarity: the hit's (or best candidate's) cosine similarity.
            prompt: the prompt text (access log only, and only with log_prompts).
            response: the response text (likewise).
        """
        if namespace is not None:
            self.namespace = namespace
        if outcome is not None:
            self.outcome = outcome
        if tier is not None:
            self.tier = tier
        if similarity is not None:
            self.similarity = similarity
        if self._owner.log_prompts:
            if prompt is not None:
                self.prompt = prompt
            if response is not None:
                self.response = response

    def finish(self, code_name: str) -> None:
        """Writes the access line, ends the span, and stops the id being current. Only the first
        call does anything.

        Args:
            code_name: the gRPC status the call was answered with ("OK", "NOT_FOUND", ...).
        """
        if self._token is None:
            return
        latency_ms = (time.perf_counter() - self._started) * 1000
        # A call that failed validation may carry any namespace: clip before it goes anywhere.
        namespace = None if self.namespace is None else _clip(self.namespace)
        log = self._owner._log
        if log.isEnabledFor(logging.INFO):
            fields: dict[str, object] = {"method": self.method, "status": code_name,
                                         "latency_ms": round(latency_ms, 3)}
            if namespace is not None:
                fields["namespace"] = namespace
            if self.outcome is not None:
                fields["outcome"] = self.outcome
            if self.tier is not None:
                fields["tier"] = self.tier
            if self.similarity is not None:
                fields["similarity"] = round(self.similarity, 4)
            if self.prompt is not None:
                fields["prompt"] = _clip(self.prompt)
            if self.response is not None:
                fields["response"] = _clip(self.response)
            log.info("%s %s %.3f ms", self.method, code_name, latency_ms,
                     extra={"access": fields})
        if self._span is not None:
            self._span.set_attributes({
                "stratacache.namespace": namespace, "stratacache.outcome": self.outcome,
                "stratacache.tier": self.tier, "stratacache.similarity": self.similarity})
            self._span.end(code_name)
        _current.reset(self._token)
        self._token = None
