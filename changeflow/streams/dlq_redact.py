"""Dead letters of an erased person, removed from the dead-letter topic (README "Erasure", issue 23).

The DLQ topic keeps full copies of what it parks, for ever (``worker.DLQ_CONFIG``): the raw Debezium bytes of
a message the decode stage could not read, a canonical record a store refused. Kafka cannot delete one record,
only every record of a partition before an offset (``AdminClient.delete_records``), so :func:`redact`:

1. notes each partition's high watermark H and reads it from its low watermark up to H;
2. finds each dead letter's row (:func:`row_of`): its ``changeflow.entity``/``changeflow.key`` headers (a
   quarantined record), else the entity whose raw (or canonical) topic its ``changeflow.source_topic`` is and
   the canonical key text of its Kafka key; a dead letter whose row cannot be read is kept and counted;
3. when one is doomed, writes every other dead letter of that partition below H again (same key, value,
   headers and timestamp, plus ``changeflow.dlq_id``, its id, so ``dlq list``/``dlq replay`` and the replay log
   still name it), acknowledged by every replica, and only then deletes the partition's records below H. A
   crash in between leaves each kept dead letter twice (one id: ``dlq.dedupe`` lists it once, ``copies`` 2),
   never lost. A dead letter parked meanwhile is at H or after: untouched;
4. reads the topic again and checks it: nothing below H is left, every kept dead letter is there, and no
   doomed one is, except ones parked at or after H (counted as ``late``: the next run removes them).

:func:`doomed_by` builds the question from the suppression list: a dead letter is doomed when its row has
any suppression entry, erased or anonymised (an anonymised row's dead letter still holds the link and the
personal fields). Out of scope: a dead letter of another row whose image refers to an erased person (an order
of an erased user that was never found by the erasure), a key only in the row image (an entity whose declared
key is not the message key: counted as unreadable, kept), and the replay log's records (ids and positions,
no personal data).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from confluent_kafka import KafkaException, Producer, TopicPartition
from confluent_kafka.admin import AdminClient

from changeflow.pipelines.erasure import mark
from changeflow.streams import debezium, mongodb
from changeflow.streams.dlq import (
    DLQ_ID,
    ENTITY,
    KEY,
    SOURCE_TOPIC,
    Headers,
    _header_map,
    _reader,
    _timestamp,
    entry_from_message,
    read_to_end,
)
from changeflow.streams.suppression import SuppressionFeed

if TYPE_CHECKING:
    from changeflow.pipelines.spec import Pipeline
    from changeflow.settings import Settings
    from changeflow.streams.erasure import Suppressor

log = logging.getLogger("changeflow.dlq")

Say = Callable[[str], None]
Doomed = Callable[[str, str], bool]


# --- pure -------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Origin:
    """What a source topic's messages are: which entity, and how its Kafka key spells the row's key."""

    entity: str
    kind: str  # "postgres" | "mongodb" (a raw Debezium key) | "canonical" (``<entity>:<key>``)
    key_columns: tuple[str, ...] | None = None  # a postgres entity's declared key (None: the message key's)


def origins(pipeline: Pipeline) -> dict[str, Origin]:
    """Source topic → origin: the raw topics the decode stage reads, the canonical topics the sinks read."""
    out = {e.canonical_topic: Origin(e.name, "canonical") for e in pipeline.entities.values()}
    for topic, spec in pipeline.raw_topics().items():
        out[topic] = Origin(spec.name, "mongodb" if spec.source == "mongodb" else "postgres", spec.key_columns)
    return out


def _strict_text(headers: dict[str, bytes], name: str) -> str | None:
    raw = headers.get(name)
    if raw is None:
        return None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None


def row_of(key: bytes | None, headers: Headers, topics: Mapping[str, Origin]) -> tuple[str, str] | None:
    """A dead letter's row (entity, canonical key text), or None when it cannot be read (kept, never guessed).

    A quarantined record names it in its headers; a decode-stage dead letter by its source topic and Debezium
    key (``{"id": 1}``, ``{"schema": .., "payload": {..}}``, composite keys in key order; MongoDB's
    ``{"id": "<extended JSON of _id>"}``); a sink's undecodable canonical record by its topic and
    ``<entity>:<key>`` key."""
    h = _header_map(headers)
    entity, row_key = _strict_text(h, ENTITY), _strict_text(h, KEY)
    if entity and row_key is not None:
        return entity, row_key
    topic = _strict_text(h, SOURCE_TOPIC)
    origin = topics.get(topic or "")
    if origin is None or key is None:
        return None
    try:
        if origin.kind == "canonical":
            prefix = f"{origin.entity}:".encode()
            return (origin.entity, key[len(prefix):].decode("utf-8")) if key.startswith(prefix) else None
        if origin.kind == "mongodb":
            return origin.entity, mongodb.message_key_text(key)
        return origin.entity, debezium.message_key_text(key, origin.key_columns)
    except Exception:  # any key that does not read (not JSON, not an object, a column missing) is unreadable
        return None


def doomed_by(suppressor: Suppressor, request: str | None = None) -> Doomed:
    """``doomed`` for :func:`redact` from the suppression list: the row has an entry (erased or anonymised), made
    by ``request`` when one is named: a later erasure never removes the dead letters of a row an earlier one
    erased, whose owner may have registered again since (their new dead letters are theirs to keep)."""

    def doomed(entity: str, key: str) -> bool:
        entry = suppressor.entries.get(mark(suppressor.key, entity, key)) if suppressor.entries else None
        return entry is not None and (request is None or entry.request == request)

    return doomed


# --- Kafka I/O --------------------------------------------------------------------------------------
class RedactionError(RuntimeError):
    """The DLQ does not read back as the redaction left it: nothing is lost (kept ones were written first)."""


@dataclass(frozen=True)
class Redaction:
    kept: int  # dead letters below H left on the topic (re-written in a partition that had a doomed one)
    removed: int
    unreadable: int  # of the kept: no readable row, so never judged
    highs: dict[int, int] = field(default_factory=dict)  # partition → H, noted before reading
    lows: dict[int, int] = field(default_factory=dict)  # partition → low watermark afterwards
    late: int = 0  # doomed dead letters parked at or after H, while it ran: left for the next run

    @property
    def low_watermark(self) -> int:
        """The DLQ's one partition's low watermark afterwards (the lowest of several)."""
        return min(self.lows.values(), default=0)


def _copy_headers(msg: Any, dlq_topic: str) -> list[tuple[str, str | bytes | None]]:
    headers: list[tuple[str, str | bytes | None]] = list(msg.headers() or [])
    if not any(name == DLQ_ID for name, _ in headers):
        entry = entry_from_message(key=msg.key(), value=msg.value(), headers=msg.headers(), timestamp_ms=None,
                                   dlq_topic=dlq_topic, dlq_partition=msg.partition(), dlq_offset=msg.offset())
        headers.append((DLQ_ID, entry.id.encode()))
    return headers


def _entry_key(msg: Any, dlq_topic: str) -> str:
    return entry_from_message(key=msg.key(), value=msg.value(), headers=msg.headers(), timestamp_ms=None,
                              dlq_topic=dlq_topic, dlq_partition=msg.partition(),
                              dlq_offset=msg.offset()).replay_key


def redact(settings: Settings, pipeline: Pipeline, doomed: Doomed, say: Say = lambda _line: None,
           timeout: float = 30.0) -> Redaction:
    """Remove every dead letter whose row ``doomed(entity, key)`` says is erased from ``pipeline.dlq_topic``,
    keeping all others with their ids (module docstring). Raises (KafkaException, TimeoutError) before the
    deletion when the kept ones are not all acknowledged, and RedactionError when the result does not check."""
    topic = pipeline.dlq_topic
    topics = origins(pipeline)
    highs, messages = read_to_end(settings, topic, timeout)
    keep: list[Any] = []
    removed: dict[int, int] = {}
    unreadable = 0
    for msg in messages:
        row = row_of(msg.key(), msg.headers(), topics)
        if row is None:
            unreadable += 1
        if row is not None and doomed(*row):
            removed[msg.partition()] = removed.get(msg.partition(), 0) + 1
        else:
            keep.append(msg)
    if not removed:
        say(f"{topic}: no dead letter of an erased row ({len(keep)} kept, {unreadable} unreadable)")
        return Redaction(kept=len(keep), removed=0, unreadable=unreadable, highs=highs,
                         lows=_lows(settings, topic, highs, timeout))

    rewrite = [m for m in keep if m.partition() in removed]
    say(f"{topic}: removing {sum(removed.values())} dead letter(s) of erased rows; re-writing {len(rewrite)} "
        f"kept one(s) first")
    producer = Producer({"bootstrap.servers": settings.kafka_bootstrap, "acks": "all", "enable.idempotence": True})
    errors: list[str] = []
    for msg in rewrite:
        extra: dict[str, Any] = {}
        ts = _timestamp(msg)
        if ts is not None:
            extra["timestamp"] = ts  # the time it was parked: `dlq list` shows it and orders by it
        producer.produce(topic, partition=msg.partition(), key=msg.key(), value=msg.value(),
                         headers=_copy_headers(msg, topic),
                         on_delivery=lambda err, _m: errors.append(str(err)) if err else None, **extra)
        producer.poll(0)
    if producer.flush(timeout) > 0:
        raise TimeoutError(f"redact: kept dead letters not acknowledged within {timeout}s; nothing deleted")
    if errors:
        raise KafkaException(f"redact: kept dead letters not delivered ({'; '.join(errors)}); nothing deleted")

    admin = AdminClient({"bootstrap.servers": settings.kafka_bootstrap})
    futures = admin.delete_records([TopicPartition(topic, p, highs[p]) for p in sorted(removed)],
                                   request_timeout=timeout, operation_timeout=timeout)
    for tp, future in futures.items():
        done = future.result(timeout)
        log.info("event=dlq_redacted topic=%s partition=%s low_watermark=%s removed=%s", topic, tp.partition,
                 done.low_watermark, removed[tp.partition])

    late = _verify(settings, pipeline, doomed, highs, removed, keep, timeout)
    lows = _lows(settings, topic, highs, timeout)
    say(f"{topic}: removed {sum(removed.values())}, kept {len(keep)} ({unreadable} unreadable); low watermark "
        + ", ".join(f"{p}: {lows[p]}" for p in sorted(lows))
        + (f"; {late} parked meanwhile are left for the next run" if late else ""))
    return Redaction(kept=len(keep), removed=sum(removed.values()), unreadable=unreadable, highs=highs, lows=lows,
                     late=late)


def redact_suppressed(settings: Settings, pipeline: Pipeline, say: Say = lambda _line: None,
                      timeout: float = 30.0, request: str | None = None) -> Redaction | None:
    """What the erasure calls once the suppression list holds its rows: the suppression topic read to its end,
    then :func:`redact` with :func:`doomed_by` it. None for a pipeline that declares no erasure subject."""
    feed = SuppressionFeed.for_pipeline(settings, pipeline)
    if feed is None:
        return None
    try:
        feed.refresh(force=True)
        return redact(settings, pipeline, doomed_by(feed.suppressor, request), say, timeout)
    finally:
        feed.close()


def _verify(settings: Settings, pipeline: Pipeline, doomed: Doomed, highs: dict[int, int],
            removed: dict[int, int], keep: list[Any], timeout: float) -> int:
    topic = pipeline.dlq_topic
    topics = origins(pipeline)
    _highs, after = read_to_end(settings, topic, timeout)
    left = [m for m in after if m.partition() in removed and m.offset() < highs[m.partition()]]
    if left:
        raise RedactionError(f"{topic}: {len(left)} record(s) below the redacted offsets are still there")
    there = {_entry_key(m, topic) for m in after}
    missing = {_entry_key(m, topic) for m in keep} - there
    if missing:
        raise RedactionError(f"{topic}: kept dead letters missing after the redaction: {', '.join(sorted(missing))}")
    late = 0
    for m in after:
        row = row_of(m.key(), m.headers(), topics)
        if row is not None and doomed(*row):
            late += 1
            log.warning("event=dlq_redact_late topic=%s partition=%s offset=%s", topic, m.partition(), m.offset())
    return late


def _lows(settings: Settings, topic: str, highs: dict[int, int], timeout: float) -> dict[int, int]:
    consumer = _reader(settings)
    try:
        return {p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=timeout, cached=False)[0]
                for p in highs}
    finally:
        consumer.close()


