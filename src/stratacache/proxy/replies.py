"""Chat completions built from a cache hit, and answers assembled from the upstream's.

A hit is replayed as the upstream would have answered: a ``chat.completion`` object, or a
server-sent-event stream of ``chat.completion.chunk`` objects ending with ``data: [DONE]``.
Its ``usage`` counts zero tokens (nothing was billed for it); the tokens it saved are in the
``x-stratacache-saved-*`` headers.

An upstream answer is stored only when it is whole: one choice whose message is text (no tool
calls), with a finish reason. A stream is assembled event by event (:class:`StreamAssembler`) and
is whole only once its finish reason and ``[DONE]`` have arrived, so a stream that breaks is
never stored.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

#: Metadata keys stored with an entry, for a faithful replay.
MODEL_KEY = "openai.model"
FINISH_KEY = "openai.finish_reason"
FINGERPRINT_KEY = "openai.system_fingerprint"
#: Finish reasons whose text is the whole answer to the request ("length": cut at max_tokens,
#: which is part of the scope, so the same request would be cut at the same place).
_STORABLE_FINISH = frozenset({"stop", "length"})


@dataclass
class Answer:
    """A whole upstream answer, ready to store.

    Attributes:
        content: the assistant message's text.
        finish_reason: why the model stopped.
        model: the model name the upstream answered with.
        system_fingerprint: the upstream's, if it sent one.
        prompt_tokens, completion_tokens: the upstream's usage, if it reported it.
    """

    content: str
    finish_reason: str
    model: str
    system_fingerprint: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None

    def metadata(self) -> dict[str, str]:
        """The entry metadata that replays this answer (see :func:`completion`)."""
        labels = {MODEL_KEY: self.model, FINISH_KEY: self.finish_reason}
        if self.system_fingerprint:
            labels[FINGERPRINT_KEY] = self.system_fingerprint
        return labels


def answer_from_completion(body: Any) -> Answer | None:
    """The storable answer in a non-streamed ``chat.completion``, or None (see module doc)."""
    if not isinstance(body, dict):
        return None
    choices = body.get("choices")
    if not isinstance(choices, list) or len(choices) != 1 or not isinstance(choices[0], dict):
        return None
    message = choices[0].get("message")
    finish = choices[0].get("finish_reason")
    if (not isinstance(message, dict) or not isinstance(message.get("content"), str)
            or message.get("tool_calls") or message.get("function_call")
            or finish not in _STORABLE_FINISH):
        return None
    usage = body.get("usage") if isinstance(body.get("usage"), dict) else {}
    return Answer(content=message["content"], finish_reason=finish,
                  model=str(body.get("model") or ""),
                  system_fingerprint=body.get("system_fingerprint") or None,
                  prompt_tokens=_count(usage.get("prompt_tokens")),
                  completion_tokens=_count(usage.get("completion_tokens")))


def _count(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


@dataclass
class StreamAssembler:
    """Reads an upstream SSE stream as it passes through and assembles its answer.

    Feed it the raw bytes as they arrive (:meth:`feed` returns the complete events, to pass on);
    :meth:`answer` is the storable answer once the stream ended well, else None.
    """

    _buffer: bytes = b""
    _content: list[str] = field(default_factory=list)
    _finish: str | None = None
    _model: str = ""
    _fingerprint: str | None = None
    _usage: dict[str, Any] = field(default_factory=dict)
    _done: bool = False
    _storable: bool = True

    def feed(self, data: bytes) -> list[bytes]:
        """Adds bytes from the stream; returns the events they completed (each with its
        terminating blank line), in order, for the caller to forward."""
        self._buffer += data
        events = []
        while True:
            end, size = _event_end(self._buffer)
            if end < 0:
                return events
            event, self._buffer = self._buffer[:end + size], self._buffer[end + size:]
            self._read(event)
            events.append(event)

    def _read(self, event: bytes) -> None:
        data = b"".join(line[5:].lstrip() for line in event.splitlines()
                        if line.startswith(b"data:"))
        if not data:
            return
        if data.strip() == b"[DONE]":
            self._done = True
            return
        try:
            chunk = json.loads(data)
        except ValueError:
            self._storable = False
            return
        if not isinstance(chunk, dict):
            self._storable = False
            return
        self._model = str(chunk.get("model") or self._model)
        self._fingerprint = chunk.get("system_fingerprint") or self._fingerprint
        if isinstance(chunk.get("usage"), dict):
            self._usage = chunk["usage"]
        choices = chunk.get("choices") or []
        for choice in choices:
            if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                self._storable = False  # n > 1 is never cached; anything else is unknown
                continue
            delta = choice.get("delta") or {}
            if delta.get("tool_calls") or delta.get("function_call"):
                self._storable = False
            if isinstance(delta.get("content"), str):
                self._content.append(delta["content"])
            if choice.get("finish_reason"):
                self._finish = choice["finish_reason"]

    @staticmethod
    def usage_only(event: bytes) -> bool:
        """Whether an event is the usage chunk (no choices) that ``include_usage`` adds."""
        data = b"".join(line[5:].lstrip() for line in event.splitlines()
                        if line.startswith(b"data:"))
        if not data.startswith(b"{"):
            return False
        try:
            chunk = json.loads(data)
        except ValueError:
            return False
        return isinstance(chunk, dict) and not chunk.get("choices") and "usage" in chunk

    def answer(self) -> Answer | None:
        """The assembled answer if the stream ended well ([DONE] after a storable finish)."""
        if not (self._done and self._storable and self._finish in _STORABLE_FINISH):
            return None
        return Answer(content="".join(self._content), finish_reason=self._finish,
                      model=self._model, system_fingerprint=self._fingerprint,
                      prompt_tokens=_count(self._usage.get("prompt_tokens")),
                      completion_tokens=_count(self._usage.get("completion_tokens")))


def is_done(event: bytes) -> bool:
    """Whether an SSE event is the stream's closing ``data: [DONE]``."""
    return event.strip() == b"data: [DONE]"


def _event_end(buffer: bytes) -> tuple[int, int]:
    """Where the first complete SSE event ends (index of its blank line, separator size)."""
    best = (-1, 0)
    for separator in (b"\n\n", b"\r\n\r\n", b"\r\r"):
        at = buffer.find(separator)
        if at >= 0 and (best[0] < 0 or at < best[0]):
            best = (at, len(separator))
    return best


@dataclass(frozen=True)
class Replay:
    """A hit, as the proxy replays it.

    Attributes:
        content: the stored answer's text.
        model: the model to report (the upstream's name for it, or the requested one).
        finish_reason: the stored finish reason.
        system_fingerprint: the stored one, if any.
    """

    content: str
    model: str
    finish_reason: str = "stop"
    system_fingerprint: str | None = None

    @classmethod
    def from_hit(cls, content: bytes, metadata: Mapping[str, str], requested_model: str) -> Replay:
        return cls(content=content.decode("utf-8", errors="replace"),
                   model=metadata.get(MODEL_KEY) or requested_model,
                   finish_reason=metadata.get(FINISH_KEY) or "stop",
                   system_fingerprint=metadata.get(FINGERPRINT_KEY))

    def _base(self, kind: str) -> dict[str, Any]:
        base = {"id": f"chatcmpl-{secrets.token_hex(12)}", "object": kind,
                "created": int(time.time()), "model": self.model}
        if self.system_fingerprint:
            base["system_fingerprint"] = self.system_fingerprint
        return base

    def completion(self) -> dict[str, Any]:
        """The ``chat.completion`` object of this hit."""
        return self._base("chat.completion") | {
            "choices": [{"index": 0, "finish_reason": self.finish_reason, "logprobs": None,
                         "message": {"role": "assistant", "content": self.content,
                                     "refusal": None}}],
            "usage": _ZERO_USAGE}

    def events(self, include_usage: bool) -> Iterator[bytes]:
        """The SSE events of this hit replayed as a stream, ``[DONE]`` last."""
        base = self._base("chat.completion.chunk")

        def chunk(choices: list[dict[str, Any]], **extra: Any) -> bytes:
            payload = base | {"choices": choices} | extra
            return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"

        yield chunk([{"index": 0, "delta": {"role": "assistant", "content": ""},
                      "finish_reason": None}])
        if self.content:
            yield chunk([{"index": 0, "delta": {"content": self.content}, "finish_reason": None}])
        yield chunk([{"index": 0, "delta": {}, "finish_reason": self.finish_reason}])
        if include_usage:
            yield chunk([], usage=_ZERO_USAGE)
        yield b"data: [DONE]\n\n"


_ZERO_USAGE = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
