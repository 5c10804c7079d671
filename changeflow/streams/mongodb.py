"""Decode Debezium 3.x MongoDB change events into canonical change records.

Pure functions: bytes in, a ``Decoded`` value out; no I/O. The connector (capture mode ``change_streams``,
``change_streams_update_full`` or a ``*_with_pre_image`` variant) writes each document image as a JSON
*string* in MongoDB extended JSON, not as a Connect struct, so there is no schema to type values from:
the extended-JSON wrappers are the types. Debezium serialises ``before``/``after`` in the legacy STRICT
mode (``{"$numberLong": "5"}``, ``{"$date": 1700000000000}``, bare ``NaN``/``Infinity``, which strict JSON
parsers reject) and ``updateDescription.updatedFields`` and the message key in RELAXED mode (plain
integers, ``{"$date": "2023-11-14T22:13:20Z"}``, ``{"$numberDouble": "NaN"}``); canonical mode
(``$numberInt``, ``$numberDouble``) is accepted too. The small decoder below covers all three instead of
adding pymongo for ``bson.json_util``.

Partial updates (``change_streams`` mode, or ``change_streams_update_full`` when the post-image lookup
found nothing) carry only ``updateDescription``. The record is then ``partial=True`` and ``after`` holds
only what the change says, in the same nested shape as a full document so it can cross the canonical
Avro topic (where only top-level fields and JSON sub-documents exist):

* a dotted path becomes nested dicts: ``"profile.city": "Lyon"`` → ``{"profile": {"city": "Lyon"}}``;
  a numeric segment addresses an array element when the stored value is an array (``"tags.1"``);
* a removed field is set to ``None`` at its path (``"profile.zip"`` → ``{"profile": {"zip": None}}``);
* a truncated array carries ``{TRUNCATE: new_size}`` at its path (MongoDB forbids ``$``-prefixed
  field names in updates, so the key cannot collide with data);
* ``id`` (the key) is always present, as in every image.

``merge_partial`` applies that shape to the last known row. Its one blind spot: a whole sub-document
replaced with ``$set: {"profile": {...}}`` looks the same as dotted updates of its fields, so keys of
the old sub-document that the new one lacks survive the merge. The deployed connector uses
``change_streams_update_full``, where updates carry the whole document and this never arises.

``version`` is the MongoDB cluster time ``(seconds << 32) | increment``: seconds from ``source.ts_ms``
(Debezium fills it from the event's ``wallTime`` when the server reports one, else from the cluster
time itself) and the increment from ``source.ord``.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from decimal import Decimal, InvalidOperation
from typing import Any, cast

import orjson

from changeflow.pipelines.transform import FILTERED, Transformer
from changeflow.schemas.json import dumps
from changeflow.streams.debezium import output_types
from changeflow.streams.envelope import open_envelope
from changeflow.streams.partial import TRUNCATE
from changeflow.streams.records import ChangeRecord, DeadLetter, Decoded, Op, Skip, bounded

SOURCE = "mongodb"
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_UINT32 = 1 << 32


class ExtendedJsonError(ValueError):
    """Raised inside this module only; callers receive a DeadLetter."""


# --- extended JSON -------------------------------------------------------------------------------


def _date(value: Any) -> datetime:
    if isinstance(value, dict) and set(value) == {"$numberLong"}:
        value = value["$numberLong"]
    if isinstance(value, str) and not value.lstrip("-").isdigit():
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
        if parsed.tzinfo is None:
            raise ExtendedJsonError(f"$date without a time zone: {value!r}")
        return parsed.astimezone(UTC)
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ExtendedJsonError(f"bad $date {value!r}")
    try:
        return EPOCH + timedelta(milliseconds=int(value))
    except OverflowError:
        raise ExtendedJsonError(f"$date {value} ms is outside the years 1-9999") from None


def _binary(value: Mapping[str, Any]) -> str:
    """UUIDs (subtypes 03/04) as their canonical text; other binaries stay base64 text, not bytes."""
    payload = value["$binary"]
    if isinstance(payload, dict):  # relaxed / canonical: {"$binary": {"base64": ..., "subType": ...}}
        data, subtype = payload.get("base64"), payload.get("subType")
    else:  # legacy strict: {"$binary": ..., "$type": ...}
        data, subtype = payload, value.get("$type")
    if not isinstance(data, str) or not isinstance(subtype, str):
        raise ExtendedJsonError(f"bad $binary {value!r}")
    if subtype.lower() in ("3", "03", "4", "04"):
        try:
            return str(uuid.UUID(bytes=base64.b64decode(data, validate=True)))
        except (binascii.Error, ValueError):
            raise ExtendedJsonError(f"bad UUID $binary {data!r}") from None
    return data


def _uuid(text: Any) -> str:
    """Extended JSON v2's ``{"$uuid": "<hex with dashes>"}``: the same value as a subtype-4 ``$binary``."""
    if not isinstance(text, str) or len(text) != 36:
        raise ExtendedJsonError(f"bad $uuid {text!r}")
    try:
        return str(uuid.UUID(text))
    except ValueError:
        raise ExtendedJsonError(f"bad $uuid {text!r}") from None


def _wrapper(value: dict[str, Any]) -> Any:
    keys = set(value)
    if keys == {"$oid"}:
        oid = value["$oid"]
        if not (isinstance(oid, str) and len(oid) == 24 and all(c in "0123456789abcdefABCDEF" for c in oid)):
            raise ExtendedJsonError(f"bad $oid {oid!r}")
        return oid.lower()
    if keys == {"$date"}:
        return _date(value["$date"])
    if keys == {"$numberDecimal"}:
        try:
            return Decimal(str(value["$numberDecimal"]))
        except InvalidOperation:
            raise ExtendedJsonError(f"bad $numberDecimal {value['$numberDecimal']!r}") from None
    if keys in ({"$numberLong"}, {"$numberInt"}):
        raw = next(iter(value.values()))
        try:
            return int(raw)
        except (TypeError, ValueError):
            raise ExtendedJsonError(f"bad {next(iter(keys))} {raw!r}") from None
    if keys == {"$numberDouble"}:
        try:
            return float(value["$numberDouble"])
        except (TypeError, ValueError):
            raise ExtendedJsonError(f"bad $numberDouble {value['$numberDouble']!r}") from None
    if keys in ({"$binary"}, {"$binary", "$type"}):
        return _binary(value)
    if keys == {"$uuid"}:
        return _uuid(value["$uuid"])
    if keys == {"$timestamp"} and isinstance(value["$timestamp"], dict):
        ts = value["$timestamp"]
        return (int(ts["t"]) << 32) | int(ts["i"])
    raise ExtendedJsonError(f"unsupported extended JSON type {sorted(keys)}")


def from_extended_json(value: Any) -> Any:
    """An already parsed extended-JSON value → plain Python values (str, int, float, Decimal, datetime)."""
    if isinstance(value, dict):
        if value and all(isinstance(k, str) and k.startswith("$") for k in value):
            return _wrapper(value)
        return {k: from_extended_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [from_extended_json(v) for v in value]
    return value


def _parse(text: Any, what: str) -> Any:
    """One extended-JSON string, parsed but not yet converted (its ``$`` wrappers kept)."""
    if not isinstance(text, str):
        raise ExtendedJsonError(f"{what} is not an extended-JSON string")
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ExtendedJsonError(f"{what} is not valid extended JSON: {exc}") from None


def parse_extended_json(text: Any, what: str) -> Any:
    """One extended-JSON string → Python values; stdlib json because STRICT mode writes bare NaN/Infinity."""
    return from_extended_json(_parse(text, what))


# A string `_id` is its own key text unless it reads as another type's: an ObjectId's 24 lowercase hex
# digits, or a type's prefix. Those strings are written `string:<the string>`.
_KEY_TAGS = ("string", "number", "bool", "date", "uuid", "binary", "timestamp", "json")
_ESCAPE = re.compile(r"(?:[0-9a-f]{24}\Z|(?:" + "|".join(_KEY_TAGS) + r"):)")


def _number_text(value: int | float | Decimal) -> str:
    """One text per numeric value, whatever its BSON type (MongoDB's `_id` index holds 12, 12L and 12.0 as
    one value): the exact decimal expansion, trailing zeros dropped."""
    if isinstance(value, int):
        return str(value)
    d = value if isinstance(value, Decimal) else Decimal(value)  # Decimal(float) is exact
    if not d.is_finite():
        return "NaN" if d.is_nan() else ("-Infinity" if d < 0 else "Infinity")
    text = format(d, "f")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return "0" if text == "-0" else text


def key_string(raw_id: Any) -> str:
    """The canonical key text of an ``_id`` (as parsed, wrappers kept), never the same for two BSON types:

    ObjectId → its 24 lowercase hex digits; string → itself (``string:<s>`` when it reads as an ObjectId or
    starts with a type prefix); number (int32, int64, double, Decimal128) → ``number:<exact value>``; bool →
    ``bool:true``; date → ``date:<ISO-8601 UTC>``; binary UUID (subtypes 3, 4) → ``uuid:<uuid>``; other
    binary → ``binary:<subtype hex>:<base64>``; timestamp → ``timestamp:<(t << 32) | i>``; document or
    array → ``json:<its JSON>``.
    """
    value = from_extended_json(raw_id)
    if isinstance(raw_id, dict):
        keys = set(raw_id)
        if keys == {"$oid"}:
            return cast(str, value)
        if keys in ({"$binary"}, {"$binary", "$type"}):
            payload = raw_id["$binary"]
            subtype = int(str(payload.get("subType") if isinstance(payload, dict) else raw_id.get("$type")), 16)
            return f"uuid:{value}" if subtype in (3, 4) else f"binary:{subtype:02x}:{value}"
        if keys == {"$uuid"}:
            return f"uuid:{value}"
        if keys == {"$timestamp"}:
            return f"timestamp:{value}"
    if isinstance(value, str):
        return f"string:{value}" if _ESCAPE.match(value) else value
    if value is None:
        raise ExtendedJsonError("_id is null")
    if isinstance(value, bool):
        return "bool:true" if value else "bool:false"
    if isinstance(value, int | float | Decimal):
        return f"number:{_number_text(value)}"
    if isinstance(value, datetime):
        return f"date:{value.isoformat()}"
    return f"json:{dumps(value).decode()}"


# --- partial updates ------------------------------------------------------------------------------


def _set_path(target: dict[str, Any], path: str, value: Any) -> None:
    *parents, leaf = path.split(".")
    node = target
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ExtendedJsonError(f"conflicting update paths at {path!r}")
        node = child
    if isinstance(node.get(leaf), dict) and node[leaf] and not isinstance(value, dict):
        raise ExtendedJsonError(f"conflicting update paths at {path!r}")
    node[leaf] = value


def partial_image(update_description: Mapping[str, Any]) -> dict[str, Any]:
    """updateDescription → the nested partial ``after`` described in the module docstring."""
    out: dict[str, Any] = {}
    for entry in update_description.get("truncatedArrays") or []:
        if not (isinstance(entry, dict) and isinstance(entry.get("field"), str) and isinstance(entry.get("size"), int)):
            raise ExtendedJsonError(f"bad truncatedArrays entry {entry!r}")
        _set_path(out, f"{entry['field']}.{TRUNCATE}", entry["size"])
    removed = update_description.get("removedFields") or []
    if not isinstance(removed, list) or not all(isinstance(f, str) for f in removed):
        raise ExtendedJsonError("removedFields is not a list of field names")
    for path in removed:
        _set_path(out, path, None)
    raw_updated = update_description.get("updatedFields")
    updated = {} if raw_updated is None else parse_extended_json(raw_updated, "updatedFields")
    if not isinstance(updated, dict):
        raise ExtendedJsonError("updatedFields is not a document")
    for path, value in updated.items():
        _set_path(out, path, value)
    return out


# --- the envelope ---------------------------------------------------------------------------------


def _payload(raw: bytes | None, what: str) -> dict[str, Any]:
    """Unwrap JsonConverter output with schemas (``{"schema", "payload"}``) or without."""
    if raw is None:
        raise ExtendedJsonError(f"{what} is missing")
    try:
        message = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ExtendedJsonError(f"{what} is not JSON: {exc}") from None
    if isinstance(message, dict) and "schema" in message and "payload" in message:
        message = message["payload"]
    if not isinstance(message, dict):
        raise ExtendedJsonError(f"{what} is not a JSON object")
    return message


def _id_from_key(raw_key: bytes | None) -> Any:
    """The message key's ``_id``, parsed with its extended-JSON wrappers kept (see ``key_string``)."""
    key = _payload(raw_key, "message key")
    if not isinstance(key.get("id"), str):
        raise ExtendedJsonError("message key has no id")
    return _parse(key["id"], "message key id")


def message_key_text(raw_key: bytes | None) -> str:
    """The canonical key text of the document a message key names (``key_string`` of its ``_id``): what the
    DLQ redaction reads from a dead letter whose value may be anything."""
    return key_string(_id_from_key(raw_key))


_NO_ID = object()


def _document(payload: Mapping[str, Any], field: str) -> tuple[dict[str, Any] | None, Any]:
    """The document image and its raw ``_id`` (wrappers kept; ``_NO_ID`` when it has none)."""
    if payload.get(field) is None:
        return None, _NO_ID
    raw = _parse(payload[field], field)
    if not isinstance(raw, dict):
        raise ExtendedJsonError(f"{field} is not a document")
    doc = from_extended_json(raw)
    if not isinstance(doc, dict):
        raise ExtendedJsonError(f"{field} is not a document")
    return doc, raw.get("_id", _NO_ID)


def cluster_time_version(source: Mapping[str, Any]) -> int:
    ts_ms, ord_ = source.get("ts_ms"), source.get("ord")
    if isinstance(ts_ms, bool) or not isinstance(ts_ms, int):
        raise ExtendedJsonError("source.ts_ms missing: cannot order this change")
    if isinstance(ord_, bool) or not isinstance(ord_, int) or not 0 <= ord_ < _UINT32:
        raise ExtendedJsonError("source.ord missing: cannot order this change")
    return ((ts_ms // 1000) << 32) | ord_


def _row(doc: dict[str, Any], key: str) -> dict[str, Any]:
    """``_id`` becomes ``id`` (the key text); a document field that is itself called ``id`` loses to it."""
    return {"id": key, **{k: v for k, v in doc.items() if k not in ("_id", "id")}}


def decode_mongodb(
    raw_value: bytes | None,
    *,
    topic: str,
    partition: int,
    offset: int,
    raw_key: bytes | None = None,
    entities: Mapping[tuple[str, str], Transformer] | None = None,
) -> Decoded:
    """A Debezium MongoDB message → canonical record, dead letter, or skip.

    ``entities`` maps a collection name to the entity's transform (drops secrets such as
    ``hashed_password`` from every image, partial ones included); an unlisted collection is skipped.
    """
    if raw_value is None:
        return Skip("tombstone")
    try:
        return _decode(raw_value, topic, partition, offset, raw_key, entities)
    except ExtendedJsonError as exc:
        return DeadLetter(raw_key, raw_value, topic, partition, offset, bounded(str(exc)))
    except Exception as exc:  # any exception is this message's dead letter, never the worker's
        return DeadLetter(raw_key, raw_value, topic, partition, offset, bounded(f"{type(exc).__name__}: {exc}"))


def _decode(raw_value: bytes, topic: str, partition: int, offset: int, raw_key: bytes | None,
            entities: Mapping[tuple[str, str], Transformer] | None) -> Decoded:
    def dead(reason: str) -> DeadLetter:
        return DeadLetter(raw_key, raw_value, topic, partition, offset, reason)

    try:
        message = orjson.loads(raw_value)
    except orjson.JSONDecodeError as exc:
        return dead(f"not JSON: {exc}")
    envelope = open_envelope(message, raw_key)
    if isinstance(envelope, Skip):
        return envelope
    if isinstance(envelope, str):
        return dead(envelope)
    payload, op, source = envelope.payload, envelope.op, envelope.source
    collection = source.get("collection")
    if not isinstance(collection, str):
        return dead("source.collection missing")
    source_db = source.get("db")
    database = source_db if isinstance(source_db, str) else ""
    transformer = None
    if entities is not None:
        transformer = entities.get((database, collection))
        if transformer is None:
            return Skip(f"collection {database}.{collection} not mapped")
    try:
        version = cluster_time_version(source)
        before, before_id = _document(payload, "before")
        after, after_id = _document(payload, "after") if op != "d" else (None, _NO_ID)
        partial: dict[str, Any] | None = None
        if after is None and op in ("c", "r"):
            raise ExtendedJsonError(f"op {op} without an after document")
        if after is None and op == "u":
            description = payload.get("updateDescription")
            if not isinstance(description, dict):
                raise ExtendedJsonError("update carries neither after nor updateDescription")
            partial = partial_image(description)
        doc_id = after_id if after is not None else before_id
        if doc_id is not _NO_ID:
            key = key_string(doc_id)
            if raw_key is not None and key_string(_id_from_key(raw_key)) != key:
                raise ExtendedJsonError("message key id does not match the document _id")
        elif raw_key is not None:
            key = key_string(_id_from_key(raw_key))
        else:
            raise ExtendedJsonError("no _id: neither the document nor the message key carries one")
        before_row = _row(before, key) if before is not None else None
        after_row = _row(after, key) if after is not None else (_row(partial, key) if partial is not None else None)
        declared: Mapping[str, Any] = {}
        if transformer is not None:
            before_row = transformer.image(before_row, keep=("id",))
            if after_row is not None:
                out = transformer.apply(after_row, partial=partial is not None, keep=("id",))
                if out is FILTERED:
                    op, after_row, partial = "d", None, None
                    before_row = before_row or {"id": key}
                else:
                    assert isinstance(out, dict)
                    after_row = out
            declared = transformer.spec.declared_types
        types = output_types(after_row if after_row is not None else (before_row or {}), {}, declared)
    except ExtendedJsonError as exc:
        return dead(bounded(str(exc)))
    return ChangeRecord(
        source=SOURCE,
        entity=transformer.spec.name if transformer is not None else collection,
        key=key,
        op=cast(Op, op),
        version=version,
        ts_ms=int(source["ts_ms"]),
        before=before_row,
        after=after_row,
        origin=(topic, partition, offset),
        partial=partial is not None,
        key_columns=("id",),
        types=types,
    )
