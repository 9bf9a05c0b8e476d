"""Exact keys and partition keys.

A *partition* is everything that must match exactly for an entry to be served: namespace, scope
(model, system prompt, parameters, conversation digest...), template id and template version.
Each partition has its own vector index, so filtering by scope never costs recall: a search only
ever sees entries that may be served.

The *exact key* adds the normalised prompt to the partition: two prompts with equal exact keys
get the stored answer without computing an embedding.
"""

from __future__ import annotations

import hashlib
import unicodedata
from collections.abc import Mapping

#: Digest size in bytes of partition and exact keys (128 bits: collisions are out of reach).
KEY_BYTES = 16


def normalise_prompt(prompt: str) -> str:
    """Unicode NFC with surrounding whitespace stripped. Nothing else: case, punctuation and
    inner whitespace can change what a prompt asks (code indentation, names, units)."""
    return unicodedata.normalize("NFC", prompt).strip()


def _digest(*fields: str | None) -> bytes:
    h = hashlib.blake2b(digest_size=KEY_BYTES)
    for field in fields:
        if field is None:
            h.update(b"\x00")  # absent differs from empty
        else:
            data = field.encode("utf-8")
            h.update(b"\x01" + len(data).to_bytes(4, "little") + data)
    return h.digest()


def partition_key(namespace: str, scope: Mapping[str, str], template_id: str | None,
                  template_version: str | None) -> bytes:
    """The partition an entry lives in; equal only when every exact-match field is equal."""
    flat: list[str | None] = [namespace, template_id, template_version, str(len(scope))]
    for key in sorted(scope):
        flat += [key, scope[key]]
    return _digest(*flat)


def exact_key(partition: bytes, normalised_prompt: str) -> bytes:
    """The key of the exact tier: partition plus normalised prompt."""
    return _digest(partition.hex(), normalised_prompt)
