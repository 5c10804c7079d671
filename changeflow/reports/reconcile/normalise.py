"""Pure: every side's row in one comparable form, driven by the entity's canonical column types.

The source row (read with psycopg, put through the entity's transform) and every store's representation
(Redis JSON text, the search ``_source``, ClickHouse typed columns) pass through the same normalisation,
chosen by the column's :class:`~pipelines.types.ColumnType`: decimals compare by exact value (a
``decimal(12,2)`` column cannot keep ``12.5`` apart from ``12.50``), timestamps as UTC microseconds, JSON
structurally, and a null field equals an absent one.
"""

from __future__ import annotations

import base64
import hashlib
import math
import uuid
from collections.abc import Callable, Mapping
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal, InvalidOperation
from functools import lru_cache
from typing import Any

import orjson

from changeflow.pipelines.types import ColumnType
from changeflow.schemas import EXACT_CONTEXT, float32_shortest

Row = dict[str, Any]
Types = Mapping[str, ColumnType]


def _decimal_text(value: Decimal) -> str:
    """The exact value, one spelling per number: 12.5 and 12.50 are the same amount."""
    if value == 0:
        return "0"
    return format(value.normalize(context=EXACT_CONTEXT), "f")  # the default context rounds to 28 digits


def _utc(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _json_default(value: Any) -> Any:
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, datetime | date | time):
        return value.isoformat()
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, bytes | memoryview):
        return bytes(value).hex()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _json_text(value: Any) -> str:
    return orjson.dumps(value, default=_json_default, option=orjson.OPT_SORT_KEYS).decode()


def _maybe_json(text: str) -> Any:
    if text[:1] in ("{", "[", '"'):
        try:
            return orjson.loads(text)
        except orjson.JSONDecodeError:
            return text
    return text


def _as_decimal(value: Any) -> str:
    return _decimal_text(value if isinstance(value, Decimal) else Decimal(str(value)))


def _as_datetime(value: Any) -> str:
    if isinstance(value, str):
        # The stores' own spelling of a UTC instant with microseconds is already the comparable one.
        if len(value) == 32 and value[19] == "." and value.endswith("+00:00"):
            return value
        value = datetime.fromisoformat(value)
    return str(_utc(value).isoformat(timespec="microseconds"))


def _as_date(value: Any) -> str:
    if isinstance(value, datetime):
        value = value.date()
    return str((date.fromisoformat(value) if isinstance(value, str) else value).isoformat())


def _as_time(value: Any) -> str:
    if isinstance(value, str):
        value = time.fromisoformat(value.replace("Z", "+00:00"))
    if value.tzinfo is not None and value.utcoffset():
        # Debezium sends a timetz in UTC (10:00+02 arrives as 08:00Z); the source's own reads keep the offset.
        value = datetime.combine(date(2000, 1, 1), value).astimezone(UTC).timetz()
    return str(value.isoformat(timespec="microseconds"))


def _as_string(value: Any) -> str:
    return value if isinstance(value, str) else str(value)


def _as_bool(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("true", "1", "t")
    return bool(value)


def _as_json(value: Any) -> str:
    return _json_text(_maybe_json(value) if isinstance(value, str) else value)


def _as_undeclared(value: Any) -> Any:
    """A field without a known type: one text form for JSON text and native values."""
    if isinstance(value, str):
        value = _maybe_json(value)
        if isinstance(value, str):
            return value
    if isinstance(value, Decimal | datetime | date | uuid.UUID):
        return _json_default(value)
    return _json_text(value)


def _as_float(value: Any) -> float | None:
    """NaN and ±Infinity compare as "no value": the JSON stores hold null for them (README "Types")."""
    number = float(value)
    return number if math.isfinite(number) else None


def _as_float32(value: Any) -> float | None:
    """A ``real`` as the same float32 from every side: the source's 21.35, ClickHouse's Float32 read back as
    21.350000381469727 and the JSON stores' 21.35 are one value."""
    number = _as_float(value)
    return None if number is None else float32_shortest(number)


def _as_bytes(value: Any) -> str:
    """base64, as the JSON stores hold bytes; the source and ClickHouse give the bytes themselves."""
    if isinstance(value, memoryview | bytearray):
        value = bytes(value)
    if isinstance(value, bytes):
        return base64.b64encode(value).decode()
    return str(value)


def _array(item: ColumnType | None) -> Callable[[Any], Any]:
    def normalise(value: Any) -> Any:
        if isinstance(value, str):
            value = _maybe_json(value)
        if not isinstance(value, list | tuple):
            return _as_undeclared(value)
        return [normalise_value(v, item) for v in value]

    return normalise


@lru_cache(maxsize=256)
def _normaliser(t: ColumnType | None) -> Callable[[Any], Any]:
    if t is None:
        return _as_undeclared
    k = t.kind
    if k == "decimal":
        return _as_decimal
    if k in ("timestamp", "timestamptz"):
        return _as_datetime
    if k == "date":
        return _as_date
    if k in ("time", "timetz"):
        return _as_time
    if k in ("int16", "int32", "int64", "interval"):
        return int
    if k == "float32":
        return _as_float32
    if k == "float64":
        return _as_float
    if k == "bool":
        return _as_bool
    if k in ("string", "uuid", "enum"):
        return _as_string
    if k == "json":
        return _as_json
    if k == "bytes":
        return _as_bytes
    if k == "array":
        return _array(t.item)
    return _as_undeclared


def normalise_value(value: Any, t: ColumnType | None) -> Any:
    """One field in the comparable form, whichever side it came from; None means "no value"."""
    if value is None:
        return None
    try:
        return _normaliser(t)(value)
    except (InvalidOperation, ValueError, TypeError, AttributeError, orjson.JSONEncodeError):
        return f"<unparsable {value!r}>"


def comparable_row(row: Mapping[str, Any], types: Types) -> Row:
    """A row in the form every side is compared in; null fields are left out (null equals absent). Stores give
    rows back under the source's column names, their own bookkeeping left out (``sinks.base.stored_name``),
    so a source column named like a store's own (``_version``) is compared like any other."""
    out: Row = {}
    for name, value in row.items():
        if value is None:
            continue
        out[name] = normalise_value(value, types.get(name))
    return out


def fold_empty(row: Row, types: Types, kinds: frozenset[str]) -> Row:
    """``row`` as a store that cannot tell NULL from empty for columns of ``kinds`` holds it: an empty value of
    such a column is left out, as a null one is (ClickHouse arrays cannot be Nullable, so a NULL ``text[]`` is
    ``[]`` there). Applied to both sides before they are compared for that store only: the others still
    tell the two apart (README "Types")."""
    if not kinds:
        return row
    empty = [name for name, value in row.items()
             if value == [] and (t := types.get(name)) is not None and t.kind in kinds]
    if not empty:
        return row  # the same object: a caller may reuse what it computed from it
    return {name: value for name, value in row.items() if name not in empty}


def debezium_typed(row: Mapping[str, Any]) -> Row:
    """A psycopg row typed the way the Debezium decoder types the same row (see changeflow/streams/debezium.py)."""
    out: Row = {}
    for name, value in row.items():
        if isinstance(value, uuid.UUID):
            value = str(value)
        elif isinstance(value, datetime):
            value = _utc(value)
        elif isinstance(value, memoryview):
            value = bytes(value)
        elif isinstance(value, timedelta):
            # Debezium's MicroDuration: microseconds. (psycopg counts a month as 30 days, Debezium as
            # 365.25/12: an interval with months compares unequal; README "Types" says so.)
            value = (value.days * 86_400 + value.seconds) * 1_000_000 + value.microseconds
        out[name] = value
    return out


def row_digest(row: Row) -> int:
    return int.from_bytes(
        hashlib.blake2b(orjson.dumps(row, option=orjson.OPT_SORT_KEYS), digest_size=8).digest(), "big"
    )
