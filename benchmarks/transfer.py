"""``stratacache export`` and ``import``: entries per second, and a round trip that loses nothing.

Builds a source data directory of ``--entries`` entries with the tiers' bulk writers (no
server: filling 100,000 through Stores would take the embedding time this benchmark does not
measure): real QQP questions as prompts (the distinct questions of the shared file, then
"(variant k) " copies, as in ``scale.py``), each with a ``--response-bytes`` response; 3
namespaces, a fifth of the entries in the warm tier and the rest in cold, one in ten of a user
(their records encrypted), one in four with a TTL, every one with metadata. Vectors are real
embeddings of the questions, computed once per distinct question and *reused* for its variants
(the import copies vectors, it never compares them, so this changes no figure here).

Then, each timed from the command's call to its return (as ``stratacache export`` and
``import`` run, progress bars off):

1. export of the source directory to a file;
2. import of that dump into a new directory of the same model (vectors copied, no embedding);
3. export of the imported directory, compared with the first dump: same entry ids, same count,
   and every entry line byte for byte (the round trip check);
4. import of the first ``--embed-entries`` lines with their vectors removed, so that every
   prompt is embedded with the model (what a dump of another model costs; smaller N: the model
   dominates).

Prints a table and writes JSON (benchmarks/results/transfer.json, or --out).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from stratacache import datadir, keys
from stratacache.datadir import DataDir
from stratacache.embed import Encoder
from stratacache.keyring import KeyRing
from stratacache.records import Entry
from stratacache.tiers import cold, warm
from stratacache.transfer import export, import_dump

from ._common import DEFAULT_DATA, RESULTS, distinct_texts, load_pairs, machine, table, write_json
from .scale import embed_all, stored_text

NAMESPACES = ("support", "search", "code")
WRITE_BATCH = 2048


def build_source(path: Path, encoder: Encoder, pool: list[str], vectors: np.ndarray, n: int,
                 response_bytes: int) -> dict[str, int]:
    """Writes ``n`` entries into a new data directory at ``path``; returns entries per tier."""
    DataDir(path, encoder.identity).close()  # the manifest
    now = time.time()
    filler = (b"stratacache transfer benchmark response " * (response_bytes // 41 + 1))
    counts = {"warm": 0, "cold": 0}
    with KeyRing(path / datadir.KEYS) as ring:
        writers = {"warm": warm.BulkWriter(path / datadir.WARM, map_size=1 << 30, keys=ring),
                   "cold": cold.BulkWriter(path / datadir.COLD, keys=ring)}
        try:
            for start in range(0, n, WRITE_BATCH):
                batch: dict[str, list[Entry]] = {"warm": [], "cold": []}
                for i in range(start, min(n, start + WRITE_BATCH)):
                    prompt = stored_text(pool, i)
                    namespace = NAMESPACES[i % len(NAMESPACES)]
                    partition = keys.partition_key(namespace, {"model": "gpt-4o"}, None, None)
                    batch["warm" if i % 5 == 0 else "cold"].append(Entry(
                        id=f"{i:032x}", namespace=namespace, partition=partition,
                        exact_key=keys.exact_key(partition, keys.normalise_prompt(prompt)),
                        prompt=prompt, response=filler[:response_bytes],
                        vector=vectors[i % len(pool)], created_at=now - n + i,
                        expires_at=now + 86400 if i % 4 == 0 else None,
                        user_id=f"user-{i % 100}" if i % 10 == 0 else None,
                        metadata={"source": "qqp", "row": str(i)}))
                for tier, entries in batch.items():
                    if entries:
                        writers[tier].put(entries)
                        counts[tier] += len(entries)
        finally:
            for writer in writers.values():
                writer.close()
    return counts


def timed_export(data: Path, out: Path) -> dict[str, float]:
    with open(out, "wb") as f:
        started = time.perf_counter()
        outcome = export(data, f, progress=False)
        seconds = time.perf_counter() - started
    return {"entries": outcome.entries, "seconds": round(seconds, 2),
            "entries_per_s": round(outcome.entries / seconds), "dump_mib":
            round(out.stat().st_size / (1 << 20), 1)}


def timed_import(data: Path, dump: Path, encoder: Encoder, batch_size: int) -> dict[str, float]:
    started = time.perf_counter()
    outcome = import_dump(data, dump, encoder=encoder, batch_size=batch_size, progress=False)
    seconds = time.perf_counter() - started
    assert outcome.complete and outcome.bad == 0, outcome
    return {"entries": outcome.imported, "embedded": outcome.embedded,
            "seconds": round(seconds, 2), "entries_per_s": round(outcome.imported / seconds)}


def entry_lines(dump: Path) -> list[bytes]:
    return dump.read_bytes().splitlines()[1:-1]


def without_vectors(dump: Path, out: Path, n: int) -> None:
    """The header and first ``n`` entry lines of ``dump``, vectors removed, with a trailer."""
    with open(dump, "rb") as f, open(out, "wb") as o:
        o.write(f.readline())
        for _ in range(n):
            line = json.loads(f.readline())
            line["vector"] = None
            o.write(json.dumps(line, ensure_ascii=False, separators=(",", ":")).encode() + b"\n")
        o.write(json.dumps({"end": {"entries": n}}).encode() + b"\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="QQP pairs file")
    parser.add_argument("--entries", type=int, default=100_000,
                        help="entries exported and imported (default %(default)s)")
    parser.add_argument("--embed-entries", type=int, default=2_000,
                        help="entries imported with every prompt embedded (default %(default)s)")
    parser.add_argument("--questions", type=int, default=2_000,
                        help="distinct QQP questions embedded for the vectors (default "
                             "%(default)s); entries beyond are variants reusing them")
    parser.add_argument("--response-bytes", type=int, default=1024,
                        help="bytes of each response (default %(default)s)")
    parser.add_argument("--batch-size", type=int, default=1024,
                        help="import batch (lines per commit) (default %(default)s)")
    parser.add_argument("--device", default="cpu", help="embedding device (default %(default)s)")
    parser.add_argument("--out", type=Path, default=RESULTS / "transfer.json", help="JSON path")
    args = parser.parse_args(argv)

    info = machine()
    print(f"machine: {info['cpu']}, {info['cores']} cores, python {info['python']}; load "
          f"average at start {os.getloadavg()[0]:.2f}")
    encoder = Encoder("default", device=args.device)
    pool = distinct_texts(load_pairs(args.data, args.questions))[:args.questions]
    started = time.perf_counter()
    vectors = embed_all(encoder, [keys.normalise_prompt(t) for t in pool], "embed questions")
    embed_s = time.perf_counter() - started
    params = (f"{args.entries:,} entries ({len(pool):,} distinct QQP questions, vectors reused "
              f"for variants), response {args.response_bytes} B, import batch "
              f"{args.batch_size}; re-embedding import of {args.embed_entries:,} on "
              f"{encoder.device}")
    print(params)
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="stratacache-transfer-") as tmp:
        root = Path(tmp)
        started = time.perf_counter()
        placed = build_source(root / "source", encoder, pool, vectors, args.entries,
                              args.response_bytes)
        build_s = time.perf_counter() - started
        dump, again, bare = root / "dump.jsonl", root / "again.jsonl", root / "bare.jsonl"
        results["export"] = timed_export(root / "source", dump)
        results["import, same model"] = timed_import(root / "imported", dump, encoder,
                                                     args.batch_size)
        results["export of the import"] = timed_export(root / "imported", again)
        first, second = entry_lines(dump), entry_lines(again)
        ids = [json.loads(x)["id"] for x in first]
        round_trip = {"same_count": len(first) == len(second) == args.entries,
                      "same_ids": ids == [json.loads(x)["id"] for x in second],
                      "same_lines": first == second, "distinct_ids": len(set(ids)) == len(ids)}
        del first, second
        n = min(args.embed_entries, args.entries)
        without_vectors(dump, bare, n)
        results["import, embedding every prompt"] = timed_import(root / "embedded", bare,
                                                                 encoder, args.batch_size)
    rows = [(name, f"{r['entries']:,}", r["seconds"], f"{r['entries_per_s']:,}",
             r.get("dump_mib", ""), r.get("embedded", "")) for name, r in results.items()]
    print(table(rows, ["step", "entries", "s", "entries/s", "dump MiB", "embedded"]))
    print(f"round trip: {round_trip}")
    print(f"(source built with the bulk writers in {build_s:.1f} s; {len(pool):,} questions "
          f"embedded in {embed_s:.1f} s; warm {placed['warm']:,}, cold {placed['cold']:,})")
    path = write_json("transfer", {"machine": info, "parameters": vars(args) | {
        "data": str(args.data), "out": str(args.out)}, "description": params,
        "source": placed, "results": results, "round_trip": round_trip,
        "build_s": round(build_s, 2), "question_embed_s": round(embed_s, 2)}, args.out)
    print(f"wrote {path}")
    return 0 if all(round_trip.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
