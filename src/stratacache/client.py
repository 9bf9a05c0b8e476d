"""Python clients for a stratacache server: :class:`Client` (blocking) and :class:`AsyncClient`.

Gateways use these without touching generated stubs: results are plain dataclasses and failures
are exceptions of this tree, each keeping the gRPC error as ``__cause__`` (None when the client
failed the call before sending it)::

    StratacacheError
    ├── InvalidArgumentError   INVALID_ARGUMENT: fix the request (the message says how)
    ├── NotFoundError          NOT_FOUND
    ├── UnauthenticatedError   UNAUTHENTICATED: missing or wrong api_key
    ├── PermissionDeniedError  PERMISSION_DENIED: this api_key may not make this call
    ├── OverloadedError        RESOURCE_EXHAUSTED: back off and retry, or call the model
    │   └── RateLimitedError   a rate limit of the server: retry after ``retry_after_s``
    ├── StorageFullError       FAILED_PRECONDITION: disk budget or disk full; an admin must
    │                          act, retrying the same call will not help
    ├── UnavailableError       UNAVAILABLE: server down or draining
    ├── DeadlineExceededError  the call outlived its timeout (or was given one <= 0)
    └── ServerError            anything else (INTERNAL, ...)

A gateway should treat every error of a Lookup as a miss: the cache is an optimisation.

Each public method is written once, on the shared base: it builds a :class:`_Call` (or a
:class:`_Batch` of them) and the :class:`_rpc` descriptor hands it to the client's ``_send``,
which returns the result (:class:`Client`) or a coroutine of it (:class:`AsyncClient`).
"""

from __future__ import annotations

import asyncio
import functools
import inspect
from abc import ABC, abstractmethod
from collections.abc import Callable, Coroutine, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import (TYPE_CHECKING, Any, Concatenate, Generic, ParamSpec, TypeAlias, TypeVar,
                    overload)

import grpc
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc

from .config import DEFAULT_MAX_MESSAGE_BYTES
from .ratelimit import RETRY_AFTER_METADATA
from .v1 import stratacache_pb2 as pb
from .v1 import stratacache_pb2_grpc as pb_grpc

if TYPE_CHECKING:  # only annotations: plain clients never load cryptography
    from .tls import PemSource

__all__ = [
    "AsyncClient", "Client", "DeadlineExceededError", "InvalidArgumentError", "LookupResult",
    "NotFoundError", "OverloadedError", "PermissionDeniedError", "RateLimitedError",
    "ServerError", "StorageFullError", "StratacacheError", "Timeout", "UnauthenticatedError",
    "UnavailableError",
]

T = TypeVar("T")
R = TypeVar("R")
P = ParamSpec("P")
Ch = TypeVar("Ch")


class StratacacheError(Exception):
    """Base of every error the clients raise."""

    code: grpc.StatusCode | None = None


class InvalidArgumentError(StratacacheError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFoundError(StratacacheError):
    code = grpc.StatusCode.NOT_FOUND


class UnauthenticatedError(StratacacheError):
    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDeniedError(StratacacheError):
    code = grpc.StatusCode.PERMISSION_DENIED


class OverloadedError(StratacacheError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class RateLimitedError(OverloadedError):
    """The call was over one of the server's rate limits (the message names it).

    Attributes:
        retry_after_s: seconds until the limit would let the call through (from the reply's
            ``retry-after-ms`` metadata); None if the server did not say.
    """

    retry_after_s: float | None = None


class StorageFullError(StratacacheError):
    """The server's disk budget or disk is full: an admin must act; a retry will not help."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class UnavailableError(StratacacheError):
    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceededError(StratacacheError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class ServerError(StratacacheError):
    """Any other status; ``code`` holds it."""


_ERRORS = {cls.code: cls for cls in (InvalidArgumentError, NotFoundError, UnauthenticatedError,
                                     PermissionDeniedError, OverloadedError, StorageFullError,
                                     UnavailableError, DeadlineExceededError)}


def _error(exc: grpc.RpcError) -> StratacacheError:
    code = exc.code()  # type: ignore[attr-defined]
    cls = _ERRORS.get(code, ServerError)
    retry_after: object = None
    if code is grpc.StatusCode.RESOURCE_EXHAUSTED:
        trailing = dict(getattr(exc, "trailing_metadata", lambda: None)() or ())
        if RETRY_AFTER_METADATA in trailing:  # only a rate limit says when to retry
            cls, retry_after = RateLimitedError, trailing[RETRY_AFTER_METADATA]
    error = cls(f"{code.name}: {exc.details()}")  # type: ignore[attr-defined]
    error.code = code
    if isinstance(error, RateLimitedError):
        try:
            error.retry_after_s = int(retry_after) / 1000  # type: ignore[call-overload]
        except (TypeError, ValueError):
            pass  # a malformed value: the server did not say, in effect
    return error


@dataclass(frozen=True)
class Timeout:
    """Per-call deadlines in seconds, by kind of call; each method also takes ``timeout=``.

    A lookup that takes longer than its deadline is worth less than calling the model, so its
    default is short. A deadline <= 0 fails the call at once, unsent, with DeadlineExceededError.
    """

    lookup: float = 2.0
    store: float = 10.0
    admin: float = 60.0


#: Channel options under the caller's ``channel_options``. The message limits are the server's
#: own default, so the largest response it caches (4 MiB, plus the reply's other fields) comes
#: back instead of failing with gRPC's default 4 MiB receive limit.
CHANNEL_OPTIONS: tuple[tuple[str, Any], ...] = (
    ("grpc.max_receive_message_length", DEFAULT_MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", DEFAULT_MAX_MESSAGE_BYTES),
)

_TIERS = {pb.TIER_EXACT: "exact", pb.TIER_HOT: "hot", pb.TIER_WARM: "warm", pb.TIER_COLD: "cold",
          pb.TIER_SHARED: "shared"}
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
        tier: "exact", "hot", "warm", "cold" or "shared" (the fleet's shared store) on a hit;
            "" on a miss.
        age_s: seconds since the matched entry was stored.
        best_similarity: on a miss, the closest candidate's similarity (0.0 if none).
        server_time_us: the server's own time on the call, microseconds.
        verifier_score: the decision score in [0, 1] the namespace's threshold is compared
            with (the verifier's, fused with the cosine when its card says so): on a
            verified hit the served entry's, on a miss the best rejected candidate's;
            None when no verifier ran.
        miss_reason: on a miss, why: "no_candidate", "below_similarity",
            "rejected_by_verifier", "vetoed", "uncalibrated", "other_scope" or "too_long";
            "" on a hit.
        metadata: on a hit, the metadata the entry was stored with (a dict; empty on a miss).
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
    # Left out of the hash so results stay hashable (a dict is not).
    metadata: Mapping[str, str] = field(default_factory=dict, hash=False)

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
                        miss_reason=_MISS_REASONS.get(r.miss_reason, ""),
                        metadata=dict(r.metadata))


def _to_dict(message: Message) -> dict[str, Any]:
    """A message as plain dicts, ints and floats (json_format would make 64-bit ints strings)."""
    out: dict[str, Any] = {}
    for field_ in message.DESCRIPTOR.fields:
        value = getattr(message, field_.name)
        if field_.message_type is not None and field_.message_type.GetOptions().map_entry:
            out[field_.name] = {k: _to_dict(v) if isinstance(v, Message) else v
                                for k, v in value.items()}
        elif field_.message_type is not None:
            out[field_.name] = _to_dict(value)
        elif getattr(field_, "has_presence", False) and not message.HasField(field_.name):
            out[field_.name] = None
        else:
            out[field_.name] = value
    return out


def _removed(r: pb.InvalidateResponse) -> int:
    return int(r.removed)


def _entry_id(r: pb.StoreResponse) -> str:
    return r.entry_id


def _evidence_total(replies: Sequence[dict[str, Any]]) -> dict[str, Any]:
    return {"added": sum(r["added"] for r in replies), "skipped": sum(r["skipped"] for r in replies),
            "policy": replies[-1]["policy"] if replies else None}


def _report(progress: Callable[[int], None], sent: int, _reply: object) -> None:
    """add_evidence's progress: how many pairs the call that just returned carried."""
    progress(sent)


@dataclass(frozen=True)
class _Call(Generic[T]):
    """One RPC ready to send: the stub method's name, its request, how to read the reply."""

    service: str  # "cache", "admin" or "health"
    method: str
    request: Any
    convert: Callable[[Any], T]
    timeout: float  # seconds
    #: The result when the server answers NOT_FOUND; None: raise NotFoundError.
    if_not_found: Callable[[], T] | None = None
    #: Called with the result once it is in (add_evidence's progress).
    done: Callable[[T], None] | None = None

    def result(self, reply: Any) -> T:
        value = self.convert(reply)
        if self.done is not None:
            self.done(value)
        return value

    def failed(self, exc: grpc.RpcError) -> T:
        error = _error(exc)
        if isinstance(error, NotFoundError) and self.if_not_found is not None:
            return self.if_not_found()
        raise error from exc


@dataclass(frozen=True)
class _Batch(Generic[R, T]):
    """Calls sent one after another (each after the last one's reply); ``combine`` makes their
    results into one."""

    calls: Sequence[_Call[R]]
    combine: Callable[[list[R]], T]


_Plan: TypeAlias = _Call[T] | _Batch[Any, T]


class _rpc(Generic[P, T]):
    """Turns a base method that builds a :data:`_Plan` into a public method of both clients:
    on a :class:`Client` it returns the result, on an :class:`AsyncClient` a coroutine of it.
    The signature and docstring are the builder's, less ``self``."""

    def __init__(self, build: Callable[Concatenate[_BaseClient[Any], P], _Plan[T]]) -> None:
        self.__wrapped__ = build
        self.__name__ = build.__name__
        self.__doc__ = build.__doc__
        # What a caller of the bound method sees: no `self`, and the result rather than a plan.
        signature = inspect.signature(build)
        self.__signature__ = signature.replace(
            parameters=list(signature.parameters.values())[1:],
            return_annotation=inspect.Signature.empty)
        self.__annotations__ = {name: hint for name, hint in build.__annotations__.items()
                                if name in self.__signature__.parameters}

    def __repr__(self) -> str:
        return f"<client method {self.__name__}>"

    @overload
    def __get__(self, client: None, owner: type | None = None) -> _rpc[P, T]: ...
    @overload
    def __get__(self, client: Client, owner: type | None = None) -> Callable[P, T]: ...
    @overload
    def __get__(self, client: AsyncClient,
                owner: type | None = None) -> Callable[P, Coroutine[Any, Any, T]]: ...

    def __get__(self, client: _BaseClient[Any] | None,
                owner: type | None = None) -> _rpc[P, T] | Callable[..., Any]:
        if client is None:
            return self
        build = self.__wrapped__
        method: Callable[..., Any]
        if isinstance(client, AsyncClient):
            send_async = client._send

            # A coroutine function, not a function returning one, so that
            # inspect.iscoroutinefunction (which frameworks check) holds, as it did.
            async def method(*args: Any, **kwargs: Any) -> Any:
                return await send_async(build(client, *args, **kwargs))
        elif isinstance(client, Client):
            send = client._send

            def method(*args: Any, **kwargs: Any) -> Any:
                return send(build(client, *args, **kwargs))
        else:
            raise TypeError(f"{type(client).__name__} is neither a Client nor an AsyncClient")
        functools.update_wrapper(method, build)
        method.__qualname__ = f"{type(client).__qualname__}.{self.__name__}"
        method.__annotations__ = self.__annotations__
        vars(method)["__signature__"] = self.__signature__
        return method


class _BaseClient(ABC, Generic[Ch]):
    """Everything but the sending: the public methods build calls; the two clients differ only
    in the channel they open and in how ``_send`` waits for a reply."""

    def __init__(self, target: str = "127.0.0.1:50551", *, api_key: str | None = None,
                 timeout: Timeout | float = Timeout(),
                 channel_options: Sequence[tuple[str, Any]] = (), tls: bool = False,
                 root_certificates: PemSource | None = None,
                 certificate_chain: PemSource | None = None,
                 private_key: PemSource | None = None) -> None:
        """Opens a channel to the server (it connects on the first call).

        Args:
            target: the server's address, "host:port".
            api_key: the server's API key, if it has one (sent as a bearer token).
            timeout: per-call deadlines in seconds: a :class:`Timeout`, or one number for every
                kind of call. A method's ``timeout=`` overrides it for that call.
            channel_options: gRPC channel options, ``(name, value)`` pairs, over the defaults
                in :data:`CHANNEL_OPTIONS`; e.g. ``[("grpc.max_receive_message_length", n)]``
                for a server started with a larger ``max_message_bytes``.
            tls: connect over TLS (a server started with ``--tls-cert``); False: plaintext.
            root_certificates: with ``tls``, the CA certificate(s) the server's certificate
                must chain to; None: the system's trusted roots.
            certificate_chain, private_key: with ``tls``, this client's certificate and its
                unencrypted key, for a server that requires one (``--tls-client-ca``).
                Each of these three is PEM data as ``bytes``, or the path of a PEM file as a
                ``str`` or ``Path`` (read once, here).

        Raises:
            OSError: a PEM file is missing or unreadable.
            ValueError: a certificate argument without ``tls=True``, ``certificate_chain``
                without ``private_key`` (or the reverse), or data that is not PEM of its kind.
        """
        given = [name for name, value in (("root_certificates", root_certificates),
                                          ("certificate_chain", certificate_chain),
                                          ("private_key", private_key)) if value is not None]
        if given and not tls:
            raise ValueError(f"{', '.join(given)} given without tls=True: pass tls=True to "
                             "connect over TLS with them")
        self._credentials: grpc.ChannelCredentials | None = None
        if tls:
            # Imported here: only TLS clients pay for loading cryptography's x509 parsers.
            from .tls import channel_credentials

            self._credentials = channel_credentials(
                root_certificates=root_certificates, certificate_chain=certificate_chain,
                private_key=private_key)
        self.target = target
        self._timeout = timeout if isinstance(timeout, Timeout) else Timeout(timeout, timeout, timeout)
        self._metadata = (("authorization", f"Bearer {api_key}"),) if api_key else ()
        options = list(dict([*CHANNEL_OPTIONS, *channel_options]).items())
        self._channel = self._open_channel(target, options)
        self._stubs = {"cache": pb_grpc.SemanticCacheStub(self._channel),
                       "admin": pb_grpc.CacheAdminStub(self._channel),
                       "health": health_pb2_grpc.HealthStub(self._channel)}

    @abstractmethod
    def _open_channel(self, target: str, options: list[tuple[str, Any]]) -> Ch: ...

    def _call(self, service: str, method: str, request: Message, convert: Callable[[Any], T],
              timeout: float | None, default: float, **hooks: Any) -> _Call[T]:
        # Only None means "not given": `timeout or default` turned 0 into the default.
        seconds = default if timeout is None else timeout
        if seconds <= 0:
            # gRPC rounds a deadline of "now" up and often still gets the reply: a caller whose
            # time is up must fail every time, without sending.
            raise DeadlineExceededError(
                f"DEADLINE_EXCEEDED: the {method} call's timeout is {seconds} s, so it was not "
                "sent; give a positive timeout in seconds (None takes the client's Timeout)")
        return _Call(service, method, request, convert, seconds, **hooks)

    def _admin(self, method: str, request: Message, convert: Callable[[Any], T],
               timeout: float | None, **hooks: Any) -> _Call[T]:
        return self._call("admin", method, request, convert, timeout, self._timeout.admin,
                          **hooks)

    @_rpc
    def store(self, prompt: str, response: str | bytes, *, namespace: str = "default",
              scope: Mapping[str, str] | None = None, template_id: str | None = None,
              template_version: str | None = None, ttl_s: float | None = None,
              user_id: str | None = None, metadata: Mapping[str, str] | None = None,
              cost_model: str | None = None, prompt_tokens: int | None = None,
              completion_tokens: int | None = None, model_latency_s: float | None = None,
              timeout: float | None = None) -> _Call[str]:
        """Stores ``response`` for ``prompt``.

        Args:
            prompt: the prompt as the model saw it.
            response: the model's answer (str is sent as UTF-8); at most 4 MiB.
            namespace: the cache to store into; lookups only see their own namespace.
            scope: labels a lookup must match exactly to be served this entry (e.g. a tenant).
            template_id, template_version: the prompt template, for invalidate_template.
            ttl_s: seconds the entry may be served; None: until removed.
            user_id: the user the answer was made for (delete_user removes it).
            metadata: labels returned with every hit of the entry (LookupResult.metadata).
            cost_model, prompt_tokens, completion_tokens, model_latency_s: what the answer cost
                to make: the model's name as the server's price table has it, the tokens it
                read and wrote, and the seconds it took (each optional); every hit of the entry
                counts them as saved (stats, /metrics).
            timeout: deadline in seconds; None: the client's Timeout.store.

        Returns:
            The entry's id, once the entry is durable.

        Raises:
            InvalidArgumentError: a field breaks a limit (the message says which).
            StorageFullError: the server's storage is full.
            StratacacheError: any other failure (see the module docstring).
        """
        request = pb.StoreRequest(
            namespace=namespace, prompt=prompt,
            response=response.encode() if isinstance(response, str) else response,
            scope=scope or {}, template_id=template_id, template_version=template_version,
            ttl_s=ttl_s, user_id=user_id, metadata=metadata or {})
        cost = pb.AnswerCost(model=cost_model, prompt_tokens=prompt_tokens,
                             completion_tokens=completion_tokens, latency_s=model_latency_s)
        if cost.ListFields():  # any of them given
            request.cost.CopyFrom(cost)
        return self._call("cache", "Store", request, _entry_id, timeout, self._timeout.store)

    @_rpc
    def lookup(self, prompt: str, *, namespace: str = "default",
               scope: Mapping[str, str] | None = None, template_id: str | None = None,
               template_version: str | None = None, min_similarity: float | None = None,
               user_id: str | None = None, timeout: float | None = None) -> _Call[LookupResult]:
        """The stored answer for a prompt that means the same in the same scope, or a miss.

        Args:
            prompt: the prompt about to be sent to the model.
            namespace, scope, template_id, template_version: as given to :meth:`store`; only
                entries with the same ones are served.
            min_similarity: cosine similarity a semantic match must reach; None: the
                namespace's policy.
            user_id: the end user asking, for the server's per-user rate limit (never part of
                the match); None: the API key is the user.
            timeout: deadline in seconds; None: the client's Timeout.lookup.

        Returns:
            A :class:`LookupResult`, hit or miss.

        Raises:
            StratacacheError: any failure (see the module docstring); treat it as a miss.
        """
        request = pb.LookupRequest(
            namespace=namespace, prompt=prompt, scope=scope or {}, template_id=template_id,
            template_version=template_version, min_similarity=min_similarity, user_id=user_id)
        return self._call("cache", "Lookup", request, _lookup_result, timeout,
                          self._timeout.lookup)

    @_rpc
    def feedback(self, entry_id: str, prompt: str, correct: bool, *, namespace: str = "default",
                 timeout: float | None = None) -> _Call[dict[str, Any]]:
        """Reports whether serving ``entry_id`` for ``prompt`` was right.

        Args:
            entry_id: the served entry (LookupResult.entry_id).
            prompt: the lookup's prompt.
            correct: whether the served answer was right for it.
            namespace: the entry's namespace.
            timeout: deadline in seconds; None: the client's Timeout.store.

        Returns:
            ``{"entry_deleted": bool, "policy": {...}}`` (policy as :meth:`get_policy`).

        Raises:
            NotFoundError: the entry is gone.
            StratacacheError: any other failure.
        """
        request = pb.FeedbackRequest(namespace=namespace, entry_id=entry_id, prompt=prompt,
                                     correct=correct)
        return self._call("cache", "Feedback", request, _to_dict, timeout, self._timeout.store)

    @_rpc
    def invalidate_template(self, template_id: str, *, namespace: str = "default",
                            version: str | None = None,
                            timeout: float | None = None) -> _Call[int]:
        """Removes the template's entries: all its versions, or only ``version``.

        Args:
            template_id: the template, as given to :meth:`store`.
            namespace: the namespace to remove them from.
            version: only this version; None: every version.
            timeout: deadline in seconds; None: the client's Timeout.admin.

        Returns:
            How many entries were removed.

        Raises:
            StratacacheError: any failure.
        """
        return self._admin("InvalidateTemplate", pb.InvalidateTemplateRequest(
            namespace=namespace, template_id=template_id, version=version), _removed, timeout)

    @_rpc
    def invalidate_namespace(self, namespace: str, *, timeout: float | None = None) -> _Call[int]:
        """Removes every entry of ``namespace``.

        Args:
            namespace: the namespace to empty.
            timeout: deadline in seconds; None: the client's Timeout.admin.

        Returns:
            How many entries were removed.

        Raises:
            StratacacheError: any failure.
        """
        return self._admin("InvalidateNamespace",
                           pb.InvalidateNamespaceRequest(namespace=namespace), _removed, timeout)

    @_rpc
    def delete_entry(self, entry_id: str, *, timeout: float | None = None) -> _Call[bool]:
        """Removes one entry.

        Args:
            entry_id: the entry (LookupResult.entry_id, or what :meth:`store` returned).
            timeout: deadline in seconds; None: the client's Timeout.admin.

        Returns:
            True if the entry existed and is gone; False if there was no such entry.

        Raises:
            InvalidArgumentError: ``entry_id`` is not an entry id.
            StratacacheError: any other failure.
        """
        return self._admin("DeleteEntry", pb.DeleteEntryRequest(entry_id=entry_id),
                           lambda r: r.removed > 0, timeout, if_not_found=lambda: False)

    @_rpc
    def delete_user(self, user_id: str, *, namespace: str | None = None,
                    timeout: float | None = None) -> _Call[int]:
        """Removes every entry stored for ``user_id``.

        Args:
            user_id: the user, as given to :meth:`store`.
            namespace: only this namespace; None: every namespace.
            timeout: deadline in seconds; None: the client's Timeout.admin.

        Returns:
            How many entries were removed.

        Raises:
            StratacacheError: any failure.
        """
        return self._admin("DeleteUser", pb.DeleteUserRequest(user_id=user_id, namespace=namespace),
                           _removed, timeout)

    @_rpc
    def health(self, service: str = "", *, timeout: float | None = None) -> _Call[str]:
        """The server's health, as load balancers ask it (``grpc.health.v1``; needs no key).

        Args:
            service: a service's full name, e.g. "stratacache.v1.SemanticCache"; "" = the
                whole server.
            timeout: deadline in seconds; None: the client's Timeout.lookup.

        Returns:
            "SERVING", or "NOT_SERVING" while the server shuts down (or another status name).

        Raises:
            NotFoundError: the server has no such service.
            StratacacheError: any other failure (UnavailableError: nothing answers there).
        """
        return self._call("health", "Check", health_pb2.HealthCheckRequest(service=service),
                          lambda r: health_pb2.HealthCheckResponse.ServingStatus.Name(r.status),
                          timeout, self._timeout.lookup)

    @_rpc
    def stats(self, *, timeout: float | None = None) -> _Call[dict[str, Any]]:
        """The server's counters and tier sizes (fields of ``stratacache.v1.StatsResponse``).

        Args:
            timeout: deadline in seconds; None: the client's Timeout.admin.

        Raises:
            StratacacheError: any failure.
        """
        return self._admin("Stats", pb.StatsRequest(), _to_dict, timeout)

    @_rpc
    def set_policy(self, namespace: str, *, max_wrong_rate: float | None = None,
                   min_similarity: float | None = None, verify: bool | None = None,
                   clear_evidence: bool = False,
                   timeout: float | None = None) -> _Call[dict[str, Any]]:
        """Replaces the namespace's policy; a None field takes the server's default.

        Args:
            namespace: the namespace.
            max_wrong_rate: the bound on wrong semantic hits the calibration must promise.
            min_similarity: cosine similarity a semantic match must reach.
            verify: whether semantic candidates go through the server's verifier.
            clear_evidence: also forget the namespace's calibration evidence.
            timeout: deadline in seconds; None: the client's Timeout.admin.

        Returns:
            The policy's status, as :meth:`get_policy`.

        Raises:
            InvalidArgumentError: a value is out of range.
            StratacacheError: any other failure.
        """
        return self._admin("SetPolicy", pb.SetPolicyRequest(
            namespace=namespace, max_wrong_rate=max_wrong_rate, min_similarity=min_similarity,
            verify=verify, clear_evidence=clear_evidence), _to_dict, timeout)

    @_rpc
    def get_policy(self, namespace: str = "default", *,
                   timeout: float | None = None) -> _Call[dict[str, Any]]:
        """The policy, the rule in force (``threshold`` None: exact hits only), the evidence
        behind it and the bound it promises (fields of ``stratacache.v1.PolicyStatus``).

        Args:
            namespace: the namespace.
            timeout: deadline in seconds; None: the client's Timeout.admin.

        Raises:
            StratacacheError: any failure.
        """
        return self._admin("GetPolicy", pb.GetPolicyRequest(namespace=namespace), _to_dict,
                           timeout)

    @_rpc
    def add_evidence(self, namespace: str, pairs: Iterable[tuple[str, str, bool]], *,
                     progress: Callable[[int], None] | None = None,
                     timeout: float | None = None) -> _Batch[dict[str, Any], dict[str, Any]]:
        """Adds labelled pairs to the namespace's calibration evidence, EVIDENCE_BATCH a call.

        Args:
            namespace: the namespace.
            pairs: ``(stored prompt, lookup prompt, right to serve)`` triples.
            progress: called with the number of pairs sent after each call's reply.
            timeout: deadline of each call in seconds; None: the client's Timeout.admin.

        Returns:
            ``{"added": n, "skipped": n (too long for the model), "policy": {...}}``, the
            policy as :meth:`get_policy` after the last call.

        Raises:
            InvalidArgumentError: no pairs, or an empty or oversized text.
            StorageFullError: the namespace holds as much evidence as the server keeps.
            StratacacheError: any other failure; the calls before it were kept.
        """
        rows = [pb.LabelledPair(a=a, b=b, duplicate=bool(d)) for a, b, d in pairs]
        calls = []
        # One call even for no pairs, so the server says what is wrong.
        for start in range(0, max(len(rows), 1), EVIDENCE_BATCH):
            chunk = rows[start:start + EVIDENCE_BATCH]
            done = None if progress is None else functools.partial(_report, progress, len(chunk))
            calls.append(self._admin("AddEvidence", pb.AddEvidenceRequest(
                namespace=namespace, pairs=chunk), _to_dict, timeout, done=done))
        return _Batch(calls, _evidence_total)


class Client(_BaseClient[grpc.Channel]):
    """Blocking client. ``Client(target="127.0.0.1:50551", api_key=None)``; close it, or use it
    as a context manager. Safe to share between threads."""

    def _open_channel(self, target: str, options: list[tuple[str, Any]]) -> grpc.Channel:
        if self._credentials is not None:
            return grpc.secure_channel(target, self._credentials, options=options)
        return grpc.insecure_channel(target, options=options)

    def _send(self, plan: _Plan[T]) -> T:
        if isinstance(plan, _Batch):
            return plan.combine([self._send_one(call) for call in plan.calls])
        return self._send_one(plan)

    def _send_one(self, call: _Call[T]) -> T:
        method = getattr(self._stubs[call.service], call.method)
        try:
            reply = method(call.request, timeout=call.timeout, metadata=self._metadata)
        except grpc.RpcError as exc:
            return call.failed(exc)
        return call.result(reply)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


class AsyncClient(_BaseClient[grpc.aio.Channel]):
    """asyncio twin of :class:`Client`: the same methods, awaited. Create it inside a running
    event loop; ``async with AsyncClient(...) as c:``."""

    def _open_channel(self, target: str, options: list[tuple[str, Any]]) -> grpc.aio.Channel:
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            # A grpc.aio channel made outside a loop binds to another loop and fails later.
            raise RuntimeError("AsyncClient must be created inside a running event loop (in "
                               "async code); use Client from blocking code") from None
        if self._credentials is not None:
            return grpc.aio.secure_channel(target, self._credentials, options=options)
        return grpc.aio.insecure_channel(target, options=options)

    async def _send(self, plan: _Plan[T]) -> T:
        if isinstance(plan, _Batch):
            return plan.combine([await self._send_one(call) for call in plan.calls])
        return await self._send_one(plan)

    async def _send_one(self, call: _Call[T]) -> T:
        method = getattr(self._stubs[call.service], call.method)
        try:
            reply = await method(call.request, timeout=call.timeout, metadata=self._metadata)
        except grpc.RpcError as exc:
            return call.failed(exc)
        return call.result(reply)

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()
