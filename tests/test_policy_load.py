"""The policy book under load and at its edges, on real SQLite files and real calibrations:
rows the server cannot use, calibration off the event loop, a failing calibration contained,
the evidence cap under concurrent adds, vetoes of removed entries, and a user's rows erased
from evidence.sqlite3 and its write-ahead log."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import threading
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import numpy as np
import pytest

from stratacache.calibration import CONFIDENCE, minimum_served
from stratacache.errors import StorageFull
from stratacache.policy import (MAX_EVIDENCE_PER_NAMESPACE, Defaults, Observation, Policy,
                                PolicyBook)
from stratacache.validation import MIN_WRONG_RATE

T = TypeVar("T")

DEFAULTS = Defaults(min_similarity=0.9, verify_gate=0.8, verify_threshold=0.9,
                    max_wrong_rate=None, has_verifier=False)


def _observations(n: int, seed: int, **fields: object) -> list[Observation]:
    """Scored observations like a paraphrase set's: right ones score high, wrong ones low."""
    rng = np.random.default_rng(seed)
    correct = rng.random(n) < 0.6
    scores = np.where(correct, rng.beta(8, 1.5, n), rng.beta(1.5, 5, n))
    return [Observation(f"query {seed}-{i}", f"stored {seed}-{i}", bool(c), float(s), None,
                        **fields)  # type: ignore[arg-type]
            for i, (c, s) in enumerate(zip(correct, scores))]


def _with_book(path: Path, scenario: Callable[[PolicyBook], Awaitable[T]], *,
               defaults: Defaults = DEFAULTS, **kwargs: object) -> T:
    """Runs ``scenario`` with a real book on a fresh event loop, and closes the book."""
    async def run() -> T:
        book = PolicyBook(path, defaults, "embedder", None, **kwargs)  # type: ignore[arg-type]
        try:
            return await scenario(book)
        finally:
            book.close()

    return asyncio.run(run())


def test_the_floor_of_max_wrong_rate_is_reachable_within_the_evidence_cap() -> None:
    each = 1 - (1 - CONFIDENCE) / 3  # calibrate's per-sequence confidence
    assert minimum_served(MIN_WRONG_RATE, each) <= MAX_EVIDENCE_PER_NAMESPACE
    assert minimum_served(MIN_WRONG_RATE / 10, each) > MAX_EVIDENCE_PER_NAMESPACE


# --- C: calibration runs off the event loop ----------------------------------------------------


def test_recalibration_runs_off_the_loop_and_coalesces_changes(tmp_path: Path) -> None:
    """While the calibration thread is busy, rule() and status() answer at once with the rule
    in force; three changes during one queued calibration cost one more calibration, not three;
    once released, the new rule reflects every observation."""
    with ThreadPoolExecutor(1) as pool:
        async def scenario(book: PolicyBook) -> None:
            await book.set_policy("ns", Policy(max_wrong_rate=0.05))
            await book.add("ns", _observations(2000, seed=0))
            first = await book.settled("ns")
            assert first.threshold is not None and first.calibration.evidence == 2000

            release = threading.Event()
            blocker = pool.submit(release.wait)  # the only calibration thread, held
            runs = book.calibrations
            await book.add("ns", _observations(2000, seed=1))
            assert book.rule("ns") is first  # the last rule, at once
            status = book.status("ns")
            assert status.rule is first and status.evidence == 4000
            assert status.message.startswith("calibrating a wrong-hit bound of 0.05 on 4000")
            for seed in (2, 3, 4):
                await book.add("ns", _observations(500, seed=seed))
            assert book.rule("ns") is first and not blocker.done()

            release.set()
            fresh = await book.settled("ns")
            assert fresh is not first and fresh.calibration.evidence == 5500
            assert book.calibrations == runs + 2
            assert book.status("ns").message.startswith("serving scores >=")

        _with_book(tmp_path / "evidence.sqlite3", scenario, executor=pool)


def test_a_bound_without_a_calibrated_rule_serves_exact_hits_only(tmp_path: Path) -> None:
    """A namespace with a bound that was never calibrated gets an exact-hits-only rule at once
    while its first calibration waits; one without a bound never needs the calibration thread."""
    bounded = Defaults(min_similarity=0.9, verify_gate=0.8, verify_threshold=0.9,
                       max_wrong_rate=0.05, has_verifier=False)
    with ThreadPoolExecutor(1) as pool:
        release = threading.Event()
        pool.submit(release.wait)

        async def scenario(book: PolicyBook) -> None:
            await book.add("ns", _observations(2000, seed=0))
            interim = book.rule("ns")
            assert interim.threshold is None and interim.bound == 0.05
            assert book.status("ns").message.endswith(
                "until it finishes, serving exact hits only: no rule is calibrated for this "
                "bound yet")
            release.set()
            assert (await book.settled("ns")).threshold is not None

        _with_book(tmp_path / "bounded.sqlite3", scenario, defaults=bounded, executor=pool)

        release.clear()
        pool.submit(release.wait)

        async def unbounded(book: PolicyBook) -> None:
            await book.add("ns", _observations(2000, seed=0))
            rule = book.rule("ns")
            assert rule.threshold == 0.9 and rule.bound is None
            assert (await book.settled("ns")) is rule and book.calibrations == 0
            release.set()

        _with_book(tmp_path / "plain.sqlite3", unbounded, executor=pool)


# --- B: a failing calibration is contained ---------------------------------------------------


def test_a_failing_calibration_breaks_no_other_namespace(tmp_path: Path, caplog) -> None:  # type: ignore[no-untyped-def]
    """A server default of 1e-300 (what Settings now refuses) makes calibrating raise: the
    namespaces that inherit it serve exact hits only and say why; the rest are unaffected."""
    async def scenario(book: PolicyBook) -> None:
        await book.set_policy("fine", Policy(max_wrong_rate=0.05))
        await book.add("fine", _observations(2000, seed=0))
        await book.add("broken", _observations(2000, seed=1))
        broken, fine = await book.settled("broken"), await book.settled("fine")
        assert broken.threshold is None and fine.threshold is not None
        statuses = {ns: book.status(ns) for ns in book.namespaces()}
        assert statuses["broken"].message.startswith("calibration failed (")
        assert statuses["broken"].evidence == 2000
        assert statuses["fine"].message.startswith("serving scores >=")

    tiny = Defaults(min_similarity=0.9, verify_gate=0.8, verify_threshold=0.9,
                    max_wrong_rate=1e-300, has_verifier=False)
    _with_book(tmp_path / "evidence.sqlite3", scenario, defaults=tiny)
    failures = [r for r in caplog.records if "calibrating namespace" in r.getMessage()]
    assert [r.getMessage() for r in failures] == [
        "calibrating namespace 'broken' failed; it serves exact hits only until its policy or "
        "evidence changes"]


# --- D: the evidence cap under concurrency, vetoes of removed entries --------------------------


def test_concurrent_adds_cannot_both_pass_the_cap(tmp_path: Path) -> None:
    async def scenario(book: PolicyBook) -> None:
        results = await asyncio.gather(book.add("ns", _observations(6, seed=0)),
                                       book.add("ns", _observations(6, seed=1)),
                                       return_exceptions=True)
        assert sum(isinstance(r, StorageFull) for r in results) == 1
        assert book.status("ns").evidence == 6
        await book.add("ns", _observations(4, seed=2))  # the refused add reserved nothing
        with pytest.raises(StorageFull, match="holds 10 labelled observations"):
            await book.add("ns", _observations(1, seed=3))

    path = tmp_path / "evidence.sqlite3"
    _with_book(path, scenario, max_evidence=10)
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT COUNT(*) FROM evidence").fetchone() == (10,)
    db.close()


def test_vetoes_of_removed_entries_are_forgotten(tmp_path: Path) -> None:
    async def scenario(book: PolicyBook) -> None:
        near = np.ones(4, dtype=np.float32) / 2
        book.add_veto("ns", "a" * 32, near)
        book.add_veto("ns", "b" * 32, near)
        book.add_veto("other", "c" * 32, near)
        book.forget_entries(["a" * 32, "c" * 32, "f" * 32])
        assert not book.vetoed("a" * 32, near) and book.vetoed("b" * 32, near)
        assert book.status("ns").vetoed_entries == 1 and book.status("other").vetoed_entries == 0

    _with_book(tmp_path / "evidence.sqlite3", scenario)


# --- E: a user's rows are erased -------------------------------------------------------------

MARKER = "zanzibar-quokka-7781"


def _feedback_rows(user: str, text: str, n: int, seed: int) -> list[Observation]:
    return [Observation(f"{o.query} {text}", f"{o.matched} {text} " + "x" * 200, o.correct,
                        o.similarity, None, "feedback", f"{seed:02x}{i:030x}", user_id=user)
            for i, o in enumerate(_observations(n, seed))]


def _file_bytes(directory: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(directory.glob("evidence.sqlite3*")))


def test_delete_user_erases_the_rows_from_every_file(tmp_path: Path) -> None:
    """Rows of one user interleaved with another's, over many pages: after delete_user no byte
    of the user's text is left in evidence.sqlite3, its -wal or its -shm file."""
    user = f"user-{MARKER}"

    async def scenario(book: PolicyBook) -> None:
        for seed in range(4):  # row by row, so that pages hold both users' rows
            theirs = _feedback_rows(user, MARKER, 300, seed=2 * seed)
            others = _feedback_rows("someone-else", "kept text", 300, seed=2 * seed + 1)
            await book.add("ns", [row for pair in zip(theirs, others) for row in pair])
        await book.add("elsewhere", _feedback_rows(user, MARKER, 50, seed=9))
        book.add_veto("ns", f"{0:02x}{0:030x}", np.ones(4, dtype=np.float32) / 2)
        assert MARKER.encode() in _file_bytes(tmp_path)

        assert await book.delete_user(user, "elsewhere") == 50
        assert book.status("elsewhere").evidence == 0
        assert await book.delete_user(user, None) == 1200
        assert book.status("ns").evidence == 1200 and book.status("ns").vetoed_entries == 0
        assert await book.delete_user(user, None) == 0

        data = _file_bytes(tmp_path)
        assert MARKER.encode() not in data
        assert b"kept text" in data

    _with_book(tmp_path / "evidence.sqlite3", scenario)


def test_an_older_file_gains_the_user_column(tmp_path: Path) -> None:
    path = tmp_path / "evidence.sqlite3"
    with sqlite3.connect(path) as db:
        db.executescript("""
            CREATE TABLE evidence (id INTEGER PRIMARY KEY, namespace TEXT NOT NULL,
                source TEXT NOT NULL, query TEXT NOT NULL, matched TEXT NOT NULL,
                correct INTEGER NOT NULL, entry_id TEXT, created_at REAL NOT NULL,
                similarity REAL NOT NULL, embedder TEXT NOT NULL, verifier_score REAL,
                verifier TEXT);
            INSERT INTO evidence VALUES (1, 'ns', 'pairs', 'q', 'm', 1, NULL, 0, 0.9,
                'embedder', NULL, NULL);
        """)
    db.close()

    async def scenario(book: PolicyBook) -> None:
        book.load()
        assert book.status("ns").evidence == 1
        await book.add("ns", _feedback_rows("u1", "text", 3, seed=0))
        assert await book.delete_user("u1", None) == 3
        assert book.status("ns").evidence == 1

    _with_book(path, scenario)


def test_unusable_evidence_rows_are_skipped_at_load(tmp_path: Path, caplog) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "evidence.sqlite3"

    async def write(book: PolicyBook) -> None:
        await book.add("ns", _observations(5, seed=0))

    _with_book(path, write)
    with sqlite3.connect(path) as db:
        db.execute("UPDATE evidence SET similarity = 'high' WHERE id = 1")
        db.execute("UPDATE evidence SET verifier_score = 9e999 WHERE id = 2")  # infinity
        db.execute("UPDATE evidence SET correct = 7 WHERE id = 3")
    db.close()

    async def load(book: PolicyBook) -> None:
        book.load()
        assert book.status("ns").evidence == 2
        assert (await book.settled("ns")).threshold == 0.9

    _with_book(path, load)
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == [
        "ignoring 3 evidence rows of namespace 'ns' whose label or scores are not finite "
        "numbers (edited by hand?)"]


# --- B: rows the server cannot use, found at start (a real server) -----------------------------


def test_unusable_policy_rows_are_ignored_at_start(start_server, tmp_path: Path, caplog) -> None:  # type: ignore[no-untyped-def]
    server = start_server()
    server.stop()
    with sqlite3.connect(tmp_path / "data" / "evidence.sqlite3") as db:
        db.executemany("INSERT INTO policy VALUES (?, ?, ?, ?, 0)", [
            ("tiny", 1e-300, None, None), ("huge", 1e300, None, None),
            ("words", "lots", None, None), ("cosine", None, 7.5, None),
            ("flag", None, None, "yes"), ("good", 0.2, 0.5, None)])
    db.close()
    caplog.set_level(logging.INFO)
    again = start_server()
    ignored = [r.getMessage() for r in caplog.records
               if r.getMessage().startswith("ignoring the stored policy")]
    assert len(ignored) == 5
    for namespace, value in (("tiny", "1e-300"), ("huge", "1e+300"), ("words", "'lots'"),
                             ("cosine", "7.5"), ("flag", "'yes'")):
        assert sum(f"namespace '{namespace}'" in m and value in m for m in ignored) == 1
    with again.client() as c:
        for namespace in ("tiny", "huge", "words", "cosine", "flag"):
            status = c.get_policy(namespace)
            assert status["max_wrong_rate"] is None and status["min_similarity"] is None
            assert status["bound"] is None and status["threshold"] == pytest.approx(0.95)
        assert c.get_policy("good")["max_wrong_rate"] == pytest.approx(0.2)
        assert c.stats()["lookups"] == 0
        c.store("What is the capital of Italy?", "Rome", namespace="tiny")
        assert c.lookup("What is the capital of Italy?", namespace="tiny").hit
        assert c.set_policy("tiny", max_wrong_rate=0.1)["max_wrong_rate"] == pytest.approx(0.1)
