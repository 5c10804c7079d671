"""Feed one sink from the canonical topics: consume a batch, write it, then commit its offsets.

Each sink is its own consumer group (``changeflow-sink-<name>``), so a slow or failing store never holds
back the others. A retriable store failure retries the same batch with capped exponential backoff and
holds the stream (nothing is committed, nothing dropped) until the store is back; a fatal one stops
the runner loudly.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer
from tenacity import Retrying, retry_if_exception_type, wait_exponential

import schemas
from changeflow import metrics
from pipelines.spec import Pipeline
from sinks.base import FatalSinkError, RetriableSinkError, Store
from streams.records import ChangeRecord

if TYPE_CHECKING:
    from changeflow.settings import Settings

log = logging.getLogger("changeflow.sinks")


def canonical_topics(pipeline: Pipeline, store: str | None = None) -> list[str]:
    """The canonical topics a store reads: those of the entities it holds (all of them without a store)."""
    specs = pipeline.stored_in(store) if store else list(pipeline.entities.values())
    return [spec.canonical_topic for spec in specs]


def record_from_message(msg: Message, book: schemas.SchemaBook) -> ChangeRecord:
    sv, data = schemas.decode(msg.value(), book.lookup)  # type: ignore[arg-type]
    present = data.get("present")
    after = data["after"]
    if present is not None and after is not None:
        after = {k: v for k, v in after.items() if k in present}
    return ChangeRecord(
        source=data["source"],
        entity=data["entity"],
        key=data["key"],
        op=data["op"],
        version=data["version"],
        ts_ms=data["ts_ms"],
        before=data["before"],
        after=after,
        origin=(msg.topic(), msg.partition(), msg.offset()),  # type: ignore[arg-type]
        partial=present is not None,
        key_columns=sv.key_columns,
        types=sv.columns,
        schema=sv,
    )


class SinkRunner:
    def __init__(self, sink: Store, settings: Settings, pipeline: Pipeline, stop: threading.Event | None = None,
                 group: str | None = None, book: schemas.SchemaBook | None = None) -> None:
        from streams.app import schema_book

        self.sink = sink
        self.pipeline = pipeline
        self.group = group or pipeline.sink_group(sink.name)
        self.settings = settings
        self.book = book or schema_book(settings, pipeline, writer=False)
        self.stop = stop or threading.Event()
        self.applied = 0
        self.last_error: str | None = None
        self.failing_since: float | None = None
        self.last_batch_at: float | None = None
        self.consumer = Consumer(
            {
                "bootstrap.servers": settings.kafka_bootstrap,
                "group.id": self.group,
                "enable.auto.commit": False,
                "auto.offset.reset": "earliest",
                "partition.assignment.strategy": "cooperative-sticky",
                # A killed worker's partitions move to the survivors within seconds, not 45 s.
                "session.timeout.ms": 10000,
                "heartbeat.interval.ms": 2000,
                "fetch.min.bytes": 1,
                "queued.max.messages.kbytes": 65536,
                "statistics.interval.ms": 5000,
                "stats_cb": lambda stats: metrics.observe_consumer_stats(sink.name, stats),
            }
        )
        self.dlq = Producer({"bootstrap.servers": settings.kafka_bootstrap, "acks": "all"})

    def _write_with_retry(self, records: Sequence[ChangeRecord]) -> None:
        def before_sleep(state: object) -> None:
            attempt = getattr(state, "attempt_number", 0)
            outcome = getattr(state, "outcome", None)
            err = outcome.exception() if outcome is not None else None
            self.last_error = str(err)
            if self.failing_since is None:
                self.failing_since = time.time()
            metrics.count_error(self.sink.name, "retry")
            log.warning(
                "sink=%s event=retry attempt=%s batch=%d error=%r", self.sink.name, attempt, len(records), str(err)
            )

        for attempt in Retrying(
            retry=retry_if_exception_type(RetriableSinkError),
            wait=wait_exponential(multiplier=0.2, max=10),
            before_sleep=before_sleep,
            reraise=True,
        ):
            if self.stop.is_set() and attempt.retry_state.attempt_number > 1:
                raise InterruptedError("stopping while the store is down; batch left uncommitted")
            with attempt:
                self.sink.write_batch(records)
        self.last_error = None
        self.failing_since = None
        self.last_batch_at = time.time()

    def state(self) -> dict[str, object]:
        """What `changeflow status` shows for this sink (served by the worker's web port)."""
        return {
            "sink": self.sink.name,
            "group": self.group,
            "healthy": self.last_error is None,
            "applied": self.applied,
            "last_error": self.last_error,
            "failing_since": self.failing_since,
            "last_batch_at": self.last_batch_at,
        }

    def _to_dlq(self, msg: Message, reason: str) -> None:
        headers = [
            ("changeflow.source_topic", msg.topic().encode()),  # type: ignore[union-attr]
            ("changeflow.partition", str(msg.partition()).encode()),
            ("changeflow.offset", str(msg.offset()).encode()),
            ("changeflow.error", reason.encode()),
        ]
        errors: list[str] = []
        self.dlq.produce(self.pipeline.dlq_topic, key=msg.key(), value=msg.value(), headers=headers,
                         on_delivery=lambda err, _m: errors.append(str(err)) if err else None)
        if self.dlq.flush(30) or errors:
            # Never commit past a record that is neither in the store nor in the dead-letter topic.
            raise RetriableSinkError(f"dead letter not delivered to {self.pipeline.dlq_topic}: {errors or 'timeout'}")

    def run(self) -> None:
        for attempt in Retrying(retry=retry_if_exception_type(RetriableSinkError), wait=wait_exponential(max=10)):
            with attempt:
                if self.stop.is_set():
                    return
                self.sink.setup(self.book.latest)
        self.consumer.subscribe(canonical_topics(self.pipeline, self.sink.name))
        log.info("sink=%s event=started group=%s", self.sink.name, self.group)
        try:
            while not self.stop.is_set():
                msgs = self.consumer.consume(self.settings.sink_batch_size, self.settings.sink_batch_timeout_s)
                if not msgs:
                    continue
                records: list[ChangeRecord] = []
                for msg in msgs:
                    err = msg.error()
                    if err is not None:
                        if err.code() != KafkaError._PARTITION_EOF:
                            log.warning("sink=%s event=consume_error error=%s", self.sink.name, err)
                            metrics.count_error(self.sink.name, "consume")
                        continue
                    if msg.value() is None:
                        continue
                    try:
                        records.append(record_from_message(msg, self.book))
                    except Exception as exc:  # any undecodable record is a dead letter, never a stopped sink
                        log.error(
                            "sink=%s event=dead_letter topic=%s partition=%s offset=%s reason=%r",
                            self.sink.name, msg.topic(), msg.partition(), msg.offset(), str(exc),
                        )
                        self._to_dlq(msg, f"undecodable canonical record: {type(exc).__name__}: {str(exc)[:300]}")
                        metrics.count_dead_letter(self.sink.name)
                metrics.observe_consumed(self.sink.name, records)
                started = time.perf_counter()
                try:
                    self._write_with_retry(records)
                except FatalSinkError:
                    metrics.count_error(self.sink.name, "fatal")
                    raise
                except InterruptedError:
                    log.info("sink=%s event=stopped_uncommitted batch=%d", self.sink.name, len(records))
                    return
                metrics.observe_written(self.sink.name, records, time.perf_counter() - started)
                try:
                    self.consumer.commit(asynchronous=False)
                except KafkaException as exc:
                    # e.g. a rebalance while the store was down: the batch is redelivered and the
                    # version guards make the second application a no-op.
                    log.warning("sink=%s event=commit_failed error=%s", self.sink.name, exc)
                    metrics.count_error(self.sink.name, "commit")
                self.applied += len(records)
                log.debug(
                    "sink=%s event=batch size=%d ms=%.1f", self.sink.name, len(records),
                    (time.perf_counter() - started) * 1000,
                )
        finally:
            self.consumer.close()
            self.sink.close()
