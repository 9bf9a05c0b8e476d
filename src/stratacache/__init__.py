"""stratacache: a semantic cache server for LLM applications.

Gateways use :class:`Client` (or :class:`AsyncClient`) to ``lookup`` before a model call and
``store`` after it; ``stratacache serve`` runs the server.
"""

from .client import (AsyncClient, Client, DeadlineExceededError, InvalidArgumentError,
                     LookupResult, NotFoundError, OverloadedError, PermissionDeniedError,
                     RateLimitedError, ServerError, StorageFullError, StratacacheError, Timeout,
                     UnauthenticatedError, UnavailableError)

__version__ = "0.1.0"

__all__ = [
    "AsyncClient", "Client", "DeadlineExceededError", "InvalidArgumentError", "LookupResult",
    "NotFoundError", "OverloadedError", "PermissionDeniedError", "RateLimitedError",
    "ServerError", "StorageFullError", "StratacacheError", "Timeout", "UnauthenticatedError",
    "UnavailableError", "__version__",
]
