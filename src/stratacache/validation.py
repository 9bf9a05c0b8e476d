"""The ``validate`` step: every limit a request must meet, checked before any work is done.

Each message names the field, the rule and the value's size, so a person can fix the call.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import TypeVar

from .errors import InvalidArgument
from .messages import LookupRequest, StoreRequest

NAMESPACE_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
ENTRY_ID_PATTERN = re.compile(r"[0-9a-f]{32}")
MAX_PROMPT_BYTES = 32 * 1024
MAX_RESPONSE_BYTES = 4 * 1024 * 1024
MAX_MAP_ITEMS = 64
MAX_MAP_KEY_BYTES = 128
#: A scope value may hold a whole system prompt; past this, pass a digest of it instead.
MAX_MAP_VALUE_BYTES = 16 * 1024
MAX_MAP_TOTAL_BYTES = 64 * 1024
MAX_LABEL_BYTES = 256
MAX_TTL_S = 10 * 365 * 24 * 3600.0
#: Labelled pairs one AddEvidence call may carry.
MAX_EVIDENCE_PAIRS = 10_000


def namespace(value: str) -> str:
    """The namespace to use ("" means "default")."""
    value = value or "default"
    if not NAMESPACE_PATTERN.fullmatch(value):
        raise InvalidArgument(
            f"namespace {value[:64]!r} is malformed: use 1 to 128 characters of letters, digits "
            "and . _ : -, starting with a letter or digit")
    return value


def entry_id(value: str) -> str:
    if not ENTRY_ID_PATTERN.fullmatch(value):
        raise InvalidArgument(
            f"entry_id {value[:64]!r} is malformed: an entry id is 32 lowercase hex characters, "
            "as returned by Store")
    return value


def required_label(name: str, value: str | None) -> str:
    if not value:
        raise InvalidArgument(f"{name} is required and must not be empty")
    return _label(name, value)


def _label(name: str, value: str | None) -> str | None:
    if value is not None and len(value.encode()) > MAX_LABEL_BYTES:
        raise InvalidArgument(f"{name} is {len(value.encode())} bytes; at most {MAX_LABEL_BYTES}")
    if value == "":
        raise InvalidArgument(f"{name} is empty: leave it unset instead")
    return value


def prompt(value: str, name: str = "prompt") -> str:
    size = len(value.encode())
    if not value.strip():
        raise InvalidArgument(f"{name} is empty: give the text that is sent to the model")
    if size > MAX_PROMPT_BYTES:
        raise InvalidArgument(
            f"{name} is {size} bytes; at most {MAX_PROMPT_BYTES} bytes are cached "
            "(send longer prompts to the model directly)")
    return value


def labelled_pairs(pairs: Sequence[tuple[str, str, bool]]) -> None:
    """AddEvidence's pairs: 1 to MAX_EVIDENCE_PAIRS per call, each text a valid prompt."""
    if not pairs:
        raise InvalidArgument("no pairs given: send labelled (a, b, duplicate) pairs")
    if len(pairs) > MAX_EVIDENCE_PAIRS:
        raise InvalidArgument(f"{len(pairs)} pairs in one call; send at most "
                              f"{MAX_EVIDENCE_PAIRS} per call (the client splits larger sets)")
    for i, (a, b, _) in enumerate(pairs):
        prompt(a, f"pairs[{i}].a")
        prompt(b, f"pairs[{i}].b")


def _string_map(name: str, value: Mapping[str, str]) -> None:
    if len(value) > MAX_MAP_ITEMS:
        raise InvalidArgument(f"{name} has {len(value)} keys; at most {MAX_MAP_ITEMS}")
    total = 0
    for key, item in value.items():
        key_bytes, item_bytes = len(key.encode()), len(item.encode())
        if not key or key_bytes > MAX_MAP_KEY_BYTES:
            raise InvalidArgument(
                f"{name} key {key[:32]!r} must be 1 to {MAX_MAP_KEY_BYTES} bytes")
        if item_bytes > MAX_MAP_VALUE_BYTES:
            raise InvalidArgument(
                f"{name}[{key!r}] is {item_bytes} bytes; at most {MAX_MAP_VALUE_BYTES} "
                "(pass a digest of long values, such as a system prompt's SHA-256)")
        total += key_bytes + item_bytes
    if total > MAX_MAP_TOTAL_BYTES:
        raise InvalidArgument(f"{name} is {total} bytes in all; at most {MAX_MAP_TOTAL_BYTES}")


def _template(template_id: str | None, template_version: str | None) -> None:
    _label("template_id", template_id)
    _label("template_version", template_version)
    if template_version is not None and template_id is None:
        raise InvalidArgument(
            "template_version is set but template_id is not: a version only means something "
            "for a template, so give both or neither")


def store(request: StoreRequest) -> StoreRequest:
    """The request with its namespace defaulted, or InvalidArgument."""
    prompt(request.prompt)
    if len(request.response) > MAX_RESPONSE_BYTES:
        raise InvalidArgument(
            f"response is {len(request.response)} bytes; at most {MAX_RESPONSE_BYTES} are cached")
    _string_map("scope", request.scope)
    _string_map("metadata", request.metadata)
    _template(request.template_id, request.template_version)
    _label("user_id", request.user_id)
    ttl = request.ttl_s
    if ttl is not None and not (math.isfinite(ttl) and 0 < ttl <= MAX_TTL_S):
        raise InvalidArgument(
            f"ttl_s is {ttl}; give seconds in (0, {MAX_TTL_S:.0f}], or leave it unset for no expiry")
    return _with_namespace(request)


def lookup(request: LookupRequest) -> LookupRequest:
    prompt(request.prompt)
    _string_map("scope", request.scope)
    _template(request.template_id, request.template_version)
    m = request.min_similarity
    if m is not None and not (math.isfinite(m) and 0.0 <= m <= 1.0):
        raise InvalidArgument(
            f"min_similarity is {m}; give a cosine similarity in [0, 1], or leave it unset for "
            "the server default")
    return _with_namespace(request)


_Request = TypeVar("_Request", StoreRequest, LookupRequest)


def _with_namespace(request: _Request) -> _Request:
    ns = namespace(request.namespace)
    return request if ns == request.namespace else replace(request, namespace=ns)
