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
#: ttl_s limits: below a millisecond an entry is expired before it could be served (a
#: denormal such as 5e-324 is a mistake, not a TTL); above ten years, leave ttl_s unset.
MIN_TTL_S = 0.001
MAX_TTL_S = 10 * 365 * 24 * 3600.0
#: A namespace's wrong-hit bound (max_wrong_rate) must lie in [MIN_WRONG_RATE, MAX_WRONG_RATE].
#: The floor is the smallest round bound the evidence a namespace may keep (200,000 labelled
#: observations) can support: a clean record of ~41,000 served observations meets 1e-4, while
#: 1e-5 would need ~410,000, more than is kept, so it could never serve a semantic hit (and
#: 1e-300 made the Clopper-Pearson arithmetic divide by zero). Above 0.5 a "bound" allows more
#: wrong hits than right ones: no threshold is worth calibrating for it.
MIN_WRONG_RATE = 1e-4
MAX_WRONG_RATE = 0.5
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


def explicit_namespace(value: str, call: str = "InvalidateNamespace") -> str:
    """The namespace a destructive call names; "" is refused rather than taken as "default".

    Args:
        value: the namespace as sent.
        call: the RPC, for the message.

    Raises:
        InvalidArgument: the namespace is empty or malformed.
    """
    if not value:
        raise InvalidArgument(
            f"{call} needs the namespace explicitly; an empty one no longer means 'default' for "
            "destructive calls (send namespace='default' to mean the default namespace)")
    return namespace(value)


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


def user_id(value: str | None) -> str | None:
    """A user id (Store's owner, Lookup's asker): at most MAX_LABEL_BYTES, never empty."""
    return _label("user_id", value)


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


def wrong_rate(value: object, name: str = "max_wrong_rate") -> float:
    """A wrong-hit bound: a number in [MIN_WRONG_RATE, MAX_WRONG_RATE] (NaN, infinities,
    denormals and zeros fall outside).

    Raises:
        InvalidArgument: not a number, or out of range.
    """
    rate = _number(name, value)
    if not MIN_WRONG_RATE <= rate <= MAX_WRONG_RATE:
        raise InvalidArgument(
            f"{name} is {value!r}; give a wrong-hit rate in [{MIN_WRONG_RATE:g}, "
            f"{MAX_WRONG_RATE:g}], e.g. 0.01 for at most 1% wrong hits (below {MIN_WRONG_RATE:g} "
            "no evidence the server keeps can support the bound)")
    return rate


def similarity(value: object, name: str = "min_similarity") -> float:
    """A cosine similarity threshold: a finite number in [0, 1]; -0.0 comes back as 0.0.

    Raises:
        InvalidArgument: not a number, or out of range (NaN and infinities included).
    """
    cosine = _number(name, value)
    if not 0.0 <= cosine <= 1.0:
        raise InvalidArgument(
            f"{name} is {value!r}; give a cosine similarity in [0, 1], or leave it unset for "
            "the server default")
    return cosine + 0.0  # -0.0 + 0.0 == +0.0: one zero, whatever the caller sent


def _number(name: str, value: object) -> float:
    """``value`` as a finite float; bools and strings (a hand-edited database row) refused."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidArgument(f"{name} is {value!r}, not a number")
    if not math.isfinite(value):
        raise InvalidArgument(f"{name} is {value!r}; give a finite number")
    return float(value)


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
    if ttl is not None and not (math.isfinite(ttl) and MIN_TTL_S <= ttl <= MAX_TTL_S):
        raise InvalidArgument(
            f"ttl_s is {ttl}; give seconds in [{MIN_TTL_S:g}, {MAX_TTL_S:.0f}], or leave it unset "
            "for no expiry")
    return _with_namespace(request)


def lookup(request: LookupRequest) -> LookupRequest:
    prompt(request.prompt)
    _string_map("scope", request.scope)
    _template(request.template_id, request.template_version)
    if request.min_similarity is not None:
        request = replace(request, min_similarity=similarity(request.min_similarity))
    return _with_namespace(request)


_Request = TypeVar("_Request", StoreRequest, LookupRequest)


def _with_namespace(request: _Request) -> _Request:
    ns = namespace(request.namespace)
    return request if ns == request.namespace else replace(request, namespace=ns)
