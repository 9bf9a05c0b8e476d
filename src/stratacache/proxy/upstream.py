"""The OpenAI-compatible provider behind the proxy: one pooled HTTP client (httpx), headers
passed through both ways, and the provider's failures turned into OpenAI-shaped errors.

Requests are always sent streamed: a non-streamed answer is read whole by the caller, a
streamed one is passed on as it arrives, and either can be dropped unread (a hit that won a
race with the upstream, :mod:`.app`).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping

import httpx

#: Request headers never forwarded: hop-by-hop ones (RFC 9110 7.6.1), the ones httpx sets from
#: the body and the target, and the proxy's own.
_DROP_REQUEST = frozenset({"host", "content-length", "connection", "keep-alive",
                           "proxy-authorization", "proxy-connection", "te", "trailer",
                           "transfer-encoding", "upgrade", "accept-encoding", "cache-control"})
#: Response headers never passed back: the body is re-framed (and decoded) by the proxy.
_DROP_RESPONSE = frozenset({"content-length", "connection", "keep-alive", "transfer-encoding",
                            "content-encoding", "date", "server"})
_OWN_PREFIX = "x-stratacache"


class Upstream:
    """A pooled client for one OpenAI-compatible base URL.

    Args:
        base_url: e.g. ``https://api.openai.com/v1``; request paths are relative to it.
        api_key: sent as the bearer token instead of the caller's; None: pass the caller's on.
        connect_timeout_s: seconds to open a connection.
        read_timeout_s: seconds the upstream may stay silent (between bytes of a stream too).
        max_connections: connections kept to the upstream at most; more requests wait for one
            (for up to ``connect_timeout_s``).
    """

    def __init__(self, base_url: str, *, api_key: str | None, connect_timeout_s: float,
                 read_timeout_s: float, max_connections: int) -> None:
        self.base_url = base_url.rstrip("/")
        self._api_key = api_key
        self._client = httpx.AsyncClient(
            base_url=self.base_url + "/",
            timeout=httpx.Timeout(read_timeout_s, connect=connect_timeout_s,
                                  pool=connect_timeout_s),
            limits=httpx.Limits(max_connections=max_connections,
                                max_keepalive_connections=max_connections),
            follow_redirects=False)

    async def open(self, method: str, path: str, headers: Iterable[tuple[str, str]],
                   body: bytes, query: str = "") -> httpx.Response:
        """Sends a request and returns once the upstream's status and headers arrived; the
        body is read by the caller (and the response closed by it).

        Raises:
            httpx.HTTPError: the upstream could not be reached or did not answer in time.
        """
        sent = [(k, v) for k, v in headers
                if k.lower() not in _DROP_REQUEST and not k.lower().startswith(_OWN_PREFIX)]
        if self._api_key is not None:
            sent = [(k, v) for k, v in sent if k.lower() != "authorization"]
            sent.append(("authorization", f"Bearer {self._api_key}"))
        url = path.lstrip("/") + (f"?{query}" if query else "")
        request = self._client.build_request(method, url, headers=sent, content=body)
        return await self._client.send(request, stream=True)

    async def close(self) -> None:
        await self._client.aclose()


def passed_back(headers: httpx.Headers) -> dict[str, str]:
    """The upstream's response headers the caller gets (its request ids, rate-limit state...)."""
    return {k: v for k, v in headers.items() if k.lower() not in _DROP_RESPONSE}


def error_body(message: str, kind: str) -> bytes:
    """An OpenAI-shaped error object, for failures the upstream did not answer itself."""
    return json.dumps({"error": {"message": message, "type": kind, "param": None,
                                 "code": None}}).encode()


def failure(exc: httpx.HTTPError, base_url: str) -> tuple[int, bytes]:
    """The status and body the caller gets when the upstream could not answer.

    Returns:
        504 for a timeout, 502 for anything else (refused, reset, malformed).
    """
    if isinstance(exc, httpx.TimeoutException):
        return 504, error_body(f"the upstream {base_url} did not answer in time "
                               f"({type(exc).__name__})", "upstream_timeout")
    return 502, error_body(f"the upstream {base_url} could not be reached or broke the "
                           f"connection: {type(exc).__name__}: {exc}", "upstream_error")


def credential(headers: Mapping[str, str]) -> str | None:
    """The caller's upstream credential (its Authorization or api-key header), if any."""
    return headers.get("authorization") or headers.get("api-key")
