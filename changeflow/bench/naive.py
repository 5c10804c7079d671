"""The two alternatives a user would otherwise write, run on the same backlog topic as changeflow.

* naive: the hand-written consumer found in many services: one message at a time, decode, write it to Redis,
  commit its offset synchronously.
* ceiling: a bare confluent-kafka consume-and-decode loop (batches, the same decoder and transform as changeflow,
  no output): the most a single Python consumer can do on this machine before writing anywhere.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import redis
from confluent_kafka import Consumer

from changeflow.bench.common import BenchSettings
from changeflow.pipelines.spec import Pipeline
from changeflow.pipelines.transform import compile_pipeline
from changeflow.schemas.json import dumps
from changeflow.sinks.redis import connection_url
from changeflow.streams.debezium import decode_postgres
from changeflow.streams.records import ChangeRecord


@dataclass(frozen=True)
class LoopResult:
    changes: int
    messages: int
    seconds: float

    @property
    def per_s(self) -> float:
        return self.changes / self.seconds if self.seconds > 0 else 0.0


def _consumer(settings: BenchSettings, group: str, topic: str) -> Consumer:
    consumer = Consumer({
        "bootstrap.servers": settings.kafka_bootstrap, "group.id": group, "enable.auto.commit": False,
        "auto.offset.reset": "earliest",
    })
    consumer.subscribe([topic])
    return consumer


def ceiling(settings: BenchSettings, pipeline: Pipeline, topic: str, group: str, messages: int,
            timeout: float = 300.0) -> LoopResult:
    """Consume ``messages`` in batches and decode each; timed from the first message received."""
    entities = compile_pipeline(pipeline, "postgres")
    consumer = _consumer(settings, group, topic)
    seen = changes = 0
    started: float | None = None
    deadline = time.monotonic() + timeout
    try:
        # A loop, not wait_until: this is the measured consumer, decoding each batch as it arrives.
        while seen < messages and time.monotonic() < deadline:
            batch = consumer.consume(5000, 1.0)
            if started is None and batch:
                started = time.perf_counter()
            for msg in batch:
                if msg.error() is not None:
                    continue
                seen += 1
                result = decode_postgres(msg.value(), topic=msg.topic() or "", partition=msg.partition() or 0,
                                         offset=msg.offset() or 0, raw_key=msg.key(), entities=entities)
                if isinstance(result, ChangeRecord):
                    changes += 1
        elapsed = time.perf_counter() - started if started is not None else 0.0
    finally:
        consumer.close()
    return LoopResult(changes, seen, elapsed)


def naive(settings: BenchSettings, pipeline: Pipeline, topic: str, group: str, key_prefix: str, budget_s: float,
          max_messages: int) -> tuple[LoopResult, list[str]]:
    """One message at a time until ``budget_s`` has passed (timed from the first message) or the topic is drained.

    Returns the result and the Redis keys it wrote, for clean-up.
    """
    entities = compile_pipeline(pipeline, "postgres")
    consumer = _consumer(settings, group, topic)
    client = redis.Redis.from_url(connection_url(settings))
    keys: set[str] = set()
    seen = changes = 0
    started: float | None = None
    last = 0.0
    first_by = time.monotonic() + 60
    try:
        # A loop, not wait_until: this is the measured hand-written consumer, one message at a time.
        while seen < max_messages:
            msg = consumer.poll(1.0)
            now = time.perf_counter()
            if msg is None:
                if started is None and time.monotonic() < first_by:
                    continue
                break
            if started is None:
                started = now
            elif now - started > budget_s:
                break
            if msg.error() is not None:
                continue
            seen += 1
            result = decode_postgres(msg.value(), topic=msg.topic() or "", partition=msg.partition() or 0,
                                     offset=msg.offset() or 0, raw_key=msg.key(), entities=entities)
            if isinstance(result, ChangeRecord):
                key = f"{key_prefix}{result.entity}:{result.key}"  # the hand-written consumer's own key scheme
                if result.after is None:
                    client.delete(key)
                else:
                    client.set(key, dumps(result.after))
                keys.add(key)
                changes += 1
            consumer.commit(message=msg, asynchronous=False)
            last = time.perf_counter()
        elapsed = last - started if started is not None else 0.0
    finally:
        consumer.close()
        client.close()
    return LoopResult(changes, seen, elapsed), sorted(keys)


def forget_keys(settings: BenchSettings, prefix: str) -> int:
    """Delete the keys a naive consumer wrote under ``prefix`` (``bench-<run>-``); how many."""
    client = redis.Redis.from_url(connection_url(settings))
    pattern = "".join("\\" + ch if ch in "*?[]\\" else ch for ch in prefix) + "*"
    removed = 0
    try:
        batch: list[bytes] = []
        for key in client.scan_iter(match=pattern, count=5000):
            batch.append(key)
            if len(batch) >= 5000:
                removed += client.delete(*batch)
                batch = []
        if batch:
            removed += client.delete(*batch)
    finally:
        client.close()
    return removed
