"""An acknowledged removal stays removed: while lookups move entries from cold to warm, and
through a SIGKILL right after the acknowledgement. A real server process, killed for real."""

from __future__ import annotations

import time
from pathlib import Path

from stratacache import Client

from .processes import ServerProcess

ENTRIES = 45  # a multiple of 3: delete_entry, delete_user, replacing store in turn
BIG = b"x" * (64 * 1024)  # 64 KiB responses: most of 45 overflow a 1 MiB warm budget
KILL_ROUNDS = 3  # server restarts, each killed right after one acknowledged removal
FLAGS = ("--hot-capacity", "4", "--warm-max-mib", "1", "--embed-threads", "1")


def _prompt(i: int) -> str:
    return f"Ticket {i}: how do I configure option {i} of the router?"


def _remove(c: Client, i: int, entry_id: str) -> str | None:
    """Removes entry ``i`` the way its number says; returns the replacing entry's id."""
    kind = i % 3
    if kind == 0:
        assert c.delete_entry(entry_id)
    elif kind == 1:
        assert c.delete_user(f"user-{i}") == 1
    else:
        return c.store(_prompt(i), b"replacement", user_id=f"user-{i}")
    return None


def _check(c: Client, i: int, removed: str, replacement: str | None) -> None:
    result = c.lookup(_prompt(i))
    assert result.entry_id != removed, f"entry {i} came back after its removal was acknowledged"
    if replacement is not None:
        assert result.entry_id == replacement and result.response == b"replacement", i


def test_removals_acknowledged_while_entries_move_stay_removed(tmp_path: Path) -> None:
    data = tmp_path / "data"
    replacements: dict[int, str | None] = {}
    ids: list[str] = []
    with ServerProcess(data, tmp_path / "first.log", *FLAGS) as server:
        with Client(server.target, timeout=120) as c:
            ids += [c.store(_prompt(i), BIG, user_id=f"user-{i}") for i in range(ENTRIES)]
            deadline = time.monotonic() + 120  # a safety net; the condition is what we wait for
            while c.stats()["cold"]["entries"] < ENTRIES // 2:
                assert time.monotonic() < deadline, "entries never reached the cold tier"
                time.sleep(0.05)
            # The oldest entries are in cold; these are kept for the kill rounds below.
            for i in range(KILL_ROUNDS, ENTRIES):
                # An exact hit of a cold entry starts moving it to warm; the removal races it,
                # and a lookup right after the acknowledgement must not see the entry.
                assert c.lookup(_prompt(i)).entry_id == ids[i]
                replacements[i] = _remove(c, i, ids[i])
                _check(c, i, ids[i], replacements[i])
    # Each round: a cold entry starts moving, is removed, and the server is SIGKILLed the moment
    # the removal is acknowledged, while the move may still be writing or undoing its copy.
    # The next start must not bring it back.
    for i in range(KILL_ROUNDS):
        with ServerProcess(data, tmp_path / f"round-{i}.log", *FLAGS) as server:
            with Client(server.target, timeout=120) as c:
                for j in range(i):
                    _check(c, j, ids[j], replacements[j])
                assert c.lookup(_prompt(i)).entry_id == ids[i]
                replacements[i] = _remove(c, i, ids[i])
                server.kill()
    with ServerProcess(data, tmp_path / "last.log", *FLAGS) as server:
        with Client(server.target, timeout=120) as c:
            for i, entry_id in enumerate(ids):
                _check(c, i, entry_id, replacements[i])
            stats = c.stats()
            # One entry per exact key: the replacements, nothing else.
            assert stats["warm"]["entries"] + stats["cold"]["entries"] == ENTRIES // 3
