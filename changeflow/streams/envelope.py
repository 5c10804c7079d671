"""The Debezium envelope, checked once for every source: what is a change event, what is to be skipped, and what
is a dead letter (#19 §4: the PostgreSQL and MongoDB decoders used to write these checks twice).

Pure: a parsed message (each decoder parses its JSON its own way: the PostgreSQL one keeps numbers exact) and
its raw key in; an :class:`Envelope` (the payload, its op and its source block) out, or what to do instead: a
:class:`~changeflow.streams.records.Skip` (a heartbeat, transaction metadata, an op the source says to skip) or
the reason the message is a dead letter. What follows the envelope (a table or a collection, the row images)
stays with each source's decoder.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from changeflow.streams.records import Skip

CHANGE_OPS = ("c", "u", "d", "r")
NOT_A_CHANGE = "neither op nor source: not a change event (a heartbeat has a schema named *.Heartbeat)"


@dataclass(frozen=True)
class Envelope:
    payload: dict[str, Any]
    op: str
    source: dict[str, Any]
    # The message's Connect schema (JsonConverter with schemas.enable=true); empty without one.
    schema: dict[str, Any]


def unwrap(message: Any) -> Any:
    """JsonConverter output with schemas (``{"schema", "payload"}``) → its payload; without, as it is."""
    if isinstance(message, dict) and "payload" in message and "schema" in message:
        return message["payload"]
    return message


def is_heartbeat_key(raw_key: bytes | None) -> bool:
    """Debezium keys its heartbeats by the connector's logical name: ``{"serverName": ...}``."""
    if raw_key is None:
        return False
    try:
        key = unwrap(orjson.loads(raw_key))
    except orjson.JSONDecodeError:
        return False
    return isinstance(key, dict) and set(key) == {"serverName"}


def open_envelope(message: Any, raw_key: bytes | None,
                  special_ops: Mapping[str, Skip | str] | None = None) -> Envelope | Skip | str:
    """The change event in ``message``, a ``Skip``, or a dead letter's reason (a ``str``).

    ``special_ops``: what a source does with an op beyond c/u/d/r: a ``Skip`` (PostgreSQL's logical decoding
    message ``m``) or a dead letter's reason (its truncate ``t``); any other op is unknown."""
    if not isinstance(message, dict):
        return "not a JSON object"
    with_schema = "schema" in message
    payload = message.get("payload", message) if with_schema else message
    schema = message.get("schema") or {}
    if not isinstance(payload, dict):
        return "payload is not an object"
    if not isinstance(schema, dict):
        return "schema is not an object"
    if payload.get("status") in ("BEGIN", "END") and "op" not in payload:
        return Skip("transaction metadata")
    schema_name = schema.get("name")
    if isinstance(schema_name, str) and schema_name.endswith(".Heartbeat"):
        return Skip("heartbeat")
    op = payload.get("op")
    if op is None and "source" not in payload:
        if not with_schema and set(payload) == {"ts_ms"} and is_heartbeat_key(raw_key):
            return Skip("heartbeat")  # a heartbeat without schemas (schemas.enable=false): its key names it
        return NOT_A_CHANGE
    if isinstance(op, str) and special_ops and op in special_ops:
        return special_ops[op]
    if op not in CHANGE_OPS:
        return f"unknown op {op!r}"
    source = payload.get("source")
    if not isinstance(source, dict):
        return "source block missing"
    return Envelope(payload, op, source, schema)
