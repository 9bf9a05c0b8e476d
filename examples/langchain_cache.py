"""LangChain with stratacache as its LLM cache: a paraphrased question is answered from the cache.

Start a server (`stratacache serve`), then: python examples/langchain_cache.py
(STRATACACHE_TARGET=host:port for another server; STRATACACHE_API_KEY if it needs a key).
Exits 0 when the second answer came from the cache.
"""

import os
import sys

from langchain_core.globals import set_llm_cache
from langchain_core.language_models.fake_chat_models import FakeListChatModel

from stratacache.integrations.langchain import StratacacheCache

set_llm_cache(StratacacheCache(target=os.environ.get("STRATACACHE_TARGET", "127.0.0.1:50551")))

# Stands in for ChatOpenAI(...) or any chat model: it gives its canned answers in turn, so a
# second call that reached it would answer differently.
model = FakeListChatModel(responses=["Write a little code every day.", "(the model again)"])

first = model.invoke("How do I learn Python quickly?")
second = model.invoke("How can I learn Python fast?")
print("first: ", first.content)
print("second:", second.content)
cached = second.content == first.content
print("the second answer came from the cache" if cached else "the second answer came from the model")
sys.exit(0 if cached else 1)
