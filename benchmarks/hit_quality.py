"""Hit quality of a running stratacache server on labelled pairs, through the public client.

Runs both protocols of ``shared/data/README.md`` exactly as a gateway would use the cache:

* **pair**: each pair gets a scope of its own (``{"bench-pair": i}``), so one server holds many
  one-entry caches side by side: ``a`` is stored, ``b`` is looked up in the same scope.
* **crowded**: every distinct ``a`` is stored in one namespace and scope; every ``b`` is looked
  up against all of them.

The threshold is swept in one pass: each lookup asks with ``min_similarity=0``, so the server
returns its best candidate and that candidate's similarity, and a threshold t serves exactly the
lookups whose similarity is >= t (the server's decision is that same comparison). Nothing is
stored twice. Reported at each threshold and at the server's default: precision, recall, hit
rate, wrong-hit rate with 95 % Wilson intervals; JSON, and a PNG precision-recall plot with the
default marked.

    python -m benchmarks.hit_quality                    # 5,000 pairs, a server of its own
    python -m benchmarks.hit_quality --limit 0          # every pair in the file
    python -m benchmarks.hit_quality --target HOST:PORT # an already running server
    python -m benchmarks.hit_quality --verifier OUT/verifier --limit 0
        # the text-disjoint test part: the verifier with the server's defaults only beside the
        # cosine default, plain and verified curves side by side, the server's wrong-hit
        # calibration (1 to 15 %) on the calibrate part checked on the test part, and recall on
        # another domain (benchmarks/data/product_api_pairs.jsonl) at the same settings

Verified scores are the server's decision score (``LookupResult.verifier_score``: the verifier's
score fused with the cosine when its card says so), the unit its threshold, its calibration and
the verifier's card use.
"""

from __future__ import annotations

import argparse
import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import TypeVar

from tqdm import tqdm

from stratacache import AsyncClient, Client
from stratacache.pairs import LabelledPair

from ._common import DEFAULT_DATA, RESULTS, machine, serve, write_json
from ._quality import (crowded_rows, format_table, load_pairs, pair_counts, pair_rows,
                       parse_thresholds, precision_at_recall, wilson)

T = TypeVar("T")


async def _bounded(items: Sequence[T], work: Callable[[T], Awaitable[object]], limit: int,
                   desc: str) -> list[object]:
    """Runs ``work`` on every item with at most ``limit`` in flight; results in item order."""
    semaphore = asyncio.Semaphore(limit)
    bar = tqdm(total=len(items), desc=desc, unit="call")

    async def one(item: T) -> object:
        async with semaphore:
            result = await work(item)
        bar.update(1)
        return result

    try:
        return await asyncio.gather(*(one(i) for i in items))
    finally:
        bar.close()


async def _protocols(c: AsyncClient, pairs: list[LabelledPair], concurrency: int,
                     prefix: str, policy: dict[str, object], label: str) -> dict[str, object]:
    """Both protocols in namespaces of their own, with ``policy`` set on them. A request may
    only tighten its namespace's floor: to sweep a cosine threshold on what comes back, the
    policy sets ``min_similarity`` 0 (without the verifier it is the threshold; with it, the
    gate), and every lookup asks with ``min_similarity=0``."""
    pair_ns, crowded_ns = f"{prefix}-pair", f"{prefix}-crowded"
    await c.set_policy(pair_ns, **policy)  # type: ignore[arg-type]
    await c.set_policy(crowded_ns, **policy)  # type: ignore[arg-type]
    stored = list(dict.fromkeys(p.a for p in pairs))
    timings: dict[str, float] = {}
    started = time.perf_counter()
    await _bounded(list(enumerate(pairs)), lambda ip: c.store(
        ip[1].a, "answer to: " + ip[1].a, namespace=pair_ns,
        scope={"bench-pair": str(ip[0])}), concurrency, f"{label} pair: store")
    timings["pair_store"] = time.perf_counter() - started
    started = time.perf_counter()
    pair_results = await _bounded(list(enumerate(pairs)), lambda ip: c.lookup(
        ip[1].b, namespace=pair_ns, scope={"bench-pair": str(ip[0])}, min_similarity=0.0),
        concurrency, f"{label} pair: lookup")
    timings["pair_lookup"] = time.perf_counter() - started
    started = time.perf_counter()
    await _bounded(stored, lambda a: c.store(a, "answer to: " + a, namespace=crowded_ns),
                   concurrency, f"{label} crowded: store")
    timings["crowded_store"] = time.perf_counter() - started
    started = time.perf_counter()
    crowded_results = await _bounded(pairs, lambda p: c.lookup(
        p.b, namespace=crowded_ns, min_similarity=0.0), concurrency, f"{label} crowded: lookup")
    timings["crowded_lookup"] = time.perf_counter() - started
    # Leave the server as we found it.
    await c.invalidate_namespace(pair_ns)
    await c.invalidate_namespace(crowded_ns)
    return {"pair": pair_results, "crowded": crowded_results, "stored": stored,
            "timings": timings}


async def _verified_defaults(target: str, pairs: list[LabelledPair],
                             concurrency: int) -> dict[str, object]:
    """The verifier with the server's defaults only (no bound, no gate or threshold flags):
    what GetPolicy says of them, and both protocols as the server decides them."""
    run = uuid.uuid4().hex[:8]
    async with AsyncClient(target, timeout=600) as c:
        policy = await c.get_policy(f"bench-d-{run}-probe")
        raw = await _protocols(c, pairs, concurrency, f"bench-d-{run}", {"verify": True},
                               "verified, defaults")
    return {"policy": policy, "raw": raw}


async def _run(target: str, pairs: list[LabelledPair], concurrency: int, verified: bool,
               gate: float, evidence: list[LabelledPair], bounds: list[float],
               other: list[LabelledPair]) -> dict[str, object]:
    run = uuid.uuid4().hex[:8]
    out: dict[str, object] = {}
    async with AsyncClient(target, timeout=600) as c:
        plain_policy = {"min_similarity": 0.0, "verify": False if verified else None}
        out["plain"] = await _protocols(c, pairs, concurrency, f"bench-{run}", plain_policy,
                                        "plain")
        if not verified:
            return out
        verify_policy = {"verify": True, "min_similarity": gate}
        out["verified"] = await _protocols(c, pairs, concurrency, f"bench-v-{run}",
                                           verify_policy, "verified")
        # The server's own calibration on the held-back calibrate part, per bound and scorer.
        cal_ns = f"bench-cal-{run}"
        with tqdm(total=len(evidence), desc="calibration evidence", unit="pair") as bar:
            await c.add_evidence(cal_ns, [(p.a, p.b, p.duplicate) for p in evidence],
                                 progress=bar.update)
        calibrated: dict[str, list[dict[str, object]]] = {"plain": [], "verified": []}
        for bound in bounds:
            for name, policy in (("plain", {"verify": False}), ("verified", verify_policy)):
                calibrated[name].append(await c.set_policy(
                    cal_ns, max_wrong_rate=bound, **policy))  # type: ignore[arg-type]
        await c.set_policy(cal_ns, clear_evidence=True)
        out["calibrated"] = calibrated
        if other:
            out["other_plain"] = await _protocols(c, other, concurrency, f"bench-o-{run}",
                                                  plain_policy, "other domain, plain")
            out["other_verified"] = await _protocols(c, other, concurrency, f"bench-ov-{run}",
                                                     verify_policy, "other domain, verified")
    return out


def _scores(results: list[object], verified: bool) -> list[float]:
    """A lookup's score: the verifier's (1.0 for an exact hit) or the cosine; -1 on a miss."""
    if not verified:
        return [r.similarity if r.hit else -1.0 for r in results]  # type: ignore[attr-defined]
    return [(1.0 if r.verifier_score is None else r.verifier_score) if r.hit else -1.0  # type: ignore[attr-defined]
            for r in results]


def _evaluate(raw: dict[str, object], pairs: list[LabelledPair], thresholds: list[float],
              verified: bool) -> dict[str, object]:
    scores = _scores(raw["pair"], verified)  # type: ignore[arg-type]
    duplicate = [p.duplicate for p in pairs]
    pair = pair_rows(scores, duplicate, thresholds)
    crowded_scores = _scores(raw["crowded"], verified)  # type: ignore[arg-type]
    served = [(r.matched_prompt, s) if r.hit else ("", -1.0)  # type: ignore[attr-defined]
              for r, s in zip(raw["crowded"], crowded_scores)]  # type: ignore[call-overload]
    summary, crowded = crowded_rows(pairs, served, set(raw["stored"]), thresholds)  # type: ignore[arg-type]
    return {"pair": pair, "crowded": {"summary": summary, "by_threshold": crowded},
            "pair_scores": scores, "crowded_served": served,
            "pair_precision_at_recall_0.5": precision_at_recall(scores, duplicate, 0.5),
            "crowded_precision_at_recall_0.5": _crowded_at_recall(pairs, served, raw, 0.5)}


def _crowded_at_recall(pairs: list[LabelledPair], served: list[tuple[str, float]],
                       raw: dict[str, object], recall: float) -> dict[str, object]:
    """Crowded labelled precision at the strictest threshold whose recall reaches ``recall``."""
    candidates = sorted({s for _, s in served if s >= 0}, reverse=True)
    grid = candidates[::max(1, len(candidates) // 400)] + candidates[-1:]
    _, rows = crowded_rows(pairs, served, set(raw["stored"]), sorted(set(grid)))  # type: ignore[arg-type]
    reaching = [r for r in rows if (r["recall"]["value"] or 0) >= recall]  # type: ignore[index]
    if not reaching:
        return {"threshold": None}
    best = max(reaching, key=lambda r: r["threshold"])
    return {"threshold": best["threshold"], "labelled_precision": best["labelled_precision"],
            "strict_precision": best["strict_precision"], "recall": best["recall"]}


def _bound_check(calibration: dict[str, object], evaluation: dict[str, object],
                 pairs: list[LabelledPair], raw: dict[str, object]) -> dict[str, object]:
    """The wrong-hit rate among hits served at the server's calibrated threshold, measured on
    the test part (never seen by the calibration)."""
    threshold = calibration["threshold"]
    row: dict[str, object] = {"bound": calibration["bound"], "threshold": threshold,
                              "promised_bound": calibration["promised_bound"],
                              "evidence": calibration["evidence"],
                              "calibration_hit_rate": calibration["hit_rate"]}
    if threshold is None:
        row["note"] = calibration["message"]
        return row
    t = float(threshold)  # type: ignore[arg-type]
    pair = pair_rows(evaluation["pair_scores"], [p.duplicate for p in pairs], [t])[0]  # type: ignore[arg-type]
    _, crowded = crowded_rows(pairs, evaluation["crowded_served"], set(raw["stored"]), [t])  # type: ignore[arg-type]
    c = crowded[0]
    row.update({
        "pair_served": pair["served"],
        "pair_wrong_among_served": wilson(pair["served_non_duplicate"], pair["served"]),
        "pair_recall": pair["recall"],
        "crowded_hits": c["hits"],
        "crowded_labelled_wrong_among_hits": wilson(c["wrong"], c["hits"]),
        "crowded_unlabelled_hits": c["unlabelled"], "crowded_recall": c["recall"]})
    measured = row["pair_wrong_among_served"]["value"]  # type: ignore[index]
    row["pair_within_bound"] = measured is not None and measured <= calibration["bound"]  # type: ignore[operator]
    return row


def _plot(path: Path, summary: dict[str, dict[str, object]], default: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    for name, ev in summary.items():
        for rows, key, label in ((ev["pair"], "precision", "pair"),
                                 (ev["crowded"]["by_threshold"], "labelled_precision",  # type: ignore[index]
                                  "crowded (labelled)")):
            xs = [r["recall"]["value"] for r in rows if r[key]["value"] is not None]  # type: ignore[union-attr]
            ys = [r[key]["value"] for r in rows if r[key]["value"] is not None]  # type: ignore[union-attr]
            line, = ax.plot(xs, ys, marker=".", label=f"{name}: {label}")
            at = [r for r in rows if name == "plain" and abs(r["threshold"] - default) < 1e-9  # type: ignore[union-attr]
                  and r[key]["value"]]
            if at:
                ax.scatter([at[0]["recall"]["value"]], [at[0][key]["value"]], s=120,
                           facecolors="none", edgecolors=line.get_color(), linewidths=2)
                ax.annotate(f"default {default:.2f}",
                            (at[0]["recall"]["value"], at[0][key]["value"]),
                            textcoords="offset points", xytext=(8, -12))
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_title("stratacache hit quality: cosine threshold vs verifier")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _fmt(w: dict[str, object] | None) -> str:
    if not w or w.get("value") is None:
        return "  -  "
    return f"{w['value']:.3f} [{w['low']:.3f},{w['high']:.3f}]"


def _summary_table(results: dict[str, dict[str, object]]) -> str:
    lines = [f"{'scorer':<10} {'pair P @ R>=0.50':<26} {'crowded labelled P @ R>=0.50':<30}",
             "-" * 68]
    for name, ev in results.items():
        p, c = ev["pair_precision_at_recall_0.5"], ev["crowded_precision_at_recall_0.5"]
        lines.append(f"{name:<10} {_fmt(p.get('precision')):<26} "  # type: ignore[union-attr]
                     f"{_fmt(c.get('labelled_precision')):<30}")  # type: ignore[union-attr]
    return "\n".join(lines)


def _bounds_table(checks: dict[str, list[dict[str, object]]]) -> str:
    lines = [f"{'scorer':<9} {'bound':>5} {'threshold':>9} {'promised':>8}  "
             f"{'pair wrong/served (test)':<27} {'pair R':>6}  {'crowded wrong/hits':<26}",
             "-" * 100]
    for name, rows in checks.items():
        for r in rows:
            if r["threshold"] is None:
                lines.append(f"{name:<9} {r['bound']:>5.2f} {'none':>9}  {r.get('note', '')[:70]}")
                continue
            lines.append(
                f"{name:<9} {r['bound']:>5.2f} {r['threshold']:>9.4f} {r['promised_bound']:>8.4f}  "
                f"{_fmt(r['pair_wrong_among_served']):<27} "  # type: ignore[arg-type]
                f"{r['pair_recall']['value']:>6.3f}  "  # type: ignore[index]
                f"{_fmt(r['crowded_labelled_wrong_among_hits']):<26}")  # type: ignore[arg-type]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", "--pairs", type=Path, default=DEFAULT_DATA,
                        help="labelled pairs file (.jsonl or .jsonl.gz)")
    parser.add_argument("--limit", type=int, default=5000,
                        help="pairs used, after a seeded shuffle (0 = all; default %(default)s, "
                             "about 5 minutes on 2 cores without a verifier)")
    parser.add_argument("--seed", type=int, default=0, help="shuffle seed")
    parser.add_argument("--part", choices=("all", "train", "calibrate", "test"), default=None,
                        help="use one part of the text-disjoint split (stratacache.pairs); "
                             "default: test with --verifier, else all")
    parser.add_argument("--verifier", type=Path, default=None,
                        help="verifier folder: also measure verified hits with the server's "
                             "defaults (a server of its own with no verifier flags), their "
                             "curve (a second server with --verify-threshold 0 at the same "
                             "gate) and the server's wrong-hit calibration on the split's "
                             "calibrate part")
    parser.add_argument("--verify-gate", type=float, default=None,
                        help="cosine gate of the verified sweep; default: the gate the "
                             "server derives from the verifier's card")
    parser.add_argument("--evidence-limit", type=int, default=0,
                        help="with --verifier: calibrate-part pairs sent as evidence (0 = all)")
    parser.add_argument("--bounds", default="0.01,0.02,0.05,0.10,0.15",
                        help="wrong-hit bounds to calibrate and check, comma-separated")
    parser.add_argument("--other-domain", type=Path,
                        default=Path(__file__).parent / "data" / "product_api_pairs.jsonl",
                        help="with --verifier: labelled pairs from another domain, for recall "
                             "at the same settings ('' to skip)")
    parser.add_argument("--target", default=None,
                        help="HOST:PORT of a running server (default: start one on a "
                             "temporary data directory); not with --verifier")
    parser.add_argument("--api-key", default=None, help="for --target servers that need one")
    parser.add_argument("--thresholds", type=parse_thresholds, default="0.70:0.99:0.01",
                        help="START:STOP:STEP or a comma list; the server default is added")
    parser.add_argument("--concurrency", type=int, default=32, help="calls in flight")
    parser.add_argument("--out", type=Path, default=RESULTS / "hit_quality.json")
    parser.add_argument("--plot", type=Path, default=RESULTS / "hit_quality.png")
    args = parser.parse_args(argv)
    verified = args.verifier is not None
    if verified and args.target:
        parser.error("--verifier starts a server of its own: leave out --target")
    part = args.part or ("test" if verified else "all")
    bounds = [float(b) for b in args.bounds.split(",") if b.strip()]

    pairs, total = load_pairs(args.data, args.limit or None, args.seed,
                              None if part == "all" else part)
    evidence = (load_pairs(args.data, args.evidence_limit or None, args.seed, "calibrate")[0]
                if verified else [])
    other = (load_pairs(args.other_domain, None, args.seed)[0]
             if verified and str(args.other_domain) not in ("", ".") else [])
    started = time.perf_counter()
    defaults: dict[str, object] = {}
    gate = args.verify_gate
    if verified:
        with serve("--verifier", str(args.verifier)) as process:
            defaults = asyncio.run(_verified_defaults(process.target, pairs, args.concurrency))
        # float32 on the wire: the gate is a multiple of 0.05 (or the flag's value)
        gate = gate if gate is not None else round(float(defaults["policy"]["gate"]), 4)  # type: ignore[index]
    flags = ("--verifier", str(args.verifier), "--verify-threshold", "0",
             "--verify-gate", str(gate)) if verified else ()
    server = nullcontext(None) if args.target else serve(*flags)
    with server as process:
        target = args.target or process.target
        with Client(target, api_key=args.api_key) as c:
            default = round(float(c.stats()["default_min_similarity"]), 6)
        raw = asyncio.run(_run(target, pairs, args.concurrency, verified, gate, evidence,
                               bounds, other))
    elapsed = time.perf_counter() - started

    thresholds = sorted(set(args.thresholds) | {default})
    plain = _evaluate(raw["plain"], pairs, thresholds, False)  # type: ignore[arg-type]
    info = machine()
    print(f"\nmachine: {info['cpu']}, {info['cores']} cores, {info['simd_isa']}; data "
          f"{args.data.name} part {part}: {len(pairs)} of {total} pairs (seed {args.seed}); "
          f"server default threshold {default}; {elapsed:.0f} s")
    print("\nplain cosine threshold:")
    print(format_table(plain["pair"], plain["crowded"]["by_threshold"], default,  # type: ignore[arg-type, index]
                       label="server default"))
    payload: dict[str, object] = {
        "machine": info, "data": {"path": str(args.data), "part": part, "pairs": len(pairs),
                                  "pairs_in_file": total, "seed": args.seed},
        "server": {"target": args.target or "own", "default_min_similarity": default},
        "method": "lookups with min_similarity=0 return the best candidate above the "
                  "namespace's gate; a threshold t serves those whose score (cosine, or the "
                  "verifier's) is >= t, the same comparison the server makes",
        "elapsed_s": elapsed, "phase_s": {k: v["timings"] for k, v in raw.items()  # type: ignore[index]
                                         if isinstance(v, dict) and "timings" in v},
        "at_default": {"pair": next(r for r in plain["pair"] if r["threshold"] == default),  # type: ignore[union-attr, index]
                       "crowded": next(r for r in plain["crowded"]["by_threshold"]  # type: ignore[index]
                                       if r["threshold"] == default)},
        "plain": _public(plain)}
    summary = {"plain": plain}
    if verified:
        policy = defaults["policy"]
        threshold = float(policy["threshold"])  # type: ignore[index]
        grid = sorted({round(x / 100, 2) for x in range(0, 101, 5)}
                      | {round(x / 100, 2) for x in range(80, 100)} | {threshold})
        ver = _evaluate(raw["verified"], pairs, grid, True)  # type: ignore[arg-type]
        summary["verified"] = ver
        print(f"\nverified (cosine gate {gate}, threshold on the decision score):")
        print(format_table(ver["pair"], ver["crowded"]["by_threshold"], threshold,  # type: ignore[arg-type, index]
                           label="default"))
        at_defaults = _at_defaults(defaults["raw"], plain, ver, pairs, threshold, default)  # type: ignore[arg-type]
        print(f"\nserver defaults, side by side (the verifier's: {policy['threshold_source']}: "  # type: ignore[index]
              f"{policy['message']})")
        print(_defaults_table(at_defaults))
        payload["verified_defaults"] = {"policy": policy, **at_defaults}
        print("\nprecision at recall 0.50 (test part, 95% Wilson intervals):")
        print(_summary_table(summary))
        checks = {name: [_bound_check(cal, summary[name], pairs, raw[name])  # type: ignore[arg-type]
                         for cal in raw["calibrated"][name]]  # type: ignore[index]
                  for name in ("plain", "verified")}
        print(f"\nwrong-hit bounds calibrated by the server on the calibrate part "
              f"({len(evidence)} pairs), measured on the test part:")
        print(_bounds_table(checks))
        payload.update({"verified": _public(ver), "verify_gate": gate,
                        "verifier": str(args.verifier), "bounds": checks,
                        "calibration_evidence_pairs": len(evidence)})
        if other:
            payload["other_domain"] = _other_domain(raw, other, checks, default, threshold)
            print(f"\nother domain ({args.other_domain.name}, {len(other)} pairs), pair "
                  "protocol recall at the same settings:")
            for row in payload["other_domain"]["rows"]:  # type: ignore[index]
                print(f"  {row['setting']:<44} recall {_fmt(row['recall']):<24} "
                      f"precision {_fmt(row['precision'])}")
    path = write_json("hit_quality", payload, args.out)
    args.plot.parent.mkdir(parents=True, exist_ok=True)
    _plot(args.plot, summary, default)
    print(f"wrote {path} and {args.plot}")
    return 0


def _at_defaults(raw: dict[str, object], plain: dict[str, object], swept: dict[str, object],
                 pairs: list[LabelledPair], threshold: float,
                 cosine_default: float) -> dict[str, object]:
    """Both protocols as the defaults server decided them (a hit or not), beside the cosine
    default from the plain sweep; and how many pair decisions the sweep, read at the default
    threshold, reproduces."""
    duplicate = [p.duplicate for p in pairs]
    hits = [bool(r.hit) for r in raw["pair"]]  # type: ignore[attr-defined, union-attr]
    pair = pair_counts(hits, duplicate)
    served = [(r.matched_prompt, 1.0) if r.hit else ("", -1.0)  # type: ignore[attr-defined]
              for r in raw["crowded"]]  # type: ignore[union-attr]
    _, crowded = crowded_rows(pairs, served, set(raw["stored"]), [0.0])  # type: ignore[arg-type]
    swept_hits = [s >= threshold for s in swept["pair_scores"]]  # type: ignore[union-attr]
    cos_pair = next(r for r in plain["pair"] if r["threshold"] == cosine_default)  # type: ignore[union-attr, index]
    cos_crowded = next(r for r in plain["crowded"]["by_threshold"]  # type: ignore[index]
                       if r["threshold"] == cosine_default)
    ratio = (pair["recall"]["value"] / cos_pair["recall"]["value"]  # type: ignore[index, operator]
             if cos_pair["recall"]["value"] else None)  # type: ignore[index]
    return {"verified": {"pair": pair, "crowded": crowded[0]},
            "cosine_default": {"threshold": cosine_default, "pair": cos_pair,
                               "crowded": cos_crowded},
            "pair_recall_ratio": ratio,
            "sweep_agreement": sum(a == b for a, b in zip(hits, swept_hits)) / max(1, len(hits))}


def _defaults_table(d: dict[str, object]) -> str:
    lines = [f"{'setting':<22} {'pair P':<22} {'pair R':<22} {'crowded labelled P':<22} "
             f"{'crowded R':<22}", "-" * 112]
    for name, row in (("cosine default", d["cosine_default"]), ("verifier, defaults",
                                                               d["verified"])):
        p, c = row["pair"], row["crowded"]  # type: ignore[index]
        lines.append(f"{name:<22} {_fmt(p['precision']):<22} {_fmt(p['recall']):<22} "
                     f"{_fmt(c['labelled_precision']):<22} {_fmt(c['recall']):<22}")
    ratio = d["pair_recall_ratio"]
    lines.append(f"pair recall, verifier / cosine: {'-' if ratio is None else f'{ratio:.2f}'}x; "  # type: ignore[str-format]
                 f"the sweep at the default threshold reproduces {d['sweep_agreement']:.1%} of "
                 "the defaults server's pair decisions")
    return "\n".join(lines)


def _public(evaluation: dict[str, object]) -> dict[str, object]:
    return {k: v for k, v in evaluation.items() if k not in ("pair_scores", "crowded_served")}


def _other_domain(raw: dict[str, object], other: list[LabelledPair],
                  checks: dict[str, list[dict[str, object]]], default: float,
                  verify_default: float) -> dict[str, object]:
    duplicate = [p.duplicate for p in other]
    plain_scores = _scores(raw["other_plain"]["pair"], False)  # type: ignore[index]
    ver_scores = _scores(raw["other_verified"]["pair"], True)  # type: ignore[index]
    rows = []

    def add(setting: str, scores: list[float], t: float) -> None:
        r = pair_rows(scores, duplicate, [t])[0]
        rows.append({"setting": setting, "threshold": t, "recall": r["recall"],
                     "precision": r["precision"]})

    for t in sorted({0.80, 0.90, default}):
        add(f"plain cosine >= {t}" + (" (server default)" if t == default else ""),
            plain_scores, t)
    for t in sorted({0.5, 0.8, 0.9, verify_default}):
        add(f"verified, decision score >= {t:.4g}"
            + (" (server default)" if t == verify_default else ""), ver_scores, t)
    for name, scores in (("plain", plain_scores), ("verified", ver_scores)):
        for c in checks[name]:
            if c["threshold"] is not None:
                add(f"{name}, Quora-calibrated bound {c['bound']}", scores, float(c["threshold"]))  # type: ignore[arg-type]
    return {"pairs": len(other), "rows": rows}


if __name__ == "__main__":
    raise SystemExit(main())
