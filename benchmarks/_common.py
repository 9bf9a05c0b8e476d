"""What the benchmark scripts share: a real server in a subprocess, the shared QQP data, the
machine description, percentiles and output."""

from __future__ import annotations

import json
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from stratacache.pairs import read_pairs

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "qqp_pairs_dev.jsonl.gz"
RESULTS = REPO / "benchmarks" / "results"


def machine() -> dict[str, object]:
    """Where the figures were measured."""
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    from stratacache import _core

    return {"cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "simd_isa": _core.simd_isa()}


def load_pairs(path: Path, limit: int | None = None) -> list[dict]:
    """The first ``limit`` pairs of a labelled-pair file (stratacache.pairs), as
    ``{"a", "b", "duplicate"}`` dicts."""
    return [asdict(p) for p in read_pairs(path, limit)]


def distinct_texts(pairs: Sequence[dict]) -> list[str]:
    seen: dict[str, None] = {}
    for p in pairs:
        seen.setdefault(p["a"], None)
        seen.setdefault(p["b"], None)
    return list(seen)


@dataclass(frozen=True)
class ServerProcess:
    target: str
    start_s: float  # process start until the ready line
    data_dir: Path
    pid: int


@contextmanager
def serve(*flags: str, data_dir: Path | None = None) -> Iterator[ServerProcess]:
    """Runs ``stratacache serve`` on a free loopback port (temporary data directory unless one
    is given) and stops it with SIGTERM afterwards."""
    with tempfile.TemporaryDirectory(prefix="stratacache-bench-") as tmp:
        directory = data_dir or Path(tmp) / "data"
        command = [sys.executable, "-m", "stratacache.cli", "serve", "--port", "0",
                   "--data-dir", str(directory), "--log-level", "info",
                   "--metrics-port", "0", *flags]
        started = time.perf_counter()
        with subprocess.Popen(command, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONUNBUFFERED": "1"}) as process:
            assert process.stderr is not None
            log: deque[str] = deque(maxlen=50)  # the server's last log lines, for errors
            try:
                port = None
                for line in process.stderr:
                    log.append(line)
                    match = re.search(r"stratacache ready on [\d.]+:(\d+)", line)
                    if match:
                        port = int(match.group(1))
                        break
                if port is None:
                    raise RuntimeError("the server exited before it was ready:\n" + "".join(log))
                # Keep reading, or a full pipe would block the server's logging.
                threading.Thread(target=log.extend, args=(process.stderr,), daemon=True).start()
                yield ServerProcess(f"127.0.0.1:{port}", time.perf_counter() - started, directory,
                                    process.pid)
            finally:
                process.send_signal(signal.SIGTERM)
                process.wait(timeout=60)


def percentiles_ms(seconds: Sequence[float]) -> dict[str, float]:
    if not seconds:
        return {"n": 0}
    p50, p90, p99 = np.percentile(np.asarray(seconds) * 1000, [50, 90, 99])
    return {"n": len(seconds), "p50_ms": round(float(p50), 3), "p90_ms": round(float(p90), 3),
            "p99_ms": round(float(p99), 3)}


def write_json(name: str, payload: dict, out: Path | None = None) -> Path:
    path = out or RESULTS / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2))
    return path


def table(rows: Sequence[Sequence[object]], header: Sequence[str]) -> str:
    cells = [[str(c) for c in header]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


@contextmanager
def echo_server() -> Iterator[Callable[[bytes], bytes]]:
    """A bare gRPC echo on loopback (sync server and client, as the benchmarks' client is): the
    floor under any call to the cache. Yields a function that makes one call."""
    import grpc
    from concurrent import futures

    def identity(x: bytes) -> bytes:
        return x

    handler = grpc.method_handlers_generic_handler("bench.Echo", {
        "Echo": grpc.unary_unary_rpc_method_handler(lambda request, context: request,
                                                    request_deserializer=identity,
                                                    response_serializer=identity)})
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), handlers=[handler])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    call = channel.unary_unary("/bench.Echo/Echo", request_serializer=identity,
                               response_deserializer=identity)
    try:
        yield lambda payload: call(payload, timeout=10)
    finally:
        channel.close()
        server.stop(0)


def time_calls(fn: Callable[[], object], n: int) -> list[float]:
    """Seconds each of ``n`` calls of ``fn`` took (after 10 warm-up calls)."""
    for _ in range(10):
        fn()
    out = []
    for _ in range(n):
        started = time.perf_counter()
        fn()
        out.append(time.perf_counter() - started)
    return out
