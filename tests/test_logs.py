"""Request ids, the access log and the text/JSON log formats (stratacache.logs), unit-level: the
server wiring is tested end to end where the service calls it."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
import sys
from collections.abc import Callable, Iterator
from datetime import datetime, timezone

import pytest

from stratacache import logs
from stratacache.logs import FIELD_MAX_CHARS, RequestLog, configure, current_request_id

SECRET_PROMPT = "my card number is 4111 1111 1111 1111"
SECRET_RESPONSE = "noted: 4111 1111 1111 1111"
_GENERATED = re.compile(r"[0-9a-f]{32}")
Logged = Callable[..., io.StringIO]


@pytest.fixture
def logged() -> Iterator[Logged]:
    """``logged(fmt, level="info")`` configures the root logger into a buffer and returns it; the
    root's handlers and level (pytest's capture) are put back after the test."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level

    def setup(fmt: str, level: str = "info") -> io.StringIO:
        buffer = io.StringIO()
        configure(level, fmt, stream=buffer)
        return buffer

    yield setup
    for handler in root.handlers[:]:
        root.removeHandler(handler)
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(level)
    logging.getLogger(logs.ACCESS_LOGGER).setLevel(logging.NOTSET)


def _json_lines(buffer: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in buffer.getvalue().splitlines()]


def _access(lines: list[dict]) -> list[dict]:
    return [line for line in lines if line["logger"] == logs.ACCESS_LOGGER]


def test_json_lines_carry_the_request_id_of_the_call(logged: Logged) -> None:
    buffer = logged("json")
    logging.getLogger("stratacache.test").info("before the call")
    call = RequestLog(log_prompts=False).begin("Lookup", [("x-request-id", "req-42")])
    logging.getLogger("stratacache.engine").warning("during the call: %d", 7)
    call.note(namespace="docs", outcome="exact", tier="exact", similarity=1.0)
    call.finish("OK")
    logging.getLogger("stratacache.test").info("after the call")

    before, during, access, after = _json_lines(buffer)
    assert during == {"ts": during["ts"], "level": "WARNING", "logger": "stratacache.engine",
                      "message": "during the call: 7", "request_id": "req-42"}
    stamp = datetime.fromisoformat(during["ts"])
    assert stamp.tzinfo == timezone.utc and during["ts"].endswith("Z")
    assert "request_id" not in before and "request_id" not in after
    assert access["request_id"] == "req-42" and access["level"] == "INFO"
    assert current_request_id() is None


def test_the_access_line_has_the_call_fields_and_no_prompt_text(logged: Logged) -> None:
    buffer = logged("json")
    logs.note(namespace="outside any call")  # nothing to note on: ignored
    call = RequestLog(log_prompts=False).begin("Lookup", ())
    call.note(namespace="docs", prompt=SECRET_PROMPT)
    # what a servicer does, with no handle on the call: notes on the current one
    logs.note(outcome="hot", tier="hot", similarity=0.912345, response=SECRET_RESPONSE)
    call.finish("OK")

    (access,) = _access(_json_lines(buffer))
    assert {k: access[k] for k in ("method", "namespace", "outcome", "tier", "similarity",
                                   "status")} == {
        "method": "Lookup", "namespace": "docs", "outcome": "hot", "tier": "hot",
        "similarity": 0.9123, "status": "OK"}
    assert isinstance(access["latency_ms"], float) and access["latency_ms"] >= 0
    assert _GENERATED.fullmatch(access["request_id"])
    assert access["message"].startswith("Lookup OK ")
    assert "4111" not in buffer.getvalue()
    assert "prompt" not in access and "response" not in access


def test_log_prompts_writes_them_clipped(logged: Logged) -> None:
    buffer = logged("json")
    call = RequestLog(log_prompts=True).begin("Store", ())
    call.note(namespace="docs", prompt=SECRET_PROMPT, response="x" * 5000)
    call.finish("OK")

    (access,) = _access(_json_lines(buffer))
    assert access["prompt"] == SECRET_PROMPT
    assert len(access["response"]) == FIELD_MAX_CHARS and access["response"].endswith("…")


def test_a_given_request_id_is_kept_an_invalid_one_replaced() -> None:
    requests = RequestLog(log_prompts=False)

    def id_for(metadata: list) -> str:
        call = requests.begin("Lookup", metadata)
        call.finish("OK")
        return call.request_id

    assert id_for([("authorization", "Bearer k"), ("x-request-id", "abc-DEF_1.2:3")]) == \
        "abc-DEF_1.2:3"
    assert id_for([("x-request-id", b"from-bytes")]) == "from-bytes"
    assert id_for([("x-request-id", "r" * logs.REQUEST_ID_MAX_CHARS)]) == \
        "r" * logs.REQUEST_ID_MAX_CHARS
    for invalid in ("", "has space", "line\nbreak", "tab\t", "caf\u00e9", "\x7f",
                    "r" * (logs.REQUEST_ID_MAX_CHARS + 1)):
        assert _GENERATED.fullmatch(id_for([("x-request-id", invalid)])), invalid
    generated = {id_for([]) for _ in range(3)} | {id_for(None)}  # type: ignore[arg-type]
    assert len(generated) == 4 and all(_GENERATED.fullmatch(i) for i in generated)


def test_text_lines_append_the_fields_and_request_id_on_one_line(logged: Logged) -> None:
    buffer = logged("text")
    call = RequestLog(log_prompts=True).begin("Lookup", [("x-request-id", "abc")])
    logging.getLogger("stratacache.engine").info("inside")
    # A namespace that failed validation may hold anything: it must not forge a second line.
    call.note(namespace="evil\n2024-01-01 INFO forged", outcome="miss_no_candidate",
              prompt='say "hi"')
    call.finish("INVALID_ARGUMENT")

    inside, access = buffer.getvalue().splitlines()
    assert inside.endswith("INFO stratacache.engine: inside [req=abc]")
    assert re.search(r" INFO stratacache\.access: Lookup INVALID_ARGUMENT \d+\.\d{3} ms "
                     r'namespace="evil\\n2024-01-01 INFO forged" outcome=miss_no_candidate '
                     r'prompt="say \\"hi\\"" \[req=abc\]$', access), access


def test_json_lines_carry_exception_text(logged: Logged) -> None:
    buffer = logged("json")
    try:
        1 / 0
    except ZeroDivisionError:
        logging.getLogger("stratacache.service").exception("Lookup failed unexpectedly")
    (line,) = _json_lines(buffer)
    assert line["message"] == "Lookup failed unexpectedly" and line["level"] == "ERROR"
    assert line["exception"].startswith("Traceback") and "ZeroDivisionError" in line["exception"]


def test_concurrent_calls_keep_their_own_ids(logged: Logged) -> None:
    buffer = logged("json")
    requests = RequestLog(log_prompts=False)

    async def call(name: str, mine: asyncio.Event, other: asyncio.Event) -> None:
        c = requests.begin("Lookup", [("x-request-id", name)])
        mine.set()
        await other.wait()  # both calls are open now, in two tasks
        logging.getLogger("stratacache.engine").info(name)
        c.finish("OK")

    async def both() -> None:
        a, b = asyncio.Event(), asyncio.Event()
        await asyncio.gather(call("first", a, b), call("second", b, a))

    asyncio.run(both())
    lines = _json_lines(buffer)
    assert sorted((line["message"], line["request_id"]) for line in lines
                  if line["logger"] == "stratacache.engine") == [
        ("first", "first"), ("second", "second")]
    assert len(_access(lines)) == 2


def test_finish_writes_one_line_and_nothing_when_the_access_log_is_off(logged: Logged) -> None:
    buffer = logged("json")
    call = RequestLog(log_prompts=False).begin("Stats", ())
    call.finish("OK")
    call.finish("OK")
    assert len(_access(_json_lines(buffer))) == 1

    logging.getLogger(logs.ACCESS_LOGGER).setLevel(logging.WARNING)
    call = RequestLog(log_prompts=False).begin("Stats", [("x-request-id", "quiet")])
    assert current_request_id() == "quiet"
    call.finish("OK")
    assert current_request_id() is None
    assert len(_access(_json_lines(buffer))) == 1


def test_configure_replaces_its_handler_and_refuses_unknown_settings(logged: Logged) -> None:
    logged("text")
    buffer = logged("json", level="WARNING")
    logging.getLogger("stratacache.test").info("below the level")
    logging.getLogger("stratacache.test").warning("once")
    assert [line["message"] for line in _json_lines(buffer)] == ["once"]
    assert len(logging.getLogger().handlers) == 1

    with pytest.raises(ValueError, match="log level 'loud' is not one of debug, info"):
        configure("loud", "text")
    with pytest.raises(ValueError, match="log format 'xml' is not one of text, json"):
        configure("info", "xml")


# --- through a real server ---------------------------------------------------------------------

def _lookup_with_call(target: str, prompt: str, namespace: str,
                      metadata: tuple[tuple[str, str], ...] = ()) -> tuple[object, dict]:
    """A raw Lookup (the client hides trailing metadata): its reply and trailing metadata."""
    import grpc

    from stratacache.v1 import stratacache_pb2 as pb, stratacache_pb2_grpc as pb_grpc

    with grpc.insecure_channel(target) as channel:
        try:
            reply, call = pb_grpc.SemanticCacheStub(channel).Lookup.with_call(
                pb.LookupRequest(prompt=prompt, namespace=namespace), metadata=metadata,
                timeout=60)
        except grpc.RpcError as error:
            return error, dict(error.trailing_metadata() or ())  # type: ignore[attr-defined]
    return reply, dict(call.trailing_metadata() or ())


def test_a_served_call_has_a_request_id_in_its_reply_and_one_access_line(
        logged: Logged, start_server, namespace: str) -> None:  # type: ignore[no-untyped-def]
    from stratacache.config import RateLimit

    buffer = logged("json")
    server = start_server(rate_limit_namespace_lookup=RateLimit(0.001, 2))
    with server.client() as client:
        client.store("How do I reset my password?", "Use the login page.", namespace=namespace)
    reply, trailing = _lookup_with_call(server.target, "How do I reset my password?", namespace,
                                        (("x-request-id", "gw-7f3a"),))
    assert reply.hit and trailing["x-request-id"] == "gw-7f3a"  # type: ignore[attr-defined]
    # Over the namespace's limit: refused, and the reply still names the call.
    error, trailing = _lookup_with_call(server.target, "What is a kettle?", namespace)
    error, trailing = _lookup_with_call(server.target, "What is a kettle?", namespace)
    assert _GENERATED.fullmatch(trailing["x-request-id"])
    assert int(trailing["retry-after-ms"]) > 0

    lines = [line for line in _access(_json_lines(buffer)) if line.get("namespace") == namespace]
    assert [line["method"] for line in lines] == ["Store", "Lookup", "Lookup", "Lookup"]
    store, hit, _, refused = lines
    assert store["outcome"] == "stored" and store["status"] == "OK"
    assert {k: hit[k] for k in ("request_id", "status", "outcome", "tier", "similarity")} == {
        "request_id": "gw-7f3a", "status": "OK", "outcome": "exact", "tier": "exact",
        "similarity": 1.0}
    assert refused["status"] == "RESOURCE_EXHAUSTED"
    assert refused["request_id"] == trailing["x-request-id"]
    assert "password" not in buffer.getvalue()  # --log-prompts is off


def test_log_prompts_puts_prompt_and_response_in_the_access_line(
        logged: Logged, start_server, namespace: str) -> None:  # type: ignore[no-untyped-def]
    buffer = logged("json")
    server = start_server(log_prompts=True)
    with server.client() as client:
        client.store("How do I reset my password?", "Use the login page.", namespace=namespace)
        assert client.lookup("How do I reset my password?", namespace=namespace).hit
    hit = [line for line in _access(_json_lines(buffer)) if line["method"] == "Lookup"][-1]
    assert (hit["prompt"], hit["response"]) == ("How do I reset my password?",
                                                "Use the login page.")


def test_the_serve_handler_writes_to_the_standard_error_of_the_moment(
        logged: Logged, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    # A stream replaced and closed since set-up (pytest's capture, for one) must not break
    # every later line with "--- Logging error ---".
    first = io.StringIO()
    monkeypatch.setattr(sys, "stderr", first)
    configure("info", "text")
    first.close()
    second = io.StringIO()
    monkeypatch.setattr(sys, "stderr", second)
    logging.getLogger("stratacache.test").info("still written")
    assert "still written" in second.getvalue()
