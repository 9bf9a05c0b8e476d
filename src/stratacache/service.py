"""gRPC servicers and the server: decode, convert protobuf to engine dataclasses, call, convert
back.

Every RPC of both services runs through one wrapper (:func:`_unary`), built from the service
descriptors so no method is listed twice:

- it decodes the request itself: grpc.aio runs a method's request deserializer outside the
  handler, so a request that fails to decode (truncated bytes, invalid UTF-8 in a string) would
  come back UNKNOWN with a traceback in the log; here it is INVALID_ARGUMENT with one log line;
- engine errors map to status codes in one table (``_STATUS``), each with one log line
  (method, status, message) and the engine's message, written for a person;
- only unexpected exceptions are logged with a traceback; the client gets INTERNAL, never one.

Health (``grpc.health.v1``) and server reflection are registered so grpcurl and load balancers
work out of the box.
"""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from google.protobuf import message_factory
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor
from google.protobuf.message import DecodeError, Message
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from . import errors
from .config import Settings
from .engine import Engine
from .messages import LookupRequest, StageStats, Stats, StoreRequest, TierStats
from .policy import Policy, PolicyStatus
from .v1 import stratacache_pb2 as pb

log = logging.getLogger(__name__)

_STATUS: dict[type[errors.CacheError], grpc.StatusCode] = {
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.Overloaded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.StorageFull: grpc.StatusCode.FAILED_PRECONDITION,
    errors.StorageFailed: grpc.StatusCode.INTERNAL,
    errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
}
#: Statuses that are the caller's to fix, or a normal shutdown: logged at INFO. The others say
#: the server is short of something or failing, and are logged at WARNING.
_CALLER_STATUSES = frozenset({grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
                              grpc.StatusCode.UNAVAILABLE})
#: Seconds between log lines about one method's RESOURCE_EXHAUSTED refusals.
REFUSAL_LOG_INTERVAL_S = 1.0

SERVICES = (pb.DESCRIPTOR.services_by_name["SemanticCache"],
            pb.DESCRIPTOR.services_by_name["CacheAdmin"])
SERVICE_NAMES = tuple(service.full_name for service in SERVICES)

_Behaviour = Callable[[Any, grpc.aio.ServicerContext], Awaitable[Message]]


def status_of(error: errors.CacheError) -> grpc.StatusCode:
    """The status code an engine error is reported with (INTERNAL for one the table lacks)."""
    for cls in type(error).__mro__:
        if cls in _STATUS:
            return _STATUS[cls]
    return grpc.StatusCode.INTERNAL


async def _abort(context: grpc.aio.ServicerContext, method: str, code: grpc.StatusCode,
                 message: str, *, logged: bool = True) -> None:
    if logged:
        log.log(logging.INFO if code in _CALLER_STATUSES else logging.WARNING, "%s -> %s: %s",
                method, code.name, message)
    await context.abort(code, message)


class _Refusals:
    """Counts one method's RESOURCE_EXHAUSTED refusals and says when to log them: at once, then
    at most once per REFUSAL_LOG_INTERVAL_S with how many there were (an overload refuses
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


def _unary(method: MethodDescriptor, behaviour: _Behaviour,
           ) -> Callable[[bytes, grpc.aio.ServicerContext], Awaitable[Message]]:
    """The handler of one unary RPC: decode, run ``behaviour``, map its errors (module doc)."""
    request_type = message_factory.GetMessageClass(method.input_type)
    refusals = _Refusals()

    async def handle(raw: bytes, context: grpc.aio.ServicerContext) -> Message:
        request = request_type()
        try:
            request.ParseFromString(raw)
        except DecodeError as exc:
            await _abort(context, method.name, grpc.StatusCode.INVALID_ARGUMENT,
                         f"request could not be decoded as {method.input_type.full_name}: {exc}; "
                         "send a message built from stratacache.proto (strings must be UTF-8)")
        try:
            return await behaviour(request, context)
        except errors.CacheError as exc:
            code = status_of(exc)
            if code is grpc.StatusCode.RESOURCE_EXHAUSTED and (count := refusals.refused()):
                log.info("%s -> RESOURCE_EXHAUSTED (%d calls since the last line): %s",
                         method.name, count, exc)
            await _abort(context, method.name, code, str(exc),
                         logged=code is not grpc.StatusCode.RESOURCE_EXHAUSTED)
        except grpc.aio.AbortError:  # the behaviour aborted the call itself: already answered
            raise
        except Exception:
            log.exception("%s failed unexpectedly", method.name)
            await context.abort(grpc.StatusCode.INTERNAL, "internal error: the server logged "
                                "it; nothing was changed by this call")
        raise AssertionError("unreachable")  # context.abort always raises

    return handle


def _add_service(server: grpc.aio.Server, service: ServiceDescriptor, servicer: object) -> None:
    """Registers each RPC of ``service`` with the servicer's method of the same name. Requests
    arrive as bytes (no deserializer) and are decoded by :func:`_unary`."""
    handlers = {}
    for method in service.methods:
        if method.client_streaming or method.server_streaming:
            raise TypeError(f"{method.full_name} streams; only unary RPCs are served")
        handlers[method.name] = grpc.unary_unary_rpc_method_handler(
            _unary(method, getattr(servicer, method.name)), request_deserializer=None,
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
                     context: grpc.aio.ServicerContext) -> pb.LookupResponse:
        result = await self._engine.lookup(LookupRequest(
            prompt=request.prompt, namespace=request.namespace, scope=dict(request.scope),
            template_id=_opt(request, "template_id"),  # type: ignore[arg-type]
            template_version=_opt(request, "template_version"),  # type: ignore[arg-type]
            min_similarity=_opt(request, "min_similarity"),  # type: ignore[arg-type]
            deadline=_deadline(context)))
        return pb.LookupResponse(
            hit=result.hit, response=result.response, similarity=result.similarity,
            matched_prompt=result.matched_prompt, entry_id=result.entry_id,
            tier=int(result.tier) if result.tier is not None else pb.TIER_UNSPECIFIED,
            age_s=result.age_s, best_similarity=result.best_similarity,
            server_time_us=result.server_time_us, verifier_score=result.verifier_score,
            miss_reason=0 if result.miss_reason is None else int(result.miss_reason),
            metadata=dict(result.metadata))

    async def Store(self, request: pb.StoreRequest,
                    context: grpc.aio.ServicerContext) -> pb.StoreResponse:
        result = await self._engine.store(StoreRequest(
            prompt=request.prompt, response=request.response, namespace=request.namespace,
            scope=dict(request.scope),
            template_id=_opt(request, "template_id"),  # type: ignore[arg-type]
            template_version=_opt(request, "template_version"),  # type: ignore[arg-type]
            ttl_s=_opt(request, "ttl_s"),  # type: ignore[arg-type]
            user_id=_opt(request, "user_id"),  # type: ignore[arg-type]
            metadata=dict(request.metadata), deadline=_deadline(context)))
        return pb.StoreResponse(entry_id=result.entry_id, replaced=result.replaced)

    async def Feedback(self, request: pb.FeedbackRequest,
                       context: grpc.aio.ServicerContext) -> pb.FeedbackResponse:
        deleted, status = await self._engine.feedback(
            request.namespace, request.entry_id, request.prompt, request.correct)
        return pb.FeedbackResponse(entry_deleted=deleted, policy=policy_to_proto(status))


class CacheAdminServicer:
    """The admin RPCs (``stratacache.v1.CacheAdmin``); errors map in :func:`_unary`."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    async def InvalidateTemplate(self, request: pb.InvalidateTemplateRequest,
                                 context: grpc.aio.ServicerContext) -> pb.InvalidateResponse:
        version: str | None = _opt(request, "version")  # type: ignore[assignment]
        return pb.InvalidateResponse(removed=await self._engine.invalidate_template(
            request.namespace, request.template_id, version))

    async def InvalidateNamespace(self, request: pb.InvalidateNamespaceRequest,
                                  context: grpc.aio.ServicerContext) -> pb.InvalidateResponse:
        return pb.InvalidateResponse(
            removed=await self._engine.invalidate_namespace(request.namespace))

    async def DeleteEntry(self, request: pb.DeleteEntryRequest,
                          context: grpc.aio.ServicerContext) -> pb.InvalidateResponse:
        return pb.InvalidateResponse(removed=await self._engine.delete_entry(request.entry_id))

    async def DeleteUser(self, request: pb.DeleteUserRequest,
                         context: grpc.aio.ServicerContext) -> pb.InvalidateResponse:
        return pb.InvalidateResponse(removed=await self._engine.delete_user(
            request.user_id, _opt(request, "namespace")))  # type: ignore[arg-type]

    async def Stats(self, request: pb.StatsRequest,
                    context: grpc.aio.ServicerContext) -> pb.StatsResponse:
        return stats_to_proto(await self._engine.stats())

    async def SetPolicy(self, request: pb.SetPolicyRequest,
                        context: grpc.aio.ServicerContext) -> pb.PolicyStatus:
        policy = Policy(max_wrong_rate=_opt(request, "max_wrong_rate"),  # type: ignore[arg-type]
                        min_similarity=_opt(request, "min_similarity"),  # type: ignore[arg-type]
                        verify=_opt(request, "verify"))  # type: ignore[arg-type]
        return policy_to_proto(await self._engine.set_policy(
            request.namespace, policy, clear_evidence=request.clear_evidence))

    async def GetPolicy(self, request: pb.GetPolicyRequest,
                        context: grpc.aio.ServicerContext) -> pb.PolicyStatus:
        return policy_to_proto(await self._engine.policy_status(request.namespace))

    async def AddEvidence(self, request: pb.AddEvidenceRequest,
                          context: grpc.aio.ServicerContext) -> pb.AddEvidenceResponse:
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
        loop_lag=stage(stats.loop_lag),
        namespaces={ns: pb.NamespaceStats(evidence=n.evidence,
                                          feedback_correct=n.feedback_correct,
                                          feedback_wrong=n.feedback_wrong,
                                          vetoed_entries=n.vetoed_entries)
                    for ns, n in stats.namespaces.items()})


class _ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    """Rejects calls without ``authorization: Bearer <key>``. Health checks and reflection (the
    API's schema, no data) stay open, so load balancers and grpcurl need no key."""

    _OPEN = ("/grpc.health.v1.Health/", "/grpc.reflection.")

    def __init__(self, api_key: str) -> None:
        self._expected = f"Bearer {api_key}".encode()

        async def deny(request: object, context: grpc.aio.ServicerContext) -> None:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                                "missing or wrong API key: send metadata "
                                "'authorization: Bearer <key>' (Client(api_key=...))")

        self._deny = grpc.unary_unary_rpc_method_handler(deny)

    async def intercept_service(self, continuation, handler_call_details):  # type: ignore[no-untyped-def]
        method = handler_call_details.method
        if method.startswith(self._OPEN):
            return await continuation(handler_call_details)
        given = dict(handler_call_details.invocation_metadata or ()).get("authorization", "")
        given = given.encode() if isinstance(given, str) else given
        if hmac.compare_digest(given, self._expected):
            return await continuation(handler_call_details)
        return self._deny


class CacheServer:
    """A grpc.aio server around one engine: serving, health, reflection, graceful stop."""

    def __init__(self, engine: Engine, settings: Settings) -> None:
        self.engine = engine
        self._settings = settings
        interceptors = ([_ApiKeyInterceptor(settings.api_key)] if settings.api_key is not None
                        else [])
        options = [("grpc.max_receive_message_length", settings.max_message_bytes),
                   ("grpc.max_send_message_length", settings.max_message_bytes),
                   ("grpc.so_reuseport", 0)]
        self._server = grpc.aio.server(interceptors=interceptors, options=options,
                                       maximum_concurrent_rpcs=settings.max_concurrent_rpcs)
        for service, servicer in zip(SERVICES, (SemanticCacheServicer(engine),
                                                 CacheAdminServicer(engine))):
            _add_service(self._server, service, servicer)
        self._health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
        reflection.enable_server_reflection(
            SERVICE_NAMES + (health.SERVICE_NAME, reflection.SERVICE_NAME), self._server)
        self.port = self._server.add_insecure_port(f"{settings.host}:{settings.port}")
        if self.port == 0:
            raise OSError(f"cannot listen on {settings.host}:{settings.port}: the address is in "
                          "use or not local (pick another --port/--host)")

    async def start(self) -> None:
        await self._server.start()
        for name in SERVICE_NAMES + ("",):
            await self._health.set(name, health_pb2.HealthCheckResponse.SERVING)

    async def stop(self, grace_s: float | None = None) -> None:
        """NOT_SERVING, let in-flight calls finish for up to ``grace_s``, then flush the tiers."""
        grace = self._settings.shutdown_grace_s if grace_s is None else grace_s
        await self._health.enter_graceful_shutdown()
        await self._server.stop(grace)
        await self.engine.close()

    async def wait(self) -> None:
        await self._server.wait_for_termination()

