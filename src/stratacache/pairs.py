"""Labelled prompt pairs: the file format ``tune``, ``calibrate`` and the benchmarks read, and
the text-disjoint split every held-back figure is measured on.

Format: JSON lines (optionally gzip-compressed, by a ``.gz`` suffix), one pair a line::

    {"a": "How do I learn Python fast?", "b": "Quickest way to learn Python?", "duplicate": true}

``duplicate`` true means serving ``a``'s answer for ``b`` is right.

A question text often recurs across pairs. Splitting pairs at random would put the same text on
both sides and flatter whatever was tuned on one side (on QQP a threshold looks 11 points more
precise that way). :func:`split` therefore puts whole connected components of the text graph
(texts joined by any labelled pair) on one side, chosen by a hash of the component, so no text
is in two parts and the split is the same on every machine and every run.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from .errors import InvalidArgument

#: The parts of the standard split, as fractions of the text components: ``train`` is what
#: ``tune`` learns from, ``calibrate`` is evidence for choosing decision thresholds (tune reports
#: its held-back metrics there), ``test`` is touched only by benchmarks.
STANDARD_PARTS: Mapping[str, float] = {"train": 0.70, "calibrate": 0.15, "test": 0.15}
#: The standard split's salt: another salt draws another split.
SPLIT_SALT = "stratacache-split-v1"


@dataclass(frozen=True, slots=True)
class LabelledPair:
    a: str
    b: str
    duplicate: bool


def _open_text(path: Path) -> io.TextIOBase:
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8")  # type: ignore[return-value]
    return open(path, encoding="utf-8")


def read_pairs(path: Path | str, limit: int | None = None) -> list[LabelledPair]:
    """Reads a labelled-pair file (see the module docstring).

    Raises:
        InvalidArgument: the file is missing, or a line is not a pair (the message names it).
    """
    path = Path(path)
    if not path.is_file():
        raise InvalidArgument(f"pairs file {str(path)!r} does not exist")
    pairs: list[LabelledPair] = []
    with _open_text(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                pair = LabelledPair(str(row["a"]), str(row["b"]), _boolean(row["duplicate"]))
            except (ValueError, KeyError, TypeError) as exc:
                raise InvalidArgument(
                    f"{path}:{number}: not a labelled pair ({exc}); each line must be a JSON "
                    'object like {"a": "...", "b": "...", "duplicate": true}') from None
            if not pair.a.strip() or not pair.b.strip():
                raise InvalidArgument(f"{path}:{number}: 'a' and 'b' must be non-empty texts")
            pairs.append(pair)
            if limit is not None and len(pairs) >= limit:
                break
    return pairs


def _boolean(value: object) -> bool:
    if isinstance(value, bool):
        return value
    if value in (0, 1):
        return bool(value)
    raise TypeError(f"'duplicate' must be true or false, not {value!r}")


def write_pairs(path: Path | str, pairs: Iterable[LabelledPair]) -> int:
    """Writes pairs in the same format (gzip when the name ends in ``.gz``); returns how many."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    count = 0
    with opener(path, "wt", encoding="utf-8") as f:  # type: ignore[operator]
        for p in pairs:
            f.write(json.dumps({"a": p.a, "b": p.b, "duplicate": p.duplicate},
                               ensure_ascii=False) + "\n")
            count += 1
    return count


class TextClusters:
    """Union-find over texts: texts joined directly or through others share a root."""

    def __init__(self) -> None:
        self._parent: dict[str, str] = {}

    def root(self, text: str) -> str:
        parent = self._parent
        parent.setdefault(text, text)
        while parent[text] != text:
            parent[text] = parent[parent[text]]
            text = parent[text]
        return text

    def join(self, a: str, b: str) -> None:
        ra, rb = self.root(a), self.root(b)
        if ra != rb:
            self._parent[ra] = rb

    def texts(self) -> list[str]:
        return list(self._parent)


def components(pairs: Sequence[LabelledPair]) -> list[int]:
    """For each pair, the id of its connected component in the graph of texts joined by pairs
    (the smallest index of a pair in it)."""
    clusters = TextClusters()
    for p in pairs:
        clusters.join(p.a, p.b)
    first: dict[str, int] = {}
    return [first.setdefault(clusters.root(p.a), i) for i, p in enumerate(pairs)]


def split(pairs: Sequence[LabelledPair], parts: Mapping[str, float] = STANDARD_PARTS,
          *, salt: str = SPLIT_SALT) -> dict[str, list[LabelledPair]]:
    """Splits pairs so that no text is in two parts (see the module docstring). Each component
    goes to a part by a hash of its smallest text, with probability given by ``parts``
    (fractions; normalised)."""
    total = sum(parts.values())
    if total <= 0 or any(f < 0 for f in parts.values()):
        raise InvalidArgument("split fractions must be non-negative and not all zero")
    bounds, acc = [], 0.0
    for name, fraction in parts.items():
        acc += fraction / total
        bounds.append((acc, name))
    comp = components(pairs)
    smallest: dict[int, str] = {}
    for c, p in zip(comp, pairs):
        smallest[c] = min(smallest.get(c, p.a), p.a, p.b)
    out: dict[str, list[LabelledPair]] = {name: [] for name in parts}
    for c, p in zip(comp, pairs):
        digest = hashlib.blake2b((salt + "\0" + smallest[c]).encode(), digest_size=8).digest()
        u = int.from_bytes(digest, "big") / 2.0**64
        out[next((name for bound, name in bounds if u < bound), bounds[-1][1])].append(p)
    return out


def distinct_texts(pairs: Iterable[LabelledPair]) -> list[str]:
    """Every text of ``pairs`` once, in order of first appearance (``a`` before ``b``)."""
    return list(dict.fromkeys(t for p in pairs for t in (p.a, p.b)))
