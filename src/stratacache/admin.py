"""Administer a running server: its counters, what the cache saved, namespace policies,
invalidation, erasure and health.

    stratacache admin stats
    stratacache admin report --plot saved.png
    stratacache admin policy support
    stratacache admin set-policy support --max-wrong-rate 0.01
    stratacache admin invalidate-template faq-answer --namespace support --version 3
    stratacache admin invalidate-namespace support
    stratacache admin delete-user user-42
    stratacache admin delete-entry 0f3a...
    stratacache admin health --target cache.internal:50551 --tls-ca ca.pem

Every action takes --target (env STRATACACHE_TARGET), reads the API key from the environment
variable --api-key-env names (STRATACACHE_API_KEY by default; a key on a command line would
show in `ps`), and takes the TLS flags, --timeout and --json. Tables are for people; --json
prints the answer as JSON for scripts. A call the server refuses prints one line on stderr (the
status and the server's message, e.g. "PERMISSION_DENIED: ...") and exits 1; a bad flag exits 2.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .calibrate import DEFAULT_TARGET
from .client import Client, StratacacheError, Timeout, UnavailableError

#: Where the API key is read from unless --api-key-env names another variable.
DEFAULT_KEY_ENV = "STRATACACHE_API_KEY"
#: Deadline of a health check without --timeout, seconds: a probe must answer quickly.
HEALTH_TIMEOUT_S = 5.0
#: The PNG file signature, for callers checking what --plot wrote.
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class _UsageError(Exception):
    """A flag's value cannot be used (exit 2)."""


#: set-policy's default for a field not given: keep the namespace's current value.
UNCHANGED: Any = object()


# --- formatting ---


def _table(header: Sequence[str], rows: Sequence[Sequence[str]],
           total: Sequence[str] | None = None) -> str:
    """Plain aligned columns: the first (names) left-aligned, the others (numbers) right."""
    lines = [list(header), *map(list, rows), *([list(total)] if total else [])]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]

    def render(cells: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    rule = "  ".join("-" * w for w in widths)
    out = [render(header), rule, *map(render, rows)]
    if total:
        out += [rule, render(total)]
    return "\n".join(out)


def _fields(values: Mapping[str, Any]) -> str:
    """``name  value`` lines."""
    width = max(map(len, values), default=0)
    return "\n".join(f"{name.ljust(width)}  {_text(value)}" for name, value in values.items())


def _text(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _rate(hits: int, lookups: int) -> float | None:
    return hits / lookups if lookups else None


def _percent(rate: float | None) -> str:
    return "-" if rate is None else f"{100 * rate:.1f}%"


def _dollars(value: float) -> str:
    # Cents hide what a small deployment saves; fractions of a cent clutter a large one.
    return f"${value:,.{2 if abs(value) >= 10 else 4}f}"


def _count(value: int) -> str:
    return f"{value:,}"


def _seconds(value: float) -> str:
    return f"{value:,.1f}"


# --- the actions: each calls the server and returns plain JSON-able data ---


def _stats(client: Client, args: argparse.Namespace) -> dict[str, Any]:
    return client.stats(timeout=args.timeout)


def _show_stats(s: dict[str, Any]) -> str:
    tokens = s["saved_prompt_tokens"] + s["saved_completion_tokens"]
    overview = _fields({
        "model": f"{s['model']} (dimension {s['dimension']}, {s['device']}, {s['simd_isa']})",
        "verifier": s["verifier"] or None,
        "uptime": str(datetime.timedelta(seconds=round(s["uptime_s"]))),
        "lookups": s["lookups"],
        "hits": f"{s['hits']:,} ({_percent(_rate(s['hits'], s['lookups']))})",
        "stores": s["stores"],
        "saved": f"{_dollars(s['saved_dollars'])}, {tokens:,} tokens, "
                 f"{_seconds(s['saved_model_seconds'])} model-seconds",
        "rejected_overload": s["rejected_overload"],
        "storage_errors": s["storage_errors"],
    })
    tiers = _table(("tier", "entries", "bytes", "capacity", "hits", "demotions", "promotions"),
                   [(name, *(_count(s[name][k]) for k in ("entries", "bytes", "capacity", "hits",
                                                          "demotions", "promotions")))
                    for name in ("exact", "hot", "warm", "cold")])
    stages = _table(("stage", "count", "p50 ms", "p99 ms", "max ms"),
                    [(name, _count(v["count"]), f"{v['p50_ms']:.2f}", f"{v['p99_ms']:.2f}",
                      f"{v['max_ms']:.2f}") for name, v in sorted(s["stages"].items())])
    return "\n\n".join((overview, tiers, stages))


def _report(client: Client, args: argparse.Namespace) -> dict[str, Any]:
    figure = _figure_class() if args.plot else None  # before the call: fail fast without it
    namespaces = client.stats(timeout=args.timeout)["namespaces"]
    rows = [_saved(name, namespaces[name]) for name in sorted(namespaces)]
    report = {"namespaces": rows, "total": _saved("total", {
        key: sum(n[key] for n in namespaces.values())
        for key in ("lookups", "hits", "saved_dollars", "saved_prompt_tokens",
                    "saved_completion_tokens", "saved_model_seconds", "unpriced_hits")})}
    if figure is not None:
        _plot(figure, rows, args.plot)
    return report


def _saved(namespace: str, n: Mapping[str, Any]) -> dict[str, Any]:
    """One row of the report: a namespace's (or the total's) hits and what they saved."""
    return {"namespace": namespace, "lookups": n["lookups"], "hits": n["hits"],
            "hit_rate": _rate(n["hits"], n["lookups"]),
            "saved_tokens": n["saved_prompt_tokens"] + n["saved_completion_tokens"],
            "saved_prompt_tokens": n["saved_prompt_tokens"],
            "saved_completion_tokens": n["saved_completion_tokens"],
            "saved_dollars": n["saved_dollars"], "saved_model_seconds": n["saved_model_seconds"],
            "unpriced_hits": n["unpriced_hits"]}


def _show_report(report: dict[str, Any]) -> str:
    def cells(r: Mapping[str, Any]) -> tuple[str, ...]:
        return (r["namespace"], _count(r["lookups"]), _count(r["hits"]), _percent(r["hit_rate"]),
                _count(r["saved_tokens"]), _dollars(r["saved_dollars"]),
                _seconds(r["saved_model_seconds"]))

    out = _table(("namespace", "lookups", "hits", "hit rate", "tokens saved", "dollars saved",
                  "model-s saved"), [cells(r) for r in report["namespaces"]],
                 cells(report["total"]))
    if unpriced := report["total"]["unpriced_hits"]:
        out += (f"\n\n{unpriced:,} {'hit' if unpriced == 1 else 'hits'} saved tokens but no "
                "dollars: their Store named no model, or one the server's price table "
                "(--prices) lacks")
    return out


def _figure_class() -> Any:
    try:
        # The object-oriented API: a Figure renders PNG through the Agg canvas without pyplot,
        # so no GUI backend is looked for and no global state is touched.
        from matplotlib.figure import Figure
    except ImportError:
        raise _UsageError("report --plot needs matplotlib, which is not installed: pip install "
                          "matplotlib (or pip install 'stratacache[bench]')") from None
    return Figure


def _plot(figure_class: Any, rows: Sequence[Mapping[str, Any]], path: Path) -> None:
    """Writes bar charts of hit rate, dollars, tokens and model-seconds saved per namespace."""
    figure = figure_class(figsize=(11, 7), layout="constrained")
    names = [r["namespace"] for r in rows]
    panels = (("hit_rate", "hit rate"), ("saved_dollars", "dollars saved"),
              ("saved_tokens", "tokens saved"), ("saved_model_seconds", "model-seconds saved"))
    for axes, (key, title) in zip(figure.subplots(2, 2).flat, panels):
        axes.bar(names, [r[key] or 0 for r in rows])
        axes.set_title(title)
        axes.tick_params(axis="x", labelrotation=30)
    figure.suptitle("stratacache: what the cache saved, per namespace")
    try:
        figure.savefig(path, format="png", dpi=100)
    except OSError as exc:
        raise _UsageError(f"--plot {path}: cannot write it ({exc.strerror or exc})") from None


def _policy(client: Client, args: argparse.Namespace) -> dict[str, Any]:
    return client.get_policy(args.namespace, timeout=args.timeout)


def _set_policy(client: Client, args: argparse.Namespace) -> dict[str, Any]:
    fields = ("max_wrong_rate", "min_similarity", "verify")
    # SetPolicy replaces the whole policy; a field not given keeps its current value.
    current = (client.get_policy(args.namespace, timeout=args.timeout)
               if any(getattr(args, f) is UNCHANGED for f in fields) else {})
    values = {f: current[f] if getattr(args, f) is UNCHANGED else getattr(args, f)
              for f in fields}
    return client.set_policy(args.namespace, clear_evidence=args.clear_evidence,
                             timeout=args.timeout, **values)


def _show_policy(p: dict[str, Any]) -> str:
    return _fields({k: v for k, v in p.items() if k != "message"}) + f"\n\n{p['message']}"


def _invalidate_template(client: Client, args: argparse.Namespace) -> dict[str, Any]:
    return {"removed": client.invalidate_template(args.template_id, namespace=args.namespace,
                                                  version=args.version, timeout=args.timeout)}


def _invalidate_namespace(client: Client, args: argparse.Namespace) -> dict[str, Any]:
    return {"removed": client.invalidate_namespace(args.namespace, timeout=args.timeout)}


def _delete_user(client: Client, args: argparse.Namespace) -> dict[str, Any]:
    return {"removed": client.delete_user(args.user_id, namespace=args.namespace,
                                          timeout=args.timeout)}


def _delete_entry(client: Client, args: argparse.Namespace) -> dict[str, Any]:
    return {"removed": client.delete_entry(args.entry_id, timeout=args.timeout)}


def _show_removed(result: dict[str, Any]) -> str:
    removed = result["removed"]
    if isinstance(removed, bool):
        return "removed the entry" if removed else "no such entry (nothing removed)"
    return f"removed {removed:,} {'entry' if removed == 1 else 'entries'}"


def _health(client: Client, args: argparse.Namespace) -> dict[str, Any]:
    return {"service": args.service,
            "status": client.health(args.service, timeout=args.timeout or HEALTH_TIMEOUT_S)}


# --- the command line ---


@dataclass(frozen=True)
class _Action:
    name: str
    summary: str
    arguments: Callable[[argparse.ArgumentParser], None]
    call: Callable[[Client, argparse.Namespace], Any]
    show: Callable[[Any], str]
    #: Whether the result means success (exit 0) or not (exit 1).
    ok: Callable[[Any], bool] = lambda result: True


def _no_arguments(parser: argparse.ArgumentParser) -> None:
    pass


def _report_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--plot", type=Path, default=None, metavar="FILE",
                        help="also write bar charts of it to FILE as PNG (needs matplotlib)")


def _namespace_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("namespace", help="the namespace")


def _policy_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("namespace", nargs="?", default="default",
                        help="the namespace (default: %(default)s)")


def _number_or_default(text: str) -> float | None:
    if text == "default":
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'default', got {text!r}") from None


def _on_off_default(text: str) -> bool | None:
    choices = {"on": True, "off": False, "default": None}
    if text not in choices:
        raise argparse.ArgumentTypeError(f"expected on, off or default, got {text!r}")
    return choices[text]


def _set_policy_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("namespace", help="the namespace")
    parser.add_argument("--max-wrong-rate", type=_number_or_default, default=UNCHANGED,
                        metavar="RATE", help="bound on wrong semantic hits the calibration must "
                        "promise, e.g. 0.01; 'default': the server's (not given: unchanged)")
    parser.add_argument("--min-similarity", type=_number_or_default, default=UNCHANGED,
                        metavar="COSINE", help="cosine similarity a semantic match must reach; "
                        "'default': the server's (not given: unchanged)")
    parser.add_argument("--verify", type=_on_off_default, default=UNCHANGED,
                        metavar="on|off|default",
                        help="whether candidates go through the server's verifier (not given: "
                        "unchanged)")
    parser.add_argument("--clear-evidence", action="store_true",
                        help="also forget the namespace's calibration evidence")


def _invalidate_template_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("template_id", help="the template, as given to Store")
    parser.add_argument("--namespace", default="default",
                        help="the namespace to remove it from (default: %(default)s)")
    parser.add_argument("--version", default=None, help="only this version (default: all)")


def _delete_user_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("user_id", help="the user, as given to Store")
    parser.add_argument("--namespace", default=None, help="only this namespace (default: all)")


def _delete_entry_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("entry_id", help="the entry's id (from Store or a hit)")


def _health_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--service", default="", help="a service's full name, e.g. "
                        "stratacache.v1.SemanticCache, or stratacache.writes (NOT_SERVING "
                        "while Stores and admin changes cannot succeed: a --shared-store that "
                        "is unreachable) (default: the whole server)")


def _show_health(result: dict[str, Any]) -> str:
    return str(result["status"])


ACTIONS = (
    _Action("stats", "the server's counters, tiers and per-stage latencies", _no_arguments,
            _stats, _show_stats),
    _Action("report", "per namespace: lookups, hits, hit rate and the tokens, dollars and "
            "model-seconds the hits saved, with a total", _report_arguments, _report,
            _show_report),
    _Action("policy", "a namespace's policy, the rule in force and the evidence behind it",
            _policy_arguments, _policy, _show_policy),
    _Action("set-policy", "change a namespace's policy (fields not given keep their values)",
            _set_policy_arguments, _set_policy, _show_policy),
    _Action("invalidate-template", "remove a prompt template's entries (one version or all)",
            _invalidate_template_arguments, _invalidate_template, _show_removed),
    _Action("invalidate-namespace", "remove every entry of a namespace", _namespace_argument,
            _invalidate_namespace, _show_removed),
    _Action("delete-user", "remove every entry stored for a user (erasure)",
            _delete_user_arguments, _delete_user, _show_removed),
    _Action("delete-entry", "remove one entry", _delete_entry_arguments, _delete_entry,
            _show_removed),
    _Action("health", "the server's health status (exit 0 only when SERVING); needs no key",
            _health_arguments, _health, _show_health,
            ok=lambda result: result["status"] == "SERVING"),
)


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return value


def _connection_flags() -> argparse.ArgumentParser:
    flags = argparse.ArgumentParser(add_help=False)
    group = flags.add_argument_group("connection")
    group.add_argument("--target", default=os.environ.get("STRATACACHE_TARGET", DEFAULT_TARGET),
                       help="server address host:port [env STRATACACHE_TARGET] (default: "
                       f"{DEFAULT_TARGET})")
    group.add_argument("--api-key-env", default=DEFAULT_KEY_ENV, metavar="VAR",
                       help="name of the environment variable holding the API key (default: "
                       f"{DEFAULT_KEY_ENV}; when it is unset, no key is sent)")
    group.add_argument("--tls", action="store_true",
                       help="connect over TLS, trusting the system's roots unless --tls-ca")
    group.add_argument("--tls-ca", type=Path, default=None, metavar="PEM",
                       help="CA certificate(s) the server's certificate must chain to "
                       "(implies --tls)")
    group.add_argument("--tls-cert", type=Path, default=None, metavar="PEM",
                       help="this client's certificate, for a server with --tls-client-ca "
                       "(with --tls-key; implies --tls)")
    group.add_argument("--tls-key", type=Path, default=None, metavar="PEM",
                       help="the unencrypted private key of --tls-cert")
    group.add_argument("--timeout", type=_positive_seconds, default=None, metavar="SECONDS",
                       help=f"deadline of each call (default: {Timeout().admin:g}; health "
                       f"{HEALTH_TIMEOUT_S:g})")
    group.add_argument("--json", action="store_true", help="print the answer as JSON")
    return flags


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the admin actions (each a subcommand with the connection flags) to ``parser``."""
    flags = _connection_flags()
    actions = parser.add_subparsers(dest="admin_action", required=True, metavar="ACTION")
    for action in ACTIONS:
        sub = actions.add_parser(action.name, help=action.summary, description=action.summary,
                                 parents=[flags])
        action.arguments(sub)
        sub.set_defaults(admin=action)


def _api_key(variable: str) -> str | None:
    key = os.environ.get(variable)
    if key is None and variable != DEFAULT_KEY_ENV:
        raise _UsageError(f"--api-key-env {variable}: that environment variable is not set; "
                          "export the key in it")
    if key == "":
        raise _UsageError(f"the environment variable {variable} is empty: set it to the "
                          "server's API key, or unset it for a server without keys")
    return key


def _client(args: argparse.Namespace) -> Client:
    tls = args.tls or any(p is not None for p in (args.tls_ca, args.tls_cert, args.tls_key))
    try:
        return Client(args.target, api_key=_api_key(args.api_key_env), tls=tls,
                      root_certificates=args.tls_ca, certificate_chain=args.tls_cert,
                      private_key=args.tls_key)
    except (OSError, ValueError) as exc:  # the TLS files: missing, unreadable, not PEM
        raise _UsageError(str(exc)) from None


def run(args: argparse.Namespace) -> int:
    """Runs one admin action.

    Returns:
        0 on success; 1 when the server refused or failed the call (one line on stderr), or
        health is not SERVING; 2 when a flag's value cannot be used.
    """
    action: _Action = args.admin
    try:
        with _client(args) as client:
            result = action.call(client, args)
    except _UsageError as exc:
        print(f"stratacache admin {action.name}: error: {exc}", file=sys.stderr)
        return 2
    except StratacacheError as exc:
        line = str(exc).replace("\n", " ")
        if isinstance(exc, UnavailableError):
            line += (f" (is a server listening on {args.target}, and does it speak TLS? "
                     "--target, --tls)")
        print(line, file=sys.stderr)
        return 1
    print(json.dumps(result, indent=2) if args.json else action.show(result))
    return 0 if action.ok(result) else 1
