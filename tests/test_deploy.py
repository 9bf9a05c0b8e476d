"""deploy/: every metric the Grafana dashboard queries is in a real scrape of a server's /metrics,
the systemd unit parses and carries its hardening, the Prometheus config and the environment
file name only what the server has."""

from __future__ import annotations

import configparser
import json
import re
import shutil
import subprocess
import sys
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from stratacache import config
from stratacache.cli import SERVE_FLAGS

from .conftest import RunningServer
from .processes import free_port

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
DASHBOARD = DEPLOY / "grafana" / "stratacache-dashboard.json"
UNIT = DEPLOY / "stratacache.service"
METRIC = re.compile(r"\bstratacache_[a-z0-9_]+")
#: A selector's label matchers: `name{a="x", b=~"y"}`.
SELECTOR = re.compile(r"\b(stratacache_[a-z0-9_]+)\{([^}]*)\}")
MATCHER = re.compile(r"([a-zA-Z_]\w*)\s*(?:=~|!~|!=|=)")
#: Labels Prometheus adds to every series it scrapes.
TARGET_LABELS = {"instance", "job"}
#: What the issue asks the dashboard to show, by the metric each panel needs.
MUST_SHOW = {"stratacache_lookups_total", "stratacache_stage_seconds_bucket",
             "stratacache_saved_dollars_total", "stratacache_saved_tokens_total",
             "stratacache_saved_model_seconds_total", "stratacache_rate_limited_total",
             "stratacache_calls_total", "stratacache_queue_depth", "stratacache_tier_entries",
             "stratacache_tier_bytes", "stratacache_evictions_total",
             "stratacache_demotions_total"}


def _queries(node: Any) -> Iterator[str]:
    """Every PromQL text of a dashboard: panel targets (``expr``) and template variables
    (``query``, ``definition``), at any depth (rows nest panels)."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("expr", "query", "definition") and isinstance(value, str):
                yield value
            else:
                yield from _queries(value)
    elif isinstance(node, list):
        for item in node:
            yield from _queries(item)


def _panels(node: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in node.get("panels", []):
        yield panel
        yield from _panels(panel)


def _exported(text: str) -> tuple[set[str], dict[str, set[str]]]:
    """The sample names a scrape offers (a family with no series yet still declares its names),
    and the label names seen on each sample name."""
    names: set[str] = set()
    labels: dict[str, set[str]] = {}
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"),
                "gauge": ("",)}
    for family in text_string_to_metric_families(text):
        names.update(family.name + s for s in suffixes.get(family.type, ()))
        for sample in family.samples:
            names.add(sample.name)
            labels.setdefault(sample.name, set()).update(sample.labels)
    return names, labels


@pytest.fixture
def scrape(start_server: Callable[..., RunningServer], namespace: str) -> str:
    """/metrics of a real server, over HTTP, after a store, a hit, a miss and a feedback."""
    port = free_port()
    server = start_server(metrics_port=port)  # /metrics as `serve --metrics-port` runs it
    with server.client() as client:
        entry_id = client.store("What is the capital of Australia?", "Canberra",
                                namespace=namespace, cost_model="gpt-4o", prompt_tokens=20,
                                completion_tokens=5, model_latency_s=0.8)
        assert client.lookup("What is the capital of Australia?", namespace=namespace).hit
        assert not client.lookup("How do tides work?", namespace=namespace).hit
        client.feedback(entry_id, "What is the capital of Australia?", True,
                        namespace=namespace)
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as reply:
        assert reply.status == 200
        return reply.read().decode()


def test_every_dashboard_metric_is_in_a_real_scrape(scrape: str, namespace: str) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    queries = list(_queries(dashboard))
    used = {name for query in queries for name in METRIC.findall(query)}
    exported, labels = _exported(scrape)
    assert MUST_SHOW <= used, f"no panel shows {sorted(MUST_SHOW - used)}"
    assert used <= exported, f"the dashboard queries metrics the server lacks: " \
                             f"{sorted(used - exported)}"
    # Label matchers name labels those series carry (checked where the scrape has series).
    for query in queries:
        for name, matchers in SELECTOR.findall(query):
            if name in labels:
                wanted = set(MATCHER.findall(matchers)) - TARGET_LABELS
                assert wanted <= labels[name], (name, wanted - labels[name])
    # The calls made above are there as series.
    for series in (f'stratacache_lookups_total{{namespace="{namespace}",result="exact"}} 1.0',
                   f'stratacache_stores_total{{namespace="{namespace}"}} 1.0',
                   f'stratacache_feedback_total{{namespace="{namespace}",verdict="right"}} 1.0'):
        assert series in scrape, series
    assert 'stratacache_stage_seconds_count{stage="lookup"} 2.0' in scrape


def test_dashboard_panels_are_well_formed() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    panels = list(_panels(dashboard))
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert {"datasource", "instance", "namespace"} <= variables
    for panel in panels:
        if panel["type"] == "row":
            continue
        assert panel["targets"] and panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert {"h", "w", "x", "y"} <= panel["gridPos"].keys(), panel["title"]


def _unit() -> configparser.ConfigParser:
    # systemd files repeat keys (Environment=) and use % specifiers: no strictness, no
    # interpolation; keys keep their case.
    unit = configparser.ConfigParser(strict=False, interpolation=None, delimiters=("=",))
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read_string(UNIT.read_text())
    return unit


def test_systemd_unit_is_hardened() -> None:
    unit = _unit()
    assert {"Unit", "Service", "Install"} <= set(unit.sections())
    service = unit["Service"]
    expected = {"ProtectSystem": "strict", "ProtectHome": "yes", "PrivateTmp": "yes",
                "NoNewPrivileges": "yes", "StateDirectory": "stratacache",
                "Restart": "on-failure", "KillSignal": "SIGTERM"}
    for key, value in expected.items():
        assert service.get(key) == value, key
    assert service.get("DynamicUser") == "yes" or service.get("User") not in (None, "root")
    assert service["EnvironmentFile"].lstrip("-").startswith("/etc/stratacache/")
    assert service["ExecStart"].endswith("stratacache serve")
    assert int(service["LimitNOFILE"]) >= 4096
    # Stopping must outlast the shutdown grace (then the tiers flush), or systemd kills it.
    grace = max(config.DEFAULT_SHUTDOWN_GRACE_S, *(
        float(v) for k, v in _environment_file().items() if k == "STRATACACHE_SHUTDOWN_GRACE_S"))
    assert float(service["TimeoutStopSec"].removesuffix("s")) > grace
    assert "#MemoryMax=" in UNIT.read_text()  # offered, commented: the bound is the host's call


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze")
def test_systemd_analyze_finds_nothing_to_say(tmp_path: Path) -> None:
    """systemd's own parser: an unknown key or a bad value is a line of output."""
    # The unit names the installed path; here it points at this environment's script.
    script = Path(sys.executable).with_name("stratacache")
    copy = tmp_path / UNIT.name
    copy.write_text(UNIT.read_text().replace("/opt/stratacache/venv/bin/stratacache",
                                             str(script)))
    done = subprocess.run(["systemd-analyze", "verify", str(copy)], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0 and done.stdout + done.stderr == "", done.stdout + done.stderr


def _environment_file() -> dict[str, str]:
    """The example environment file's variables, commented-out ones included."""
    values = {}
    for line in (DEPLOY / "stratacache.env").read_text().splitlines():
        match = re.fullmatch(r"#?([A-Z][A-Z0-9_]*)=(.*)", line.strip())
        if match:
            values[match[1]] = match[2]
    return values


def test_environment_file_sets_only_serve_flags() -> None:
    known = {flag.env for flag in SERVE_FLAGS}
    names = set(_environment_file()) | set(re.findall(
        r"^Environment=(STRATACACHE_[A-Z0-9_]+)=", UNIT.read_text(), re.M))
    assert names and {n for n in names if n.startswith("STRATACACHE_")} <= known, \
        sorted(n for n in names if n.startswith("STRATACACHE_") and n not in known)


def test_prometheus_config_scrapes_the_default_metrics_port() -> None:
    prometheus = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    (job,) = [j for j in prometheus["scrape_configs"] if j["job_name"] == "stratacache"]
    assert job["metrics_path"] == "/metrics"
    targets = [t for group in job["static_configs"] for t in group["targets"]]
    assert f"{config.DEFAULT_METRICS_HOST}:{config.DEFAULT_METRICS_PORT}" in targets
