"""Several nodes sharing one cache through a real PostgreSQL with pgvector (``--shared-store``):
Stores seen by every node, invalidations applied everywhere, a disconnected or stopped node
catching up, and the database going away and coming back."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psycopg
import pytest

from stratacache import Client, cli, shared
from stratacache.client import InvalidArgumentError, UnavailableError
from stratacache.errors import CacheError
from tests.data import qqp_pairs
from tests.processes import ServerProcess, free_port

QUESTION = "How do I reset my password?"
PARAPHRASE = "How can I reset my password?"
OTHER = "What is the boiling point of water at sea level?"


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 120.0) -> None:
    """Polls until ``condition`` holds; the timeout is a safety net for a loaded machine."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


@pytest.fixture
def fleet(start_server, shared_store: str, tmp_path: Path):  # type: ignore[no-untyped-def]
    """``fleet(n)``: n nodes on one shared store, each with its own data directory."""
    def start(n: int, **settings: object) -> list:  # type: ignore[type-arg]
        return [start_server(data_dir=tmp_path / f"node{i}", shared_store=shared_store,
                             **settings) for i in range(n)]
    return start


def holds_locally(node, entry_id: str) -> bool:  # type: ignore[no-untyped-def]
    """Whether the node's own tiers hold the entry (once its background copies are written)."""
    node.run(node.engine.settled())
    return node.run(node.engine.placement.find(entry_id)) is not None


def misses(client: Client, prompt: str, **kwargs: object) -> Callable[[], bool]:
    return lambda: not client.lookup(prompt, **kwargs).hit  # type: ignore[arg-type]


def test_a_store_on_one_node_is_served_by_the_others(fleet) -> None:  # type: ignore[no-untyped-def]
    nodes = fleet(3)
    a, b, c = (node.client() for node in nodes)
    entry_id = a.store(QUESTION, "Use the reset link.", namespace="support")
    exact = b.lookup(QUESTION, namespace="support")
    assert (exact.hit, exact.entry_id, exact.tier, exact.text) == (
        True, entry_id, "exact", "Use the reset link.")
    semantic = c.lookup(PARAPHRASE, namespace="support")
    assert (semantic.hit, semantic.entry_id, semantic.tier) == (True, entry_id, "shared")
    # once served, each node keeps a local copy: the next hit is local
    assert holds_locally(nodes[2], entry_id)
    assert c.lookup(PARAPHRASE, namespace="support").tier == "hot"
    assert not b.lookup(QUESTION, namespace="other").hit  # namespaces stay apart


def test_a_store_replacing_an_exact_prompt_replaces_it_on_every_node(fleet) -> None:  # type: ignore[no-untyped-def]
    nodes = fleet(2)
    a, b = (node.client() for node in nodes)
    old = a.store(QUESTION, "old answer")
    assert b.lookup(QUESTION).text == "old answer"
    assert holds_locally(nodes[1], old)
    newer = a.store(QUESTION, "new answer")
    wait_for(lambda: b.lookup(QUESTION).entry_id == newer, "b to drop the replaced answer")
    assert b.lookup(QUESTION).text == "new answer"


@pytest.mark.parametrize("invalidate", [
    lambda c: c.invalidate_template("faq", namespace="support"),
    lambda c: c.invalidate_namespace("support"),
    lambda c: c.delete_user("u-1"),
], ids=["template", "namespace", "user"])
def test_an_invalidation_through_one_node_is_honoured_by_every_node(
        fleet, postgres, shared_store: str, invalidate) -> None:  # type: ignore[no-untyped-def]
    nodes = fleet(3)
    a, b, c = (node.client() for node in nodes)
    entry_id = a.store(QUESTION, "answer", namespace="support", template_id="faq",
                       user_id="u-1")
    for node, client in zip(nodes[1:], (b, c)):  # every node holds a local copy first
        assert client.lookup(QUESTION, namespace="support", template_id="faq").hit
        assert holds_locally(node, entry_id)
    assert invalidate(a) == 1
    for client in (a, b, c):
        wait_for(misses(client, QUESTION, namespace="support", template_id="faq"),
                 "the invalidation to reach every node")
        assert not client.lookup(PARAPHRASE, namespace="support", template_id="faq").hit
    database = shared_store.rsplit("/", 1)[1]
    assert postgres.execute(database, "SELECT count(*) FROM stratacache.entries") == [(0,)]


def test_delete_entry_and_a_policy_change_reach_every_node(fleet) -> None:  # type: ignore[no-untyped-def]
    a, b = (node.client() for node in fleet(2))
    entry_id = a.store(QUESTION, "answer")
    assert b.lookup(QUESTION).hit
    assert b.delete_entry(entry_id)
    wait_for(misses(a, QUESTION), "a to drop the deleted entry")
    a.set_policy("support", min_similarity=0.99)
    wait_for(lambda: b.get_policy("support")["min_similarity"] == pytest.approx(0.99),
             "b to apply the policy")


def test_policies_evidence_and_vetoes_are_the_fleets(
        fleet, start_server, postgres, shared_store: str, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Evidence added and feedback given through any node count on every node, one started
    later included; a wrong report vetoes the entry everywhere; DeleteUser erases the user's
    evidence rows from PostgreSQL and every node."""
    nodes = fleet(3)
    a, b, c = (node.client() for node in nodes)
    a.set_policy("qa", max_wrong_rate=0.5)
    pairs = [(p.a, p.b, p.duplicate) for p in qqp_pairs(300)]
    added = a.add_evidence("qa", pairs)["policy"]
    assert added["evidence"] == 300 and added["threshold"] is not None
    wait_for(lambda: b.get_policy("qa")["evidence"] == 300, "b to apply the evidence")
    assert b.get_policy("qa")["threshold"] == pytest.approx(added["threshold"])

    entry_id = a.store(QUESTION, "answer", user_id="u-7")
    assert b.lookup(PARAPHRASE).hit and holds_locally(nodes[1], entry_id)
    # C never served it: the report finds it in the shared store
    assert not c.feedback(entry_id, PARAPHRASE, False)["entry_deleted"]
    for client in (a, b, c):
        wait_for(misses(client, PARAPHRASE), "every node to veto the entry for the paraphrase")
        assert client.lookup(QUESTION).entry_id == entry_id  # vetoed near the report only
    assert b.stats()["namespaces"]["default"]["vetoed_entries"] == 1

    database = shared_store.rsplit("/", 1)[1]
    d = start_server(data_dir=tmp_path / "late", shared_store=shared_store).client()
    late = d.get_policy("qa")  # taken from the shared store at start, no wait
    assert (late["evidence"], late["threshold"]) == (300, pytest.approx(added["threshold"]))
    assert late["bound"] == pytest.approx(0.5)
    assert d.get_policy("default")["feedback_wrong"] == 1
    assert not d.lookup(PARAPHRASE).hit and d.lookup(QUESTION).hit

    assert postgres.execute(database, "SELECT count(*) FROM stratacache.evidence WHERE "
                                      "user_id = 'u-7'") == [(1,)]
    b.delete_user("u-7")
    assert postgres.execute(database, "SELECT count(*) FROM stratacache.evidence WHERE "
                                      "user_id = 'u-7'") == [(0,)]
    for client in (a, c, d):
        wait_for(lambda: client.get_policy("default")["feedback_wrong"] == 0,
                 "every node to erase the user's evidence")
    rows = nodes[0].engine.policies._db.execute(
        "SELECT count(*) FROM evidence WHERE user_id = 'u-7'").fetchone()
    assert rows == (0,)


def test_the_first_node_on_a_store_gives_it_its_policies_and_evidence(
        start_server, shared_store: str, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A single node joining a new fleet (or the first node on a store upgraded from schema 1,
    where policies lived with each node) keeps its policy floors and evidence, and the nodes
    after it get them."""
    single = start_server(data_dir=tmp_path / "a")
    with single.client() as c:
        c.set_policy("qa", max_wrong_rate=0.5, min_similarity=0.9)
        before = c.add_evidence("qa", [(p.a, p.b, p.duplicate) for p in qqp_pairs(300)])["policy"]
    single.stop()
    a = start_server(data_dir=tmp_path / "a", shared_store=shared_store).client()
    b = start_server(data_dir=tmp_path / "b", shared_store=shared_store).client()
    for client in (a, b):
        status = client.get_policy("qa")
        assert (status["evidence"], status["bound"], status["min_similarity"]) == (
            300, pytest.approx(0.5), pytest.approx(0.9))
        assert status["threshold"] == pytest.approx(before["threshold"])
    with pytest.raises(InvalidArgumentError, match="shared store refused"):
        a.add_evidence("qa", [("a question with a \x00 in it?", "another question?", True)])


def test_a_change_a_node_cannot_apply_does_not_stop_its_feed(
        fleet, postgres, shared_store: str) -> None:  # type: ignore[no-untyped-def]
    """A malformed change (a newer or broken writer) is logged and remedied; the changes after
    it still reach the node."""
    a_node, b_node = fleet(2)
    a, b = a_node.client(), b_node.client()
    kept = a.store(QUESTION, "answer", namespace="support")
    assert b.lookup(QUESTION, namespace="support").hit and holds_locally(b_node, kept)
    database = shared_store.rsplit("/", 1)[1]
    for kind, body in (("policy", '{"namespace": "support", "policy": {"new_field": 1}}'),
                       ("remove", '{"no_such_field": 1}')):
        postgres.execute(database, "INSERT INTO stratacache.changes (kind, body) VALUES "
                                   f"('{kind}', '{body}')")
    removed = a.store(OTHER, "answer", namespace="other")
    assert b.lookup(OTHER, namespace="other").hit
    a.invalidate_namespace("other")
    wait_for(misses(b, OTHER, namespace="other"), "b to apply the changes after the bad ones")
    assert b_node.engine.shared.connected
    # the bad removal emptied b's tiers (they might have held what it removed); the shared
    # store still serves what it did not remove
    assert not holds_locally(b_node, kept) and not holds_locally(b_node, removed)
    assert b.lookup(QUESTION, namespace="support").entry_id == kept


def test_a_user_deleted_while_their_feedback_is_added_leaves_no_row(
        fleet, postgres, shared_store: str) -> None:  # type: ignore[no-untyped-def]
    """DeleteUser waits for evidence being added to commit, so it deletes those rows too:
    PostgreSQL and every node agree."""
    (node,) = fleet(1)
    client = node.client()
    database = shared_store.rsplit("/", 1)[1]
    with psycopg.connect(shared_store) as adding:  # a transaction stays open until commit
        adding.execute("INSERT INTO stratacache.evidence (batch, created_at, namespace, source, "
                       "query, matched, correct, entry_id, user_id, similarity) VALUES "
                       "('racing', 0, 'default', 'feedback', %s, %s, false, 'e-1', 'u-9', 0.9)",
                       (PARAPHRASE, QUESTION))
        with ThreadPoolExecutor(1) as pool:
            deleting = pool.submit(client.delete_user, "u-9")
            wait_for(lambda: postgres.execute(database, "SELECT count(*) FROM pg_locks WHERE "
                                                        "NOT granted") != [(0,)],
                     "DeleteUser to wait for the evidence being added")
            adding.execute("SELECT pg_advisory_xact_lock(%s)", (shared.LOG_LOCK,))
            adding.execute("INSERT INTO stratacache.changes (kind, body) VALUES ('evidence', "
                           "'{\"namespace\": \"default\", \"batch\": \"racing\"}')")
            adding.commit()
            deleting.result()
    assert postgres.execute(database, "SELECT count(*) FROM stratacache.evidence") == [(0,)]
    wait_for(lambda: node.engine.shared.applied >= postgres.execute(
        database, "SELECT max(seq) FROM stratacache.changes")[0][0], "the node to catch up")
    assert client.get_policy("default")["evidence"] == 0


def test_a_quiet_fleet_whose_log_was_pruned_keeps_its_copies_across_restarts(
        fleet, start_server, postgres, shared_store: str, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A log pruned empty (a day without invalidations) still counts the changes it held: a
    node that joined after it does not empty its tiers at every restart."""
    (a_node,) = fleet(1)
    a = a_node.client()
    entry_id = a.store(QUESTION, "answer")
    a.invalidate_namespace("elsewhere")  # one change, then the log is pruned empty
    database = shared_store.rsplit("/", 1)[1]
    postgres.execute(database, "WITH gone AS (DELETE FROM stratacache.changes RETURNING seq) "
                               "UPDATE stratacache.meta SET value = (SELECT to_jsonb(max(seq)) "
                               "FROM gone) WHERE key = 'pruned_through'")
    b_node = start_server(data_dir=tmp_path / "b", shared_store=shared_store)
    assert b_node.client().lookup(QUESTION).hit and holds_locally(b_node, entry_id)
    b_node.stop()
    b_again = start_server(data_dir=tmp_path / "b", shared_store=shared_store)
    assert holds_locally(b_again, entry_id)


@pytest.mark.parametrize("log_pruned", [False, True], ids=["log-kept", "log-pruned"])
def test_a_node_cut_off_from_the_database_catches_up_when_it_returns(
        fleet, postgres, shared_store: str, start_server, tmp_path: Path,
        log_pruned: bool) -> None:  # type: ignore[no-untyped-def]
    """Node B logs in as its own role; the test takes its login away (its connections are
    ended) while A invalidates, then gives it back: B must not serve the invalidated entry.
    With ``log_pruned``, the invalidation has left the log by then: B must notice and empty
    its local tiers."""
    database = shared_store.rsplit("/", 1)[1]
    role = f"node_b_{database}"  # roles are the cluster's, not the database's
    postgres.execute(database, f"CREATE ROLE {role} LOGIN SUPERUSER")
    (a_node,) = fleet(1)
    b_node = start_server(data_dir=tmp_path / "b",
                          shared_store=shared_store.replace("postgres@", f"{role}@"))
    a, b = a_node.client(), b_node.client()
    entry_id = a.store(QUESTION, "answer", namespace="support")
    assert b.lookup(QUESTION, namespace="support").hit
    assert holds_locally(b_node, entry_id)
    try:
        postgres.execute(database, f"ALTER ROLE {role} NOLOGIN")
        postgres.execute("postgres", "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                                     f"WHERE usename = '{role}'")
        wait_for(lambda: not b_node.engine.shared.feed.connected, "b to notice")
        assert a.invalidate_namespace("support") == 1
        with pytest.raises(UnavailableError, match="shared store"):
            b.store(OTHER, "an answer B cannot commit", namespace="support")
        assert b.lookup(OTHER, namespace="support").hit is False  # no error, a miss
        if log_pruned:
            postgres.execute(database, "WITH gone AS (DELETE FROM stratacache.changes "
                                       "RETURNING seq) UPDATE stratacache.meta SET value = "
                                       "(SELECT to_jsonb(max(seq)) FROM gone) "
                                       "WHERE key = 'pruned_through'")
    finally:
        postgres.execute(database, f"ALTER ROLE {role} LOGIN")
    wait_for(lambda: b_node.engine.shared.feed.connected, "b to reconnect")
    assert not b.lookup(QUESTION, namespace="support").hit  # caught up before serving
    assert not holds_locally(b_node, entry_id)


def test_a_restarted_node_does_not_serve_what_changed_while_it_was_stopped(
        fleet, start_server, shared_store: str, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    (a_node,) = fleet(1)
    b_node = start_server(data_dir=tmp_path / "b", shared_store=shared_store)
    a, b = a_node.client(), b_node.client()
    entry_id = a.store(QUESTION, "answer")
    assert b.lookup(QUESTION).hit
    assert holds_locally(b_node, entry_id)
    b_node.stop()  # its warm tier keeps the copy on disk
    a.invalidate_namespace("default")
    b_again = start_server(data_dir=tmp_path / "b", shared_store=shared_store).client()
    assert not b_again.lookup(QUESTION).hit


def test_lookups_survive_the_database_going_away_and_stores_resume(
        fleet, postgres) -> None:  # type: ignore[no-untyped-def]
    (node,) = fleet(1)
    client = node.client()
    assert holds_locally(node, client.store(QUESTION, "answer"))
    assert client.health("stratacache.writes") == "SERVING"
    postgres.stop()
    try:
        wait_for(lambda: client.health("stratacache.writes") == "NOT_SERVING",
                 "health to report that writes cannot succeed")
        assert client.health() == "SERVING"  # lookups still answer
        assert client.lookup(PARAPHRASE).hit  # local tiers still answer
        assert not client.lookup(OTHER).hit  # a miss, never an error
        with pytest.raises(UnavailableError, match=r"shared store 127\.0\.0\.1:\d+/t_\w+ as "
                                                   r"postgres is unreachable"):
            client.store(OTHER, "answer")
        with pytest.raises(UnavailableError, match="nothing was changed"):
            client.set_policy("default", min_similarity=0.95)
    finally:
        postgres.start()
    wait_for(lambda: client.health("stratacache.writes") == "SERVING", "the node to reconnect")
    assert client.store(OTHER, "answer")
    assert client.lookup(OTHER).hit


def test_the_password_is_never_logged_and_another_model_is_refused(
        start_server, shared_store: str, tmp_path: Path, postgres,
        caplog: pytest.LogCaptureFixture) -> None:  # type: ignore[no-untyped-def]
    secret = shared_store.replace("postgres@", "postgres:hunter2-secret@")
    node = start_server(data_dir=tmp_path / "a", shared_store=secret)
    assert "hunter2" not in repr(node.settings) and "hunter2" not in caplog.text
    assert "as postgres" in node.engine.shared.name and "hunter2" not in node.engine.shared.name
    node.stop()
    database = shared_store.rsplit("/", 1)[1]
    postgres.execute(database, "UPDATE stratacache.meta SET value = jsonb_set(value, "
                               "'{fingerprint}', '\"another\"') WHERE key = 'model'")
    with pytest.raises(CacheError, match="Every node must use the same model"):
        start_server(data_dir=tmp_path / "b", shared_store=shared_store)


def test_a_killed_node_loses_nothing_it_acknowledged_and_the_example_runs(
        start_server, shared_store: str, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    with ServerProcess(tmp_path / "a", tmp_path / "a.log", "--shared-store", shared_store) as a:
        client = Client(a.target)
        stored = {f"Question number {i} about the fleet?": client.store(
            f"Question number {i} about the fleet?", f"answer {i}") for i in range(20)}
        a.kill()
    b = start_server(data_dir=tmp_path / "b", shared_store=shared_store).client()
    assert {p: b.lookup(p).entry_id for p in stored} == stored
    log = (tmp_path / "a.log").read_text()
    assert "shared store 127.0.0.1:" in log

    c = start_server(data_dir=tmp_path / "c", shared_store=shared_store)
    example = Path(__file__).resolve().parents[1] / "examples" / "two_nodes.py"
    run = subprocess.run([sys.executable, str(example), b.target, c.target],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "node B: hit=True tier=shared" in run.stdout
    assert "node A no longer serves it" in run.stdout


def test_db_check_says_whether_a_database_is_ready(
        start_server, shared_store: str, postgres, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    lines: list[str] = []
    assert asyncio.run(shared.check(shared_store, lines.append)) == 0
    assert "ready" in lines and any(l.startswith("schema        none yet") for l in lines)
    start_server(data_dir=tmp_path / "a", shared_store=shared_store).client().store(
        QUESTION, "answer")
    lines.clear()
    assert asyncio.run(shared.check(shared_store, lines.append)) == 0
    assert "entries       1" in lines and any("all-MiniLM-L6-v2" in l for l in lines)
    database = shared_store.rsplit("/", 1)[1]
    postgres.execute(database, "UPDATE stratacache.meta SET value = '99' "
                               "WHERE key = 'schema_version'")
    lines.clear()
    assert asyncio.run(shared.check(shared_store, lines.append)) == 1
    assert any("upgrade stratacache" in l for l in lines)
    unreachable = shared_store.replace(f":{postgres.port}/", f":{free_port()}/")
    assert asyncio.run(shared.check(unreachable, lines.append)) == 2
    assert cli.main(["db", "check", "--shared-store", shared_store]) == 1


def test_a_version_1_store_is_migrated_in_place(
        start_server, shared_store: str, postgres, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A database a version 1 server made (float32 HNSW index, no policies or evidence tables)
    is upgraded by the next server to start, keeping its entries."""
    database = shared_store.rsplit("/", 1)[1]
    first = start_server(data_dir=tmp_path / "a", shared_store=shared_store)
    entry_id = first.client().store(QUESTION, "answer")
    first.stop()
    postgres.execute(database, "DROP TABLE stratacache.policies, stratacache.evidence")
    postgres.execute(database, "DROP INDEX stratacache.entries_embedding_half")
    postgres.execute(database, "CREATE INDEX entries_embedding ON stratacache.entries "
                               "USING hnsw (embedding vector_ip_ops)")
    postgres.execute(database, "UPDATE stratacache.meta SET value = '1' "
                               "WHERE key = 'schema_version'")
    node = start_server(data_dir=tmp_path / "b", shared_store=shared_store).client()
    assert node.lookup(PARAPHRASE).entry_id == entry_id
    node.set_policy("default", min_similarity=0.9)  # the new tables are there
    assert postgres.execute(database, "SELECT value FROM stratacache.meta "
                                      "WHERE key = 'schema_version'") == [(shared.SCHEMA_VERSION,)]
    indexes = {name for name, in postgres.execute(
        database, "SELECT indexname FROM pg_indexes WHERE schemaname = 'stratacache'")}
    assert "entries_embedding_half" in indexes and "entries_embedding" not in indexes


def test_an_entry_read_before_an_invalidation_is_not_cached_after_it(fleet) -> None:  # type: ignore[no-untyped-def]
    """The cache-fill race: B reads X from the database, A removes X, B's feed applies the
    removal (B holds no copy yet), then B would cache X for good. B must not."""
    a_node, b_node = fleet(2)
    a, b_shared = a_node.client(), b_node.engine.shared
    entry_id = a.store(QUESTION, "answer", namespace="support")
    seen = b_shared.applied
    entry = b_node.run(b_shared.get(entry_id))
    assert entry is not None
    a.invalidate_namespace("support")
    wait_for(lambda: b_shared.applied > seen, "b to apply the invalidation")
    b_node.run(b_node.engine.pipeline._cache_locally(entry, seen))
    assert not holds_locally(b_node, entry_id)
    assert not b_node.client().lookup(QUESTION, namespace="support").hit
