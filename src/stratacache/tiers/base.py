"""What every tier shares: the search candidate type."""

from __future__ import annotations

from typing import NamedTuple


class Candidate(NamedTuple):
    """A search result: an entry id and its cosine similarity to the query, in [-1, 1]."""

    entry_id: str
    similarity: float
