"""Per-namespace decision policy, the labelled evidence it is calibrated on, and feedback vetoes.

An admin sets a namespace's :class:`Policy`: a wrong-hit bound (``max_wrong_rate``), a cosine
gate (``min_similarity``), and whether the verifier runs. The book turns policy, server defaults
and the namespace's own evidence into the :class:`Rule` a lookup applies:

- without the verifier, a hit needs cosine >= ``threshold`` (``gate`` == ``threshold``);
- with it, candidates need cosine >= ``gate`` (loose) and the verifier's score >= ``threshold``;
- with a bound, ``threshold`` comes from :func:`calibration.calibrate` on the namespace's
  evidence, or is None (no semantic hits) while the evidence cannot support the bound.

Calibration runs off the event loop, on one worker thread, in numpy and scipy calls that release
the GIL (about 0.1 s at 200,000 observations; evidence is kept in arrays, so nothing is
converted per observation): a change of policy or evidence queues one recalibration of its
namespace, and :meth:`PolicyBook.rule` answers at once with the rule in force until the new one
is swapped in. Changes that arrive during a calibration lead to one more calibration, not one
each, started after a rest as long as the last one took (a Feedback storm costs at most half
of one core). A namespace with a bound that
has no calibrated rule yet (just started, policy just set, evidence just cleared, or its last
calibration failed) serves exact hits only, the safe side; one without a bound needs no
calibration. Admin calls that report the rule await :meth:`PolicyBook.settled`; lookups never
wait. A calibration that raises is contained: its namespace serves exact hits only and says why
in its status, and every other namespace is unaffected.

Evidence is per namespace because scores do not transfer between domains: a verifier threshold
chosen on Quora rejected every paraphrase of another domain. Evidence rows keep both texts, the
label and the scores, with the identity of the model that gave each score, so a server with
another embedder or verifier re-scores them at start instead of trusting stale numbers. Feedback
rows also keep the user of the entry served, so DeleteUser can erase them.

Everything lives in ``DATA_DIR/evidence.sqlite3`` (synchronous=FULL: a policy or feedback
acknowledged is on disk; secure_delete=ON: deleted rows are overwritten, not left in free
space). Writes are rare (admin calls, feedback) and run off the event loop. A policy row the
server cannot use (a hand edit, an older server's looser checks) is logged and ignored at start:
its namespace runs on the server defaults until SetPolicy replaces it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import math
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import validation
from .calibration import Calibration, calibrate
from .errors import InvalidArgument, StorageFailed, StorageFull

log = logging.getLogger(__name__)

#: Labelled observations kept per namespace; beyond it AddEvidence and Feedback are refused.
MAX_EVIDENCE_PER_NAMESPACE = 200_000
#: A wrong report vetoes its entry for lookups this close (cosine) to the reported prompt.
VETO_SIMILARITY = 0.90
#: Observations a namespace's evidence arrays start with; they double as they fill.
_INITIAL_EVIDENCE = 64

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
    verifier TEXT,
    user_id TEXT                   -- feedback: the user of the entry served (DeleteUser)
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
    """Server-wide defaults (from flags, checked by ``Settings``; the verifier's gate and
    threshold from :func:`stratacache.operating_point.choose`, whose ``source`` and
    ``explanation`` GetPolicy reports)."""

    min_similarity: float
    verify_gate: float
    verify_threshold: float
    max_wrong_rate: float | None
    has_verifier: bool
    verify_source: str = "verify_threshold"
    verify_explanation: str = ""


@dataclass(frozen=True, slots=True)
class Rule:
    """The decision a lookup in a namespace applies (see the module doc).

    Attributes:
        verify: whether candidates go through the verifier.
        gate: cosine a candidate needs at all.
        threshold: what a hit's score (the verifier's, else the cosine) must reach; None: no
            semantic hits (exact hits only).
        calibration: what the evidence supports for ``bound``; None without a bound, and while
            a bound has no calibrated rule yet.
        bound: the wrong-hit bound in force (the policy's or the server default); None: none.
    """

    verify: bool
    gate: float
    threshold: float | None
    calibration: Calibration | None = None
    bound: float | None = None


@dataclass(frozen=True, slots=True)
class Observation:
    """One labelled observation, scored. ``user_id``: the user of the entry served (feedback),
    so that DeleteUser erases the row."""

    query: str
    matched: str
    correct: bool
    similarity: float
    verifier_score: float | None
    source: str = "pairs"
    entry_id: str | None = None
    user_id: str | None = None


class _Evidence:
    """A namespace's observations in memory, append-only, in growable arrays (a verifier score
    of None is NaN). A calibration on the worker reads a prefix (:meth:`view`) while the loop
    appends: appends write past every prefix handed out, and growing copies into new arrays, so
    a view never changes; removals build a new object."""

    def __init__(self) -> None:
        self._similarity = np.empty(_INITIAL_EVIDENCE, dtype=np.float64)
        self._verifier = np.empty(_INITIAL_EVIDENCE, dtype=np.float64)
        self._correct = np.empty(_INITIAL_EVIDENCE, dtype=bool)
        self.count = 0
        self.correct_count = 0
        self.feedback_correct = 0
        self.feedback_wrong = 0

    def append(self, correct: bool, similarity: float, verifier_score: float | None,
               source: str) -> None:
        if self.count == len(self._correct):
            grown = 2 * self.count
            self._similarity = _grown(self._similarity, grown)
            self._verifier = _grown(self._verifier, grown)
            self._correct = _grown(self._correct, grown)
        i = self.count
        self._similarity[i] = similarity
        self._verifier[i] = math.nan if verifier_score is None else verifier_score
        self._correct[i] = correct
        self.count += 1
        self.correct_count += correct
        if source == "feedback":
            if correct:
                self.feedback_correct += 1
            else:
                self.feedback_wrong += 1

    def view(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(similarity, verifier score or NaN, correct) of the observations so far: read-only
        views that later appends leave as they are."""
        n = self.count
        return self._similarity[:n], self._verifier[:n], self._correct[:n]


def _grown(array: np.ndarray, size: int) -> np.ndarray:
    out = np.empty(size, dtype=array.dtype)
    out[:len(array)] = array
    return out


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
    threshold_source: str


class PolicyBook:
    """Policies, evidence and vetoes of one data directory (see the module doc). Methods that
    touch disk are coroutines; the rest are cheap and run on the event loop.

    Args:
        path: the SQLite file (created, or migrated, if needed).
        defaults: the server's defaults.
        embedder_id, verifier_id: identities of the models that score evidence.
        executor: where calibrations run; None: a thread of the book's own (shut down by
            :meth:`close`). A given executor stays the caller's to shut down.
        max_evidence: labelled observations kept per namespace.
    """

    def __init__(self, path: Path, defaults: Defaults, embedder_id: str,
                 verifier_id: str | None, *,
                 executor: concurrent.futures.Executor | None = None,
                 max_evidence: int = MAX_EVIDENCE_PER_NAMESPACE) -> None:
        self.defaults = defaults
        self._embedder_id = embedder_id
        self._verifier_id = verifier_id
        self._max_evidence = max_evidence
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db_lock = threading.Lock()
        self._db.executescript("PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL; "
                               "PRAGMA secure_delete=ON;" + _SCHEMA)
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(evidence)")}
        if "user_id" not in columns:  # a file from before DeleteUser covered evidence
            self._db.execute("ALTER TABLE evidence ADD COLUMN user_id TEXT")
        self._db.execute("CREATE INDEX IF NOT EXISTS evidence_user ON evidence(user_id)")
        self._policies = self._read_policies()
        self._evidence: dict[str, _Evidence] = {}
        #: Observations being written per namespace: counted against the cap before the write
        #: awaits, so concurrent adds cannot both pass it.
        self._adding: dict[str, int] = {}
        #: Per namespace: changes of policy or evidence so far; the rule in force with the
        #: change count it reflects; the task recalibrating it; why its last calibration failed.
        self._changes: dict[str, int] = {}
        self._rules: dict[str, tuple[int, Rule]] = {}
        self._calibrating: dict[str, asyncio.Task[None]] = {}
        self._failures: dict[str, str] = {}
        self._own_executor = executor is None
        self._executor = executor or concurrent.futures.ThreadPoolExecutor(
            1, thread_name_prefix="calibration")
        #: Calibrations finished (or failed) since start.
        self.calibrations = 0
        #: Called on the calibration worker with the namespace as each calibration starts (a
        #: hook for tests, which hold a calibration there); None: nothing.
        self.calibration_hook: Callable[[str], None] | None = None
        self._vetoes: dict[str, np.ndarray] = {}
        self._vetoed_by_namespace: dict[str, set[str]] = {}
        self._closed = False

    @property
    def verifier_id(self) -> str | None:
        """The identity of the verifier that scores this book's evidence (None: none)."""
        return self._verifier_id

    # --- start-up -----------------------------------------------------------------------------

    def _read_policies(self) -> dict[str, Policy]:
        policies = {}
        for ns, rate, cosine, verify in self._db.execute(
                "SELECT namespace, max_wrong_rate, min_similarity, verify FROM policy"):
            try:
                if not isinstance(ns, str) or validation.namespace(ns) != ns:
                    raise InvalidArgument(f"namespace {ns!r} is malformed")
                if verify not in (None, 0, 1):
                    raise InvalidArgument(f"verify is {verify!r}, not 0 or 1")
                policies[ns] = _checked(Policy(rate, cosine, None if verify is None
                                               else bool(verify)))
            except InvalidArgument as exc:
                log.warning("ignoring the stored policy of namespace %r: %s. The namespace runs "
                            "on the server defaults until SetPolicy replaces it", ns, exc)
        return policies

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
        """Reads every evidence row into memory (after :meth:`rescore`) and starts calibrating
        the namespaces with a bound; returns (namespace, entry id, query) of wrong feedback,
        whose vetoes the caller rebuilds with :meth:`add_veto`. Call it on the event loop."""
        with self._db_lock:
            self._evidence, wrong_feedback = self._read_evidence(None)
        for ns in self.namespaces():
            self._changed(ns)
        return wrong_feedback

    def _read_evidence(self, namespaces: Sequence[str] | None,
                       ) -> tuple[dict[str, _Evidence], list[tuple[str, str, str]]]:
        """The evidence of ``namespaces`` (None: all) and their wrong feedback, from disk;
        rows with unusable scores (hand edits) are skipped with one line per namespace.
        Blocking; hold the lock."""
        where = "" if namespaces is None else \
            f"WHERE namespace IN ({', '.join('?' * len(namespaces))}) "
        rows = self._db.execute(
            "SELECT namespace, source, correct, similarity, verifier_score, entry_id, query "
            f"FROM evidence {where}ORDER BY id", tuple(namespaces or ())).fetchall()
        evidence: dict[str, _Evidence] = {ns: _Evidence() for ns in namespaces or ()}
        skipped: dict[str, int] = {}
        wrong_feedback = []
        for ns, source, correct, similarity, verifier_score, entry_id, query in rows:
            if not (_finite(similarity) and (verifier_score is None or _finite(verifier_score))
                    and correct in (0, 1)):
                skipped[ns] = skipped.get(ns, 0) + 1
                continue
            evidence.setdefault(ns, _Evidence()).append(bool(correct), similarity,
                                                        verifier_score, source)
            if source == "feedback" and not correct and entry_id:
                wrong_feedback.append((ns, entry_id, query))
        for ns, count in skipped.items():
            log.warning("ignoring %d evidence rows of namespace %r whose label or scores are "
                        "not finite numbers (edited by hand?)", count, ns)
        return evidence, wrong_feedback

    # --- policy -------------------------------------------------------------------------------

    def policy(self, namespace: str) -> Policy:
        return self._policies.get(namespace, Policy())

    async def set_policy(self, namespace: str, policy: Policy) -> None:
        """Stores the namespace's policy and waits for its new rule (see :meth:`settled`).
        Check an admin's policy with :meth:`checked` first.

        Raises:
            InvalidArgument: a value out of range (see ``validation.wrong_rate`` and
                ``validation.similarity``); nothing stored.
        """
        policy = _checked(policy)
        if policy.verify and not self.defaults.has_verifier:  # set through another node
            log.warning("namespace %r asks for the verifier, which this server does not run: "
                        "it decides on the cosine alone (start every node with the same "
                        "--verifier)", namespace)

        def write() -> None:
            with self._db_lock:
                self._db.execute(
                    "INSERT OR REPLACE INTO policy VALUES (?, ?, ?, ?, ?)",
                    (namespace, policy.max_wrong_rate, policy.min_similarity,
                     None if policy.verify is None else int(policy.verify), time.time()))

        await asyncio.to_thread(write)
        self._policies[namespace] = policy
        # A rule made for another policy promises nothing about this one.
        self._changed(namespace, drop_rule=True)
        await self.settled(namespace)

    def checked(self, policy: Policy) -> Policy:
        """An admin's policy with its numbers checked, refused (InvalidArgument) if it asks for
        a verifier this server does not run."""
        policy = _checked(policy)
        if policy.verify and not self.defaults.has_verifier:
            raise InvalidArgument("verify=true, but this server runs without a verifier: start "
                                  "it with --verifier DIR (see `stratacache tune`)")
        return policy

    def _bound(self, namespace: str) -> float | None:
        rate = self.policy(namespace).max_wrong_rate
        return rate if rate is not None else self.defaults.max_wrong_rate

    def _verify_and_gate(self, namespace: str) -> tuple[bool, float]:
        d, p = self.defaults, self.policy(namespace)
        verify = d.has_verifier and p.verify is not False
        if verify:
            return True, p.min_similarity if p.min_similarity is not None else d.verify_gate
        return False, p.min_similarity if p.min_similarity is not None else d.min_similarity

    # --- rules --------------------------------------------------------------------------------

    def rule(self, namespace: str) -> Rule:
        """The rule lookups in ``namespace`` apply now; never waits. A stale rule of a namespace
        with a bound stays in force while a recalibration (started here if none runs) computes
        the next; with none in force, exact hits only. Call it on the event loop."""
        change = self._changes.get(namespace, 0)
        held = self._rules.get(namespace)
        if held is not None and held[0] == change:
            return held[1]
        bound = self._bound(namespace)
        if bound is None:  # nothing to calibrate: cheap enough for the loop
            verify, gate = self._verify_and_gate(namespace)
            rule = Rule(verify, gate, self.defaults.verify_threshold if verify else gate)
            self._rules[namespace] = (change, rule)
            return rule
        self._recalibrate(namespace)
        return held[1] if held is not None else self._exact_only(namespace, bound)

    async def settled(self, namespace: str) -> Rule:
        """The namespace's rule once it reflects every change made before the call (and any
        made while waiting). For admin calls and tests; lookups use :meth:`rule`."""
        while True:
            rule = self.rule(namespace)
            task = self._calibrating.get(namespace)
            if task is None:
                return rule
            # Shielded: a caller that gives up (a client deadline) leaves the calibration be.
            await asyncio.shield(task)

    def _exact_only(self, namespace: str, bound: float) -> Rule:
        verify, gate = self._verify_and_gate(namespace)
        return Rule(verify, gate if verify else 1.0, None, None, bound)

    def _changed(self, namespace: str, *, drop_rule: bool = False) -> None:
        """Marks the namespace's rule stale and starts recalibrating it if it has a bound."""
        self._changes[namespace] = self._changes.get(namespace, 0) + 1
        if drop_rule:
            self._rules.pop(namespace, None)
            self._failures.pop(namespace, None)
        if self._bound(namespace) is not None:
            self._recalibrate(namespace)

    def _recalibrate(self, namespace: str) -> None:
        if namespace not in self._calibrating and not self._closed:
            self._calibrating[namespace] = asyncio.get_running_loop().create_task(
                self._calibrate(namespace), name=f"calibrate {namespace}")

    async def _calibrate(self, namespace: str) -> None:
        """Calibrates on the executor until the rule reflects the latest change: changes made
        meanwhile cost one more round, however many there were."""
        loop = asyncio.get_running_loop()
        try:
            while True:
                change, policy = self._changes.get(namespace, 0), self.policy(namespace)
                bound = self._bound(namespace)
                if bound is None:  # the bound was removed meanwhile: rule() needs no worker
                    return
                started = time.monotonic()
                try:
                    rule = await loop.run_in_executor(
                        self._executor, self._calibration_job(namespace, bound))
                    self._failures.pop(namespace, None)
                except Exception as exc:  # contained: other namespaces must not notice
                    log.exception("calibrating namespace %r failed; it serves exact hits only "
                                  "until its policy or evidence changes", namespace)
                    rule = self._exact_only(namespace, bound)
                    self._failures[namespace] = f"{type(exc).__name__}: {exc}"
                self.calibrations += 1
                if self.policy(namespace) == policy:  # else the rule answers another policy
                    self._rules[namespace] = (change, rule)
                if self._changes.get(namespace, 0) == change:
                    return
                # A storm of changes (Feedback) recalibrates back to back: rest as long as the
                # last round took, so calibrating takes at most half of one core however fast
                # changes arrive, and the rounds are fewer, each covering more changes.
                await asyncio.sleep(time.monotonic() - started)
        finally:
            self._calibrating.pop(namespace, None)

    def _calibration_job(self, namespace: str, bound: float) -> Callable[[], Rule]:
        """A blocking function computing the namespace's calibrated rule from its evidence as it
        is now (a prefix of the append-only lists: no copy on the loop)."""
        verify, gate = self._verify_and_gate(namespace)
        floor = self.policy(namespace).min_similarity
        ev = self._evidence.get(namespace, _Evidence())
        similarity, scores, correct = ev.view()
        total_correct, hook = ev.correct_count, self.calibration_hook

        def job() -> Rule:
            if hook is not None:
                hook(namespace)
            if verify:
                eligible = (similarity >= gate) & ~np.isnan(scores)
                cal = calibrate(scores[eligible], correct[eligible], bound,
                                total_correct=total_correct)
                return Rule(True, gate, cal.threshold, cal, bound)
            cal = calibrate(similarity, correct, bound)
            threshold = cal.threshold
            if threshold is not None and floor is not None:
                threshold = max(threshold, floor)
            return Rule(False, threshold if threshold is not None else 1.0, threshold, cal, bound)

        return job

    # --- evidence -----------------------------------------------------------------------------

    def check_room(self, namespace: str, count: int) -> None:
        """Raises StorageFull if ``count`` more observations would take the namespace past
        ``max_evidence``."""
        ev = self._evidence.get(namespace, _Evidence())
        adding = self._adding.get(namespace, 0)
        if ev.count + adding + count > self._max_evidence:
            raise StorageFull(
                f"namespace {namespace!r} holds {ev.count} labelled observations "
                f"({adding} more being added); at most {self._max_evidence} are kept: send "
                f"fewer than {count}, or clear it with set_policy(..., clear_evidence=True)")

    async def add(self, namespace: str, observations: Sequence[Observation], *,
                  capped: bool = True) -> None:
        """Records scored observations durably and starts recalibrating the namespace (this
        does not wait for it: see :meth:`settled`).

        Args:
            capped: refuse observations past ``max_evidence``; False for evidence another node
                added to the shared store, which checked the cap itself.

        Raises:
            StorageFull: the namespace would hold more than ``max_evidence`` observations.
        """
        adding = self._adding.get(namespace, 0)
        if capped:
            self.check_room(namespace, len(observations))
        now = time.time()

        def write() -> None:
            with self._db_lock:
                self._db.execute("BEGIN")
                self._insert_evidence(
                    [(namespace, o, None if o.verifier_score is None else self._verifier_id)
                     for o in observations], now)
                self._db.execute("COMMIT")

        self._adding[namespace] = adding + len(observations)
        try:
            await asyncio.to_thread(write)
        finally:
            self._adding[namespace] -= len(observations)
            if not self._adding[namespace]:
                del self._adding[namespace]
        ev = self._evidence.setdefault(namespace, _Evidence())  # cleared or replaced meanwhile?
        for o in observations:
            ev.append(o.correct, o.similarity, o.verifier_score, o.source)
        self._changed(namespace)

    def _insert_evidence(self, rows: Iterable[tuple[str, Observation, str | None]],
                         now: float) -> None:
        """Writes (namespace, observation, verifier that scored it) rows, scored by this
        book's embedder. Blocking; hold the lock, inside a transaction."""
        self._db.executemany(
            "INSERT INTO evidence (namespace, source, query, matched, correct, entry_id, "
            "created_at, similarity, embedder, verifier_score, verifier, user_id) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [(ns, o.source, o.query, o.matched, int(o.correct), o.entry_id, now, o.similarity,
              self._embedder_id, o.verifier_score, verifier, o.user_id)
             for ns, o, verifier in rows])

    async def clear_evidence(self, namespace: str) -> int:
        """Forgets the namespace's evidence and waits for its new rule; returns rows deleted."""
        def delete() -> int:
            with self._db_lock:
                return self._db.execute("DELETE FROM evidence WHERE namespace = ?",
                                        (namespace,)).rowcount

        removed = await asyncio.to_thread(delete)
        self._evidence.pop(namespace, None)
        # The admin discarded that evidence: a rule calibrated on it is not kept meanwhile.
        self._changed(namespace, drop_rule=True)
        await self.settled(namespace)
        return removed

    async def delete_user(self, user_id: str, namespace: str | None) -> int:
        """Erases the evidence rows of ``user_id``'s entries (in ``namespace``, or all) from
        disk and memory, and recalibrates the namespaces they were in. The rows are overwritten
        in the database (secure_delete) and the write-ahead log is checkpointed and truncated,
        so no copy of their text stays in evidence.sqlite3 or its -wal file.

        Returns:
            How many rows were deleted.

        Raises:
            StorageFailed: the rows are deleted but the write-ahead log could not be truncated
                (another connection held it); the call can be repeated.
        """
        where = "user_id = ?" + ("" if namespace is None else " AND namespace = ?")
        args = (user_id,) if namespace is None else (user_id, namespace)

        def delete() -> tuple[int, list[str], set[str], dict[str, _Evidence], bool]:
            with self._db_lock:
                self._db.execute("BEGIN")
                touched = self._db.execute(
                    f"SELECT DISTINCT namespace FROM evidence WHERE {where}", args).fetchall()
                entries = {e for e, in self._db.execute(
                    f"SELECT DISTINCT entry_id FROM evidence WHERE {where} AND entry_id IS NOT "
                    "NULL", args)}
                removed = self._db.execute(f"DELETE FROM evidence WHERE {where}", args).rowcount
                self._db.execute("COMMIT")
                # The WAL still holds the pages as they were before the delete.
                busy, _, _ = self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
                names = [ns for ns, in touched]
                evidence, _ = self._read_evidence(names) if names else ({}, [])
                return removed, names, entries, evidence, bool(busy)

        removed, names, entries, evidence, busy = await asyncio.to_thread(delete)
        for ns in names:
            # Replaced, never edited in place: a calibration may be reading the old lists.
            self._evidence[ns] = evidence[ns]
            self._changed(ns)
        self.forget_entries(entries)  # their entries are gone with the user
        if busy:
            raise StorageFailed(
                f"DeleteUser removed {removed} evidence rows of user {user_id!r}, but "
                "evidence.sqlite3-wal could not be truncated (another process has the file "
                "open): copies may remain there until it is; repeat the call")
        return removed

    async def everything(self) -> tuple[dict[str, Policy],
                                        list[tuple[str, Observation, str | None]]]:
        """Every policy, and every observation scored by this book's embedder with its
        namespace and the verifier that scored it (what :meth:`replace_all` takes)."""
        def read() -> list[tuple]:  # type: ignore[type-arg]
            with self._db_lock:
                return self._db.execute(
                    "SELECT namespace, query, matched, correct, similarity, verifier_score, "
                    "source, entry_id, user_id, verifier FROM evidence WHERE embedder = ? "
                    "ORDER BY id", (self._embedder_id,)).fetchall()

        rows = await asyncio.to_thread(read)
        return dict(self._policies), [
            (ns, Observation(q, m, bool(c), float(sim), score, source, entry, user), verifier)
            for ns, q, m, c, sim, score, source, entry, user, verifier in rows
            if _finite(sim) and (score is None or _finite(score)) and c in (0, 1)]

    async def replace_all(self, policies: dict[str, Policy],
                          evidence: Sequence[tuple[str, Observation, str | None]]) -> None:
        """Replaces every policy and observation with these (a shared store's: each with the
        verifier that scored it) and forgets every veto; call :meth:`load` (through
        ``Feedback.load``) next, which re-scores, loads and rebuilds."""
        def write() -> None:
            with self._db_lock:
                self._db.execute("BEGIN")
                self._db.execute("DELETE FROM policy")
                self._db.execute("DELETE FROM evidence")
                now = time.time()
                self._db.executemany("INSERT INTO policy VALUES (?, ?, ?, ?, ?)", [
                    (ns, p.max_wrong_rate, p.min_similarity,
                     None if p.verify is None else int(p.verify), now)
                    for ns, p in policies.items()])
                self._insert_evidence(evidence, now)
                self._db.execute("COMMIT")
                self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")

        await asyncio.to_thread(write)
        before = self.namespaces()
        self._policies = self._read_policies()
        self._evidence = {}
        self._vetoes.clear()
        self._vetoed_by_namespace.clear()
        for namespace in set(before) | set(self._policies):
            self._changed(namespace, drop_rule=True)

    # --- vetoes -------------------------------------------------------------------------------

    def add_veto(self, namespace: str, entry_id: str, query_vector: np.ndarray) -> int:
        """Vetoes ``entry_id`` for lookups near ``query_vector``; returns the entry's wrong
        reports so far."""
        held = self._vetoes.get(entry_id)
        row = query_vector.reshape(1, -1).astype(np.float32)
        self._vetoes[entry_id] = row if held is None else np.vstack([held, row])
        self._vetoed_by_namespace.setdefault(namespace, set()).add(entry_id)
        return len(self._vetoes[entry_id])  # one veto row per wrong report

    def veto_count(self, entry_id: str) -> int:
        """The entry's wrong reports so far."""
        held = self._vetoes.get(entry_id)
        return 0 if held is None else len(held)

    def vetoed(self, entry_id: str, query_vector: np.ndarray) -> bool:
        held = self._vetoes.get(entry_id)
        return held is not None and float(np.max(held @ query_vector)) >= VETO_SIMILARITY

    def forget_entries(self, entry_ids: Iterable[str]) -> None:
        """Drops the vetoes of entries that are gone (removed, replaced, evicted, expired)."""
        gone = {i for i in entry_ids if self._vetoes.pop(i, None) is not None}
        if gone:
            for vetoed in self._vetoed_by_namespace.values():
                vetoed -= gone

    # --- reporting ----------------------------------------------------------------------------

    def status(self, namespace: str) -> PolicyStatus:
        """The namespace's status now; never calibrates (see :meth:`rule`)."""
        rule, ev = self.rule(namespace), self._evidence.get(namespace, _Evidence())
        failure = self._failures.get(namespace)
        policy, d = self.policy(namespace), self.defaults
        if rule.calibration is not None:
            message, source = rule.calibration.message, "calibrated"
        elif rule.bound is not None and failure is not None:
            message = (f"calibration failed ({failure}); serving exact hits only until the "
                       "namespace's policy or evidence changes (the server log has the details)")
            source = "none"
        elif rule.bound is not None:
            message = "serving exact hits only: no rule is calibrated for this bound yet"
            source = "none"
        elif rule.verify:
            gate_from = ("this namespace's min_similarity" if policy.min_similarity is not None
                         else "the server default")
            message = (f"verifier on: candidates with cosine >= {rule.gate:.3f} ({gate_from}) "
                       f"are served when their decision score is >= {rule.threshold:.4f} (no "
                       f"wrong-hit bound set); {d.verify_explanation}")
            source = d.verify_source
        else:
            if policy.min_similarity is not None:
                source, origin = "policy", "this namespace's min_similarity"
            else:
                source, origin = "min_similarity", "the server's --min-similarity"
            message = (f"served when cosine >= {rule.gate:.3f} ({origin}; no wrong-hit bound "
                       "set, no verifier)")
        if namespace in self._calibrating and rule.bound is not None:
            message = (f"calibrating a wrong-hit bound of {rule.bound:g} on {ev.count} "
                       f"labelled observations; until it finishes, {message}")
        return PolicyStatus(namespace, policy, rule, ev.count,
                            ev.correct_count, ev.feedback_correct, ev.feedback_wrong,
                            len(self._vetoed_by_namespace.get(namespace, ())), message, source)

    def namespaces(self) -> list[str]:
        return sorted(set(self._policies) | set(self._evidence))

    def counts(self) -> dict[str, tuple[int, int, int, int]]:
        """(observations, correct feedback, wrong feedback, vetoed entries) of every namespace
        with a policy or evidence: what Stats reports, without building each one's status."""
        out = {}
        for ns in self.namespaces():
            ev = self._evidence.get(ns)
            vetoed = len(self._vetoed_by_namespace.get(ns, ()))
            out[ns] = (0, 0, 0, vetoed) if ev is None else (
                ev.count, ev.feedback_correct, ev.feedback_wrong, vetoed)
        return out

    def close(self) -> None:
        """Stops calibrating (a running one finishes first) and closes the file."""
        self._closed = True
        for task in self._calibrating.values():
            task.cancel()
        if self._own_executor:
            self._executor.shutdown(wait=True, cancel_futures=True)
        with self._db_lock:
            self._db.close()


def _checked(policy: Policy) -> Policy:
    """The policy with its numbers checked (and -0.0 made 0.0); raises InvalidArgument."""
    return Policy(
        None if policy.max_wrong_rate is None else validation.wrong_rate(policy.max_wrong_rate),
        None if policy.min_similarity is None else validation.similarity(policy.min_similarity),
        policy.verify)


def _finite(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and \
        math.isfinite(value)
