"""The proxy's HTTP routes: ``POST /v1/chat/completions`` (cached), any other ``/v1/...`` path
(forwarded untouched), ``GET /healthz`` and ``GET /metrics``.

A chat completion goes one way: read the body (bounded), decide whether it may be cached
(:func:`.chat.cache_key`), look it up, and either replay the hit (:mod:`.replies`) or forward
it (:mod:`.upstream`) and, once the upstream's answer is whole, store it in the background.
The cache never blocks a request: a lookup that fails or is slow is a miss, a store that fails
is logged (fail-open, counted in ``stratacache_proxy_cache_errors``).

Starlette on uvicorn serves it (a small, well-kept ASGI stack with streaming responses and a
graceful shutdown), httpx calls the upstream (pooled connections, streaming, per-phase timeouts).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from .. import validation
from ..client import AsyncClient, LookupResult, StratacacheError, Timeout
from ..errors import InvalidArgument
from . import chat, replies, upstream
from .command import ProxySettings
from .metrics import ProxyMetrics

log = logging.getLogger(__name__)
#: One line per chat completion (turn it off on its own: set this logger's level to WARNING).
access = logging.getLogger("stratacache.proxy.access")

NAMESPACE_HEADER = "x-stratacache-namespace"
BYPASS_HEADER = "x-stratacache-bypass"
#: A request with this header is answered only once its answer is stored (read-your-writes:
#: a script that asks again at once is served from the cache), at the cost of the store's time.
WAIT_STORE_HEADER = "x-stratacache-wait-store"
#: An upstream answer read whole (not streamed) larger than this is a 502: a chat completion is
#: far smaller, and the proxy must not buffer without bound.
MAX_UPSTREAM_BODY = 64 << 20


class Proxy:
    """The request handlers, with the clients they share (made inside the running loop).

    Args:
        settings: the proxy's settings.
    """

    def __init__(self, settings: ProxySettings) -> None:
        self.settings = settings
        self.metrics = ProxyMetrics()
        self._stores: set[asyncio.Task[None]] = set()
        self.cache: AsyncClient
        self.upstream: upstream.Upstream

    @contextlib.asynccontextmanager
    async def lifespan(self, _app: Starlette) -> AsyncIterator[None]:
        s = self.settings
        self.cache = AsyncClient(
            s.cache, api_key=os.environ.get(s.cache_key_env) or None,
            timeout=Timeout(lookup=s.lookup_timeout_s, store=s.store_timeout_s),
            tls=s.cache_tls, root_certificates=s.cache_tls_ca)
        self.upstream = upstream.Upstream(
            s.upstream, api_key=s.secret(s.upstream_key_env),
            connect_timeout_s=s.upstream_connect_timeout_s,
            read_timeout_s=s.upstream_read_timeout_s, max_connections=s.upstream_max_connections)
        self._caller_key = s.secret(s.api_key_env)
        try:
            yield
        finally:
            await self.drain_stores(s.shutdown_grace_s)
            await self.upstream.close()
            await self.cache.close()

    def routes(self) -> list[Route]:
        return [Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
                Route("/healthz", self.health, methods=["GET"]),
                Route("/metrics", self.metrics_page, methods=["GET"]),
                Route("/v1/{path:path}", self.passthrough,
                      methods=["GET", "POST", "PUT", "PATCH", "DELETE"])]

    # -- routes ------------------------------------------------------------------------------

    async def chat_completions(self, request: Request) -> Response:
        started = time.perf_counter()
        body = await self._admit(request)
        if isinstance(body, Response):
            return body
        try:
            parsed = json.loads(body)
        except ValueError:
            parsed = None
        stream = isinstance(parsed, dict) and parsed.get("stream") is True
        key = self._cache_key(request, parsed)
        if isinstance(key, Response):
            return key
        if isinstance(key, chat.Bypass):
            return await self._forward(request, body, "bypass", stream, started,
                                       {"x-stratacache": "bypass",
                                        "x-stratacache-bypass-reason": key.reason})
        namespace = self._namespace(request)
        assert isinstance(parsed, dict)
        sent = body
        options = parsed.get("stream_options")
        include_usage = isinstance(options, dict) and bool(options.get("include_usage"))
        if stream and not include_usage and isinstance(options, (dict, type(None))):
            # Usage makes the stored cost exact; the chunk it adds is not passed to the caller.
            sent = json.dumps(parsed | {"stream_options": {
                **(options or {}), "include_usage": True}}).encode()
        race = (asyncio.create_task(self._open(request, sent))
                if self.settings.race_upstream else None)
        try:
            found = await self._lookup(key, namespace, request)
        except BaseException:  # the caller went away: so does the upstream request
            if race is not None:
                await _discard(race)
            raise
        if found is not None and found.hit:
            if race is not None:
                await _discard(race)
            return self._replay(found, key, stream, include_usage, started)
        return await self._miss(request, sent, race, found, key, namespace, stream=stream,
                                hide_usage=not include_usage, started=started)

    async def _miss(self, request: Request, sent: bytes, race: asyncio.Task[httpx.Response] | None,
                    found: LookupResult | None, key: chat.CacheKey, namespace: str, *,
                    stream: bool, hide_usage: bool, started: float) -> Response:
        """Forwards a miss (``found`` None: the cache failed) and stores its whole answer."""
        result = "miss" if found is not None else "fail_open"
        headers = {"x-stratacache": "miss" if found is not None else "error"}
        if found is not None and found.miss_reason:
            headers["x-stratacache-miss-reason"] = found.miss_reason
        try:
            answer = await (race if race is not None else self._open(request, sent))
        except httpx.HTTPError as exc:
            return self._unreachable(exc, result, stream, started)
        self._count(result, stream, started, answer.status_code)
        if stream and answer.status_code == 200:
            return _Relay(self._relay(answer, key, namespace, hide_usage=hide_usage,
                                      wait_store=_wants(request, WAIT_STORE_HEADER),
                                      started=started),
                          status_code=200, headers=upstream.passed_back(answer.headers) | headers)
        try:
            data = await _read_capped(answer)
        except httpx.HTTPError as exc:
            return self._unreachable(exc, None, stream, started)
        later = None
        if answer.status_code == 200:
            whole = replies.answer_from_completion(_json(data))
            if _wants(request, WAIT_STORE_HEADER):
                stored = self._store_later(key, namespace, whole, started)
                if stored is not None:
                    await asyncio.wait([stored])
            else:  # started once the caller has the answer: its bytes go out first
                later = BackgroundTask(self._store_soon, key, namespace, whole, started)
        return Response(data, status_code=answer.status_code,
                        headers=upstream.passed_back(answer.headers) | headers, background=later)

    async def passthrough(self, request: Request) -> Response:
        """Any other OpenAI API path (models, embeddings...): forwarded untouched."""
        body = await self._admit(request)
        if isinstance(body, Response):
            return body
        return await self._forward(request, body, None, False, time.perf_counter(), {})

    async def health(self, _request: Request) -> Response:
        """Always 200 while the proxy runs (it serves without the cache); says how the cache is."""
        try:
            cache = await self.cache.health(timeout=self.settings.lookup_timeout_s)
        except StratacacheError as exc:
            cache = f"UNREACHABLE ({type(exc).__name__})"
        return JSONResponse({"status": "SERVING", "cache": cache,
                             "upstream": self.upstream.base_url})

    async def metrics_page(self, _request: Request) -> Response:
        return Response(self.metrics.exposition(),
                        media_type="text/plain; version=0.0.4; charset=utf-8")

    # -- steps -------------------------------------------------------------------------------

    async def _admit(self, request: Request) -> bytes | Response:
        """The request's body, or the refusal it gets (401: no or wrong key; 413: too large)."""
        refused = self._authenticate(request)
        return refused if refused is not None else await self._read_body(request)

    def _authenticate(self, request: Request) -> Response | None:
        if self._caller_key is None:
            return None
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {self._caller_key}".encode()):
            log.warning("refused a request from %s: no or wrong bearer token",
                        request.client.host if request.client else "?")
            return _error(401, "send this proxy's key as the bearer token (Authorization: "
                          "Bearer <key>; OpenAI(api_key=...) does it)", "invalid_api_key")
        return None

    async def _read_body(self, request: Request) -> bytes | Response:
        """The request's body, or a 413 when it is over ``--max-body-mib`` (read no further)."""
        limit = self.settings.max_body_bytes
        too_large = _error(413, f"the request body is over {limit} bytes (--max-body-mib); "
                           "send a shorter conversation", "request_too_large")
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            return too_large
        chunks, size = [], 0
        with contextlib.suppress(ClientDisconnect):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    return too_large
                chunks.append(chunk)
        return b"".join(chunks)

    def _namespace(self, request: Request) -> str:
        return request.headers.get(NAMESPACE_HEADER) or self.settings.namespace

    def _cache_key(self, request: Request, body: Any) -> chat.CacheKey | chat.Bypass | Response:
        """What the request is cached under, why it is not, or a 400 for a bad header."""
        headers = request.headers
        if _wants(request, BYPASS_HEADER):
            return chat.Bypass(f"{BYPASS_HEADER} header")
        if "no-store" in headers.get("cache-control", "").lower():
            return chat.Bypass("Cache-Control: no-store")
        if not isinstance(body, dict):
            return chat.Bypass("the body is not a JSON object")
        try:
            namespace = validation.namespace(self._namespace(request))
        except InvalidArgument as exc:
            return _error(400, f"{NAMESPACE_HEADER}: {exc}", "invalid_request_error")
        credential = None if self.settings.share_across_keys or self.settings.upstream_key_env \
            else upstream.credential(headers)
        return chat.cache_key(body, max_temperature=self.settings.temperature_limit(namespace),
                              credential=credential)

    async def _lookup(self, key: chat.CacheKey, namespace: str,
                      request: Request) -> LookupResult | None:
        """The cache's answer; None when the cache failed (the request fails open)."""
        try:
            return await self.cache.lookup(
                key.prompt, namespace=namespace, scope=key.scope,
                min_similarity=self.settings.min_similarity,
                user_id=request.headers.get("x-stratacache-user"))
        except StratacacheError as exc:
            self.metrics.cache_errors.labels("lookup", type(exc).__name__).inc()
            log.warning("cache lookup failed, forwarding to the upstream (fail-open): %s", exc)
            return None

    def _replay(self, found: LookupResult, key: chat.CacheKey, stream: bool,
                include_usage: bool, started: float) -> Response:
        hit = replies.Replay.from_hit(found.response, found.metadata, key.model)
        headers = {"x-stratacache": "hit", "x-stratacache-similarity": f"{found.similarity:.4f}",
                   "x-stratacache-tier": found.tier, "x-stratacache-entry-id": found.entry_id,
                   "x-stratacache-age-s": f"{found.age_s:.3f}"}
        self._count("hit", stream, started, None)
        if stream:
            return Response(b"".join(hit.events(include_usage)), headers=headers,
                            media_type="text/event-stream")
        return Response(json.dumps(hit.completion()).encode(), headers=headers,
                        media_type="application/json")

    async def _open(self, request: Request, body: bytes) -> httpx.Response:
        return await self.upstream.open(request.method, request.url.path.removeprefix("/v1"),
                                        request.headers.items(), body, request.url.query)

    async def _forward(self, request: Request, body: bytes, result: str | None, stream: bool,
                       started: float, headers: dict[str, str]) -> Response:
        """Sends the request on untouched and streams the upstream's answer back."""
        try:
            answer = await self._open(request, body)
        except httpx.HTTPError as exc:
            return self._unreachable(exc, result, stream, started)
        if result is not None:
            self._count(result, stream, started, answer.status_code)
        return _Relay(_bytes(answer), status_code=answer.status_code,
                      headers=upstream.passed_back(answer.headers) | headers)

    def _unreachable(self, exc: httpx.HTTPError, result: str | None, stream: bool,
                     started: float) -> Response:
        status, body = upstream.failure(exc, self.upstream.base_url)
        log.warning("upstream failed: %s", json.loads(body)["error"]["message"])
        self.metrics.upstream.labels(
            "timeout" if isinstance(exc, httpx.TimeoutException) else "unreachable").inc()
        if result is not None:
            self._count(result, stream, started, None)
        return Response(body, status_code=status, media_type="application/json")

    def _count(self, result: str, stream: bool, started: float, status: int | None) -> None:
        """Counts a request once its response's headers are known, and logs its access line."""
        seconds = time.perf_counter() - started
        self.metrics.requests.labels(result, "true" if stream else "false").inc()
        self.metrics.seconds.labels(result).observe(seconds)
        if status is not None:
            self.metrics.upstream.labels(str(status)).inc()
        access.info("chat.completions %s stream=%s upstream=%s %.1f ms", result,
                    "true" if stream else "false", status or "-", seconds * 1000)

    async def _relay(self, answer: httpx.Response, key: chat.CacheKey, namespace: str, *,
                     hide_usage: bool, wait_store: bool, started: float) -> AsyncIterator[bytes]:
        """The upstream's events as they arrive; the assembled answer is stored at the end
        (with ``wait_store``, before ``[DONE]`` is passed on)."""
        assembler = replies.StreamAssembler()
        held: list[bytes] = []
        try:
            async for data in answer.aiter_bytes():
                for event in assembler.feed(data):
                    if hide_usage and assembler.usage_only(event):
                        continue
                    if wait_store and (held or replies.is_done(event)):
                        held.append(event)
                    else:
                        yield event
        except httpx.HTTPError as exc:
            self.metrics.upstream.labels("broken").inc()
            log.warning("the upstream's stream broke (%s: %s); the caller's stream is cut too "
                        "and nothing is stored", type(exc).__name__, exc)
            raise _Broken from exc
        finally:
            await answer.aclose()
        stored = self._store_later(key, namespace, assembler.answer(), started)
        if stored is not None and held:
            await asyncio.wait([stored])
        for event in held:
            yield event

    async def _store_soon(self, key: chat.CacheKey, namespace: str,
                          answer: replies.Answer | None, started: float) -> None:
        """:meth:`_store_later` as a coroutine (Starlette runs a plain function of a
        background task on a thread, away from the loop)."""
        self._store_later(key, namespace, answer, started)

    def _store_later(self, key: chat.CacheKey, namespace: str, answer: replies.Answer | None,
                     started: float) -> asyncio.Task[None] | None:
        """Stores a whole answer in the background (the caller already has it).

        Returns:
            The store's task, or None when nothing is stored (the answer is not whole, or too
            many stores are pending).
        """
        if answer is None:
            self.metrics.stores.labels("not_storable").inc()
            return None
        if len(self._stores) >= self.settings.max_pending_stores:
            self.metrics.stores.labels("dropped").inc()
            log.warning("not caching an answer: %d stores already pending "
                        "(--max-pending-stores); is the cache slow?", len(self._stores))
            return None
        task = asyncio.create_task(self._store(key, namespace, answer,
                                               time.perf_counter() - started))
        self._stores.add(task)
        task.add_done_callback(self._stores.discard)
        return task

    async def _store(self, key: chat.CacheKey, namespace: str, answer: replies.Answer,
                     latency_s: float) -> None:
        try:
            await self.cache.store(
                key.prompt, answer.content, namespace=namespace, scope=key.scope,
                ttl_s=self.settings.ttl_s, metadata=answer.metadata(), cost_model=key.model,
                prompt_tokens=answer.prompt_tokens, completion_tokens=answer.completion_tokens,
                model_latency_s=latency_s)
        except StratacacheError as exc:
            self.metrics.stores.labels("failed").inc()
            self.metrics.cache_errors.labels("store", type(exc).__name__).inc()
            log.warning("could not cache an answer (the caller has it): %s", exc)
            return
        self.metrics.stores.labels("stored").inc()

    async def drain_stores(self, timeout_s: float) -> None:
        """Waits up to ``timeout_s`` for the stores in flight (shutdown)."""
        if self._stores:
            log.info("waiting for %d pending stores", len(self._stores))
            await asyncio.wait(set(self._stores), timeout=timeout_s)


class _Broken(Exception):
    """The upstream's stream broke; the caller's is cut too."""


class _Relay(StreamingResponse):
    """A streamed pass-through that, when the upstream's stream breaks, ends the caller's
    without its final chunk: the caller sees a broken stream, never a short answer that
    looks whole."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code,
                    "headers": self.raw_headers})
        try:
            async for chunk in self.body_iterator:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        except _Broken:
            return
        await send({"type": "http.response.body", "body": b"", "more_body": False})


async def _bytes(answer: httpx.Response) -> AsyncIterator[bytes]:
    try:
        async for data in answer.aiter_bytes():
            yield data
    except httpx.HTTPError as exc:
        log.warning("the upstream broke a forwarded response: %s: %s", type(exc).__name__, exc)
        raise _Broken from exc
    finally:
        await answer.aclose()


async def _read_capped(answer: httpx.Response) -> bytes:
    chunks, size = [], 0
    try:
        async for data in answer.aiter_bytes():
            size += len(data)
            if size > MAX_UPSTREAM_BODY:
                raise httpx.DecodingError(f"upstream answer over {MAX_UPSTREAM_BODY} bytes")
            chunks.append(data)
    finally:
        await answer.aclose()
    return b"".join(chunks)


async def _discard(task: asyncio.Task[httpx.Response]) -> None:
    """Drops an upstream request that lost its race with a hit."""
    task.cancel()
    try:
        answer = await task
    except (asyncio.CancelledError, httpx.HTTPError):
        return
    await answer.aclose()


def _wants(request: Request, header: str) -> bool:
    """Whether a yes/no request header says yes (present and not 0/false/no)."""
    return request.headers.get(header, "").strip().lower() not in ("", "0", "false", "no")


def _json(data: bytes) -> Any:
    try:
        return json.loads(data)
    except ValueError:
        return None


def _error(status: int, message: str, kind: str) -> Response:
    return Response(upstream.error_body(message, kind), status_code=status,
                    media_type="application/json")


def build_app(settings: ProxySettings) -> Starlette:
    """The ASGI application (its ``state.proxy`` is the :class:`Proxy`)."""
    proxy = Proxy(settings)
    app = Starlette(routes=proxy.routes(), lifespan=proxy.lifespan)
    app.state.proxy = proxy
    return app


class _Server(uvicorn.Server):
    """uvicorn's server, but a SIGTERM or SIGINT ends in a graceful shutdown and exit status 0
    (as ``stratacache serve``), not in the signal raised again once the shutdown is done."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        with super().capture_signals():
            try:
                yield
            finally:
                self._captured_signals.clear()


def server(settings: ProxySettings) -> uvicorn.Server:
    """A uvicorn server for the proxy, not yet started (``await server.serve()``)."""
    config = uvicorn.Config(
        build_app(settings), host=settings.host, port=settings.port, log_config=None,
        access_log=False, timeout_graceful_shutdown=int(settings.shutdown_grace_s) or 1,
        lifespan="on")
    return _Server(config)


def bound_port(running: uvicorn.Server) -> int:
    """The port a started server listens on (the real one when ``--port 0``)."""
    return int(running.servers[0].sockets[0].getsockname()[1])


def serve(settings: ProxySettings) -> None:
    """Runs the proxy until SIGTERM/SIGINT; in-flight requests and stores may finish within
    ``shutdown_grace_s``."""

    async def main() -> None:
        running = server(settings)
        task = asyncio.create_task(running.serve())
        while not running.started and not task.done():
            await asyncio.sleep(0.01)
        if running.started:
            log.info("stratacache proxy ready on %s:%d (upstream %s, cache %s)", settings.host,
                     bound_port(running), settings.upstream, settings.cache)
        await task
        log.info("stopped cleanly")

    asyncio.run(main())
