"""Send labelled pairs to a running server as calibration evidence for one namespace.

    stratacache calibrate --pairs heldout-calibrate.jsonl.gz --namespace support \
        --max-wrong-rate 0.01

Each pair (a = a stored prompt, b = a lookup prompt, duplicate = serving a's answer for b is
right) is scored by the server's own embedder and verifier and kept in the data directory; with
--max-wrong-rate the namespace's policy is set too. Prints the decision rule the evidence
supports: the threshold, the wrong-hit bound it promises and the hit rate it costs.

Use pairs from the namespace's own traffic (the Quora-tuned threshold does not transfer), and
never the pairs a verifier was trained on: `stratacache tune` writes its held-back part as
OUT/heldout-calibrate.jsonl.gz.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from . import config

DEFAULT_TARGET = f"{config.DEFAULT_HOST}:{config.DEFAULT_PORT}"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.ArgumentDefaultsHelpFormatter
    parser.add_argument("--pairs", type=Path, required=True,
                        help="labelled pairs, JSON lines {\"a\", \"b\", \"duplicate\"} (.gz ok)")
    parser.add_argument("--namespace", default="default", help="namespace the evidence is for")
    parser.add_argument("--target", default=os.environ.get("STRATACACHE_TARGET", DEFAULT_TARGET),
                        help="server address host:port [env STRATACACHE_TARGET]")
    parser.add_argument("--api-key", default=os.environ.get("STRATACACHE_API_KEY"),
                        help="the server's API key, if it has one [env STRATACACHE_API_KEY]")
    parser.add_argument("--limit", type=int, default=None, help="send only the first N pairs")
    parser.add_argument("--max-wrong-rate", type=float, default=None,
                        help="also set the namespace's wrong-hit bound, e.g. 0.01")
    parser.add_argument("--clear", action="store_true",
                        help="forget the namespace's earlier evidence first")
    parser.add_argument("--json", action="store_true", help="print the status as JSON")


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .client import Client
    from .pairs import read_pairs

    pairs = read_pairs(args.pairs, args.limit)
    with Client(args.target, api_key=args.api_key) as client:
        if args.clear or args.max_wrong_rate is not None:
            current = client.get_policy(args.namespace)
            client.set_policy(args.namespace, max_wrong_rate=args.max_wrong_rate,
                              min_similarity=current["min_similarity"], verify=current["verify"],
                              clear_evidence=args.clear)
        with tqdm(total=len(pairs), unit="pair", desc="scoring on the server") as bar:
            result = client.add_evidence(args.namespace, [(p.a, p.b, p.duplicate) for p in pairs],
                                         progress=bar.update)
    status = result["policy"]
    if args.json:
        print(json.dumps({"added": result["added"], "skipped": result["skipped"],
                          "policy": status}, indent=2))
    else:
        print(f"added {result['added']} labelled pairs to namespace {args.namespace!r} "
              f"({result['skipped']} skipped: longer than the model reads); "
              f"{status['evidence']} in all")
        print(status["message"])
    return 0
