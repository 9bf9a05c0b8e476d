"""``stratacache export`` / ``import``: a dump keeps every live entry (id, tier, scope, template,
user, metadata, times, vector, cost), an export of an import is the same dump, a server on the
imported directory serves the same hits, an interrupted import resumes without duplicates, bad
lines are reported by number, and a dump of one model is re-embedded for another.

The data directories are filled by a real engine (test_reindex's ``_fill``: entries in both
tiers, one of a user with a template, metadata and a TTL, one too long to embed, one expired),
plus entries with scopes; "another model" is test_reindex's perturbed 256-dimension model.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from stratacache import keys
from stratacache.cli import build_parser
from stratacache.datadir import DataDir
from stratacache.embed import Encoder
from stratacache.engine import Engine
from stratacache.errors import DataDirMismatch
from stratacache.messages import StoreRequest
from stratacache.records import AnswerCost
from stratacache.transfer import MAX_LINE_BYTES, BadDump, import_dump, run

from .test_reindex import (KEPT, LONG_PROMPT, OTHER_DIM, _fields, _fill, _settings, _stored,
                           other_encoder, other_model)
from .test_tiers import PARAPHRASE_0, TOPICS

__all__ = ["other_encoder", "other_model"]  # fixtures, used by name

SCOPED = "Translate 'good morning' into French."
SCOPES = ({"model": "gpt-4o", "system": "Answer briefly."}, {"model": "gpt-4o-mini"})
ODD = StoreRequest(prompt="  Größe von 𝔸?  ", response=bytes(range(256)) * 3, namespace="odd",
                   metadata={"z": "last", "a": "first", "ü": "ß"}, ttl_s=86400,
                   cost=AnswerCost(model="gpt-4o", prompt_tokens=12, completion_tokens=34,
                                   latency_s=1.25))


def _cli(*argv: str) -> int:
    args = build_parser().parse_args(list(argv))
    return run(args)


def _fill_all(encoder: Encoder, path: Path) -> dict[str, str]:
    """``_fill`` plus one entry per scope of SCOPED and ODD; returns every id by a name."""
    ids = _fill(encoder, path)
    named = {f"topic{i}": entry_id for i, entry_id in enumerate(ids[:len(TOPICS)])}
    named |= {"kept": ids[len(TOPICS)], "long": ids[len(TOPICS) + 1], "expired": ids[-1]}

    async def more() -> None:
        engine = await Engine.open(_settings(path), encoder)
        try:
            for i, scope in enumerate(SCOPES):
                named[f"scope{i}"] = (await engine.store(StoreRequest(
                    prompt=SCOPED, response=f"answer {i}".encode(), scope=scope))).entry_id
            named["odd"] = (await engine.store(ODD)).entry_id
        finally:
            await engine.close()

    asyncio.run(more())
    return named


@pytest.fixture(scope="module")
def filled(encoder: Encoder, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, Path]:
    """A filled data directory, its ids, and its dump (written by the CLI); tests only read it."""
    data = tmp_path_factory.mktemp("source") / "data"
    named = _fill_all(encoder, data)
    dump = data.parent / "dump.jsonl"
    assert _cli("export", "--data-dir", str(data), "--output", str(dump)) == 0
    return data, named, dump


def _odd_line(lines: list[bytes], named: dict[str, str]) -> bytes:
    return next(x for x in lines[1:-1] if json.loads(x)["id"] == named["odd"])


def _lines(dump: Path) -> list[bytes]:
    return dump.read_bytes().splitlines(keepends=True)


def _ids(lines: list[bytes], named: dict[str, str]) -> set[str]:
    """The ids of these entry lines, but the expired entry's (never imported)."""
    return {json.loads(x)["id"] for x in lines} - {named["expired"]}


def _write(path: Path, lines: list[bytes]) -> Path:
    path.write_bytes(b"".join(lines))
    return path


def _without_created(header: bytes) -> dict:
    """The header but for when the dump was made and how many records its export read."""
    obj = json.loads(header)
    assert isinstance(obj.pop("created_at"), float) and isinstance(obj.pop("stored"), int)
    return obj


def test_export_import_export_is_the_same_dump_and_serves_the_same_hits(
        filled: tuple[Path, dict, Path], start_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    source, named, dump = filled
    lines = _lines(dump)
    header, trailer = json.loads(lines[0]), json.loads(lines[-1])
    before = _stored(source)
    live = {i: v for i, v in before.items() if i != named["expired"]}
    assert {tier for tier, _ in live.values()} == {"warm", "cold"}
    assert header["model"]["name"] == "all-MiniLM-L6-v2" and header["stored"] == len(before)
    assert trailer == {"end": {"entries": len(live)}} and len(lines) == len(live) + 2
    odd = json.loads(_odd_line(lines, named))
    assert list(odd["metadata"]) == ["a", "z", "ü"] and odd["prompt"] == ODD.prompt
    assert odd["cost"] == {"model": "gpt-4o", "prompt_tokens": 12, "completion_tokens": 34,
                           "latency_s": 1.25}
    # Entries stored without a cost have no "cost" key, as in dumps made before costs existed.
    assert sum("cost" in json.loads(x) for x in lines[1:-1]) == 1

    target = tmp_path / "imported"
    assert _cli("import", "--data-dir", str(target), str(dump), "--batch-size", "4") == 0
    after = _stored(target)
    assert set(after) == set(live)
    for entry_id, (tier, entry) in after.items():
        assert tier == live[entry_id][0]
        assert _fields(entry) == _fields(live[entry_id][1])
        assert entry.cost == live[entry_id][1].cost
        assert entry.vector.tobytes() == live[entry_id][1].vector.tobytes()

    again = tmp_path / "again.jsonl"
    assert _cli("export", "--data-dir", str(target), "--output", str(again)) == 0
    relines = _lines(again)
    assert relines[1:] == lines[1:]  # byte for byte
    assert _without_created(relines[0]) == _without_created(lines[0])
    assert json.loads(relines[0])["stored"] == len(live)  # the expired record was not imported

    server = start_server(data_dir=target, hot_capacity=4, warm_max_bytes=1 << 20,
                          min_similarity=0.7)
    with server.client() as client:
        for i, prompt in enumerate(TOPICS):
            hit = client.lookup(prompt)
            assert hit.hit and hit.tier == "exact" and hit.entry_id == named[f"topic{i}"]
        semantic = client.lookup(PARAPHRASE_0, min_similarity=0.75)
        assert semantic.hit and semantic.tier != "exact" and semantic.entry_id == named["topic0"]
        kept = client.lookup(KEPT.prompt, namespace="other", template_id="t", template_version="1")
        assert kept.hit and kept.entry_id == named["kept"] and kept.response == b"3 weeks"
        for i, scope in enumerate(SCOPES):
            scoped = client.lookup(SCOPED, scope=scope)
            assert scoped.hit and scoped.entry_id == named[f"scope{i}"]
            assert scoped.response == f"answer {i}".encode()
        assert not client.lookup(SCOPED, scope={"model": "other"}).hit
        odd = client.lookup(ODD.prompt.strip(), namespace="odd")
        assert odd.hit and odd.entry_id == named["odd"] and odd.response == ODD.response
        saved = client.stats()["namespaces"]["odd"]  # the imported cost is what a hit saves
        assert (saved["saved_prompt_tokens"], saved["saved_completion_tokens"],
                saved["saved_model_seconds"]) == (12, 34, 1.25)
        assert client.lookup(LONG_PROMPT).entry_id == named["long"]
        # The user's entry is encrypted with a key of the imported directory's own.
        assert client.delete_user("u1") == 1
        assert not client.lookup(KEPT.prompt, namespace="other", template_id="t",
                                 template_version="1").hit


def _count(path: Path) -> dict[str, int]:
    """Entries by id on disk, counting copies (in both tiers, or twice in one)."""
    from stratacache.keyring import KeyRing
    from stratacache.tiers import cold, warm

    seen: dict[str, int] = {}
    with KeyRing(path / "keys.sqlite3") as ring:
        for read in (warm.read_stored(path / "warm", 100, keys=ring),
                     cold.read_stored(path / "cold.sqlite3", 100, keys=ring)):
            for chunk in read:
                for e in chunk:
                    seen[e.id] = seen.get(e.id, 0) + 1
    return seen


class Stop(Exception):
    pass


def test_an_interrupted_import_resumes_from_its_checkpoint_and_imports_each_entry_once(
        filled: tuple[Path, dict, Path], tmp_path: Path) -> None:
    _, named, dump = filled
    entries = _lines(dump)[1:-1]
    expected = _ids(entries, named)
    target = tmp_path / "data"
    offsets: list[int] = []

    def stop_after_two(offset: int) -> None:
        offsets.append(offset)
        if len(offsets) == 2:
            raise Stop  # after the second batch's commit and checkpoint

    with pytest.raises(Stop):
        import_dump(target, dump, batch_size=5, on_commit=stop_after_two, progress=False)
    assert _count(target) == {i: 1 for i in _ids(entries[:10], named)}
    [checkpoint] = target.glob("import-*.progress")
    assert json.loads(checkpoint.read_text())["offset"] == offsets[1]

    outcome = import_dump(target, dump, batch_size=5, progress=False)
    assert outcome.complete and outcome.resumed_at == offsets[1] and outcome.present == 0
    assert outcome.imported == len(expected - _ids(entries[:10], named))
    assert _count(target) == {i: 1 for i in expected}

    # A checkpoint write lost in a crash: the rerun reads batches again and skips them by id.
    checkpoint.write_text(json.dumps({"offset": offsets[0], "line": 6, "complete": False}))
    outcome = import_dump(target, dump, batch_size=5, progress=False)
    assert outcome.complete and outcome.imported == 0
    assert outcome.present == len(expected - _ids(entries[:5], named))
    assert _count(target) == {i: 1 for i in expected}
    # Done: a rerun does nothing; without the checkpoint it skips every entry by id.
    assert import_dump(target, dump, progress=False).lines == 0
    checkpoint.unlink()
    outcome = import_dump(target, dump, progress=False)
    assert outcome.present == len(expected) and outcome.imported == 0
    assert _count(target) == {i: 1 for i in expected}


def test_a_bad_line_stops_the_import_with_its_number_and_skip_bad_goes_on(
        filled: tuple[Path, dict, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    _, named, dump = filled
    lines = _lines(dump)
    entries = lines[1:-1]
    damaged = json.loads(entries[4])
    damaged["partition"] = "zz"
    # Lines 5 and 6 (the 4th and 5th entries) damaged, and a line too long before the trailer.
    body = [*entries[:3], b"{not json\n", json.dumps(damaged).encode() + b"\n", *entries[5:],
            b"x" * (MAX_LINE_BYTES + 10) + b"\n"]
    bad = _write(tmp_path / "bad.jsonl", [lines[0], *body, json.dumps(
        {"end": {"entries": len(body)}}).encode() + b"\n"])
    target = tmp_path / "data"

    assert _cli("import", "--data-dir", str(target), str(bad), "--batch-size", "2") == 2
    assert "line 5 of the dump is malformed" in caplog.text and "--skip-bad" in caplog.text
    assert _count(target) == {i: 1 for i in _ids(entries[:3], named)}
    caplog.clear()

    with caplog.at_level(logging.INFO, logger="stratacache.transfer"):
        assert _cli("import", "--data-dir", str(target), str(bad), "--skip-bad") == 0
    assert "resuming the import at line 5" in caplog.text
    assert "line 6 of the dump is malformed: partition is not 32 hex digits" in caplog.text
    assert f"line {len(body) + 1} of the dump is malformed: it is longer than" in caplog.text
    assert _count(target) == {i: 1 for i in _ids([*entries[:3], *entries[5:]], named)}

    # A dump cut short is imported as far as it goes, and said to be incomplete.
    caplog.clear()
    cut = _write(tmp_path / "cut.jsonl", lines[:-4])
    assert _cli("import", "--data-dir", str(tmp_path / "cut"), str(cut)) == 2
    assert "ends without its trailer line: it was cut short" in caplog.text
    assert _count(tmp_path / "cut") == {i: 1 for i in _ids(lines[1:-4], named)}
    with pytest.raises(BadDump, match="line 1: not the header of a stratacache dump"):
        import_dump(tmp_path / "cut", _write(tmp_path / "h.jsonl", entries), progress=False)


def test_a_line_with_a_malformed_cost_is_reported(filled: tuple[Path, dict, Path],
                                                  tmp_path: Path) -> None:
    _, named, dump = filled
    lines = _lines(dump)
    line = json.loads(_odd_line(lines, named))
    for cost, message in (({"prompt_tokens": -1}, "cost.prompt_tokens must be a token count"),
                          ({"latency_s": "1"}, "cost.latency_s is '1', not a number of seconds"),
                          ({"model": ""}, "cost.model must be 1 to 256 bytes"),
                          ([1], "cost must be an object")):
        line["cost"] = cost
        bad = _write(tmp_path / "bad.jsonl", [lines[0], json.dumps(line).encode() + b"\n",
                                              b'{"end": {"entries": 1}}\n'])
        with pytest.raises(BadDump, match=f"line 2 of the dump is malformed: {re.escape(message)}"):
            import_dump(tmp_path / "data", bad, progress=False)


def test_a_dump_of_one_model_is_re_embedded_for_another(
        filled: tuple[Path, dict, Path], other_model: Path, other_encoder: Encoder,
        encoder: Encoder, tmp_path: Path) -> None:
    source, named, dump = filled
    live = {i: v for i, v in _stored(source).items() if i != named["expired"]}
    target = tmp_path / "other"
    outcome = import_dump(target, dump, model=str(other_model), encoder=other_encoder,
                          batch_size=8, progress=False)
    assert outcome.complete and outcome.imported == outcome.embedded == len(live)
    after = _stored(target)
    assert set(after) == set(live)
    for entry_id, (tier, entry) in after.items():
        assert tier == live[entry_id][0] and _fields(entry) == _fields(live[entry_id][1])
        assert entry.vector.shape == (OTHER_DIM,)
    prompts = [keys.normalise_prompt(t) for t in TOPICS]
    got = np.stack([after[named[f"topic{i}"]][1].vector for i in range(len(TOPICS))])
    np.testing.assert_allclose(got, other_encoder.encode(prompts), atol=1e-4)
    assert not after[named["long"]][1].vector.any()  # too long to embed: exact matches only
    manifest = json.loads((target / "stratacache.json").read_text())
    assert (manifest["dimension"], manifest["fingerprint"]) == (
        OTHER_DIM, other_encoder.identity.fingerprint)

    # Into an existing directory of the other model, --model must name that model.
    DataDir(tmp_path / "empty", other_encoder.identity).close()
    with pytest.raises(DataDirMismatch, match=re.escape("give --model the folder of the "
                                                        "directory's model")):
        import_dump(tmp_path / "empty", dump, encoder=encoder, progress=False)
    assert _count(tmp_path / "empty") == {}


def test_export_refuses_a_directory_a_server_holds_or_none_at_all(
        encoder: Encoder, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    data = tmp_path / "data"

    async def while_serving() -> int:
        engine = await Engine.open(_settings(data), encoder)
        try:
            return _cli("export", "--data-dir", str(data), "--output", str(tmp_path / "d"))
        finally:
            await engine.close()

    assert asyncio.run(while_serving()) == 2
    assert "in use by another stratacache server" in caplog.text
    assert "stop it before exporting" in caplog.text and not (tmp_path / "d").exists()
    caplog.clear()
    assert _cli("export", "--data-dir", str(tmp_path / "nowhere")) == 2
    assert "not a stratacache data directory" in caplog.text


def test_the_commands_stream_through_standard_output_and_input(
        filled: tuple[Path, dict, Path], tmp_path: Path) -> None:
    source, named, dump = filled
    command = [sys.executable, "-m", "stratacache.cli"]
    exported = subprocess.run([*command, "export", "--data-dir", str(source)],
                              capture_output=True, timeout=300, check=True)
    assert exported.stdout.splitlines(keepends=True)[1:] == _lines(dump)[1:]
    target = tmp_path / "data"
    imported = subprocess.run([*command, "import", "--data-dir", str(target), "-"],
                              input=exported.stdout, capture_output=True, timeout=300,
                              env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert imported.returncode == 0, imported.stderr.decode()
    assert _count(target) == {i: 1 for i in _ids(_lines(dump)[1:-1], named)}
    assert not list(target.glob("import-*.progress"))  # standard input: no checkpoint
