"""Dead letters you can list and replay.

The decode agent (``changeflow/streams/app.py``) and the sink runners (``changeflow/sinks/runner.py``) park what
they cannot decode on the DLQ topic with the original key/value bytes and where it came from. Once the cause is
fixed, replaying sends those exact bytes back to the topic and partition they came from, so the normal
decode path handles them: no second code path to keep correct.

A dead letter's id is its origin ``<source_topic>:<partition>:<offset>``: stable across listings and
shared by the copies the three sink runners each write for one bad canonical record. Replays are
recorded in a compacted topic keyed by that id, so a replay is skipped once done (unless forced); the
record is written only after the replayed message is acknowledged, and a crash in between at worst
replays twice, which the per-key version guard in every sink turns into a no-op.

**Quarantine.** A record one store refuses (``changeflow/sinks/runner.py``: a mapping conflict, a value out of range)
is parked here too, with the store's name (``changeflow.store``), the entity, key and version beside the
origin headers; its id is still its canonical origin, so one record two stores refused is two entries (one
per store) with one id. Such an entry is never sent back to Kafka (every store would see it again): the
CLI writes it into its own store only (``sinks.runner.replay_into_store``), and its replay is recorded
under ``<id>@<store>``. :func:`quarantined_counts` counts what each store still has in quarantine.

The top half is pure (headers → entries, what to replay); the bottom half is the thin Kafka I/O edge.
"""

from __future__ import annotations

import base64
import logging
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import orjson
from confluent_kafka import (
    OFFSET_BEGINNING,
    TIMESTAMP_NOT_AVAILABLE,
    Consumer,
    KafkaError,
    KafkaException,
    Producer,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient, NewTopic

if TYPE_CHECKING:
    from changeflow.pipelines.spec import Pipeline
    from changeflow.settings import Settings

log = logging.getLogger("changeflow.dlq")

SOURCE_TOPIC = "changeflow.source_topic"
PARTITION = "changeflow.partition"
OFFSET = "changeflow.offset"
ERROR = "changeflow.error"
STORE = "changeflow.store"
ENTITY = "changeflow.entity"
KEY = "changeflow.key"
VERSION = "changeflow.version"
REPLAY_OF = "changeflow.replay_of"
REPLAYED_AT = "changeflow.replayed_at"
# The id a dead letter had before a redaction re-wrote it (``streams.dlq_redact``): it wins over the one its
# position or origin would give, so ``dlq list``/``dlq replay`` ids and the replay log still name it.
DLQ_ID = "changeflow.dlq_id"

PREVIEW_BYTES = 60

Headers = Sequence[tuple[str, bytes | None]] | None


# --- pure -------------------------------------------------------------------------------------------
def replayed_topic_name(dlq_topic: str) -> str:
    """Kept beside the DLQ by name so one setting moves both."""
    return f"{dlq_topic}.replayed"


def dead_letter_id(topic: str, partition: int, offset: int) -> str:
    return f"{topic}:{partition}:{offset}"


def preview(data: bytes | None, limit: int = PREVIEW_BYTES) -> str:
    """A one-line look at the bytes: text when it is UTF-8 (escaped, so a terminal is safe), else hex."""
    if data is None:
        return "<null>"
    head = data[:limit]
    more = "…" if len(data) > limit else ""
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as exc:
        # The cut may split one multi-byte character at the very end: that is still text.
        if not (more and exc.start >= len(head) - 3 and exc.reason == "unexpected end of data"):
            return "0x" + head.hex() + more
        text = head[: exc.start].decode("utf-8")
    if any(not ch.isprintable() for ch in text):
        return text.encode("unicode_escape").decode("ascii") + more
    return text + more


def iso_ms(ms: int | None) -> str | None:
    if ms is None:
        return None
    return datetime.fromtimestamp(ms / 1000, tz=UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _b64(data: bytes | None) -> str | None:
    return None if data is None else base64.b64encode(data).decode("ascii")


@dataclass(frozen=True, slots=True)
class DeadLetterEntry:
    """One dead letter as read back from the DLQ, with where it came from and why."""

    id: str
    source_topic: str | None
    partition: int | None
    offset: int | None
    error: str
    dead_at_ms: int | None
    key: bytes | None
    value: bytes | None
    dlq_partition: int
    dlq_offset: int
    copies: int = 1
    # Quarantined by a store (None: a message the pipeline could not decode).
    store: str | None = None
    entity: str | None = None
    record_key: str | None = None
    version: int | None = None

    @property
    def replayable(self) -> bool:
        return self.source_topic is not None

    @property
    def replay_key(self) -> str:
        """Under which key its replay is recorded: a quarantined entry's replay is per store."""
        return self.id if self.store is None else f"{self.id}@{self.store}"

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "source_topic": self.source_topic,
            "partition": self.partition,
            "offset": self.offset,
            "error": self.error,
            "dead_at": iso_ms(self.dead_at_ms),
            "key_size": None if self.key is None else len(self.key),
            "value_size": None if self.value is None else len(self.value),
            "key_preview": preview(self.key),
            "value_preview": preview(self.value),
            "key_b64": _b64(self.key),
            "value_b64": _b64(self.value),
            "dlq_partition": self.dlq_partition,
            "dlq_offset": self.dlq_offset,
            "copies": self.copies,
            "store": self.store,
            "entity": self.entity,
            "record_key": self.record_key,
            "version": self.version,
        }


def _header_map(headers: Headers) -> dict[str, bytes]:
    # Last one wins, as with any header list a consumer reads as a map.
    return {name: value for name, value in (headers or []) if value is not None}


def _int_header(headers: dict[str, bytes], name: str) -> int | None:
    raw = headers.get(name)
    if raw is None:
        return None
    try:
        return int(raw.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        return None


def _text_header(headers: dict[str, bytes], name: str) -> str | None:
    raw = headers.get(name)
    return None if raw is None else raw.decode("utf-8", errors="replace")


def entry_from_message(
    *,
    key: bytes | None,
    value: bytes | None,
    headers: Headers,
    timestamp_ms: int | None,
    dlq_topic: str,
    dlq_partition: int,
    dlq_offset: int,
) -> DeadLetterEntry:
    """A DLQ message → entry. One without a readable origin is kept (listed) under its DLQ position,
    so nothing parked is ever hidden, but it cannot be replayed: there is nowhere to send it back.
    A ``changeflow.dlq_id`` header (a dead letter a redaction re-wrote) names it instead."""
    h = _header_map(headers)
    source_topic: str | None = None
    raw_topic = h.get(SOURCE_TOPIC)
    if raw_topic:
        try:
            source_topic = raw_topic.decode("utf-8")
        except UnicodeDecodeError:
            source_topic = None
    partition = _int_header(h, PARTITION)
    offset = _int_header(h, OFFSET)
    error = h.get(ERROR, b"").decode("utf-8", errors="replace") or "(no error header)"
    quarantine: dict[str, Any] = {
        "store": _text_header(h, STORE), "entity": _text_header(h, ENTITY), "record_key": _text_header(h, KEY),
        "version": _int_header(h, VERSION),
    }
    kept_id = _text_header(h, DLQ_ID)
    if source_topic is None or partition is None or offset is None:
        return DeadLetterEntry(
            id=kept_id or dead_letter_id(dlq_topic, dlq_partition, dlq_offset), source_topic=None, partition=None,
            offset=None,
            error=error, dead_at_ms=timestamp_ms, key=key, value=value,
            dlq_partition=dlq_partition, dlq_offset=dlq_offset, **quarantine,
        )
    return DeadLetterEntry(
        id=kept_id or dead_letter_id(source_topic, partition, offset), source_topic=source_topic, partition=partition,
        offset=offset, error=error, dead_at_ms=timestamp_ms, key=key, value=value,
        dlq_partition=dlq_partition, dlq_offset=dlq_offset, **quarantine,
    )


def dedupe(entries: Iterable[DeadLetterEntry]) -> list[DeadLetterEntry]:
    """One entry per id (and store, for quarantined records), first seen wins, in DLQ order; ``copies``
    says how many times it was parked (each sink runner parks its own copy of an undecodable canonical
    record; a redelivered batch quarantines a record again)."""
    by_id: dict[str, DeadLetterEntry] = {}
    counts: dict[str, int] = {}
    for entry in entries:
        counts[entry.replay_key] = counts.get(entry.replay_key, 0) + 1
        by_id.setdefault(entry.replay_key, entry)
    return [replace(e, copies=counts[e.replay_key]) for e in by_id.values()]


def for_store(entries: Iterable[DeadLetterEntry], store: str | None) -> list[DeadLetterEntry]:
    """The entries a store quarantined (all entries without a store)."""
    return [e for e in entries if store is None or e.store == store]


def quarantined_counts(
    entries: Iterable[DeadLetterEntry], replays: dict[str, ReplayRecord] | None = None,
) -> dict[tuple[str, str], int]:
    """(store, entity) → records still in quarantine (quarantined and not replayed since)."""
    out: dict[tuple[str, str], int] = {}
    for e in entries:
        if e.store is None or (replays is not None and e.replay_key in replays):
            continue
        k = (e.store, e.entity or "?")
        out[k] = out.get(k, 0) + 1
    return out


@dataclass(frozen=True, slots=True)
class ReplayRecord:
    """What the compacted replay topic remembers per dead-letter id."""

    id: str
    replayed_at_ms: int
    topic: str
    partition: int
    offset: int

    def encode(self) -> bytes:
        return orjson.dumps({
            "id": self.id, "replayed_at_ms": self.replayed_at_ms, "topic": self.topic,
            "partition": self.partition, "offset": self.offset,
        })

    @classmethod
    def decode(cls, raw: bytes) -> ReplayRecord:
        data = orjson.loads(raw)
        return cls(
            id=str(data["id"]), replayed_at_ms=int(data["replayed_at_ms"]), topic=str(data["topic"]),
            partition=int(data["partition"]), offset=int(data["offset"]),
        )


def latest_replays(messages: Iterable[tuple[bytes | None, bytes | None]]) -> dict[str, ReplayRecord]:
    """(key, value) pairs of the replay topic in log order → the latest record per id, as compaction
    will eventually leave it; a null value (tombstone) forgets the id, so it may be replayed again."""
    replays: dict[str, ReplayRecord] = {}
    for key, value in messages:
        if key is None:
            continue
        rid = key.decode("utf-8", errors="replace")
        if value is None:
            replays.pop(rid, None)
            continue
        try:
            replays[rid] = ReplayRecord.decode(value)
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            log.warning("event=bad_replay_record id=%s", rid)
    return replays


class UnknownDeadLetterError(LookupError):
    def __init__(self, ids: Sequence[str]) -> None:
        self.ids = list(ids)
        super().__init__(f"unknown dead-letter id{'s' if len(ids) > 1 else ''}: {', '.join(ids)}")


@dataclass(frozen=True, slots=True)
class Skipped:
    entry: DeadLetterEntry
    reason: str


@dataclass(frozen=True, slots=True)
class ReplayPlan:
    send: list[DeadLetterEntry]
    skip: list[Skipped]


def plan_replay(
    entries: Sequence[DeadLetterEntry],
    replays: dict[str, ReplayRecord],
    *,
    ids: Sequence[str] = (),
    all_: bool = False,
    force: bool = False,
    topics: frozenset[str] | None = None,
) -> ReplayPlan:
    """Which dead letters to send back. Every asked-for id must exist (all are checked before anything is
    sent, so a typo never leaves a half-done replay); done ones are skipped unless forced."""
    by_id: dict[str, list[DeadLetterEntry]] = {}
    for e in entries:
        by_id.setdefault(e.id, []).append(e)
    if all_:
        chosen = list(entries)
    else:
        unknown = [i for i in dict.fromkeys(ids) if i not in by_id]
        if unknown:
            raise UnknownDeadLetterError(unknown)
        chosen = [e for i in dict.fromkeys(ids) for e in by_id[i]]
    send: list[DeadLetterEntry] = []
    skip: list[Skipped] = []
    for entry in chosen:
        if not entry.replayable:
            skip.append(Skipped(entry, "no source topic in its headers: nowhere to send it back"))
        elif topics is not None and entry.store is None and entry.source_topic not in topics:
            # The header is data too: a replay only ever writes to the pipeline's own source topics.
            skip.append(Skipped(entry, f"{entry.source_topic!r} is not one of the pipeline's source topics: "
                                       "not sent"))
        elif entry.replay_key in replays and not force:
            done = replays[entry.replay_key]
            skip.append(Skipped(entry, f"already replayed at {iso_ms(done.replayed_at_ms)}"))
        else:
            send.append(entry)
    return ReplayPlan(send=send, skip=skip)


def masked(entry: DeadLetterEntry, fields_by_topic: Mapping[str, frozenset[str]]) -> DeadLetterEntry:
    """The entry as ``dlq list`` shows it: the values of fields its entity drops or hashes replaced by
    ``"<masked>"`` in the row images of a Debezium message (a MongoDB image's extended-JSON text too).
    Hashing happens in the decode stage, so a raw message that never got there still holds the plain
    value; the DLQ topic keeps the exact bytes for replay, the listing never shows them."""
    fields = fields_by_topic.get(entry.source_topic or "")
    if not fields or entry.value is None or entry.store is not None:
        return entry
    try:
        message = orjson.loads(entry.value)
    except orjson.JSONDecodeError:
        return entry
    if not isinstance(message, dict):
        return entry
    inner = message.get("payload")
    payload: dict[str, Any] = inner if isinstance(inner, dict) else message
    changed = False

    def mask(row: Any) -> Any:
        nonlocal changed
        if isinstance(row, str):  # MongoDB: the image is extended JSON text
            try:
                inner = orjson.loads(row)
            except orjson.JSONDecodeError:
                return row
            out = mask(inner)
            return orjson.dumps(out).decode() if out is not inner else row
        if isinstance(row, dict) and fields & row.keys():
            changed = True
            return {k: ("<masked>" if k in fields else v) for k, v in row.items()}
        return row

    for side in ("before", "after", "patch"):
        if side in payload:
            payload[side] = mask(payload[side])
    update = payload.get("updateDescription")
    if isinstance(update, dict) and "updatedFields" in update:
        update["updatedFields"] = mask(update["updatedFields"])
    if not changed:
        return entry
    return replace(entry, value=orjson.dumps(message))


def replay_headers(entry: DeadLetterEntry, now_ms: int) -> list[tuple[str, str | bytes | None]]:
    """Marks the message as a replay so logs, and a second dead letter, can be traced to this one."""
    return [(REPLAY_OF, entry.id.encode()), (REPLAYED_AT, str(now_ms).encode())]


# --- Kafka I/O --------------------------------------------------------------------------------------
def _reader(settings: Settings) -> Any:
    # Partitions are assigned by hand and nothing is committed, so a listing never moves anyone's
    # offsets and is repeatable; the group id is only a required config value.
    return Consumer({
        "bootstrap.servers": settings.kafka_bootstrap,
        "group.id": f"changeflow-dlq-reader-{uuid.uuid4().hex}",
        "enable.auto.commit": False,
        "enable.partition.eof": False,
        "auto.offset.reset": "earliest",
    })


def read_topic(settings: Settings, topic: str, timeout: float = 30.0) -> list[Any]:
    """Every message of ``topic`` from its beginning up to its end as of now (a missing topic is empty)."""
    return read_to_end(settings, topic, timeout)[1]


def read_to_end(settings: Settings, topic: str, timeout: float = 30.0) -> tuple[dict[int, int], list[Any]]:
    """The high watermark of each partition of ``topic`` (noted first), and every message below it, in
    partition and offset order (a missing topic: nothing)."""

    consumer = _reader(settings)
    try:
        metadata = consumer.list_topics(topic, timeout=timeout)
        info = metadata.topics.get(topic)
        if info is None or info.error is not None or not info.partitions:
            return {}, []
        highs: dict[int, int] = {}
        ends: dict[int, int] = {}
        for p in info.partitions:
            low, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=timeout, cached=False)
            highs[p] = high
            if high > low:
                ends[p] = high
        if not ends:
            return highs, []
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in ends])
        messages: list[Any] = []
        remaining = dict(ends)
        deadline = time.monotonic() + timeout
        # A loop, not wait_until: each batch consumed is kept here, and the wait ends at each partition's end.
        while remaining:
            if time.monotonic() > deadline:
                raise TimeoutError(f"reading {topic}: still {remaining} offsets to go after {timeout}s")
            for msg in consumer.consume(1000, 0.5):
                if msg.error() is not None:
                    raise KafkaException(msg.error())
                p, off = msg.partition(), msg.offset()
                if p in remaining and off < remaining[p]:
                    messages.append(msg)
                if p in remaining and off + 1 >= remaining[p]:
                    del remaining[p]
            # A partition whose remaining records were compacted or deleted away ends early.
            for p in list(remaining):
                position = consumer.position([TopicPartition(topic, p)])[0].offset
                if position >= remaining[p]:
                    del remaining[p]
        messages.sort(key=lambda m: (m.partition(), m.offset()))
        return highs, messages
    finally:
        consumer.close()


def read_dead_letters(settings: Settings, pipeline: Pipeline) -> list[DeadLetterEntry]:
    entries = [
        entry_from_message(
            key=m.key(), value=m.value(), headers=m.headers(), timestamp_ms=_timestamp(m),
            dlq_topic=pipeline.dlq_topic, dlq_partition=m.partition(), dlq_offset=m.offset(),
        )
        for m in read_topic(settings, pipeline.dlq_topic)
    ]
    entries.sort(key=lambda e: (e.dead_at_ms or 0, e.dlq_partition, e.dlq_offset))
    return dedupe(entries)


def read_replays(settings: Settings, pipeline: Pipeline) -> dict[str, ReplayRecord]:
    return latest_replays((m.key(), m.value()) for m in read_topic(settings, replayed_topic_name(pipeline.dlq_topic)))


def read_quarantined_counts(settings: Settings, pipeline: Pipeline) -> dict[tuple[str, str], int]:
    """(store, entity) → records still in quarantine, read from the DLQ and its replay log (for status)."""
    return quarantined_counts(read_dead_letters(settings, pipeline), read_replays(settings, pipeline))


def record_store_replays(settings: Settings, pipeline: Pipeline, entries: Sequence[DeadLetterEntry],
                         timeout: float = 30.0) -> list[ReplayRecord]:
    """Remember quarantined entries written back into their store (``<id>@<store>``, topic ``store:<S>``)."""

    if not entries:
        return []
    ensure_replay_topic(settings, pipeline, timeout)
    producer = Producer({"bootstrap.servers": settings.kafka_bootstrap, "acks": "all", "enable.idempotence": True})
    now_ms = int(time.time() * 1000)
    errors: list[str] = []
    records = [ReplayRecord(e.replay_key, now_ms, f"store:{e.store}", -1, -1) for e in entries]
    for record in records:
        producer.produce(replayed_topic_name(pipeline.dlq_topic), key=record.id.encode(), value=record.encode(),
                         on_delivery=lambda err, _m: errors.append(str(err)) if err else None)
        log.info("event=replayed_into_store id=%s", record.id)
    if producer.flush(timeout) > 0 or errors:
        raise KafkaException(f"replayed into the store, but recording it failed: {'; '.join(errors) or 'timeout'}")
    return records


def _timestamp(msg: Any) -> int | None:
    kind, ms = msg.timestamp()
    return None if kind == TIMESTAMP_NOT_AVAILABLE else int(ms)


def ensure_replay_topic(settings: Settings, pipeline: Pipeline, timeout: float = 30.0) -> None:
    """The replay log is compacted: it only needs the latest record per id, forever."""

    admin = AdminClient({"bootstrap.servers": settings.kafka_bootstrap})
    name = replayed_topic_name(pipeline.dlq_topic)
    if name in admin.list_topics(timeout=timeout).topics:
        return
    futures = admin.create_topics(
        [NewTopic(name, num_partitions=1, replication_factor=1, config={"cleanup.policy": "compact"})],
        operation_timeout=timeout,
    )
    try:
        futures[name].result(timeout)
    except KafkaException as exc:
        if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
            raise
    log.info("event=created_topic topic=%s cleanup.policy=compact", name)


def _partition_count(settings: Settings, topic: str, timeout: float) -> int:
    info = AdminClient({"bootstrap.servers": settings.kafka_bootstrap}).list_topics(topic, timeout=timeout).topics.get(
        topic
    )
    return 0 if info is None or info.error is not None else len(info.partitions)


def replay(
    settings: Settings, pipeline: Pipeline, entries: Sequence[DeadLetterEntry], timeout: float = 30.0
) -> list[ReplayRecord]:
    """Send each entry's original bytes back to its original topic and partition, then record it.

    Same partition as the original so the replay queues behind the same key's other changes; if that
    partition no longer exists the producer picks one by key. Raises on any delivery failure: a replay
    that is not acknowledged is not recorded, so it can simply be run again.
    """

    if not entries:
        return []
    ensure_replay_topic(settings, pipeline, timeout)
    producer = Producer({"bootstrap.servers": settings.kafka_bootstrap, "acks": "all", "enable.idempotence": True})
    partitions: dict[str, int] = {}
    delivered: dict[str, tuple[str, int, int]] = {}
    errors: list[str] = []

    def on_delivery(rid: str) -> Any:
        def callback(err: Any, msg: Any) -> None:
            if err is not None:
                errors.append(f"{rid}: {err}")
            else:
                delivered[rid] = (msg.topic(), msg.partition(), msg.offset())

        return callback

    now_ms = int(time.time() * 1000)
    for entry in entries:
        assert entry.source_topic is not None  # plan_replay only sends replayable entries
        if entry.source_topic not in partitions:
            partitions[entry.source_topic] = _partition_count(settings, entry.source_topic, timeout)
        kwargs: dict[str, Any] = {}
        if entry.partition is not None and 0 <= entry.partition < partitions[entry.source_topic]:
            kwargs["partition"] = entry.partition
        producer.produce(
            entry.source_topic, key=entry.key, value=entry.value, headers=replay_headers(entry, now_ms),
            on_delivery=on_delivery(entry.id), **kwargs,
        )
        producer.poll(0)
    if producer.flush(timeout) > 0:
        raise TimeoutError(f"replay: {len(entries) - len(delivered)} message(s) not acknowledged within {timeout}s")
    if errors:
        raise KafkaException(f"replay delivery failed: {'; '.join(errors)}")

    records = [ReplayRecord(entry.id, now_ms, *delivered[entry.id]) for entry in entries]
    topic = replayed_topic_name(pipeline.dlq_topic)
    for record in records:
        producer.produce(topic, key=record.id.encode(), value=record.encode(), on_delivery=on_delivery("record"))
        log.info(
            "event=replayed id=%s topic=%s partition=%s offset=%s", record.id, record.topic, record.partition,
            record.offset,
        )
    if producer.flush(timeout) > 0 or errors:
        raise KafkaException(f"replayed, but recording the replays failed: {'; '.join(errors) or 'timeout'}")
    return records
