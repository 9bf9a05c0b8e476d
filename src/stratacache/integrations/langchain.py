"""LangChain's LLM cache on a stratacache server: :class:`StratacacheCache`.

    from langchain_core.globals import set_llm_cache
    from stratacache.integrations.langchain import StratacacheCache

    set_llm_cache(StratacacheCache(target="127.0.0.1:50551"))

This module owns the mapping from LangChain's cache key, ``(prompt, llm_string)``, to a
stratacache Lookup/Store, and the value format:

- A chat model's ``prompt`` is its messages serialized by ``langchain_core.load.dumps``. The text
  looked up and stored is the content of the last human message; everything else that changes
  the answer goes into the scope, which must match exactly: ``{"llm": sha256(llm_string),
  "context": sha256(the other messages and the rest of that human message)}`` (hex digests).
  So another model or sampling parameter (both are in ``llm_string``), another system prompt or
  earlier turn is never served, while a paraphrase of the last question can be.
- Any other ``prompt`` (a plain LLM's) is the text itself, scoped by ``{"llm": ...}`` only.
- A message list without a human message, or with an empty one, is not cached.
- The text is compared by meaning as a whole: when it is mostly a fixed template (a long
  instruction, retrieved documents) around a short question, two different questions can look
  alike. Put fixed parts in a system message, or raise ``min_similarity`` (or the namespace's
  policy) for such prompts.
- The value is the generations serialized by ``langchain_core.load.dumps``; a hit revives only
  generation and AI-message classes (never secrets), so an entry cannot instantiate anything
  else.

The cache fails open: a lookup the server cannot answer is a miss and a store that fails is
dropped, each with one logged warning, so the model is called as if there were no cache.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import re
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

try:
    from langchain_core._api import suppress_langchain_beta_warning
    from langchain_core.caches import RETURN_VAL_TYPE, BaseCache
    from langchain_core.load import dumps, loads
    from langchain_core.messages import AIMessage, AIMessageChunk
    from langchain_core.outputs import (ChatGeneration, ChatGenerationChunk, Generation,
                                        GenerationChunk)
except ImportError as exc:  # pragma: no cover - exercised in a subprocess by the tests
    raise ImportError(
        "stratacache.integrations.langchain needs langchain-core, which is not installed "
        f"({exc}); install it with: pip install 'stratacache[langchain]'") from exc

from ..calibrate import DEFAULT_TARGET
from ..client import AsyncClient, Client, StratacacheError, Timeout

if TYPE_CHECKING:
    from ..tls import PemSource

__all__ = ["StratacacheCache"]

logger = logging.getLogger(__name__)

#: The environment variable the API key is read from when none is passed.
API_KEY_ENV = "STRATACACHE_API_KEY"
#: The only classes a cached value may revive: what a model's generations are made of.
_ALLOWED = [Generation, GenerationChunk, ChatGeneration, ChatGenerationChunk, AIMessage,
            AIMessageChunk]
#: Where LangChain's llm_string names the model, in its serialized form (kwargs) or its
#: repr of sorted invocation parameters ("('model_name', 'gpt-4o')").
_MODEL_KEYS = ("model_name", "model", "model_id")
_MODEL_PARAM = re.compile(r"\('(?:model_name|model|model_id)', '([^']+)'\)")


@dataclass(frozen=True, slots=True)
class _Key:
    """What one (prompt, llm_string) is looked up and stored as."""

    text: str
    scope: dict[str, str]


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _is_message(item: object) -> bool:
    """Whether ``item`` is a message as ``langchain_core.load.dumps`` writes one."""
    return (isinstance(item, dict) and item.get("lc") == 1 and item.get("type") == "constructor"
            and isinstance(item.get("kwargs"), dict)
            and isinstance(item["kwargs"].get("type"), str))


def _messages(prompt: str) -> list[dict[str, Any]] | None:
    """The serialized messages of a chat model's prompt; None for any other prompt."""
    try:
        parsed = json.loads(prompt)
    except ValueError:
        return None
    if isinstance(parsed, list) and all(_is_message(item) for item in parsed):
        return parsed
    return None


def _split_content(content: object) -> tuple[str, list[Any]]:
    """A human message's content as (its text, its other blocks: images, files, ...)."""
    if isinstance(content, str):
        return content, []
    if not isinstance(content, list):
        return "", [content]
    texts, others = [], []
    for block in content:
        if isinstance(block, str):
            texts.append(block)
        elif (isinstance(block, dict) and block.get("type") == "text"
              and isinstance(block.get("text"), str)):
            texts.append(block["text"])
        else:
            others.append(block)
    return "\n".join(texts), others


def _key(prompt: str, llm_string: str) -> _Key | None:
    """The text and scope of a cache key; None when the prompt is not cached."""
    scope = {"llm": _digest(llm_string)}
    messages = _messages(prompt)
    if messages is None:
        return _Key(prompt, scope) if prompt.strip() else None
    humans = [i for i, m in enumerate(messages) if m["kwargs"]["type"] == "human"]
    if not humans:
        return None
    last = humans[-1]
    text, others = _split_content(messages[last]["kwargs"].get("content"))
    if not text.strip():
        return None
    # The last human message stays in the context less its text, so its other blocks (an
    # image) and fields (a name) must match too.
    rest = {**messages[last], "kwargs": {**messages[last]["kwargs"], "content": others}}
    scope["context"] = _digest(_canonical([*messages[:last], rest, *messages[last + 1:]]))
    return _Key(text, scope)


def _model_name(llm_string: str, generations: Sequence[Generation]) -> str | None:
    """The model's name: from llm_string if it says, else from a message's metadata."""
    try:
        # A serializable model's llm_string is its JSON, then "---" and the call's parameters.
        serialized, _ = json.JSONDecoder().raw_decode(llm_string)
    except ValueError:
        serialized = None
    kwargs = serialized.get("kwargs") if isinstance(serialized, dict) else None
    if isinstance(kwargs, dict) and (name := _first_name(kwargs)):
        return name
    if match := _MODEL_PARAM.search(llm_string):
        return match.group(1)
    for generation in generations:
        metadata = getattr(getattr(generation, "message", None), "response_metadata", None)
        if isinstance(metadata, dict) and (name := _first_name(metadata)):
            return name
    return None


def _first_name(fields: Mapping[str, Any]) -> str | None:
    return next((fields[key] for key in _MODEL_KEYS
                 if isinstance(fields.get(key), str) and fields[key]), None)


def _tokens(generations: Sequence[Generation]) -> tuple[int | None, int | None]:
    """(prompt tokens, completion tokens) of the first generation that reports them."""
    for generation in generations:
        message = getattr(generation, "message", None)
        usage = getattr(message, "usage_metadata", None)
        if usage:
            return usage.get("input_tokens"), usage.get("output_tokens")
        # Providers that predate usage_metadata report OpenAI's or Anthropic's field names.
        for info in (getattr(message, "response_metadata", None),
                     getattr(generation, "generation_info", None)):
            counts = (info.get("token_usage") or info.get("usage")
                      if isinstance(info, Mapping) else None)
            if isinstance(counts, Mapping):
                prompt = _count(counts, "prompt_tokens", "input_tokens")
                completion = _count(counts, "completion_tokens", "output_tokens")
                if prompt is not None or completion is not None:
                    return prompt, completion
    return None, None


def _count(counts: Mapping[str, Any], *keys: str) -> int | None:
    return next((counts[key] for key in keys if isinstance(counts.get(key), int)), None)


class StratacacheCache(BaseCache):
    """LangChain's ``BaseCache`` on a stratacache server, sync and async.

    ``set_llm_cache(StratacacheCache(target="127.0.0.1:50551"))`` caches every model call; see
    the module docstring for what is looked up and what must match. Blocking calls go through
    one :class:`~stratacache.client.Client`; ``alookup``/``aupdate``/``aclear`` through an
    :class:`~stratacache.client.AsyncClient`, created on first use in each event loop.
    """

    def __init__(self, *, target: str = DEFAULT_TARGET, api_key: str | None = None,
                 namespace: str = "default", min_similarity: float | None = None,
                 ttl_s: float | None = None, timeout: Timeout | float = Timeout(),
                 channel_options: Sequence[tuple[str, Any]] = (), tls: bool = False,
                 root_certificates: PemSource | None = None,
                 certificate_chain: PemSource | None = None,
                 private_key: PemSource | None = None) -> None:
        """Opens the blocking client (it connects on the first call).

        Args:
            target: the server's address, "host:port".
            api_key: the server's API key; None: the environment variable STRATACACHE_API_KEY
                if set, else none.
            namespace: the namespace entries are looked up in and stored into.
            min_similarity: cosine similarity a paraphrase must reach to be served; None: the
                namespace's policy on the server.
            ttl_s: seconds a stored answer may be served; None: until removed.
            timeout, channel_options, tls, root_certificates, certificate_chain, private_key:
                as :class:`~stratacache.client.Client` takes them (timeouts in seconds).

        Raises:
            OSError: a PEM file is missing or unreadable.
            ValueError: inconsistent TLS arguments (the message says which).
        """
        if api_key is None:
            api_key = os.environ.get(API_KEY_ENV) or None
        self._client_args: dict[str, Any] = dict(
            target=target, api_key=api_key, timeout=timeout, channel_options=channel_options,
            tls=tls, root_certificates=root_certificates, certificate_chain=certificate_chain,
            private_key=private_key)
        self.namespace = namespace
        self.min_similarity = min_similarity
        self.ttl_s = ttl_s
        self._client = Client(**self._client_args)
        self._async_clients: dict[asyncio.AbstractEventLoop, AsyncClient] = {}
        self._lock = threading.Lock()  # loops in several threads may each add their client

    def _async_client(self) -> AsyncClient:
        """The running loop's client; a grpc.aio channel works only in the loop it was made in."""
        loop = asyncio.get_running_loop()
        with self._lock:
            # A closed loop's channel is unusable; dropping it lets both be collected.
            for old in [old for old in self._async_clients if old.is_closed()]:
                del self._async_clients[old]
            client = self._async_clients.get(loop)
            if client is None:
                client = self._async_clients[loop] = AsyncClient(**self._client_args)
            return client

    # -- the mapping, shared by the sync and async methods --------------------------------

    def _lookup_args(self, key: _Key) -> dict[str, Any]:
        return dict(prompt=key.text, namespace=self.namespace, scope=key.scope,
                    min_similarity=self.min_similarity)

    def _store_args(self, key: _Key, llm_string: str,
                    return_val: RETURN_VAL_TYPE) -> dict[str, Any]:
        generations = list(return_val)
        prompt_tokens, completion_tokens = _tokens(generations)
        return dict(prompt=key.text, response=dumps(generations), namespace=self.namespace,
                    scope=key.scope, ttl_s=self.ttl_s,
                    cost_model=_model_name(llm_string, generations),
                    prompt_tokens=prompt_tokens, completion_tokens=completion_tokens)

    def _revive(self, response: str) -> list[Generation] | None:
        try:
            with suppress_langchain_beta_warning():  # loads is beta; we pin what it may build
                value = loads(response, allowed_objects=_ALLOWED)
        except (ValueError, TypeError, KeyError) as exc:  # ValueError: also json's, pydantic's
            logger.warning("stratacache: a cached entry in namespace %r is not LangChain "
                           "generations (%s); treating it as a miss. Another writer may share "
                           "the namespace: give LangChain its own with namespace=...",
                           self.namespace, exc)
            return None
        if isinstance(value, list) and all(isinstance(g, Generation) for g in value):
            return value
        logger.warning("stratacache: a cached entry in namespace %r is not a list of LangChain "
                       "generations; treating it as a miss", self.namespace)
        return None

    def _lookup_failed(self, exc: StratacacheError) -> None:
        logger.warning("stratacache: lookup at %s failed, calling the model instead: %s",
                       self._client.target, exc)

    def _store_failed(self, exc: StratacacheError) -> None:
        logger.warning("stratacache: storing the answer at %s failed, so it is not cached: %s",
                       self._client.target, exc)

    # -- BaseCache ---------------------------------------------------------------------------

    def lookup(self, prompt: str, llm_string: str) -> RETURN_VAL_TYPE | None:
        """The cached generations for the prompt's last question, or None (a miss).

        Args:
            prompt: LangChain's serialized prompt (a chat model's messages, or a plain string).
            llm_string: LangChain's description of the model and its call parameters.

        Returns:
            The generations on a hit; None on a miss, for a prompt that is not cached, and
            when the server fails (logged as a warning).
        """
        key = _key(prompt, llm_string)
        if key is None:
            return None
        try:
            result = self._client.lookup(**self._lookup_args(key))
        except StratacacheError as exc:
            self._lookup_failed(exc)
            return None
        return self._revive(result.text) if result.hit else None

    def update(self, prompt: str, llm_string: str, return_val: RETURN_VAL_TYPE) -> None:
        """Stores the model's generations under the prompt's last question and its scope,
        with the model's name and token counts when LangChain reports them (for the
        server's cost-saved accounting). A failure is logged as a warning, never raised.

        Args:
            prompt, llm_string: as :meth:`lookup` took them.
            return_val: the model's generations.
        """
        key = _key(prompt, llm_string)
        if key is None:
            return
        try:
            self._client.store(**self._store_args(key, llm_string, return_val))
        except StratacacheError as exc:
            self._store_failed(exc)

    def clear(self, **kwargs: Any) -> None:
        """Removes every entry of this cache's namespace (an admin call: the API key must
        have admin rights). Keyword arguments are accepted, as BaseCache's are, and ignored.

        Raises:
            PermissionDeniedError: the API key may not invalidate the namespace.
            StratacacheError: any other failure (unlike lookups, not swallowed).
        """
        self._client.invalidate_namespace(self.namespace)

    async def alookup(self, prompt: str, llm_string: str) -> RETURN_VAL_TYPE | None:
        """:meth:`lookup` on the running event loop."""
        key = _key(prompt, llm_string)
        if key is None:
            return None
        try:
            result = await self._async_client().lookup(**self._lookup_args(key))
        except StratacacheError as exc:
            self._lookup_failed(exc)
            return None
        return self._revive(result.text) if result.hit else None

    async def aupdate(self, prompt: str, llm_string: str, return_val: RETURN_VAL_TYPE) -> None:
        """:meth:`update` on the running event loop."""
        key = _key(prompt, llm_string)
        if key is None:
            return
        try:
            await self._async_client().store(**self._store_args(key, llm_string, return_val))
        except StratacacheError as exc:
            self._store_failed(exc)

    async def aclear(self, **kwargs: Any) -> None:
        """:meth:`clear` on the running event loop."""
        await self._async_client().invalidate_namespace(self.namespace)

    # -- closing -----------------------------------------------------------------------------

    def close(self) -> None:
        """Closes the blocking client's channel. Async clients close with :meth:`aclose`."""
        self._client.close()

    async def aclose(self) -> None:
        """Closes the running event loop's client, if this cache made one."""
        with self._lock:
            client = self._async_clients.pop(asyncio.get_running_loop(), None)
        if client is not None:
            await client.close()
