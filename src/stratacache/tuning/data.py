"""What ``stratacache tune`` learns from and what it holds back: the labelled-pair file split
text-disjointly (:data:`~stratacache.pairs.STANDARD_PARTS`), the feedback rows a server stored,
and the pairs implied by the train labels."""

from __future__ import annotations

import hashlib
import logging
import random
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import InvalidArgument
from ..pairs import SPLIT_SALT, STANDARD_PARTS, LabelledPair, TextClusters, read_pairs, split

log = logging.getLogger("stratacache.tune")

#: The part trained on, and the held-back part the card's metrics are measured on.
TRAIN_PART, HELDOUT_PART = "train", "calibrate"


@dataclass
class Data:
    """The pairs of one tune run."""

    pairs_path: Path
    pairs_sha256: str
    parts: dict[str, list[LabelledPair]]  # the split of the pairs file, by part name
    feedback: list[LabelledPair]  # feedback rows used (none shares a text with a held part)
    feedback_dropped: int  # feedback rows left out because they did
    train: list[LabelledPair]  # train part + feedback (+ implied pairs); one order
    implied: int  # implied pairs in ``train``
    counts: dict[str, dict[str, int]]  # per part: pairs and duplicates


def read_feedback(data_dir: Path) -> list[LabelledPair]:
    """The feedback rows a server stored in ``data_dir/evidence.sqlite3``.

    Args:
        data_dir: a server data directory.

    Returns:
        One pair per row: a = the cached prompt that matched, b = the query, duplicate = the
        verdict; empty when the file does not exist.

    Raises:
        InvalidArgument: ``data_dir`` is not a directory, or the file is not readable.
    """
    path = data_dir / "evidence.sqlite3"
    if not data_dir.is_dir():
        raise InvalidArgument(f"--data-dir {str(data_dir)!r} is not a directory")
    if not path.is_file():
        log.info("no feedback: %s does not exist", path)
        return []
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        rows = conn.execute(
            "SELECT matched, query, correct FROM evidence WHERE source = 'feedback' "
            "AND matched IS NOT NULL AND query IS NOT NULL AND correct IS NOT NULL "
            "ORDER BY id").fetchall()
    except sqlite3.DatabaseError as exc:
        raise InvalidArgument(f"cannot read feedback from {path}: {exc}") from None
    finally:
        conn.close()
    pairs = [LabelledPair(str(m), str(q), bool(c)) for m, q, c in rows
             if str(m).strip() and str(q).strip()]
    log.info("feedback: %d rows from %s (%d marked correct)", len(pairs), path,
             sum(p.duplicate for p in pairs))
    return pairs


def transitive_pairs(pairs: Sequence[LabelledPair], *, max_cluster: int,
                     seed: int) -> list[LabelledPair]:
    """Pairs implied by ``pairs`` and not in it: duplicate labels closed under union into
    clusters (every two members of a cluster are duplicates), and a non-duplicate label between
    two texts extended to every member of their two clusters.

    Args:
        pairs: the labelled pairs.
        max_cluster: clusters bigger than this contribute a random ``max_cluster`` members.
        seed: for that choice and the order of the result.

    Returns:
        The implied pairs, shuffled; a non-duplicate label inside one cluster (contradictory
        labels) adds nothing.
    """
    clusters = TextClusters()
    for p in pairs:
        clusters.root(p.a), clusters.root(p.b)
        if p.duplicate:
            clusters.join(p.a, p.b)
    root = clusters.root
    members: dict[str, list[str]] = {}
    for text in clusters.texts():
        members.setdefault(root(text), []).append(text)
    rng = random.Random(seed)
    for key, texts in members.items():
        texts.sort()
        if len(texts) > max_cluster:
            members[key] = rng.sample(texts, max_cluster)
    seen = {frozenset((p.a, p.b)) for p in pairs}
    implied: list[LabelledPair] = []

    def add(a: str, b: str, duplicate: bool) -> None:
        key = frozenset((a, b))
        if a != b and key not in seen:
            seen.add(key)
            implied.append(LabelledPair(a, b, duplicate))

    for texts in members.values():
        for i, a in enumerate(texts):
            for b in texts[i + 1:]:
                add(a, b, True)
    for p in pairs:
        if p.duplicate:
            continue
        ra, rb = root(p.a), root(p.b)
        if ra == rb:
            continue
        for a in members[ra]:
            for b in members[rb]:
                add(a, b, False)
    rng.shuffle(implied)
    return implied


def load_data(path: Path, *, limit: int, data_dir: Path | None, transitive: bool,
              max_cluster: int, seed: int) -> Data:
    """Reads and splits the pairs, adds the feedback and the implied pairs.

    Args:
        path: the labelled-pair file (``--pairs``).
        limit: read only its first ``limit`` pairs; 0 = all.
        data_dir: a server data directory whose feedback rows join the train part, or None.
        transitive: add the pairs the train labels imply (:func:`transitive_pairs`).
        max_cluster: members of one duplicate cluster used for implied pairs.
        seed: for the implied pairs.

    Raises:
        InvalidArgument: a file is missing or malformed, or the train part is empty.
    """
    if not path.is_file():
        raise InvalidArgument(f"--pairs file {str(path)!r} does not exist")
    log.info("reading pairs from %s%s", path, f" (first {limit})" if limit else "")
    pairs = read_pairs(path, limit=limit or None)
    if not pairs:
        raise InvalidArgument(f"--pairs file {str(path)!r} holds no pairs")
    parts = split(pairs, STANDARD_PARTS, salt=SPLIT_SALT)
    counts = {name: {"pairs": len(ps), "duplicates": sum(p.duplicate for p in ps)}
              for name, ps in parts.items()}
    log.info("%d pairs (%d duplicates), split without shared texts: %s", len(pairs),
             sum(p.duplicate for p in pairs),
             ", ".join(f"{n} {c['pairs']} ({c['duplicates']} dup)" for n, c in counts.items()))
    if not parts[TRAIN_PART]:
        raise InvalidArgument(f"the train part of {str(path)!r} is empty: give more pairs")
    feedback: list[LabelledPair] = []
    dropped = 0
    if data_dir is not None:
        held_texts = {t for name, ps in parts.items() if name != TRAIN_PART
                      for p in ps for t in (p.a, p.b)}
        for p in read_feedback(data_dir):
            if p.a in held_texts or p.b in held_texts:
                dropped += 1  # would leak held-back text into training
            else:
                feedback.append(p)
        if dropped:
            log.info("feedback: %d rows left out because they share a text with the held-back "
                     "parts", dropped)
    train = parts[TRAIN_PART] + feedback
    implied: list[LabelledPair] = []
    if transitive:
        implied = transitive_pairs(train, max_cluster=max_cluster, seed=seed)
        log.info("transitive closure of the train labels adds %d pairs (%d duplicates)",
                 len(implied), sum(p.duplicate for p in implied))
    with path.open("rb") as f:
        sha256 = hashlib.file_digest(f, "sha256").hexdigest()
    return Data(path, sha256, parts, feedback, dropped, train + implied, len(implied), counts)
