"""Real `stratacache serve` and `stratacache proxy` processes for tests that signal or kill
them: each one's log goes to a file (a pipe nobody reads would block it), and the port it bound
is read from its ready line."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Self


class _LoggedProcess:
    """A `stratacache` subcommand run until its log shows ``ready`` (a pattern whose group 1 is
    the bound port), up to ``timeout`` seconds (a safety net for a loaded machine). Leaving the
    block kills it if it still runs."""

    def __init__(self, command: list[str], log: Path, ready: re.Pattern[str],
                 timeout: float) -> None:
        self.log = log
        self._ready = ready
        self._log_file = open(log, "w")
        self.process = subprocess.Popen(command, stdout=self._log_file, stderr=self._log_file,
                                        env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.target = f"127.0.0.1:{self._wait_ready(timeout)}"

    def _wait_ready(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.log.read_text()
            match = self._ready.search(text)
            if match:
                return int(match.group(1))
            if self.process.poll() is not None:
                raise AssertionError(f"server exited before it was ready:\n{text[-4000:]}")
            time.sleep(0.05)
        raise AssertionError("server not ready in time")

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs, as in a crash or an OOM kill."""
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(60)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(60)
        self._log_file.close()


class ServerProcess(_LoggedProcess):
    """``with ServerProcess(data_dir, log_file, "--hot-capacity", "4") as server:`` starts a server
    on a free port and waits until it is ready; ``server.target`` is its address."""

    def __init__(self, data_dir: Path, log: Path, *flags: str, timeout: float = 300.0) -> None:
        command = [sys.executable, "-m", "stratacache.cli", "serve", "--port", "0",
                   "--data-dir", str(data_dir), "--device", "cpu", "--metrics-port", "0", *flags]
        super().__init__(command, log, re.compile(r"stratacache ready on 127\.0\.0\.1:(\d+)"),
                         timeout)


class ProxyProcess(_LoggedProcess):
    """``with ProxyProcess(log_file, "--upstream", url, "--cache", target) as proxy:`` starts
    `stratacache proxy` on a free port; ``proxy.base_url`` is its OpenAI base URL."""

    def __init__(self, log: Path, *flags: str, timeout: float = 120.0) -> None:
        command = [sys.executable, "-m", "stratacache.cli", "proxy", "--port", "0", *flags]
        super().__init__(command, log,
                         re.compile(r"stratacache proxy ready on 127\.0\.0\.1:(\d+)"), timeout)
        self.base_url = f"http://{self.target}/v1"


def free_port() -> int:
    """A TCP port nothing listens on now (for --metrics-port, where 0 means off)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
