"""The canonical key text of a row: one string per key, unambiguous for composite keys.

A one-column key is the value's text (``42``, ``0b6f...``), so single keys read as they always did
(``product:42``); an integer or decimal is written with every digit, in plain notation.
A composite key is the JSON array of its values' texts (``["eu","42"]``): JSON's quoting
keeps every separator and quote inside a value from being mistaken for the boundary between two values.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from datetime import date, datetime, time
from decimal import Decimal
from typing import Any

import orjson


def part_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value
    if isinstance(value, int):
        return str(value)  # every digit, beyond 64 bits too
    if isinstance(value, Decimal):
        return format(value, "f")  # plain notation: a NUMERIC key of 10**30 is never "1E+30"
    if isinstance(value, float):
        return repr(int(value)) if value.is_integer() else repr(value)
    if isinstance(value, datetime | date | time):
        return value.isoformat()
    if isinstance(value, bytes):
        return base64.b64encode(value).decode()
    return orjson.dumps(value, default=str).decode()


def key_text(values: Sequence[Any]) -> str:
    if len(values) == 1:
        return part_text(values[0])
    return orjson.dumps([part_text(v) for v in values]).decode()


def key_parts(key: str, n: int) -> list[str]:
    """The inverse of ``key_text`` for a key of ``n`` columns."""
    if n == 1:
        return [key]
    parts = orjson.loads(key)
    if not isinstance(parts, list) or len(parts) != n:
        raise ValueError(f"{key!r} is not a {n}-column key")
    return [str(p) for p in parts]
