"""JSON for derived stores: exact decimals as strings, datetimes as ISO-8601 UTC, bytes as base64.

Numbers *inside JSON data* (a json/jsonb column, a MongoDB document) stay numbers, every digit kept:
``loads`` parses a number a float cannot hold exactly (``0.10000000000000000001``) as a ``JsonNumber`` (a
``Decimal`` marked as having been a JSON number) and an integer of any size as an ``int``; ``dumps``
writes both back as JSON numbers, digit for digit. A plain ``Decimal`` (a decimal column) is still
written as an exact string, as the stores document it.
"""

from __future__ import annotations

import base64
import json as stdjson
import re
from datetime import date, datetime, time
from decimal import Decimal
from typing import Any

import orjson


class JsonNumber(Decimal):
    """A JSON number that a float cannot hold exactly; written back as that number, not as a string."""

    __slots__ = ()


# A number token orjson may not read exactly: 20+ digits or a negative 19 (orjson holds -2**63 to 2**64 - 1), a fraction
# of 16+ significant digits, 16+ digits before an exponent, or a three-digit exponent. Integers of up to 19
# digits (LSNs, versions, ts_ns) never match. Conservative: a match (digits inside a string included) only
# means the exact parser runs, and it decides number by number.
_INEXACT = r"\d{20}|-\d{19}|(?<![\d.])(?=\d*\.)[\d.]{17}|\d{16}[eE]|\d[eE][-+]?\d{3}"
_MAYBE_INEXACT = re.compile(_INEXACT)
_MAYBE_INEXACT_BYTES = re.compile(_INEXACT.encode())
_INT64_MIN, _UINT64_MAX = -(1 << 63), (1 << 64) - 1


def exact_float(text: str) -> float | JsonNumber:
    """A JSON number token: the float when it holds the number exactly as written, else a JsonNumber."""
    value = float(text)
    if value - value == 0 and Decimal(repr(value)) == Decimal(text):  # finite and round-trips
        return value
    return JsonNumber(text)


def exact_loads(data: bytes | str) -> Any:
    """Parse JSON keeping every integer and every decimal exact (stdlib json; slower than orjson)."""
    return stdjson.loads(data, parse_float=exact_float)


def loads(data: bytes | str) -> Any:
    """orjson, unless the text holds a number orjson would round (see ``_MAYBE_INEXACT``)."""
    if (_MAYBE_INEXACT_BYTES if isinstance(data, bytes | bytearray) else _MAYBE_INEXACT).search(data):  # type: ignore[arg-type]
        return exact_loads(data)
    return orjson.loads(data)


def _default(value: Any) -> Any:
    if isinstance(value, JsonNumber):
        return orjson.Fragment(str(value))  # a number, every digit (str of a finite Decimal is valid JSON)
    if isinstance(value, Decimal):
        return format(value, "f")  # every digit, never an exponent (str() writes 1E-33)
    if isinstance(value, datetime | date | time):
        return value.isoformat()
    if isinstance(value, bytes):
        return base64.b64encode(value).decode()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _big_ints(value: Any) -> Any:
    """``value`` with every integer beyond orjson's 64 bits as a raw JSON number (exact)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        return orjson.Fragment(str(value)) if not _INT64_MIN <= value <= _UINT64_MAX else value
    if isinstance(value, dict):
        return {k: _big_ints(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_big_ints(v) for v in value]
    return value


def dumps(value: Any) -> bytes:
    try:
        return orjson.dumps(value, default=_default, option=orjson.OPT_PASSTHROUGH_DATETIME)
    except orjson.JSONEncodeError as exc:
        if "64-bit" not in str(exc):
            raise
    # Only when orjson refuses an integer beyond 64 bits: the same value with those integers as raw numbers.
    return orjson.dumps(_big_ints(value), default=_default, option=orjson.OPT_PASSTHROUGH_DATETIME)
