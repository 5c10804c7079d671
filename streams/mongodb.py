"""Decode Debezium's MongoDB change events into canonical change records (placeholder: being written)."""

from __future__ import annotations

from collections.abc import Mapping

from streams.debezium import Transform
from streams.records import DeadLetter, Decoded


def decode_mongodb(
    raw_value: bytes | None,
    *,
    topic: str,
    partition: int,
    offset: int,
    raw_key: bytes | None = None,
    entities: Mapping[str, Transform] | None = None,
) -> Decoded:
    return DeadLetter(raw_key, raw_value, topic, partition, offset, "MongoDB decoding not implemented yet")
