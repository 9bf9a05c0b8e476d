"""``stratacache serve`` as an operator runs it: --help, the ready line, SIGTERM."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from stratacache import Client
from stratacache.cli import SERVE_FLAGS, build_parser, main, settings_from_args


def test_help_documents_every_flag_and_its_env_twin() -> None:
    out = subprocess.run([sys.executable, "-m", "stratacache.cli", "serve", "--help"],
                         capture_output=True, text=True, check=True).stdout
    flat = re.sub(r"\s+", "", out)  # argparse wraps lines anywhere
    for flag in SERVE_FLAGS:
        assert flag.option in out and flag.env in flat, flag.option
    assert "50551" in out and "./stratacache-data" in out


def test_environment_twins_and_flags(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("STRATACACHE_PORT", "6000")
    monkeypatch.setenv("STRATACACHE_WARM_MAX_MIB", "64")
    monkeypatch.setenv("STRATACACHE_MIN_SIMILARITY", "0.9")
    settings = settings_from_args(build_parser().parse_args(["serve", "--port", "7000"]))
    assert settings.port == 7000  # the flag wins
    assert settings.warm_max_bytes == 64 << 20 and settings.min_similarity == 0.9


def test_an_empty_api_key_is_refused_not_taken_as_no_key(monkeypatch, capsys) -> None:  # type: ignore[no-untyped-def]
    """An empty key used to turn authentication off without a word."""
    message = "an empty key would disable authentication; unset it to run without a key"
    with pytest.raises(ValueError, match=message):
        settings_from_args(build_parser().parse_args(["serve", "--api-key", ""]))
    monkeypatch.setenv("STRATACACHE_API_KEY", "")
    with pytest.raises(ValueError, match=message):
        settings_from_args(build_parser().parse_args(["serve"]))
    with pytest.raises(SystemExit) as exit_info:
        main(["serve"])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
    monkeypatch.delenv("STRATACACHE_API_KEY")
    assert settings_from_args(build_parser().parse_args(["serve"])).api_key is None


def test_a_non_loopback_address_without_a_key_needs_allow_unauthenticated(
        tmp_path) -> None:  # type: ignore[no-untyped-def]
    def settings(*flags: str):  # type: ignore[no-untyped-def]
        return settings_from_args(build_parser().parse_args(["serve", *flags]))

    with pytest.raises(ValueError, match="refusing to listen on 0.0.0.0 without a key"):
        settings("--host", "0.0.0.0")
    assert settings("--host", "0.0.0.0", "--allow-unauthenticated").allow_unauthenticated
    assert settings("--host", "0.0.0.0", "--api-key", "k" * 40).api_key == "k" * 40
    assert settings("--host", "0.0.0.0", "--keys-file", str(tmp_path / "keys.toml")).keys_file
    for loopback in ("127.0.0.1", "::1", "localhost"):
        assert settings("--host", loopback).host == loopback


@pytest.mark.parametrize("flags, message", [
    (["--rate-limit-user-lookup", "20,0"], "the burst at least 1"),
    (["--rate-limit-global-store", "fast"], "expected RATE or RATE,BURST"),
    (["--rate-limit-namespace-lookup", "-1"], "a positive number of calls per second"),
])
def test_a_bad_rate_limit_is_a_usage_error(flags: list[str], message: str, capsys) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["serve", *flags])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("flags, message", [
    (["--max-wrong-rate", "1e-300"], r"max_wrong_rate is 1e-300; give a wrong-hit rate in \[0.0001"),
    (["--max-wrong-rate", "nan"], "max_wrong_rate must be a finite number"),
    (["--sweep-interval-s", "inf"], "sweep_interval_s must be a finite number"),
    (["--shutdown-grace-s", "nan"], "shutdown_grace_s must be a finite number"),
])
def test_numbers_at_the_edges_are_refused_at_start(flags: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        settings_from_args(build_parser().parse_args(["serve", *flags]))


def test_bad_flag_value_is_a_clear_error() -> None:
    done = subprocess.run([sys.executable, "-m", "stratacache.cli", "serve",
                           "--min-similarity", "2"], capture_output=True, text=True)
    assert done.returncode == 2 and "min_similarity must be in [0, 1]" in done.stderr


def test_serve_starts_answers_and_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
    data = tmp_path / "data"
    command = [sys.executable, "-m", "stratacache.cli", "serve", "--port", "0",
               "--data-dir", str(data), "--device", "cpu"]
    with subprocess.Popen(command, stderr=subprocess.PIPE, text=True,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"}) as process:
        try:
            assert process.stderr is not None
            port = _wait_until_ready(process.stderr)
            with Client(f"127.0.0.1:{port}") as c:
                entry_id = c.store("How do I learn Python quickly?", "practice daily")
                assert c.lookup("How do I learn Python quickly?").entry_id == entry_id
            process.send_signal(signal.SIGTERM)
            rest = process.stderr.read()
            assert process.wait(60) == 0
            assert "stopped cleanly" in rest
        finally:
            if process.poll() is None:
                process.kill()
    assert (data / "stratacache.json").exists() and (data / "warm" / "data.mdb").exists()


def _wait_until_ready(stderr, timeout: float = 120.0) -> int:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = stderr.readline()
        assert line, "server exited before it was ready"
        match = re.search(r"stratacache ready on 127\.0\.0\.1:(\d+)", line)
        if match:
            return int(match.group(1))
    raise AssertionError("no ready line")


def test_readme_documents_every_flag() -> None:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    for flag in SERVE_FLAGS:
        assert f"| `{flag.option}` | `{flag.env}` |" in readme, flag.option
