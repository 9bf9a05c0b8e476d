"""What `stratacache proxy` costs and whether it decides as the gRPC API does, side by side in
one run (issue 12's targets).

Separate processes: a `stratacache serve` (the cache), a fake OpenAI upstream
(``tests/openai_upstream.py``, answering in ``--latency-ms``, 50 ms by default: before the whole
answer, or before a stream's first event) and three `stratacache proxy` processes in front of
them: the default mode (lookup, then the upstream on a miss), ``--race-upstream`` (the upstream
request sent beside the lookup) and a store-only one (``--min-similarity 1``, so each question
of the quality phase is stored, never served a neighbour's answer). The client is this process:
a keep-alive ``httpx.Client`` for HTTP, ``stratacache.Client`` for gRPC. Every request carries
the same bearer token; the gRPC calls use the scope the proxy derives from it
(``stratacache.proxy.chat.cache_key``).

1. **Hit quality, QQP crowded slice** (``--pairs``, seeded): every distinct ``a`` is sent
   through the store proxy (a miss: the upstream's answer stored, ``x-stratacache-wait-store``
   so it is stored before the next request) into one namespace; the ``a`` texts it stored go
   through ``Client.store`` into another. Then every ``b`` is looked up both ways, alternating:
   a non-streamed chat request through the default proxy (``x-stratacache`` says hit or miss, the
   answer says which ``a`` was served; a miss is answered 500 by the fake, so it is not stored)
   and ``Client.lookup``. Both are scored by the crowded protocol (``benchmarks/_quality.py``) at
   the server's defaults. Target: equal hit and wrong-hit rates; the lookups whose decision
   (hit or miss, and which entry) differs are counted (expected 0).
2. **Hit latency**: the ``b`` texts served a semantic (not exact) hit both ways in step 1, sent
   again: gRPC ``Client.lookup`` (same namespace and scope as the proxy), the default proxy with
   httpx, the same with the official ``openai`` client (its own parsing included) and the
   racing proxy. Target: proxy (httpx) p50 <= 1.3 x gRPC p50.
3. **Miss overhead, non-streamed**: fresh QQP questions (never stored) straight to the upstream,
   through the default proxy and through the racing proxy; and, as a reference for where the
   time goes, a gRPC lookup of a fresh question (the lookup a miss pays). Target: p50 through the
   proxy / p50 direct <= 1.05.
4. **Streaming time to first byte on a miss**: the same three ways with ``stream: true``; the
   time from sending the request to the first SSE event. Target: proxy TTFB p50 <= direct TTFB
   p50 + 5 ms.

Timed phases run in alternating rounds of ``ROUND`` calls per way, the order rotated each round,
so load on this shared machine hits every way alike; each way has ``WARMUP`` untimed calls
first. Reported: p50 and p90 per way, the ratio (or difference) of p50s, and the median of the
per-round ratios (round medians, each against the reference's round just before or after it).
Calls that did not go as intended (an unexpected hit among misses, a miss among hits) are not
timed and are counted.

    python -m benchmarks.proxy [--calls 300] [--pairs 400] [--latency-ms 50] [--seed 0]
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import httpx
import openai
from tqdm import tqdm

from stratacache import Client
from stratacache.pairs import LabelledPair
from stratacache.proxy import chat
from stratacache.proxy.app import NAMESPACE_HEADER, WAIT_STORE_HEADER
from tests.processes import ProxyProcess

from ._common import DEFAULT_DATA, REPO, RESULTS, machine, percentiles_ms, serve, table, write_json
from ._quality import crowded_rows, load_pairs

MODEL = "fake-model"
CREDENTIAL = "Bearer sk-bench"  # the caller's key: part of the proxy's scope (its tenant)
#: Calls per way per round: short rounds, so a change of load hits every way alike.
ROUND = 25
WARMUP = 10
#: The fake upstream answers a request carrying this header with a 500 at once, which the proxy
#: never stores: a quality-phase miss leaves the crowded set unchanged.
FAIL_UPSTREAM = {"x-fake-status": "500"}
TARGETS = {"miss_p50_ratio": 1.05, "hit_p50_ratio": 1.3, "stream_ttfb_extra_ms": 5.0}

#: Runs the fake upstream until its stdin closes; prints its base URL first.
_UPSTREAM = """\
import sys
from tests.openai_upstream import UpstreamServer
with UpstreamServer(latency_s=float(sys.argv[1])) as upstream:
    print(upstream.base_url, flush=True)
    sys.stdin.read()
"""


@contextmanager
def upstream_process(latency_s: float) -> Iterator[str]:
    """The fake OpenAI upstream in a process of its own (so its event loop never waits on this
    one's GIL); yields its base URL."""
    with subprocess.Popen([sys.executable, "-c", _UPSTREAM, str(latency_s)], cwd=REPO,
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) as process:
        assert process.stdout is not None and process.stdin is not None
        try:
            base_url = process.stdout.readline().strip()
            if not base_url.startswith("http://"):
                raise RuntimeError("the fake upstream did not start; its error is above")
            yield base_url
        finally:
            process.stdin.close()  # it leaves its `with` block and stops
            process.wait(60)


def request_body(prompt: str, *, stream: bool = False) -> dict[str, Any]:
    """The chat request every way sends: one user message, temperature 0 (cacheable)."""
    body: dict[str, Any] = {"model": MODEL, "temperature": 0,
                            "messages": [{"role": "user", "content": prompt}]}
    if stream:
        body["stream"] = True
    return body


def proxy_scope() -> dict[str, str]:
    """The scope the proxy looks up and stores these requests under (it does not depend on the
    prompt)."""
    key = chat.cache_key(request_body("-"), max_temperature=0, credential=CREDENTIAL)
    assert isinstance(key, chat.CacheKey), key
    return key.scope


def _headers(namespace: str | None = None, **extra: str) -> dict[str, str]:
    headers = {"authorization": CREDENTIAL, **extra}
    if namespace is not None:
        headers[NAMESPACE_HEADER] = namespace
    return headers


def _outcome(response: httpx.Response) -> str:
    """The proxy's x-stratacache verdict; a cache failure (fail-open) spoils any figure."""
    verdict = response.headers.get("x-stratacache", "")
    if verdict not in ("hit", "miss"):
        raise RuntimeError(f"the proxy answered x-stratacache: {verdict!r} (the cache failed?); "
                           "see the proxy's log")
    return verdict


def _content(response: httpx.Response) -> str:
    return response.json()["choices"][0]["message"]["content"]


# -- timed ways ------------------------------------------------------------------------------

Way = Callable[[], float | None]  # one call: its seconds, or None when it went otherwise


def _post_way(http: httpx.Client, base_url: str, prompts: Iterator[str], headers: dict[str, str],
              want: str | None) -> Way:
    """A non-streamed chat request per call; ``want``: the proxy verdict required (None: a
    direct call to the upstream)."""

    def call() -> float | None:
        prompt = next(prompts)
        started = time.perf_counter()
        response = http.post(base_url + "/chat/completions", json=request_body(prompt),
                             headers=headers)
        elapsed = time.perf_counter() - started
        if response.status_code != 200:
            raise RuntimeError(f"{base_url} answered {response.status_code}: {response.text}")
        return elapsed if want is None or _outcome(response) == want else None

    return call


def _ttfb_way(http: httpx.Client, base_url: str, prompts: Iterator[str],
              headers: dict[str, str], want: str | None) -> Way:
    """A streamed chat request per call: seconds until the first SSE event arrived (the rest of
    the stream is read, untimed, so the connection is reused)."""

    def call() -> float | None:
        prompt = next(prompts)
        first = None
        started = time.perf_counter()
        with http.stream("POST", base_url + "/chat/completions",
                         json=request_body(prompt, stream=True), headers=headers) as response:
            for data in response.iter_raw():
                if first is None and b"data:" in data:
                    first = time.perf_counter() - started
        if response.status_code != 200 or first is None:
            raise RuntimeError(f"{base_url} streamed status {response.status_code} and "
                               f"{'no' if first is None else 'some'} events")
        return first if want is None or _outcome(response) == want else None

    return call


def _openai_way(client: openai.OpenAI, prompts: Iterator[str]) -> Way:
    """The official SDK, response parsed as an application would; the call must be a hit."""

    def call() -> float | None:
        prompt = next(prompts)
        started = time.perf_counter()
        raw = client.chat.completions.with_raw_response.create(**request_body(prompt))
        raw.parse()
        elapsed = time.perf_counter() - started
        return elapsed if raw.headers.get("x-stratacache") == "hit" else None

    return call


def _grpc_way(client: Client, prompts: Iterator[str], namespace: str, scope: dict[str, str],
              hit: bool) -> Way:
    """``Client.lookup`` per call; ``hit``: a semantic hit is required, else a miss."""

    def call() -> float | None:
        prompt = next(prompts)
        started = time.perf_counter()
        result = client.lookup(prompt, namespace=namespace, scope=scope)
        elapsed = time.perf_counter() - started
        ok = (result.hit and result.tier != "exact") if hit else not result.hit
        return elapsed if ok else None

    return call


def _rounds(ways: dict[str, Way], calls: int, desc: str) -> dict[str, dict[str, Any]]:
    """Every way in alternating rounds; per way the seconds of each round's calls and how many
    calls went otherwise than intended."""
    for way in ways.values():
        for _ in range(WARMUP):
            way()
    names = list(ways)
    out: dict[str, dict[str, Any]] = {n: {"rounds": [], "skipped": 0} for n in names}
    for r in tqdm(range(-(-calls // ROUND)), desc=desc, unit="round"):
        for name in names[r % len(names):] + names[:r % len(names)]:
            seconds = [ways[name]() for _ in range(ROUND)]
            out[name]["rounds"].append([s for s in seconds if s is not None])
            out[name]["skipped"] += sum(s is None for s in seconds)
    return out


def _figures(runs: dict[str, dict[str, Any]], reference: str,
             difference: bool = False) -> dict[str, dict[str, Any]]:
    """Per way: percentiles, and against ``reference`` the ratio of p50s (or, with
    ``difference``, p50 minus the reference's, ms) and the median of per-round ratios (or
    differences)."""
    ref_rounds = runs[reference]["rounds"]
    ref = percentiles_ms([s for r in ref_rounds for s in r])
    out = {}
    for name, run in runs.items():
        row: dict[str, Any] = {**percentiles_ms([s for r in run["rounds"] for s in r]),
                               "skipped": run["skipped"]}
        if name != reference and row["n"]:
            per_round = [(statistics.median(a) - statistics.median(b)) * 1000 if difference
                         else statistics.median(a) / statistics.median(b)
                         for a, b in zip(run["rounds"], ref_rounds) if a and b]
            key = "p50_minus_reference_ms" if difference else "p50_ratio"
            row[key] = round(row["p50_ms"] - ref["p50_ms"] if difference
                             else row["p50_ms"] / ref["p50_ms"], 3)
            row["median_round_" + ("difference_ms" if difference else "ratio")] = round(
                statistics.median(per_round), 3)
        out[name] = row
    return out


# -- hit quality -----------------------------------------------------------------------------

def _quality(http: httpx.Client, grpc: Client, store_url: str, lookup_url: str,
             pairs: list[LabelledPair], scope: dict[str, str]) -> dict[str, Any]:
    """The crowded protocol both ways (see the module docstring, step 1)."""
    proxy_ns, grpc_ns = "bench-quality-proxy", "bench-quality-grpc"
    answer_of: dict[str, str] = {}  # the answer the proxy stored -> the a it answers
    stored, served_instead = [], 0
    for a in tqdm(list(dict.fromkeys(p.a for p in pairs)), desc="quality: store via proxy",
                  unit="call"):
        response = http.post(store_url + "/chat/completions", json=request_body(a),
                             headers=_headers(proxy_ns, **{WAIT_STORE_HEADER: "1"}))
        response.raise_for_status()
        if _outcome(response) == "miss":
            answer_of[_content(response)] = a
            stored.append(a)
        else:  # an exact-text duplicate: nothing new stored
            served_instead += 1
    check = grpc.lookup(stored[0], namespace=proxy_ns, scope=scope)
    if check.tier != "exact":
        raise RuntimeError("a stored question is not an exact hit over gRPC in the proxy's "
                           "namespace: proxy_scope() is not the scope the proxy used")
    for a in tqdm(stored, desc="quality: store via gRPC", unit="call"):
        grpc.store(a, "answer to: " + a, namespace=grpc_ns, scope=scope)

    proxy_served: list[str | None] = []
    grpc_served: list[str | None] = []
    semantic = []  # b texts served a semantic (not exact) hit both ways
    for p in tqdm(pairs, desc="quality: look up b both ways", unit="pair"):
        response = http.post(lookup_url + "/chat/completions", json=request_body(p.b),
                             headers=_headers(proxy_ns, **FAIL_UPSTREAM))
        hit = _outcome(response) == "hit"
        proxy_served.append(answer_of[_content(response)] if hit else None)
        result = grpc.lookup(p.b, namespace=grpc_ns, scope=scope)
        grpc_served.append(result.matched_prompt if result.hit else None)
        if hit and result.hit and result.tier != "exact" \
                and response.headers["x-stratacache-tier"] != "exact":
            semantic.append(p.b)

    scored = {}
    for side, served in (("proxy", proxy_served), ("grpc", grpc_served)):
        _, (row,) = crowded_rows(pairs, [(s, 1.0) if s is not None else ("", -1.0)
                                         for s in served], set(stored), [0.0])
        scored[side] = {k: row[k] for k in ("hits", "correct", "wrong", "unlabelled", "hit_rate",
                                            "wrong_hit_rate", "labelled_precision", "recall")}
    differing = sum(a != b for a, b in zip(proxy_served, grpc_served))
    return {"pairs": len(pairs), "stored": len(stored),
            "a_texts_served_instead_of_stored": served_instead, "lookups": len(pairs),
            "decisions_differing": differing, **scored,
            "equal": differing == 0 and all(scored["proxy"][k]["k"] == scored["grpc"][k]["k"]
                                            for k in ("hit_rate", "wrong_hit_rate")),
            "semantic_hit_texts": list(dict.fromkeys(semantic))}


# -- report ----------------------------------------------------------------------------------

def _verdict(ok: bool) -> str:
    return "met" if ok else "NOT met"


def _rows(section: str, figures: dict[str, dict[str, Any]], reference: str, target: str,
          ok: dict[str, bool]) -> list[list[object]]:
    """Table rows of one phase; ``ok``: the verdict of each way that has a target."""
    rows = []
    for name, f in figures.items():
        if name == reference:
            against, per_round = "(reference)", ""
        elif "p50_minus_reference_ms" in f:
            against = f"{f['p50_minus_reference_ms']:+.2f} ms"
            per_round = f"{f['median_round_difference_ms']:+.2f} ms"
        else:
            against, per_round = f"{f['p50_ratio']:.3f}x", f"{f['median_round_ratio']:.3f}x"
        rows.append([section, name, f["n"], f.get("p50_ms", "-"), f.get("p90_ms", "-"),
                     against, per_round, target if name in ok else "",
                     _verdict(ok[name]) if name in ok else ""])
    return rows


def _pct(w: dict[str, Any]) -> str:
    return "-" if w["value"] is None else f"{w['value']:.3f} ({w['k']}/{w['n']})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="QQP pairs file")
    parser.add_argument("--pairs", type=int, default=400,
                        help="pairs of the crowded slice (quality; its semantic hits are the "
                             "hit-latency prompts)")
    parser.add_argument("--calls", type=int, default=300,
                        help="timed calls per way in each latency phase (whole rounds of "
                             f"{ROUND})")
    parser.add_argument("--latency-ms", type=float, default=50.0,
                        help="the fake upstream's latency: before its answer, or before a "
                             "stream's first event")
    parser.add_argument("--seed", type=int, default=0, help="shuffle seed of the pairs")
    parser.add_argument("--out", type=Path, default=RESULTS / "proxy.json", help="JSON output")
    args = parser.parse_args(argv)

    everything, total = load_pairs(args.data, None, args.seed)
    pairs = everything[:args.pairs]
    taken = {t for p in pairs for t in (p.a, p.b)}
    # Questions never stored anywhere; one per pair, as a pair's b often means its a.
    unused = list(dict.fromkeys(p.a for p in everything[args.pairs:] if p.a not in taken))
    needed = 7 * (-(-args.calls // ROUND) * ROUND + WARMUP)  # 4 miss ways, 3 stream ways
    if len(unused) < needed:
        parser.error(f"{args.data} has {len(unused)} questions outside the first {args.pairs} "
                     f"pairs; {needed} fresh ones are needed: lower --calls or --pairs")
    fresh = iter(unused)
    scope = proxy_scope()
    started = time.perf_counter()
    with ExitStack() as stack, tempfile.TemporaryDirectory(prefix="stratacache-proxy-") as tmp:
        server = stack.enter_context(serve())
        upstream = stack.enter_context(upstream_process(args.latency_ms / 1000))
        common = ("--upstream", upstream, "--cache", server.target)
        proxies = {name: stack.enter_context(ProxyProcess(Path(tmp) / f"{name}.log", *common,
                                                          *flags))
                   for name, flags in (("seq", ()), ("race", ("--race-upstream",)),
                                       ("store", ("--min-similarity", "1")))}
        http = stack.enter_context(httpx.Client(timeout=60))
        grpc = stack.enter_context(Client(server.target, timeout=60))
        seq, race = proxies["seq"].base_url, proxies["race"].base_url

        quality = _quality(http, grpc, proxies["store"].base_url, seq, pairs, scope)
        paraphrases = quality.pop("semantic_hit_texts")
        if not paraphrases:
            raise RuntimeError(f"no lookup of the {len(pairs)} pairs was a semantic hit both "
                               "ways: raise --pairs")

        hit_ns = "bench-quality-proxy"
        sdk = openai.OpenAI(base_url=seq, api_key=CREDENTIAL.removeprefix("Bearer "),
                            max_retries=0, default_headers={NAMESPACE_HEADER: hit_ns})
        hits = _rounds({
            "gRPC Client.lookup": _grpc_way(grpc, itertools.cycle(paraphrases), hit_ns, scope,
                                            hit=True),
            "proxy (httpx)": _post_way(http, seq, itertools.cycle(paraphrases),
                                       _headers(hit_ns), "hit"),
            "proxy (openai SDK)": _openai_way(sdk, itertools.cycle(paraphrases)),
            "proxy --race-upstream (httpx)": _post_way(http, race, itertools.cycle(paraphrases),
                                                       _headers(hit_ns), "hit"),
        }, args.calls, "semantic hits")
        sdk.close()

        misses = _rounds({
            "direct to upstream": _post_way(http, upstream, fresh, _headers(), None),
            "proxy (lookup first)": _post_way(http, seq, fresh, _headers("bench-miss-seq"),
                                              "miss"),
            "proxy --race-upstream": _post_way(http, race, fresh, _headers("bench-miss-race"),
                                               "miss"),
            "gRPC lookup alone (a miss)": _grpc_way(grpc, fresh, "bench-miss-seq", scope,
                                                    hit=False),
        }, args.calls, "misses")
        streams = _rounds({
            "direct to upstream": _ttfb_way(http, upstream, fresh, _headers(), None),
            "proxy (lookup first)": _ttfb_way(http, seq, fresh, _headers("bench-stream-seq"),
                                              "miss"),
            "proxy --race-upstream": _ttfb_way(http, race, fresh,
                                               _headers("bench-stream-race"), "miss"),
        }, args.calls, "streamed misses, TTFB")
    elapsed = time.perf_counter() - started

    hit_f = _figures(hits, "gRPC Client.lookup")
    miss_f = _figures(misses, "direct to upstream")
    stream_f = _figures(streams, "direct to upstream", difference=True)
    proxy_ways = ("proxy (lookup first)", "proxy --race-upstream")
    met = {
        "miss_p50_ratio": {w: miss_f[w]["p50_ratio"] <= TARGETS["miss_p50_ratio"]
                           for w in proxy_ways},
        "hit_p50_ratio": hit_f["proxy (httpx)"]["p50_ratio"] <= TARGETS["hit_p50_ratio"],
        "stream_ttfb_extra_ms": {w: stream_f[w]["p50_minus_reference_ms"]
                                 <= TARGETS["stream_ttfb_extra_ms"] for w in proxy_ways},
        "quality_equal": quality["equal"]}

    info = machine()
    print(f"\nmachine: {info['cpu']}, {info['cores']} cores, {info['simd_isa']}; upstream "
          f"latency {args.latency_ms:g} ms; {args.calls} calls per way in rounds of {ROUND}; "
          f"{len(pairs)} of {total} pairs (seed {args.seed}); {elapsed:.0f} s\n")
    rows = (_rows("semantic hit", hit_f, "gRPC Client.lookup",
                  f"<= {TARGETS['hit_p50_ratio']}x gRPC",
                  {"proxy (httpx)": met["hit_p50_ratio"]})
            + _rows("miss (not streamed)", miss_f, "direct to upstream",
                    f"<= {TARGETS['miss_p50_ratio']}x direct", met["miss_p50_ratio"])
            + _rows("miss, stream TTFB", stream_f, "direct to upstream",
                    f"<= direct + {TARGETS['stream_ttfb_extra_ms']:g} ms",
                    met["stream_ttfb_extra_ms"]))
    print(table(rows, ("figure", "way", "n", "p50 ms", "p90 ms", "vs reference p50",
                       "median of rounds", "target", "")))
    print()
    print(table([[side, quality[side]["hits"], _pct(quality[side]["hit_rate"]),
                  _pct(quality[side]["wrong_hit_rate"]),
                  _pct(quality[side]["labelled_precision"]), _pct(quality[side]["recall"])]
                 for side in ("proxy", "grpc")],
                ("crowded slice", "hits", "hit rate", "wrong-hit rate", "labelled precision",
                 "recall")))
    print(f"{quality['stored']} questions stored each way "
          f"({quality['a_texts_served_instead_of_stored']} served instead of stored); "
          f"lookups whose decision differs: {quality['decisions_differing']} (target 0): "
          f"{_verdict(quality['equal'])}; "
          f"{len(paraphrases)} semantic hits are the hit-latency prompts")
    skipped = {f"{phase}: {w}": f["skipped"] for phase, figs in
               (("hit", hit_f), ("miss", miss_f), ("stream", stream_f))
               for w, f in figs.items() if f["skipped"]}
    if skipped:
        print(f"calls not timed (not the intended hit or miss): {skipped}")
    path = write_json("proxy", {
        "machine": info, "elapsed_s": round(elapsed, 1),
        "parameters": {"calls": args.calls, "round": ROUND, "warmup": WARMUP,
                       "upstream_latency_ms": args.latency_ms, "pairs": len(pairs),
                       "pairs_in_file": total, "seed": args.seed, "data": str(args.data),
                       "scope": scope},
        "targets": TARGETS, "met": met,
        "semantic_hit": hit_f, "miss": miss_f, "stream_ttfb": stream_f,
        "quality": quality, "hit_prompts": len(paraphrases)}, args.out)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
