"""What answers cost: the price table that turns a hit's saved tokens into dollars, and the
checks on the cost a Store reports.

A price table maps a model's name to its list price per million tokens, in US dollars:

    # TOML (prices.toml)
    "gpt-4o" = { input_per_million = 2.50, output_per_million = 10.00 }

    // JSON (prices.json)
    {"gpt-4o": {"input_per_million": 2.50, "output_per_million": 10.00}}

``--prices FILE`` (``Settings.prices``) names one, read by its extension (``.toml`` or
``.json``); without it the server uses the table bundled with this package
(``stratacache/data/prices.toml``: a few well-known models at their providers' published list
prices, as that file's comments say). Model names match exactly (``gpt-4o`` is not
``gpt-4o-2024-08-06``): give every name your gateway reports.
"""

from __future__ import annotations

import importlib.resources
import json
import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from .errors import InvalidArgument
from .records import AnswerCost

#: The price fields of a model's entry, dollars per million tokens.
PRICE_FIELDS = ("input_per_million", "output_per_million")
#: Limits on a Store's cost: longer model names, more tokens or a longer call are mistakes.
MAX_MODEL_BYTES = 256
MAX_TOKENS = 1_000_000_000
MAX_LATENCY_S = 86_400.0


class BadPriceTable(InvalidArgument):
    """The price table cannot be used: unreadable, not JSON/TOML, or an entry malformed (the
    message names the file, the model and the field)."""


@dataclass(frozen=True, slots=True)
class Price:
    """A model's list price, US dollars per million tokens read (input) and written (output)."""

    input_per_million: float
    output_per_million: float

    def dollars(self, prompt_tokens: int, completion_tokens: int) -> float:
        """What ``prompt_tokens`` read and ``completion_tokens`` written cost, dollars."""
        return (prompt_tokens * self.input_per_million
                + completion_tokens * self.output_per_million) / 1e6


class PriceTable:
    """Model name -> :class:`Price`; read-only once built.

    Args:
        prices: the prices by exact model name.
        source: where they came from, for messages.
    """

    def __init__(self, prices: Mapping[str, Price], source: str) -> None:
        self._prices = dict(prices)
        self.source = source

    def get(self, model: str | None) -> Price | None:
        """The model's price; None for no model, or one the table lacks."""
        return None if model is None else self._prices.get(model)

    def __len__(self) -> int:
        return len(self._prices)

    def __contains__(self, model: object) -> bool:
        return model in self._prices


def bundled_path() -> Path:
    """The price table shipped with the package (a file inside the installed package)."""
    return Path(str(importlib.resources.files("stratacache") / "data" / "prices.toml"))


def load(path: Path | None = None) -> PriceTable:
    """Reads a price table (module docstring): JSON or TOML, by the file's extension.

    Args:
        path: the file (``--prices``); None for the bundled table.

    Returns:
        The table.

    Raises:
        BadPriceTable: the file cannot be read, its extension is neither .toml nor .json, it
            does not parse, or an entry is not ``{input_per_million, output_per_million}`` with
            non-negative finite dollar amounts.
    """
    path = bundled_path() if path is None else Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".toml", ".json"):
        raise BadPriceTable(f"price table {str(path)!r}: the file name must end in .toml or "
                            ".json, which says how to read it (--prices)")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise BadPriceTable(f"price table {str(path)!r} cannot be read: {exc.strerror or exc}; "
                            "check --prices") from None
    try:
        data = tomllib.loads(raw.decode("utf-8")) if suffix == ".toml" else json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:  # TOMLDecodeError, JSONDecodeError
        raise BadPriceTable(f"price table {str(path)!r} is not valid {suffix[1:].upper()}: "
                            f"{exc}") from None
    return parse(data, str(path))


def parse(data: object, source: str) -> PriceTable:
    """A price table from parsed JSON or TOML (model name -> its two prices).

    Raises:
        BadPriceTable: as :func:`load`, naming ``source``.
    """
    if not isinstance(data, dict):
        raise BadPriceTable(f"price table {source!r} must map model names to their prices, "
                            'e.g. {"gpt-4o": {"input_per_million": 2.5, "output_per_million": '
                            "10}}")
    prices = {}
    for model, entry in data.items():
        where = f"price table {source!r}, model {model!r}"
        if not model:
            raise BadPriceTable(f"{where}: the model name is empty")
        if not isinstance(entry, dict) or set(entry) != set(PRICE_FIELDS):
            got = sorted(entry) if isinstance(entry, dict) else type(entry).__name__
            raise BadPriceTable(f"{where}: expected exactly {' and '.join(PRICE_FIELDS)} "
                                f"(dollars per million tokens), got {got}")
        for name in PRICE_FIELDS:
            value = entry[name]
            if (isinstance(value, bool) or not isinstance(value, (int, float))
                    or not math.isfinite(value) or value < 0):
                raise BadPriceTable(f"{where}: {name} must be a finite number of dollars >= 0, "
                                    f"got {value!r}")
        prices[model] = Price(float(entry["input_per_million"]),
                              float(entry["output_per_million"]))
    return PriceTable(prices, source)


def checked_cost(cost: AnswerCost | None) -> AnswerCost | None:
    """A Store's cost, checked; None stays None, and so does a cost with no field set.

    Raises:
        InvalidArgument: an empty, oversized or non-printable model name, token counts out of
            [0, MAX_TOKENS], or a latency that is not a finite number of seconds in
            [0, MAX_LATENCY_S].
    """
    if cost is None or cost == _NO_COST:
        return None
    if cost.model is not None:
        if not cost.model or len(cost.model.encode("utf-8")) > MAX_MODEL_BYTES \
                or not cost.model.isprintable():
            raise InvalidArgument(f"cost.model must be 1 to {MAX_MODEL_BYTES} bytes of printable "
                                  "text, the model's name as the price table has it (e.g. "
                                  f"gpt-4o); got {cost.model[:64]!r}; leave it unset if unknown")
    for name in ("prompt_tokens", "completion_tokens"):
        value = getattr(cost, name)
        if value is not None and not 0 <= value <= MAX_TOKENS:
            raise InvalidArgument(f"cost.{name} must be a token count in [0, {MAX_TOKENS}], got "
                                  f"{value}")
    if cost.latency_s is not None and not (math.isfinite(cost.latency_s)
                                           and 0 <= cost.latency_s <= MAX_LATENCY_S):
        raise InvalidArgument(f"cost.latency_s must be the model's time in seconds, in "
                              f"[0, {MAX_LATENCY_S:.0f}], got {cost.latency_s}")
    return cost


_NO_COST = AnswerCost()
