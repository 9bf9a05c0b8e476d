"""The shared store (``serve --shared-store postgresql://...``): one cache for many nodes.

PostgreSQL with pgvector holds every entry the fleet acknowledged; each node keeps its own
tiers (hot, warm, cold) as a cache of it. This module owns everything that talks to the
database:

- the schema, created and migrated by the server (versioned in ``stratacache.meta``), and the
  check that every node embeds with the same model;
- entries: a Store is committed here before it is acknowledged (one live entry per exact key,
  fleet-wide); exact and semantic lookups of what a node does not hold locally (per partition,
  pgvector HNSW on inner product over a half-precision cast of the float32 vector, with
  iterative scans, so filtering by partition costs no recall);
- namespace policies and calibration evidence (labelled pairs and feedback, whose wrong reports
  are the vetoes): the fleet's record, of which each node's ``evidence.sqlite3`` is a copy,
  replaced from here whenever a node starts (or returns after the log was pruned);
- changes every node must apply (invalidations, DeleteUser, DeleteEntry, replaced entries,
  policy changes, evidence added): written to ``stratacache.changes`` in the same transaction
  as the change, numbered, and announced with NOTIFY. Each node's :class:`ChangeFeed` LISTENs,
  applies the changes in order (the node that made a change too: it waits for its own feed,
  so every node applies the same changes the same way) and remembers the last one it applied
  in its data directory, so a node that was disconnected or stopped catches up before it
  serves again from the shared store (and empties its local tiers when the log no longer
  reaches back to where it stopped).

Change rows commit in sequence order: every transaction that writes one takes one advisory
lock as its last step before the insert, so a reader that has seen change N has seen every
change before it.

When the database is unreachable, reads raise :class:`StorageFailed` (a lookup then answers
from the local tiers or misses) and writes raise :class:`Unavailable` at once, with a message
naming the database (never its password).

psycopg is imported here only: a server without ``--shared-store`` never loads it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import records
from .errors import CacheError, InvalidArgument, StorageFailed, Unavailable
from .policy import Observation, Policy
from .records import Entry
from .tiers.base import Filter

log = logging.getLogger(__name__)

#: 1: entries and changes; 2: policies and evidence.
SCHEMA_VERSION = 2
CHANNEL = "stratacache_changes"
#: Advisory lock keys: schema migration, and the order of change rows.
MIGRATE_LOCK = 0x5374726174610001
LOG_LOCK = 0x5374726174610002
#: Changes kept in the log; a node stopped for longer empties its local tiers when it returns.
CHANGE_RETENTION_S = 24 * 3600.0
#: Changes remembered after they were applied, for the cache-fill check (:meth:`changed_since`).
RECENT_CHANGES = 4096
#: Changes read per catch-up query.
CATCH_UP_PAGE = 1000
#: Seconds to connect, and to wait for a pooled connection, before the database counts as down.
CONNECT_TIMEOUT_S = 2
#: Seconds a call waits for a pooled connection before the database counts as down.
POOL_WAIT_S = 0.25
#: Connections per node (the feed has one more of its own).
POOL_SIZE = 4
#: Reconnection backoff of the feed, seconds (capped low: a node must catch up within a second).
RECONNECT_S = (0.1, 1.0)
#: The local file holding the last change this node applied.
STATE_FILE = "shared-store.json"
#: Seconds a node that made a change waits for its own feed to apply it before answering.
APPLY_WAIT_S = 5.0

#: Changes that remove entries (their body is a Filter): "remove" and DeleteUser's "user".
ENTRY_CHANGES = ("remove", "user")
#: Changes to policies and evidence: skipped when the node's copy was taken after them.
BOOK_CHANGES = ("policy", "evidence")
#: One evidence row: its namespace, the observation, and the verifier that scored it (None:
#: unscored by a verifier).
EvidenceRow = tuple[str, Observation, str | None]
#: Every policy and evidence row: of the shared store, or of a node's own copy.
Book = tuple[dict[str, Policy], list[EvidenceRow]]


@dataclass(frozen=True)
class Replica:
    """What the change feed does to the node's local state (the engine's methods).

    Attributes:
        apply: applies one change (kind, body); an "evidence" body carries its rows under
            "observations", read by the feed.
        reset: empties the local tiers.
        take_book: replaces the node's policies and evidence with the shared store's.
        own_book: the node's policies and evidence: the first node to start on a store that
            holds none yet gives it its own (an upgrade from schema 1, or a single node
            joining a new fleet), so no policy floor is lost.
    """

    apply: Callable[[str, dict[str, Any]], Awaitable[None]]
    reset: Callable[[], Awaitable[None]]
    take_book: Callable[[dict[str, Policy], list[EvidenceRow]], Awaitable[None]]
    own_book: Callable[[], Awaitable[Book]]


def describe(dsn: str) -> str:
    """``host:port/dbname as user`` for logs and errors: never the password."""
    from psycopg.conninfo import conninfo_to_dict

    try:
        parts = conninfo_to_dict(dsn)
    except Exception:  # a malformed DSN: say so without echoing it
        return "(a malformed --shared-store)"
    host = parts.get("host") or "localhost"
    return f"{host}:{parts.get('port') or 5432}/{parts.get('dbname') or ''} as " \
           f"{parts.get('user') or '(default user)'}"


def _where(where: Filter) -> tuple[str, list[Any]]:
    """SQL conditions (and parameters) for a Filter over the entries table."""
    clauses, params = [], []
    for column in ("namespace", "template_id", "template_version", "user_id"):
        value = getattr(where, column)
        if value is not None:
            clauses.append(f"{column} = %s")
            params.append(value)
    if where.ids is not None:
        clauses.append("id = ANY(%s)")
        params.append(list(where.ids))
    if where.exact_keys is not None:
        clauses.append("exact_key = ANY(%s)")
        params.append(list(where.exact_keys))
    if where.expired_by is not None:
        clauses.append("expires_at <= %s")
        params.append(where.expired_by)
    return " AND ".join(clauses) or "TRUE", params


def filter_body(where: Filter) -> dict[str, Any]:
    """A Filter as JSON for a change row (ids as a list, exact keys as hex)."""
    body = {k: v for k, v in asdict(where).items() if v is not None}
    if "ids" in body:
        body["ids"] = sorted(body["ids"])
    if "exact_keys" in body:
        body["exact_keys"] = [key.hex() for key in body["exact_keys"]]
    return body


def filter_from(body: dict[str, Any]) -> Filter:
    values = dict(body)
    if "exact_keys" in values:
        values["exact_keys"] = [bytes.fromhex(k) for k in values["exact_keys"]]
    if "ids" in values:
        values["ids"] = frozenset(values["ids"])
    return Filter(**values)


def _schema(dimension: int, m: int, ef_construction: int) -> list[str]:
    return [
        "CREATE SCHEMA IF NOT EXISTS stratacache",
        "CREATE TABLE IF NOT EXISTS stratacache.meta (key text PRIMARY KEY, value jsonb NOT NULL)",
        f"""CREATE TABLE IF NOT EXISTS stratacache.entries (
            id text PRIMARY KEY, namespace text NOT NULL, partition bytea NOT NULL,
            exact_key bytea NOT NULL UNIQUE, template_id text, template_version text,
            user_id text, created_at double precision NOT NULL, expires_at double precision,
            size integer NOT NULL, embedding vector({dimension}) NOT NULL, record bytea NOT NULL)""",
        "CREATE INDEX IF NOT EXISTS entries_partition ON stratacache.entries (partition)",
        "CREATE INDEX IF NOT EXISTS entries_template ON stratacache.entries "
        "(namespace, template_id, template_version)",
        "CREATE INDEX IF NOT EXISTS entries_user ON stratacache.entries (user_id) "
        "WHERE user_id IS NOT NULL",
        "CREATE INDEX IF NOT EXISTS entries_expiry ON stratacache.entries (expires_at) "
        "WHERE expires_at IS NOT NULL",
        """CREATE TABLE IF NOT EXISTS stratacache.changes (seq bigserial PRIMARY KEY,
            at timestamptz NOT NULL DEFAULT now(), kind text NOT NULL, body jsonb NOT NULL)""",
        # Version 2.
        """CREATE TABLE IF NOT EXISTS stratacache.policies (namespace text PRIMARY KEY,
            max_wrong_rate double precision, min_similarity double precision, verify boolean,
            updated_at double precision NOT NULL)""",
        # One row per labelled observation; `batch` groups the rows one call added (the
        # change announcing them names it). Similarities are under the fleet's one embedder;
        # verifier scores under `verifier`, re-scored by a node that runs another.
        """CREATE TABLE IF NOT EXISTS stratacache.evidence (id bigserial PRIMARY KEY,
            batch text NOT NULL, namespace text NOT NULL, source text NOT NULL,
            query text NOT NULL, matched text NOT NULL, correct boolean NOT NULL,
            entry_id text, user_id text, created_at double precision NOT NULL,
            similarity double precision NOT NULL, verifier_score double precision,
            verifier text)""",
        "CREATE INDEX IF NOT EXISTS evidence_batch ON stratacache.evidence (batch)",
        "CREATE INDEX IF NOT EXISTS evidence_namespace ON stratacache.evidence (namespace)",
        "CREATE INDEX IF NOT EXISTS evidence_user ON stratacache.evidence (user_id) "
        "WHERE user_id IS NOT NULL",
        # The HNSW graph, built as the hot tier builds its own (--hnsw-m,
        # --hnsw-ef-construction: with pgvector's default ef_construction of 64, recall@1 of
        # QQP questions at 100,000 entries was 0.95; with 200, 0.99), over a half-precision
        # cast of the vector: the same recall@1 as over float32 at 100,000 QQP entries, in
        # 112 MiB instead of 195 (benchmarks/shared_store.py). The column keeps float32, which
        # every candidate is judged on. Version 1 indexed the float32 vector.
        "DROP INDEX IF EXISTS stratacache.entries_embedding",
        "CREATE INDEX IF NOT EXISTS entries_embedding_half ON stratacache.entries USING hnsw "
        f"((embedding::halfvec({dimension})) halfvec_ip_ops) WITH (m = {int(m)}, "
        f"ef_construction = {int(ef_construction)})",
    ]


def search_sql(dimension: int) -> str:
    """The partition's nearest entries: the HNSW index walks the half-precision cast, and each
    row carries its exact similarity (``<#>``: the negative inner product). Parameters: the
    query vector, the partition, now, the query vector again, k."""
    half = f"halfvec({dimension})"
    return ("SELECT id, record, embedding, embedding <#> %s AS d FROM stratacache.entries "
            "WHERE partition = %s AND (expires_at IS NULL OR expires_at > %s) "
            f"ORDER BY embedding::{half} <#> %s::{half} LIMIT %s")


_EVIDENCE_COLUMNS = ("namespace, source, query, matched, correct, entry_id, user_id, "
                     "similarity, verifier_score, verifier")


def _evidence_row(row: tuple[Any, ...]) -> EvidenceRow:
    namespace, source, query, matched, correct, entry_id, user_id, similarity, score, \
        verifier = row
    return namespace, Observation(query, matched, bool(correct), float(similarity),
                                  None if score is None else float(score), source, entry_id,
                                  user_id), verifier


class SharedStore:
    """One node's connection to the shared store.

    Args:
        dsn: the PostgreSQL connection string (``--shared-store``).
        dimension: the embedding dimension.
        model: the embedding model's name and weights fingerprint (every node must match).
        state_dir: the node's data directory (where the last applied change is kept).
        m, ef_construction: the HNSW graph's parameters, used when the index is created.
        ef_search: HNSW ``ef_search`` for shared searches.
    """

    def __init__(self, dsn: str, *, dimension: int, model: dict[str, str], state_dir: Path,
                 m: int = 16, ef_construction: int = 200, ef_search: int = 64) -> None:
        try:
            import pgvector.psycopg  # noqa: F401
            import psycopg_pool  # noqa: F401
        except ImportError as exc:
            raise CacheError(f"--shared-store needs PostgreSQL's driver ({exc.name} is missing): "
                             "pip install 'stratacache[shared]'") from None
        self.dsn = dsn
        self.name = describe(dsn)
        self._dimension = dimension
        self._model = model
        self._state = state_dir / STATE_FILE
        self._ef_search = ef_search
        self._graph = (m, ef_construction)
        self._search_sql = search_sql(dimension)
        self._pool: Any = None
        self.feed: ChangeFeed | None = None
        self.store_id = ""

    # --- lifecycle ---------------------------------------------------------------------------

    async def open(self, replica: Replica) -> None:
        """Migrates the schema, checks the model, opens the pool and starts the change feed,
        which first replaces the node's policies and evidence with the store's and catches up
        (or empties the local tiers when it cannot).

        Raises:
            CacheError: the database is unreachable, lacks pgvector, is newer than this
                server, or holds vectors of another model (each message says what to do).
        """
        import psycopg
        from psycopg_pool import AsyncConnectionPool

        try:
            async with await psycopg.AsyncConnection.connect(
                    self.dsn, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S) as conn:
                self.store_id = await self._migrate(conn)
        except psycopg.OperationalError as exc:
            raise CacheError(f"the shared store {self.name} is unreachable: "
                             f"{_first_line(exc)}") from None
        self._pool = AsyncConnectionPool(
            self.dsn, min_size=1, max_size=POOL_SIZE, open=False, timeout=CONNECT_TIMEOUT_S,
            kwargs={"autocommit": True, "connect_timeout": CONNECT_TIMEOUT_S,
                    "application_name": "stratacache"},
            configure=self._configure, check=AsyncConnectionPool.check_connection,
            reconnect_timeout=365 * 86400.0, name="stratacache-shared")
        await self._pool.open(wait=True, timeout=CONNECT_TIMEOUT_S * 5)
        self.feed = ChangeFeed(self, replica, self._read_state())
        await self.feed.start(timeout=CONNECT_TIMEOUT_S * 15)

    async def _configure(self, conn: Any) -> None:
        from pgvector.psycopg import register_vector_async

        await register_vector_async(conn)
        # SET takes no bind parameters; set_config does. strict_order: an iterative scan keeps
        # walking the graph until k rows of the partition pass the filter, in distance order.
        await conn.execute("SELECT set_config('hnsw.ef_search', %s, false), "
                           "set_config('hnsw.iterative_scan', 'strict_order', false)",
                           (str(self._ef_search),))

    async def _migrate(self, conn: Any) -> str:
        """Creates or upgrades the schema (one server at a time); returns the store's id."""
        import psycopg

        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATE_LOCK,))
            try:
                await conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
            except psycopg.errors.InsufficientPrivilege:
                raise CacheError(
                    f"the shared store {self.name} lacks the pgvector extension and this user "
                    "may not create it: run `CREATE EXTENSION vector` there as a superuser "
                    "once") from None
            await conn.execute("CREATE SCHEMA IF NOT EXISTS stratacache")
            await conn.execute("CREATE TABLE IF NOT EXISTS stratacache.meta "
                               "(key text PRIMARY KEY, value jsonb NOT NULL)")
            meta = {k: v for k, v in await (await conn.execute(
                "SELECT key, value FROM stratacache.meta")).fetchall()}
            version = int(meta.get("schema_version", 0))
            if version > SCHEMA_VERSION:
                raise CacheError(f"the shared store {self.name} has schema version {version}, "
                                 f"newer than this server's {SCHEMA_VERSION}: upgrade stratacache")
            if version < SCHEMA_VERSION:
                if version:
                    # Every node waits here (the lock) while the HNSW index is built again.
                    log.warning("shared store %s: migrating schema %d to %d (building the "
                                "vector index again: about a minute per 100,000 entries; stop "
                                "every older node first)", self.name, version, SCHEMA_VERSION)
                for statement in _schema(self._dimension, *self._graph):
                    await conn.execute(statement)
                await self._put_meta(conn, "schema_version", SCHEMA_VERSION)
                log.info("shared store %s: schema %s (version %d)", self.name,
                         "migrated" if version else "created", SCHEMA_VERSION)
            model = meta.get("model")
            if model is None:
                await self._put_meta(conn, "model", self._model | {"dimension": self._dimension})
            elif (model.get("fingerprint"), model.get("dimension")) != (
                    self._model["fingerprint"], self._dimension):
                raise CacheError(
                    f"the shared store {self.name} holds vectors of model {model.get('name')!r} "
                    f"(dimension {model.get('dimension')}); this server embeds with "
                    f"{self._model['name']!r} (dimension {self._dimension}). Every node must "
                    "use the same model: start it with that model, or use another database")
            store_id = meta.get("store_id")
            if store_id is None:
                store_id = uuid.uuid4().hex
                await self._put_meta(conn, "store_id", store_id)
            if "pruned_through" not in meta:
                await self._put_meta(conn, "pruned_through", 0)
            return str(store_id)

    @staticmethod
    async def _put_meta(conn: Any, key: str, value: Any) -> None:
        from psycopg.types.json import Jsonb

        await conn.execute("INSERT INTO stratacache.meta VALUES (%s, %s) ON CONFLICT (key) "
                           "DO UPDATE SET value = EXCLUDED.value", (key, Jsonb(value)))

    async def close(self) -> None:
        if self.feed is not None:
            await self.feed.close()
        if self._pool is not None:
            await self._pool.close()

    # --- node state -------------------------------------------------------------------------

    def _read_state(self) -> int | None:
        try:
            state = json.loads(self._state.read_text())
        except (OSError, ValueError):
            return None
        if state.get("store_id") != self.store_id:
            return None  # another database, or the same one re-created
        return int(state["applied"])

    def save_state(self, applied: int) -> None:
        """Records the last change applied (write and rename: never a torn file)."""
        partial = self._state.with_suffix(".partial")
        partial.write_text(json.dumps({"store_id": self.store_id, "applied": applied}))
        os.replace(partial, self._state)

    # --- connections ------------------------------------------------------------------------

    def _check_connected(self, writing: bool) -> None:
        if self.feed is None or not self.feed.connected:
            if writing:
                raise Unavailable(f"the shared store {self.name} is unreachable: nothing was "
                                  "changed; retry once it is back")
            raise StorageFailed(f"the shared store {self.name} is unreachable")

    async def _run(self, writing: bool, work: Callable[[Any], Awaitable[Any]]) -> Any:
        """Runs ``work(conn)`` on a pooled connection; a lost database becomes Unavailable
        (writes) or StorageFailed (reads) at once."""
        import psycopg
        import psycopg_pool

        self._check_connected(writing)
        try:
            # A short wait for a pooled connection: when the database has just gone, a lookup
            # must miss at once rather than wait out its caller's deadline.
            async with self._pool.connection(timeout=POOL_WAIT_S) as conn:
                return await work(conn)
        except (psycopg.OperationalError, psycopg_pool.PoolTimeout) as exc:
            if self.feed is not None:
                self.feed.lost(exc)
            kind = Unavailable if writing else StorageFailed
            raise kind(f"the shared store {self.name} is unreachable ({_first_line(exc)})"
                       + (": nothing was changed; retry once it is back" if writing else "")
                       ) from None
        except psycopg.DataError as exc:  # a text PostgreSQL cannot hold (a NUL character)
            raise InvalidArgument(f"the shared store refused a value: {_first_line(exc)}; "
                                  "nothing was changed") from None

    @staticmethod
    async def _announce(conn: Any, kind: str, body: dict[str, Any]) -> int:
        """Writes a change row and its NOTIFY, inside the caller's transaction. The log lock is
        taken last, so change rows commit in sequence order without deadlocks."""
        from psycopg.types.json import Jsonb

        await conn.execute("SELECT pg_advisory_xact_lock(%s)", (LOG_LOCK,))
        seq = (await (await conn.execute(
            "INSERT INTO stratacache.changes (kind, body) VALUES (%s, %s) RETURNING seq",
            (kind, Jsonb(body)))).fetchone())[0]
        await conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, str(seq)))
        return int(seq)

    # --- entries ----------------------------------------------------------------------------

    async def store(self, entry: Entry) -> list[str]:
        """Commits ``entry``, replacing the entry with its exact key (announced to every node);
        returns the replaced ids.

        Raises:
            Unavailable: the database is unreachable (nothing stored).
        """
        import psycopg

        record = records.encode(entry, with_vector=False)

        async def write(conn: Any) -> list[str]:
            for attempt in range(3):
                try:
                    async with conn.transaction():
                        replaced = [row[0] for row in await (await conn.execute(
                            "DELETE FROM stratacache.entries WHERE exact_key = %s RETURNING id",
                            (entry.exact_key,))).fetchall()]
                        await conn.execute(
                            "INSERT INTO stratacache.entries (id, namespace, partition, "
                            "exact_key, template_id, template_version, user_id, created_at, "
                            "expires_at, size, embedding, record) VALUES "
                            "(%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
                            (entry.id, entry.namespace, entry.partition, entry.exact_key,
                             entry.template_id, entry.template_version, entry.user_id,
                             entry.created_at, entry.expires_at, len(record),
                             entry.vector.astype(np.float32), record))
                        if replaced:
                            await self._announce(conn, "remove", filter_body(Filter(ids=replaced)))
                    return replaced
                except psycopg.errors.UniqueViolation:
                    if attempt == 2:  # another node keeps storing this exact prompt
                        raise
            raise AssertionError("unreachable")

        return await self._run(True, write)

    async def exact(self, key: bytes, now: float) -> Entry | None:
        """The live entry with this exact key, or None.

        Raises:
            StorageFailed: the database is unreachable.
        """
        async def read(conn: Any) -> Entry | None:
            row = await (await conn.execute(
                "SELECT id, record, embedding FROM stratacache.entries WHERE exact_key = %s "
                "AND (expires_at IS NULL OR expires_at > %s)", (key, now))).fetchone()
            return None if row is None else self._entry(row)

        return await self._run(False, read)

    async def get(self, entry_id: str) -> Entry | None:
        async def read(conn: Any) -> Entry | None:
            row = await (await conn.execute(
                "SELECT id, record, embedding FROM stratacache.entries WHERE id = %s",
                (entry_id,))).fetchone()
            return None if row is None else self._entry(row)

        return await self._run(False, read)

    async def search(self, partition: bytes, vector: np.ndarray, k: int,
                     now: float) -> list[tuple[Entry, float]]:
        """The ``k`` live entries of the partition most similar to ``vector``, best first,
        with their similarity (inner product of unit vectors: the cosine).

        Raises:
            StorageFailed: the database is unreachable.
        """
        async def read(conn: Any) -> list[tuple[Entry, float]]:
            rows = await (await conn.execute(
                self._search_sql, (vector, partition, now, vector, k))).fetchall()
            # Best first by the exact similarity: half precision may swap near ties.
            return sorted(((self._entry(row[:3]), -float(row[3])) for row in rows),
                          key=lambda found: -found[1])

        return await self._run(False, read)

    def _entry(self, row: Iterable[Any]) -> Entry:
        entry_id, record, embedding = row
        try:
            vector = embedding.to_numpy() if hasattr(embedding, "to_numpy") else embedding
            return records.decode(bytes(record), np.asarray(vector, dtype=np.float32),
                                  entry_id=entry_id)
        except records.CorruptRecord as exc:
            raise StorageFailed(f"entry {entry_id} in the shared store {self.name} is "
                                f"damaged: {exc}") from None

    async def remove(self, where: Filter, *, kind: str = "remove") -> int:
        """Deletes the entries ``where`` selects and announces it (``kind`` "user" for a
        DeleteUser, which also deletes the evidence rows of the user's entries here, and which
        every node also applies to its local keys and evidence); returns how many entries were
        deleted.

        Raises:
            Unavailable: the database is unreachable (nothing changed).
        """
        sql, params = _where(where)

        async def delete(conn: Any) -> int:
            async with conn.transaction():
                if kind == "user":
                    await self._lock_evidence(conn)
                cursor = await conn.execute(f"DELETE FROM stratacache.entries WHERE {sql}", params)
                if kind == "user":
                    await conn.execute(
                        "DELETE FROM stratacache.evidence WHERE user_id = %s AND "
                        "(%s::text IS NULL OR namespace = %s)",
                        (where.user_id, where.namespace, where.namespace))
                await self._announce(conn, kind, filter_body(where))
                return int(cursor.rowcount)

        return await self._run(True, delete)

    # --- policies and evidence ----------------------------------------------------------------

    @staticmethod
    async def _lock_evidence(conn: Any) -> None:
        """Waits for evidence being added to commit, and holds further additions until this
        transaction ends: a deletion must see every row whose change comes before its own (a
        row it missed would stay here while every node dropped it). Taken first, holding no
        other lock, so no deadlock."""
        await conn.execute("LOCK TABLE stratacache.evidence IN SHARE ROW EXCLUSIVE MODE")

    async def set_policy(self, namespace: str, policy: Policy, *,
                         clear_evidence: bool = False) -> int:
        """Replaces the namespace's policy (and deletes its evidence if asked), announced to
        every node; returns the change's number (see :meth:`applied_through`).

        Raises:
            Unavailable: the database is unreachable (nothing changed).
        """
        async def write(conn: Any) -> int:
            async with conn.transaction():
                await conn.execute(
                    "INSERT INTO stratacache.policies VALUES (%s, %s, %s, %s, %s) "
                    "ON CONFLICT (namespace) DO UPDATE SET max_wrong_rate = "
                    "EXCLUDED.max_wrong_rate, min_similarity = EXCLUDED.min_similarity, "
                    "verify = EXCLUDED.verify, updated_at = EXCLUDED.updated_at",
                    (namespace, policy.max_wrong_rate, policy.min_similarity, policy.verify,
                     time.time()))
                if clear_evidence:
                    await self._lock_evidence(conn)
                    await conn.execute("DELETE FROM stratacache.evidence WHERE namespace = %s",
                                       (namespace,))
                return await self._announce(conn, "policy", {
                    "namespace": namespace, "policy": asdict(policy),
                    "clear_evidence": clear_evidence})

        return int(await self._run(True, write))

    async def add_evidence(self, namespace: str, observations: list[Observation],
                           verifier: str | None) -> int:
        """Adds scored observations (verifier scores by ``verifier``) to the namespace's
        evidence, announced to every node; returns the change's number.

        Raises:
            Unavailable: the database is unreachable (nothing added).
        """
        batch = uuid.uuid4().hex

        async def write(conn: Any) -> int:
            async with conn.transaction():
                await self._insert_evidence(conn, batch, [
                    (namespace, o, None if o.verifier_score is None else verifier)
                    for o in observations])
                return await self._announce(conn, "evidence",
                                            {"namespace": namespace, "batch": batch})

        return int(await self._run(True, write))

    async def applied_through(self, seq: int) -> bool:
        """Waits (up to APPLY_WAIT_S) until this node has applied change ``seq``; False if it
        has not (its feed is reconnecting: it applies the change when it is back)."""
        return self.feed is not None and await self.feed.reached(seq, APPLY_WAIT_S)

    @staticmethod
    async def evidence_batch(conn: Any, batch: str) -> list[EvidenceRow]:
        rows = await (await conn.execute(
            f"SELECT {_EVIDENCE_COLUMNS} FROM stratacache.evidence WHERE batch = %s ORDER BY id",
            (batch,))).fetchall()
        return [_evidence_row(row) for row in rows]

    @staticmethod
    async def _insert_evidence(conn: Any, batch: str, rows: list[EvidenceRow]) -> None:
        """Writes evidence rows as one batch, inside the caller's transaction."""
        now = time.time()
        async with conn.cursor() as cursor:
            await cursor.executemany(
                f"INSERT INTO stratacache.evidence (batch, created_at, {_EVIDENCE_COLUMNS}) "
                "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
                [(batch, now, ns, o.source, o.query, o.matched, o.correct, o.entry_id,
                  o.user_id, o.similarity, o.verifier_score, verifier)
                 for ns, o, verifier in rows])

    @staticmethod
    async def seed_book(conn: Any, own_book: Callable[[], Awaitable[Book]]) -> int | None:
        """Gives a store whose book was never seeded the node's own policies and evidence
        (one node does it, once); returns how many policies it gave, None if it was seeded."""
        from psycopg.types.json import Jsonb

        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATE_LOCK,))
            row = await (await conn.execute(
                "SELECT value FROM stratacache.meta WHERE key = 'book_seeded'")).fetchone()
            if row is not None:
                return None
            policies, evidence = await own_book()
            now = time.time()
            async with conn.cursor() as cursor:
                await cursor.executemany(
                    "INSERT INTO stratacache.policies VALUES (%s, %s, %s, %s, %s)",
                    [(ns, p.max_wrong_rate, p.min_similarity, p.verify, now)
                     for ns, p in policies.items()])
            await SharedStore._insert_evidence(conn, "seed", evidence)
            await conn.execute("INSERT INTO stratacache.meta VALUES ('book_seeded', %s)",
                               (Jsonb(True),))
            return len(policies)

    @staticmethod
    async def snapshot(conn: Any) -> tuple[int, dict[str, Policy], list[EvidenceRow]]:
        """(the last change, every policy, every evidence row), as of that change: one
        repeatable-read transaction, and change rows commit in sequence order."""
        async with conn.transaction():
            await conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            # A log pruned empty still counts the changes it held.
            seq = (await (await conn.execute(
                "SELECT greatest((SELECT coalesce(max(seq), 0) FROM stratacache.changes), "
                "(SELECT value::bigint FROM stratacache.meta WHERE key = 'pruned_through'))"
            )).fetchone())[0]
            policies = {ns: Policy(rate, cosine, verify) for ns, rate, cosine, verify in
                        await (await conn.execute(
                            "SELECT namespace, max_wrong_rate, min_similarity, verify FROM "
                            "stratacache.policies")).fetchall()}
            evidence = [_evidence_row(row) for row in await (await conn.execute(
                f"SELECT {_EVIDENCE_COLUMNS} FROM stratacache.evidence ORDER BY id")).fetchall()]
        return int(seq), policies, evidence

    async def sweep(self, now: float) -> int:
        """Housekeeping: deletes expired rows (never served anyway: no announcement needed)
        and changes older than CHANGE_RETENTION_S; returns the expired rows deleted."""
        async def work(conn: Any) -> int:
            expired = await conn.execute(
                "DELETE FROM stratacache.entries WHERE expires_at <= %s", (now,))
            async with conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock(%s)", (LOG_LOCK,))
                row = await (await conn.execute(
                    "WITH gone AS (DELETE FROM stratacache.changes WHERE at < now() - "
                    "make_interval(secs => %s) RETURNING seq) SELECT max(seq) FROM gone",
                    (CHANGE_RETENTION_S,))).fetchone()
                if row[0] is not None:
                    await self._put_meta(conn, "pruned_through", int(row[0]))
            return int(expired.rowcount)

        return await self._run(True, work)

    async def count(self) -> int:
        async def read(conn: Any) -> int:
            return int((await (await conn.execute(
                "SELECT count(*) FROM stratacache.entries")).fetchone())[0])

        return await self._run(False, read)

    @staticmethod
    async def pruned_through(conn: Any) -> int:
        """The last change deleted from the log (0: none yet)."""
        row = await (await conn.execute(
            "SELECT value FROM stratacache.meta WHERE key = 'pruned_through'")).fetchone()
        return int(row[0]) if row else 0

    @staticmethod
    async def changes_after(conn: Any, seq: int) -> list[tuple[int, str, dict[str, Any]]]:
        rows = await (await conn.execute(
            "SELECT seq, kind, body FROM stratacache.changes WHERE seq > %s ORDER BY seq "
            "LIMIT %s", (seq, CATCH_UP_PAGE))).fetchall()
        return [(int(s), str(k), dict(b)) for s, k, b in rows]

    async def pool_ready(self) -> None:
        """Drops the pool's connections that died with the database and checks that a fresh
        one works (raises if not), so reads and writes resume as soon as the feed does."""
        await self._pool.check()
        async with self._pool.connection(timeout=CONNECT_TIMEOUT_S) as conn:
            await conn.execute("SELECT 1")

    def changed_since(self, seq: int, entry: Entry) -> bool:
        """Whether a change applied after change ``seq`` may touch ``entry`` (or the changes
        remembered no longer reach back that far): a copy of it read or written before such
        a change must not be cached locally."""
        return self.feed is None or self.feed.touched_since(seq, entry)

    @property
    def applied(self) -> int:
        return 0 if self.feed is None else self.feed.applied

    @property
    def connected(self) -> bool:
        """Whether the store is reachable (and this node caught up): writes can succeed."""
        return self.feed is not None and self.feed.connected


class ChangeFeed:
    """LISTENs for changes and applies them, in order, once each, on the event loop.

    ``connected`` is False from a lost connection until the feed is listening again and has
    caught up: the shared store is not read or written meanwhile (lookups use the local tiers
    alone), so a node never serves from the shared store an entry invalidated while it was
    away. ``on_connected`` callbacks hear each change of it (health checks).

    On its first connection, and on any after the log was pruned past the last change it
    applied, the feed replaces the node's policies and evidence with the store's; in the
    second case, and when the node never saw this store, it also empties the local tiers.

    A change the node fails to apply (a bug, a local disk error) does not stop the feed: a
    policy or evidence change makes it take the store's policies and evidence whole again, an
    entry change empties the local tiers (they may hold what it removed). Only a failure of
    that remedy, or of the connection, stops it, to retry.
    """

    def __init__(self, store: SharedStore, replica: Replica, applied: int | None) -> None:
        self._store = store
        self._replica = replica
        #: The last change applied; None: this node never saw this store.
        self._applied = applied
        #: Policy and evidence changes up to here are in the node's copy already; None: the
        #: node must take the store's copy before applying any.
        self._synced_through: int | None = None
        self._connected = False
        self.on_connected: list[Callable[[bool], None]] = []
        self._recent: deque[tuple[int, Filter | None]] = deque(maxlen=RECENT_CHANGES)
        self._forgotten = applied or 0  # changes up to here are no longer in _recent
        self._task: asyncio.Task[None] | None = None
        self._advanced = asyncio.Event()
        self._ready = asyncio.Event()
        self._lost = False
        self._failure: str | None = None

    @property
    def applied(self) -> int:
        return self._applied or 0

    @property
    def connected(self) -> bool:
        return self._connected

    @connected.setter
    def connected(self, value: bool) -> None:
        if value != self._connected:
            self._connected = value
            for callback in self.on_connected:
                callback(value)

    async def start(self, timeout: float) -> None:
        """Starts the feed and waits until it has caught up once.

        Raises:
            CacheError: it could not within ``timeout`` seconds (the message says why).
        """
        self._task = asyncio.get_running_loop().create_task(self._run(), name="change-feed")
        ready = asyncio.ensure_future(self._ready.wait())
        await asyncio.wait([self._task, ready], timeout=timeout,
                           return_when=asyncio.FIRST_COMPLETED)
        if self._task.done():
            self._task.result()
        if not self._ready.is_set():
            ready.cancel()
            await self.close()
            raise CacheError(f"the shared store {self._store.name} could not be followed within "
                             f"{timeout:g} s: {self._failure or 'no answer'}")

    def lost(self, exc: BaseException) -> None:
        """A query failed for the connection's sake: stop using the store until reconnected."""
        if self.connected:
            log.warning("lost the shared store %s (%s): serving from local tiers until it is "
                        "back", self._store.name, _first_line(exc))
        self.connected = False
        self._lost = True  # the listener reconnects and catches up within a second

    async def reached(self, seq: int, timeout: float) -> bool:
        """Waits until change ``seq`` is applied; False after ``timeout`` seconds."""
        deadline = asyncio.get_running_loop().time() + timeout
        while self.applied < seq:
            remaining = deadline - asyncio.get_running_loop().time()
            try:
                await asyncio.wait_for(self._advanced.wait(), max(remaining, 0))
            except TimeoutError:
                return False
        return True

    def touched_since(self, seq: int, entry: Entry) -> bool:
        if seq < self._forgotten:
            return True
        return any(s > seq and (where is None or where.matches(entry))
                   for s, where in self._recent)

    async def _run(self) -> None:
        import psycopg

        delay = RECONNECT_S[0]
        while True:
            try:
                async with await psycopg.AsyncConnection.connect(
                        self._store.dsn, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S,
                        application_name="stratacache-feed") as conn:
                    await conn.execute(f"LISTEN {CHANNEL}")
                    await self._resync_if_needed(conn)
                    caught_up_from = self.applied
                    await self._catch_up(conn)
                    # A sweep that pruned the log while this node caught up may have taken
                    # changes it never read.
                    if self._applied is not None and \
                            caught_up_from < await self._store.pruned_through(conn):
                        await self._resync_if_needed(conn, force=True)
                        await self._catch_up(conn)
                    await self._store.pool_ready()
                    if not self.connected:
                        log.info("shared store %s: listening for changes (applied through %d)",
                                 self._store.name, self.applied)
                    self.connected = True
                    self._failure = None
                    self._ready.set()
                    delay = RECONNECT_S[0]
                    while True:
                        async for _ in conn.notifies(timeout=1.0, stop_after=1):
                            pass
                        await self._catch_up(conn)
                        await conn.execute("SELECT 1")  # a heartbeat: a dead server is noticed
                        if self._lost:
                            self._lost = False
                            raise ConnectionError("a query on another connection failed")
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if self.connected or self._failure is None:  # once per outage
                    log.warning("%s the shared store %s (%s): serving from local tiers until "
                                "it is back", "lost" if self.connected else "cannot follow",
                                self._store.name, _first_line(exc),
                                exc_info=not isinstance(exc, (psycopg.OperationalError,
                                                              ConnectionError)))
                self._failure = _first_line(exc)
                self.connected = False
                await asyncio.sleep(delay)
                delay = min(delay * 2, RECONNECT_S[1])

    async def _resync_if_needed(self, conn: Any, *, force: bool = False) -> None:
        """Takes the store's policies and evidence at the first connection (giving it this
        node's own if it has none yet), and empties the local tiers too where the log cannot
        say what changed since this node last looked (or ``force``)."""
        pruned = await self._store.pruned_through(conn)
        reset = force or self._applied is None or self._applied < pruned
        if not reset and self._synced_through is not None:
            return
        self._synced_through = None  # until the copy below is taken whole
        seeded = await self._store.seed_book(conn, self._replica.own_book)
        if seeded is not None:
            log.info("shared store %s: had no policies or evidence; this node gave it its own "
                     "(%d policies)", self._store.name, seeded)
        seq, policies, evidence = await self._store.snapshot(conn)
        if reset:
            log.warning("local tiers emptied: they may hold entries changed in the shared "
                        "store since this node last saw it (%s)", "never seen"
                        if self._applied is None else f"it stopped at change {self._applied}, "
                        f"the log starts after {pruned}")
            await self._replica.reset()
            self._recent.clear()
            self._forgotten = self._applied = seq
            self._store.save_state(seq)
            self._wake()
        await self._replica.take_book(policies, evidence)
        self._synced_through = seq
        log.info("shared store %s: %d policies and %d evidence rows taken as of change %d",
                 self._store.name, len(policies), len(evidence), seq)

    async def _catch_up(self, conn: Any) -> None:
        while True:
            changes = await self._store.changes_after(conn, self.applied)
            if not changes:
                return
            for seq, kind, body in changes:
                if seq <= self.applied:  # a reset while this page was read skipped past it
                    continue
                if kind in BOOK_CHANGES:
                    if self._synced_through is None:
                        await self._resync_if_needed(conn)  # after a failed book change
                    if seq > (self._synced_through or 0):  # else in the copy taken already
                        await self._apply(conn, seq, kind, body)
                else:
                    if len(self._recent) == self._recent.maxlen:
                        self._forgotten = self._recent[0][0]
                    # Remembered before it is applied: a lookup that read an entry before this
                    # change must see it when it decides whether to cache the entry. An
                    # unknown kind (None) is taken to touch every entry.
                    try:
                        where = filter_from(body) if kind in ENTRY_CHANGES else None
                    except (TypeError, ValueError):  # malformed: apply() says so
                        where = None
                    self._recent.append((seq, where))
                    await self._apply(conn, seq, kind, body)
                self._applied = max(self.applied, seq)  # a reset in _apply may have passed it
            self._store.save_state(self.applied)
            self._wake()

    async def _apply(self, conn: Any, seq: int, kind: str, body: dict[str, Any]) -> None:
        """Applies one change; one the node fails to apply is remedied (see the class doc)."""
        import psycopg

        if kind == "evidence":  # its rows, read here: a failure is the connection's
            body = body | {"observations": await self._store.evidence_batch(conn,
                                                                            body["batch"])}
        try:
            await self._replica.apply(kind, body)
        except (asyncio.CancelledError, psycopg.OperationalError):
            raise
        except Exception:
            if kind in BOOK_CHANGES:
                log.exception("could not apply change %d (%s) of the shared store %s: taking "
                              "its policies and evidence whole again", seq, kind,
                              self._store.name)
                self._synced_through = None
                await self._resync_if_needed(conn)
            else:
                log.exception("could not apply change %d (%s) of the shared store %s: "
                              "emptying the local tiers, which may hold what it removed", seq,
                              kind, self._store.name)
                await self._replica.reset()

    def _wake(self) -> None:
        self._advanced.set()
        self._advanced = asyncio.Event()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


# --- `stratacache db check` -------------------------------------------------------------------

def add_arguments(parser: Any) -> None:
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    check = actions.add_parser(
        "check", help="say whether a database is ready to be a shared store",
        description="Connects to the database and reports PostgreSQL's version, pgvector, the "
                    "schema version, the embedding model recorded there and the entry count. "
                    "Exit status 0: ready (a server can start on it; it creates or migrates "
                    "the schema itself); 1: not ready (the output says why); 2: unreachable.")
    check.add_argument("--shared-store", default=os.environ.get("STRATACACHE_SHARED_STORE"),
                       metavar="DSN", help="the PostgreSQL connection string "
                       "[env STRATACACHE_SHARED_STORE]")


def run(args: Any) -> int:
    if not args.shared_store:
        print("give the database: --shared-store postgresql://... (or STRATACACHE_SHARED_STORE)")
        return 2
    return asyncio.run(check(args.shared_store))


async def check(dsn: str, out: Callable[[str], None] = print) -> int:
    """Reports on a database as a shared store; returns the exit status (see ``db check``)."""
    import psycopg

    name = describe(dsn)
    try:
        conn = await psycopg.AsyncConnection.connect(dsn, autocommit=True,
                                                     connect_timeout=CONNECT_TIMEOUT_S)
    except psycopg.OperationalError as exc:
        out(f"unreachable: {name}: {_first_line(exc)}")
        return 2
    problems = []
    async with conn:
        async def one(sql: str) -> Any:
            row = await (await conn.execute(sql)).fetchone()
            return None if row is None else row[0]

        out(f"database      {name}")
        out(f"postgresql    {await one('SHOW server_version')}")
        installed = await one("SELECT extversion FROM pg_extension WHERE extname = 'vector'")
        available = await one("SELECT default_version FROM pg_available_extensions "
                              "WHERE name = 'vector'")
        superuser = await one("SELECT rolsuper FROM pg_roles WHERE rolname = current_user")
        if installed:
            out(f"pgvector      {installed} (installed)")
        elif available and superuser:
            out(f"pgvector      {available} (available: the first server creates it)")
        else:
            out(f"pgvector      {available or 'not available'} (not installed)")
            problems.append("pgvector is not installed" + (
                ": run `CREATE EXTENSION vector` as a superuser" if available else
                ": install pgvector on the database server"))
        version = installed or available or "0"
        if tuple(int(p) for p in version.split(".")[:2] if p.isdigit()) < (0, 8):
            problems.append(f"pgvector {version} has no iterative index scans: use 0.8 or newer")
        meta = {}
        if await one("SELECT to_regclass('stratacache.meta')"):
            meta = {k: v for k, v in await (await conn.execute(
                "SELECT key, value FROM stratacache.meta")).fetchall()}
        schema = int(meta.get("schema_version", 0))
        if schema > SCHEMA_VERSION:
            problems.append(f"schema version {schema} is newer than this stratacache's "
                            f"{SCHEMA_VERSION}: upgrade stratacache")
        out(f"schema        {schema or 'none yet'} (this stratacache: {SCHEMA_VERSION}; "
            f"servers create or migrate it at start)")
        model = meta.get("model")
        out("model         " + ("none yet" if not model else
                                f"{model.get('name')} (dimension {model.get('dimension')})"))
        if schema:
            out(f"entries       {await one('SELECT count(*) FROM stratacache.entries')}")
        commit = await one("SHOW synchronous_commit")
        out(f"sync commit   {commit}")
        if commit == "off":
            problems.append("synchronous_commit is off: an acknowledged Store could be lost in "
                            "a database crash; turn it on")
    for problem in problems:
        out(f"not ready: {problem}")
    if not problems:
        out("ready")
    return 1 if problems else 0
