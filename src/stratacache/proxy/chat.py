"""What of a chat-completions request is looked up, and what must match exactly: its scope.

The text looked up is the last user message. Everything else that can change the answer is
part of the scope, matched exactly, each part as a digest (a system prompt can be long; a
digest keeps every scope value small and the server's logs free of it):

- ``model``: the model name, as sent;
- ``sampling``: temperature, top_p, max_tokens, stop, seed, penalties, logit_bias, ...;
- ``format``: tools, tool_choice, response_format and the other output-shape fields;
- ``system``: the system and developer messages;
- ``history``: every other message before the last user message (earlier turns);
- ``other``: any field this module does not know. An unknown field is assumed to change the
  answer: a new API parameter can cost hits, never serve a wrong answer.
- ``tenant``: a digest of the caller's upstream credential, unless the proxy shares one cache
  across credentials (``--share-across-keys``): a hit is only served to a caller whose key
  the upstream once accepted for the same question.

Requests whose answer must not be replayed are not cached (:class:`Bypass`, with the reason):
``n`` > 1, a temperature the namespace does not allow, tool calls in flight, content that is
not text, and a conversation that does not end with a user message.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

#: Fields that never change the answer: they are left out of the scope.
#: ``n`` is here because only n = 1 is cached at all.
_NEUTRAL = frozenset({"messages", "stream", "stream_options", "user", "metadata", "store",
                      "service_tier", "safety_identifier", "prompt_cache_key", "n"})
_SAMPLING = frozenset({"temperature", "top_p", "max_tokens", "max_completion_tokens", "stop",
                       "seed", "presence_penalty", "frequency_penalty", "logit_bias", "logprobs",
                       "top_logprobs", "reasoning_effort", "verbosity"})
_FORMAT = frozenset({"tools", "tool_choice", "parallel_tool_calls", "functions",
                     "function_call", "response_format", "modalities", "audio", "prediction",
                     "web_search_options"})
_SYSTEM_ROLES = frozenset({"system", "developer"})
#: The temperature the OpenAI API samples at when a request does not set one.
DEFAULT_TEMPERATURE = 1.0


@dataclass(frozen=True)
class CacheKey:
    """What a cacheable request is looked up and stored under.

    Attributes:
        prompt: the last user message's text.
        scope: the exact-match labels (see the module docstring).
        model: the requested model, for the cost accounting.
    """

    prompt: str
    scope: dict[str, str]
    model: str


@dataclass(frozen=True)
class Bypass:
    """A request forwarded untouched; ``reason`` goes to the ``x-stratacache-bypass`` header."""

    reason: str


def digest(value: Any) -> str:
    """A short, stable digest of any JSON value (keys sorted, so field order never matters)."""
    text = json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def cache_key(body: Mapping[str, Any], *, max_temperature: float,
              credential: str | None) -> CacheKey | Bypass:
    """The cache key of a chat-completions request, or why it must not be cached.

    Args:
        body: the request's JSON object (already checked to be an object).
        max_temperature: the highest temperature whose answers this namespace caches.
        credential: the caller's upstream credential, folded into the scope; None when the
            proxy shares one cache across credentials.

    Returns:
        A :class:`CacheKey`, or a :class:`Bypass` naming the reason.
    """
    model = body.get("model")
    messages = body.get("messages")
    if not isinstance(model, str) or not model:
        return Bypass("no model")
    if not isinstance(messages, list) or not messages:
        return Bypass("no messages")
    n = body.get("n", 1)
    if n not in (None, 1):
        return Bypass("n > 1")
    temperature = body.get("temperature", DEFAULT_TEMPERATURE)
    if temperature is None:
        temperature = DEFAULT_TEMPERATURE
    if not isinstance(temperature, (int, float)) or temperature > max_temperature:
        return Bypass(f"temperature {temperature} above {max_temperature}")
    last = messages[-1]
    if not isinstance(last, dict) or last.get("role") != "user":
        return Bypass("the conversation does not end with a user message")
    if any(isinstance(m, dict) and (m.get("role") in ("tool", "function") or m.get("tool_calls")
                                    or m.get("function_call")) for m in messages):
        return Bypass("tool calls in flight")
    prompt = _text(last.get("content"))
    if not prompt:
        return Bypass("the last user message is not text")
    earlier = messages[:-1]
    scope = {
        "api": "openai.chat.v1",
        "model": model,
        "sampling": digest({k: body[k] for k in _SAMPLING if k in body} | {"temperature": temperature}),
        "format": digest({k: body[k] for k in _FORMAT if k in body}),
        "system": digest([m for m in earlier if _role(m) in _SYSTEM_ROLES]),
        "history": digest([m for m in earlier if _role(m) not in _SYSTEM_ROLES]),
        "other": digest({k: v for k, v in body.items()
                         if k not in _NEUTRAL and k not in _SAMPLING and k not in _FORMAT
                         and k != "model"}),
    }
    # The user message's own fields other than its text (a name, say) change the answer too.
    scope["message"] = digest({k: v for k, v in last.items() if k not in ("role", "content")})
    if credential is not None:
        scope["tenant"] = digest(credential)
    return CacheKey(prompt=prompt, scope=scope, model=model)


def _role(message: Any) -> Any:
    return message.get("role") if isinstance(message, dict) else None


def _text(content: Any) -> str | None:
    """A message's text: a string, or a list of text parts joined; None for anything else
    (an image, audio or file part: its answer depends on more than the text)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and content:
        parts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text"
                    and isinstance(part.get("text"), str)):
                return None
            parts.append(part["text"])
        return "\n".join(parts)
    return None
