"""Bad input gets INVALID_ARGUMENT with a message a person can act on, and changes nothing."""

from __future__ import annotations

import grpc
import pytest

from stratacache import Client, InvalidArgumentError, UnauthenticatedError
from stratacache.errors import InvalidArgument
from stratacache.validation import MAX_PROMPT_BYTES, MAX_RESPONSE_BYTES, explicit_namespace


@pytest.mark.parametrize("call, message", [
    (lambda c: c.store("", "x"), "prompt is empty"),
    (lambda c: c.store(" \n\t ", "x"), "prompt is empty"),
    (lambda c: c.lookup(""), "prompt is empty"),
    (lambda c: c.store("x" * (MAX_PROMPT_BYTES + 1), "x"), f"at most {MAX_PROMPT_BYTES} bytes"),
    (lambda c: c.store("q", b"r" * (MAX_RESPONSE_BYTES + 1)), "response is 4194305 bytes"),
    (lambda c: c.store("q", "r", namespace="bad namespace!"), "namespace 'bad namespace!' is malformed"),
    (lambda c: c.lookup("q", namespace="-leading-dash"), "starting with a letter or digit"),
    (lambda c: c.lookup("q", namespace="n" * 129), "1 to 128 characters"),
    (lambda c: c.store("q", "r", scope={"system": "s" * 20000}), "pass a digest of long values"),
    (lambda c: c.lookup("q", scope={f"k{i}": "v" for i in range(65)}), "scope has 65 keys"),
    (lambda c: c.store("q", "r", scope={"": "v"}), "scope key '' must be 1 to 128 bytes"),
    (lambda c: c.store("q", "r", template_version="v2"), "template_version is set but template_id is not"),
    (lambda c: c.lookup("q", template_version="v2"), "give both or neither"),
    (lambda c: c.lookup("q", min_similarity=1.5), "min_similarity is 1.5"),
    (lambda c: c.store("q", "r", ttl_s=-1), "ttl_s is -1"),
    (lambda c: c.store("q", "r", ttl_s=float("nan")), "ttl_s is nan"),
    (lambda c: c.store("q", "r", user_id="u" * 300), "user_id is 300 bytes"),
    (lambda c: c.store("q", "r", metadata={"k": "v" * 20000}), "metadata['k'] is 20000 bytes"),
    (lambda c: c.invalidate_template("", namespace="n"), "template_id is required"),
    (lambda c: c.delete_user(""), "user_id is required"),
    (lambda c: c.invalidate_namespace("a b"), "malformed"),
    # destructive calls must name their namespace: "" no longer means "default" there
    (lambda c: c.invalidate_namespace(""), "needs the namespace explicitly"),
    (lambda c: c.invalidate_template("t", namespace=""), "needs the namespace explicitly"),
    (lambda c: c.delete_user("u", namespace=""), "needs the namespace explicitly"),
])
def test_bad_input_is_invalid_argument(client: Client, call, message: str) -> None:  # type: ignore[no-untyped-def]
    kept = client.store("What is the capital of Italy?", "Rome")
    with pytest.raises(InvalidArgumentError, match=message.replace("[", r"\[").replace("(", r"\(")) as info:
        call(client)
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert isinstance(info.value.__cause__, grpc.RpcError)
    stats = client.stats()
    assert stats["stores"] == 1 and stats["warm"]["entries"] == 1
    assert client.lookup("What is the capital of Italy?").entry_id == kept


def test_api_key_is_required_when_configured(start_server) -> None:  # type: ignore[no-untyped-def]
    server = start_server(api_key="s3cret")
    with server.client() as anonymous:
        with pytest.raises(UnauthenticatedError, match="authorization: Bearer"):
            anonymous.lookup("hello")
        with pytest.raises(UnauthenticatedError):
            anonymous.stats()
    with server.client(api_key="wrong") as wrong:
        with pytest.raises(UnauthenticatedError):
            wrong.store("hello", "world")
    with server.client(api_key="s3cret") as c:
        c.store("hello there", "world")
        assert c.lookup("hello there").hit
    # Health checks stay open for load balancers.
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(server.target) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="stratacache.v1.SemanticCache"))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        # ... and so does reflection (the schema, no data), for grpcurl.
        assert "stratacache.v1.SemanticCache" in _reflected_services(channel)


def test_reflection_lists_the_services(server) -> None:  # type: ignore[no-untyped-def]
    with grpc.insecure_channel(server.target) as channel:
        assert {"stratacache.v1.SemanticCache", "stratacache.v1.CacheAdmin",
                "grpc.health.v1.Health"} <= _reflected_services(channel)


def _reflected_services(channel: grpc.Channel) -> set[str]:
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    reply = next(stub.ServerReflectionInfo(iter([request]), timeout=10))
    return {s.name for s in reply.list_services_response.service}


def test_explicit_namespace() -> None:
    assert explicit_namespace("default") == "default" and explicit_namespace("a.b") == "a.b"
    with pytest.raises(InvalidArgument, match="InvalidateNamespace needs the namespace "
                       "explicitly; an empty one no longer means 'default' for destructive calls"):
        explicit_namespace("")
    with pytest.raises(InvalidArgument, match="^DeleteUser needs the namespace explicitly"):
        explicit_namespace("", "DeleteUser")
    with pytest.raises(InvalidArgument, match="malformed"):
        explicit_namespace("a b")
