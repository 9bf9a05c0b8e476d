"""What the cache saves (stratacache.prices, the cost a Store carries): every hit of an entry
stored with a cost adds its dollars (tokens times the price table's prices), tokens and
model-seconds, per namespace and in total, in Stats and in /metrics; a model the table lacks
counts tokens and seconds but no dollars (unpriced, logged once); the cost survives a move to
the cold tier; malformed costs and price tables are refused with messages that say what to
fix; the bundled table loads."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from pathlib import Path

import pytest

from stratacache import InvalidArgumentError, prices
from stratacache.config import Settings
from stratacache.embed import Encoder
from stratacache.engine import Engine
from stratacache.messages import LookupRequest, StoreRequest
from stratacache.metrics import serve_metrics
from stratacache.prices import BadPriceTable
from stratacache.records import AnswerCost, Tier

from .test_metrics import scrape, value
from .test_tiers import BIG, PARAPHRASE_0, TOPICS

#: Dollars per million tokens of the test's own price table.
IN, OUT = 3.0, 15.0
PROMPT_TOKENS, COMPLETION_TOKENS, LATENCY_S = 1200, 300, 2.5
PER_HIT = (PROMPT_TOKENS * IN + COMPLETION_TOKENS * OUT) / 1e6


@pytest.fixture
def price_file(tmp_path: Path) -> Path:
    path = tmp_path / "prices.toml"
    path.write_text(f'"test-model" = {{ input_per_million = {IN}, output_per_million = {OUT} }}\n'
                    '"free-model" = { input_per_million = 0, output_per_million = 0 }\n')
    return path


def test_hits_turn_the_stored_cost_into_savings_in_stats_and_metrics(
        start_server, price_file: Path, namespace: str) -> None:  # type: ignore[no-untyped-def]
    server = start_server(prices=price_file, min_similarity=0.7)
    http = serve_metrics(server.engine.metrics.registry, "127.0.0.1", 0)
    try:
        with server.client() as client:
            client.store(TOPICS[0], "Feed the starter, then bake.", namespace=namespace,
                         cost_model="test-model", prompt_tokens=PROMPT_TOKENS,
                         completion_tokens=COMPLETION_TOKENS, model_latency_s=LATENCY_S)
            client.store(TOPICS[1], "Solar wind.", namespace=namespace)  # no cost: saves nothing
            assert client.lookup(TOPICS[0], namespace=namespace).tier == "exact"
            assert client.lookup(PARAPHRASE_0, namespace=namespace).hit  # semantic
            assert client.lookup(TOPICS[1], namespace=namespace).hit
            assert not client.lookup("What are the rules of cricket?", namespace=namespace).hit
            stats = client.stats()
        got = scrape(http.port)
    finally:
        http.close()

    ns = stats["namespaces"][namespace]
    assert (ns["lookups"], ns["hits"], ns["stores"], ns["unpriced_hits"]) == (4, 3, 2, 0)
    assert (ns["saved_prompt_tokens"], ns["saved_completion_tokens"]) == (
        2 * PROMPT_TOKENS, 2 * COMPLETION_TOKENS)
    assert ns["saved_model_seconds"] == pytest.approx(2 * LATENCY_S)
    assert ns["saved_dollars"] == pytest.approx(2 * PER_HIT)
    for field in ("saved_dollars", "saved_prompt_tokens", "saved_completion_tokens",
                  "saved_model_seconds"):
        assert stats[field] == pytest.approx(ns[field]), field  # the server's totals

    assert value(got, "stratacache_saved_dollars_total", namespace=namespace) == pytest.approx(
        2 * PER_HIT)
    assert value(got, "stratacache_saved_tokens_total", namespace=namespace,
                 kind="prompt") == 2 * PROMPT_TOKENS
    assert value(got, "stratacache_saved_tokens_total", namespace=namespace,
                 kind="completion") == 2 * COMPLETION_TOKENS
    assert value(got, "stratacache_saved_model_seconds_total",
                 namespace=namespace) == pytest.approx(2 * LATENCY_S)
    assert value(got, "stratacache_unpriced_hits_total", namespace=namespace) == 0


def test_a_model_without_a_price_saves_tokens_and_seconds_but_no_dollars(
        start_server, price_file: Path, namespace: str,
        caplog: pytest.LogCaptureFixture) -> None:  # type: ignore[no-untyped-def]
    server = start_server(prices=price_file)
    with server.client() as client:
        for i, model in enumerate(("unknown-model", None, "free-model")):
            client.store(TOPICS[i], "answer", namespace=namespace, cost_model=model,
                         prompt_tokens=100, completion_tokens=10, model_latency_s=0.5)
        with caplog.at_level(logging.WARNING, logger="stratacache.metrics"):
            for _ in range(3):
                for topic in TOPICS[:3]:
                    assert client.lookup(topic, namespace=namespace).hit
        ns = client.stats()["namespaces"][namespace]
    # The unknown model and the missing one are unpriced; a price of 0 is a price.
    assert (ns["hits"], ns["unpriced_hits"], ns["saved_dollars"]) == (9, 6, 0.0)
    assert (ns["saved_prompt_tokens"], ns["saved_completion_tokens"]) == (900, 90)
    assert ns["saved_model_seconds"] == pytest.approx(4.5)
    lines = [r.getMessage() for r in caplog.records if "save no dollars" in r.getMessage()]
    assert len(lines) == 2  # one per model name, however many hits
    assert "'unknown-model'" in lines[0] and str(price_file) in lines[0]
    assert "gave no model name" in lines[1]


def test_the_cost_survives_a_move_to_the_cold_tier(encoder: Encoder, price_file: Path,
                                                   tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data", port=0, sweep_interval_s=3600.0,
                        hot_capacity=2, warm_max_bytes=1 << 20, min_similarity=0.7,
                        prices=price_file)
    cost = AnswerCost("test-model", PROMPT_TOKENS, COMPLETION_TOKENS, LATENCY_S)

    async def scenario() -> None:
        engine = await Engine.open(settings, encoder)
        try:
            first = await engine.store(StoreRequest(prompt=TOPICS[0], response=BIG,
                                                    namespace="cold", cost=cost))
            deadline = time.monotonic() + 60
            i = 1
            while first.entry_id in engine.warm or await engine.cold.get(first.entry_id) is None:
                assert time.monotonic() < deadline, "the first entry never moved to cold"
                if i < len(TOPICS):  # the least recently used entry is demoted first
                    await engine.store(StoreRequest(prompt=TOPICS[i], response=BIG,
                                                    namespace="cold"))
                    i += 1
                else:
                    await asyncio.sleep(0.02)
            assert (await engine.cold.get(first.entry_id)).cost == cost
            hit = await engine.lookup(LookupRequest(prompt=TOPICS[0] + " Please explain.",
                                                    namespace="cold"))  # semantic: its tier
            assert hit.hit and hit.tier is Tier.COLD and hit.entry_id == first.entry_id
            saved = engine.metrics.namespaces()["cold"]
            assert (saved.saved_prompt_tokens, saved.saved_completion_tokens) == (
                PROMPT_TOKENS, COMPLETION_TOKENS)
            assert saved.saved_dollars == pytest.approx(PER_HIT)
        finally:
            await engine.close()

    asyncio.run(scenario())


@pytest.mark.parametrize("kwargs, message", [
    ({"cost_model": ""}, "cost.model must be 1 to 256 bytes"),
    ({"cost_model": "x" * 257}, "cost.model must be 1 to 256 bytes"),
    ({"cost_model": "a\nb"}, "cost.model must be 1 to 256 bytes of printable text"),
    ({"prompt_tokens": 10**12}, "cost.prompt_tokens must be a token count"),
    ({"model_latency_s": math.nan}, "cost.latency_s must be the model's time in seconds"),
    ({"model_latency_s": -1.0}, "cost.latency_s must be the model's time in seconds"),
])
def test_a_malformed_cost_is_refused(client, kwargs: dict,  # type: ignore[no-untyped-def]
                                     message: str) -> None:
    with pytest.raises(InvalidArgumentError, match=message):
        client.store("What is a cost?", "money", **kwargs)


def test_a_json_table_reads_like_a_toml_one(tmp_path: Path) -> None:
    path = tmp_path / "prices.json"
    path.write_text(json.dumps({"m": {"input_per_million": 1, "output_per_million": 2.5}}))
    table = prices.load(path)
    assert len(table) == 1 and table.get("m") == prices.Price(1.0, 2.5)
    assert table.get("other") is None and table.get(None) is None
    assert table.get("m").dollars(1_000_000, 2_000_000) == pytest.approx(6.0)


@pytest.mark.parametrize("name, text, message", [
    ("p.yaml", "", "must end in .toml or .json"),
    ("p.toml", "gpt = [", "is not valid TOML"),
    ("p.json", "{", "is not valid JSON"),
    ("p.json", "[]", "must map model names to their prices"),
    ("p.toml", '"m" = { input_per_million = 1 }', "model 'm': expected exactly "
                                                   "input_per_million and output_per_million"),
    ("p.toml", '"m" = { input_per_million = 1, output_per_milion = 2 }', "got \\['input_per_"),
    ("p.toml", '"m" = { input_per_million = -1, output_per_million = 2 }',
     "input_per_million must be a finite number of dollars >= 0, got -1"),
    ("p.json", '{"m": {"input_per_million": true, "output_per_million": 2}}', "got True"),
    ("p.json", '{"m": {"input_per_million": "1", "output_per_million": 2}}', "got '1'"),
    ("p.toml", '"m" = 3', "expected exactly"),
])
def test_a_bad_price_table_says_what_to_fix(tmp_path: Path, name: str, text: str,
                                           message: str) -> None:
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(BadPriceTable, match=message) as caught:
        prices.load(path)
    assert str(path) in str(caught.value)


def test_a_missing_table_stops_the_server_at_start(start_server,  # type: ignore[no-untyped-def]
                                                   tmp_path: Path) -> None:
    with pytest.raises(BadPriceTable, match="cannot be read.*--prices"):
        start_server(prices=tmp_path / "missing.toml")


def test_the_bundled_table_prices_well_known_models() -> None:
    table = prices.load()
    assert table.source == str(prices.bundled_path())
    for model in ("gpt-4o", "gpt-4o-mini", "gpt-4.1", "claude-sonnet-4", "claude-3-5-haiku",
                  "gemini-1.5-pro"):
        price = table.get(model)
        assert price is not None and 0 < price.input_per_million <= price.output_per_million
    text = prices.bundled_path().read_text()
    assert "list prices as published" in text and "--prices" in text and "2026-11-30" in text
