"""The ``stratacache`` command: ``serve`` runs the gRPC server; ``tune``, ``reindex`` and
``calibrate`` are tools around it (each in its own module).

Every flag has an environment variable twin (``--data-dir`` <-> ``STRATACACHE_DATA_DIR``); a
flag given on the command line wins over its variable.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from . import config, logs
from .config import Settings, switch
from .errors import CacheError

log = logging.getLogger("stratacache")

ENV_PREFIX = "STRATACACHE_"


@dataclass(frozen=True)
class _Flag:
    field: str
    type: Callable[[str], Any]
    default: Any
    help: str

    @property
    def option(self) -> str:
        return "--" + self.field.replace("_", "-")

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.field.upper()


def _mib(value: str) -> int:
    return int(float(value) * (1 << 20))


def _rate_limit(value: str) -> config.RateLimit:
    try:
        return config.RateLimit.parse(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _rate_limit_flags() -> tuple[_Flag, ...]:
    scopes = {"user": "per user (the request's user_id, else the API key's name, else the "
                      "client's address)",
              "namespace": "per namespace", "global": "for the whole server"}
    return tuple(_Flag(f"rate_limit_{scope}_{call}", _rate_limit, None,
                       f"{call.capitalize()} calls {who}: RATE[,BURST] calls per second and at "
                       f"once, e.g. 20,40; over it a call gets RESOURCE_EXHAUSTED with "
                       f"retry-after-ms; unset = no limit")
                 for scope, who in scopes.items() for call in ("lookup", "store"))


#: The serve flags, in --help order. Units are in the help text; the README's table is this list.
SERVE_FLAGS = (
    _Flag("data_dir", Path, config.DEFAULT_DATA_DIR,
          "directory for the warm (LMDB) and cold (SQLite) tiers; created if missing"),
    _Flag("shared_store", str, None,
          "PostgreSQL (with pgvector) connection string, e.g. postgresql://user@db:5432/cache: "
          "every node given the same one shares one cache, and its own tiers cache that "
          "(each node keeps its own --data-dir); prefer the environment variable, which "
          "`ps` does not show, for a password"),
    _Flag("host", str, config.DEFAULT_HOST, "address to listen on (0.0.0.0 for all interfaces)"),
    _Flag("port", int, config.DEFAULT_PORT, "TCP port to listen on (0 picks a free one)"),
    _Flag("model", str, config.DEFAULT_MODEL,
          "sentence-transformers model folder, or 'default' for the bundled all-MiniLM-L6-v2; "
          "never downloaded"),
    _Flag("device", str, config.DEFAULT_DEVICE, "embedding device: auto, cpu, cuda, cuda:N"),
    _Flag("embed_backend", str, config.DEFAULT_EMBED_BACKEND,
          "what computes embeddings: auto (ONNX Runtime on the CPU, about 3x faster per text, "
          "torch on CUDA), torch or onnx; ONNX vectors are checked against torch's at start "
          "(auto falls back to torch, onnx refuses to start); the graph is cached in DATA_DIR/onnx"),
    _Flag("embed_dtype", str, config.DEFAULT_EMBED_DTYPE,
          "embedding precision: auto (float16 on CUDA, checked against float32 at start; float32 "
          "elsewhere), float32, float16 or bfloat16 (CUDA only)"),
    _Flag("min_similarity", float, config.DEFAULT_MIN_SIMILARITY,
          "default cosine similarity a semantic hit must reach, in [0, 1]; higher = fewer wrong "
          "answers and fewer hits (chosen on QQP: see the README)"),
    _Flag("hot_capacity", int, config.DEFAULT_HOT_CAPACITY,
          "entries held in memory (hot tier); beyond it the least recently used stay on disk only"),
    _Flag("hot_max_mib", _mib, config.DEFAULT_HOT_MAX_BYTES >> 20,
          "memory bound of the hot tier in MiB (entries and responses, estimated)"),
    _Flag("hnsw_m", int, config.DEFAULT_HNSW_M, "HNSW graph degree: more = better recall, more memory"),
    _Flag("hnsw_ef_construction", int, config.DEFAULT_HNSW_EF_CONSTRUCTION,
          "HNSW build breadth: more = better graph, slower inserts"),
    _Flag("hnsw_ef_search", int, config.DEFAULT_HNSW_EF_SEARCH,
          "HNSW search breadth: more = better recall, slower lookups"),
    _Flag("warm_max_mib", _mib, config.DEFAULT_WARM_MAX_BYTES >> 20,
          "warm tier disk budget in MiB; beyond it the least recently used entries move to cold"),
    _Flag("cold_max_mib", _mib, config.DEFAULT_COLD_MAX_BYTES >> 20,
          "cold tier disk bound in MiB, 0 = unbounded; beyond it the oldest entries are evicted"),
    _Flag("embed_max_batch", int, config.DEFAULT_EMBED_MAX_BATCH,
          f"most texts per embedding pass; unset = {config.EMBED_MAX_BATCH_CPU} on the CPU, "
          f"{config.EMBED_MAX_BATCH_CUDA} on CUDA"),
    _Flag("embed_max_wait_ms", float, config.DEFAULT_EMBED_MAX_WAIT_MS,
          "ms to wait for a batch to fill once the model is free (0 = no wait: lowest latency)"),
    _Flag("embed_max_queue", int, config.DEFAULT_EMBED_MAX_QUEUE,
          "most texts waiting to be embedded; beyond it calls get RESOURCE_EXHAUSTED"),
    _Flag("embed_threads", int, config.DEFAULT_EMBED_THREADS,
          "threads per embedding pass on the CPU (torch's or ONNX Runtime's); 0 = the library's "
          "default (one per core, fastest on a host of its own); 1 is steadier on a host shared "
          "with busy processes"),
    _Flag("sweep_interval_s", float, config.DEFAULT_SWEEP_INTERVAL_S,
          "seconds between sweeps that free expired entries (expired ones are never served)"),
    _Flag("max_concurrent_rpcs", int, config.DEFAULT_MAX_CONCURRENT_RPCS,
          "calls in flight at once; beyond it calls get RESOURCE_EXHAUSTED"),
    _Flag("shutdown_grace_s", float, config.DEFAULT_SHUTDOWN_GRACE_S,
          "seconds in-flight calls get to finish on SIGTERM/SIGINT"),
    _Flag("api_key", str, None,
          "require 'authorization: Bearer <key>' on every call but health checks (prefer the "
          "environment variable: command lines are visible to other users); unset = no key, and "
          "an empty key is refused"),
    _Flag("verifier", str, None,
          "verifier folder (OUT/verifier from `stratacache tune`, or any sentence-transformers "
          "CrossEncoder folder): semantic candidates are verified by it before they are served; "
          "unset = no verification"),
    _Flag("verify_gate", float, None,
          "with a verifier: cosine similarity a candidate needs to be verified at all; unset = "
          "derived from the verifier's card (the highest gate costing at most half a point of "
          "held-back recall; 0.80 for a card without held-back scores)"),
    _Flag("verify_threshold", float, None,
          "with a verifier: decision score in [0, 1] a hit needs when its namespace sets no "
          "wrong-hit bound; unset = derived from the verifier's card (the loosest threshold "
          "whose held-back precision beats cosine at --min-similarity by 0.01; 0.90 for a card "
          "without held-back scores); GetPolicy says which and why"),
    _Flag("verify_candidates", int, config.DEFAULT_VERIFY_CANDIDATES,
          "with a verifier: most candidates per tier it scores (each costs one model pass)"),
    _Flag("verify_max_batch", int, config.DEFAULT_VERIFY_MAX_BATCH,
          "with a verifier: most pairs per verifier pass"),
    _Flag("verify_quantize", str, config.DEFAULT_VERIFY_QUANTIZE,
          "with a verifier on the CPU with torch: int8 (dynamic int8 linear layers, about 1.9x "
          "faster, scores within ~0.02) or none"),
    _Flag("verify_device", str, config.DEFAULT_VERIFY_DEVICE,
          "with a verifier: its device (auto, cpu, cuda, cuda:N); unset = --device"),
    _Flag("verify_backend", str, config.DEFAULT_VERIFY_BACKEND,
          "with a verifier: auto (= torch, int8 on the CPU: as fast as the float32 ONNX graph "
          "here), torch or onnx (float32 graph, scores checked against torch's at start)"),
    _Flag("max_wrong_rate", float, None,
          "default wrong-hit bound for namespaces that set none, in [0.0001, 0.5], e.g. 0.01: the "
          "threshold is calibrated on each namespace's labelled evidence (`stratacache "
          "calibrate`, feedback) so the 95 percent upper bound stays within it; unset = thresholds"),
    _Flag("feedback_evict_after", int, config.DEFAULT_FEEDBACK_EVICT_AFTER,
          "wrong reports (Feedback) after which an entry is deleted; 0 = never (each report "
          "already vetoes the entry for prompts like the reported one)"),
    _Flag("metrics_port", int, config.DEFAULT_METRICS_PORT,
          "port of the Prometheus endpoint (GET /metrics); 0 = off"),
    _Flag("metrics_host", str, config.DEFAULT_METRICS_HOST,
          "address the Prometheus endpoint listens on (0.0.0.0 for all interfaces)"),
    _Flag("metrics_max_namespaces", int, config.DEFAULT_METRICS_MAX_NAMESPACES,
          "namespaces with a label of their own in /metrics (the first seen); the rest are "
          "pooled under _other so the series count stays bounded"),
    _Flag("prices", Path, None,
          "price table, JSON or TOML: model name -> dollars per million input and output "
          "tokens; turns hits into dollars saved; unset = the bundled table (see the README)"),
    *_rate_limit_flags(),
    _Flag("keys_file", Path, None,
          "TOML file of scoped API keys (name, hashed key, namespaces, roles); reloaded on "
          "SIGHUP; see the README's 'Running in production'"),
    _Flag("allow_unauthenticated", switch, False,
          "allow listening on a non-loopback --host with neither --api-key nor --keys-file "
          "(only on a network you trust)"),
    _Flag("tls_cert", Path, None, "PEM certificate chain of the server: serve TLS (with --tls-key)"),
    _Flag("tls_key", Path, None, "PEM private key of --tls-cert"),
    _Flag("tls_client_ca", Path, None,
          "PEM CA certificate(s): clients must present a certificate signed by one (mutual TLS)"),
    _Flag("log_format", str, "text", "text (one human line per event) or json (one object per "
          "line, with the request id)"),
    _Flag("log_prompts", switch, False,
          "write prompts and responses into access-log lines (off: they may hold personal data)"),
    _Flag("otlp_endpoint", str, None,
          "send traces (a span per call, a child per stage) by OTLP/gRPC to this endpoint, e.g. "
          "http://127.0.0.1:4317; needs the 'otel' extra; unset = no tracing"),
    _Flag("log_level", str, "info", "debug, info, warning or error"),
)

_SETTINGS_FIELD = {"hot_max_mib": "hot_max_bytes", "warm_max_mib": "warm_max_bytes",
                   "cold_max_mib": "cold_max_bytes"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stratacache",
        description="stratacache: a semantic cache server for LLM applications (gRPC).")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = commands.add_parser(
        "serve", help="run the cache server",
        description="Run the gRPC cache server. Every flag can also be set by the environment "
                    "variable named after it; the flag wins.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for flag in SERVE_FLAGS:
        # argparse runs string defaults through `type`, so env values and defaults parse alike.
        default = os.environ.get(flag.env, None if flag.default is None else str(flag.default))
        optional = {"nargs": "?", "const": "true"} if flag.type is switch else {}
        serve.add_argument(flag.option, type=flag.type, default=default,
                           help=f"{flag.help} [env {flag.env}]", **optional)
    _add_tool(commands, "tune", "train a verifier (and optionally an embedder) on labelled pairs",
              "stratacache.tune")
    _add_tool(commands, "reindex",
              "re-embed a data directory with another embedding model", "stratacache.reindex")
    _add_tool(commands, "calibrate",
              "send labelled pairs to a running server as a namespace's calibration evidence",
              "stratacache.calibrate")
    _add_tool(commands, "export", "write a data directory's entries to a dump (JSON Lines)",
              "stratacache.transfer")
    _add_tool(commands, "import", "load a dump's entries into a data directory",
              "stratacache.transfer")
    _add_tool(commands, "hash-key",
              "make an API key and its [[keys]] entry for --keys-file", "stratacache.access")
    _add_tool(commands, "admin", "administer a running server (stats, saved)", "stratacache.admin")
    _add_tool(commands, "db", "check a PostgreSQL database as a shared store (--shared-store)",
              "stratacache.shared")
    _add_tool(commands, "proxy", "run an OpenAI-compatible HTTP proxy that caches chat "
              "completions through a running server", "stratacache.proxy.command")
    return parser


def _add_tool(commands: Any, name: str, summary: str, module: str) -> None:
    """A subcommand whose flags and work live in ``module`` (``add_arguments``, ``run``)."""
    import importlib

    tool = importlib.import_module(module)
    parser = commands.add_parser(name, help=summary, description=(tool.__doc__ or summary).strip(),
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    tool.add_arguments(parser)
    parser.set_defaults(run=tool.run)


def settings_from_args(args: argparse.Namespace) -> Settings:
    values = {_SETTINGS_FIELD.get(f.field, f.field): getattr(args, f.field)
              for f in SERVE_FLAGS if f.field != "log_level"}
    for name in ("verifier", "verify_device", "otlp_endpoint", "shared_store"):
        if values[name] == "":
            values[name] = None
    return Settings(**values)


async def serve(settings: Settings) -> None:
    """Runs until SIGTERM/SIGINT, then drains in-flight calls and flushes the tiers."""
    from .embed import Encoder
    from .engine import Engine
    from .service import CacheServer

    started = time.perf_counter()
    from . import prices, tls

    # Files a typo can break are read before the model loads: fail in a second, not in ten.
    try:
        tls.server_credentials(settings)
    except ValueError as exc:  # not PEM, a key that is not the certificate's...
        raise CacheError(str(exc)) from None
    prices.load(settings.prices)
    graphs = settings.data_dir / "onnx"  # exported ONNX graphs, keyed by weights fingerprint
    encoder = await asyncio.to_thread(
        Encoder, settings.model, device=settings.device, threads=settings.embed_threads,
        backend=settings.embed_backend, dtype=settings.embed_dtype, cache_dir=graphs)
    if settings.embed_max_batch is None:
        settings = dataclasses.replace(settings, embed_max_batch=encoder.max_batch)
    verifier = None
    if settings.verifier is not None:
        from .verify import Verifier

        verifier = await asyncio.to_thread(
            Verifier, settings.verifier, device=settings.verify_device or settings.device,
            embedder=encoder.identity, quantize=settings.verify_quantize,
            backend=settings.verify_backend, cache_dir=graphs, threads=settings.embed_threads)
    engine = await Engine.open(settings, encoder, verifier=verifier)
    try:
        server = CacheServer(engine, settings)
    except BaseException:
        await engine.close()
        raise
    await server.start()
    log.info("stratacache ready on %s:%d in %.1f s (model %s, dim %d, %s, %s %s, batch %d, "
             "data %s, entries hot/warm/cold %d/%d/%d%s)", settings.host, server.port,
             time.perf_counter() - started, encoder.identity.name, encoder.dimension,
             encoder.device, encoder.backend, encoder.dtype, settings.embed_max_batch,
             settings.data_dir, len(engine.hot), len(engine.warm),
             len(engine.cold),
             "" if engine.shared is None else f", shared store {engine.shared.name}")

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if server.keys is not None:  # SIGHUP re-reads --keys-file (a bad file keeps the old keys)
        loop.add_signal_handler(signal.SIGHUP, server.keys.reload)
    await stop.wait()
    log.info("shutting down: finishing in-flight calls (up to %.0f s), then flushing",
             settings.shutdown_grace_s)
    await server.stop()
    log.info("stopped cleanly")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        logs.configure(str(getattr(args, "log_level", "info")),
                       str(getattr(args, "log_format", "text")))
    except ValueError as exc:
        parser.error(str(exc))
    if args.command != "serve":
        try:
            return int(args.run(args))
        except (CacheError, OSError) as exc:
            log.error("%s", exc)
            return 2
    try:
        settings = settings_from_args(args)
    except ValueError as exc:
        parser.error(str(exc))
    try:
        asyncio.run(serve(settings))
    except (CacheError, OSError) as exc:
        log.error("%s", exc)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
