"""Rate limits: token buckets per user, per namespace and for the whole server, kept apart for
Lookup and Store calls (``--rate-limit-{user,namespace,global}-{lookup,store}``).

A call passes when every bucket that applies to it holds a token, and then takes one from each;
otherwise it is refused with :class:`RateLimited` (RESOURCE_EXHAUSTED) at once, naming the limit
and how long until it would pass, and takes nothing (a call refused by the server-wide limit
does not spend its user's allowance). The check and the take run with no await between them, on
the event loop that runs every call, so N concurrent calls against a burst of B see exactly B
pass.

Who the *user* is: the request's ``user_id`` where it has one (Store), within the key that sent
it (two keys' gateways may both have a user "42"; they are different people); else the API key's
name (so each gateway or tenant key gets the user allowance); else, on a server without keys, the
client's address without its port.

Memory stays bounded however many users arrive:

- a bucket that would be full again is the same as no bucket, so buckets are dropped once full
  (a lazy sweep on each check, oldest first: amortised O(1));
- each limit tracks at most ``max_tracked`` keys (:data:`DEFAULT_MAX_TRACKED`, about 200 bytes
  each). Past that, new keys *share* one overflow bucket of the same rate and burst until the
  sweep frees room. Sharing, not refusing: a flood of made-up user ids then throttles only the
  users that arrive during it, together, to one user's allowance; users already tracked keep
  their own buckets, and no user ever gets more than the limit.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from .config import RateLimit, Settings
from .errors import Overloaded

#: The calls that are rate limited, as the roles that make them (``access.ROLES``).
CALLS = ("lookup", "store")
#: The limits, in the order a refusal's message names them when several refuse.
SCOPES = ("user", "namespace", "global")
#: Keys each limit tracks at most before new ones share an overflow bucket (module doc).
DEFAULT_MAX_TRACKED = 65_536
#: Trailing metadata of a refused call: milliseconds until it would pass.
RETRY_AFTER_METADATA = "retry-after-ms"
#: Tokens short of a whole one that still count as whole: a call that arrives just when its
#: token is due must not be refused over float rounding (0.05 s * 20/s is 0.9999999999 here).
_EPSILON = 1e-9


class RateLimited(Overloaded):
    """A call over a rate limit.

    Attributes:
        limit: which limit refused it: "user", "namespace" or "global".
        retry_after_s: seconds until the call would pass, if nothing else takes the tokens.
    """

    def __init__(self, message: str, *, limit: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.limit = limit
        self.retry_after_s = retry_after_s

    @property
    def retry_after_ms(self) -> int:
        """``retry_after_s`` in whole milliseconds, rounded up (what the metadata carries)."""
        return _whole_ms(self.retry_after_s)


def _whole_ms(seconds: float) -> int:
    return max(1, math.ceil(seconds * 1000))


@dataclass(frozen=True)
class Subject:
    """Whom a call's user limit counts: ``key`` is the bucket's (a 16-byte digest, so a bucket
    costs the same for a 256-byte user id as for a short one), ``label`` is for messages."""

    key: bytes
    label: str

    @classmethod
    def of(cls, *, user_id: str | None, key_name: str | None, peer: str) -> "Subject":
        """The user of a call (module doc).

        Args:
            user_id: the request's user id, if it carries one.
            key_name: the name of the API key that made the call; None on a server without keys.
            peer: the client's address as gRPC gives it, e.g. "ipv4:127.0.0.1:50312".
        """
        if user_id:
            return cls(_digest(f"u\0{key_name or ''}\0{user_id}"), f"user {user_id!r}")
        if key_name is not None:
            return cls(_digest(f"k\0{key_name}"), f"key {key_name!r}")
        host = peer.rpartition(":")[0] if peer.startswith(("ipv4:", "ipv6:")) else peer
        return cls(_digest(f"p\0{host}"), f"client {host}")


def _digest(text: str) -> bytes:
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()


class _Bucket:
    __slots__ = ("tokens", "stamp")

    def __init__(self, tokens: float, stamp: float) -> None:
        self.tokens = tokens  # as of `stamp`
        self.stamp = stamp  # clock seconds


class Buckets:
    """The token buckets of one limit (one rate and burst), by key, least recently used first.

    Args:
        limit: the rate (tokens per second) and burst (tokens a full bucket holds).
        max_tracked: most keys with a bucket of their own (module doc).
    """

    def __init__(self, limit: RateLimit, *, max_tracked: int = DEFAULT_MAX_TRACKED) -> None:
        if max_tracked < 1:
            raise ValueError(f"max_tracked must be >= 1, got {max_tracked}")
        self.limit = limit
        self.max_tracked = max_tracked
        self._buckets: OrderedDict[str | bytes, _Bucket] = OrderedDict()
        self._overflow: _Bucket | None = None

    def __len__(self) -> int:
        """Keys with a bucket of their own now."""
        return len(self._buckets)

    def _level(self, bucket: _Bucket, now: float) -> float:
        return min(float(self.limit.burst), bucket.tokens + (now - bucket.stamp) * self.limit.rate)

    def _sweep(self, now: float) -> None:
        """Drops buckets that are full again, oldest first, up to the first that is not."""
        while self._buckets:
            bucket = next(iter(self._buckets.values()))
            if self._level(bucket, now) < self.limit.burst - _EPSILON:
                return
            self._buckets.popitem(last=False)

    def bucket(self, key: str | bytes, now: float) -> tuple[_Bucket, bool]:
        """The bucket ``key`` counts against now, and whether it is the shared overflow one."""
        self._sweep(now)
        bucket = self._buckets.get(key)
        if bucket is not None:
            return bucket, False
        if len(self._buckets) < self.max_tracked:
            bucket = self._buckets[key] = _Bucket(float(self.limit.burst), now)
            return bucket, False
        if self._overflow is None:
            self._overflow = _Bucket(float(self.limit.burst), now)
        return self._overflow, True

    def wait(self, bucket: _Bucket, now: float) -> float:
        """Seconds until ``bucket`` holds a token (0: it holds one now)."""
        short = 1.0 - self._level(bucket, now)
        return 0.0 if short <= _EPSILON else short / self.limit.rate

    def take(self, key: str | bytes, bucket: _Bucket, now: float) -> None:
        """Takes a token from ``bucket`` (which must hold one), the bucket of ``key``."""
        bucket.tokens = self._level(bucket, now) - 1.0
        bucket.stamp = now
        if bucket is not self._overflow:
            self._buckets.move_to_end(key)


class RateLimiter:
    """The limits of one server (module doc).

    Args:
        limits: the limit of each (call, scope) pair, e.g. ``{("lookup", "user"): RateLimit(20,
            40)}``; a pair left out, or None, is not limited.
        max_tracked: most keys each limit tracks (module doc).
        clock: seconds, monotonic (tests pass their own).
    """

    def __init__(self, limits: dict[tuple[str, str], RateLimit | None], *,
                 max_tracked: int = DEFAULT_MAX_TRACKED,
                 clock: Callable[[], float] = time.monotonic) -> None:
        unknown = set(limits) - {(c, s) for c in CALLS for s in SCOPES}
        if unknown:
            raise ValueError(f"unknown rate limits {sorted(unknown)}: calls are {CALLS}, "
                             f"scopes {SCOPES}")
        self._limits = {call: {scope: Buckets(limit, max_tracked=max_tracked)
                               for scope in SCOPES
                               if (limit := limits.get((call, scope))) is not None}
                        for call in CALLS}
        self._clock = clock

    @classmethod
    def from_settings(cls, settings: Settings, **kwargs: object) -> "RateLimiter":
        """The limits of ``settings.rate_limit_{scope}_{call}``."""
        return cls({(call, scope): getattr(settings, f"rate_limit_{scope}_{call}")
                    for call in CALLS for scope in SCOPES}, **kwargs)  # type: ignore[arg-type]

    def limits(self, call: str) -> bool:
        """Whether any limit applies to ``call`` ("lookup", "store", or another role: never)."""
        return bool(self._limits.get(call))

    def tracked(self, call: str, scope: str) -> int:
        """Keys with a bucket of their own in one limit (0 when it is off)."""
        buckets = self._limits[call].get(scope)
        return 0 if buckets is None else len(buckets)

    def check(self, call: str, *, user: Subject, namespace: str) -> None:
        """Lets one call through, taking a token from each of its limits, or refuses it.

        Args:
            call: "lookup" or "store" (any other call passes untouched).
            user: the call's user (:meth:`Subject.of`).
            namespace: the namespace it uses.

        Raises:
            RateLimited: a limit holds no token; nothing was taken. The message names the limit
                that will take longest to allow the call, and ``retry_after_s`` is that wait.
        """
        limits = self._limits.get(call)
        if not limits:
            return
        now = self._clock()
        keys = {"user": user.key, "namespace": namespace, "global": ""}
        held = []
        worst: tuple[float, str, bool] | None = None  # (wait, scope, shared)
        for scope, buckets in limits.items():
            bucket, shared = buckets.bucket(keys[scope], now)
            held.append((buckets, keys[scope], bucket))
            wait = buckets.wait(bucket, now)
            if wait > 0 and (worst is None or wait > worst[0]):
                worst = (wait, scope, shared)
        if worst is not None:
            raise self._refusal(call, worst, user, namespace)
        for buckets, key, bucket in held:
            buckets.take(key, bucket, now)

    def _refusal(self, call: str, worst: tuple[float, str, bool], user: Subject,
                 namespace: str) -> RateLimited:
        wait, scope, shared = worst
        limit = self._limits[call][scope].limit
        who = {"user": user.label, "namespace": f"namespace {namespace!r}",
               "global": "the server"}[scope]
        if shared:
            who += (f" (sharing one bucket with every new {scope}: more than "
                    f"{self._limits[call][scope].max_tracked} are active)")
        return RateLimited(f"rate limit: {who} over {limit.rate:g} {call}s/s (burst "
                           f"{limit.burst}); retry in {_whole_ms(wait)} ms",
                           limit=scope, retry_after_s=wait)
