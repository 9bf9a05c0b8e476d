"""gRPC servicers and the server: decode, convert protobuf to engine dataclasses, call, convert
back.

Every RPC of both services runs through one wrapper (:func:`_unary`), built from the service
descriptors so no method is listed twice. In order, it:

1. authenticates the call's key (``access``): none or a wrong one is UNAUTHENTICATED;
2. decodes the request itself: grpc.aio runs a method's request deserializer outside the
   handler, so a request that fails to decode (truncated bytes, invalid UTF-8 in a string) would
   come back UNKNOWN with a traceback in the log; here it is INVALID_ARGUMENT with one log line;
3. authorizes it: the role the method needs (:data:`_CALL_ROLES`; ``admin`` for every CacheAdmin
   method) and the namespace the request names are the key's, or PERMISSION_DENIED;
4. applies the rate limits of Lookup and Store (``ratelimit``): RESOURCE_EXHAUSTED at once, with
   ``retry-after-ms`` in the trailing metadata;
5. runs the servicer's method, which gets the :class:`~stratacache.access.Caller` to narrow
   what a scoped key sees (Stats, DeleteEntry).

Around all of it every call has a request id (``x-request-id`` from the caller, else a new one;
sent back in the trailing metadata, and on each log line written during the call), a span when
tracing is on (``tracing``), one access-log line when it ends (``logs``), and a count by final
status in the metrics (``stratacache_calls_total``).

Errors map to status codes in one table (``_STATUS``), each with one log line (method, status,
message) and a message written for a person; floods of UNAUTHENTICATED and RESOURCE_EXHAUSTED
are logged at most once a second. Only unexpected exceptions are logged with a traceback; the
client gets INTERNAL, never one. Servicer methods raise ``CacheError``s and never abort a call
themselves, so the wrapper knows every call's final status.

Health (``grpc.health.v1``) and server reflection are registered, open without a key (the API's
schema, no data), so grpcurl and load balancers work out of the box. Besides the server ("") and
its two services, health reports ``stratacache.writes``: NOT_SERVING while Stores and admin
changes cannot succeed (a ``--shared-store`` that is unreachable) though lookups still answer.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import message_factory
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor
from google.protobuf.message import DecodeError, Message
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from . import errors, logs, tls, tracing, validation
from .access import Caller, KeyStore, PermissionDenied, Unauthenticated
from .config import Settings, is_loopback
from .engine import Engine
from .metrics import (HIT_RESULTS, MISS_RESULTS, OTHER, Metrics, MetricsServer,
                      serve_metrics)
from .messages import AnswerCost, LookupRequest, StageStats, Stats, StoreRequest, TierStats
from .policy import Policy, PolicyStatus
from .ratelimit import RETRY_AFTER_METADATA, RateLimited, RateLimiter, Subject
from .v1 import stratacache_pb2 as pb

log = logging.getLogger(__name__)

_STATUS: dict[type[errors.CacheError], grpc.StatusCode] = {
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.Overloaded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.StorageFull: grpc.StatusCode.FAILED_PRECONDITION,
    errors.StorageFailed: grpc.StatusCode.INTERNAL,
    errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
    Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
}
#: Statuses that are the caller's to fix, or a normal shutdown: logged at INFO. The others say
#: the server is short of something or failing, and are logged at WARNING.
_CALLER_STATUSES = frozenset({grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
                              grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNAUTHENTICATED,
                              grpc.StatusCode.PERMISSION_DENIED})
#: Statuses that come in floods (an overload, a limit, a scan for keys): logged at most once per
#: REFUSAL_LOG_INTERVAL_S per method, with how many there were.
_FLOOD_STATUSES = (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAUTHENTICATED)
#: Seconds between log lines about one method's refusals of one _FLOOD_STATUSES status.
REFUSAL_LOG_INTERVAL_S = 1.0
#: The role each SemanticCache method needs (``access.ROLES``); every CacheAdmin method needs
#: "admin". The rate limits of a role ("lookup", "store") apply to its method.
_CALL_ROLES = {"Lookup": "lookup", "Store": "store", "Feedback": "feedback"}
_ADMIN_SERVICE = "CacheAdmin"
#: Calls that refuse an empty namespace rather than take it as "default" (they destroy).
_EXPLICIT_NAMESPACE = frozenset({"InvalidateNamespace", "InvalidateTemplate", "DeleteUser"})

SERVICES = (pb.DESCRIPTOR.services_by_name["SemanticCache"],
            pb.DESCRIPTOR.services_by_name[_ADMIN_SERVICE])
SERVICE_NAMES = tuple(service.full_name for service in SERVICES)
#: The health service name whose status says whether writes can succeed now.
WRITES_HEALTH = "stratacache.writes"

_Behaviour = Callable[[Any, grpc.aio.ServicerContext, Caller], Awaitable[Message]]


def status_of(error: errors.CacheError) -> grpc.StatusCode:
    """The status code an engine error is reported with (INTERNAL for one the table lacks)."""
    for cls in type(error).__mro__:
        if cls in _STATUS:
            return _STATUS[cls]
    return grpc.StatusCode.INTERNAL


class _Refusals:
    """Counts one method's refusals of one status and says when to log them: at once, then at
    most once per REFUSAL_LOG_INTERVAL_S with how many there were (an overload refuses
    thousands of calls a second; a line each would spend the CPU the overload lacks)."""

    def __init__(self) -> None:
        self._last = -REFUSAL_LOG_INTERVAL_S
        self._since = 0

    def refused(self) -> int:
        """Counts a refusal; returns how many to report now (0: not yet)."""
        self._since += 1
        now = time.monotonic()
        if now - self._last < REFUSAL_LOG_INTERVAL_S:
            return 0
        self._last, count, self._since = now, self._since, 0
        return count


def _role(service: ServiceDescriptor, method: MethodDescriptor) -> str:
    if service.name == _ADMIN_SERVICE:
        return "admin"
    if method.name not in _CALL_ROLES:
        raise TypeError(f"{method.full_name} needs a role: add it to service._CALL_ROLES")
    return _CALL_ROLES[method.name]


@dataclass(frozen=True)
class _Layer:
    """What every call of one server passes through besides its servicer method."""

    keys: KeyStore
    limiter: RateLimiter
    metrics: Metrics
    requests: logs.RequestLog


def _unary(service: ServiceDescriptor, method: MethodDescriptor, behaviour: _Behaviour,
           layer: _Layer) -> Callable[[bytes, grpc.aio.ServicerContext], Awaitable[Message]]:
    """The handler of one unary RPC: authenticate, decode, authorize, rate-limit, run
    ``behaviour``, map its errors; log, trace and count it (module doc)."""
    keys, limiter, metrics = layer.keys, layer.limiter, layer.metrics
    request_type = message_factory.GetMessageClass(method.input_type)
    role = _role(service, method)
    limited = limiter.limits(role)
    namespace_field = method.input_type.fields_by_name.get("namespace")
    # DeleteUser's namespace is optional: absent means every namespace.
    every_if_absent = namespace_field is not None and namespace_field.has_presence
    # Store's and Lookup's optional user id (the per-user limit's user; DeleteUser's is a target)
    user_field = method.input_type.fields_by_name.get("user_id")
    has_user_id = user_field is not None and user_field.has_presence
    refusals = {code: _Refusals() for code in _FLOOD_STATUSES}

    def namespace_of(request: Any) -> str | None:
        if every_if_absent and not request.HasField("namespace"):
            return None
        # The engine's own rule ("" is "default", but destructive calls must name one;
        # INVALID_ARGUMENT if malformed), so the namespace authorized and limited is the one
        # the call will use, and an empty one gets the engine's message, not a denial.
        if method.name in _EXPLICIT_NAMESPACE:
            return validation.explicit_namespace(request.namespace, method.name)
        return validation.namespace(request.namespace)

    async def handle(raw: bytes, context: grpc.aio.ServicerContext) -> Message:
        namespace: str | None = None
        call = layer.requests.begin(method.name, context.invocation_metadata(),
                                    service=service.full_name)
        context.set_trailing_metadata(((logs.REQUEST_ID_KEY, call.request_id),))
        settled = False

        def settle(code: grpc.StatusCode) -> None:
            """Counts the call and writes its access line, once. Before the status is sent:
            ``context.abort`` sends it before it raises, and a client that has its answer must
            find the call in the log and the metrics."""
            nonlocal settled
            if not settled:
                settled = True
                metrics.call_finished(method.name, code.name)
                call.finish(code.name)

        try:
            caller = keys.authenticate(_authorization(context) if keys.required else None)
            request = request_type()
            try:
                request.ParseFromString(raw)
            except DecodeError as exc:
                raise errors.InvalidArgument(
                    f"request could not be decoded as {method.input_type.full_name}: {exc}; "
                    "send a message built from stratacache.proto (strings must be UTF-8)"
                    ) from None
            caller.check_role(method.name, role)
            if namespace_field is not None:
                namespace = namespace_of(request)
                call.note(namespace=namespace)
                caller.check_namespace(method.name, namespace)
            user_id = (validation.user_id(request.user_id)
                       if has_user_id and request.HasField("user_id") else None)
            if limited:
                assert namespace is not None  # Lookup and Store always name one
                limiter.check(role, namespace=namespace, user=Subject.of(
                    user_id=user_id, key_name=caller.name,
                    peer="" if user_id or caller.name else context.peer()))
            reply = await behaviour(request, context, caller)
            settle(grpc.StatusCode.OK)
            return reply
        except errors.CacheError as exc:
            code = status_of(exc)
            trailing: tuple[tuple[str, str], ...] = ()
            if isinstance(exc, RateLimited):
                metrics.rate_limited(method.name, exc.limit)
                trailing = ((RETRY_AFTER_METADATA, str(exc.retry_after_ms)),)
            if code in refusals:
                if count := refusals[code].refused():
                    log.info("%s -> %s (%d calls since the last line): %s", method.name,
                             code.name, count, exc)
            else:
                log.log(logging.INFO if code in _CALLER_STATUSES else logging.WARNING,
                        "%s -> %s: %s", method.name, code.name, exc)
            settle(code)
            # Keep trailing metadata set earlier in the call: abort's own replaces it.
            await context.abort(code, str(exc),
                                trailing_metadata=(*(context.trailing_metadata() or ()), *trailing))
        except asyncio.CancelledError:  # the client went away, or the deadline passed
            remaining = context.time_remaining()
            settle(grpc.StatusCode.DEADLINE_EXCEEDED if remaining is not None and remaining <= 0
                   else grpc.StatusCode.CANCELLED)
            raise
        except Exception:
            log.exception("%s failed unexpectedly", method.name)
            settle(grpc.StatusCode.INTERNAL)
            await context.abort(grpc.StatusCode.INTERNAL, "internal error: the server logged "
                                "it; nothing was changed by this call")
        finally:  # anything that left without settling (none should): still counted and logged
            settle(grpc.StatusCode.UNKNOWN)
        raise AssertionError("unreachable")  # context.abort always raises

    return handle


def _authorization(context: grpc.aio.ServicerContext) -> str | bytes | None:
    for key, value in context.invocation_metadata() or ():
        if key == "authorization":
            return value  # type: ignore[no-any-return]
    return None


def _add_service(server: grpc.aio.Server, service: ServiceDescriptor, servicer: object,
                 layer: _Layer) -> None:
    """Registers each RPC of ``service`` with the servicer's method of the same name. Requests
    arrive as bytes (no deserializer) and are decoded by :func:`_unary`."""
    handlers = {}
    for method in service.methods:
        if method.client_streaming or method.server_streaming:
            raise TypeError(f"{method.full_name} streams; only unary RPCs are served")
        handlers[method.name] = grpc.unary_unary_rpc_method_handler(
            _unary(service, method, getattr(servicer, method.name), layer),
            request_deserializer=None,
            response_serializer=message_factory.GetMessageClass(
                method.output_type).SerializeToString)
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(service.full_name, handlers),))
    server.add_registered_method_handlers(service.full_name, handlers)


def _opt(message: object, name: str) -> object:
    return getattr(message, name) if message.HasField(name) else None  # type: ignore[attr-defined]


def _deadline(context: grpc.aio.ServicerContext) -> float | None:
    """The call's deadline as a ``time.monotonic()`` instant, or None when it has none."""
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


class SemanticCacheServicer:
    """The gateway's RPCs (``stratacache.v1.SemanticCache``); errors map in :func:`_unary`."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    async def Lookup(self, request: pb.LookupRequest,
                     context: grpc.aio.ServicerContext, caller: Caller) -> pb.LookupResponse:
        result = await self._engine.lookup(LookupRequest(
            prompt=request.prompt, namespace=request.namespace, scope=dict(request.scope),
            template_id=_opt(request, "template_id"),  # type: ignore[arg-type]
            template_version=_opt(request, "template_version"),  # type: ignore[arg-type]
            min_similarity=_opt(request, "min_similarity"),  # type: ignore[arg-type]
            deadline=_deadline(context)))
        logs.note(outcome=(HIT_RESULTS[result.tier] if result.tier is not None
                           else MISS_RESULTS[result.miss_reason] if result.miss_reason is not None
                           else "miss"),
                  tier=None if result.tier is None else HIT_RESULTS[result.tier],
                  similarity=result.similarity if result.hit else result.best_similarity,
                  prompt=request.prompt, response=result.response if result.hit else None)
        return pb.LookupResponse(
            hit=result.hit, response=result.response, similarity=result.similarity,
            matched_prompt=result.matched_prompt, entry_id=result.entry_id,
            tier=int(result.tier) if result.tier is not None else pb.TIER_UNSPECIFIED,
            age_s=result.age_s, best_similarity=result.best_similarity,
            server_time_us=result.server_time_us, verifier_score=result.verifier_score,
            miss_reason=0 if result.miss_reason is None else int(result.miss_reason),
            metadata=dict(result.metadata))

    async def Store(self, request: pb.StoreRequest,
                    context: grpc.aio.ServicerContext, caller: Caller) -> pb.StoreResponse:
        cost = request.cost if request.HasField("cost") else None
        result = await self._engine.store(StoreRequest(
            prompt=request.prompt, response=request.response, namespace=request.namespace,
            scope=dict(request.scope),
            template_id=_opt(request, "template_id"),  # type: ignore[arg-type]
            template_version=_opt(request, "template_version"),  # type: ignore[arg-type]
            ttl_s=_opt(request, "ttl_s"),  # type: ignore[arg-type]
            user_id=_opt(request, "user_id"),  # type: ignore[arg-type]
            metadata=dict(request.metadata), deadline=_deadline(context),
            cost=None if cost is None else AnswerCost(
                model=_opt(cost, "model"),  # type: ignore[arg-type]
                prompt_tokens=_opt(cost, "prompt_tokens"),  # type: ignore[arg-type]
                completion_tokens=_opt(cost, "completion_tokens"),  # type: ignore[arg-type]
                latency_s=_opt(cost, "latency_s"))))  # type: ignore[arg-type]
        logs.note(outcome="replaced" if result.replaced else "stored", prompt=request.prompt,
                  response=request.response)
        return pb.StoreResponse(entry_id=result.entry_id, replaced=result.replaced)

    async def Feedback(self, request: pb.FeedbackRequest,
                       context: grpc.aio.ServicerContext, caller: Caller) -> pb.FeedbackResponse:
        deleted, status = await self._engine.feedback(
            request.namespace, request.entry_id, request.prompt, request.correct)
        return pb.FeedbackResponse(entry_deleted=deleted, policy=policy_to_proto(status))


class CacheAdminServicer:
    """The admin RPCs (``stratacache.v1.CacheAdmin``); errors map in :func:`_unary`."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    async def InvalidateTemplate(self, request: pb.InvalidateTemplateRequest,
                                 context: grpc.aio.ServicerContext,
                                 caller: Caller) -> pb.InvalidateResponse:
        version: str | None = _opt(request, "version")  # type: ignore[assignment]
        return pb.InvalidateResponse(removed=await self._engine.invalidate_template(
            request.namespace, request.template_id, version))

    async def InvalidateNamespace(self, request: pb.InvalidateNamespaceRequest,
                                  context: grpc.aio.ServicerContext,
                                  caller: Caller) -> pb.InvalidateResponse:
        return pb.InvalidateResponse(
            removed=await self._engine.invalidate_namespace(request.namespace))

    async def DeleteEntry(self, request: pb.DeleteEntryRequest,
                          context: grpc.aio.ServicerContext,
                          caller: Caller) -> pb.InvalidateResponse:
        # A scoped key removes only entries of its namespaces; another answers as not found.
        within = None if caller.every_namespace else caller.may_use
        return pb.InvalidateResponse(removed=await self._engine.delete_entry(
            request.entry_id, within=within))

    async def DeleteUser(self, request: pb.DeleteUserRequest,
                         context: grpc.aio.ServicerContext,
                         caller: Caller) -> pb.InvalidateResponse:
        return pb.InvalidateResponse(removed=await self._engine.delete_user(
            request.user_id, _opt(request, "namespace")))  # type: ignore[arg-type]

    async def Stats(self, request: pb.StatsRequest,
                    context: grpc.aio.ServicerContext, caller: Caller) -> pb.StatsResponse:
        return scoped_stats(stats_to_proto(await self._engine.stats()), caller)

    async def SetPolicy(self, request: pb.SetPolicyRequest,
                        context: grpc.aio.ServicerContext, caller: Caller) -> pb.PolicyStatus:
        policy = Policy(max_wrong_rate=_opt(request, "max_wrong_rate"),  # type: ignore[arg-type]
                        min_similarity=_opt(request, "min_similarity"),  # type: ignore[arg-type]
                        verify=_opt(request, "verify"))  # type: ignore[arg-type]
        return policy_to_proto(await self._engine.set_policy(
            request.namespace, policy, clear_evidence=request.clear_evidence))

    async def GetPolicy(self, request: pb.GetPolicyRequest,
                        context: grpc.aio.ServicerContext, caller: Caller) -> pb.PolicyStatus:
        return policy_to_proto(await self._engine.policy_status(request.namespace))

    async def AddEvidence(self, request: pb.AddEvidenceRequest,
                          context: grpc.aio.ServicerContext,
                          caller: Caller) -> pb.AddEvidenceResponse:
        added, skipped, status = await self._engine.add_evidence(
            request.namespace, [(p.a, p.b, p.duplicate) for p in request.pairs])
        return pb.AddEvidenceResponse(added=added, skipped=skipped, policy=policy_to_proto(status))


def policy_to_proto(status: PolicyStatus) -> pb.PolicyStatus:
    p, rule, cal = status.policy, status.rule, status.rule.calibration
    return pb.PolicyStatus(
        namespace=status.namespace, max_wrong_rate=p.max_wrong_rate,
        min_similarity=p.min_similarity, verify=p.verify, verifier_on=rule.verify, gate=rule.gate,
        threshold=rule.threshold, bound=rule.bound,
        evidence=status.evidence, evidence_correct=status.evidence_correct,
        served=0 if cal is None else cal.served, wrong=0 if cal is None else cal.wrong,
        promised_bound=None if cal is None else cal.promised_bound,
        hit_rate=0.0 if cal is None else cal.hit_rate, needed=0 if cal is None else cal.needed,
        feedback_correct=status.feedback_correct, feedback_wrong=status.feedback_wrong,
        vetoed_entries=status.vetoed_entries, message=status.message,
        threshold_source=status.threshold_source)


def stats_to_proto(stats: Stats) -> pb.StatsResponse:
    def tier(t: TierStats) -> pb.TierStats:
        return pb.TierStats(entries=t.entries, bytes=t.bytes, capacity=t.capacity, hits=t.hits,
                            demotions=t.demotions, promotions=t.promotions)

    def stage(s: StageStats) -> pb.StageStats:
        return pb.StageStats(count=s.count, p50_ms=s.p50_ms, p99_ms=s.p99_ms, max_ms=s.max_ms)

    return pb.StatsResponse(
        model=stats.model, dimension=stats.dimension, device=stats.device,
        default_min_similarity=stats.default_min_similarity, lookups=stats.lookups,
        hits=stats.hits, misses=stats.misses, stores=stats.stores, expired=stats.expired,
        invalidated=stats.invalidated, exact=tier(stats.exact), hot=tier(stats.hot),
        warm=tier(stats.warm), cold=tier(stats.cold), embed_batches=stats.embed_batches,
        embed_texts=stats.embed_texts, rejected_overload=stats.rejected_overload,
        stages={name: stage(s) for name, s in stats.stages.items()}, uptime_s=stats.uptime_s,
        simd_isa=stats.simd_isa, verifier=stats.verifier, verify_batches=stats.verify_batches,
        verify_pairs=stats.verify_pairs, shed_deadline=stats.shed_deadline,
        model_restarts=stats.model_restarts, storage_errors=stats.storage_errors,
        damaged_records=stats.damaged_records, erased_records=stats.erased_records,
        loop_lag=stage(stats.loop_lag), saved_dollars=stats.saved_dollars,
        saved_prompt_tokens=stats.saved_prompt_tokens,
        saved_completion_tokens=stats.saved_completion_tokens,
        saved_model_seconds=stats.saved_model_seconds,
        namespaces={ns: pb.NamespaceStats(
            evidence=n.evidence, feedback_correct=n.feedback_correct,
            feedback_wrong=n.feedback_wrong, vetoed_entries=n.vetoed_entries, lookups=n.lookups,
            hits=n.hits, stores=n.stores, saved_dollars=n.saved_dollars,
            saved_prompt_tokens=n.saved_prompt_tokens,
            saved_completion_tokens=n.saved_completion_tokens,
            saved_model_seconds=n.saved_model_seconds, unpriced_hits=n.unpriced_hits)
            for ns, n in stats.namespaces.items()})


#: StatsResponse fields a scoped key sees as they are: what the server is, not what was done on it.
_SERVER_FIELDS = frozenset({"model", "dimension", "device", "default_min_similarity", "uptime_s",
                            "simd_isa", "verifier"})


def scoped_stats(reply: pb.StatsResponse, caller: Caller) -> pb.StatsResponse:
    """Stats as ``caller``'s key may see them (narrowed in place).

    A key that covers every namespace sees everything. A scoped key (one without ``"*"``) sees
    ``namespaces`` narrowed to the namespaces it covers, and of the other fields only those
    that describe the server (:data:`_SERVER_FIELDS`: model, dimension, device, default
    similarity, uptime, SIMD ISA, verifier). Every other field is cleared (zero): the
    server-wide lookups, hits, misses, stores and saved_* totals, tier sizes and hits, stage and
    batch counts all add up every tenant's traffic, and would let one tenant watch another's. A
    field added to StatsResponse later is cleared for scoped keys too, until listed there.
    """
    if caller.every_namespace:
        return reply
    for field in reply.DESCRIPTOR.fields:
        if field.name == "namespaces":
            # The pool of namespaces past the metrics cap mixes tenants: never for a scoped key.
            for namespace in [n for n in reply.namespaces
                              if n == OTHER or not caller.may_use(n)]:
                del reply.namespaces[namespace]
        elif field.name not in _SERVER_FIELDS:
            reply.ClearField(field.name)
    return reply


class CacheServer:
    """A grpc.aio server around one engine: serving, health, reflection, graceful stop.

    Attributes:
        keys: the server's API keys; ``keys.reload()`` reads the keys file again (on SIGHUP).
        limiter: its rate limits.

    Raises:
        KeysFileError: the keys file does not load.
        ImportError: --otlp-endpoint without the ``otel`` extra installed.
    """

    def __init__(self, engine: Engine, settings: Settings) -> None:
        self.engine = engine
        self._settings = settings
        self.keys = KeyStore.from_settings(settings)
        self.limiter = RateLimiter.from_settings(settings)
        self._tracer = (tracing.Tracer.from_endpoint(settings.otlp_endpoint)
                        if settings.otlp_endpoint else None)
        layer = _Layer(self.keys, self.limiter, engine.metrics,
                       logs.RequestLog(log_prompts=settings.log_prompts, tracer=self._tracer))
        self.metrics_server: MetricsServer | None = None
        options = [("grpc.max_receive_message_length", settings.max_message_bytes),
                   ("grpc.max_send_message_length", settings.max_message_bytes),
                   ("grpc.so_reuseport", 0)]
        self._server = grpc.aio.server(options=options,
                                       maximum_concurrent_rpcs=settings.max_concurrent_rpcs)
        for service, servicer in zip(SERVICES, (SemanticCacheServicer(engine),
                                                 CacheAdminServicer(engine))):
            _add_service(self._server, service, servicer, layer)
        self._health = health.aio.HealthServicer()
        self._health_updates: set[asyncio.Task[None]] = set()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
        reflection.enable_server_reflection(
            SERVICE_NAMES + (health.SERVICE_NAME, reflection.SERVICE_NAME), self._server)
        self.port = tls.add_port(self._server, f"{settings.host}:{settings.port}", settings)
        if self.port == 0:
            raise OSError(f"cannot listen on {settings.host}:{settings.port}: the address is in "
                          "use or not local (pick another --port/--host)")

    async def start(self) -> None:
        """Serves gRPC, and /metrics when --metrics-port is set.

        Raises:
            OSError: the metrics address cannot be bound (the message names --metrics-port).
        """
        settings = self._settings
        if settings.metrics_port:
            self.metrics_server = serve_metrics(self.engine.metrics.registry,
                                                settings.metrics_host, settings.metrics_port)
            if not is_loopback(settings.metrics_host):
                log.warning("/metrics listens on %s:%d without a key or TLS, and names every "
                            "namespace with its traffic and savings: let only your Prometheus "
                            "reach it (firewall, or --metrics-host 127.0.0.1 behind a proxy)",
                            settings.metrics_host, settings.metrics_port)
        await self._server.start()
        for name in SERVICE_NAMES + ("",):
            await self._health.set(name, health_pb2.HealthCheckResponse.SERVING)
        shared = self.engine.shared
        if shared is not None and shared.feed is not None:
            shared.feed.on_connected.append(self._writes_changed)
        await self._set_writes(shared is None or shared.connected)

    def _writes_changed(self, writable: bool) -> None:
        task = asyncio.get_running_loop().create_task(self._set_writes(writable))
        self._health_updates.add(task)
        task.add_done_callback(self._health_updates.discard)

    async def _set_writes(self, writable: bool) -> None:
        status = health_pb2.HealthCheckResponse
        # The feed logs the loss and the return; this only tells load balancers.
        await self._health.set(WRITES_HEALTH, status.SERVING if writable else status.NOT_SERVING)

    async def stop(self, grace_s: float | None = None) -> None:
        """NOT_SERVING, let in-flight calls finish for up to ``grace_s``, then flush the tiers."""
        grace = self._settings.shutdown_grace_s if grace_s is None else grace_s
        await self._health.enter_graceful_shutdown()
        await self._server.stop(grace)
        if self.metrics_server is not None:
            self.metrics_server.close()
        if self._tracer is not None:  # flushes spans: may wait on the collector
            await asyncio.to_thread(self._tracer.shutdown)
        await self.engine.close()

    async def wait(self) -> None:
        await self._server.wait_for_termination()

