"""Bytes that are not a request, and numbers at the edges, sent through a real channel to a real
server: each gets INVALID_ARGUMENT with one log line and no traceback, and nothing is stored."""

from __future__ import annotations

import logging
import math

import grpc
import pytest

from stratacache import Client, InvalidArgumentError
from stratacache import errors
from stratacache.service import SERVICES, status_of
from stratacache.v1 import stratacache_pb2 as pb

_METHODS = [(f"/{service.full_name}/{method.name}", method)
            for service in SERVICES for method in service.methods]


def _undecodable(method) -> list[bytes]:  # type: ignore[no-untyped-def]
    """Bytes that cannot decode as the method's request: a length running past the end, a
    varint that never ends, and, where the message has a string field, invalid UTF-8 in it."""
    payloads = [b"\x0a\x05ab", b"\xff" * 11]
    strings = [f for f in method.input_type.fields if f.type == f.TYPE_STRING]
    if strings:
        payloads.append(bytes([strings[0].number << 3 | 2, 2]) + b"\xc3\x28")
    return payloads


def test_every_method_covers_both_services() -> None:
    assert {path.split("/")[1] for path, _ in _METHODS} == {
        "stratacache.v1.SemanticCache", "stratacache.v1.CacheAdmin"}
    assert len(_METHODS) == 11


@pytest.mark.parametrize("path, method", _METHODS, ids=[path for path, _ in _METHODS])
def test_undecodable_request_is_invalid_argument(server, caplog, path, method) -> None:  # type: ignore[no-untyped-def]
    caplog.set_level(logging.INFO)
    payloads = _undecodable(method)
    with grpc.insecure_channel(server.target) as channel:
        call = channel.unary_unary(path, request_serializer=None, response_deserializer=None)
        for payload in payloads:
            with pytest.raises(grpc.RpcError) as info:
                call(payload, timeout=30)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
            assert info.value.details().startswith(
                f"request could not be decoded as {method.input_type.full_name}: ")
    lines = [r for r in caplog.records if "could not be decoded" in r.getMessage()]
    assert len(lines) == len(payloads)
    assert all(method.name in r.getMessage() for r in lines)
    assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"
    assert "Traceback" not in caplog.text and "Unexpected" not in caplog.text


def test_invalid_utf8_changes_nothing(client: Client, server) -> None:  # type: ignore[no-untyped-def]
    """A Store whose prompt is not UTF-8 stores nothing, and the server keeps serving."""
    good = pb.StoreRequest(namespace="n", prompt="hello there", response=b"r").SerializeToString()
    bad = good.replace(b"hello there", b"hello \xc3\x28ere")
    with grpc.insecure_channel(server.target) as channel:
        store = channel.unary_unary("/stratacache.v1.SemanticCache/Store")
        with pytest.raises(grpc.RpcError) as info:
            store(bad, timeout=30)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert pb.StoreResponse.FromString(store(good, timeout=30)).entry_id
    assert client.stats()["stores"] == 1


def test_engine_errors_get_one_log_line_without_traceback(client: Client, caplog) -> None:  # type: ignore[no-untyped-def]
    caplog.set_level(logging.INFO)
    with pytest.raises(InvalidArgumentError):
        client.lookup("")
    lines = [r for r in caplog.records if r.name == "stratacache.service"]
    assert len(lines) == 1 and lines[0].levelno == logging.INFO
    assert lines[0].getMessage().startswith("Lookup -> INVALID_ARGUMENT: prompt is empty")
    assert not [r for r in caplog.records if r.exc_info]


def test_status_table() -> None:
    assert status_of(errors.StorageFull("disk full")) == grpc.StatusCode.FAILED_PRECONDITION
    assert status_of(errors.StorageFailed("I/O error")) == grpc.StatusCode.INTERNAL
    assert status_of(errors.Overloaded("queue full")) == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert status_of(errors.DataDirMismatch("other model")) == grpc.StatusCode.INTERNAL


NAN, INF = math.nan, math.inf


@pytest.mark.parametrize("field, value", [
    ("max_wrong_rate", 1e-300), ("max_wrong_rate", 5e-324), ("max_wrong_rate", 0.0),
    ("max_wrong_rate", -0.0), ("max_wrong_rate", 1e-5), ("max_wrong_rate", 0.75),
    ("max_wrong_rate", 1.0), ("max_wrong_rate", NAN), ("max_wrong_rate", INF),
    ("max_wrong_rate", -INF),
    ("min_similarity", NAN), ("min_similarity", INF), ("min_similarity", -INF),
    ("min_similarity", -1e-45), ("min_similarity", 1.0000002), ("min_similarity", -0.5),
])
def test_policy_numbers_out_of_range_are_refused_and_not_stored(
        client: Client, namespace: str, field: str, value: float) -> None:
    with pytest.raises(InvalidArgumentError, match=field):
        client.set_policy(namespace, **{field: value})
    assert client.get_policy(namespace)[field] is None
    assert namespace not in client.stats()["namespaces"]  # and Stats still answers


def test_policy_numbers_at_the_edges_are_kept(client: Client, namespace: str) -> None:
    assert client.set_policy(namespace, max_wrong_rate=1e-4)["max_wrong_rate"] == 1e-4
    assert client.set_policy(namespace, max_wrong_rate=0.5)["max_wrong_rate"] == 0.5
    zero = client.set_policy(namespace, min_similarity=-0.0)["min_similarity"]
    assert zero == 0.0 and math.copysign(1.0, zero) == 1.0  # one zero, not two
    tiny = client.set_policy(namespace, min_similarity=1e-45)["min_similarity"]  # a denormal
    assert 0.0 < tiny < 1e-44
    assert client.stats()["namespaces"][namespace]["evidence"] == 0


def test_a_tiny_bound_no_longer_breaks_stats(client: Client, namespace: str) -> None:
    """SetPolicy(max_wrong_rate=1e-300) used to answer INTERNAL, be stored anyway, and make
    every Stats call fail from then on."""
    with pytest.raises(InvalidArgumentError, match=r"\[0.0001, 0.5\]"):
        client.set_policy(namespace, max_wrong_rate=1e-300)
    assert client.stats()["lookups"] == 0
    assert client.get_policy(namespace)["bound"] is None


@pytest.mark.parametrize("call, message", [
    (lambda c: c.lookup("q", min_similarity=NAN), "min_similarity is nan"),
    (lambda c: c.lookup("q", min_similarity=-INF), "min_similarity is -inf"),
    (lambda c: c.lookup("q", min_similarity=-1e-45), "min_similarity is -1"),
    (lambda c: c.store("q", "r", ttl_s=INF), "ttl_s is inf"),
    (lambda c: c.store("q", "r", ttl_s=5e-324), "ttl_s is 5e-324"),  # a denormal: expired at once
    (lambda c: c.store("q", "r", ttl_s=-0.0), "ttl_s is -0.0"),
    (lambda c: c.store("q", "r", ttl_s=1e300), "ttl_s is 1e\\+300"),
])
def test_request_numbers_at_the_edges(client: Client, call, message: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(InvalidArgumentError, match=message):
        call(client)
    assert client.stats()["stores"] == 0
