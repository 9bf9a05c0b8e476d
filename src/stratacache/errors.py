"""Errors the engine raises; ``service`` maps each class to one gRPC status code.

    CacheError
    ├── InvalidArgument      -> INVALID_ARGUMENT   (the caller must change the request)
    ├── NotFound             -> NOT_FOUND
    ├── Overloaded           -> RESOURCE_EXHAUSTED (retry later, with backoff)
    ├── StorageFull          -> FAILED_PRECONDITION (disk budget or disk full: an admin must act;
    │                                                retrying the same call will not help)
    ├── StorageFailed        -> INTERNAL           (a tier's disk failed; the message says what)
    ├── Unavailable          -> UNAVAILABLE        (the server is shutting down)
    └── DataDirMismatch      -> raised at start-up: the data directory belongs to another model

Messages are written for a person: they say what was wrong and what to do.
"""

from __future__ import annotations


class CacheError(Exception):
    """Base class of every error the engine raises on purpose."""


class InvalidArgument(CacheError):
    """The request is malformed; the message names the field and the rule."""


class NotFound(CacheError):
    """The request names something that does not exist."""


class Overloaded(CacheError):
    """A bounded queue is full; the caller should retry with backoff."""


class StorageFull(CacheError):
    """A tier cannot take more data: its budget or the disk is full, even after demotion."""


class StorageFailed(CacheError):
    """A durable tier failed (an I/O error, a damaged file). Lookups treat it as a miss; writes
    report it."""


class Unavailable(CacheError):
    """The engine is closing or closed."""


class DataDirMismatch(CacheError):
    """The data directory was built with another embedding model or dimension."""
