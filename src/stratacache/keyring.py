"""Per-user record keys, so that deleting a user erases every copy of their records.

LMDB never scrubs its free pages: a deleted record's bytes stay in ``data.mdb`` until the page
is reused. Records of entries with a user are therefore encrypted (AES-256-GCM, see
:mod:`stratacache.records`) with a key of that user's own, kept here; :meth:`KeyRing.destroy`
deletes the key, and every copy of those records, wherever it lies, becomes unreadable.

The keys live in one SQLite file (the caller picks the path), set up so that a destroyed key
leaves no copy in it:

- ``secure_delete=ON``: SQLite overwrites deleted rows (key, user id, index entries) with zeros
  in the file instead of leaving them in free space.
- Rollback journal in DELETE mode, not WAL: the journal exists only during a transaction and is
  deleted at its commit, so once :meth:`KeyRing.destroy` returns the main file is the only file,
  and it holds zeros where the key was. WAL would keep the key's old page in ``-wal`` frames
  until a TRUNCATE checkpoint, one more step that can be skipped or fail; keys are written once
  per user, so WAL's cheaper commits buy nothing here.
- ``synchronous=EXTRA``: FULL, plus an fsync of the directory after the journal is deleted. With
  FULL alone a power cut just after a commit could bring the journal back, and SQLite would roll
  the destroy back, key and all. The same holds for a new key: it is durable before
  :meth:`KeyRing.key_for` returns it, so no record is ever written under a key a crash can lose.

What no file-level erase reaches: blocks the file system freed (the deleted journal's) and
copies an SSD keeps internally; full-disk encryption covers those.

A key belongs to a user in one namespace (DeleteUser may name a namespace, and must then leave
the user's records elsewhere readable); the file's ``user_id`` column holds ``user, NUL,
namespace``, so all of a user's keys sort together.

A destroyed key leaves a tombstone, its random key id alone (no user id, no key), so that a
record under a destroyed key (erased: drop it) is told apart from one whose key id is damaged
or unknown (corrupt: set it aside). A user stored again after being deleted gets a new key.

Keys are cached in memory, at most ``cache_keys`` of them (user ids come from clients, so the
cache must be bounded), least recently used first out; misses read the file. All methods are
thread-safe and may block on disk (reads on a miss, fsyncs on :meth:`KeyRing.key_for`'s first
use for a user and on :meth:`KeyRing.destroy`): call them off the event loop, except lookups
that hit the cache.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

#: Keys held in memory by default (about 200 bytes each with their ids: 2 MB).
KEY_CACHE_SIZE = 10_000
#: AES-256: 32-byte keys.
KEY_BYTES = 32
#: Random key ids, the only thing a record says in clear about whose it is.
KEY_ID_BYTES = 16

_SCHEMA = """
CREATE TABLE IF NOT EXISTS user_keys (
    user_id TEXT PRIMARY KEY,
    key_id BLOB NOT NULL UNIQUE,
    key BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS destroyed_keys (key_id BLOB PRIMARY KEY) WITHOUT ROWID;
"""


class KeyRing:
    """Per-user AES-256 keys in a SQLite file, with a bounded in-memory cache.

    Args:
        path: the key file (created, readable by its owner only, if missing).
        cache_keys: keys held in memory at most (least recently used out first).

    Raises:
        ValueError: ``cache_keys`` is below 1.
        sqlite3.Error: the file cannot be opened as a key file.
    """

    def __init__(self, path: Path, *, cache_keys: int = KEY_CACHE_SIZE) -> None:
        if cache_keys < 1:
            raise ValueError(f"cache_keys is {cache_keys}; it must be at least 1")
        self.path = path
        self.cache_keys = cache_keys
        if not path.exists():
            # Journals SQLite creates beside it take the same permissions.
            os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA secure_delete=ON")
        self._db.execute("PRAGMA journal_mode=DELETE")
        self._db.execute("PRAGMA synchronous=EXTRA")
        self._db.executescript(_SCHEMA)
        # Lock order: _db_lock, then _lock. Cache hits take _lock alone, so they never wait on
        # an fsync; every change of the file and the cache change that follows it happen under
        # _db_lock, so a key read from the file before a destroy cannot enter the cache after it.
        self._db_lock = threading.Lock()
        self._lock = threading.Lock()
        self._keys: OrderedDict[bytes, tuple[str, bytes]] = OrderedDict()  # key id -> user, key
        self._key_ids: dict[str, bytes] = {}  # user -> key id, for the keys in _keys

    def key_for(self, user_id: str, namespace: str = "") -> tuple[bytes, bytes]:
        """The user's key in ``namespace``, created and durably stored on first use.

        Args:
            user_id: the user.
            namespace: the namespace of the records it encrypts.

        Returns:
            (key id, 16 bytes; key, 32 bytes).

        Raises:
            sqlite3.Error: the key file cannot be read or written.
        """
        owner = _owner(user_id, namespace)
        with self._lock:
            key_id = self._key_ids.get(owner)
            if key_id is not None:
                self._keys.move_to_end(key_id)
                return key_id, self._keys[key_id][1]
        with self._db_lock:
            with self._transaction():
                row = self._db.execute("SELECT key_id, key FROM user_keys WHERE user_id = ?",
                                       (owner,)).fetchone()
                if row is None:
                    row = (os.urandom(KEY_ID_BYTES), os.urandom(KEY_BYTES))
                    self._db.execute("INSERT INTO user_keys VALUES (?, ?, ?)",
                                     (owner, *row))
            key_id, key = bytes(row[0]), bytes(row[1])
            self._remember(key_id, owner, key)
        return key_id, key

    def key(self, key_id: bytes) -> bytes | None:
        """The key with this id; None if it was destroyed or never existed (see
        :meth:`destroyed`).

        Raises:
            sqlite3.Error: the key file cannot be read.
        """
        with self._lock:
            cached = self._keys.get(key_id)
            if cached is not None:
                self._keys.move_to_end(key_id)
                return cached[1]
        with self._db_lock:
            row = self._db.execute("SELECT user_id, key FROM user_keys WHERE key_id = ?",
                                   (key_id,)).fetchone()
            if row is None:
                return None
            self._remember(key_id, row[0], bytes(row[1]))
            return bytes(row[1])

    def destroyed(self, key_id: bytes) -> bool:
        """Whether the key with this id existed and was destroyed (False for an id never seen).

        Raises:
            sqlite3.Error: the key file cannot be read.
        """
        with self._db_lock:
            return self._db.execute("SELECT 1 FROM destroyed_keys WHERE key_id = ?",
                                    (key_id,)).fetchone() is not None

    def destroy(self, user_id: str, namespace: str | None = None) -> int:
        """Deletes the user's keys (in ``namespace``, or in every namespace), durably, from the
        cache and the file (overwritten with zeros, no journal left). Records under them can
        no longer be read; the user's next record gets a new key.

        Args:
            user_id: the user.
            namespace: only this namespace's key; None: all of the user's keys.

        Returns:
            How many keys were destroyed.

        Raises:
            sqlite3.Error: the key file cannot be written (the keys are then still there).
        """
        if namespace is None:  # every owner string from "user NUL" up to "user \x01"
            where, args = "user_id >= ? AND user_id < ?", (user_id + "\x00", user_id + "\x01")
        else:
            where, args = "user_id = ?", (_owner(user_id, namespace),)
        with self._db_lock:
            with self._transaction():
                rows = self._db.execute(f"DELETE FROM user_keys WHERE {where} "
                                        "RETURNING user_id, key_id", args).fetchall()
                self._db.executemany("INSERT OR IGNORE INTO destroyed_keys VALUES (?)",
                                     [(key_id,) for _, key_id in rows])
            with self._lock:
                for owner, _ in rows:
                    key_id = self._key_ids.pop(owner, None)
                    if key_id is not None:
                        del self._keys[key_id]
        return len(rows)

    @property
    def cached(self) -> int:
        """Keys held in memory now (at most ``cache_keys``)."""
        with self._lock:
            return len(self._keys)

    def close(self) -> None:
        with self._db_lock:
            self._db.close()

    def __enter__(self) -> KeyRing:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        """One write transaction, committed durably on leaving (caller holds ``_db_lock``)."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
            self._db.execute("COMMIT")
        except BaseException:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            raise

    def _remember(self, key_id: bytes, user_id: str, key: bytes) -> None:
        """Caches a key read from or written to the file (caller holds ``_db_lock``)."""
        with self._lock:
            self._keys[key_id] = (user_id, key)
            self._keys.move_to_end(key_id)
            self._key_ids[user_id] = key_id
            while len(self._keys) > self.cache_keys:
                old_id, (old_user, _) = self._keys.popitem(last=False)
                del self._key_ids[old_user]


def _owner(user_id: str, namespace: str) -> str:
    """The key's owner as stored: the user, NUL, the namespace (NUL never occurs in either)."""
    return f"{user_id}\x00{namespace}"
