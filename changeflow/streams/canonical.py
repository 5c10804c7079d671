"""The canonical record on the wire: Avro with single-object encoding, one schema version per entity and column
set (``changeflow.schemas``). Written by the decode and view stages, read by the sinks and the view stage."""

from __future__ import annotations

from changeflow import schemas
from changeflow.streams.records import ChangeRecord


def to_avro(book: schemas.SchemaBook, record: ChangeRecord) -> bytes:
    sv = book.for_columns(record.entity, record.types or {}, record.key_columns)
    return schemas.encode(
        sv,
        {
            "source": record.source,
            "entity": record.entity,
            "key": record.key,
            "op": record.op,
            "version": record.version,
            "ts_ms": record.ts_ms,
            "before": record.before,
            "after": record.after,
            "present": sorted(record.after) if record.partial and record.after is not None else None,
            "carried": (sorted(record.after) if not record.partial and record.after is not None
                        and len(record.after) < len(sv.columns) else None),
        },
    )


def record_from_bytes(value: bytes, origin: tuple[str, int, int], book: schemas.SchemaBook) -> ChangeRecord:
    sv, data = schemas.decode(value, book.lookup)
    present = data.get("present")
    after = data["after"]
    carried = data.get("carried")
    if after is not None and (present is not None or carried is not None):
        kept = present if present is not None else carried
        assert kept is not None
        keep = set(kept)
        after = {k: v for k, v in after.items() if k in keep}
    return ChangeRecord(
        source=data["source"],
        entity=data["entity"],
        key=data["key"],
        op=data["op"],
        version=data["version"],
        ts_ms=data["ts_ms"],
        before=data["before"],
        after=after,
        origin=origin,
        partial=present is not None,
        key_columns=sv.key_columns,
        types=sv.columns,
        schema=sv,
    )
