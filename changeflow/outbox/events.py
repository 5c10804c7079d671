"""An outbox event as a consumer sees it, read from a Kafka message that Debezium's outbox router wrote.

Pure: a message's topic, position, key, value and headers in, an :class:`Event` (or :class:`BadEvent`, a
value naming why) out. What the router writes under changeflow's connector settings
(``connectors.render.outbox_transforms``; Connect's JsonConverter with schemas):

- key: ``{"schema": ..., "payload": <aggregate id>}``;
- value: ``{"schema": ..., "payload": <payload>}``, the payload a string holding the JSON (a ``jsonb`` column
  without ``expand_json_payload``) or the JSON itself (with it), or null for a null payload;
- headers: ``id`` (the event id), ``aggregate_type``, ``type`` and each column of ``headers:``, as text.
"""

from __future__ import annotations

import base64
import json
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from confluent_kafka import Consumer, KafkaException

from changeflow.pipelines.outbox import ERROR_HEADER

ID_HEADER = "id"

Headers = Sequence[tuple[str, bytes | None]] | None


class BadEvent(ValueError):
    """A message that is no usable event (no event id); its reason is the message."""


@dataclass(frozen=True)
class Event:
    id: str
    topic: str
    partition: int
    offset: int
    aggregate_id: str | None
    aggregate_type: str | None
    type: str | None
    payload: Any  # the payload as sent: a dict/list when expanded, else the text (None for a null payload)
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def data(self) -> Any:
        """The payload as JSON: parsed when it was sent as text (integers and decimals exact). Raises
        ValueError for text that is not JSON (the outbox row held invalid JSON)."""
        if isinstance(self.payload, str):
            return json.loads(self.payload, parse_float=Decimal)
        return self.payload


def _unwrap(raw: bytes | None) -> Any:
    """JsonConverter's ``{"schema", "payload"}`` envelope → the payload; bare JSON as it stands."""
    if raw is None:
        return None
    value = json.loads(raw, parse_float=Decimal)
    if isinstance(value, dict) and set(value) == {"schema", "payload"}:
        return value["payload"]
    return value


def _message_row(raw: bytes | None) -> str:
    """The row a dead-lettered UPDATE names: the content of Debezium's logical decoding message (``op: m``)
    that ``connectors.prepare``'s trigger emitted, ``{"outbox", "id", "reason"}``."""
    try:
        content = _unwrap(raw)["message"]["content"]
        row = json.loads(base64.b64decode(content))
        return f" (outbox {row['outbox']}, row id {json.dumps(row['id'])})"
    except (ValueError, TypeError, KeyError):
        return ""


def _key(raw: bytes | None) -> Any:
    """The router's key is Connect JSON; a derived event's (``streams.derived``) is the entity's key text."""
    try:
        return _unwrap(raw)
    except ValueError:
        return _text(raw)


def _text(value: bytes | None) -> str | None:
    return None if value is None else value.decode("utf-8", errors="replace")


def parse(topic: str, partition: int, offset: int, key: bytes | None, value: bytes | None,
          headers: Headers) -> Event:
    """The event a message carries; BadEvent when it has no event id or is not JSON."""
    hdrs = {name: _text(v) or "" for name, v in headers or ()}
    event_id = hdrs.get(ID_HEADER)
    if not event_id:
        why = f"; {ERROR_HEADER}: {hdrs[ERROR_HEADER]}{_message_row(value)}" if ERROR_HEADER in hdrs else ""
        raise BadEvent(f"{topic}:{partition}:{offset}: no `{ID_HEADER}` header (not an outbox event){why}")
    try:
        aggregate_id = _key(key)
        payload = _unwrap(value)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadEvent(f"{topic}:{partition}:{offset}: not JSON ({exc})") from None
    return Event(id=event_id, topic=topic, partition=partition, offset=offset,
                 aggregate_id=None if aggregate_id is None else str(aggregate_id),
                 aggregate_type=hdrs.get("aggregate_type"), type=hdrs.get("type"), payload=payload,
                 headers=hdrs)


def from_message(message: Any) -> Event:
    """:func:`parse` over a confluent_kafka ``Message``."""
    return parse(message.topic(), message.partition(), message.offset(), message.key(), message.value(),
                 message.headers())


def line(event: Event, width: int = 200) -> str:
    """One event as one line for people: every value from data JSON-quoted (a newline or a terminal escape in an
    aggregate id stays visible text), the payload cut at ``width`` characters."""
    payload = json.dumps(event.payload, default=str, ensure_ascii=True, separators=(",", ":"))
    if len(payload) > width:
        payload = payload[:width] + "…"
    parts = [f"{event.topic}[{event.partition}]@{event.offset}", f"id={json.dumps(event.id)}",
             f"aggregate={json.dumps(event.aggregate_type)}/{json.dumps(event.aggregate_id)}",
             f"type={json.dumps(event.type)}"]
    if ERROR_HEADER in event.headers:
        parts.append(f"error={json.dumps(event.headers[ERROR_HEADER])}")
    return " ".join(parts) + f" payload={payload}"


def as_dict(event: Event) -> dict[str, Any]:
    return {"topic": event.topic, "partition": event.partition, "offset": event.offset, "id": event.id,
            "aggregate_type": event.aggregate_type, "aggregate_id": event.aggregate_id, "type": event.type,
            "payload": event.payload, "headers": event.headers}


def tail(bootstrap: str, topics: Sequence[str], *, from_beginning: bool, limit: int | None, idle_s: float | None,
         emit: Callable[[Event | BadEvent], None]) -> int:
    """Read ``topics`` (names, or ``^regex`` patterns) without committing anything, handing each event (or
    BadEvent) to ``emit``, until ``limit`` were read or nothing came for ``idle_s``; the number read."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"changeflow-tail-{uuid.uuid4().hex}",
                         "enable.auto.commit": False, "auto.offset.reset": "earliest" if from_beginning else "latest",
                         "topic.metadata.refresh.interval.ms": 2000, "log_level": 3})
    read = 0
    last = time.monotonic()
    try:
        consumer.subscribe(list(topics))
        while (limit is None or read < limit) and (idle_s is None or time.monotonic() - last < idle_s):
            message = next_message(consumer, 0.2)
            if message is None:
                continue
            last = time.monotonic()
            read += 1
            try:
                emit(from_message(message))
            except BadEvent as exc:
                emit(exc)
    finally:
        consumer.close()
    return read


def next_message(consumer: Any, poll_s: float) -> Any:
    """The next message of a confluent_kafka consumer, None for none (or a passing error); a fatal error raises."""
    message = consumer.poll(poll_s)
    if message is None:
        return None
    error = message.error()
    if error is not None:
        if error.fatal():
            raise KafkaException(error)
        return None
    return message


def idle_stop(idle_s: float | None) -> Callable[[int], bool]:
    """A ``stop`` for a loop reporting its progress as a count: true once the count has not moved for
    ``idle_s`` seconds (never, for None)."""
    seen = {"n": -1, "at": time.monotonic()}

    def stop(progress: int) -> bool:
        if progress != seen["n"]:
            seen.update(n=progress, at=time.monotonic())
        return idle_s is not None and time.monotonic() - seen["at"] > idle_s

    return stop


def stopping(consumer: Any, stop: Callable[[Any], bool], progress: Any, started: float,
             grace_s: float = 30.0) -> bool:
    """``stop(progress)``, consulted only once the consumer has its partitions (or ``grace_s`` after ``started``): a
    group's first join takes seconds (the broker's initial rebalance delay), which an idle stop must not count."""
    if not consumer.assignment() and time.monotonic() - started < grace_s:
        return False
    return stop(progress)
