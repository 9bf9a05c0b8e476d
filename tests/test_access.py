"""API keys: the single --api-key and the scoped keys of --keys-file (roles, namespaces), checked
on a real server with real keys files; the file's validation and reload; ``hash-key``."""

from __future__ import annotations

import argparse
import io
import logging
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from stratacache import PermissionDeniedError, UnauthenticatedError
from stratacache import access, metrics
from stratacache.access import KeysFileError, KeyStore, hash_key, load_keys
from stratacache.config import Settings
from stratacache.service import SERVICES
from stratacache.v1 import stratacache_pb2 as pb

ALL_ROLES = ["lookup", "store", "feedback", "admin"]
#: name -> (key, namespaces, roles)
KEYS = {
    "root": ("root-key-" + "r" * 32, ["*"], ALL_ROLES),
    "tenant-a": ("tenant-a-key-" + "a" * 32, ["a-*", "shared"], ["lookup", "store"]),
    "tenant-a-admin": ("tenant-a-admin-" + "x" * 32, ["a-*"], ["admin"]),
    "tenant-b": ("tenant-b-key-" + "b" * 32, ["b-*"], ALL_ROLES),
}
API_KEY = "the-api-key-" + "k" * 32


def keys_toml(names: list[str]) -> str:
    return "".join(
        f'[[keys]]\nname = "{name}"\nsha256 = "{hash_key(KEYS[name][0])}"\n'
        f"namespaces = {KEYS[name][1]!r}\nroles = {KEYS[name][2]!r}\n\n".replace("'", '"')
        for name in names)


def write_keys(path: Path, names: list[str]) -> Path:
    path.write_text(keys_toml(names))
    return path


@pytest.fixture
def keyed(start_server, tmp_path: Path):  # type: ignore[no-untyped-def]
    """A server with every key of KEYS in its keys file, and the single --api-key."""
    return start_server(keys_file=write_keys(tmp_path / "keys.toml", list(KEYS)), api_key=API_KEY)


def as_(server, name: str):  # type: ignore[no-untyped-def]
    return server.client(api_key=KEYS[name][0])


def test_missing_or_wrong_key_is_unauthenticated_and_health_stays_open(keyed) -> None:  # type: ignore[no-untyped-def]
    with keyed.client() as anonymous:
        with pytest.raises(UnauthenticatedError, match="missing API key.*authorization: Bearer"):
            anonymous.lookup("hello", namespace="a-1")
        with pytest.raises(UnauthenticatedError):
            anonymous.stats()
    with keyed.client(api_key="tenant-a-key-" + "a" * 31) as wrong:
        with pytest.raises(UnauthenticatedError, match="wrong API key"):
            wrong.lookup("hello", namespace="a-1")
    with grpc.insecure_channel(keyed.target) as channel:
        # Authentication comes first: bytes that do not even decode still get UNAUTHENTICATED.
        store = channel.unary_unary("/stratacache.v1.SemanticCache/Store")
        with pytest.raises(grpc.RpcError) as info:
            store(b"\xff" * 11, timeout=30)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as info:
            store(b"", timeout=30, metadata=(("authorization", "Basic xyz"),))
        assert "malformed authorization" in info.value.details()
        with pytest.raises(grpc.RpcError) as info:  # "Bearer " and nothing: never a key
            store(b"", timeout=30, metadata=(("authorization", "Bearer "),))
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "the bearer token is empty" in info.value.details()
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="stratacache.v1.SemanticCache"))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_scoped_key_outside_its_namespaces_or_roles_is_denied(keyed) -> None:  # type: ignore[no-untyped-def]
    with as_(keyed, "tenant-a") as a:
        entry = a.store("What is the capital of Italy?", "Rome", namespace="a-1")
        assert a.lookup("What is the capital of Italy?", namespace="a-1").entry_id == entry
        a.store("shared question", "shared answer", namespace="shared")  # an exact name
        with pytest.raises(PermissionDeniedError) as info:
            a.lookup("What is the capital of Italy?", namespace="b-1")
        message = str(info.value)
        assert message == ("PERMISSION_DENIED: key 'tenant-a' may not use namespace 'b-1' "
                           "(Lookup): it covers only a-*, shared")
        # Nothing of the tenant that owns b-* shows: not its key's name nor its patterns.
        assert "tenant-b" not in message and "b-*" not in message
        for namespace in ("shared2", "ab-1", "xa-1", "default", ""):
            with pytest.raises(PermissionDeniedError, match="may not use namespace"):
                a.store("q", "r", namespace=namespace)
        with pytest.raises(PermissionDeniedError, match=(
                "key 'tenant-a' may not call Feedback: that needs the 'feedback' role, and the "
                "key has lookup, store")):
            a.feedback(entry, "What is the capital of Italy?", True, namespace="a-1")
        with pytest.raises(PermissionDeniedError, match="may not call Stats: .*'admin' role"):
            a.stats()
        # A malformed namespace is the caller's mistake first, whatever the key may use.
        with pytest.raises(Exception, match="is malformed"):
            a.lookup("q", namespace="bad namespace!")


@pytest.mark.parametrize("service, method", [(s, m) for s in SERVICES for m in s.methods
                                             if s.name == "CacheAdmin"],
                         ids=lambda x: getattr(x, "name", ""))
def test_every_admin_method_needs_the_admin_role(keyed, service, method) -> None:  # type: ignore[no-untyped-def]
    with grpc.insecure_channel(keyed.target) as channel:
        call = channel.unary_unary(f"/{service.full_name}/{method.name}")
        with pytest.raises(grpc.RpcError) as info:
            call(b"", timeout=30, metadata=(("authorization", f"Bearer {KEYS['tenant-a'][0]}"),))
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert f"may not call {method.name}: that needs the 'admin' role" in info.value.details()


def test_stats_of_a_scoped_key_show_only_its_namespaces(keyed) -> None:  # type: ignore[no-untyped-def]
    with as_(keyed, "root") as root:
        for namespace in ("a-1", "b-1"):
            root.set_policy(namespace, min_similarity=0.9)
            root.store(f"a prompt in {namespace}", "an answer", namespace=namespace)
        everything = root.stats()
    assert {"a-1", "b-1"} <= set(everything["namespaces"])
    assert everything["stores"] == 2 and everything["warm"]["entries"] == 2
    with as_(keyed, "tenant-a-admin") as a:
        scoped = a.stats()
        assert set(scoped["namespaces"]) == {"a-1"}
        assert scoped["namespaces"]["a-1"] == everything["namespaces"]["a-1"]
        # The server-wide totals add up every tenant's traffic: cleared.
        assert scoped["stores"] == scoped["lookups"] == scoped["hits"] == 0
        assert scoped["warm"]["entries"] == 0 and scoped["stages"] == {}
        # What describes the server stays.
        assert scoped["model"] == everything["model"] and scoped["dimension"] > 0
        # Admin calls on its namespaces work; on another tenant's they are denied.
        assert a.get_policy("a-1")["namespace"] == "a-1"
        with pytest.raises(PermissionDeniedError, match="namespace 'b-1'"):
            a.get_policy("b-1")
        with pytest.raises(PermissionDeniedError, match="namespace 'b-1'"):
            a.invalidate_namespace("b-1")


def test_a_scoped_key_never_sees_the_pool_of_namespaces_past_the_stats_cap(
        start_server, tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    # "??????" matches the pool's name "_other", which mixes every tenant past the cap.
    monkeypatch.setattr(metrics, "STATS_MAX_NAMESPACES", 0)
    KEYS["pattern-admin"] = ("pattern-admin-" + "p" * 32, ["??????"], ["admin"])
    try:
        server = start_server(keys_file=write_keys(tmp_path / "keys.toml", list(KEYS)),
                              metrics_max_namespaces=0)
    finally:
        del KEYS["pattern-admin"]
    with as_(server, "root") as root:
        root.store("a prompt of tenant b", "an answer", namespace="b-1")
        assert "_other" in root.stats()["namespaces"]
    with server.client(api_key="pattern-admin-" + "p" * 32) as scoped:
        assert scoped.stats()["namespaces"] == {}


def test_delete_entry_of_a_scoped_key_never_reveals_another_tenants_entry(keyed) -> None:  # type: ignore[no-untyped-def]
    with as_(keyed, "root") as root:
        theirs = root.store("their prompt", "their answer", namespace="b-1")
        mine = root.store("my prompt", "my answer", namespace="a-1")
    missing = "0" * 32
    with grpc.insecure_channel(keyed.target) as channel:
        delete = channel.unary_unary("/stratacache.v1.CacheAdmin/DeleteEntry",
                                     request_serializer=pb.DeleteEntryRequest.SerializeToString,
                                     response_deserializer=pb.InvalidateResponse.FromString)
        metadata = (("authorization", f"Bearer {KEYS['tenant-a-admin'][0]}"),)
        answers = []
        for entry_id in (theirs, missing):
            with pytest.raises(grpc.RpcError) as info:
                delete(pb.DeleteEntryRequest(entry_id=entry_id), timeout=30, metadata=metadata)
            answers.append((info.value.code(), info.value.details().replace(entry_id, "ID")))
        # Another tenant's entry is answered exactly as one that does not exist.
        assert answers[0] == answers[1] and answers[0][0] == grpc.StatusCode.NOT_FOUND
    with as_(keyed, "tenant-a-admin") as a:
        assert a.delete_entry(mine) is True
    with as_(keyed, "root") as root:
        assert root.lookup("their prompt", namespace="b-1").entry_id == theirs
        assert not root.lookup("my prompt", namespace="a-1").hit
        assert root.delete_entry(theirs) is True


def test_delete_user_of_a_scoped_key_must_name_one_of_its_namespaces(keyed) -> None:  # type: ignore[no-untyped-def]
    with as_(keyed, "root") as root:
        for namespace in ("a-1", "b-1"):
            root.store(f"u1 asked in {namespace}", "an answer", namespace=namespace, user_id="u1")
    with as_(keyed, "tenant-a-admin") as a:
        with pytest.raises(PermissionDeniedError, match=(
                "key 'tenant-a-admin' may not call DeleteUser on every namespace: it covers only "
                "a-\\*; name one of them")):
            a.delete_user("u1")
        with pytest.raises(PermissionDeniedError, match="namespace 'b-1'"):
            a.delete_user("u1", namespace="b-1")
        assert a.delete_user("u1", namespace="a-1") == 1
    with as_(keyed, "root") as root:
        assert root.lookup("u1 asked in b-1", namespace="b-1").hit
        assert not root.lookup("u1 asked in a-1", namespace="a-1").hit


def test_the_api_key_keeps_every_right_beside_a_keys_file(keyed) -> None:  # type: ignore[no-untyped-def]
    with keyed.client(api_key=API_KEY) as c:
        c.store("q in b", "r", namespace="b-9", user_id="u2")
        c.set_policy("a-9", min_similarity=0.9)
        assert c.stats()["stores"] == 1
        assert c.delete_user("u2") == 1  # every namespace at once


def test_api_key_alone_is_an_admin_of_every_namespace(start_server) -> None:  # type: ignore[no-untyped-def]
    server = start_server(api_key=API_KEY)
    with server.client(api_key=API_KEY) as c:
        c.store("q", "r", namespace="any-thing", user_id="u")
        assert c.stats()["stores"] == 1 and c.delete_user("u") == 1
    with server.client(api_key=KEYS["root"][0]) as wrong:
        with pytest.raises(UnauthenticatedError):
            wrong.stats()


def test_reload_picks_up_new_keys_and_keeps_the_old_ones_if_the_file_is_bad(
        start_server, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = write_keys(tmp_path / "keys.toml", ["tenant-a"])
    server = start_server(keys_file=path)
    keys = server.server.keys
    with as_(server, "tenant-b") as b:
        with pytest.raises(UnauthenticatedError):
            b.lookup("q", namespace="b-1")
        write_keys(path, ["tenant-a", "tenant-b"])
        assert keys.reload() is True and len(keys) == 2
        assert not b.lookup("q", namespace="b-1").hit
        # A bad file (an unknown role) leaves the keys in use untouched, with one error line.
        path.write_text(keys_toml(["tenant-a"]).replace('"lookup"', '"reader"'))
        with caplog.at_level(logging.ERROR, logger="stratacache.access"):
            assert keys.reload() is False
        errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert len(errors) == 1
        assert "keys not reloaded, the 2 in use stay" in errors[0].getMessage()
        assert "key 1 ('tenant-a'): unknown role 'reader'" in errors[0].getMessage()
        assert not b.lookup("q", namespace="b-1").hit
        # Revoking a key: it is gone at the next reload.
        write_keys(path, ["tenant-a"])
        assert keys.reload() is True
        with pytest.raises(UnauthenticatedError):
            b.lookup("q", namespace="b-1")
    with as_(server, "tenant-a") as a:
        assert not a.lookup("q", namespace="a-1").hit


def test_a_bad_keys_file_stops_the_server_from_starting(tmp_path: Path) -> None:
    """CacheServer builds its KeyStore from the settings first, so serve stops with this
    message (cli.main prints a CacheError and exits 2)."""
    path = tmp_path / "keys.toml"
    path.write_text(keys_toml(["tenant-a"]).replace('"store"', '"writer"'))
    with pytest.raises(KeysFileError, match="unknown role 'writer'"):
        KeyStore.from_settings(Settings(keys_file=path, data_dir=tmp_path))


GOOD = {"name": '"k"', "sha256": f'"{hash_key("x" * 40)}"', "namespaces": '["a"]',
        "roles": '["lookup"]'}


def _entry(**fields: str | None) -> str:
    values = {**GOOD, **fields}
    return "[[keys]]\n" + "".join(f"{k} = {v}\n" for k, v in values.items() if v is not None)


@pytest.mark.parametrize("text, message", [
    (_entry(roles='["lookup", "writer"]'),
     "key 1 ('k'): unknown role 'writer'; the roles are lookup, store, feedback, admin"),
    (_entry(roles="[]"), "key 1 ('k'): roles must be a non-empty list"),
    (_entry(namespaces="[]"), "key 1 ('k'): namespaces must be a non-empty list"),
    (_entry(namespaces=None), "key 1 ('k'): namespaces must be a non-empty list"),
    (_entry(namespaces='["bad name"]'), "namespace pattern 'bad name' is malformed"),
    (_entry(namespaces='["-x"]'), "namespace pattern '-x' is malformed"),
    (_entry(sha256='"abc123"'), "key 1 ('k'): sha256 must be the 64 hex characters"),
    (_entry(sha256='"e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"'),
     "key 1 ('k'): sha256 is the hash of an empty key"),
    (_entry(sha256=None, key='"plain"'), "unknown field key (store the key's hash in sha256"),
    (_entry(name='"has space"'), "key 1 ('has space'): name must be 1 to 64"),
    (_entry() + "\n" + _entry(sha256=f'"{hash_key("y" * 40)}"'),
     "key 2 ('k'): another key has this name"),
    (_entry() + "\n" + _entry(name='"k2"'), "key 2 ('k2'): same sha256 as key 'k'"),
    (_entry(sha256=f'"{hash_key(API_KEY)}"'), "key 1 ('k'): it is the --api-key"),
    ("", "no [[keys]] tables"),
    ("[keys]\nname = 'k'\n", "no [[keys]] tables"),
    (_entry() + "[other]\nx = 1\n", "unknown top-level entry 'other'"),
    (_entry() + "roles = [\n", "is not valid TOML"),
])
def test_keys_file_validation_says_what_is_wrong(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "keys.toml"
    path.write_text(text)
    with pytest.raises(KeysFileError) as info:
        load_keys(path, api_key=API_KEY)
    assert message in str(info.value) and str(path) in str(info.value)


def test_keys_file_errors_list_every_problem_and_syntax_errors_their_line(tmp_path: Path) -> None:
    path = tmp_path / "keys.toml"
    path.write_text(_entry(roles='["writer"]') + "\n" + _entry(name='"k2"', namespaces="[]"))
    with pytest.raises(KeysFileError) as info:
        load_keys(path)
    assert "key 1 ('k'): unknown role" in str(info.value)
    assert "key 2 ('k2'): namespaces must be" in str(info.value)
    path.write_text(_entry() + 'roles = "lookup\n')
    with pytest.raises(KeysFileError, match="line 6"):
        load_keys(path)
    with pytest.raises(KeysFileError, match="cannot read keys file"):
        load_keys(tmp_path / "missing.toml")


def test_patterns_match_whole_names() -> None:
    caller = access.Caller("k", frozenset({"lookup"}), ("prod-*", "shared", "t?", "v[12]"))
    assert [n for n in ("prod-1", "prod-", "shared", "t1", "v2", "v3", "xprod-1", "shared2",
                        "t12", "Prod-1") if caller.may_use(n)] == [
        "prod-1", "prod-", "shared", "t1", "v2"]
    assert not caller.every_namespace
    assert access.Caller("k", frozenset(), ("*",)).may_use("anything")


def _hash_key_tool(argv: list[str], stdin: str, monkeypatch, capsys) -> tuple[str, str]:  # type: ignore[no-untyped-def]
    parser = argparse.ArgumentParser()
    access.add_arguments(parser)
    monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    assert access.run(parser.parse_args(argv)) == 0
    out = capsys.readouterr()
    return out.out, out.err


def test_hash_key_makes_a_key_and_an_entry_the_server_accepts(
        tmp_path: Path, monkeypatch, capsys) -> None:  # type: ignore[no-untyped-def]
    toml, err = _hash_key_tool(["--name", "gw", "--namespace", "prod-*", "--namespace", "shared",
                                "--role", "lookup", "--role", "admin"], "", monkeypatch, capsys)
    key = err.strip().splitlines()[-1]
    assert len(key) >= access.MIN_KEY_CHARS and key not in toml
    path = tmp_path / "keys.toml"
    path.write_text(toml)
    caller = KeyStore(path).authenticate(f"Bearer {key}")
    assert (caller.name, caller.roles, caller.namespaces) == (
        "gw", frozenset({"lookup", "admin"}), ("prod-*", "shared"))
    # An existing key from stdin: nothing on stderr, the entry hashes that key.
    toml, err = _hash_key_tool(["--name", "gw2", "--namespace", "*", "--stdin"],
                               "z" * 40 + "\n", monkeypatch, capsys)
    assert err == "" and hash_key("z" * 40) in toml
    with pytest.raises(KeysFileError, match="has 9 characters; use at least 32"):
        _hash_key_tool(["--name", "gw", "--namespace", "*", "--stdin"], "short-key\n",
                       monkeypatch, capsys)
    with pytest.raises(KeysFileError, match="namespace pattern 'a b' is malformed"):
        _hash_key_tool(["--name", "gw", "--namespace", "a b"], "", monkeypatch, capsys)


def test_an_empty_namespace_on_a_destructive_call_is_invalid_not_denied(keyed) -> None:  # type: ignore[no-untyped-def]
    # Checked as the engine checks it: "" never means "default" for these calls, so a key
    # without "default" gets told what to send, not a denial about a namespace it never named.
    from stratacache import InvalidArgumentError

    with as_(keyed, "tenant-a-admin") as a:
        with pytest.raises(InvalidArgumentError, match="needs the namespace explicitly"):
            a.invalidate_namespace("")
        with pytest.raises(InvalidArgumentError, match="needs the namespace explicitly"):
            a.invalidate_template("t", namespace="")
        with pytest.raises(InvalidArgumentError, match="needs the namespace explicitly"):
            a.delete_user("u", namespace="")
