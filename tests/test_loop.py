"""The event loop never waits on slow background work: a calibration held in its worker does not
delay exact hits, lookups, Feedback or Stats, through a real server, model and files; and the
server reports its loop's lag. Nothing here sleeps or times anything: the tests hold the slow
work on a hook and wait for conditions."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest

from stratacache import Client

from .conftest import RunningServer

STORED = {
    "How do I reset my account password?": "Use the reset link on the sign-in page.",
    "What is the capital of France?": "Paris",
    "How many legs does a spider have?": "Eight",
}
PARAPHRASE = "How can I reset the password of my account?"
#: A backstop for waits on conditions (never an assertion on time): a broken build fails here
#: instead of hanging CI.
BACKSTOP_S = 120


class _HeldCalibration:
    """The policy book's calibration hook: holds every calibration of ``namespace`` in its
    worker until released, and says when one is held."""

    def __init__(self, namespace: str) -> None:
        self.namespace = namespace
        self.held = threading.Event()
        self.release = threading.Event()

    def __call__(self, namespace: str) -> None:
        if namespace == self.namespace:
            self.held.set()
            self.release.wait()


@pytest.fixture
def held(server: RunningServer, namespace: str) -> Iterator[_HeldCalibration]:
    hook = _HeldCalibration(namespace)
    yield hook
    hook.release.set()  # whatever the test did, let the worker go before the server stops


def test_a_held_calibration_delays_no_exact_hit(server: RunningServer, client: Client,
                                                namespace: str,
                                                held: _HeldCalibration) -> None:
    """A Feedback storm on a namespace with a wrong-hit bound while its calibration is stuck in
    the worker: exact hits, semantic lookups, more Feedback and Stats are all answered, and the
    calibration is still held when they are."""
    client.set_policy(namespace, max_wrong_rate=0.05)  # settles before the hook is in place
    ids = {prompt: client.store(prompt, answer, namespace=namespace)
           for prompt, answer in STORED.items()}
    server.engine.policies.calibration_hook = held
    runs = server.engine.policies.calibrations

    first = client.feedback(ids[next(iter(STORED))], PARAPHRASE, True, namespace=namespace)
    assert first["policy"]["evidence"] == 1
    assert held.held.wait(BACKSTOP_S), "the feedback started no calibration"

    for round_ in range(3):
        for prompt, answer in STORED.items():
            hit = client.lookup(prompt, namespace=namespace)
            assert hit.hit and hit.tier == "exact" and hit.response == answer.encode()
        # No rule is calibrated for the bound yet: exact hits only, said at once.
        miss = client.lookup(PARAPHRASE, namespace=namespace)
        assert not miss.hit and miss.miss_reason == "uncalibrated"
        reply = client.feedback(ids[next(iter(STORED))], PARAPHRASE, True, namespace=namespace)
        assert reply["policy"]["evidence"] == 2 + round_
        assert "calibrating a wrong-hit bound of 0.05" in reply["policy"]["message"]
    stats = client.stats()
    assert stats["namespaces"][namespace]["evidence"] == 4 and stats["hits"] >= 9

    assert not held.release.is_set() and server.engine.policies.calibrations == runs
    held.release.set()
    settled = client.get_policy(namespace)  # waits for the calibration to catch up
    assert settled["evidence"] == 4 and "calibrating" not in settled["message"]
    # The storm of four changes cost the held round and at most one more.
    assert server.engine.policies.calibrations - runs <= 2


def test_stats_report_the_loop_lag(server: RunningServer, client: Client) -> None:
    """Stats carries the lag probe's samples in milliseconds (p50 <= p99 <= max); the stages
    report their maximum too."""
    client.store(next(iter(STORED)), "answer")
    client.lookup(next(iter(STORED)))
    stats = client.stats()
    while stats["loop_lag"]["count"] < 2:  # the probe samples every 10 ms: wait for two
        server.run(server.engine.loop_lag.sampled(stats["loop_lag"]["count"] + 2))
        stats = client.stats()
    lag = stats["loop_lag"]
    assert 0 <= lag["p50_ms"] <= lag["p99_ms"] <= lag["max_ms"]
    lookup = stats["stages"]["lookup"]
    assert lookup["count"] >= 1 and 0 < lookup["p50_ms"] <= lookup["max_ms"]
