"""Records: round trips plain and encrypted, with and without a cost; every kind of damage is a
CorruptRecord (every single changed byte of a version 2 record is caught); version 1 records,
and version 2 records written before costs existed, still decode; a destroyed key makes its
records KeyDestroyed and leaves no copy in the key file; the key cache stays bounded."""

from __future__ import annotations

import dataclasses
import threading
from pathlib import Path

import numpy as np
import pytest

from stratacache.keyring import KEY_BYTES, KEY_ID_BYTES, KeyRing
from stratacache.records import (FORMAT_VERSION, AnswerCost, CorruptRecord, Entry, KeyDestroyed,
                                 decode, encode)

ID = "0f" * 16
VECTOR = np.array([0.6, 0.0, 0.8], dtype="<f4")
ENTRY = Entry(id=ID, namespace="ns", partition=bytes.fromhex("ab01"),
              exact_key=bytes.fromhex("cd02"), prompt="Why is the sky blue?",
              response=b"Rayleigh scattering.", vector=VECTOR, created_at=1700000000.5,
              template_id="t", user_id="u1", metadata={"k": "v"})

# Written by the version 1 encoder (the format of existing data directories): with its vector,
# and without it (cold tier), for ENTRY.
V1_HEADER = (b'{"id":"0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f","ns":"ns","part":"ab01","exact":"cd02",'
             b'"prompt":"Why is the sky blue?","created":1700000000.5,"expires":null,"tid":"t",'
             b'"tver":null,"user":"u1","meta":{"k":"v"},')
V1 = (b"\x01\xd1\x00\x00\x00" + V1_HEADER + b'"dim":3}\x9a\x99\x19?\x00\x00\x00\x00\xcd\xccL?'
      b"Rayleigh scattering.")
V1_APART = b"\x01\xd1\x00\x00\x00" + V1_HEADER + b'"dim":0}Rayleigh scattering.'
# Written by the version 2 encoder before entries had a cost (plain, vector inside), for ENTRY.
V2_BEFORE_COSTS = (bytes.fromhex("0200db0000002d870c9bed4c4ba6") + V1_HEADER
                   + b'"dim":3,"rlen":20}' + VECTOR.tobytes() + b"Rayleigh scattering.")
COST = AnswerCost(model="gpt-4o", prompt_tokens=1200, completion_tokens=350, latency_s=2.5)


@pytest.fixture
def keys(tmp_path: Path) -> KeyRing:
    ring = KeyRing(tmp_path / "keys.sqlite3")
    yield ring
    ring.close()


def _same(a: Entry, b: Entry, *, response: bool = True) -> None:
    assert np.array_equal(a.vector, b.vector) and a.vector.dtype == np.dtype("<f4")
    expected = dataclasses.replace(b, response=b.response if response else b"")
    assert dataclasses.replace(a, vector=VECTOR) == dataclasses.replace(expected, vector=VECTOR)


def _variants(keys: KeyRing) -> list[tuple[str, bytes, bytes | None, KeyRing | None]]:
    """(name, record, vector stored apart, key ring) for each kind of version 2 record."""
    out = []
    for ring, kind in ((None, "plain"), (keys, "encrypted")):
        out.append((f"{kind}, vector inside", encode(ENTRY, keys=ring), None, ring))
        out.append((f"{kind}, vector apart", encode(ENTRY, with_vector=False, keys=ring),
                    VECTOR.tobytes(), ring))
    return out


def _changes(data: bytes):  # type: ignore[no-untyped-def]
    """Every record that differs from ``data`` in exactly one byte."""
    buf = bytearray(data)
    for i, old in enumerate(data):
        for new in range(256):
            if new != old:
                buf[i] = new
                yield i, bytes(buf)
        buf[i] = old


# --- round trips -------------------------------------------------------------------------------

@pytest.mark.parametrize("encrypted", [False, True])
@pytest.mark.parametrize("with_vector", [True, False])
@pytest.mark.parametrize("with_response", [True, False])
def test_round_trip(keys: KeyRing, encrypted: bool, with_vector: bool,
                    with_response: bool) -> None:
    ring = keys if encrypted else None
    record = encode(ENTRY, with_vector=with_vector, keys=ring)
    assert record[0] == FORMAT_VERSION
    for apart in ([None] if with_vector else [VECTOR.tobytes(), VECTOR]):
        for data in (record, memoryview(record)):  # LMDB hands out memoryviews
            got = decode(data, apart, with_response=with_response, keys=ring, entry_id=ID)
            _same(got, ENTRY, response=with_response)


@pytest.mark.parametrize("cost", [COST, AnswerCost(completion_tokens=7),
                                  AnswerCost(model="m", latency_s=0.0)],
                         ids=["every field", "tokens only", "model and time"])
def test_cost_round_trips_in_every_kind_of_record(keys: KeyRing, cost: AnswerCost) -> None:
    """Warm records (vector inside) and cold ones (vector apart), plain and encrypted."""
    costed = dataclasses.replace(ENTRY, cost=cost)
    for ring in (None, keys):
        for with_vector in (True, False):
            record = encode(costed, with_vector=with_vector, keys=ring)
            apart = None if with_vector else VECTOR.tobytes()
            for with_response in (True, False):
                got = decode(record, apart, with_response=with_response, keys=ring, entry_id=ID)
                assert got.cost == cost
                _same(got, costed, response=with_response)


def test_v2_records_written_before_costs_still_decode() -> None:
    """Without a cost an entry is encoded byte for byte as before costs existed (so an older
    build still reads it), and such a record decodes with no cost."""
    assert encode(ENTRY) == V2_BEFORE_COSTS
    got = decode(V2_BEFORE_COSTS, entry_id=ID)
    assert got.cost is None
    _same(got, ENTRY)


def test_a_malformed_cost_is_corrupt() -> None:
    for bad in (AnswerCost(model=5), AnswerCost(prompt_tokens=1.5),  # type: ignore[arg-type]
                AnswerCost(latency_s="1")):  # type: ignore[arg-type]
        with pytest.raises(CorruptRecord, match="malformed.*cost") as caught:
            decode(encode(dataclasses.replace(ENTRY, cost=bad)), entry_id=ID)
        assert type(caught.value) is CorruptRecord


def test_entry_without_user_is_plain_even_with_keys(keys: KeyRing) -> None:
    anonymous = dataclasses.replace(ENTRY, user_id=None)
    record = encode(anonymous, keys=keys)
    assert record == encode(anonymous) and b"Rayleigh" in record
    _same(decode(record), anonymous)
    assert keys.cached == 0


def test_encrypted_record_says_nothing_in_clear(keys: KeyRing) -> None:
    record = encode(ENTRY, keys=keys)
    key_id, _ = keys.key_for("u1", "ns")
    assert record[6:6 + KEY_ID_BYTES] == key_id
    for secret in (b"u1", b"sky", b"Rayleigh", ID.encode(), b"ab01", VECTOR.tobytes()[:8]):
        assert secret not in record
    assert encode(ENTRY, keys=keys) != record  # a fresh nonce each time


def test_encrypted_record_needs_keys_and_its_own_id(keys: KeyRing, tmp_path: Path) -> None:
    record = encode(ENTRY, keys=keys)
    for kwargs in ({}, {"keys": keys}, {"entry_id": ID}):
        with pytest.raises(CorruptRecord, match="encrypted"):
            decode(record, **kwargs)  # type: ignore[arg-type]
    other = "1e" * 16
    with pytest.raises(CorruptRecord, match="authentication") as caught:
        decode(record, keys=keys, entry_id=other)  # moved to another id
    assert caught.value.entry_id == other and other in str(caught.value)
    with KeyRing(tmp_path / "other.sqlite3") as strangers:  # a key file that never held it
        with pytest.raises(CorruptRecord, match="never held") as caught:
            decode(record, keys=strangers, entry_id=ID)
        assert type(caught.value) is CorruptRecord


def test_plain_record_under_another_id_is_corrupt() -> None:
    with pytest.raises(CorruptRecord, match="not the one it is stored under"):
        decode(encode(ENTRY), entry_id="1e" * 16)


# --- damage ------------------------------------------------------------------------------------

def test_every_changed_byte_of_a_v2_record_is_caught(keys: KeyRing) -> None:
    for name, record, apart, ring in _variants(keys):
        for i, damaged in _changes(record):
            with pytest.raises(CorruptRecord) as caught:
                decode(damaged, apart, keys=ring, entry_id=ID)
            assert type(caught.value) is CorruptRecord, (name, i)
            assert caught.value.entry_id == ID and ID in str(caught.value), (name, i)


def test_every_changed_byte_of_a_vector_stored_apart_is_caught(keys: KeyRing) -> None:
    for name, record, apart, ring in _variants(keys):
        if apart is None:
            continue
        for i, damaged in _changes(apart):
            with pytest.raises(CorruptRecord):
                decode(record, damaged, keys=ring, entry_id=ID)
            with pytest.raises(CorruptRecord):  # also when only indexing
                decode(record, damaged, keys=ring, entry_id=ID, with_response=False)


def test_index_only_decode_verifies_all_it_reads(keys: KeyRing) -> None:
    """with_response=False reads (and verifies) the header and vector, not the response: every
    change outside the response is caught, and the response's length is still checked."""
    for name, record, apart, ring in _variants(keys):
        response_at = len(record) - len(ENTRY.response) - (16 if ring else 0)
        for i, damaged in _changes(record[:response_at]):
            with pytest.raises(CorruptRecord):
                decode(damaged + record[response_at:], apart, keys=ring, entry_id=ID,
                       with_response=False)
        with pytest.raises(CorruptRecord, match="truncated|sizes"):
            decode(record[:-1], apart, keys=ring, entry_id=ID, with_response=False)


@pytest.mark.parametrize("record, apart", [(V1, None), (V1_APART, VECTOR.tobytes())],
                         ids=["v1", "v1 vector apart"])
def test_every_changed_byte_of_a_v1_record_is_corrupt_or_another_entry(
        record: bytes, apart: bytes | None) -> None:
    """Version 1 has no checksum: a change may yield another valid entry, but never any error
    other than CorruptRecord (it used to be KeyError, UnicodeDecodeError, struct.error...)."""
    caught = 0
    for _, damaged in _changes(record):
        try:
            assert isinstance(decode(damaged, apart), Entry)
        except CorruptRecord:
            caught += 1
    assert caught > 0


@pytest.mark.parametrize("kind", ["v1", "v2 plain", "v2 encrypted"])
def test_every_truncation_is_corrupt(keys: KeyRing, kind: str) -> None:
    ring = keys if kind == "v2 encrypted" else None
    record = V1 if kind == "v1" else encode(ENTRY, keys=ring)
    # A version 1 record cut inside its response is still a valid (shorter) entry.
    end = len(record) - len(ENTRY.response) if kind == "v1" else len(record)
    for n in range(end):
        with pytest.raises(CorruptRecord):
            decode(record[:n], keys=ring, entry_id=ID)


def _v1(header: bytes, tail: bytes = b"") -> bytes:
    return b"\x01" + len(header).to_bytes(4, "little") + header + tail


@pytest.mark.parametrize("data, match", [
    (b"", "empty"),
    (b"\x07" + V1[1:], "unknown format version 7"),
    (_v1(b'{"id": 1'), "not valid JSON"),
    (_v1(b'{"id":"\xff"}'), "not valid JSON"),
    (_v1(b"[1]"), "malformed"),
    (_v1(b'{"dim":3}'), "not a JSON object with dim|missing or malformed id"),
    (_v1(V1_HEADER + b'"dim":-1}'), "dim"),
    (_v1(V1_HEADER.replace(b'"created":1700000000.5', b'"created":true') + b'"dim":0}'),
     "malformed created"),
    (_v1(V1_HEADER.replace(b'"meta":{"k":"v"}', b'"meta":{"k":1}') + b'"dim":0}'), "meta"),
    (_v1(V1_HEADER + b'"dim":3}', b"\x00" * 11), "truncated inside its vector"),
    (_v1(V1_HEADER.replace(b'"part":"ab01"', b'"part":"zz"') + b'"dim":0}'), "malformed"),
    (V1[:3], "malformed"),
])
def test_each_kind_of_damage_is_corrupt(data: bytes, match: str) -> None:
    with pytest.raises(CorruptRecord, match=match) as caught:
        decode(data, VECTOR, entry_id=ID)
    assert type(caught.value) is CorruptRecord and ID in str(caught.value)


def test_message_names_the_entry_from_its_header_when_not_given() -> None:
    bad = _v1(V1_HEADER.replace(b'"created":1700000000.5', b'"created":"x"') + b'"dim":0}')
    with pytest.raises(CorruptRecord, match=f"entry {ID}: .*created") as caught:
        decode(bad, VECTOR)
    assert caught.value.entry_id == ID


@pytest.mark.parametrize("encrypted", [False, True])
def test_vector_of_the_wrong_length_is_corrupt(keys: KeyRing, encrypted: bool) -> None:
    ring = keys if encrypted else None
    record = encode(ENTRY, with_vector=False, keys=ring)
    for wrong in (VECTOR.tobytes()[:-4], VECTOR.tobytes() + b"\0\0\0\0", VECTOR.tobytes()[:-1],
                  np.append(VECTOR, 0.0).astype("<f4")):
        with pytest.raises(CorruptRecord):
            decode(record, wrong, keys=ring, entry_id=ID)
    with pytest.raises(CorruptRecord, match="stored apart"):
        decode(record, keys=ring, entry_id=ID)  # the vector was not given


# --- version 1 ---------------------------------------------------------------------------------

def test_v1_records_still_decode() -> None:
    _same(decode(V1), ENTRY)
    _same(decode(memoryview(V1), with_response=False), ENTRY, response=False)
    _same(decode(V1_APART, VECTOR.tobytes()), ENTRY)
    _same(decode(V1_APART, VECTOR, entry_id=ID), ENTRY)
    with pytest.raises(CorruptRecord, match="stored apart"):
        decode(V1_APART)


# --- keys --------------------------------------------------------------------------------------

def test_destroyed_key_makes_records_key_destroyed(keys: KeyRing) -> None:
    records = [encode(ENTRY, keys=keys), encode(ENTRY, with_vector=False, keys=keys)]
    bystander = encode(dataclasses.replace(ENTRY, user_id="u2"), keys=keys)
    key_id, _ = keys.key_for("u1", "ns")
    other_namespace, _ = keys.key_for("u1", "other")
    assert keys.destroy("u1", "other") == 1  # one namespace's key alone
    assert keys.key(key_id) is not None and keys.key(other_namespace) is None
    assert keys.destroy("u1") == 1  # every namespace's
    assert keys.destroy("u1") == 0 and keys.destroy("nobody") == 0
    assert keys.key(key_id) is None and keys.destroyed(key_id)
    for record, apart in zip(records, (None, VECTOR.tobytes())):
        for with_response in (True, False):
            with pytest.raises(KeyDestroyed, match="destroyed") as caught:
                decode(record, apart, keys=keys, entry_id=ID, with_response=with_response)
            assert caught.value.entry_id == ID
    _same(decode(bystander, keys=keys, entry_id=ID), dataclasses.replace(ENTRY, user_id="u2"))
    # A user stored again after deletion gets a new key; the old records stay erased.
    new_id, _ = keys.key_for("u1", "ns")
    assert new_id != key_id
    _same(decode(encode(ENTRY, keys=keys), keys=keys, entry_id=ID), ENTRY)
    with pytest.raises(KeyDestroyed):
        decode(records[0], keys=keys, entry_id=ID)


def test_keys_survive_reopening_and_destruction_is_durable(tmp_path: Path) -> None:
    path = tmp_path / "keys.sqlite3"
    with KeyRing(path) as ring:
        kept = ring.key_for("kept")
        gone = ring.key_for("gone")
        assert len(kept[0]) == KEY_ID_BYTES and len(kept[1]) == KEY_BYTES
        ring.destroy("gone")
    with KeyRing(path) as ring:
        assert ring.key_for("kept") == kept and ring.key(kept[0]) == kept[1]
        assert ring.key(gone[0]) is None and ring.destroyed(gone[0])
        assert not ring.destroyed(kept[0]) and not ring.destroyed(b"\0" * KEY_ID_BYTES)
    assert path.stat().st_mode & 0o777 == 0o600


def test_key_file_keeps_no_copy_of_a_destroyed_key(tmp_path: Path) -> None:
    path = tmp_path / "keys.sqlite3"
    users = [f"user-{i:04d}@example.com" for i in range(300)]  # several pages of keys
    with KeyRing(path) as ring:
        issued = {u: ring.key_for(u) for u in users}
        doomed = users[::7]
        for user in doomed:
            assert ring.destroy(user) == 1
        files = sorted(tmp_path.iterdir())
        # DELETE journal mode: once a destroy returns, the key file is the only file.
        assert files == [path]
        content = path.read_bytes()
        for user in users:
            key_id, key = issued[user]
            if user in doomed:
                assert key not in content and user.encode() not in content
                assert key_id in content  # the tombstone: a random id, nobody's name
            else:  # the scan would see a key that is there
                assert key in content and user.encode() in content


def test_key_cache_is_bounded(tmp_path: Path) -> None:
    with KeyRing(tmp_path / "keys.sqlite3", cache_keys=8) as ring:
        issued = {f"u{i}": ring.key_for(f"u{i}") for i in range(50)}
        assert ring.cached == 8
        # Evicted keys are read back from the file, by user and by id, unchanged.
        for user, (key_id, key) in issued.items():
            assert ring.key(key_id) == key
            assert ring.key_for(user) == (key_id, key)
            assert ring.cached <= 8
        ring.destroy("u49")  # cached: evicted from memory too
        assert ring.key(issued["u49"][0]) is None and ring.cached <= 8
    with pytest.raises(ValueError, match="cache_keys"):
        KeyRing(tmp_path / "k2.sqlite3", cache_keys=0)


def test_key_ring_is_thread_safe(tmp_path: Path) -> None:
    """Writer threads asking for the same users at once get one key per user."""
    with KeyRing(tmp_path / "keys.sqlite3", cache_keys=16) as ring:
        users = [f"u{i}" for i in range(40)]
        seen: list[dict[str, tuple[bytes, bytes]]] = [{} for _ in range(4)]
        start = threading.Barrier(len(seen))

        def work(mine: dict[str, tuple[bytes, bytes]]) -> None:
            start.wait()
            for user in users:
                mine[user] = ring.key_for(user)
                assert ring.key(mine[user][0]) == mine[user][1]

        threads = [threading.Thread(target=work, args=(s,)) for s in seen]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert all(s == seen[0] for s in seen) and len(seen[0]) == len(users)
        assert len({key_id for key_id, _ in seen[0].values()}) == len(users)
