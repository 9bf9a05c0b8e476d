"""The OpenAI SDK through `stratacache proxy`: the only change is base_url.

    stratacache serve &
    stratacache proxy --upstream https://api.openai.com/v1 &
    OPENAI_API_KEY=sk-... python examples/openai_sdk.py
"""

import os

from openai import OpenAI

client = OpenAI(
    base_url=os.environ.get("OPENAI_BASE_URL", "http://127.0.0.1:8080/v1"),
    # Answer each miss only once it is stored, so the paraphrase below finds it (a demo's
    # read-your-writes; production callers leave it out and never wait for the store).
    default_headers={"x-stratacache-wait-store": "1"},
)
model = os.environ.get("EXAMPLE_MODEL", "gpt-4o-mini")

for question in ("How do I reset my password?", "How can I reset my password?"):
    reply = client.chat.completions.with_raw_response.create(
        model=model, temperature=0,  # the proxy caches temperature 0 unless told otherwise
        messages=[{"role": "user", "content": question}])
    answer = reply.parse().choices[0].message.content
    print(f"{reply.headers['x-stratacache']:>4} {question!r} -> {answer!r}")

stream = client.chat.completions.create(
    model=model, temperature=0, stream=True,
    messages=[{"role": "user", "content": "How can I reset my password?"}])
print("streamed:", "".join(c.choices[0].delta.content or "" for c in stream if c.choices))
