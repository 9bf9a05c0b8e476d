"""Per-namespace decision policy, the labelled evidence it is calibrated on, and feedback vetoes.

An admin sets a namespace's :class:`Policy`: a wrong-hit bound (``max_wrong_rate``), a cosine
gate (``min_similarity``), and whether the verifier runs. The book turns policy, server defaults
and the namespace's own evidence into the :class:`Rule` a lookup applies:

- without the verifier, a hit needs cosine >= ``threshold`` (``gate`` == ``threshold``);
- with it, candidates need cosine >= ``gate`` (loose) and the verifier's score >= ``threshold``;
- with a bound, ``threshold`` comes from :func:`calibration.calibrate` on the namespace's
  evidence, or is None (no semantic hits) while the evidence cannot support the bound.

Evidence is per namespace because scores do not transfer between domains: a verifier threshold
chosen on Quora rejected every paraphrase of another domain. Evidence rows keep both texts, the
label and the scores, with the identity of the model that gave each score, so a server with
another embedder or verifier re-scores them at start instead of trusting stale numbers.

Everything lives in ``DATA_DIR/evidence.sqlite3`` (synchronous=FULL: a policy or feedback
acknowledged is on disk). Writes are rare (admin calls, feedback) and run off the event loop.
"""

from __future__ import annotations

import asyncio
import math
import sqlite3
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .calibration import Calibration, calibrate
from .errors import InvalidArgument, StorageFull

#: Labelled observations kept per namespace; beyond it AddEvidence and Feedback are refused.
MAX_EVIDENCE_PER_NAMESPACE = 200_000
#: A wrong report vetoes its entry for lookups this close (cosine) to the reported prompt.
VETO_SIMILARITY = 0.90

_SCHEMA = """
CREATE TABLE IF NOT EXISTS policy (
    namespace TEXT PRIMARY KEY,
    max_wrong_rate REAL,
    min_similarity REAL,
    verify INTEGER,
    updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS evidence (
    id INTEGER PRIMARY KEY,
    namespace TEXT NOT NULL,
    source TEXT NOT NULL,          -- 'pairs' (labelled import) or 'feedback'
    query TEXT NOT NULL,           -- the lookup prompt
    matched TEXT NOT NULL,         -- the stored prompt served (or that would be)
    correct INTEGER NOT NULL,      -- 1: serving it is right
    entry_id TEXT,                 -- feedback: the entry served
    created_at REAL NOT NULL,
    similarity REAL NOT NULL,      -- cosine under `embedder`
    embedder TEXT NOT NULL,
    verifier_score REAL,           -- under `verifier`; NULL without one
    verifier TEXT
);
CREATE INDEX IF NOT EXISTS evidence_namespace ON evidence(namespace);
"""


@dataclass(frozen=True, slots=True)
class Policy:
    """What an admin set for a namespace; None means the server default."""

    max_wrong_rate: float | None = None
    min_similarity: float | None = None
    verify: bool | None = None


@dataclass(frozen=True, slots=True)
class Defaults:
    """Server-wide defaults (from flags)."""

    min_similarity: float
    verify_gate: float
    verify_threshold: float
    max_wrong_rate: float | None
    has_verifier: bool


@dataclass(frozen=True, slots=True)
class Rule:
    """The decision a lookup in a namespace applies (see the module doc)."""

    verify: bool
    gate: float
    threshold: float | None
    calibration: Calibration | None = None


@dataclass(frozen=True, slots=True)
class Observation:
    """One labelled observation, scored."""

    query: str
    matched: str
    correct: bool
    similarity: float
    verifier_score: float | None
    source: str = "pairs"
    entry_id: str | None = None


@dataclass
class _Evidence:
    similarity: list[float] = field(default_factory=list)
    verifier: list[float] = field(default_factory=list)
    correct: list[bool] = field(default_factory=list)
    feedback_correct: int = 0
    feedback_wrong: int = 0


@dataclass(frozen=True, slots=True)
class PolicyStatus:
    """A namespace's policy, the rule it yields now, and the evidence behind it."""

    namespace: str
    policy: Policy
    rule: Rule
    evidence: int
    evidence_correct: int
    feedback_correct: int
    feedback_wrong: int
    vetoed_entries: int
    message: str


class PolicyBook:
    """Policies, evidence and vetoes of one data directory (see the module doc). Methods that
    touch disk are coroutines; the rest are cheap and run on the event loop."""

    def __init__(self, path: Path, defaults: Defaults, embedder_id: str,
                 verifier_id: str | None) -> None:
        self.defaults = defaults
        self._embedder_id = embedder_id
        self._verifier_id = verifier_id
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db_lock = threading.Lock()
        self._db.executescript("PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL;" + _SCHEMA)
        self._policies: dict[str, Policy] = {
            ns: Policy(w, s, None if v is None else bool(v)) for ns, w, s, v in self._db.execute(
                "SELECT namespace, max_wrong_rate, min_similarity, verify FROM policy")}
        self._evidence: dict[str, _Evidence] = {}
        self._rules: dict[str, Rule] = {}
        self._vetoes: dict[str, np.ndarray] = {}
        self._vetoed_by_namespace: dict[str, set[str]] = {}

    # --- start-up -----------------------------------------------------------------------------

    def stale_rows(self) -> list[tuple[int, str, str]]:
        """(row id, query, matched) of rows scored by another embedder or verifier than this
        server's: they must be re-scored before they count."""
        with self._db_lock:
            return self._db.execute(
                "SELECT id, query, matched FROM evidence WHERE embedder != ? OR "
                "(? IS NOT NULL AND (verifier IS NULL OR verifier != ?))",
                (self._embedder_id, self._verifier_id, self._verifier_id)).fetchall()

    def rescore(self, scores: Iterable[tuple[int, float, float | None]]) -> None:
        """Stores new (row id, similarity, verifier score) for stale rows (blocking)."""
        with self._db_lock:
            self._db.execute("BEGIN")
            self._db.executemany(
                "UPDATE evidence SET similarity = ?, embedder = ?, verifier_score = ?, "
                "verifier = ? WHERE id = ?",
                [(s, self._embedder_id, v, self._verifier_id, i) for i, s, v in scores])
            self._db.execute("COMMIT")

    def load(self) -> list[tuple[str, str, str]]:
        """Reads every evidence row into memory (after :meth:`rescore`); returns (namespace,
        entry id, query) of wrong feedback, whose vetoes the caller rebuilds with
        :meth:`add_veto`."""
        wrong_feedback = []
        with self._db_lock:
            rows = self._db.execute(
                "SELECT namespace, source, correct, similarity, verifier_score, entry_id, query "
                "FROM evidence ORDER BY id").fetchall()
        for ns, source, correct, similarity, verifier_score, entry_id, query in rows:
            self._remember(ns, Observation("", "", bool(correct), similarity, verifier_score,
                                           source, entry_id))
            if source == "feedback" and not correct and entry_id:
                wrong_feedback.append((ns, entry_id, query))
        self._rules.clear()
        return wrong_feedback

    # --- policy -------------------------------------------------------------------------------

    def policy(self, namespace: str) -> Policy:
        return self._policies.get(namespace, Policy())

    async def set_policy(self, namespace: str, policy: Policy) -> None:
        """Raises InvalidArgument for values out of range, or verify=True without a verifier."""
        if policy.max_wrong_rate is not None and not 0 < policy.max_wrong_rate < 1:
            raise InvalidArgument(f"max_wrong_rate must lie in (0, 1), e.g. 0.01 for at most 1% "
                                  f"wrong hits; got {policy.max_wrong_rate}")
        if policy.min_similarity is not None and not 0 <= policy.min_similarity <= 1:
            raise InvalidArgument(
                f"min_similarity must lie in [0, 1]; got {policy.min_similarity}")
        if policy.verify and not self.defaults.has_verifier:
            raise InvalidArgument("verify=true, but this server runs without a verifier: start "
                                  "it with --verifier DIR (see `stratacache tune`)")

        def write() -> None:
            with self._db_lock:
                self._db.execute(
                    "INSERT OR REPLACE INTO policy VALUES (?, ?, ?, ?, ?)",
                    (namespace, policy.max_wrong_rate, policy.min_similarity,
                     None if policy.verify is None else int(policy.verify), time.time()))

        await asyncio.to_thread(write)
        self._policies[namespace] = policy
        self._rules.pop(namespace, None)

    def rule(self, namespace: str) -> Rule:
        rule = self._rules.get(namespace)
        if rule is None:
            rule = self._rules[namespace] = self._make_rule(namespace)
        return rule

    def _make_rule(self, namespace: str) -> Rule:
        d, p = self.defaults, self.policy(namespace)
        verify = d.has_verifier and p.verify is not False
        bound = p.max_wrong_rate if p.max_wrong_rate is not None else d.max_wrong_rate
        ev = self._evidence.get(namespace, _Evidence())
        if verify:
            gate = p.min_similarity if p.min_similarity is not None else d.verify_gate
            if bound is None:
                return Rule(True, gate, d.verify_threshold)
            sim = np.asarray(ev.similarity, dtype=np.float64)
            eligible = sim >= gate
            scores = np.asarray([math.nan if v is None else v for v in ev.verifier],
                                dtype=np.float64)
            eligible &= ~np.isnan(scores)
            cal = calibrate(scores[eligible], np.asarray(ev.correct, dtype=bool)[eligible], bound,
                            total_correct=sum(ev.correct))
            return Rule(True, gate, cal.threshold, cal)
        floor = p.min_similarity if p.min_similarity is not None else None
        if bound is None:
            threshold = floor if floor is not None else d.min_similarity
            return Rule(False, threshold, threshold)
        cal = calibrate(ev.similarity, ev.correct, bound)
        threshold = cal.threshold
        if threshold is not None and floor is not None:
            threshold = max(threshold, floor)
        return Rule(False, threshold if threshold is not None else 1.0, threshold, cal)

    # --- evidence -----------------------------------------------------------------------------

    async def add(self, namespace: str, observations: Sequence[Observation]) -> None:
        """Records scored observations durably and recalibrates the namespace.

        Raises:
            StorageFull: the namespace already holds MAX_EVIDENCE_PER_NAMESPACE observations.
        """
        held = len(self._evidence.get(namespace, _Evidence()).correct)
        if held + len(observations) > MAX_EVIDENCE_PER_NAMESPACE:
            raise StorageFull(
                f"namespace {namespace!r} holds {held} labelled observations; at most "
                f"{MAX_EVIDENCE_PER_NAMESPACE} are kept: send fewer, or clear it with "
                "set_policy(..., clear_evidence=True)")
        now = time.time()

        def write() -> None:
            with self._db_lock:
                self._db.execute("BEGIN")
                self._db.executemany(
                    "INSERT INTO evidence (namespace, source, query, matched, correct, entry_id, "
                    "created_at, similarity, embedder, verifier_score, verifier) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    [(namespace, o.source, o.query, o.matched, int(o.correct), o.entry_id, now,
                      o.similarity, self._embedder_id, o.verifier_score,
                      self._verifier_id if o.verifier_score is not None else None)
                     for o in observations])
                self._db.execute("COMMIT")

        await asyncio.to_thread(write)
        for o in observations:
            self._remember(namespace, o)
        self._rules.pop(namespace, None)

    async def clear_evidence(self, namespace: str) -> int:
        def delete() -> int:
            with self._db_lock:
                return self._db.execute("DELETE FROM evidence WHERE namespace = ?",
                                        (namespace,)).rowcount

        removed = await asyncio.to_thread(delete)
        self._evidence.pop(namespace, None)
        self._rules.pop(namespace, None)
        return removed

    def _remember(self, namespace: str, o: Observation) -> None:
        ev = self._evidence.setdefault(namespace, _Evidence())
        ev.similarity.append(float(o.similarity))
        ev.verifier.append(o.verifier_score)  # type: ignore[arg-type]
        ev.correct.append(o.correct)
        if o.source == "feedback":
            if o.correct:
                ev.feedback_correct += 1
            else:
                ev.feedback_wrong += 1

    # --- vetoes -------------------------------------------------------------------------------

    def add_veto(self, namespace: str, entry_id: str, query_vector: np.ndarray) -> int:
        """Vetoes ``entry_id`` for lookups near ``query_vector``; returns the entry's wrong
        reports so far."""
        held = self._vetoes.get(entry_id)
        row = query_vector.reshape(1, -1).astype(np.float32)
        self._vetoes[entry_id] = row if held is None else np.vstack([held, row])
        self._vetoed_by_namespace.setdefault(namespace, set()).add(entry_id)
        return len(self._vetoes[entry_id])  # one veto row per wrong report

    def vetoed(self, entry_id: str, query_vector: np.ndarray) -> bool:
        held = self._vetoes.get(entry_id)
        return held is not None and float(np.max(held @ query_vector)) >= VETO_SIMILARITY

    # --- reporting ----------------------------------------------------------------------------

    def status(self, namespace: str) -> PolicyStatus:
        rule, ev = self.rule(namespace), self._evidence.get(namespace, _Evidence())
        if rule.calibration is not None:
            message = rule.calibration.message
        elif rule.verify:
            message = (f"verifier on: candidates with cosine >= {rule.gate:.3f} are served when "
                       f"the verifier scores >= {rule.threshold:.3f} (no wrong-hit bound set)")
        else:
            message = (f"served when cosine >= {rule.gate:.3f} (no wrong-hit bound set, no "
                       "verifier)")
        return PolicyStatus(namespace, self.policy(namespace), rule, len(ev.correct),
                            sum(ev.correct), ev.feedback_correct, ev.feedback_wrong,
                            len(self._vetoed_by_namespace.get(namespace, ())), message)

    def namespaces(self) -> list[str]:
        return sorted(set(self._policies) | set(self._evidence))

    def close(self) -> None:
        with self._db_lock:
            self._db.close()

