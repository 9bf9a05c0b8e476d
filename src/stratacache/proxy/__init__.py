"""``stratacache proxy``: an OpenAI-compatible HTTP front that caches chat completions.

Any OpenAI SDK works through it by changing ``base_url``. The proxy is a separate, stateless
process that calls a stratacache server over its gRPC API, so every guarantee of that API
(validation, namespace policies, scoped keys, rate limits, metrics) holds unchanged for HTTP
callers, and the proxy keeps answering (straight from the upstream) when the cache is down.

Modules, in the order a request meets them: :mod:`.settings` (flags), :mod:`.chat` (what of a
request is looked up and what is its scope, or why it must not be cached), :mod:`.upstream`
(the OpenAI-compatible provider), :mod:`.replies` (completions and SSE streams built from a hit,
answers assembled from the upstream's), :mod:`.app` (the HTTP routes that tie them together).
"""
