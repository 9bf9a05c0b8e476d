"""`stratacache proxy`: the official openai client, through the proxy, to a fake upstream on
loopback, with a real stratacache server as the cache."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import uvicorn

from stratacache import cli
from stratacache.proxy import app as proxy_app
from stratacache.proxy import command
from stratacache.proxy.command import ProxySettings
from tests.openai_upstream import UpstreamServer, _Server, answer_for
from tests.processes import ProxyProcess

QUESTION = "How do I reset my password?"
PARAPHRASE = "How can I reset my password?"  # cosine 0.99 to QUESTION with MiniLM
OTHER = "What is the boiling point of water at sea level?"


class RunningProxy:
    """A real proxy (uvicorn + Starlette) on 127.0.0.1:0, in a thread of its own."""

    def __init__(self, settings: ProxySettings) -> None:
        self.server = _Server(uvicorn.Config(
            proxy_app.build_app(settings), host="127.0.0.1", port=0, lifespan="on",
            log_config=None, access_log=False))
        self.app_state = self.server.config.app.state  # type: ignore[attr-defined]
        self._thread = threading.Thread(target=self.server.run, daemon=True)
        self._thread.start()
        assert self.server.ready.wait(60) and self.server.started, "the proxy did not start"
        self.base_url = f"http://127.0.0.1:{proxy_app.bound_port(self.server)}/v1"

    @property
    def proxy(self) -> proxy_app.Proxy:
        return self.app_state.proxy

    def count(self, metric: str, **labels: str) -> float:
        """A counter of the proxy's own /metrics registry."""
        value = self.proxy.metrics.registry.get_sample_value(metric + "_total", labels)
        return value or 0.0

    def wait_stored(self, n: int) -> None:
        """Waits until ``n`` answers were stored (the store runs after the caller's answer)."""
        _wait_for(lambda: self.count("stratacache_proxy_stores", outcome="stored") >= n,
                  f"{n} stores")

    def openai(self, **kwargs: Any) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.base_url, api_key=kwargs.pop("api_key", "sk-caller"),
                             max_retries=0, **kwargs)

    def stop(self) -> None:
        self.server.should_exit = True
        self._thread.join(60)


def _wait_for(condition: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    """Polls ``condition`` until true; the timeout is a safety net, not a timing assumption."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


@pytest.fixture(scope="module")
def upstream() -> Iterator[UpstreamServer]:
    with UpstreamServer() as server:
        yield server


@pytest.fixture
def start_proxy(upstream: UpstreamServer) -> Iterator[Callable[..., RunningProxy]]:
    started: list[RunningProxy] = []

    def start(cache: str, **overrides: Any) -> RunningProxy:
        settings = ProxySettings(upstream=upstream.base_url, cache=cache, port=0, **overrides)
        proxy = RunningProxy(settings)
        started.append(proxy)
        return proxy

    yield start
    for proxy in started:
        proxy.stop()


@pytest.fixture
def proxy(server, start_proxy) -> RunningProxy:  # type: ignore[no-untyped-def]
    return start_proxy(server.target)


def ask(client: openai.OpenAI, text: str, **params: Any) -> tuple[Any, httpx.Headers]:
    """One chat completion through the proxy: (the completion, the response headers)."""
    params.setdefault("model", "fake-model")
    params.setdefault("temperature", 0)
    messages = params.pop("messages", [{"role": "user", "content": text}])
    raw = client.chat.completions.with_raw_response.create(messages=messages, **params)
    return raw.parse(), raw.headers


def test_a_paraphrase_of_a_stored_question_is_answered_from_the_cache(
        proxy: RunningProxy, upstream: UpstreamServer) -> None:
    client = proxy.openai()
    before = len(upstream.requests)
    first, headers = ask(client, QUESTION)
    assert headers["x-stratacache"] == "miss"
    assert first.choices[0].message.content == answer_for(upstream.requests[-1])
    assert first.usage.completion_tokens > 0  # the upstream's own usage, unchanged
    proxy.wait_stored(1)

    second, headers = ask(client, PARAPHRASE)
    assert len(upstream.requests) == before + 1  # the model was not called again
    assert headers["x-stratacache"] == "hit"
    assert headers["x-stratacache-tier"] in ("hot", "warm", "cold")
    assert 0.95 <= float(headers["x-stratacache-similarity"]) <= 1.0
    assert len(headers["x-stratacache-entry-id"]) == 32
    assert second.choices[0].message.content == first.choices[0].message.content
    assert second.choices[0].finish_reason == "stop"
    assert second.object == "chat.completion" and second.id.startswith("chatcmpl-")
    assert second.id != first.id and second.created >= first.created
    assert second.model == "fake-model"
    assert (second.usage.prompt_tokens, second.usage.completion_tokens) == (0, 0)


def test_each_hit_saves_the_upstreams_usage(proxy: RunningProxy, server) -> None:  # type: ignore[no-untyped-def]
    client = proxy.openai()
    first, _ = ask(client, QUESTION)
    proxy.wait_stored(1)
    for _ in range(2):
        assert ask(client, PARAPHRASE)[1]["x-stratacache"] == "hit"
    ns = server.client().stats()["namespaces"]["default"]
    assert (ns["saved_prompt_tokens"], ns["saved_completion_tokens"]) == (
        2 * first.usage.prompt_tokens, 2 * first.usage.completion_tokens)
    assert ns["saved_model_seconds"] > 0  # the upstream's latency as the proxy measured it


@pytest.mark.parametrize("variant", [
    {"model": "other-model"},
    {"messages": [{"role": "system", "content": "Answer in French."},
                  {"role": "user", "content": QUESTION}]},
    {"messages": [{"role": "user", "content": "I use the mobile app."},
                  {"role": "assistant", "content": "Noted."},
                  {"role": "user", "content": QUESTION}]},
    {"temperature": 0, "max_tokens": 5},
    {"response_format": {"type": "json_object"}},
], ids=["model", "system-prompt", "earlier-turn", "sampling", "response-format"])
def test_a_request_differing_in_what_changes_the_answer_misses(
        proxy: RunningProxy, upstream: UpstreamServer, variant: dict[str, Any]) -> None:
    client = proxy.openai()
    ask(client, QUESTION)
    proxy.wait_stored(1)
    before = len(upstream.requests)
    answer, headers = ask(client, QUESTION, **variant)
    assert headers["x-stratacache"] == "miss"
    assert len(upstream.requests) == before + 1
    assert answer.choices[0].message.content == answer_for(upstream.requests[-1])


def test_each_upstream_credential_has_its_own_cache_unless_shared(
        server, start_proxy, upstream: UpstreamServer) -> None:  # type: ignore[no-untyped-def]
    proxy = start_proxy(server.target)
    ask(proxy.openai(api_key="sk-alice"), QUESTION)
    proxy.wait_stored(1)
    assert upstream.headers[-1]["authorization"] == "Bearer sk-alice"  # passed through
    _, headers = ask(proxy.openai(api_key="sk-bob"), QUESTION)
    assert headers["x-stratacache"] == "miss"
    assert upstream.headers[-1]["authorization"] == "Bearer sk-bob"

    shared = start_proxy(server.target, share_across_keys=True, namespace="shared")
    ask(shared.openai(api_key="sk-alice"), QUESTION)
    shared.wait_stored(1)
    _, headers = ask(shared.openai(api_key="sk-bob"), QUESTION)
    assert headers["x-stratacache"] == "hit"


def test_a_provider_key_replaces_the_callers_and_callers_need_the_proxys_key(
        server, start_proxy, upstream: UpstreamServer, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("TEST_PROVIDER_KEY", "sk-provider")
    monkeypatch.setenv("TEST_PROXY_KEY", "proxy-secret")
    proxy = start_proxy(server.target, upstream_key_env="TEST_PROVIDER_KEY",
                        api_key_env="TEST_PROXY_KEY")
    with pytest.raises(openai.AuthenticationError, match="bearer token"):
        ask(proxy.openai(api_key="wrong"), QUESTION)
    _, headers = ask(proxy.openai(api_key="proxy-secret"), QUESTION)
    assert headers["x-stratacache"] == "miss"
    assert upstream.headers[-1]["authorization"] == "Bearer sk-provider"


def test_a_streamed_miss_is_passed_through_and_its_whole_answer_stored(
        proxy: RunningProxy, upstream: UpstreamServer) -> None:
    client = proxy.openai()
    with client.chat.completions.with_streaming_response.create(
            model="fake-model", temperature=0, stream=True,
            messages=[{"role": "user", "content": QUESTION}]) as response:
        assert response.headers["x-stratacache"] == "miss"
        chunks = list(response.parse())
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == answer_for(upstream.requests[-1])
    assert upstream.requests[-1]["stream_options"] == {"include_usage": True}
    assert all(c.choices for c in chunks)  # the usage chunk it asked for is not passed on
    assert chunks[-1].choices[0].finish_reason == "stop"
    proxy.wait_stored(1)

    # the stored answer is the assembled one: a non-streamed hit returns it whole
    hit, headers = ask(client, PARAPHRASE)
    assert headers["x-stratacache"] == "hit"
    assert hit.choices[0].message.content == text


def test_a_hit_is_replayed_as_a_valid_event_stream(proxy: RunningProxy,
                                                  upstream: UpstreamServer) -> None:
    client = proxy.openai()
    first, _ = ask(client, QUESTION)
    proxy.wait_stored(1)
    before = len(upstream.requests)
    stream = client.chat.completions.create(
        model="fake-model", temperature=0, stream=True, stream_options={"include_usage": True},
        messages=[{"role": "user", "content": PARAPHRASE}])
    chunks = list(stream)
    assert len(upstream.requests) == before
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == \
        first.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens == 0

    raw = httpx.post(proxy.base_url + "/chat/completions", headers={
        "authorization": "Bearer sk-caller"}, json={
        "model": "fake-model", "temperature": 0, "stream": True,
        "messages": [{"role": "user", "content": QUESTION}]})
    assert raw.headers["x-stratacache"] == "hit"
    assert raw.headers["content-type"].startswith("text/event-stream")
    events = raw.text.split("\n\n")
    assert events[-2] == "data: [DONE]" and events[-1] == ""
    assert all(e.startswith("data: ") for e in events[:-1])


def test_a_broken_upstream_stream_breaks_the_callers_and_is_not_stored(
        proxy: RunningProxy, upstream: UpstreamServer) -> None:
    client = proxy.openai(default_headers={"x-fake-break-after": "2"})
    received = []
    with pytest.raises(openai.APIConnectionError):
        for chunk in client.chat.completions.create(
                model="fake-model", temperature=0, stream=True,
                messages=[{"role": "user", "content": QUESTION}]):
            received.append(chunk)
    assert received and not any(c.choices[0].finish_reason for c in received if c.choices)
    _wait_for(lambda: proxy.count("stratacache_proxy_upstream_responses", status="broken") == 1,
              "the broken stream to be counted")
    assert not proxy.proxy._stores and proxy.count("stratacache_proxy_stores", outcome="stored") == 0
    before = len(upstream.requests)
    _, headers = ask(proxy.openai(), QUESTION)
    assert headers["x-stratacache"] == "miss"  # the partial answer was never stored
    assert len(upstream.requests) == before + 1


@pytest.mark.parametrize("status, error", [(429, openai.RateLimitError),
                                           (500, openai.InternalServerError),
                                           (400, openai.BadRequestError)])
def test_upstream_errors_reach_the_caller_unchanged_and_are_not_cached(
        proxy: RunningProxy, upstream: UpstreamServer, status: int,
        error: type[openai.APIStatusError]) -> None:
    failing = proxy.openai(default_headers={"x-fake-status": str(status)})
    with pytest.raises(error) as caught:
        ask(failing, QUESTION)
    assert caught.value.status_code == status
    assert f"fake upstream error {status}" in caught.value.message
    with pytest.raises(error):
        ask(failing, QUESTION, stream=True)
    before = len(upstream.requests)
    _, headers = ask(proxy.openai(), QUESTION)
    assert headers["x-stratacache"] == "miss" and len(upstream.requests) == before + 1
    proxy.wait_stored(1)
    assert proxy.count("stratacache_proxy_stores", outcome="stored") == 1  # the last one only


def test_an_upstream_that_does_not_answer_in_time_is_a_504(server, start_proxy) -> None:  # type: ignore[no-untyped-def]
    proxy = start_proxy(server.target, upstream_read_timeout_s=0.2)
    with pytest.raises(openai.APIStatusError) as caught:
        ask(proxy.openai(default_headers={"x-fake-delay-s": "30"}), QUESTION)
    assert caught.value.status_code == 504
    assert "did not answer in time" in caught.value.message
    assert proxy.count("stratacache_proxy_upstream_responses", status="timeout") == 1


@pytest.mark.parametrize("headers, params, reason", [
    ({"x-stratacache-bypass": "1"}, {}, "x-stratacache-bypass header"),
    ({"cache-control": "no-store"}, {}, "Cache-Control: no-store"),
    ({}, {"temperature": 0.7}, "temperature 0.7 above 0.0"),
    ({}, {"temperature": None}, "temperature 1.0 above 0.0"),
    ({}, {"n": 2}, "n > 1"),
], ids=["bypass-header", "no-store", "temperature", "default-temperature", "n"])
def test_requests_that_must_not_be_cached_are_forwarded_untouched(
        proxy: RunningProxy, upstream: UpstreamServer, headers: dict[str, str],
        params: dict[str, Any], reason: str) -> None:
    client = proxy.openai(default_headers=headers)
    sent = {k: v for k, v in params.items() if v is not None}
    if "temperature" in params and params["temperature"] is None:
        raw = client.chat.completions.with_raw_response.create(
            model="fake-model", messages=[{"role": "user", "content": QUESTION}])
    else:
        raw = client.chat.completions.with_raw_response.create(
            model="fake-model", messages=[{"role": "user", "content": QUESTION}],
            **({"temperature": 0} | sent))
    assert raw.headers["x-stratacache"] == "bypass"
    assert raw.headers["x-stratacache-bypass-reason"] == reason
    assert raw.parse().choices[0].message.content == answer_for(upstream.requests[-1])
    for _ in range(2):  # a cached copy would be served by now
        again = client.chat.completions.with_raw_response.create(
            model="fake-model", messages=[{"role": "user", "content": QUESTION}],
            **({} if params.get("temperature", 0) is None else {"temperature": 0} | sent))
        assert again.headers["x-stratacache"] == "bypass"
    assert proxy.count("stratacache_proxy_stores", outcome="stored") == 0


def test_a_namespace_may_allow_a_temperature(server, start_proxy) -> None:  # type: ignore[no-untyped-def]
    proxy = start_proxy(server.target, namespace_max_temperature={"creative": 0.8})
    client = proxy.openai(default_headers={"x-stratacache-namespace": "creative"})
    _, headers = ask(client, QUESTION, temperature=0.7)
    assert headers["x-stratacache"] == "miss"
    proxy.wait_stored(1)
    _, headers = ask(client, QUESTION, temperature=0.7)
    assert headers["x-stratacache"] == "hit"
    # the same request in another namespace is neither cached nor served from "creative"
    _, headers = ask(proxy.openai(), QUESTION, temperature=0.7)
    assert headers["x-stratacache"] == "bypass"


def test_tool_calls_in_flight_are_not_cached(proxy: RunningProxy) -> None:
    messages = [{"role": "user", "content": "What is the weather in Paris?"},
                {"role": "assistant", "content": None, "tool_calls": [{
                    "id": "call_1", "type": "function",
                    "function": {"name": "weather", "arguments": '{"city": "Paris"}'}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "18 C, sunny"},
                {"role": "user", "content": "And in London?"}]
    _, headers = ask(proxy.openai(), "", messages=messages)
    assert headers["x-stratacache"] == "bypass"
    assert headers["x-stratacache-bypass-reason"] == "tool calls in flight"


def test_namespaces_are_kept_apart(proxy: RunningProxy) -> None:
    ask(proxy.openai(default_headers={"x-stratacache-namespace": "team-a"}), QUESTION)
    proxy.wait_stored(1)
    _, headers = ask(proxy.openai(default_headers={"x-stratacache-namespace": "team-b"}),
                     QUESTION)
    assert headers["x-stratacache"] == "miss"
    with pytest.raises(openai.BadRequestError, match="x-stratacache-namespace"):
        ask(proxy.openai(default_headers={"x-stratacache-namespace": "no spaces"}), QUESTION)


def test_the_proxy_fails_open_when_the_cache_is_down(start_server, start_proxy,
                                                     upstream: UpstreamServer) -> None:  # type: ignore[no-untyped-def]
    server = start_server()
    proxy = start_proxy(server.target)
    client = proxy.openai()
    ask(client, QUESTION)
    proxy.wait_stored(1)
    server.stop()

    before = len(upstream.requests)
    answer, headers = ask(client, QUESTION)
    assert headers["x-stratacache"] == "error"
    assert answer.choices[0].message.content == answer_for(upstream.requests[-1])
    assert len(upstream.requests) == before + 1
    stream = client.chat.completions.create(
        model="fake-model", temperature=0, stream=True,
        messages=[{"role": "user", "content": PARAPHRASE}])
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert proxy.count("stratacache_proxy_requests", result="fail_open", stream="false") == 1
    assert proxy.count("stratacache_proxy_cache_errors", call="lookup",
                       error="UnavailableError") >= 2
    _wait_for(lambda: proxy.count("stratacache_proxy_stores", outcome="failed") >= 1,
              "the failed store to be counted")
    health = httpx.get(proxy.base_url.removesuffix("/v1") + "/healthz").json()
    assert health["status"] == "SERVING" and health["cache"].startswith("UNREACHABLE")


def test_other_api_paths_health_and_metrics(proxy: RunningProxy) -> None:
    models = proxy.openai().models.list()
    assert [m.id for m in models.data] == ["fake-model"]
    root = proxy.base_url.removesuffix("/v1")
    health = httpx.get(root + "/healthz").json()
    assert health == {"status": "SERVING", "cache": "SERVING",
                      "upstream": proxy.proxy.upstream.base_url}
    ask(proxy.openai(), QUESTION)
    page = httpx.get(root + "/metrics").text
    assert 'stratacache_proxy_requests_total{result="miss",stream="false"} 1.0' in page


def test_a_body_over_the_limit_is_refused_with_413(server, start_proxy) -> None:  # type: ignore[no-untyped-def]
    proxy = start_proxy(server.target, max_body_bytes=1024)
    with pytest.raises(openai.APIStatusError) as caught:
        ask(proxy.openai(), "x" * 2000)
    assert caught.value.status_code == 413 and "--max-body-mib" in caught.value.message


def test_race_mode_serves_a_hit_without_waiting_for_the_upstream(
        server, start_proxy, upstream: UpstreamServer) -> None:  # type: ignore[no-untyped-def]
    proxy = start_proxy(server.target, race_upstream=True)
    first, headers = ask(proxy.openai(), QUESTION)
    assert headers["x-stratacache"] == "miss"
    assert first.choices[0].message.content == answer_for(upstream.requests[-1])
    proxy.wait_stored(1)
    # the upstream would hold this request for an hour: only a cancelled race returns
    slow = proxy.openai(default_headers={"x-fake-delay-s": "3600"}, timeout=120)
    hit, headers = ask(slow, PARAPHRASE)
    assert headers["x-stratacache"] == "hit"
    assert hit.choices[0].message.content == first.choices[0].message.content
    stream = slow.chat.completions.create(model="fake-model", temperature=0, stream=True,
                                          messages=[{"role": "user", "content": PARAPHRASE}])
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == \
        first.choices[0].message.content


def test_the_wait_store_header_answers_once_the_answer_is_stored(
        proxy: RunningProxy) -> None:
    client = proxy.openai(default_headers={"x-stratacache-wait-store": "1"})
    ask(client, QUESTION)
    assert ask(client, PARAPHRASE)[1]["x-stratacache"] == "hit"  # no wait in between
    stream = client.chat.completions.create(model="fake-model", temperature=0, stream=True,
                                            messages=[{"role": "user", "content": OTHER}])
    assert list(stream)
    assert ask(client, OTHER)[1]["x-stratacache"] == "hit"


def test_the_example_runs_against_the_proxy_command_which_stops_gracefully(
        server, upstream: UpstreamServer, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """`stratacache proxy` as a process, the README's OpenAI SDK example through it, and a
    SIGTERM while a request is in flight: the request completes, the process exits 0."""
    with ProxyProcess(tmp_path / "proxy.log", "--upstream", upstream.base_url,
                      "--cache", server.target) as proxy:
        env = {**os.environ, "OPENAI_BASE_URL": proxy.base_url, "OPENAI_API_KEY": "sk-example",
               "EXAMPLE_MODEL": "fake-model"}
        example = Path(__file__).parent.parent / "examples" / "openai_sdk.py"
        run = subprocess.run([sys.executable, str(example)], env=env, capture_output=True,
                             text=True, timeout=120)
        assert run.returncode == 0, run.stderr
        lines = run.stdout.splitlines()
        assert lines[0].startswith("miss 'How do I reset my password?'")
        assert lines[1].startswith(" hit 'How can I reset my password?'")
        assert lines[0].split(" -> ")[1] == lines[1].split(" -> ")[1]
        assert lines[2].startswith("streamed: answer ")

    with UpstreamServer() as held, ProxyProcess(tmp_path / "proxy2.log", "--upstream",
                                                 held.base_url, "--cache", server.target) as proxy:
        client = openai.OpenAI(base_url=proxy.base_url, api_key="sk-example", max_retries=0,
                               default_headers={"x-fake-hold": "1"}, timeout=120)
        replies: list[Any] = []
        caller = threading.Thread(target=lambda: replies.append(ask(client, OTHER)), daemon=True)
        caller.start()
        _wait_for(lambda: len(held.requests) == 1, "the request to reach the upstream")
        proxy.process.send_signal(signal.SIGTERM)
        _wait_for(lambda: "Shutting down" in proxy.log.read_text(), "the proxy to begin its shutdown")
        held.release()
        caller.join(120)
        assert replies and replies[0][0].choices[0].message.content == answer_for(held.requests[0])
        assert proxy.process.wait(120) == 0


def test_readme_documents_every_proxy_flag() -> None:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    for name, *_ in command._FLAGS:
        assert f"| `--{name.replace('_', '-')}` | `{command.ENV_PREFIX}{name.upper()}` |" in readme


@pytest.mark.parametrize("flags, message", [
    ([], "--upstream is required"),
    (["--upstream", "api.openai.com"], "must be an http:// or https:// URL"),
    (["--upstream", "http://x/v1", "--api-key-env", "K"], "--api-key-env needs --upstream-key-env"),
    (["--upstream", "http://x/v1", "--upstream-key-env", "K", "--host", "0.0.0.0"],
     "would let anyone who reaches the port spend the provider key"),
])
def test_proxy_flags_that_cannot_work_are_refused_with_a_reason(
        flags: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["proxy", *flags]) == 2
    assert message in capsys.readouterr().err


def test_a_provider_key_variable_that_is_unset_is_refused_at_start(
        server, upstream: UpstreamServer, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    env_free = {k: v for k, v in os.environ.items() if k != "UNSET_PROVIDER_KEY"}
    run = subprocess.run([sys.executable, "-m", "stratacache.cli", "proxy", "--port", "0",
                          "--upstream", upstream.base_url, "--cache", server.target,
                          "--upstream-key-env", "UNSET_PROVIDER_KEY"],
                         env=env_free, capture_output=True, text=True, timeout=120)
    assert run.returncode != 0
    assert "UNSET_PROVIDER_KEY is unset or empty" in run.stderr
