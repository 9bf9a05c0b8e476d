"""``stratacache admin`` against a real server with an API key: tables, --json, every action,
the savings report and its chart, and errors as one stderr line with exit code 1 (2 for a bad
flag)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from stratacache.admin import ACTIONS, PNG_SIGNATURE
from stratacache.cli import build_parser

from .conftest import RunningServer

KEY = "admin-test-key"
KEY_ENV = "ADMIN_TEST_KEY"
#: One made-up model at round prices, so a hit's dollars are easy to check.
PRICES = '"test-model" = { input_per_million = 1000.0, output_per_million = 2000.0 }\n'


@pytest.fixture
def keyed(start_server: Callable[..., RunningServer], tmp_path: Path,
          monkeypatch: pytest.MonkeyPatch) -> RunningServer:
    """A server that wants KEY, with the key in KEY_ENV and the target in STRATACACHE_TARGET."""
    prices = tmp_path / "prices.toml"
    prices.write_text(PRICES)
    server = start_server(api_key=KEY, prices=prices)
    monkeypatch.setenv(KEY_ENV, KEY)
    monkeypatch.setenv("STRATACACHE_TARGET", server.target)
    return server


def run_admin(*argv: str) -> int:
    """``stratacache admin ARGV`` in this process, as ``main`` runs it less its logging setup
    (which would send the in-process server's log lines to the captured stderr)."""
    args = build_parser().parse_args(["admin", *argv])
    return int(args.run(args))


def admin(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """Runs ``stratacache admin ARGV --api-key-env KEY_ENV``; returns (exit code, stdout,
    stderr)."""
    code = run_admin(*argv, "--api-key-env", KEY_ENV)
    out, err = capsys.readouterr()
    return code, out, err


def test_every_action_has_help_with_the_shared_flags(
        capsys: pytest.CaptureFixture[str]) -> None:
    for action in ACTIONS:
        with pytest.raises(SystemExit) as exit_info:
            run_admin(action.name, "--help")
        out = capsys.readouterr().out
        assert exit_info.value.code == 0
        for flag in ("--target", "--api-key-env", "--tls", "--tls-ca", "--tls-cert", "--tls-key",
                     "--timeout", "--json"):
            assert flag in out, (action.name, flag)


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("STRATACACHE_API_KEY", raising=False)
    for argv in ([], ["set-policy"], ["stats", "--timeout", "0"],
                 ["set-policy", "ns", "--verify", "maybe"]):
        with pytest.raises(SystemExit) as exit_info:
            run_admin(*argv)
        assert exit_info.value.code == 2, argv
    capsys.readouterr()
    # A TLS file that is not there: named, exit 2, nothing sent.
    assert run_admin("stats", "--tls-ca", str(tmp_path / "ca.pem")) == 2
    assert f"root_certificates {tmp_path / 'ca.pem'}" in capsys.readouterr().err
    assert run_admin("stats", "--api-key-env", "NO_SUCH_VARIABLE_SET") == 2
    assert "NO_SUCH_VARIABLE_SET: that environment variable is not set" in capsys.readouterr().err


def test_stats_table_and_json(keyed: RunningServer, capsys: pytest.CaptureFixture[str],
                              namespace: str) -> None:
    with keyed.client(api_key=KEY) as client:
        client.store("What is the boiling point of water?", "100 C", namespace=namespace)
        client.lookup("What is the boiling point of water?", namespace=namespace)
    code, out, _ = admin(capsys, "stats")
    assert code == 0
    assert re.search(r"^lookups\s+1$", out, re.M) and re.search(r"^stores\s+1$", out, re.M)
    assert re.search(r"^tier\s+entries\s+bytes", out, re.M)
    assert re.search(r"^exact\s+1\s", out, re.M)  # the stored entry's exact key
    assert re.search(r"^lookup\s+1\s", out, re.M)  # the lookup stage ran once
    code, out, _ = admin(capsys, "stats", "--json")
    stats = json.loads(out)
    assert code == 0 and stats["lookups"] == 1 and stats["hits"] == 1 and stats["stores"] == 1


def test_invalidate_namespace_and_template_remove_entries(keyed: RunningServer,
                                                          capsys: pytest.CaptureFixture[str],
                                                          namespace: str) -> None:
    with keyed.client(api_key=KEY) as client:
        client.store("Who wrote Hamlet?", "Shakespeare", namespace=namespace, template_id="faq",
                     template_version="1")
        client.store("Who painted the Mona Lisa?", "Leonardo", namespace=namespace)
        client.store("Who discovered penicillin?", "Fleming", namespace=namespace)
        assert admin(capsys, "invalidate-template", "faq", "--namespace", namespace,
                     "--version", "1") == (0, "removed 1 entry\n", "")
        assert not client.lookup("Who wrote Hamlet?", namespace=namespace, template_id="faq",
                                 template_version="1").hit
        code, out, _ = admin(capsys, "invalidate-namespace", namespace, "--json")
        assert code == 0 and json.loads(out) == {"removed": 2}
        assert not client.lookup("Who painted the Mona Lisa?", namespace=namespace).hit


def test_delete_user_and_delete_entry(keyed: RunningServer,
                                      capsys: pytest.CaptureFixture[str],
                                      namespace: str) -> None:
    with keyed.client(api_key=KEY) as client:
        client.store("My order number?", "A-17", namespace=namespace, user_id="u-1")
        other = client.store("What time is it in Tokyo?", "JST", namespace=namespace)
        code, out, _ = admin(capsys, "delete-user", "u-1", "--json")
        assert code == 0 and json.loads(out) == {"removed": 1}
        assert not client.lookup("My order number?", namespace=namespace).hit
        assert admin(capsys, "delete-entry", other) == (0, "removed the entry\n", "")
        assert admin(capsys, "delete-entry", other) == (
            0, "no such entry (nothing removed)\n", "")
        assert not client.lookup("What time is it in Tokyo?", namespace=namespace).hit


def test_set_policy_changes_only_the_fields_given(keyed: RunningServer,
                                                  capsys: pytest.CaptureFixture[str],
                                                  namespace: str) -> None:
    code, out, _ = admin(capsys, "set-policy", namespace, "--min-similarity", "0.95")
    assert code == 0 and re.search(r"^min_similarity\s+0\.95$", out, re.M)
    assert admin(capsys, "set-policy", namespace, "--max-wrong-rate", "0.05")[0] == 0
    code, out, _ = admin(capsys, "policy", namespace, "--json")
    policy = json.loads(out)
    assert code == 0 and policy["namespace"] == namespace
    assert policy["max_wrong_rate"] == pytest.approx(0.05)
    assert policy["min_similarity"] == pytest.approx(0.95)  # kept from the first call
    assert admin(capsys, "set-policy", namespace, "--min-similarity", "default")[0] == 0
    code, out, _ = admin(capsys, "policy", namespace, "--json")
    assert json.loads(out)["min_similarity"] is None
    assert json.loads(out)["max_wrong_rate"] == pytest.approx(0.05)


def test_health(keyed: RunningServer, capsys: pytest.CaptureFixture[str]) -> None:
    assert admin(capsys, "health") == (0, "SERVING\n", "")
    code, out, _ = admin(capsys, "health", "--service", "stratacache.v1.CacheAdmin", "--json")
    assert code == 0 and json.loads(out) == {"service": "stratacache.v1.CacheAdmin",
                                             "status": "SERVING"}
    code, out, err = admin(capsys, "health", "--service", "no.such.Service")
    assert code == 1 and err.startswith("NOT_FOUND") and out == ""


def test_report_shows_what_hits_saved_and_plots_it(keyed: RunningServer,
                                                   capsys: pytest.CaptureFixture[str],
                                                   namespace: str, tmp_path: Path) -> None:
    with keyed.client(api_key=KEY) as client:
        client.store("How far is the Moon?", "384,400 km", namespace=namespace,
                     cost_model="test-model", prompt_tokens=1000, completion_tokens=500,
                     model_latency_s=2.5)
        assert client.lookup("How far is the Moon?", namespace=namespace).hit
        assert not client.lookup("How do volcanoes form?", namespace=namespace).hit
    chart = tmp_path / "saved.png"
    code, out, err = admin(capsys, "report", "--plot", str(chart))
    assert code == 0 and err == ""
    # 1000 prompt tokens at $1000/M and 500 completion tokens at $2000/M: $2 per hit.
    assert re.search(rf"^{re.escape(namespace)}\s+2\s+1\s+50\.0%\s+1,500\s+\$2\.0000\s+2\.5$",
                     out, re.M), out
    assert re.search(r"^total\s+2\s+1\s+50\.0%\s+1,500\s+\$2\.0000\s+2\.5$", out, re.M), out
    assert chart.read_bytes().startswith(PNG_SIGNATURE)
    code, out, _ = admin(capsys, "report", "--json")
    report = json.loads(out)
    row = next(r for r in report["namespaces"] if r["namespace"] == namespace)
    assert row["hit_rate"] == 0.5 and row["saved_tokens"] == 1500
    assert row["saved_dollars"] == pytest.approx(2.0)
    assert row["saved_model_seconds"] == pytest.approx(2.5)
    assert report["total"]["hits"] == 1


def test_a_wrong_key_is_one_line_and_exit_1(keyed: RunningServer) -> None:
    """As an operator's shell sees it: a separate process, its exit code, its stderr."""
    done = subprocess.run(
        [sys.executable, "-m", "stratacache.cli", "admin", "stats", "--api-key-env", KEY_ENV],
        capture_output=True, text=True, timeout=120,
        env={**os.environ, KEY_ENV: "not-the-key", "STRATACACHE_TARGET": keyed.target})
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.startswith("UNAUTHENTICATED: ") and done.stderr.count("\n") == 1, \
        done.stderr


def test_a_server_that_is_not_there_is_unavailable(capsys: pytest.CaptureFixture[str],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("STRATACACHE_API_KEY", raising=False)
    code = run_admin("stats", "--target", "127.0.0.1:1")  # nothing listens on port 1
    out, err = capsys.readouterr()
    assert code == 1 and out == "" and err.startswith("UNAVAILABLE")
    assert "is a server listening on 127.0.0.1:1" in err and err.count("\n") == 1
