"""The cache entry as every tier sees it, and its one on-disk encoding.

The warm (LMDB) and cold (SQLite) tiers store the same encoding, so an entry moves between them
without a second format. :func:`encode` writes version 2; :func:`decode` reads versions 1 and 2
and raises :class:`CorruptRecord` for any record it cannot vouch for, never a parsing error.

A record has two parts, each verified on its own: the *meta* part (header, vector) that every
decode reads, and the *response* that only ``with_response=True`` reads. A start-up scan thus
touches one or two pages of each record, as with version 1, and still verifies all it uses.

Version 2, plain (entries without a user, or encoded without a key ring); little-endian:

    u8  2                 format version
    u8  flags             bit 0 clear (plain); bit 1: the vector is stored apart from the record
    u32 H                 length of the JSON header
    u32 meta CRC-32       over bytes 0-5, 10 to the end of the meta part, then a vector stored apart
    u32 response CRC-32   over the response
    H   JSON header       id, namespace, partition, exact key, prompt, times, template, user,
                          metadata, dim (the vector's length, wherever it is), rlen (response
                          bytes), and ``cost`` when the entry has one (see below)
    4*dim bytes           the unit-normalised float32 embedding (absent when stored apart)
    the response bytes, to the end

CRC-32 (zlib's) rather than a keyed or cryptographic hash: it guards against accidental damage,
not an adversary; it detects every error burst of up to 32 bits, so any one changed byte is
always caught, not just with high probability; and it costs about a third of a microsecond per
KiB here, a quarter of blake2b's cost.

Version 2, encrypted (entries with a user, encoded with a :class:`~stratacache.keyring.KeyRing`):
the clear part says only the version, that the record is encrypted, and a random key id.

    u8  2, u8 flags (bit 0 set; bit 1 as above), u32 M (length of the meta ciphertext)
    16  key id            random, stored beside the key in the key ring; not the user id
    12  nonce             random; its top bit is clear (the response uses it with the bit set)
    M   AES-256-GCM of (u32 H, JSON header, vector unless stored apart)
    the rest: AES-256-GCM of the response

The GCM tags authenticate, so encrypted records carry no CRC. The meta part's associated data is
bytes 0-33, the entry id and the vector stored apart, so a record is bound to its id and to its
vector; the response's is bytes 0-33, the meta tag and the entry id, binding it to its meta
part. Destroying the user's key makes every copy unreadable, including those LMDB leaves in free
pages. A vector stored apart stays in clear (decoding never needs the key to read it): the cold
tier keeps it in a column of its own and must scrub deleted rows itself (SQLite's
``secure_delete``, then a WAL checkpoint that truncates), as it must for its user id column.

The header's ``cost`` (what the answer cost to make: ``{"model", "prompt_tokens",
"completion_tokens", "latency_s"}``, each key present only when known) is optional: records
written before it existed, and entries stored without a cost, have no such key and decode with
``cost`` None; a build that predates it ignores it. So it needs no new format version.

Version 1 (existing data directories; no checksum, so damage that leaves the header valid goes
unseen): u8 1, u32 H, JSON header (dim 0 when the vector is stored apart), vector, response.
A version 2 record whose version byte is damaged into 1 is still rejected: its byte 5 (the high
byte of H or M, far below 16 MiB) is 0, where version 1 has the ``{`` of its header.
"""

from __future__ import annotations

import enum
import json
import os
import struct
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

if TYPE_CHECKING:
    from .keyring import KeyRing

#: The version :func:`encode` writes.
FORMAT_VERSION = 2

_V1_PREFIX = struct.Struct("<BI")  # version, header length
_V2_PREFIX = struct.Struct("<BBI")  # version, flags, header (plain) or meta ciphertext length
_PLAIN_PREFIX = struct.Struct("<BBIII")  # ... meta CRC, response CRC
_U32 = struct.Struct("<I")
_ENCRYPTED = 0x01
_VECTOR_APART = 0x02
_KNOWN_FLAGS = _ENCRYPTED | _VECTOR_APART
_KEY_ID_BYTES = 16
_NONCE_BYTES = 12
_TAG_BYTES = 16
_CLEAR_BYTES = _V2_PREFIX.size + _KEY_ID_BYTES + _NONCE_BYTES  # 34
_OPEN_BRACE = ord("{")


class CorruptRecord(ValueError):
    """A stored record cannot be read: its bytes are damaged (checksum, truncation, an unknown
    version, a malformed header, a vector of the wrong length) or it cannot be verified with
    what the caller gave. ``entry_id`` names the entry when it is known. A tier should set the
    record aside and log it; the entry is lost, not the tier."""

    def __init__(self, message: str, entry_id: str | None = None) -> None:
        super().__init__(message)
        self.entry_id = entry_id


class KeyDestroyed(CorruptRecord):
    """The record is encrypted with a key the key ring has destroyed: its user was deleted, so
    the record is erased by design. A tier should drop it silently (and count it). A subclass of
    :class:`CorruptRecord` so that a caller catching only that still never fails on it."""


class Tier(enum.IntEnum):
    """Where a hit came from; values match ``stratacache.v1.Tier``."""

    EXACT = 1
    HOT = 2
    WARM = 3
    COLD = 4
    SHARED = 5  # the fleet's shared store (--shared-store), read by this node


@dataclass(frozen=True, slots=True)
class AnswerCost:
    """What one model call cost to make an answer; every field is optional.

    Attributes:
        model: the model's name, as the price table names it (e.g. "gpt-4o").
        prompt_tokens, completion_tokens: tokens the model read and wrote.
        latency_s: seconds the model took.
    """

    model: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    latency_s: float | None = None

    def to_json(self) -> dict[str, str | int | float]:
        """The known fields, by name (the record header's and the dump's ``cost``)."""
        return {k: v for k in _COST_FIELDS if (v := getattr(self, k)) is not None}

    @classmethod
    def from_json(cls, value: object) -> "AnswerCost":
        """The cost :meth:`to_json` wrote. Keys it does not know are ignored, as the header's
        are: a later version may add some.

        Raises:
            ValueError: not an object, or a field not of its type (str, int, int, number).
        """
        if not isinstance(value, dict):
            raise ValueError(f"cost must be an object with some of {', '.join(_COST_FIELDS)}")
        for name, types in zip(_COST_FIELDS, (str, int, int, (int, float))):
            v = value.get(name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, types)):
                raise ValueError(f"cost.{name} is {v!r}, not a {_COST_TYPE_NAMES[name]}")
        latency = value.get("latency_s")
        return cls(value.get("model"), value.get("prompt_tokens"),
                   value.get("completion_tokens"), None if latency is None else float(latency))


_COST_FIELDS = ("model", "prompt_tokens", "completion_tokens", "latency_s")
_COST_TYPE_NAMES = {"model": "string", "prompt_tokens": "whole number",
                    "completion_tokens": "whole number", "latency_s": "number of seconds"}


@dataclass(frozen=True, slots=True)
class Entry:
    """One stored answer. ``vector`` is unit-normalised float32; times are Unix seconds;
    ``cost`` what the answer cost to make, if the Store said."""

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
    cost: AnswerCost | None = None

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


# --- encoding ----------------------------------------------------------------------------------

def encode(entry: Entry, *, with_vector: bool = True, keys: KeyRing | None = None) -> bytes:
    """The entry's record, in the current format version.

    Args:
        entry: the entry.
        with_vector: False leaves the vector out, for a store that keeps vectors in a column of
            their own; the record's checksum (or tag) still covers it, so give the same vector
            back to :func:`decode`.
        keys: the key ring; an entry with a ``user_id`` is then encrypted with its user's key
            (created, durably, on first use: this may block on an fsync). Without it, or
            without a user, the record is plain.

    Returns:
        The record's bytes.
    """
    vector = np.ascontiguousarray(entry.vector, dtype="<f4").tobytes()
    fields = {
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
        "rlen": len(entry.response),
    }
    if entry.cost is not None:  # absent otherwise: an entry without one encodes as before
        fields["cost"] = entry.cost.to_json()
    header = json.dumps(fields, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    flags = 0 if with_vector else _VECTOR_APART
    inline, apart = (vector, b"") if with_vector else (b"", vector)
    if entry.user_id is not None and keys is not None:
        return _encrypt(entry, keys, flags | _ENCRYPTED, header, inline, apart)
    head = _V2_PREFIX.pack(FORMAT_VERSION, flags, len(header))
    response_crc = _U32.pack(zlib.crc32(entry.response))
    meta_crc = zlib.crc32(apart, zlib.crc32(inline, zlib.crc32(header, zlib.crc32(
        response_crc, zlib.crc32(head)))))
    return b"".join((head, _U32.pack(meta_crc), response_crc, header, inline, entry.response))


def _encrypt(entry: Entry, keys: KeyRing, flags: int, header: bytes, inline: bytes,
             apart: bytes) -> bytes:
    key_id, key = keys.key_for(entry.user_id, entry.namespace)  # type: ignore[arg-type]
    meta = b"".join((_U32.pack(len(header)), header, inline))
    nonce = bytearray(os.urandom(_NONCE_BYTES))
    nonce[0] &= 0x7F
    clear = b"".join((_V2_PREFIX.pack(FORMAT_VERSION, flags, len(meta) + _TAG_BYTES), key_id,
                      nonce))
    ident = entry.id.encode("utf-8")
    aead = AESGCM(key)
    sealed_meta = aead.encrypt(bytes(nonce), meta, _aad(clear, ident, apart))
    sealed_response = aead.encrypt(_response_nonce(nonce), entry.response,
                                   _aad(clear, ident, sealed_meta[-_TAG_BYTES:]))
    return b"".join((clear, sealed_meta, sealed_response))


def _aad(clear: bytes | memoryview, ident: bytes, tail: bytes | memoryview) -> bytes:
    """Associated data: the clear part, the entry id (length-prefixed, so it cannot run into
    ``tail``), then ``tail``."""
    return b"".join((clear, _U32.pack(len(ident)), ident, tail))


def _response_nonce(nonce: bytes | bytearray | memoryview) -> bytes:
    # The meta nonce has its top bit clear: setting it gives a nonce no meta part uses.
    return bytes((nonce[0] | 0x80,)) + bytes(nonce[1:])


# --- decoding ----------------------------------------------------------------------------------

def decode(data: bytes | memoryview, vector: np.ndarray | bytes | memoryview | None = None, *,
           with_response: bool = True, keys: KeyRing | None = None,
           entry_id: str | None = None) -> Entry:
    """The entry a record holds, verified.

    Args:
        data: the record (bytes, or a memoryview such as an LMDB buffer; it is not kept).
        vector: the vector of a record encoded with ``with_vector=False``: the raw
            little-endian float32 bytes (preferred: their length is checked here) or an array.
        with_response: False leaves the response out (b"") for callers that only index; the
            response is then neither read nor verified.
        keys: the key ring; needed for encrypted records.
        entry_id: the id the record is stored under; needed for encrypted records (it is
            authenticated with them) and checked against the header of plain version 2 records.

    Returns:
        The entry.

    Raises:
        KeyDestroyed: the record is encrypted with a destroyed key (its user was deleted).
        CorruptRecord: anything else that keeps the record from being read and verified: a bad
            checksum or tag, an unknown version or flag, truncation, a malformed header, a
            vector of the wrong length, an unknown key id, or an encrypted record decoded
            without ``keys`` or ``entry_id``.
        sqlite3.Error: the key file could not be read (the key ring's failure, not the
            record's).
    """
    try:
        if not len(data):
            raise CorruptRecord(f"{_who(entry_id)}: the stored record is empty", entry_id)
        version = data[0]
        if version == 2:
            return _decode_v2(data, vector, with_response, keys, entry_id)
        if version == 1:
            return _decode_v1(data, vector, with_response, entry_id)
        raise CorruptRecord(f"{_who(entry_id)}: the stored record has unknown format version "
                            f"{version} (this build reads 1 and 2){_DAMAGED}", entry_id)
    except CorruptRecord:
        raise
    except (ValueError, TypeError, KeyError, IndexError, OverflowError, struct.error) as exc:
        # Chiefly malformed fields of a version 1 record, which has no checksum to catch them.
        raise CorruptRecord(f"{_who(entry_id)}: the stored record is malformed ({exc}){_DAMAGED}",
                            entry_id) from exc


_DAMAGED = ("; its bytes were damaged on disk or written by something else. The entry cannot "
            "be served: set the record aside (the next Store of its prompt replaces it), and "
            "check the disk if this repeats")


def _who(entry_id: str | None) -> str:
    return f"entry {entry_id}" if entry_id is not None else "an entry (id unknown)"


def _corrupt(entry_id: str | None, what: str) -> CorruptRecord:
    return CorruptRecord(f"{_who(entry_id)}: {what}{_DAMAGED}", entry_id)


def _decode_v2(data: bytes | memoryview, vector: np.ndarray | bytes | memoryview | None,
               with_response: bool, keys: KeyRing | None, entry_id: str | None) -> Entry:
    if len(data) < _PLAIN_PREFIX.size:
        raise _corrupt(entry_id, f"the stored record is truncated ({len(data)} bytes)")
    # For an encrypted record the two CRCs read here are key id bytes, unused.
    _, flags, length, meta_crc, response_crc = _PLAIN_PREFIX.unpack_from(data)
    if flags & ~_KNOWN_FLAGS:
        raise _corrupt(entry_id, f"the stored record has unknown flags {flags:#04x}")
    apart = b""
    if flags & _VECTOR_APART:
        if vector is None:
            raise _corrupt(entry_id, "the record's vector is stored apart from it, but none was "
                                     "given to decode")
        apart = _vector_bytes(vector)
    if flags & _ENCRYPTED:
        return _decrypt(data, length, flags, vector, apart, with_response, keys, entry_id)
    start = _PLAIN_PREFIX.size
    if start + length > len(data):
        raise _corrupt(entry_id, f"the stored record is truncated ({len(data)} bytes, header "
                                 f"says {length} header bytes)")
    mv = memoryview(data)
    header = _header(mv[start:start + length], entry_id, with_rlen=True)
    meta_end = start + length + (0 if flags & _VECTOR_APART else 4 * header["dim"])
    if zlib.crc32(apart, zlib.crc32(mv[10:meta_end], zlib.crc32(mv[:6]))) != meta_crc \
            or meta_end > len(data):
        raise _corrupt(entry_id, "the stored record failed its checksum")
    if len(data) - meta_end != header["rlen"]:
        raise _corrupt(entry_id, f"the stored record is truncated ({len(data) - meta_end} "
                                 f"response bytes, header says {header['rlen']})")
    response = b""
    if with_response:
        response = bytes(mv[meta_end:])
        if zlib.crc32(response) != response_crc:
            raise _corrupt(entry_id, "the stored response failed its checksum")
    if flags & _VECTOR_APART:
        vec = _vector_array(vector, apart, entry_id)
    else:
        vec = np.frombuffer(bytes(mv[start + length:meta_end]), dtype="<f4")
    return _entry(header, vec, response, entry_id)


def _decrypt(data: bytes | memoryview, sealed_len: int, flags: int,
             vector: np.ndarray | bytes | memoryview | None, apart: bytes | memoryview,
             with_response: bool, keys: KeyRing | None, entry_id: str | None) -> Entry:
    meta_end = _CLEAR_BYTES + sealed_len
    if sealed_len < _TAG_BYTES + _U32.size or meta_end + _TAG_BYTES > len(data):
        raise _corrupt(entry_id, f"the stored record is truncated ({len(data)} bytes, its clear "
                                 f"part says {sealed_len} bytes of sealed header)")
    if keys is None or entry_id is None:
        raise CorruptRecord(
            f"{_who(entry_id)}: the stored record is encrypted (or its flags are damaged); "
            "decode needs both keys= (the key ring) and entry_id= to read it", entry_id)
    mv = memoryview(data)
    key_id = bytes(mv[_V2_PREFIX.size:_V2_PREFIX.size + _KEY_ID_BYTES])
    key = keys.key(key_id)
    if key is None:
        if keys.destroyed(key_id):
            raise KeyDestroyed(f"entry {entry_id}: its user's key was destroyed (the user was "
                               "deleted), so the record is erased; drop it", entry_id)
        raise _corrupt(entry_id, f"the stored record names key id {key_id.hex()}, which the key "
                                 "ring has never held (or the key file was replaced)")
    clear = mv[:_CLEAR_BYTES]
    nonce = mv[_V2_PREFIX.size + _KEY_ID_BYTES:_CLEAR_BYTES]
    ident = entry_id.encode("utf-8")
    aead = AESGCM(key)
    sealed_meta = mv[_CLEAR_BYTES:meta_end]
    try:
        meta = aead.decrypt(bytes(nonce), sealed_meta, _aad(clear, ident, apart))
    except InvalidTag:
        raise _corrupt(entry_id, "the stored record failed authentication (a damaged byte, or "
                                 "a record or vector stored under another id)") from None
    (length,) = _U32.unpack_from(meta)
    header = _header(meta[_U32.size:_U32.size + length], entry_id, with_rlen=True)
    dim, rlen = header["dim"], header["rlen"]
    inline_end = _U32.size + length + (0 if flags & _VECTOR_APART else 4 * dim)
    if inline_end != len(meta) or len(data) - meta_end != rlen + _TAG_BYTES:
        raise _corrupt(entry_id, "the stored record's sizes disagree with its header")
    response = b""
    if with_response:
        try:
            response = aead.decrypt(_response_nonce(nonce), mv[meta_end:],
                                    _aad(clear, ident, sealed_meta[-_TAG_BYTES:]))
        except InvalidTag:
            raise _corrupt(entry_id, "the stored response failed authentication") from None
    if flags & _VECTOR_APART:
        vec = _vector_array(vector, apart, entry_id)
    else:
        vec = np.frombuffer(meta, dtype="<f4", count=dim, offset=_U32.size + length)
    return _entry(header, vec, response, entry_id)


def _decode_v1(data: bytes | memoryview, vector: np.ndarray | bytes | memoryview | None,
               with_response: bool, entry_id: str | None) -> Entry:
    _, length = _V1_PREFIX.unpack_from(data)
    start = _V1_PREFIX.size
    # Version 1 has no checksum; requiring the header's "{" where version 2 has a 0 byte keeps
    # a version 2 record whose version byte was damaged into 1 from being misread.
    if start + length > len(data) or data[start] != _OPEN_BRACE:
        raise _corrupt(entry_id, f"the stored record (format 1) is truncated or its header is "
                                 f"malformed ({len(data)} bytes, header length {length})")
    mv = memoryview(data)
    header = _header(mv[start:start + length], entry_id, with_rlen=False)
    _check_fields(header, entry_id)
    vector_end = start + length + 4 * header["dim"]
    if vector_end > len(data):
        raise _corrupt(entry_id, "the stored record (format 1) is truncated inside its vector")
    if vector is None:
        if header["dim"] == 0:
            raise _corrupt(entry_id, "the record's vector is stored apart from it, but none was "
                                     "given to decode")
        vec = np.frombuffer(bytes(mv[start + length:vector_end]), dtype="<f4")
    else:
        vec = _vector_array(vector, _vector_bytes(vector), entry_id)
    response = bytes(mv[vector_end:]) if with_response else b""
    return _entry(header, vec, response, entry_id, any_dim=vector is not None)


# --- fields ------------------------------------------------------------------------------------

_NONE = type(None)
#: The header's fields and their JSON types, checked in version 1 records (no checksum, so a
#: damaged one can still be valid JSON); version 2 records are verified before they are read.
_FIELD_TYPES = (("id", str), ("ns", str), ("part", str), ("exact", str), ("prompt", str),
                ("created", (int, float)), ("expires", (int, float, _NONE)), ("tid", (str, _NONE)),
                ("tver", (str, _NONE)), ("user", (str, _NONE)), ("meta", dict))
_MISSING = object()


def _header(raw: bytes | memoryview, entry_id: str | None, *, with_rlen: bool) -> dict:
    """The parsed JSON header, its sizes (dim, and rlen from version 2 on) checked: the record
    is cut by them before its checksum can be verified."""
    try:
        h = json.loads(str(raw, "utf-8"))
    except ValueError as exc:  # UnicodeDecodeError, JSONDecodeError
        raise _corrupt(entry_id, f"the stored record's header is not valid JSON ({exc})") from None
    if type(h) is not dict or type(dim := h.get("dim")) is not int or dim < 0 or (
            with_rlen and (type(rlen := h.get("rlen")) is not int or rlen < 0)):
        raise _corrupt(entry_id, "the stored record's header is not a JSON object with "
                                 "its sizes (dim, rlen)")
    return h


def _check_fields(h: dict, entry_id: str | None) -> None:
    bad = [k for k, t in _FIELD_TYPES
           if not isinstance(v := h.get(k, _MISSING), t) or isinstance(v, bool)]
    if not bad and not all(isinstance(v, str) for v in h["meta"].values()):
        bad.append("meta")
    if bad:
        who = h["id"] if entry_id is None and "id" not in bad else entry_id
        raise _corrupt(who, f"the stored record's header has missing or malformed "
                            f"{', '.join(bad)}")


def _entry(h: dict, vector: np.ndarray, response: bytes, entry_id: str | None, *,
           any_dim: bool = False) -> Entry:
    """The entry, once the record is verified. ``any_dim``: a version 1 record says dim 0 when
    its vector is stored apart, so only the given vector says how long it is."""
    if entry_id is not None and h["id"] != entry_id:
        raise _corrupt(entry_id, f"the stored record holds entry {h['id'][:64]!r}, not the one "
                                 "it is stored under")
    if vector.ndim != 1 or (vector.size != h["dim"] and not any_dim):
        raise _corrupt(entry_id or h["id"], f"the entry's vector has {vector.size} values, its "
                                            f"record says {h['dim']}")
    return Entry(
        id=h["id"], namespace=h["ns"], partition=bytes.fromhex(h["part"]),
        exact_key=bytes.fromhex(h["exact"]), prompt=h["prompt"], response=response,
        vector=vector, created_at=h["created"], expires_at=h["expires"], template_id=h["tid"],
        template_version=h["tver"], user_id=h["user"], metadata=h["meta"],
        cost=None if (cost := h.get("cost")) is None else AnswerCost.from_json(cost))


def _vector_bytes(vector: np.ndarray | bytes | memoryview) -> bytes | memoryview:
    """The raw float32 bytes of a vector given to :func:`decode`, without a copy if possible."""
    if isinstance(vector, np.ndarray):
        return memoryview(np.ascontiguousarray(vector, dtype="<f4")).cast("B")
    return vector


def _vector_array(vector: np.ndarray | bytes | memoryview | None, raw: bytes | memoryview,
                  entry_id: str | None) -> np.ndarray:
    """The vector stored apart as an array (the one given, if it is already float32)."""
    if isinstance(vector, np.ndarray) and vector.dtype == np.dtype("<f4"):
        return vector
    if len(raw) % 4:
        raise _corrupt(entry_id, f"the vector stored apart has {len(raw)} bytes, not a whole "
                                 "number of float32 values")
    return np.frombuffer(bytes(raw), dtype="<f4")
