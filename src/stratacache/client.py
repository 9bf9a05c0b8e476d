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

from collections.abc import Callable, Iterable, Mapping, Sequence
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
_MISS_REASONS = {v: k.removeprefix("MISS_REASON_").lower()
                 for k, v in pb.MissReason.items() if v != pb.MISS_REASON_UNSPECIFIED}
#: Labelled pairs sent per AddEvidence call (the server takes at most 10000).
EVIDENCE_BATCH = 500


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
        verifier_score: on a verified hit, the verifier's score in [0, 1]; else None.
        miss_reason: on a miss, why: "no_candidate", "below_similarity",
            "rejected_by_verifier", "vetoed", "uncalibrated", "other_scope" or "too_long";
            "" on a hit.
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
    verifier_score: float | None = None
    miss_reason: str = ""

    @property
    def text(self) -> str:
        """The response decoded as UTF-8 (invalid bytes replaced)."""
        return self.response.decode("utf-8", errors="replace")


def _lookup_result(r: pb.LookupResponse) -> LookupResult:
    return LookupResult(hit=r.hit, response=r.response, similarity=r.similarity,
                        matched_prompt=r.matched_prompt, entry_id=r.entry_id,
                        tier=_TIERS.get(r.tier, ""), age_s=r.age_s,
                        best_similarity=r.best_similarity, server_time_us=r.server_time_us,
                        verifier_score=r.verifier_score if r.HasField("verifier_score") else None,
                        miss_reason=_MISS_REASONS.get(r.miss_reason, ""))


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
        elif getattr(field, "has_presence", False) and not message.HasField(field.name):
            out[field.name] = None
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

    def _feedback(self, entry_id: str, prompt: str, correct: bool, namespace: str,
                  timeout: float | None) -> _Call:
        request = pb.FeedbackRequest(namespace=namespace, entry_id=entry_id, prompt=prompt,
                                     correct=correct)
        return _Call("cache", "Feedback", request, _to_dict, timeout or self._timeout.store)

    def _set_policy(self, namespace: str, max_wrong_rate: float | None,
                    min_similarity: float | None, verify: bool | None, clear_evidence: bool,
                    timeout: float | None) -> _Call:
        return self._admin("SetPolicy", pb.SetPolicyRequest(
            namespace=namespace, max_wrong_rate=max_wrong_rate, min_similarity=min_similarity,
            verify=verify, clear_evidence=clear_evidence), _to_dict, timeout)

    def _get_policy(self, namespace: str, timeout: float | None) -> _Call:
        return self._admin("GetPolicy", pb.GetPolicyRequest(namespace=namespace), _to_dict,
                           timeout)

    def _add_evidence(self, namespace: str, pairs: Iterable[tuple[str, str, bool]],
                      timeout: float | None) -> list[_Call]:
        rows = [pb.LabelledPair(a=a, b=b, duplicate=bool(d)) for a, b, d in pairs]
        return [self._admin("AddEvidence", pb.AddEvidenceRequest(
                    namespace=namespace, pairs=rows[i:i + EVIDENCE_BATCH]), _to_dict, timeout)
                for i in range(0, max(len(rows), 1), EVIDENCE_BATCH)]


def _evidence_total(replies: Sequence[dict[str, Any]]) -> dict[str, Any]:
    return {"added": sum(r["added"] for r in replies), "skipped": sum(r["skipped"] for r in replies),
            "policy": replies[-1]["policy"] if replies else None}


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

    def feedback(self, entry_id: str, prompt: str, correct: bool, *, namespace: str = "default",
                 timeout: float | None = None) -> dict[str, Any]:
        """Reports whether serving ``entry_id`` for ``prompt`` was right; returns
        ``{"entry_deleted": bool, "policy": {...}}``. Raises NotFoundError when the entry is
        gone."""
        return self._send(self._feedback(entry_id, prompt, correct, namespace, timeout))

    def set_policy(self, namespace: str, *, max_wrong_rate: float | None = None,
                   min_similarity: float | None = None, verify: bool | None = None,
                   clear_evidence: bool = False, timeout: float | None = None) -> dict[str, Any]:
        """Replaces the namespace's policy (None = server default); returns its status (see
        :meth:`get_policy`)."""
        return self._send(self._set_policy(namespace, max_wrong_rate, min_similarity, verify,
                                           clear_evidence, timeout))

    def get_policy(self, namespace: str = "default", *,
                   timeout: float | None = None) -> dict[str, Any]:
        """The policy, the rule in force (``threshold`` None: exact hits only), the evidence
        behind it and the bound it promises (fields of ``stratacache.v1.PolicyStatus``)."""
        return self._send(self._get_policy(namespace, timeout))

    def add_evidence(self, namespace: str, pairs: Iterable[tuple[str, str, bool]], *,
                     progress: Callable[[int], None] | None = None,
                     timeout: float | None = None) -> dict[str, Any]:
        """Adds labelled ``(stored prompt, lookup prompt, right to serve)`` pairs as calibration
        evidence, in calls of EVIDENCE_BATCH; ``progress(n)`` after each. Returns
        ``{"added", "skipped", "policy"}``."""
        replies = []
        for call in self._add_evidence(namespace, pairs, timeout):
            replies.append(self._send(call))
            if progress is not None:
                progress(len(call.request.pairs))
        return _evidence_total(replies)

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

    async def feedback(self, entry_id: str, prompt: str, correct: bool, *,
                       namespace: str = "default", timeout: float | None = None) -> dict[str, Any]:
        return await self._send(self._feedback(entry_id, prompt, correct, namespace, timeout))

    async def set_policy(self, namespace: str, *, max_wrong_rate: float | None = None,
                         min_similarity: float | None = None, verify: bool | None = None,
                         clear_evidence: bool = False,
                         timeout: float | None = None) -> dict[str, Any]:
        return await self._send(self._set_policy(namespace, max_wrong_rate, min_similarity,
                                                 verify, clear_evidence, timeout))

    async def get_policy(self, namespace: str = "default", *,
                         timeout: float | None = None) -> dict[str, Any]:
        return await self._send(self._get_policy(namespace, timeout))

    async def add_evidence(self, namespace: str, pairs: Iterable[tuple[str, str, bool]], *,
                           progress: Callable[[int], None] | None = None,
                           timeout: float | None = None) -> dict[str, Any]:
        replies = []
        for call in self._add_evidence(namespace, pairs, timeout):
            replies.append(await self._send(call))
            if progress is not None:
                progress(len(call.request.pairs))
        return _evidence_total(replies)

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()
