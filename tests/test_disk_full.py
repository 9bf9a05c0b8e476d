"""A full disk: Stores say "disk full" with a status a client can act on (FAILED_PRECONDITION,
``StorageFullError``), lookups keep answering, background moves log one line each (no
traceback), and Stores work again once space is freed. A real, small tmpfs holds the data."""

from __future__ import annotations

import logging
import os
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from stratacache import Client, StorageFullError

from .test_tiers import TOPICS

BIG = os.urandom(256 * 1024)  # incompressible, so the disk fills in a few dozen Stores


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 12 MiB tmpfs (needs root, as CI runs; elsewhere the test is skipped, saying why)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=12m", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (root needed): {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_is_reported_as_disk_full_and_nothing_breaks(
        start_server, small_disk: Path, caplog: pytest.LogCaptureFixture) -> None:  # type: ignore[no-untyped-def]
    filler = small_disk / "filler"  # deleted at the end: the space an admin frees
    filler.write_bytes(b"\0" * (3 << 20))
    server = start_server(data_dir=small_disk / "data", warm_max_bytes=4 << 20,
                          hot_capacity=4)
    stored: dict[str, str] = {}
    with server.client(timeout=60) as c, caplog.at_level(logging.WARNING):
        c.set_policy("default", min_similarity=0.7)
        error = None
        for i in range(200):  # far more than 12 MiB: the disk is full long before
            prompt = f"{TOPICS[i % len(TOPICS)]} ({i})"
            try:
                stored[prompt] = c.store(prompt, BIG)
            except StorageFullError as exc:
                error = exc
                break
        assert error is not None, "the disk never filled"
        assert "disk full" in str(error)
        server.run(server.engine.settled())
        # Every acknowledged entry still answers its prompt, exactly.
        for prompt, entry_id in stored.items():
            result = c.lookup(prompt)
            assert result.hit and result.entry_id == entry_id and result.response == BIG
        # A delete needs a page too; on a full disk it may fail, but only as "disk full".
        victim = next(iter(stored.values()))
        try:
            assert c.delete_entry(victim)
        except StorageFullError as exc:
            assert "disk full" in str(exc)
        # Space freed: Stores work again.
        filler.unlink()
        entry_id = c.store(f"a new question {uuid.uuid4()}", b"fits now")
        assert c.delete_entry(entry_id)
    tracebacks = [r for r in caplog.records if r.exc_info]
    assert not tracebacks, [r.getMessage() for r in tracebacks]
