"""Run an OpenAI-compatible caching proxy in front of any OpenAI-compatible API.

    stratacache serve &                                    # the cache (gRPC, port 50551)
    stratacache proxy --upstream https://api.openai.com/v1 # the HTTP front, port 8080

then point any OpenAI SDK at it:  OpenAI(base_url="http://127.0.0.1:8080/v1").

A request is looked up by its last user message within a scope made of everything else that
changes the answer (model, sampling, tools and format, system prompt, earlier turns); a hit comes
back in milliseconds with `x-stratacache: hit`; a miss goes to the upstream, whose answer the
caller gets unchanged and the cache stores once it is whole. The caller's Authorization goes to
the upstream as it is (and the cache is kept per credential), unless --upstream-key-env names a
provider key for the proxy to send instead. When the cache is down or slow, requests go straight
to the upstream (fail-open). Every flag can also be set by the environment variable named after
it (STRATACACHE_PROXY_<FLAG>); the flag wins.
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import is_loopback, switch
from ..errors import CacheError

ENV_PREFIX = "STRATACACHE_PROXY_"
DEFAULT_PORT = 8080


@dataclass(frozen=True, kw_only=True)
class ProxySettings:
    """Everything the proxy needs; see ``stratacache proxy --help`` for each field's meaning."""

    upstream: str
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    upstream_key_env: str | None = None
    api_key_env: str | None = None
    allow_unauthenticated: bool = False
    cache: str = "127.0.0.1:50551"
    cache_key_env: str = "STRATACACHE_API_KEY"
    cache_tls: bool = False
    cache_tls_ca: Path | None = None
    namespace: str = "default"
    max_temperature: float = 0.0
    namespace_max_temperature: Mapping[str, float] = field(default_factory=dict)
    share_across_keys: bool = False
    min_similarity: float | None = None
    ttl_s: float | None = None
    race_upstream: bool = False
    lookup_timeout_s: float = 1.0
    store_timeout_s: float = 10.0
    upstream_connect_timeout_s: float = 10.0
    upstream_read_timeout_s: float = 600.0
    upstream_max_connections: int = 256
    max_body_bytes: int = 8 << 20
    max_pending_stores: int = 1024
    shutdown_grace_s: float = 30.0

    def temperature_limit(self, namespace: str) -> float:
        """The highest temperature whose answers ``namespace`` caches."""
        return self.namespace_max_temperature.get(namespace, self.max_temperature)

    def secret(self, env: str | None) -> str | None:
        """The value of the environment variable ``env`` names (keys never go on a command
        line, where `ps` shows them).

        Raises:
            CacheError: ``env`` is given but unset or empty.
        """
        if env is None:
            return None
        value = os.environ.get(env, "")
        if not value:
            raise CacheError(f"environment variable {env} is unset or empty; export the key "
                             "in it, or drop the flag that names it")
        return value


def _positive(value: str) -> float:
    number = float(value)
    if not number > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {value!r}")
    return number


def _temperatures(value: str) -> dict[str, float]:
    """``ns=T[,ns=T...]``: per-namespace temperature limits."""
    limits = {}
    for item in filter(None, (part.strip() for part in value.split(","))):
        name, _, number = item.partition("=")
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}", name) or not number:
            raise argparse.ArgumentTypeError(
                f"expected NAMESPACE=TEMPERATURE (e.g. creative=0.7), got {item!r}")
        limits[name] = float(number)
    return limits


_MIB = 1 << 20
#: (field, type, metavar, help). Defaults come from ProxySettings.
_FLAGS: tuple[tuple[str, Callable[[str], Any], str | None, str], ...] = (
    ("upstream", str, "URL", "the OpenAI-compatible API to forward to, e.g. "
     "https://api.openai.com/v1 (required)"),
    ("host", str, None, "address to listen on; beyond loopback with --upstream-key-env, "
     "--api-key-env is required"),
    ("port", int, None, "HTTP port"),
    ("upstream_key_env", str, "VAR", "environment variable holding the provider key to send "
     "upstream instead of the caller's Authorization"),
    ("api_key_env", str, "VAR", "environment variable holding the key callers must send as "
     "their bearer token (with --upstream-key-env)"),
    ("allow_unauthenticated", switch, None, "listen beyond loopback with --upstream-key-env "
     "but no --api-key-env (anyone who reaches the port spends the provider key)"),
    ("cache", str, "HOST:PORT", "the stratacache server's gRPC address"),
    ("cache_key_env", str, "VAR", "environment variable holding the stratacache API key "
     "(unset: none sent)"),
    ("cache_tls", switch, None, "connect to the cache over TLS"),
    ("cache_tls_ca", Path, "PEM", "CA certificate the cache's certificate must chain to "
     "(default: system roots)"),
    ("namespace", str, None, "namespace for requests without an x-stratacache-namespace header"),
    ("max_temperature", float, None, "highest temperature whose answers are cached (a request "
     "without one samples at 1.0, the API's default); above it requests are forwarded untouched"),
    ("namespace_max_temperature", _temperatures, "NS=T,...",
     "per-namespace temperature limits over --max-temperature, e.g. creative=0.7"),
    ("share_across_keys", switch, None, "serve one caller's cached answers to callers with "
     "other upstream keys (default: each credential has its own cache)"),
    ("min_similarity", float, None, "cosine a semantic hit must reach (default: the "
     "namespace's policy; it can only tighten it)"),
    ("ttl_s", _positive, "SECONDS", "expiry of stored answers (default: never)"),
    ("race_upstream", switch, None, "send a miss's upstream request at once, beside the "
     "lookup, and cancel it on a hit: no lookup latency on a miss, but the provider may bill "
     "a cancelled call"),
    ("lookup_timeout_s", _positive, "SECONDS", "a lookup slower than this is a miss (fail-open)"),
    ("store_timeout_s", _positive, "SECONDS", "deadline of a Store after a miss"),
    ("upstream_connect_timeout_s", _positive, "SECONDS",
     "seconds to connect to the upstream (or wait for a pooled connection)"),
    ("upstream_read_timeout_s", _positive, "SECONDS",
     "seconds the upstream may stay silent before the caller gets 504"),
    ("upstream_max_connections", int, None, "connections kept to the upstream at most"),
    ("max_body_mib", float, "MiB", "largest request body accepted (413 above it)"),
    ("max_pending_stores", int, None, "stores waiting to be sent at most; past it an answer is "
     "not cached (logged, counted)"),
    ("shutdown_grace_s", _positive, "SECONDS", "on SIGTERM, how long in-flight requests and "
     "pending stores may finish"),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = ProxySettings(upstream="")
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    for name, kind, metavar, text in _FLAGS:
        env = ENV_PREFIX + name.upper()
        default: Any = (defaults.max_body_bytes / _MIB if name == "max_body_mib"
                        else getattr(defaults, name))
        shown = "none" if default in (None, "", {}) else default
        extra: dict[str, Any] = {"nargs": "?", "const": "true"} if kind is switch else {}
        if metavar:
            extra["metavar"] = metavar
        raw = os.environ.get(env)
        parser.add_argument("--" + name.replace("_", "-"), type=kind,
                            default=kind(raw) if raw is not None else default,
                            help=f"{text}{'' if 'default' in text or 'required' in text else f' (default: {shown})'} [env {env}]", **extra)
    parser.add_argument("--log-level", default=os.environ.get("STRATACACHE_LOG_LEVEL", "info"),
                        help="debug, info, warning or error (default: info)")
    parser.add_argument("--log-format", default=os.environ.get("STRATACACHE_LOG_FORMAT", "text"),
                        help="text or json (default: text)")


def settings_from_args(args: argparse.Namespace) -> ProxySettings:
    """The settings the parsed flags describe.

    Raises:
        CacheError: a missing or contradictory flag (the message says which).
    """
    values = {name: getattr(args, name) for name, *_ in _FLAGS if name != "max_body_mib"}
    if not values["upstream"]:
        raise CacheError("--upstream is required: the OpenAI-compatible base URL to forward "
                         "to, e.g. https://api.openai.com/v1")
    if not re.match(r"https?://", values["upstream"]):
        raise CacheError(f"--upstream {values['upstream']!r} must be an http:// or https:// URL")
    values["max_body_bytes"] = int(args.max_body_mib * _MIB)
    settings = ProxySettings(**values)
    if settings.api_key_env and not settings.upstream_key_env:
        raise CacheError("--api-key-env needs --upstream-key-env: without a provider key of "
                         "its own the proxy passes each caller's Authorization to the upstream, "
                         "which checks it")
    if (settings.upstream_key_env and not settings.api_key_env
            and not is_loopback(settings.host) and not settings.allow_unauthenticated):
        raise CacheError(f"--host {settings.host} with --upstream-key-env but no --api-key-env "
                         "would let anyone who reaches the port spend the provider key: set "
                         "--api-key-env, or --allow-unauthenticated if a gateway in front "
                         "authenticates callers")
    return settings


def run(args: argparse.Namespace) -> int:
    """Runs the proxy until SIGTERM/SIGINT."""
    settings = settings_from_args(args)
    from .app import serve  # imported here: the HTTP stack loads only for this command

    serve(settings)
    return 0
