"""Python clients for a stratacache server: :class:`Client` (blocking) and :class:`AsyncClient`.

Gateways use these without touching generated stubs: results are plain dataclasses and failures
are exceptions of this tree, each keeping the gRPC error as ``__cause__``::

    StratacacheError
    ├── InvalidArgumentError   INVALID_ARGUMENT: fix the request (the message says how)
    ├── NotFoundError          NOT_FOUND
    ├── UnauthenticatedError   UNAUTHENTICATED: missing or wrong api_key
    ├── OverloadedError        RESOURCE_EXHAUSTED: back off and retry, or call the model
    ├── UnavailableError       UNAVAILABLE: server down or draining
    ├── DeadlineExceededError  the call outlived its timeout
    └── ServerError            anything else (INTERNAL, ...)

A gateway should treat every error of a Lookup as a miss: the cache is an optimisation.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any, TypeVar

import grpc
from google.protobuf.message import Message

from .v1 import stratacache_pb2 as pb
from .v1 import stratacache_pb2_grpc as pb_grpc

__all__ = [
    "AsyncClient", "Client", "DeadlineExceededError", "InvalidArgumentError", "LookupResult",
    "NotFoundError", "OverloadedError", "ServerError", "StratacacheError", "Timeout",
    "UnauthenticatedError", "UnavailableError",
]

T = TypeVar("T")


class StratacacheError(Exception):
    """Base of every error the clients raise."""

    code: grpc.StatusCode | None = None


class InvalidArgumentError(StratacacheError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFoundError(StratacacheError):
    code = grpc.StatusCode.NOT_FOUND


class UnauthenticatedError(StratacacheError):
    code = grpc.StatusCode.UNAUTHENTICATED


class OverloadedError(StratacacheError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class UnavailableError(StratacacheError):
    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceededError(StratacacheError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class ServerError(StratacacheError):
    """Any other status; ``code`` holds it."""


_ERRORS = {cls.code: cls for cls in (InvalidArgumentError, NotFoundError, UnauthenticatedError,
                                     OverloadedError, UnavailableError, DeadlineExceededError)}


def _error(exc: grpc.RpcError) -> StratacacheError:
    code = exc.code()  # type: ignore[attr-defined]
    cls = _ERRORS.get(code, ServerError)
    error = cls(f"{code.name}: {exc.details()}")  # type: ignore[attr-defined]
    error.code = code
    return error


@dataclass(frozen=True)
class Timeout:
    """Per-call deadlines in seconds, by kind of call; each method also takes ``timeout=``.

    A lookup that takes longer than its deadline is worth less than calling the model, so its
    default is short.
    """

    lookup: float = 2.0
    store: float = 10.0
    admin: float = 60.0


_TIERS = {pb.TIER_EXACT: "exact", pb.TIER_HOT: "hot", pb.TIER_WARM: "warm", pb.TIER_COLD: "cold"}


@dataclass(frozen=True, slots=True)
class LookupResult:
    """The answer to a lookup.

    Attributes:
        hit: whether a stored answer is served.
        response: the stored answer's bytes (b"" on a miss).
        similarity: cosine similarity between the prompt and the matched prompt (1.0 exact).
        matched_prompt: the stored prompt that matched.
        entry_id: the matched entry's id (for delete_entry).
        tier: "exact", "hot", "warm" or "cold" on a hit; "" on a miss.
        age_s: seconds since the matched entry was stored.
        best_similarity: on a miss, the closest candidate's similarity (0.0 if none).
        server_time_us: the server's own time on the call, microseconds.
    """

    hit: bool
    response: bytes
    similarity: float
    matched_prompt: str
    entry_id: str
    tier: str
    age_s: float
    best_similarity: float
    server_time_us: int

    @property
    def text(self) -> str:
        """The response decoded as UTF-8 (invalid bytes replaced)."""
        return self.response.decode("utf-8", errors="replace")


def _lookup_result(r: pb.LookupResponse) -> LookupResult:
    return LookupResult(hit=r.hit, response=r.response, similarity=r.similarity,
                        matched_prompt=r.matched_prompt, entry_id=r.entry_id,
                        tier=_TIERS.get(r.tier, ""), age_s=r.age_s,
                        best_similarity=r.best_similarity, server_time_us=r.server_time_us)


def _stats(r: pb.StatsResponse) -> dict[str, Any]:
    return _to_dict(r)


def _to_dict(message: Message) -> dict[str, Any]:
    """A message as plain dicts, ints and floats (json_format would make 64-bit ints strings)."""
    out: dict[str, Any] = {}
    for field in message.DESCRIPTOR.fields:
        value = getattr(message, field.name)
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            out[field.name] = {k: _to_dict(v) if isinstance(v, Message) else v
                               for k, v in value.items()}
        elif field.message_type is not None:
            out[field.name] = _to_dict(value)
        else:
            out[field.name] = value
    return out


def _removed(r: pb.InvalidateResponse) -> int:
    return int(r.removed)


def _entry_id(r: pb.StoreResponse) -> str:
    return r.entry_id


@dataclass(frozen=True)
class _Call:
    """One RPC ready to send: the stub method's name, its request, how to read the reply."""

    service: str  # "cache" or "admin"
    method: str
    request: Any
    convert: Callable[[Any], Any]
    timeout: float


class _BaseClient:
    """Builds requests and reads replies; the two clients differ only in how they send."""

    def __init__(self, target: str, api_key: str | None, timeout: Timeout | float) -> None:
        self.target = target
        self._timeout = timeout if isinstance(timeout, Timeout) else Timeout(timeout, timeout, timeout)
        self._metadata = (("authorization", f"Bearer {api_key}"),) if api_key else ()

    def _store(self, prompt: str, response: str | bytes, namespace: str,
               scope: Mapping[str, str] | None, template_id: str | None,
               template_version: str | None, ttl_s: float | None, user_id: str | None,
               metadata: Mapping[str, str] | None, timeout: float | None) -> _Call:
        request = pb.StoreRequest(
            namespace=namespace, prompt=prompt,
            response=response.encode() if isinstance(response, str) else response,
            scope=scope or {}, template_id=template_id, template_version=template_version,
            ttl_s=ttl_s, user_id=user_id, metadata=metadata or {})
        return _Call("cache", "Store", request, _entry_id, timeout or self._timeout.store)

    def _lookup(self, prompt: str, namespace: str, scope: Mapping[str, str] | None,
                template_id: str | None, template_version: str | None,
                min_similarity: float | None, timeout: float | None) -> _Call:
        request = pb.LookupRequest(
            namespace=namespace, prompt=prompt, scope=scope or {}, template_id=template_id,
            template_version=template_version, min_similarity=min_similarity)
        return _Call("cache", "Lookup", request, _lookup_result, timeout or self._timeout.lookup)

    def _admin(self, method: str, request: Any, convert: Callable[[Any], Any],
               timeout: float | None) -> _Call:
        return _Call("admin", method, request, convert, timeout or self._timeout.admin)

    def _invalidate_template(self, template_id: str, namespace: str, version: str | None,
                             timeout: float | None) -> _Call:
        return self._admin("InvalidateTemplate", pb.InvalidateTemplateRequest(
            namespace=namespace, template_id=template_id, version=version), _removed, timeout)

    def _invalidate_namespace(self, namespace: str, timeout: float | None) -> _Call:
        return self._admin("InvalidateNamespace",
                           pb.InvalidateNamespaceRequest(namespace=namespace), _removed, timeout)

    def _delete_entry(self, entry_id: str, timeout: float | None) -> _Call:
        return self._admin("DeleteEntry", pb.DeleteEntryRequest(entry_id=entry_id),
                           lambda r: r.removed > 0, timeout)

    def _delete_user(self, user_id: str, namespace: str | None, timeout: float | None) -> _Call:
        return self._admin("DeleteUser", pb.DeleteUserRequest(user_id=user_id, namespace=namespace),
                           _removed, timeout)

    def _stats_call(self, timeout: float | None) -> _Call:
        return self._admin("Stats", pb.StatsRequest(), _stats, timeout)


class Client(_BaseClient):
    """Blocking client. ``Client(target="127.0.0.1:50551", api_key=None)``; close it, or use it
    as a context manager. Safe to share between threads."""

    def __init__(self, target: str = "127.0.0.1:50551", *, api_key: str | None = None,
                 timeout: Timeout | float = Timeout()) -> None:
        super().__init__(target, api_key, timeout)
        self._channel = grpc.insecure_channel(target)
        self._stubs = {"cache": pb_grpc.SemanticCacheStub(self._channel),
                       "admin": pb_grpc.CacheAdminStub(self._channel)}

    def _send(self, call: _Call) -> Any:
        method = getattr(self._stubs[call.service], call.method)
        try:
            reply = method(call.request, timeout=call.timeout, metadata=self._metadata)
        except grpc.RpcError as exc:
            raise _error(exc) from exc
        return call.convert(reply)

    def store(self, prompt: str, response: str | bytes, *, namespace: str = "default",
              scope: Mapping[str, str] | None = None, template_id: str | None = None,
              template_version: str | None = None, ttl_s: float | None = None,
              user_id: str | None = None, metadata: Mapping[str, str] | None = None,
              timeout: float | None = None) -> str:
        """Stores ``response`` for ``prompt``; returns the entry id once it is durable."""
        return self._send(self._store(prompt, response, namespace, scope, template_id,
                                      template_version, ttl_s, user_id, metadata, timeout))

    def lookup(self, prompt: str, *, namespace: str = "default",
               scope: Mapping[str, str] | None = None, template_id: str | None = None,
               template_version: str | None = None, min_similarity: float | None = None,
               timeout: float | None = None) -> LookupResult:
        """The stored answer for a prompt that means the same in the same scope, or a miss."""
        return self._send(self._lookup(prompt, namespace, scope, template_id, template_version,
                                       min_similarity, timeout))

    def invalidate_template(self, template_id: str, *, namespace: str = "default",
                            version: str | None = None, timeout: float | None = None) -> int:
        """Removes the template's entries (all versions, or only ``version``); returns how many."""
        return self._send(self._invalidate_template(template_id, namespace, version, timeout))

    def invalidate_namespace(self, namespace: str, *, timeout: float | None = None) -> int:
        return self._send(self._invalidate_namespace(namespace, timeout))

    def delete_entry(self, entry_id: str, *, timeout: float | None = None) -> bool:
        """True if the entry existed and is gone; False if there was no such entry."""
        try:
            return self._send(self._delete_entry(entry_id, timeout))
        except NotFoundError:
            return False

    def delete_user(self, user_id: str, *, namespace: str | None = None,
                    timeout: float | None = None) -> int:
        return self._send(self._delete_user(user_id, namespace, timeout))

    def stats(self, *, timeout: float | None = None) -> dict[str, Any]:
        return self._send(self._stats_call(timeout))

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


class AsyncClient(_BaseClient):
    """asyncio twin of :class:`Client`: the same methods, awaited. Create it inside a running
    event loop; ``async with AsyncClient(...) as c:``."""

    def __init__(self, target: str = "127.0.0.1:50551", *, api_key: str | None = None,
                 timeout: Timeout | float = Timeout()) -> None:
        super().__init__(target, api_key, timeout)
        self._channel = grpc.aio.insecure_channel(target)
        self._stubs = {"cache": pb_grpc.SemanticCacheStub(self._channel),
                       "admin": pb_grpc.CacheAdminStub(self._channel)}

    async def _send(self, call: _Call) -> Any:
        method = getattr(self._stubs[call.service], call.method)
        try:
            reply = await method(call.request, timeout=call.timeout, metadata=self._metadata)
        except grpc.RpcError as exc:
            raise _error(exc) from exc
        return call.convert(reply)

    async def store(self, prompt: str, response: str | bytes, *, namespace: str = "default",
                    scope: Mapping[str, str] | None = None, template_id: str | None = None,
                    template_version: str | None = None, ttl_s: float | None = None,
                    user_id: str | None = None, metadata: Mapping[str, str] | None = None,
                    timeout: float | None = None) -> str:
        return await self._send(self._store(prompt, response, namespace, scope, template_id,
                                            template_version, ttl_s, user_id, metadata, timeout))

    async def lookup(self, prompt: str, *, namespace: str = "default",
                     scope: Mapping[str, str] | None = None, template_id: str | None = None,
                     template_version: str | None = None, min_similarity: float | None = None,
                     timeout: float | None = None) -> LookupResult:
        return await self._send(self._lookup(prompt, namespace, scope, template_id,
                                             template_version, min_similarity, timeout))

    async def invalidate_template(self, template_id: str, *, namespace: str = "default",
                                  version: str | None = None, timeout: float | None = None) -> int:
        return await self._send(self._invalidate_template(template_id, namespace, version, timeout))

    async def invalidate_namespace(self, namespace: str, *, timeout: float | None = None) -> int:
        return await self._send(self._invalidate_namespace(namespace, timeout))

    async def delete_entry(self, entry_id: str, *, timeout: float | None = None) -> bool:
        try:
            return await self._send(self._delete_entry(entry_id, timeout))
        except NotFoundError:
            return False

    async def delete_user(self, user_id: str, *, namespace: str | None = None,
                          timeout: float | None = None) -> int:
        return await self._send(self._delete_user(user_id, namespace, timeout))

    async def stats(self, *, timeout: float | None = None) -> dict[str, Any]:
        return await self._send(self._stats_call(timeout))

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()
