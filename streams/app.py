"""The Faust app: the thin I/O edge around the pure decoders.

The ``decode`` agent reads Debezium's raw topics, turns each message into a canonical record (Avro,
single-object encoding) on ``changeflow.<entity>`` keyed ``entity:key`` (so one row's changes stay in
order in one partition), or into a dead letter on ``changeflow.dlq`` with the original bytes and the
reason; the stream goes on either way. The agent works in batches (Faust's ``take_events``), produces
with the C client and waits for every delivery before Faust may ack and commit the batch's raw offsets:
at least once, at a fraction of the per-message cost of ``topic.send``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections import Counter
from typing import TYPE_CHECKING, Any

import faust
import orjson
from confluent_kafka import Producer
from faust.transport.drivers import aiokafka as faust_aiokafka

import schemas
from changeflow import metrics
from streams.debezium import decode_postgres
from streams.derived import price_changed
from streams.entities import ENTITIES, MONGODB_ENTITIES, POSTGRES_ENTITIES
from streams.mongodb import decode_mongodb
from streams.records import ChangeRecord, DeadLetter

if TYPE_CHECKING:
    from changeflow.settings import Settings

log = logging.getLogger("changeflow.streams")

CANONICAL_PARTITIONS = 3
# aiokafka sends a fetch only for partitions with nothing buffered, and Faust fixes the broker's wait for
# data at 1500 ms: a fetch that covers only idle partitions (quiet tables) then holds back the next fetch
# of the busy ones for up to 1.5 s. Measured: decode stalled ~1.1 s every few batches, capping a backlog at
# ~900 changes/s. A short wait costs a few empty fetches a second on an idle pipeline.
FETCH_MAX_WAIT_MS = 20


class _PromptFetchConsumerThread(faust_aiokafka.AIOKafkaConsumerThread):
    def _create_worker_consumer(self, transport: Any) -> Any:
        consumer = super()._create_worker_consumer(transport)
        consumer._fetch_max_wait_ms = FETCH_MAX_WAIT_MS
        return consumer


class _PromptFetchConsumer(faust_aiokafka.Consumer):
    def _new_consumer_thread(self) -> faust_aiokafka.AIOKafkaConsumerThread:
        return _PromptFetchConsumerThread(self, loop=self.loop, beacon=self.beacon)


class _PromptFetchTransport(faust_aiokafka.Transport):
    Consumer = _PromptFetchConsumer


class ChangeflowApp(faust.App):
    """Faust's app on the aiokafka transport, with prompt fetches (see ``FETCH_MAX_WAIT_MS``)."""

    def _new_transport(self) -> Any:
        return _PromptFetchTransport(self.conf.broker_consumer, self)


def raw_topics(settings: Settings) -> dict[str, str]:
    """Debezium's raw topic → the source flavour whose envelope it carries."""
    topics = {f"{settings.topic_prefix}.public.{table}": "postgres" for table in POSTGRES_ENTITIES}
    topics.update({f"{settings.mongodb_topic_prefix}.users.{c}": "mongodb" for c in MONGODB_ENTITIES})
    return topics


def raw_topic_names(settings: Settings) -> list[str]:
    return list(raw_topics(settings))


def price_changed_topic_name(settings: Settings) -> str:
    return f"{settings.canonical_topic_prefix}.products.price_changed"


def canonical_topic_name(settings: Settings, entity: str) -> str:
    return f"{settings.canonical_topic_prefix}.{entity}"


def to_avro(record: ChangeRecord) -> bytes:
    return schemas.encode(
        record.entity,
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
        },
    )


def dead_letter_headers(letter: DeadLetter) -> dict[str, bytes]:
    return {
        "changeflow.source_topic": letter.topic.encode(),
        "changeflow.partition": str(letter.partition).encode(),
        "changeflow.offset": str(letter.offset).encode(),
        "changeflow.error": letter.reason.encode(),
    }


def create_app(settings: Settings) -> faust.App:
    app = ChangeflowApp(
        "changeflow",
        broker=f"kafka://{settings.kafka_bootstrap}",
        key_serializer="raw",
        value_serializer="raw",
        web_port=settings.worker_web_port,
        web_host=settings.worker_web_host,
        topic_partitions=CANONICAL_PARTITIONS,
        topic_replication_factor=1,
        producer_acks=-1,
        broker_commit_every=1000,
        broker_commit_interval=1.0,
        stream_buffer_maxsize=8192,
        consumer_auto_offset_reset="earliest",
        broker_session_timeout=10.0,
        broker_heartbeat_interval=2.0,
    )
    raw = app.topic(
        *raw_topic_names(settings), key_type=bytes, value_type=bytes, allow_empty=True
    )
    canonical = {
        entity: app.topic(
            canonical_topic_name(settings, entity), key_type=bytes, value_type=bytes,
            partitions=CANONICAL_PARTITIONS,
        )
        for entity in ENTITIES
    }
    dlq = app.topic(settings.dlq_topic, key_type=bytes, value_type=bytes, partitions=1)
    price_events = app.topic(
        price_changed_topic_name(settings), key_type=bytes, value_type=bytes, partitions=CANONICAL_PARTITIONS
    )

    flavours = raw_topics(settings)
    canonical_names = {entity: topic.get_topic_name() for entity, topic in canonical.items()}
    price_topic = price_events.get_topic_name()
    dlq_topic = dlq.get_topic_name()
    producer = Producer({
        "bootstrap.servers": settings.kafka_bootstrap,
        "acks": "all",
        "enable.idempotence": True,
        "linger.ms": 5,
        "compression.type": "lz4",
        "queue.buffering.max.messages": 1_000_000,
    })
    failures: list[str] = []

    def on_delivery(err: Any, _msg: Any) -> None:
        if err is not None:
            failures.append(str(err))

    def produce(topic: str, key: bytes | None, value: bytes | None, headers: Any = None) -> None:
        while True:
            try:
                producer.produce(topic, key=key, value=value, headers=headers, on_delivery=on_delivery)
                return
            except BufferError:  # local queue full: let deliveries drain
                producer.poll(0.05)

    def decode_one(event: Any, counts: Counter[tuple[str, str]]) -> None:
        msg = event.message
        if flavours.get(msg.topic) == "mongodb":
            result = decode_mongodb(
                event.value, topic=msg.topic, partition=msg.partition, offset=msg.offset,
                raw_key=event.key, entities=MONGODB_ENTITIES,
            )
        else:
            result = decode_postgres(
                event.value, topic=msg.topic, partition=msg.partition, offset=msg.offset,
                raw_key=event.key, entities=POSTGRES_ENTITIES,
            )
        counts[(msg.topic, metrics.decode_outcome(result))] += 1
        if isinstance(result, ChangeRecord):
            try:
                encoded = to_avro(result)
            except (ValueError, TypeError, ArithmeticError, schemas.UnknownSchemaError) as exc:
                # A row that violates its entity's schema (validation) is a dead letter, not a crash.
                result = DeadLetter(event.key, event.value, msg.topic, msg.partition, msg.offset,
                                    f"fails the {result.entity} schema: {type(exc).__name__}: {exc}")
        if isinstance(result, ChangeRecord):
            key = result.kafka_key.encode()
            produce(canonical_names[result.entity], key, encoded)
            derived = price_changed(result)
            if derived is not None:
                produce(price_topic, key, orjson.dumps(derived))
        elif isinstance(result, DeadLetter):
            log.warning(
                "event=dead_letter topic=%s partition=%s offset=%s reason=%r",
                result.topic, result.partition, result.offset, result.reason,
            )
            produce(dlq_topic, result.raw_key, result.raw_value, list(dead_letter_headers(result).items()))

    @app.agent(raw)
    async def decode(stream: Any) -> None:
        """Batches: decode, produce with the C client, wait for every delivery, and only then let Faust
        ack (and later commit) the batch's raw offsets. A delivery that fails stops the process hard, so
        no offset past an undelivered record is ever committed."""
        loop = asyncio.get_running_loop()
        async for events in stream.take_events(5000, within=0.05):
            counts: Counter[tuple[str, str]] = Counter()
            for event in events:
                decode_one(event, counts)
            metrics.count_decoded(counts)
            remaining = await loop.run_in_executor(None, producer.flush, 60)
            if remaining or failures:
                log.critical("event=delivery_failed undelivered=%s errors=%r; stopping without commit",
                             remaining, failures[:3])
                os.kill(os.getpid(), signal.SIGKILL)

    app.changeflow_settings = settings  # type: ignore[attr-defined]
    return app
