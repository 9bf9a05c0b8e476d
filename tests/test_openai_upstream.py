"""The fake OpenAI upstream (tests/openai_upstream.py) behaves as the proxy contract says, seen
through the official `openai` client."""

from __future__ import annotations

from collections.abc import Iterator

import openai
import pytest

from tests.openai_upstream import MODEL, UpstreamServer, answer_for

MESSAGES = [{"role": "system", "content": "be brief"},
            {"role": "user", "content": "what is two plus two"}]


def _client(upstream: UpstreamServer, api_key: str = "sk-test-123") -> openai.OpenAI:
    # No retries: a retried 429/500 would wait out openai's backoff. The timeout is a safety net.
    return openai.OpenAI(base_url=upstream.base_url, api_key=api_key, max_retries=0, timeout=30.0)


@pytest.fixture(scope="module")
def upstream() -> Iterator[UpstreamServer]:
    with UpstreamServer() as server:
        yield server


@pytest.fixture
def client(upstream: UpstreamServer) -> Iterator[openai.OpenAI]:
    with _client(upstream) as c:
        yield c


def test_completion_is_deterministic_with_word_usage(client: openai.OpenAI,
                                                     upstream: UpstreamServer) -> None:
    first = client.chat.completions.create(model=MODEL, messages=MESSAGES)
    again = client.chat.completions.create(model=MODEL, messages=MESSAGES)
    warmer = client.chat.completions.create(model=MODEL, messages=MESSAGES, temperature=0.7)

    answer = first.choices[0].message.content
    assert answer == answer_for(upstream.requests[-3])
    assert answer.startswith("answer ") and answer.endswith(": what is two plus two")
    assert again.choices[0].message.content == answer
    assert warmer.choices[0].message.content != answer  # the digest covers every parameter
    usage = first.usage
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (7, 7, 14)
    assert first.id.startswith("chatcmpl-") and first.model == MODEL
    assert first.choices[0].finish_reason == "stop"
    assert upstream.headers[-1]["authorization"] == "Bearer sk-test-123"  # recorded, not checked
    assert [m.id for m in client.models.list()] == [MODEL]


def test_stream_assembles_to_the_non_stream_answer(client: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "  spaced\tout\n words  "}]
    plain = client.chat.completions.create(model=MODEL, messages=messages)
    with client.chat.completions.create(model=MODEL, messages=messages, stream=True,
                                        stream_options={"include_usage": True}) as stream:
        *chunks, usage_chunk = list(stream)

    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == plain.choices[0].message.content
    words = [c for c in chunks if c.choices[0].delta.content]
    assert len(words) == plain.usage.completion_tokens  # one chunk per word
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert usage_chunk.choices == [] and usage_chunk.usage == plain.usage


@pytest.mark.parametrize(("status", "error"),
                         [(429, openai.RateLimitError), (500, openai.InternalServerError)])
def test_fake_status_is_an_openai_error(client: openai.OpenAI, upstream: UpstreamServer,
                                        status: int, error: type[openai.APIStatusError]) -> None:
    with pytest.raises(error) as raised:
        client.chat.completions.create(model=MODEL, messages=MESSAGES,
                                       extra_headers={"x-fake-status": str(status)})
    assert raised.value.status_code == status
    assert "x-fake-status" in raised.value.message
    assert upstream.requests[-1]["messages"] == MESSAGES  # failed requests are recorded too


def test_break_after_drops_the_stream_as_a_connection_error(client: openai.OpenAI,
                                                           upstream: UpstreamServer) -> None:
    received: list[str | None] = []
    stream = client.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True,
                                            extra_headers={"x-fake-break-after": "2"})
    # openai 3.x wraps httpx2's "incomplete chunked read" in APIConnectionError; the chunks sent
    # before the drop still arrive, and none of them finishes.
    with stream, pytest.raises(openai.APIConnectionError) as raised:
        for chunk in stream:
            assert chunk.choices[0].finish_reason is None
            received.append(chunk.choices[0].delta.content)
    assert "incomplete chunked read" in str(raised.value.__cause__)
    digest = answer_for(upstream.requests[-1]).split()[1]
    assert received == ["", "answer ", digest + " "]  # the role chunk, then two words


def test_close_is_clean_with_a_stream_in_progress() -> None:
    # Delays this long would hold up close for an hour if it did not cut them short.
    with UpstreamServer(chunk_delay_s=3600.0) as server, _client(server) as client:
        stream = client.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True)
        assert next(stream).choices[0].delta.role == "assistant"
        server.close()  # returns once uvicorn's thread has ended
        rest = list(stream)  # the stream finishes instead of being cut off
    assert "".join(c.choices[0].delta.content or "" for c in rest) == answer_for(server.requests[0])
    assert rest[-1].choices[0].finish_reason == "stop"
