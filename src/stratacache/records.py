"""The cache entry as every tier sees it, and its one on-disk encoding.

The warm (LMDB) and cold (SQLite) tiers store the same bytes, so an entry moves between them
without re-encoding. Layout of an encoded entry (all integers little-endian):

    u8  format version (1)
    u32 length H of the JSON header
    H   JSON header: id, namespace, partition, exact key, prompt, times, template, user, metadata
    4*dim bytes: the unit-normalised float32 embedding (dim may be 0: vector kept elsewhere)
    the response bytes, to the end
"""

from __future__ import annotations

import enum
import json
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

_FORMAT_VERSION = 1
_PREFIX = struct.Struct("<BI")


class Tier(enum.IntEnum):
    """Where a hit came from; values match ``stratacache.v1.Tier``."""

    EXACT = 1
    HOT = 2
    WARM = 3
    COLD = 4


@dataclass(frozen=True, slots=True)
class Entry:
    """One stored answer. ``vector`` is unit-normalised float32; times are Unix seconds."""

    id: str
    namespace: str
    partition: bytes
    exact_key: bytes
    prompt: str
    response: bytes
    vector: np.ndarray
    created_at: float
    expires_at: float | None = None
    template_id: str | None = None
    template_version: str | None = None
    user_id: str | None = None
    metadata: Mapping[str, str] = field(default_factory=dict)

    def expired(self, now: float) -> bool:
        return self.expires_at is not None and self.expires_at <= now


@dataclass(frozen=True, slots=True)
class EntryInfo:
    """What tiers keep in memory about an entry they hold on disk: enough to filter, expire and
    invalidate without reading the entry back."""

    id: str
    namespace: str
    partition: bytes
    exact_key: bytes
    expires_at: float | None
    template_id: str | None
    template_version: str | None
    user_id: str | None
    size: int

    @classmethod
    def of(cls, entry: Entry, size: int) -> "EntryInfo":
        return cls(entry.id, entry.namespace, entry.partition, entry.exact_key, entry.expires_at,
                   entry.template_id, entry.template_version, entry.user_id, size)


def encode(entry: Entry, *, with_vector: bool = True) -> bytes:
    """The entry's bytes; ``with_vector=False`` leaves the vector out for a store that keeps
    vectors in a column of their own (give it back to :func:`decode`)."""
    vector = np.ascontiguousarray(entry.vector, dtype="<f4").tobytes() if with_vector else b""
    header = json.dumps({
        "id": entry.id,
        "ns": entry.namespace,
        "part": entry.partition.hex(),
        "exact": entry.exact_key.hex(),
        "prompt": entry.prompt,
        "created": entry.created_at,
        "expires": entry.expires_at,
        "tid": entry.template_id,
        "tver": entry.template_version,
        "user": entry.user_id,
        "meta": dict(entry.metadata),
        "dim": len(vector) // 4,
    }, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    return b"".join((_PREFIX.pack(_FORMAT_VERSION, len(header)), header, vector, entry.response))


def decode(data: bytes | memoryview, vector: np.ndarray | None = None, *,
           with_response: bool = True) -> Entry:
    """The entry encoded in ``data``; ``vector`` supplies one encoded without it, and
    ``with_response=False`` leaves the response out (b"") for callers that only index."""
    version, header_len = _PREFIX.unpack_from(data, 0)
    if version != _FORMAT_VERSION:
        raise ValueError(f"unknown entry format version {version}")
    start = _PREFIX.size
    h = json.loads(bytes(data[start:start + header_len]))
    start += header_len
    vector_end = start + 4 * h["dim"]
    if vector is None:
        vector = np.frombuffer(bytes(data[start:vector_end]), dtype="<f4")
    return Entry(
        id=h["id"], namespace=h["ns"], partition=bytes.fromhex(h["part"]),
        exact_key=bytes.fromhex(h["exact"]), prompt=h["prompt"], response=bytes(data[vector_end:]) if with_response else b"",
        vector=vector, created_at=h["created"], expires_at=h["expires"], template_id=h["tid"],
        template_version=h["tver"], user_id=h["user"], metadata=h["meta"])
