"""``stratacache reindex``: a data directory re-embedded for another model keeps every entry,
serves it with the new model's vectors, refuses the old model, and survives interruption.

"Another model" is the bundled all-MiniLM-L6-v2 with one layer's weights perturbed and a random
projection to 256 dimensions appended: different weights (fingerprint), vectors and dimension,
built in a temporary folder without downloading anything.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from stratacache import keys
from stratacache.config import Settings
from stratacache.embed import Encoder, resolve_model_path
from stratacache.engine import Engine
from stratacache.errors import DataDirMismatch
from stratacache.keyring import KeyRing
from stratacache.messages import LookupRequest, StoreRequest
from stratacache.records import Entry, Tier
from stratacache.tiers.base import EVERYTHING
from stratacache.reindex import add_arguments, reindex, run
from stratacache.tiers import cold, warm

from .test_tiers import BIG, PARAPHRASE_0, TOPICS

OTHER_DIM = 256
LONG_PROMPT = "Summarise this: " + "lorem ipsum dolor sit amet " * 120  # beyond 256 tokens
KEPT = StoreRequest(prompt="How long do eggs keep in the fridge?", response=b"3 weeks",
                    namespace="other", ttl_s=3600, user_id="u1", template_id="t",
                    template_version="1", metadata={"source": "faq"})


@pytest.fixture(scope="module")
def other_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch
    from sentence_transformers import SentenceTransformer

    try:
        from sentence_transformers.sentence_transformer.modules import Dense, Normalize
    except ImportError:  # sentence-transformers before 6
        from sentence_transformers.models import Dense, Normalize

    base = SentenceTransformer(str(resolve_model_path("default")), device="cpu",
                               local_files_only=True)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        weight = base[0].auto_model.encoder.layer[5].output.dense.weight
        weight.add_(0.05 * weight.std() * torch.randn(weight.shape, generator=generator))
        projection = Dense(384, OTHER_DIM, bias=False, activation_function=torch.nn.Identity())
        projection.linear.weight.copy_(torch.randn(OTHER_DIM, 384, generator=generator) / 16)
    path = tmp_path_factory.mktemp("models") / "minilm-perturbed-256"
    SentenceTransformer(modules=[base[0], base[1], projection, Normalize()],
                        device="cpu").save(str(path))
    return path


@pytest.fixture(scope="module")
def other_encoder(other_model: Path) -> Encoder:
    return Encoder(str(other_model), device="cpu")


def _settings(path: Path) -> Settings:
    # Small budgets: of 20 entries of 64 KiB, 4 stay in memory and the oldest move to cold.
    return Settings(data_dir=path, port=0, sweep_interval_s=3600.0, hot_capacity=4,
                    warm_max_bytes=1 << 20, min_similarity=0.7)


def _fill(encoder: Encoder, path: Path) -> list[str]:
    """Stores TOPICS (big responses: some end in cold), one entry with every field set, one
    prompt too long to embed and one that expires at once; returns the ids in that order."""
    async def fill() -> list[str]:
        engine = await Engine.open(_settings(path), encoder)
        try:
            ids = [(await engine.store(StoreRequest(prompt=t, response=BIG + t.encode()))).entry_id
                   for t in TOPICS]
            for request in (KEPT, StoreRequest(prompt=LONG_PROMPT, response=b"long"),
                            StoreRequest(prompt="What time is it now?", response=b"noon",
                                         ttl_s=0.05)):
                ids.append((await engine.store(request)).entry_id)
            deadline = time.monotonic() + 30
            while not len(engine.cold):
                assert time.monotonic() < deadline, "nothing was demoted to cold"
                await asyncio.sleep(0.02)
        finally:
            await engine.close()  # finishes the moves in flight
        return ids

    ids = asyncio.run(fill())
    time.sleep(0.1)  # the last entry has expired
    return ids


def _stored(path: Path) -> dict[str, tuple[str, Entry]]:
    """Every entry on disk, by id, with the tier that holds it."""
    found: dict[str, tuple[str, Entry]] = {}
    with KeyRing(path / "keys.sqlite3") as keys:  # records of users are encrypted
        for tier, read in (("cold", cold.read_stored(path / "cold.sqlite3", 100, keys=keys)),
                           ("warm", warm.read_stored(path / "warm", 100, keys=keys))):
            for chunk in read:
                found.update((e.id, (tier, e)) for e in chunk)  # warm wins, as at start-up
    return found


def _fields(entry: Entry) -> tuple:
    return (entry.id, entry.namespace, entry.partition, entry.exact_key, entry.prompt,
            entry.response, entry.created_at, entry.expires_at, entry.template_id,
            entry.template_version, entry.user_id, dict(entry.metadata))


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="stratacache reindex")
    add_arguments(parser)
    return parser.parse_args(list(argv))


def _manifest(path: Path) -> dict:
    return json.loads((path / "stratacache.json").read_text())


def _lookups(encoder: Encoder, path: Path, ids: list[str]) -> None:
    """Opens the directory with ``encoder``: every live entry answers its own prompt exactly,
    a paraphrase finds the oldest entry by semantic search, and an entry now only in cold is
    found there by semantic search."""
    async def check() -> None:
        engine = await Engine.open(_settings(path), encoder)
        try:
            await engine.settled()  # demotions of a warm tier over budget at start-up
            in_cold = {i.id for i in await engine.cold.infos(EVERYTHING)}
            index = next(i for i, e in enumerate(ids[:len(TOPICS)])
                         if e in in_cold and e not in engine.warm and e not in engine.hot)
            query = TOPICS[index] + " Please explain."
            semantic = await engine.lookup(LookupRequest(prompt=query, min_similarity=0.7))
            assert semantic.hit and semantic.tier is Tier.COLD and semantic.entry_id == ids[index]
            assert semantic.response == BIG + TOPICS[index].encode()
            semantic = await engine.lookup(LookupRequest(prompt=PARAPHRASE_0, min_similarity=0.75))
            assert semantic.hit and semantic.tier is not Tier.EXACT
            assert semantic.entry_id == ids[0] and semantic.response == BIG + TOPICS[0].encode()
            for prompt, entry_id in zip(TOPICS, ids):
                result = await engine.lookup(LookupRequest(prompt=prompt))
                assert result.hit and result.entry_id == entry_id
            kept = await engine.lookup(LookupRequest(
                prompt=KEPT.prompt, namespace="other", template_id="t", template_version="1"))
            assert kept.hit and kept.entry_id == ids[len(TOPICS)] and kept.response == b"3 weeks"
            long = await engine.lookup(LookupRequest(prompt=LONG_PROMPT))
            assert long.hit and long.tier is Tier.EXACT and long.response == b"long"
        finally:
            await engine.close()

    asyncio.run(check())


def _refused(encoder: Encoder, path: Path, match: str) -> None:
    async def open_it() -> None:
        engine = await Engine.open(_settings(path), encoder)
        await engine.close()

    with pytest.raises(DataDirMismatch, match=match):
        asyncio.run(open_it())


def test_reindex_to_another_model_keeps_every_entry_and_its_tier(
        encoder: Encoder, other_model: Path, other_encoder: Encoder, tmp_path: Path) -> None:
    data = tmp_path / "data"
    ids = _fill(encoder, data)
    before = _stored(data)
    expired = ids[-1]
    assert {tier for tier, _ in before.values()} == {"warm", "cold"} and expired in before

    assert run(_args("--data-dir", str(data), "--model", str(other_model), "--device", "cpu",
                     "--batch-size", "8")) == 0

    after = _stored(data)
    assert set(after) == set(before) - {expired}  # same ids; the expired entry is dropped
    for entry_id, (tier, entry) in after.items():
        assert tier == before[entry_id][0]
        assert _fields(entry) == _fields(before[entry_id][1])
        assert entry.vector.shape == (OTHER_DIM,)
    # The vectors are the new model's, of the normalised prompt, as a Store computes them.
    prompts = [keys.normalise_prompt(t) for t in TOPICS]
    expected = other_encoder.encode(prompts)
    got = np.stack([after[i][1].vector for i in ids[:len(TOPICS)]])
    np.testing.assert_allclose(got, expected, atol=1e-4)
    assert not after[ids[len(TOPICS) + 1]][1].vector.any()  # too long to embed: exact only
    manifest = _manifest(data)
    assert (manifest["dimension"], manifest["fingerprint"]) == (
        OTHER_DIM, other_encoder.identity.fingerprint)
    assert manifest["previous"]["fingerprint"] == encoder.identity.fingerprint
    assert not (data / "reindex").exists()

    _lookups(other_encoder, data, ids)
    _refused(encoder, data, re.escape(f"`stratacache reindex --data-dir {data} --model default`"))

    # And back again, from 256 dimensions to 384.
    outcome = reindex(data, "default", encoder=encoder)
    assert outcome.changed and outcome.entries == len(after)
    _lookups(encoder, data, ids)
    _refused(other_encoder, data, "stratacache reindex --data-dir")


def test_same_model_is_a_no_op_unless_forced(encoder: Encoder, tmp_path: Path,
                                             caplog: pytest.LogCaptureFixture) -> None:
    data = tmp_path / "data"
    ids = _fill(encoder, data)
    files = [data / "stratacache.json", data / "warm" / "data.mdb", data / "cold.sqlite3"]
    stamps = [(f.stat().st_mtime_ns, f.read_bytes()) for f in files]
    with caplog.at_level(logging.INFO, logger="stratacache.reindex"):
        assert run(_args("--data-dir", str(data), "--model", "default", "--device", "cpu")) == 0
    assert "already uses model 'all-MiniLM-L6-v2'" in caplog.text and "nothing to do" in caplog.text
    assert [(f.stat().st_mtime_ns, f.read_bytes()) for f in files] == stamps

    outcome = reindex(data, "default", encoder=encoder, force=True)
    assert outcome.changed and outcome.entries == len(ids) - 1
    assert outcome.warm > 0 and outcome.cold > 0 and outcome.expired == 1
    _lookups(encoder, data, ids)


def test_reindex_refuses_a_directory_a_server_holds(encoder: Encoder, tmp_path: Path,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    data = tmp_path / "data"

    async def while_serving() -> int:
        engine = await Engine.open(_settings(data), encoder)
        try:
            return run(_args("--data-dir", str(data), "--model", "default"))
        finally:
            await engine.close()

    assert asyncio.run(while_serving()) == 2
    assert "in use by another stratacache server" in caplog.text
    assert "stop it before reindexing" in caplog.text
    caplog.clear()
    assert run(_args("--data-dir", str(tmp_path / "nowhere"), "--model", "default")) == 2
    assert "not a stratacache data directory" in caplog.text


# A reindex in a process of its own that dies (os._exit: no cleanup, no finally) at the n-th
# time it reaches a step: a crash at that point.
_CRASHING = """
import os, sys
from pathlib import Path
from stratacache.reindex import reindex
data, model, crash_at, nth = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
seen = 0
def step(name):
    global seen
    if name == crash_at:
        seen += 1
        if seen == nth:
            os._exit(9)
reindex(Path(data), model, device="cpu", batch_size=4, on_step=step)
"""


def _crash(data: Path, model: Path, step: str, nth: int = 1) -> None:
    done = subprocess.run([sys.executable, "-c", _CRASHING, str(data), str(model), step,
                           str(nth)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 9, done.stderr


def test_reindex_killed_before_its_commit_point_leaves_the_old_model(
        encoder: Encoder, other_model: Path, other_encoder: Encoder, tmp_path: Path) -> None:
    data = tmp_path / "data"
    ids = _fill(encoder, data)
    manifest = _manifest(data)
    _crash(data, other_model, "batch", nth=3)  # died with half-written new tiers
    assert (data / "reindex" / "warm").exists() and _manifest(data) == manifest
    _lookups(encoder, data, ids)  # opens with the old model, and removes the scratch
    assert not (data / "reindex").exists()
    _refused(other_encoder, data, "stratacache reindex --data-dir")
    # A rerun completes.
    assert reindex(data, str(other_model), encoder=other_encoder).changed
    _lookups(other_encoder, data, ids)


def test_reindex_stopped_after_its_commit_point_is_completed_by_the_next_open(
        encoder: Encoder, other_model: Path, other_encoder: Encoder, tmp_path: Path) -> None:
    data = tmp_path / "data"
    ids = _fill(encoder, data)

    class Crash(Exception):
        pass

    def crash_at_warm_swapped(step: str) -> None:
        if step == "warm-swapped":
            raise Crash  # past the commit point no cleanup runs: the state a kill leaves

    # Stopped with the new warm tier in place, the old cold tier and the old manifest.
    with pytest.raises(Crash):
        reindex(data, str(other_model), encoder=other_encoder, on_step=crash_at_warm_swapped)
    assert (data / "warm").exists() and not (data / "reindex" / "warm").exists()
    assert (data / "reindex" / "cold.sqlite3").exists()
    assert (data / "reindex" / "stratacache.json").exists()
    assert _manifest(data)["fingerprint"] == encoder.identity.fingerprint
    _refused(encoder, data, "stratacache reindex --data-dir")  # the reindex was committed...
    assert not (data / "reindex").exists()  # ... and opening it finished the swap
    assert _manifest(data)["fingerprint"] == other_encoder.identity.fingerprint
    _lookups(other_encoder, data, ids)
    # A rerun now has nothing to do.
    assert not reindex(data, str(other_model), encoder=other_encoder).changed
