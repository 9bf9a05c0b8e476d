"""Rate limits: exact under concurrency on a real server (N concurrent calls against a burst of B:
exactly B pass), per user, per namespace and global; the limiter's memory bound, on its own with
an injected clock."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest

from stratacache import AsyncClient, OverloadedError, RateLimitedError, UnauthenticatedError
from stratacache.access import hash_key
from stratacache.config import RateLimit
from stratacache.ratelimit import RateLimited, RateLimiter, Subject
from stratacache.v1 import stratacache_pb2 as pb

#: A refill so slow (one token every 1000 s) that no token comes back during a test.
SLOW = 0.001


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def user(name: str) -> Subject:
    return Subject.of(user_id=name, key_name=None, peer="ipv4:127.0.0.1:1")


def passes(limiter: RateLimiter, call: str, who: Subject, namespace: str = "n") -> bool:
    try:
        limiter.check(call, user=who, namespace=namespace)
    except RateLimited:
        return False
    return True


# --- the limiter alone --------------------------------------------------------------------------

def test_a_bucket_lets_its_burst_through_then_refills_at_its_rate() -> None:
    clock = Clock()
    limiter = RateLimiter({("lookup", "user"): RateLimit(20, 40)}, clock=clock)
    assert [passes(limiter, "lookup", user("u1")) for _ in range(41)] == [True] * 40 + [False]
    with pytest.raises(RateLimited) as info:
        limiter.check("lookup", user=user("u1"), namespace="n")
    assert str(info.value) == ("rate limit: user 'u1' over 20 lookups/s (burst 40); "
                               "retry in 50 ms")
    assert info.value.limit == "user" and info.value.retry_after_s == pytest.approx(0.05)
    assert info.value.retry_after_ms == 50
    assert passes(limiter, "lookup", user("u2"))  # each user has a bucket of its own
    assert passes(limiter, "store", user("u1"))  # stores are not limited here
    clock.now += 0.05
    assert passes(limiter, "lookup", user("u1")) and not passes(limiter, "lookup", user("u1"))


def test_a_refused_call_takes_nothing_from_its_other_limits() -> None:
    limiter = RateLimiter({("store", "user"): RateLimit(SLOW, 3),
                           ("store", "namespace"): RateLimit(SLOW, 1)}, clock=Clock())
    assert passes(limiter, "store", user("u1"), "a")
    for _ in range(5):
        with pytest.raises(RateLimited, match="rate limit: namespace 'a' over 0.001 stores/s "
                                              r"\(burst 1\); retry in 1000000 ms"):
            limiter.check("store", user=user("u1"), namespace="a")
    # The five refusals spent none of u1's tokens: two are left, for other namespaces.
    assert [passes(limiter, "store", user("u1"), ns) for ns in "bcd"] == [True, True, False]


def test_the_refusal_names_the_limit_that_waits_longest() -> None:
    clock = Clock()
    limiter = RateLimiter({("lookup", "user"): RateLimit(1, 1),
                           ("lookup", "namespace"): RateLimit(0.1, 1)}, clock=clock)
    assert passes(limiter, "lookup", user("u1"), "ns")
    with pytest.raises(RateLimited) as info:
        limiter.check("lookup", user=user("u1"), namespace="ns")
    assert info.value.limit == "namespace" and info.value.retry_after_s == pytest.approx(10)
    assert str(info.value).startswith("rate limit: namespace 'ns' over 0.1 lookups/s (burst 1)")


def test_the_user_is_the_user_id_within_its_key_else_the_key_else_the_client_address() -> None:
    limiter = RateLimiter({("lookup", "user"): RateLimit(SLOW, 1)}, clock=Clock())
    subjects = [Subject.of(user_id="42", key_name="gw-a", peer="ipv4:10.0.0.1:5"),
                Subject.of(user_id="42", key_name="gw-b", peer="ipv4:10.0.0.1:5"),
                Subject.of(user_id=None, key_name="gw-a", peer="ipv4:10.0.0.1:5"),
                Subject.of(user_id=None, key_name=None, peer="ipv6:[::1]:6")]
    assert [s.label for s in subjects] == ["user '42'", "user '42'", "key 'gw-a'",
                                           "client ipv6:[::1]"]
    assert all(passes(limiter, "lookup", s) for s in subjects)  # four buckets
    # Two connections from one address are one client.
    assert not passes(limiter, "lookup", Subject.of(user_id=None, key_name=None,
                                                    peer="ipv6:[::1]:7"))


def test_a_flood_of_user_ids_keeps_the_buckets_bounded() -> None:
    clock = Clock()
    limiter = RateLimiter({("lookup", "user"): RateLimit(20, 40)}, max_tracked=1000, clock=clock)
    # 100,000 distinct users, 10,000 a second: each one-token bucket is full again 50 ms later
    # and is swept, so about 500 are tracked at any time.
    peak = 0
    for i in range(100_000):
        clock.now += 0.0001
        assert passes(limiter, "lookup", user(f"u{i}"))
        peak = max(peak, limiter.tracked("lookup", "user"))
    assert peak <= 501
    clock.now += 0.05
    assert passes(limiter, "lookup", user("late"))
    assert limiter.tracked("lookup", "user") == 1  # every idle bucket was dropped


def test_past_the_cap_new_users_share_one_bucket() -> None:
    clock = Clock()
    limiter = RateLimiter({("lookup", "user"): RateLimit(SLOW, 2)}, max_tracked=100, clock=clock)
    # All at one instant, so nothing refills and nothing is swept.
    results = [passes(limiter, "lookup", user(f"u{i}")) for i in range(100_000)]
    assert limiter.tracked("lookup", "user") == 100
    # The first 100 users have their own buckets; the other 99,900 share one with a burst of 2.
    assert results[:100] == [True] * 100 and sum(results[100:]) == 2
    with pytest.raises(RateLimited, match=r"user 'x' \(sharing one bucket with every new user: "
                                          "more than 100 are active\\) over"):
        limiter.check("lookup", user=user("x"), namespace="n")
    # Tracked users keep their own allowance: u0 has one token left.
    assert passes(limiter, "lookup", user("u0")) and not passes(limiter, "lookup", user("u0"))
    # Once their buckets are full again they are dropped, and new users get their own.
    clock.now += 2 / SLOW
    assert passes(limiter, "lookup", user("new"))
    assert limiter.tracked("lookup", "user") == 1


def test_no_limit_configured_means_no_buckets() -> None:
    limiter = RateLimiter({})
    assert not limiter.limits("lookup") and not limiter.limits("admin")
    for i in range(1000):
        limiter.check("lookup", user=user(f"u{i}"), namespace="n")
    with pytest.raises(ValueError, match="unknown rate limits"):
        RateLimiter({("feedback", "user"): RateLimit(1, 1)})


# --- on a real server ---------------------------------------------------------------------------

def _concurrently(target: str, calls: int, make, **client: object) -> list:  # type: ignore[no-untyped-def]
    """Sends ``calls`` calls at once over one channel; their results or errors, in order."""
    async def scenario() -> list:
        async with AsyncClient(target, timeout=120, **client) as c:  # type: ignore[arg-type]
            return await asyncio.gather(*(make(c, i) for i in range(calls)),
                                        return_exceptions=True)
    return asyncio.run(scenario())


def test_n_concurrent_lookups_against_a_burst_of_b_let_exactly_b_through(start_server) -> None:  # type: ignore[no-untyped-def]
    server = start_server(rate_limit_user_lookup=RateLimit(SLOW, 5))
    results = _concurrently(server.target, 40,
                            lambda c, i: c.lookup(f"question number {i}", namespace="n"))
    refused = [r for r in results if isinstance(r, BaseException)]
    assert len(results) - len(refused) == 5
    assert all(isinstance(r, RateLimitedError) and isinstance(r, OverloadedError)
               for r in refused), refused
    assert all(r.retry_after_s is not None and r.retry_after_s > 0 for r in refused)
    # Without keys, the user is the client's address.
    assert "rate limit: client ipv4:127.0.0.1 over 0.001 lookups/s (burst 5); retry in" in str(
        refused[0])
    # The refused calls never reached the engine; stores are not limited.
    with server.client() as c:
        assert c.stats()["lookups"] == 5
        c.store("a question", "an answer", namespace="n")


def test_the_retry_after_metadata_and_status(start_server) -> None:  # type: ignore[no-untyped-def]
    server = start_server(rate_limit_global_store=RateLimit(SLOW, 1))
    with grpc.insecure_channel(server.target) as channel:
        store = channel.unary_unary("/stratacache.v1.SemanticCache/Store",
                                    request_serializer=pb.StoreRequest.SerializeToString,
                                    response_deserializer=pb.StoreResponse.FromString)
        request = pb.StoreRequest(namespace="n", prompt="q", response=b"r")
        store(request, timeout=60)
        with pytest.raises(grpc.RpcError) as info:
            store(request, timeout=60)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    trailing = dict(info.value.trailing_metadata())
    retry_ms = int(trailing["retry-after-ms"])
    assert 999_000 < retry_ms <= 1_000_000
    assert info.value.details() == (f"rate limit: the server over 0.001 stores/s (burst 1); "
                                    f"retry in {retry_ms} ms")


def test_store_users_namespaces_and_the_server_have_their_own_limits(start_server) -> None:  # type: ignore[no-untyped-def]
    server = start_server(rate_limit_user_store=RateLimit(SLOW, 2),
                          rate_limit_namespace_store=RateLimit(SLOW, 3),
                          rate_limit_global_store=RateLimit(SLOW, 5))

    def store(c, i: int, namespace: str, user_id: str):  # type: ignore[no-untyped-def]
        return c.store(f"prompt {namespace} {user_id} {i}", "r", namespace=namespace,
                       user_id=user_id)

    with server.client() as c:
        store(c, 0, "ns1", "u1")
        store(c, 1, "ns1", "u1")
        with pytest.raises(RateLimitedError, match="user 'u1' over 0.001 stores/s"):
            store(c, 2, "ns1", "u1")
        store(c, 3, "ns1", "u2")  # another user; the namespace's third store
        with pytest.raises(RateLimitedError, match="namespace 'ns1' over 0.001 stores/s"):
            store(c, 4, "ns1", "u3")
        store(c, 5, "ns2", "u3")
        store(c, 6, "ns3", "u4")  # the server's fifth store
        with pytest.raises(RateLimitedError, match="the server over 0.001 stores/s"):
            store(c, 7, "ns4", "u5")
        assert c.stats()["stores"] == 5


def test_concurrent_lookups_in_one_namespace_and_over_the_server(start_server) -> None:  # type: ignore[no-untyped-def]
    server = start_server(rate_limit_namespace_lookup=RateLimit(SLOW, 4),
                          rate_limit_global_lookup=RateLimit(SLOW, 7))
    results = _concurrently(server.target, 20,
                            lambda c, i: c.lookup(f"q {i}", namespace=("a", "b")[i % 2]))
    passed = [i for i, r in enumerate(results) if not isinstance(r, BaseException)]
    # Namespace a lets 4 through and b 4, but the server only 7 in all.
    assert len(passed) == 7
    assert all(isinstance(r, RateLimitedError) for r in results if isinstance(r, BaseException))
    assert sorted(sum(1 for i in passed if i % 2 == k) for k in (0, 1)) == [3, 4]


def test_calls_refused_before_the_limits_take_nothing_from_them(start_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    key = "gateway-key-" + "g" * 32
    keys = tmp_path / "keys.toml"
    keys.write_text(f'[[keys]]\nname = "gw"\nsha256 = "{hash_key(key)}"\n'
                    'namespaces = ["mine"]\nroles = ["lookup"]\n')
    server = start_server(keys_file=keys, rate_limit_user_lookup=RateLimit(SLOW, 3),
                          rate_limit_global_lookup=RateLimit(SLOW, 3))
    with server.client() as anonymous:
        for i in range(5):
            with pytest.raises(UnauthenticatedError):
                anonymous.lookup(f"q {i}", namespace="mine")
    with server.client(api_key=key) as c:
        for i in range(5):
            with pytest.raises(Exception, match="PERMISSION_DENIED"):
                c.lookup(f"q {i}", namespace="theirs")
    results = _concurrently(server.target, 6,
                            lambda c, i: c.lookup(f"q {i}", namespace="mine"), api_key=key)
    refused = [r for r in results if isinstance(r, BaseException)]
    assert len(refused) == 3 and all("rate limit: key 'gw' over" in str(r) for r in refused)
