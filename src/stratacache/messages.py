"""The engine's requests and results: plain dataclasses, free of protobuf (``service`` converts)."""

from __future__ import annotations

from collections.abc import Mapping
import enum
from dataclasses import dataclass, field

from .records import AnswerCost, Tier


class MissReason(enum.IntEnum):
    """Why a lookup missed; values match ``stratacache.v1.MissReason``."""

    NO_CANDIDATE = 1        # nothing stored in this namespace/scope/template version
    BELOW_SIMILARITY = 2    # the closest stored prompt is under the cosine gate
    REJECTED_BY_VERIFIER = 3  # candidates passed the gate; the verifier scored them too low
    VETOED = 4              # the only candidates were reported wrong for prompts like this one
    UNCALIBRATED = 5        # a wrong-hit bound is set, but the evidence cannot support it yet
    OTHER_SCOPE = 6         # this exact prompt is stored, under another scope/template version
    TOO_LONG = 7            # longer than the model reads: exact matches only


@dataclass(frozen=True, slots=True, kw_only=True)
class StoreRequest:
    prompt: str
    response: bytes
    namespace: str = "default"
    scope: Mapping[str, str] = field(default_factory=dict)
    template_id: str | None = None
    template_version: str | None = None
    ttl_s: float | None = None
    user_id: str | None = None
    metadata: Mapping[str, str] = field(default_factory=dict)
    #: ``time.monotonic()`` by which the caller gives up (its gRPC deadline); None = no deadline.
    deadline: float | None = None
    #: What the answer cost to make (kept with the entry; its hits count it as saved).
    cost: AnswerCost | None = None


@dataclass(frozen=True, slots=True)
class StoreResult:
    entry_id: str
    replaced: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class LookupRequest:
    prompt: str
    namespace: str = "default"
    scope: Mapping[str, str] = field(default_factory=dict)
    template_id: str | None = None
    template_version: str | None = None
    min_similarity: float | None = None
    #: ``time.monotonic()`` by which the caller gives up (its gRPC deadline); None = no deadline.
    deadline: float | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class LookupResult:
    """``similarity`` is cosine similarity (1.0 for an exact hit); ``age_s`` seconds since the
    entry was stored; ``best_similarity`` on a miss is the closest candidate's, 0 if none;
    ``verifier_score`` the best decision score the verifier gave (the hit's, or on a miss the
    best rejected candidate's; None when it did not run); ``server_time_us`` the engine's time
    on the call."""

    hit: bool
    response: bytes = b""
    similarity: float = 0.0
    matched_prompt: str = ""
    entry_id: str = ""
    tier: Tier | None = None
    age_s: float = 0.0
    best_similarity: float = 0.0
    server_time_us: int = 0
    verifier_score: float | None = None
    miss_reason: MissReason | None = None
    metadata: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class TierStats:
    entries: int
    bytes: int
    capacity: int
    hits: int
    demotions: int
    promotions: int


@dataclass(frozen=True, slots=True)
class StageStats:
    count: int
    p50_ms: float
    p99_ms: float
    max_ms: float = 0.0


@dataclass(frozen=True, slots=True, kw_only=True)
class Stats:
    model: str
    dimension: int
    device: str
    default_min_similarity: float
    lookups: int
    hits: int
    misses: int
    stores: int
    expired: int
    invalidated: int
    exact: TierStats
    hot: TierStats
    warm: TierStats
    cold: TierStats
    embed_batches: int
    embed_texts: int
    rejected_overload: int
    stages: Mapping[str, StageStats]
    uptime_s: float
    simd_isa: str
    verifier: str = ""
    verify_batches: int = 0
    verify_pairs: int = 0
    namespaces: Mapping[str, "NamespaceStats"] = field(default_factory=dict)
    shed_deadline: int = 0
    model_restarts: int = 0
    storage_errors: int = 0
    damaged_records: int = 0
    erased_records: int = 0
    #: How late the event loop woke a task that slept a short interval (count = samples).
    loop_lag: StageStats = StageStats(0, 0.0, 0.0)
    #: What hits saved since start, all namespaces together (see :class:`NamespaceStats`).
    saved_dollars: float = 0.0
    saved_prompt_tokens: int = 0
    saved_completion_tokens: int = 0
    saved_model_seconds: float = 0.0


@dataclass(frozen=True, slots=True)
class NamespaceCounts:
    """One namespace label's counts since start: lookups answered, hits, stores, and what the
    hits saved (dollars at the price table's list prices); ``unpriced_hits`` are hits of
    entries whose cost has tokens but a model the price table lacks (their dollars are not
    counted)."""

    lookups: int = 0
    hits: int = 0
    stores: int = 0
    saved_dollars: float = 0.0
    saved_prompt_tokens: int = 0
    saved_completion_tokens: int = 0
    saved_model_seconds: float = 0.0
    unpriced_hits: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class NamespaceStats(NamespaceCounts):
    """One namespace: its evidence and feedback (from its policy book), and its counts since
    start (:class:`NamespaceCounts`)."""

    evidence: int = 0
    feedback_correct: int = 0
    feedback_wrong: int = 0
    vetoed_entries: int = 0
