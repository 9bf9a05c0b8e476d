"""Who may call what: API keys scoped to namespaces and roles (``--keys-file``), and the
``stratacache hash-key`` tool that makes an entry of that file.

The keys file is TOML, one ``[[keys]]`` table per key::

    [[keys]]
    name = "gateway-prod"                    # in messages, logs and rate limits; never secret
    sha256 = "9f86d081884c7d65..."           # hex SHA-256 of the key (the key is not stored)
    namespaces = ["prod-*", "shared"]        # exact names or fnmatch patterns; "*" = every one
    roles = ["lookup", "store", "feedback"]  # of: lookup, store, feedback, admin

Roles: Lookup needs ``lookup``, Store ``store``, Feedback ``feedback``, and every CacheAdmin call
``admin``. A key whose namespaces do not include ``"*"`` is *scoped*: it may only name its own
namespaces, and admin calls that touch every namespace are narrowed or refused for it (see
``service``). The single ``--api-key`` stays an all-namespaces key with every role, named
:data:`API_KEY_NAME`.

Keys are kept only as SHA-256 digests. A presented key is hashed and looked up by its digest:
the time that takes depends on the digest of what was presented, never on a stored key's bytes,
and knowing how a guess's digest compares with a stored digest does not help find a key whose
digest it is (a preimage of SHA-256). That is also why keys must be long random strings
(:data:`MIN_KEY_CHARS`, as ``hash-key`` makes them): a digest is only as hard to invert as the
key is to guess.

:meth:`KeyStore.reload` (the server calls it on SIGHUP) reads the file again and swaps the whole
set at once; a file that does not validate leaves the keys in use untouched.
"""

from __future__ import annotations

import argparse
import fnmatch
import hashlib
import json
import logging
import re
import secrets
import sys
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import CacheError
from .validation import NAMESPACE_PATTERN

log = logging.getLogger(__name__)

ROLES = ("lookup", "store", "feedback", "admin")
#: The name the single ``--api-key`` goes by in messages and rate limits. Key names must start
#: with a letter or digit, so no key of the file can take it.
API_KEY_NAME = "--api-key"
#: Shortest key ``hash-key`` accepts, characters: 32 random characters are well beyond guessing.
MIN_KEY_CHARS = 32
KEY_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@-]{0,63}")
#: What a namespace pattern may hold: a namespace's characters and fnmatch's * ? [ ] !.
NAMESPACE_GLOB_PATTERN = re.compile(r"[A-Za-z0-9._:*?\[\]!-]{1,128}")
_SHA256_PATTERN = re.compile(r"[0-9a-fA-F]{64}")
#: SHA-256 of the empty string: never a key (a file holding it is refused).
_EMPTY_KEY_DIGEST = hashlib.sha256(b"").hexdigest()
_FIELDS = ("name", "sha256", "namespaces", "roles")
_BEARER = "bearer "
_HOW_TO_SEND = "send metadata 'authorization: Bearer <key>' (Client(api_key=...))"


class Unauthenticated(CacheError):
    """No key, or a key the server does not know."""


class PermissionDenied(CacheError):
    """A known key used outside its roles or namespaces; the message names the missing right."""


class KeysFileError(CacheError):
    """The keys file cannot be read or does not validate; the message lists every problem."""


@dataclass(frozen=True, eq=False)
class Caller:
    """What the key of one call may do.

    Attributes:
        name: the key's name; None when the server has no keys (anyone may call).
        roles: the roles it holds (of :data:`ROLES`).
        namespaces: its namespace names and patterns, as written in the keys file.
    """

    name: str | None
    roles: frozenset[str]
    namespaces: tuple[str, ...]
    _match: Callable[[str], object] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        # One regex for all of the key's patterns: a check costs one match however many it has.
        pattern = "|".join(fnmatch.translate(p) for p in self.namespaces)
        object.__setattr__(self, "_match", re.compile(pattern).match)

    @property
    def every_namespace(self) -> bool:
        """Whether the key covers every namespace (a ``"*"`` pattern)."""
        return "*" in self.namespaces

    def may_use(self, namespace: str) -> bool:
        """Whether the key covers ``namespace`` (an exact name or one of its patterns)."""
        return self.every_namespace or self._match(namespace) is not None

    def check_role(self, call: str, role: str) -> None:
        """Raises PermissionDenied unless the key holds ``role``; ``call`` names the RPC."""
        if role not in self.roles:
            raise PermissionDenied(
                f"key {self.name!r} may not call {call}: that needs the {role!r} role, and the "
                f"key has {_listed(sorted(self.roles))}; ask for a key with it")

    def check_namespace(self, call: str, namespace: str | None) -> None:
        """Raises PermissionDenied unless the key covers ``namespace`` (None: every namespace,
        as a DeleteUser that names none)."""
        if namespace is None:
            if not self.every_namespace:
                raise PermissionDenied(
                    f"key {self.name!r} may not call {call} on every namespace: it covers only "
                    f"{_listed(self.namespaces)}; name one of them")
        elif not self.may_use(namespace):
            raise PermissionDenied(
                f"key {self.name!r} may not use namespace {namespace!r} ({call}): it covers "
                f"only {_listed(self.namespaces)}")


#: The caller of a server without keys.
ANYONE = Caller(None, frozenset(ROLES), ("*",))


def _listed(items: tuple[str, ...] | list[str]) -> str:
    return ", ".join(items) if items else "none"


def hash_key(key: str) -> str:
    """The hex SHA-256 of a key, as the keys file's ``sha256`` holds it.

    Args:
        key: the key a client sends (``authorization: Bearer <key>``).

    Returns:
        64 lowercase hex characters.
    """
    return _digest(key).hex()


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def _parse_key(number: int, entry: object) -> tuple[bytes, Caller] | list[str]:
    """One ``[[keys]]`` table: its digest and caller, or the problems found in it (each
    prefixed with the key's number and name, so the operator finds it)."""
    if not isinstance(entry, Mapping):
        return [f"key {number}: expected a [[keys]] table"]
    name = entry.get("name")
    where = f"key {number} ({name!r})" if isinstance(name, str) else f"key {number}"
    problems = []
    unknown = sorted(set(entry) - set(_FIELDS))
    if unknown:
        hint = (" (store the key's hash in sha256, never the key itself)"
                if {"key", "secret", "api_key"} & set(unknown) else "")
        problems.append(f"unknown field {_listed(unknown)}{hint}; the fields are "
                        f"{_listed(list(_FIELDS))}")
    if not isinstance(name, str) or not KEY_NAME_PATTERN.fullmatch(name):
        problems.append("name must be 1 to 64 letters, digits and . _ : @ -, starting with a "
                        "letter or digit")
    digest = entry.get("sha256")
    if not isinstance(digest, str) or not _SHA256_PATTERN.fullmatch(digest):
        problems.append("sha256 must be the 64 hex characters of the key's SHA-256 (make one "
                        "with `stratacache hash-key`)")
    elif digest.lower() == _EMPTY_KEY_DIGEST:
        problems.append("sha256 is the hash of an empty key (was the key's variable unset when "
                        "it was hashed?): an empty key would let in calls that send none")
    namespaces = entry.get("namespaces")
    if not isinstance(namespaces, list) or not namespaces:
        problems.append('namespaces must be a non-empty list of names or patterns, e.g. '
                        '["prod-*", "shared"] ("*" = every namespace)')
    else:
        problems += [f"namespace pattern {p!r} is malformed: use a namespace's characters "
                     "(letters, digits, . _ : -) and * ? [ ] !"
                     for p in namespaces if not isinstance(p, str)
                     or not NAMESPACE_GLOB_PATTERN.fullmatch(p)
                     or (not set(p) & set("*?[") and not NAMESPACE_PATTERN.fullmatch(p))]
    roles = entry.get("roles")
    if not isinstance(roles, list) or not roles:
        problems.append(f"roles must be a non-empty list of {_listed(list(ROLES))}")
    else:
        problems += [f"unknown role {r!r}; the roles are {_listed(list(ROLES))}"
                     for r in roles if r not in ROLES]
    if problems:
        return [f"{where}: {p}" for p in problems]
    assert isinstance(name, str) and isinstance(digest, str)
    return bytes.fromhex(digest), Caller(name, frozenset(roles),  # type: ignore[arg-type]
                                         tuple(namespaces))  # type: ignore[arg-type]


def load_keys(path: Path, *, api_key: str | None = None) -> dict[bytes, Caller]:
    """Reads and validates a keys file.

    Args:
        path: the TOML file (module docstring).
        api_key: the server's single ``--api-key``, if any: a key of the file must not be it.

    Returns:
        Each key's caller, by the SHA-256 digest of the key.

    Raises:
        KeysFileError: the file cannot be read, is not TOML, or breaks a rule; the message
            lists every problem, each with the key's number and name.
    """
    try:
        with open(path, "rb") as f:
            document = tomllib.load(f)
    except OSError as exc:
        raise KeysFileError(f"cannot read keys file {path}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise KeysFileError(f"keys file {path} is not valid TOML: {exc}") from None
    problems = [f"unknown top-level entry {k!r}; the file holds [[keys]] tables only"
                for k in document if k != "keys"]
    entries = document.get("keys")
    if not isinstance(entries, list) or not entries:
        problems.append("no [[keys]] tables: add at least one (a [keys] table, with one pair "
                        "of brackets, is a different thing)")
        entries = []
    keys: dict[bytes, Caller] = {}
    names: set[str] = set()
    api_digest = None if api_key is None else _digest(api_key)
    for number, entry in enumerate(entries, 1):
        parsed = _parse_key(number, entry)
        if isinstance(parsed, list):
            problems += parsed
            continue
        digest, caller = parsed
        if caller.name in names:
            problems.append(f"key {number} ({caller.name!r}): another key has this name")
        elif digest in keys:
            problems.append(f"key {number} ({caller.name!r}): same sha256 as key "
                            f"{keys[digest].name!r}: each key must be a secret of its own")
        elif digest == api_digest:
            problems.append(f"key {number} ({caller.name!r}): it is the --api-key, which "
                            "already has every right; use another key")
        names.add(caller.name)  # type: ignore[arg-type]
        keys.setdefault(digest, caller)
    if problems:
        raise KeysFileError(f"keys file {path}: " + "; ".join(problems))
    return keys


class KeyStore:
    """The server's keys: the keys file's and the single ``--api-key``.

    Args:
        keys_file: the keys file, or None.
        api_key: the single all-rights key, or None.

    Raises:
        KeysFileError: the keys file does not load (see :func:`load_keys`).
    """

    def __init__(self, keys_file: Path | None = None, *, api_key: str | None = None) -> None:
        self.keys_file = keys_file
        self._api_key = api_key
        # Replaced whole by reload(), never changed in place: a call sees the old set or the
        # new one, never a mix.
        self._keys = self._load()

    @classmethod
    def from_settings(cls, settings: Any) -> "KeyStore":
        """The keys of ``settings.keys_file`` and ``settings.api_key``."""
        return cls(settings.keys_file, api_key=settings.api_key)

    @property
    def required(self) -> bool:
        """Whether calls must carry a key (the server has at least one)."""
        return self.keys_file is not None or self._api_key is not None

    def __len__(self) -> int:
        return len(self._keys)

    def _load(self) -> dict[bytes, Caller]:
        keys = {} if self.keys_file is None else load_keys(self.keys_file, api_key=self._api_key)
        if self._api_key is not None:
            keys[_digest(self._api_key)] = Caller(API_KEY_NAME, frozenset(ROLES), ("*",))
        return keys

    def reload(self) -> bool:
        """Reads the keys file again and swaps the new keys in at once (on SIGHUP).

        Returns:
            True if the new keys are in use; False if the file did not load: the keys in use
            stay, and one error line says why (False too, with an info line, without a file).
        """
        if self.keys_file is None:
            log.info("no --keys-file to reload: the keys in use stay")
            return False
        try:
            keys = self._load()
        except KeysFileError as exc:
            log.error("keys not reloaded, the %d in use stay: %s", len(self._keys), exc)
            return False
        self._keys = keys
        log.info("keys reloaded from %s: %d keys", self.keys_file, len(keys))
        return True

    def authenticate(self, authorization: str | bytes | None) -> Caller:
        """The caller a call's ``authorization`` metadata names.

        Args:
            authorization: the metadata value, ``"Bearer <key>"``; None when absent.

        Returns:
            The key's :class:`Caller` (:data:`ANYONE` on a server without keys).

        Raises:
            Unauthenticated: the server has keys and this is none of them.
        """
        if not self.required:
            return ANYONE
        if isinstance(authorization, bytes):
            authorization = authorization.decode("utf-8", "replace")
        if not authorization:
            raise Unauthenticated(f"missing API key: {_HOW_TO_SEND}")
        if authorization[:len(_BEARER)].lower() != _BEARER:
            raise Unauthenticated(f"malformed authorization metadata: {_HOW_TO_SEND}")
        # A dict lookup by digest, safe as the module docstring says: its timing depends on
        # the presented key's SHA-256, never on a stored key.
        key = authorization[len(_BEARER):]
        if not key.strip():
            raise Unauthenticated(f"missing API key (the bearer token is empty): {_HOW_TO_SEND}")
        caller = self._keys.get(_digest(key))
        if caller is None:
            raise Unauthenticated(f"wrong API key: this server has no such key; {_HOW_TO_SEND}")
        return caller


# --- stratacache hash-key ---------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--name", required=True, help="the key's name (in messages and logs)")
    parser.add_argument("--namespace", dest="namespaces", action="append", required=True,
                        metavar="PATTERN",
                        help='a namespace or fnmatch pattern the key may use, e.g. "prod-*"; '
                             'repeat for more; "*" = every namespace')
    parser.add_argument("--role", dest="roles", action="append", choices=ROLES,
                        help="a role the key holds; repeat for more (default: lookup, store, "
                             "feedback)")
    parser.add_argument("--stdin", action="store_true",
                        help=f"hash the key read from stdin (at least {MIN_KEY_CHARS} "
                             "characters) instead of making a new random one")


def run(args: argparse.Namespace) -> int:
    """Prints a [[keys]] table to stdout (append it to the keys file) and, for a new key, the
    key itself to stderr (give it to the client; it is stored nowhere)."""
    if args.stdin:
        key = sys.stdin.readline().strip()
        if len(key) < MIN_KEY_CHARS:
            raise KeysFileError(f"the key read from stdin has {len(key)} characters; use at "
                                f"least {MIN_KEY_CHARS} random ones (or leave out --stdin to "
                                "have one made)")
    else:
        key = secrets.token_urlsafe(32)
    entry = {"name": args.name, "sha256": hash_key(key), "namespaces": args.namespaces,
             "roles": args.roles or ["lookup", "store", "feedback"]}
    parsed = _parse_key(1, entry)
    if isinstance(parsed, list):
        raise KeysFileError("; ".join(parsed).replace("key 1 ", "", 1))
    if not args.stdin:
        print(f"new key for {args.name!r} (give it to the client; it is stored nowhere):\n{key}",
              file=sys.stderr)
    # The names and patterns are plain characters (checked above): a JSON string is a TOML one.
    print("\n[[keys]]")
    for field_name in _FIELDS:
        print(f"{field_name} = {json.dumps(entry[field_name])}")
    return 0
