"""Embedding speed by backend: torch against ONNX Runtime (and, on CUDA, float32 against
float16), on the same model and the same QQP questions, in one run.

For each configuration: one text's latency (p50/p99 over ``--calls`` calls, the cost under every
semantic lookup) and throughput in sentences/s per batch size (1, 8, 32, 128), and the least
cosine of its vectors against torch float32's. With ``--verifier DIR`` it also times one
verifier pair with torch float32, torch int8 (the CPU default) and the float32 ONNX graph, with
each one's largest score difference from torch float32: the figures behind the verifier's
``auto`` backend. Prints a table and writes JSON.

    python -m benchmarks.embedding [--calls 200] [--verifier OUT/verifier]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from stratacache.embed import Encoder, pick_device

from ._common import (DEFAULT_DATA, distinct_texts, load_pairs, machine, percentiles_ms, table,
                      time_calls, write_json)

BATCHES = (1, 8, 32, 128)


def _throughput(fn, texts: list[str], batch: int, seconds: float) -> float:
    """Sentences/s of ``fn`` on batches of ``batch`` texts, over at least ``seconds``."""
    fn(texts[:batch])
    done, started, i = 0, time.perf_counter(), 0
    while done < batch * 3 or time.perf_counter() - started < seconds:
        chunk = [texts[(i + k) % len(texts)] for k in range(batch)]
        fn(chunk)
        done, i = done + batch, i + batch
    return round(done / (time.perf_counter() - started), 1)


def _configurations(device: str) -> list[tuple[str, dict[str, str]]]:
    configs = [("torch float32", {"backend": "torch", "dtype": "float32"}),
               ("onnx float32", {"backend": "onnx", "dtype": "float32"})]
    if device.startswith("cuda"):  # not run on the 2-core CPU machines the README quotes
        configs += [("torch float16", {"backend": "torch", "dtype": "float16"}),
                    ("torch bfloat16", {"backend": "torch", "dtype": "bfloat16"})]
    return configs


def _verifier(folder: Path, device: str, cache: Path, calls: int,
              pairs: list[tuple[str, str]]) -> list[dict[str, object]]:
    from stratacache.verify import Verifier

    items = [(b, a, 0.9) for a, b in pairs]
    rows, reference = [], None
    for label, kwargs in (("torch float32", {"quantize": "none"}),
                          ("torch int8", {"quantize": "int8"}),
                          ("onnx float32", {"backend": "onnx", "cache_dir": cache})):
        verifier = Verifier(folder, device=device, **kwargs)
        scores = verifier.score(items)
        reference = scores if reference is None else reference
        cycle = iter(items * (calls // len(items) + 12))
        one = percentiles_ms(time_calls(lambda: verifier.score([next(cycle)]), calls))
        rows.append({"verifier": label, "int8": verifier.quantized, "one_pair": one,
                     "max_score_diff": round(float(np.abs(scores - reference).max()), 5)})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="QQP pairs file")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--calls", type=int, default=200, help="one-text calls timed")
    parser.add_argument("--seconds", type=float, default=3.0,
                        help="least seconds each batch size's throughput is measured for")
    parser.add_argument("--batches", type=lambda v: [int(x) for x in v.split(",")],
                        default=list(BATCHES), help="batch sizes, comma-separated")
    parser.add_argument("--threads", type=int, default=0, help="threads per pass (0 = default)")
    parser.add_argument("--verifier", type=Path, default=None,
                        help="verifier folder: also time one pair by backend")
    parser.add_argument("--out", type=Path, default=None, help="JSON path")
    args = parser.parse_args(argv)

    pairs = load_pairs(args.data, limit=2000)
    texts = distinct_texts(pairs)
    device = pick_device(args.device)
    rows, reference = [], None
    with tempfile.TemporaryDirectory(prefix="stratacache-onnx-") as tmp:
        for label, kwargs in _configurations(device):
            encoder = Encoder("default", device=device, threads=args.threads,
                              cache_dir=Path(tmp), **kwargs)
            vectors = encoder.encode(texts[:256])
            reference = vectors if reference is None else reference
            cosine = float(((vectors * reference).sum(1)).min())
            cycle = iter(texts * (args.calls // len(texts) + 2))
            one = percentiles_ms(time_calls(lambda: encoder.encode([next(cycle)]), args.calls))
            rates = {b: _throughput(encoder.encode, texts, b, args.seconds) for b in args.batches}
            rows.append({"config": label, "backend": encoder.backend, "dtype": encoder.dtype,
                         "one_text": one, "sentences_per_s": rates,
                         "least_cosine_vs_torch_float32": round(cosine, 7)})
            del encoder
        verifier = None if args.verifier is None else _verifier(
            args.verifier, device, Path(tmp), args.calls,
            [(p["a"], p["b"]) for p in pairs[:64]])

    info = machine()
    base = rows[0]
    print(f"\nmachine: {info['cpu']}, {info['cores']} cores; device {device}; model default "
          f"(all-MiniLM-L6-v2); {len(texts)} QQP questions")
    print(table([[r["config"], r["one_text"]["p50_ms"], r["one_text"]["p99_ms"],
                  f"{base['one_text']['p50_ms'] / r['one_text']['p50_ms']:.2f}x",
                  *[r["sentences_per_s"][b] for b in args.batches],
                  r["least_cosine_vs_torch_float32"]] for r in rows],
                ["embedder", "one text p50 ms", "p99 ms", "speed-up p50",
                 *[f"batch {b} sent/s" for b in args.batches], "least cosine"]))
    if verifier:
        print()
        print(table([[r["verifier"], r["one_pair"]["p50_ms"], r["one_pair"]["p99_ms"],
                      r["max_score_diff"]] for r in verifier],
                    ["verifier", "one pair p50 ms", "p99 ms", "max |score - torch float32|"]))
    path = write_json("embedding", {"machine": info, "device": device,
                                    "args": {k: str(v) for k, v in vars(args).items()},
                                    "embedders": rows, "verifier": verifier}, args.out)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
