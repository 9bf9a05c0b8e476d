"""gRPC servicers and the server: convert protobuf to engine dataclasses, call, convert back.

Errors map to status codes in one table (``_STATUS``); the message is the engine's, written for
a person, and no traceback ever reaches a client. Health (``grpc.health.v1``) and server
reflection are registered so grpcurl and load balancers work out of the box.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from . import errors
from .config import Settings
from .engine import Engine
from .messages import LookupRequest, StageStats, Stats, StoreRequest, TierStats
from .policy import Policy, PolicyStatus
from .v1 import stratacache_pb2 as pb
from .v1 import stratacache_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

T = TypeVar("T")

_STATUS: dict[type[errors.CacheError], grpc.StatusCode] = {
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.Overloaded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.StorageFull: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
}

SERVICE_NAMES = (
    pb.DESCRIPTOR.services_by_name["SemanticCache"].full_name,
    pb.DESCRIPTOR.services_by_name["CacheAdmin"].full_name,
)


async def _call(context: grpc.aio.ServicerContext, work: Callable[[], Awaitable[T]]) -> T:
    """Runs ``work``; an engine error becomes its status code, anything else INTERNAL."""
    try:
        return await work()
    except errors.CacheError as exc:
        await context.abort(_STATUS.get(type(exc), grpc.StatusCode.INTERNAL), str(exc))
    except Exception:
        log.exception("unexpected error")
        await context.abort(grpc.StatusCode.INTERNAL,
                            "internal error: the server logged it; nothing was changed by this call")
    raise AssertionError("unreachable")  # context.abort always raises


def _opt(message: object, name: str) -> object:
    return getattr(message, name) if message.HasField(name) else None  # type: ignore[attr-defined]


class SemanticCacheServicer(pb_grpc.SemanticCacheServicer):
    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    async def Lookup(self, request: pb.LookupRequest,
                     context: grpc.aio.ServicerContext) -> pb.LookupResponse:
        query = LookupRequest(
            prompt=request.prompt, namespace=request.namespace, scope=dict(request.scope),
            template_id=_opt(request, "template_id"),
            template_version=_opt(request, "template_version"),
            min_similarity=_opt(request, "min_similarity"))
        result = await _call(context, lambda: self._engine.lookup(query))
        return pb.LookupResponse(
            hit=result.hit, response=result.response, similarity=result.similarity,
            matched_prompt=result.matched_prompt, entry_id=result.entry_id,
            tier=int(result.tier) if result.tier is not None else pb.TIER_UNSPECIFIED,
            age_s=result.age_s, best_similarity=result.best_similarity,
            server_time_us=result.server_time_us, verifier_score=result.verifier_score,
            miss_reason=0 if result.miss_reason is None else int(result.miss_reason))

    async def Store(self, request: pb.StoreRequest,
                    context: grpc.aio.ServicerContext) -> pb.StoreResponse:
        command = StoreRequest(
            prompt=request.prompt, response=request.response, namespace=request.namespace,
            scope=dict(request.scope), template_id=_opt(request, "template_id"),
            template_version=_opt(request, "template_version"), ttl_s=_opt(request, "ttl_s"),
            user_id=_opt(request, "user_id"), metadata=dict(request.metadata))
        result = await _call(context, lambda: self._engine.store(command))
        return pb.StoreResponse(entry_id=result.entry_id, replaced=result.replaced)

    async def Feedback(self, request: pb.FeedbackRequest,
                       context: grpc.aio.ServicerContext) -> pb.FeedbackResponse:
        deleted, status = await _call(context, lambda: self._engine.feedback(
            request.namespace, request.entry_id, request.prompt, request.correct))
        return pb.FeedbackResponse(entry_deleted=deleted, policy=policy_to_proto(status))


class CacheAdminServicer(pb_grpc.CacheAdminServicer):
    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    async def InvalidateTemplate(self, request: pb.InvalidateTemplateRequest,
                                 context: grpc.aio.ServicerContext) -> pb.InvalidateResponse:
        removed = await _call(context, lambda: self._engine.invalidate_template(
            request.namespace, request.template_id, _opt(request, "version")))
        return pb.InvalidateResponse(removed=removed)

    async def InvalidateNamespace(self, request: pb.InvalidateNamespaceRequest,
                                  context: grpc.aio.ServicerContext) -> pb.InvalidateResponse:
        removed = await _call(context, lambda: self._engine.invalidate_namespace(request.namespace))
        return pb.InvalidateResponse(removed=removed)

    async def DeleteEntry(self, request: pb.DeleteEntryRequest,
                          context: grpc.aio.ServicerContext) -> pb.InvalidateResponse:
        removed = await _call(context, lambda: self._engine.delete_entry(request.entry_id))
        return pb.InvalidateResponse(removed=removed)

    async def DeleteUser(self, request: pb.DeleteUserRequest,
                         context: grpc.aio.ServicerContext) -> pb.InvalidateResponse:
        removed = await _call(context, lambda: self._engine.delete_user(
            request.user_id, _opt(request, "namespace")))
        return pb.InvalidateResponse(removed=removed)

    async def Stats(self, request: pb.StatsRequest,
                    context: grpc.aio.ServicerContext) -> pb.StatsResponse:
        return stats_to_proto(await _call(context, self._engine.stats))

    async def SetPolicy(self, request: pb.SetPolicyRequest,
                        context: grpc.aio.ServicerContext) -> pb.PolicyStatus:
        policy = Policy(max_wrong_rate=_opt(request, "max_wrong_rate"),  # type: ignore[arg-type]
                        min_similarity=_opt(request, "min_similarity"),  # type: ignore[arg-type]
                        verify=_opt(request, "verify"))  # type: ignore[arg-type]
        return policy_to_proto(await _call(context, lambda: self._engine.set_policy(
            request.namespace, policy, clear_evidence=request.clear_evidence)))

    async def GetPolicy(self, request: pb.GetPolicyRequest,
                        context: grpc.aio.ServicerContext) -> pb.PolicyStatus:
        return policy_to_proto(await _call(context, lambda: self._engine.policy_status(
            request.namespace)))

    async def AddEvidence(self, request: pb.AddEvidenceRequest,
                          context: grpc.aio.ServicerContext) -> pb.AddEvidenceResponse:
        pairs = [(p.a, p.b, p.duplicate) for p in request.pairs]
        added, skipped, status = await _call(context, lambda: self._engine.add_evidence(
            request.namespace, pairs))
        return pb.AddEvidenceResponse(added=added, skipped=skipped, policy=policy_to_proto(status))


def policy_to_proto(status: PolicyStatus) -> pb.PolicyStatus:
    p, rule, cal = status.policy, status.rule, status.rule.calibration
    return pb.PolicyStatus(
        namespace=status.namespace, max_wrong_rate=p.max_wrong_rate,
        min_similarity=p.min_similarity, verify=p.verify, verifier_on=rule.verify, gate=rule.gate,
        threshold=rule.threshold, bound=None if cal is None else cal.max_wrong_rate,
        evidence=status.evidence, evidence_correct=status.evidence_correct,
        served=0 if cal is None else cal.served, wrong=0 if cal is None else cal.wrong,
        promised_bound=None if cal is None else cal.promised_bound,
        hit_rate=0.0 if cal is None else cal.hit_rate, needed=0 if cal is None else cal.needed,
        feedback_correct=status.feedback_correct, feedback_wrong=status.feedback_wrong,
        vetoed_entries=status.vetoed_entries, message=status.message)


def stats_to_proto(stats: Stats) -> pb.StatsResponse:
    def tier(t: TierStats) -> pb.TierStats:
        return pb.TierStats(entries=t.entries, bytes=t.bytes, capacity=t.capacity, hits=t.hits,
                            demotions=t.demotions, promotions=t.promotions)

    def stage(s: StageStats) -> pb.StageStats:
        return pb.StageStats(count=s.count, p50_ms=s.p50_ms, p99_ms=s.p99_ms)

    return pb.StatsResponse(
        model=stats.model, dimension=stats.dimension, device=stats.device,
        default_min_similarity=stats.default_min_similarity, lookups=stats.lookups,
        hits=stats.hits, misses=stats.misses, stores=stats.stores, expired=stats.expired,
        invalidated=stats.invalidated, exact=tier(stats.exact), hot=tier(stats.hot),
        warm=tier(stats.warm), cold=tier(stats.cold), embed_batches=stats.embed_batches,
        embed_texts=stats.embed_texts, rejected_overload=stats.rejected_overload,
        stages={name: stage(s) for name, s in stats.stages.items()}, uptime_s=stats.uptime_s,
        simd_isa=stats.simd_isa, verifier=stats.verifier, verify_batches=stats.verify_batches,
        verify_pairs=stats.verify_pairs,
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
        interceptors = [_ApiKeyInterceptor(settings.api_key)] if settings.api_key else []
        options = [("grpc.max_receive_message_length", settings.max_message_bytes),
                   ("grpc.max_send_message_length", settings.max_message_bytes),
                   ("grpc.so_reuseport", 0)]
        self._server = grpc.aio.server(interceptors=interceptors, options=options,
                                       maximum_concurrent_rpcs=settings.max_concurrent_rpcs)
        pb_grpc.add_SemanticCacheServicer_to_server(SemanticCacheServicer(engine), self._server)
        pb_grpc.add_CacheAdminServicer_to_server(CacheAdminServicer(engine), self._server)
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

