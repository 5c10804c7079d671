"""The Faust app: the thin I/O edge around the pure decoders.

The ``decode`` agent turns each message of Debezium's raw topics into a canonical record (Avro,
single-object encoding) on ``changeflow.<entity>`` keyed ``entity:key`` (so one row's changes stay in
order in one partition), or into a dead letter on ``changeflow.dlq`` with the original bytes and the
reason; the stream goes on either way. It works on batches that ``RawFeed`` reads with the C client,
produces with the C client and waits for every delivery before the feed commits the batch's raw
offsets: at least once, with Faust's per-message costs paid once per batch.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import faust
import mode
import orjson
from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer

from changeflow import metrics, schemas
from changeflow.pipelines.spec import Pipeline, worker_app_id
from changeflow.pipelines.transform import Transformer, compile_pipeline
from changeflow.runtime import tune_gc
from changeflow.schemas.book import schema_book
from changeflow.streams.canonical import to_avro
from changeflow.streams.debezium import decode_postgres
from changeflow.streams.derived import events as derived_events
from changeflow.streams.derived import headers as event_headers
from changeflow.streams.erasure import Suppressor
from changeflow.streams.mongodb import decode_mongodb
from changeflow.streams.records import ChangeRecord, DeadLetter, Skip, outcome, without_values
from changeflow.streams.suppression import SuppressionFeed

if TYPE_CHECKING:
    from changeflow.settings import Settings

log = logging.getLogger("changeflow.streams")

CANONICAL_PARTITIONS = 3
# The raw topics' consumer group: its committed offsets say how far Debezium's changes are decoded.
DECODE_GROUP = "changeflow"
# The feed hands the agent whatever is queued, up to this many messages, as soon as one is there.
FEED_BATCH = 5000
FEED_WAIT_S = 0.5
FEED_STOP_GRACE_S = 30.0


def transformers(pipeline: Pipeline, source: str) -> dict[tuple[str, str], Transformer]:
    return compile_pipeline(pipeline, source)


def dead_letter_headers(letter: DeadLetter) -> dict[str, bytes]:
    return {
        "changeflow.source_topic": letter.topic.encode(),
        "changeflow.partition": str(letter.partition).encode(),
        "changeflow.offset": str(letter.offset).encode(),
        "changeflow.error": letter.reason.encode(),
    }


class DeliveryFailed(RuntimeError):
    """The producer could not deliver every record of a batch: its raw offsets must not be committed."""


@dataclass
class RawBatch:
    """Raw Debezium messages for the decode agent, and how their processing ended."""

    messages: list[Message]
    done: concurrent.futures.Future[int] = field(default_factory=concurrent.futures.Future)


def _stop_this_process() -> None:
    """The worker stops (Faust's SIGTERM handling, sink processes told to finish) with the batch uncommitted."""
    os.kill(os.getpid(), signal.SIGTERM)


class RawFeed(mode.Service):
    """Feeds the decode agent from the raw topics, a batch at a time, with the C client (librdkafka).

    Faust's own consumer path (aiokafka, one Faust event per message) capped the decode stage at about
    3,900 changes/s on this machine even with nothing else in the process; librdkafka fetches and
    parses in its own threads and hands over whole batches, so the agent pays Faust's per-message costs
    once per batch. The feed takes whatever is queued (up to ``FEED_BATCH``) as soon as one message is
    there, so a quiet stream adds no batching delay and a backlog is read in large batches.

    Offsets: the feed commits a batch's raw offsets only after the agent reports every record of it
    delivered to Kafka (at least once). If delivery fails the worker stops without committing, and the
    batch is read again at the next start.
    """

    def __init__(self, *, config: dict[str, Any], topics: list[str],
                 deliver: Callable[[RawBatch], Coroutine[Any, Any, None]],
                 on_fatal: Callable[[], None] | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._on_fatal = on_fatal or _stop_this_process
        self._config = config
        self._topics = topics
        self._deliver = deliver
        self._halt = threading.Event()
        self._thread: threading.Thread | None = None

    async def on_start(self) -> None:
        loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, args=(loop,), name="decode-feed", daemon=True)
        self._thread.start()

    async def on_stop(self) -> None:
        self._halt.set()
        if self._thread is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._thread.join, 90)

    def _next_batch(self, consumer: Consumer) -> list[Message]:
        first = consumer.poll(FEED_WAIT_S)
        if first is None:
            return []
        polled = [first, *consumer.consume(FEED_BATCH - 1, 0)]
        batch = []
        for msg in polled:
            err = msg.error()
            if err is None:
                batch.append(msg)
            elif err.code() != KafkaError._PARTITION_EOF:
                log.warning("event=consume_error group=%s error=%s", self._config["group.id"], err)
        return batch

    def _wait(self, batch: RawBatch) -> None:
        """Until the agent is done with the batch; on shutdown, give up after ``FEED_STOP_GRACE_S`` (the
        batch stays uncommitted and is read again) rather than hold the worker's exit."""
        halted_at: float | None = None
        while True:
            try:
                batch.done.result(timeout=0.5)
                return
            except concurrent.futures.TimeoutError:
                if self._halt.is_set():
                    halted_at = halted_at or time.monotonic()
                    if time.monotonic() - halted_at > FEED_STOP_GRACE_S:
                        raise TimeoutError("worker stopping; batch left uncommitted") from None

    def _run(self, loop: asyncio.AbstractEventLoop) -> None:
        consumer = Consumer(self._config)
        consumer.subscribe(self._topics)
        log.info("event=decode_feed_started group=%s topics=%s", self._config["group.id"], len(self._topics))
        try:
            while not self._halt.is_set():
                messages = self._next_batch(consumer)
                if not messages:
                    continue
                batch = RawBatch(messages)
                asyncio.run_coroutine_threadsafe(self._deliver(batch), loop).result()
                try:
                    self._wait(batch)
                except BaseException as exc:
                    if self._halt.is_set():
                        log.info("event=stopped_uncommitted batch=%d reason=%r", len(messages), str(exc))
                        return
                    first = messages[0]
                    log.critical(
                        "event=decode_failed topic=%s partition=%s offset=%s batch=%d error=%r; "
                        "stopping the worker without committing the batch",
                        first.topic(), first.partition(), first.offset(), len(messages), str(exc),
                    )
                    self._on_fatal()
                    return
                try:
                    consumer.commit(asynchronous=False)
                except KafkaException as exc:
                    # e.g. a rebalance took the partitions: the new owner reads the batch again and the
                    # sinks' version guards make the repeat a no-op.
                    log.warning("event=commit_failed group=%s error=%s", self._config["group.id"], exc)
        finally:
            consumer.close()


def create_app(settings: Settings, pipeline: Pipeline, decode_group: str | None = None) -> faust.App:
    """The worker's Faust app: the decode agent, fed by ``RawFeed`` from the raw topics in group
    ``decode_group`` (default: the pipeline's). The Faust app id is another name, so Faust's own consumer
    never joins that group."""
    decode_group = decode_group or pipeline.decode_group
    app = faust.App(
        worker_app_id(decode_group),
        broker=f"kafka://{settings.kafka_bootstrap}",
        key_serializer="raw",
        value_serializer="raw",
        web_port=settings.worker_web_port,
        web_host=settings.worker_web_host,
        # Faust binds every interface unless told: /metrics and the sink states stay on the configured
        # host (loopback by default), like every other local server.
        web_bind=settings.worker_web_host,
        topic_partitions=CANONICAL_PARTITIONS,
        topic_replication_factor=1,
        consumer_auto_offset_reset="earliest",
        broker_session_timeout=10.0,
        broker_heartbeat_interval=2.0,
    )
    raw = pipeline.raw_topics()
    postgres_entities = transformers(pipeline, "postgres")
    mongodb_entities = transformers(pipeline, "mongodb")
    canonical_names = {name: spec.canonical_topic for name, spec in pipeline.entities.items()}
    # entity → {event topic: (event name, its declaration)}: only entities that declare events have any.
    declared_events: dict[str, dict[str, Any]] = {}
    for topic, (spec, name) in pipeline.event_topics().items():
        declared_events.setdefault(spec.name, {})[topic] = (name, spec.config.events[name])
    dlq_topic = pipeline.dlq_topic
    book = schema_book(settings, pipeline, writer=True)
    if schemas.native_codec():
        log.info("event=canonical_codec codec=c")
    else:
        log.warning("event=canonical_codec codec=fastavro hint=%r", "changeflow.schemas._codec is not built "
                    "(about 3x the CPU per record): run `make bootstrap`, which compiles it with the editable install")
    unmapped_seen: set[str] = set()
    failures: list[str] = []
    # The erased rows (README "Erasure"): a replay of the raw topics never publishes one again.
    suppression = SuppressionFeed.for_pipeline(settings, pipeline)
    suppressor: Suppressor | None = None

    def on_delivery(err: Any, _msg: Any) -> None:
        if err is not None:
            failures.append(str(err))

    producer = Producer({
        "bootstrap.servers": settings.kafka_bootstrap,
        "acks": "all",
        "enable.idempotence": True,
        "linger.ms": 5,
        "compression.type": "lz4",
        "queue.buffering.max.messages": 1_000_000,
        # One delivery callback for the producer, called for failures only: a callback given with each
        # record cost an allocation per record and a Python call per delivery (100k records: 1.72 -> 1.32 us
        # of CPU each, librdkafka's threads included).
        "delivery.report.only.error": True,
        "on_delivery": on_delivery,
    })

    def produce(topic: str, key: bytes | None, value: bytes | None, headers: Any = None) -> None:
        while True:
            try:
                producer.produce(topic, key=key, value=value, headers=headers)
                return
            except BufferError:  # local queue full: let deliveries drain
                producer.poll(0.05)

    def decode_one(msg: Message, counts: Counter[tuple[str, str]]) -> None:
        topic, partition, offset = msg.topic() or "", msg.partition() or 0, msg.offset() or 0
        raw_key, raw_value = msg.key(), msg.value()
        spec = raw.get(topic)
        if spec is not None and spec.source == "mongodb":
            result = decode_mongodb(raw_value, topic=topic, partition=partition, offset=offset, raw_key=raw_key,
                                    entities=mongodb_entities)
        else:
            result = decode_postgres(raw_value, topic=topic, partition=partition, offset=offset, raw_key=raw_key,
                                     entities=postgres_entities)
        counts[(topic, outcome(result))] += 1
        if isinstance(result, Skip) and result.reason.endswith(" not mapped"):
            table = result.reason.split(" ")[1]
            metrics.count_unmapped(table)
            if table not in unmapped_seen:
                unmapped_seen.add(table)
                log.warning("event=unmapped_table table=%s topic=%s partition=%s offset=%s hint=%r", table, topic,
                            partition, offset, "add it to the pipeline's entities to capture it; counted in "
                            "/metrics as changeflow_unmapped_changes_total")
        if isinstance(result, ChangeRecord) and suppressor is not None and suppressor.judges(result.entity):
            kept = suppressor.apply(result)
            result = kept if kept is not None else Skip("an erased row (README \"Erasure\")")
        judged = result  # what the derived events are computed from: judged, with its whole before image
        if isinstance(result, ChangeRecord) and result.is_delete and result.before is not None and result.key_columns:
            # A delete travels with its key only (README "Erasure"): a compacted topic keeps the last record of a
            # key, and that must not be a deleted person's whole row.
            result = replace(result, before={k: v for k, v in result.before.items() if k in result.key_columns})
        if isinstance(result, ChangeRecord):
            try:
                encoded = to_avro(book, result)
            except (ValueError, TypeError, ArithmeticError, OverflowError, schemas.UnknownSchemaError) as exc:
                # A row that violates its entity's schema (validation) is a dead letter, not a crash.
                result = DeadLetter(raw_key, raw_value, topic, partition, offset,
                                    f"fails the {result.entity} schema: {type(exc).__name__}: {exc}")
        if isinstance(result, ChangeRecord):
            key = result.kafka_key.encode()
            produce(canonical_names[result.entity], key, encoded)
            declared = declared_events.get(result.entity)
            if declared and isinstance(judged, ChangeRecord):
                for event_topic, payload in derived_events(judged, declared):
                    produce(event_topic, key, orjson.dumps(payload), event_headers(payload, result.entity))
        elif isinstance(result, DeadLetter):
            log.warning(
                "event=dead_letter topic=%s partition=%s offset=%s reason=%r",
                result.topic, result.partition, result.offset, without_values(result.reason),
            )
            produce(dlq_topic, result.raw_key, result.raw_value, list(dead_letter_headers(result).items()))

    batches = app.channel()

    @app.agent(batches)
    async def decode(stream: Any) -> None:
        """Each batch: decode every message, produce with the C client, wait for every delivery, then tell
        the feed, which commits the batch's raw offsets only on success."""
        loop = asyncio.get_running_loop()
        tune_gc()  # the app is up: what it loaded leaves the collector's reach
        nonlocal suppressor
        async for batch in stream:
            try:
                if suppression is not None:
                    suppressor = suppression.current()
                counts: Counter[tuple[str, str]] = Counter()
                for msg in batch.messages:
                    decode_one(msg, counts)
                metrics.count_decoded(counts)
                remaining = await loop.run_in_executor(None, producer.flush, 60)
                if remaining or failures:
                    raise DeliveryFailed(f"{remaining} records undelivered; errors: {failures[:3]!r}")
            except BaseException as exc:
                batch.done.set_exception(exc)
                if not isinstance(exc, Exception):
                    raise
                continue
            batch.done.set_result(len(batch.messages))

    async def deliver(batch: RawBatch) -> None:
        await batches.send(value=batch)

    decode_failure = threading.Event()  # the worker's exit code says the decode stage failed, not "stopped"

    def decode_failed() -> None:
        decode_failure.set()
        _stop_this_process()

    @app.service
    class Feed(RawFeed):
        def __init__(self, **kwargs: Any) -> None:
            kwargs.setdefault("on_fatal", decode_failed)
            super().__init__(
                config={
                    "bootstrap.servers": settings.kafka_bootstrap,
                    "group.id": decode_group,
                    "enable.auto.commit": False,
                    "auto.offset.reset": "earliest",
                    "partition.assignment.strategy": "cooperative-sticky",
                    # A killed worker's partitions move to the survivors within seconds, not 45 s.
                    "session.timeout.ms": 10000,
                    "heartbeat.interval.ms": 2000,
                },
                topics=list(raw),
                deliver=deliver,
                **kwargs,
            )

    app.changeflow_decode_failure = decode_failure  # type: ignore[attr-defined]
    app.changeflow_settings = settings  # type: ignore[attr-defined]
    app.changeflow_pipeline = pipeline  # type: ignore[attr-defined]
    return app
