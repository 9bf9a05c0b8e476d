"""A fake OpenAI-compatible chat-completions upstream for tests and benchmarks.

Owns one real HTTP server (Starlette on uvicorn, in a background thread on 127.0.0.1, port 0)
whose answers are deterministic (`answer_for`), with real word-count usage (`usage_for`), real
SSE streaming, settable latency, and failure controls chosen per request by headers:
``x-fake-status: N`` (that status, OpenAI error body), ``x-fake-break-after: N`` (stream only:
N content chunks, then the connection drops), ``x-fake-delay-s: F`` (F seconds before
answering) and ``x-fake-hold: 1`` (no answer until :meth:`UpstreamServer.release`). It requires no auth but records every body and its headers.

    with UpstreamServer(latency_s=0.0) as upstream:
        client = openai.OpenAI(base_url=upstream.base_url, api_key="sk-test")
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import re
import threading
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

MODEL = "fake-model"
# A safety net for a loaded machine; starting and stopping normally take well under a second.
START_STOP_TIMEOUT_S = 30.0
_NOT_IN_DIGEST = ("stream", "stream_options", "user")  # same question, same answer, any transport
_ERROR_CODES = {401: "invalid_api_key", 404: "model_not_found", 429: "rate_limit_exceeded"}


def _text(content: Any) -> str:
    """The text of a message's content: a string, or a list of parts whose text parts count."""
    if isinstance(content, list):
        parts = [p for p in content if isinstance(p, dict) and p.get("type") == "text"]
        return " ".join(str(p.get("text", "")) for p in parts)
    return content if isinstance(content, str) else ""


def _messages(body: dict[str, Any]) -> list[dict[str, Any]]:
    return [m for m in body.get("messages", []) if isinstance(m, dict)]


def answer_for(body: dict[str, Any]) -> str:
    """The fake's answer to a request: ``f"answer {digest}: {last user message}"``.

    Args:
        body: a chat-completions request body.
    Returns:
        The answer; ``digest`` is 8 hex of sha256 over the body's JSON minus stream,
        stream_options and user, so another model, system prompt or temperature changes it.
    """
    rest = {k: v for k, v in body.items() if k not in _NOT_IN_DIGEST}
    digest = hashlib.sha256(json.dumps(rest, sort_keys=True).encode()).hexdigest()[:8]
    users = [m for m in _messages(body) if m.get("role") == "user"]
    return f"answer {digest}: " + (_text(users[-1].get("content")) if users else "")


def usage_for(body: dict[str, Any], answer: str) -> dict[str, int]:
    """OpenAI-shaped usage, counted in words.

    Args:
        body: a chat-completions request body.
        answer: the answer given to it.
    Returns:
        prompt_tokens (words in all messages), completion_tokens (words in the answer),
        total_tokens.
    """
    prompt = sum(len(_text(m.get("content")).split()) for m in _messages(body))
    completion = len(answer.split())
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


def _pieces(answer: str) -> list[str]:
    """The answer cut before each word (whitespace kept), so the pieces join back exactly."""
    return re.split(r"(?<=\s)(?=\S)", answer)


def _error(status: int, message: str) -> JSONResponse:
    kind = "server_error" if status >= 500 else "invalid_request_error"
    error = {"message": message, "type": kind, "param": None, "code": _ERROR_CODES.get(status)}
    return JSONResponse({"error": error}, status)


class _DroppedStream(StreamingResponse):
    """A stream that ends without the closing body message: uvicorn then closes the socket
    mid-body (logging "ASGI callable returned without completing response"), as a dying
    upstream would."""

    async def stream_response(self, send: Any) -> None:
        await send({"type": "http.response.start", "status": self.status_code,
                    "headers": self.raw_headers})
        async for chunk in self.body_iterator:
            await send({"type": "http.response.body", "body": chunk.encode(), "more_body": True})


class _Server(uvicorn.Server):
    """uvicorn's server, telling another thread when its socket is bound."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.ready = threading.Event()
        self.loop: asyncio.AbstractEventLoop | None = None

    async def startup(self, sockets: Any = None) -> None:
        await super().startup(sockets)
        self.loop = asyncio.get_running_loop()
        self.ready.set()


class UpstreamServer:
    """The fake upstream as a context manager; see the module docstring for the behaviour.

    Attributes:
        base_url: ``"http://127.0.0.1:PORT/v1"``, set on enter.
        requests: every JSON body received on /v1/chat/completions, in order.
        headers: the headers of each of those requests (lower-case names).
        latency_s: seconds before the answer (non-stream) or the first chunk (stream); settable.
        chunk_delay_s: seconds between stream chunks; settable.
    """

    def __init__(self, *, latency_s: float = 0.0, chunk_delay_s: float = 0.0) -> None:
        self.latency_s = latency_s
        self.chunk_delay_s = chunk_delay_s
        self.requests: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.base_url = ""
        self._stopping = asyncio.Event()  # set on close so pending delays end at once
        self._released = asyncio.Event()  # set by release(): held requests answer
        app = Starlette(routes=[Route("/v1/chat/completions", self._chat, methods=["POST"]),
                                Route("/v1/models", self._models, methods=["GET"])])
        config = uvicorn.Config(app, host="127.0.0.1", port=0, lifespan="off",
                                access_log=False, log_config=None, log_level="warning")
        self._server = _Server(config)
        self._thread = threading.Thread(target=self._run, name="openai-upstream", daemon=True)

    def _run(self) -> None:
        try:
            self._server.run()
        finally:
            self._server.ready.set()  # a failed start must not leave __enter__ waiting

    def __enter__(self) -> UpstreamServer:
        self._thread.start()
        if not self._server.ready.wait(START_STOP_TIMEOUT_S) or not self._server.started:
            self.close()
            raise RuntimeError("the fake OpenAI upstream did not start; uvicorn's log says why")
        port = self._server.servers[0].sockets[0].getsockname()[1]
        self.base_url = f"http://127.0.0.1:{port}/v1"
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop serving and wait for the server thread to end. Pending delays are cut short, so
        streams in progress finish at once. Safe to call more than once.

        Raises:
            RuntimeError: the thread did not end within START_STOP_TIMEOUT_S seconds.
        """
        # Wake pending delays before asking uvicorn to exit: its loop is still running then.
        if self._server.loop is not None and self._thread.is_alive():
            self._server.loop.call_soon_threadsafe(self._stopping.set)
        self._server.should_exit = True
        self._thread.join(START_STOP_TIMEOUT_S)
        if self._thread.is_alive():
            raise RuntimeError(
                f"the fake OpenAI upstream did not stop within {START_STOP_TIMEOUT_S} s")

    def release(self) -> None:
        """Lets every request held by ``x-fake-hold`` (now or later) answer."""
        assert self._server.loop is not None
        self._server.loop.call_soon_threadsafe(self._released.set)

    async def _hold(self) -> None:
        waits = [asyncio.ensure_future(e.wait()) for e in (self._released, self._stopping)]
        _, pending = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        for waiting in pending:
            waiting.cancel()

    async def _sleep(self, seconds: float) -> None:
        """Sleep, but not past close, so a slow stream never holds up shutdown."""
        if seconds > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), seconds)

    async def _models(self, request: Request) -> JSONResponse:
        model = {"id": MODEL, "object": "model", "created": 0, "owned_by": "fake-upstream"}
        return JSONResponse({"object": "list", "data": [model]})

    async def _chat(self, request: Request) -> JSONResponse | StreamingResponse:
        try:
            body = await request.json()
        except ValueError:
            return _error(400, "the request body is not JSON; send a chat-completions object")
        self.requests.append(body)
        self.headers.append(dict(request.headers))
        if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
            return _error(400, "the body must be a JSON object with a 'messages' list")
        try:
            status = int(request.headers.get("x-fake-status", 200))
            raw_break = request.headers.get("x-fake-break-after")
            break_after = None if raw_break is None else int(raw_break)
            delay_s = float(request.headers.get("x-fake-delay-s", 0))
        except ValueError as exc:
            return _error(400, f"an x-fake-* header is not a number ({exc})")
        await self._sleep(delay_s)
        if request.headers.get("x-fake-hold"):
            await self._hold()
        if status != 200:
            return _error(status, f"fake upstream error {status}, as asked by x-fake-status")
        answer = answer_for(body)
        if body.get("stream"):
            response = StreamingResponse if break_after is None else _DroppedStream
            events = self._events(body, answer, break_after)
            return response(events, media_type="text/event-stream")
        await self._sleep(self.latency_s)
        message = {"role": "assistant", "content": answer}
        return JSONResponse({
            "id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion",
            "created": int(time.time()), "model": body.get("model"),
            "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
            "usage": usage_for(body, answer)})

    async def _events(self, body: dict[str, Any], answer: str,
                      break_after: int | None) -> AsyncIterator[str]:
        """SSE events: role chunk, a chunk per word, finish chunk, usage if asked, [DONE]."""
        base = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion.chunk",
                "created": int(time.time()), "model": body.get("model")}

        def event(delta: dict[str, str], finish: str | None = None) -> str:
            chunk = {**base, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
            return f"data: {json.dumps(chunk)}\n\n"

        await self._sleep(self.latency_s)
        yield event({"role": "assistant", "content": ""})
        for piece in _pieces(answer)[:break_after]:
            await self._sleep(self.chunk_delay_s)
            yield event({"content": piece})
        if break_after is not None:
            return  # the dropped stream: no finish chunk, no [DONE]
        await self._sleep(self.chunk_delay_s)
        yield event({}, "stop")
        options = body.get("stream_options")
        if isinstance(options, dict) and options.get("include_usage"):
            usage = {**base, "choices": [], "usage": usage_for(body, answer)}
            yield f"data: {json.dumps(usage)}\n\n"
        yield "data: [DONE]\n\n"
