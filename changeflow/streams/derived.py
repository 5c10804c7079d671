"""Derived events: facts other services subscribe to, computed from canonical records (pure).

Declared per entity in the pipeline file (``events:``, ``pipelines.model.DerivedEvent``): an update that
changes any of an event's ``when_changed`` columns and for which its ``when`` expression (over ``old`` and
``new``) holds emits ``{"type", "id", "old_<c>", "new_<c>", ..., "fields": {...}, "version", "ts_ms",
"event_id"}`` (``fields`` only when the event declares columns to carry). The commerce demo's
``product.price_changed`` is one such declaration.

``event_id`` is stable: ``<entity>.<event>:<kafka key>@<version>``, the change's source position (its LSN)
and its key, so a redelivered, replayed or re-decoded change gives the same id. It also travels in the
``id`` header (with ``aggregate_type`` and ``type``), as an outbox event's does, so a consumer dedupes
derived events with the same inbox (``changeflow.outbox.inbox``).
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import date, datetime, time
from decimal import Decimal
from functools import lru_cache
from typing import Any

from changeflow.pipelines.model import DerivedEvent
from changeflow.pipelines.transform import Expression, ExpressionError, compile_expression
from changeflow.streams.records import ChangeRecord


def _json_value(value: Any) -> Any:
    """A value as the event's JSON carries it: exact decimals as text, times in ISO form."""
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, datetime | date | time):
        return value.isoformat()
    if isinstance(value, bytes):
        return value.hex()
    return value


@lru_cache(maxsize=256)
def condition(text: str) -> Expression:
    """A ``when`` expression, compiled once (``pipeline check`` has refused one that does not compile)."""
    return compile_expression(text)


def reads_old(spec: DerivedEvent) -> bool:
    """Whether the event needs the before-image: ``when_changed`` compares it, ``when`` may name ``old``."""
    return bool(spec.when_changed) or (spec.when is not None and "old" in condition(spec.when).names)


def event(record: ChangeRecord, name: str, spec: DerivedEvent) -> dict[str, Any] | None:
    """The event ``name`` of ``record``'s entity, when this update changes one of its ``when_changed`` columns
    and its ``when`` holds (reading ``old`` needs the before-image: REPLICA IDENTITY FULL); None otherwise. A
    ``when`` that fails on this row's values (a missing column, a type error) emits nothing."""
    try:
        needs_old = reads_old(spec)
    except ExpressionError:  # refused by `pipeline check`; never the stream's failure
        return None
    if record.op != "u" or record.after is None or (record.before is None and needs_old):
        return None
    before = record.before or {}
    columns = spec.when_changed
    if any(c not in before or c not in record.after for c in columns):
        return None
    if columns and all(before[c] == record.after[c] for c in columns):
        return None
    if spec.when is not None:
        try:
            if not condition(spec.when).evaluate({"old": before, "new": record.after}):
                return None
        except ExpressionError:
            return None
    out: dict[str, Any] = {"type": spec.type or f"{record.entity}.{name}", "id": record.key}
    for c in columns:
        out[f"old_{c}"] = _json_value(before[c])
        out[f"new_{c}"] = _json_value(record.after[c])
    if spec.fields:
        out["fields"] = {f: _json_value(record.after.get(f)) for f in spec.fields}
    out["version"] = record.version
    out["ts_ms"] = record.ts_ms
    out["event_id"] = event_id(record, name)
    return out


def event_id(record: ChangeRecord, name: str) -> str:
    return f"{record.entity}.{name}:{record.kafka_key}@{record.version}"


def headers(payload: dict[str, Any], entity: str) -> list[tuple[str, bytes]]:
    """The headers an event travels with: those of an outbox event (``id``, ``aggregate_type``, ``type``)."""
    return [("id", str(payload["event_id"]).encode()), ("aggregate_type", entity.encode()),
            ("type", str(payload["type"]).encode())]


def events(record: ChangeRecord, declared: dict[str, tuple[str, DerivedEvent]]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(topic, event) for each declared event of the record's entity that this change emits; ``declared``
    maps an event's topic to (its name, its declaration) for that entity."""
    for topic, (name, spec) in declared.items():
        payload = event(record, name, spec)
        if payload is not None:
            yield topic, payload
