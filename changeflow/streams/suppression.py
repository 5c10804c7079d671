"""The suppression list as the stream reads it: the pipeline's compacted suppression topic, tailed into a
``streams.erasure.Suppressor`` (README "Erasure").

The topic is keyed by mark and compacted, so it holds every erased row for good, in HMACs only. A process
that writes records (a sink, the view stage, the decode stage) reads it to the end before it starts and
again at most every ``REFRESH_S`` before a batch: ``changeflow erase`` publishes its entries, then waits
longer than that before it removes anything, so no batch written after the removal misses them.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import orjson
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, TopicPartition
from confluent_kafka.admin import (
    AdminClient,
    AlterConfigOpType,
    ConfigEntry,
    ConfigResource,
    NewTopic,
    ResourceType,
)

from changeflow.deploy.secrets import erasure_key
from changeflow.pipelines.erasure import subjects
from changeflow.streams.erasure import Entry, Suppressor

if TYPE_CHECKING:
    from changeflow.pipelines.spec import Pipeline
    from changeflow.settings import Settings

log = logging.getLogger("changeflow.erasure")

# How stale a process's list may be before a batch (changeflow erase waits SETTLE_S before removing rows).
REFRESH_S = 0.5
SETTLE_S = 3 * REFRESH_S + 1.0
# The suppression topic's configuration: compacted (an entry is kept for good), one partition (one order).
TOPIC_CONFIG = {"cleanup.policy": "compact"}


def ensure_topic(settings: Settings, pipeline: Pipeline) -> None:
    """The suppression topic exists and is compacted: created so, or an existing one (made by the broker's
    automatic creation, with its delete retention) switched to compaction, which keeps every entry for good."""
    admin = AdminClient({"bootstrap.servers": settings.kafka_bootstrap})
    topic = pipeline.suppression_topic
    if topic not in admin.list_topics(timeout=15).topics:
        for future in admin.create_topics([NewTopic(topic, num_partitions=1, replication_factor=1,
                                                    config=TOPIC_CONFIG)], operation_timeout=15).values():
            try:
                future.result()
            except Exception as exc:  # a concurrent creator: checked below like any existing topic
                if "TOPIC_ALREADY_EXISTS" not in str(exc):
                    raise
    resource = ConfigResource(ResourceType.TOPIC, topic)
    config = next(iter(admin.describe_configs([resource]).values())).result(timeout=15)
    policy = config.get("cleanup.policy")
    if policy is None or policy.value != "compact":
        alter = ConfigResource(ResourceType.TOPIC, topic, incremental_configs=[
            ConfigEntry(k, v, incremental_operation=AlterConfigOpType.SET) for k, v in TOPIC_CONFIG.items()])
        for future in admin.incremental_alter_configs([alter]).values():
            future.result(timeout=15)
        log.warning("event=suppression_topic_compacted topic=%s was=%s", topic, policy.value if policy else None)


class SuppressionFeed:
    """One process's view of the suppression topic. ``current()`` is the suppressor to judge a batch with."""

    def __init__(self, settings: Settings, pipeline: Pipeline, *, refresh_s: float = REFRESH_S) -> None:
        self.topic = pipeline.suppression_topic
        self.refresh_s = refresh_s
        self.suppressor = Suppressor(subjects(pipeline).values(), erasure_key(settings))
        self._read_at = 0.0
        self._consumer = Consumer({
            "bootstrap.servers": settings.kafka_bootstrap,
            "group.id": f"{pipeline.namespace}-suppression-reader",  # never committed: every process reads all
            "enable.auto.commit": False,
            "enable.partition.eof": True,
        })
        self._partitions: list[TopicPartition] | None = None

    @classmethod
    def for_pipeline(cls, settings: Settings, pipeline: Pipeline) -> SuppressionFeed | None:
        """None for a pipeline that declares no erasure subject (nothing can be suppressed)."""
        return cls(settings, pipeline) if subjects(pipeline) else None

    def _assign(self) -> bool:
        if self._partitions is not None:
            return True
        meta = self._consumer.list_topics(self.topic, timeout=10).topics.get(self.topic)
        if meta is None or meta.error is not None or not meta.partitions:
            return False  # no erasure yet: nothing to read (the worker creates the topic)
        self._partitions = [TopicPartition(self.topic, p, OFFSET_BEGINNING) for p in meta.partitions]
        self._consumer.assign(self._partitions)
        return True

    def refresh(self, *, force: bool = False) -> None:
        """Read the topic to its end (its high watermark now). A read that cannot reach Kafka raises: a batch is
        never judged against a list that may be missing entries."""
        now = time.monotonic()
        if not force and now - self._read_at < self.refresh_s:
            return
        if not self._assign():
            self._read_at = now
            return
        assert self._partitions is not None
        ends = {}
        for tp in self._partitions:
            _low, high = self._consumer.get_watermark_offsets(tp, timeout=10, cached=False)
            ends[tp.partition] = high
        positions = {tp.partition: tp.offset for tp in self._consumer.position(self._partitions)}
        pending = {p for p, end in ends.items() if max(positions.get(p, 0), 0) < end}
        deadline = time.monotonic() + 30
        # A loop, not wait_until: each message read is applied here, and the wait ends at the topic's end.
        while pending:
            if time.monotonic() > deadline:
                raise TimeoutError(f"the suppression topic {self.topic} could not be read to its end in 30 s")
            msg = self._consumer.poll(1.0)
            if msg is None:
                continue
            err = msg.error()
            if err is not None:
                if err.code() == KafkaError._PARTITION_EOF:
                    pending.discard(msg.partition())
                    continue
                raise RuntimeError(f"reading the suppression topic {self.topic}: {err}")
            partition, offset = msg.partition() or 0, msg.offset() or 0
            if offset + 1 >= ends.get(partition, 0):
                pending.discard(partition)
            value = msg.value()
            if value is None:
                continue
            try:
                self.suppressor.add([Entry.from_json(orjson.loads(value))])
            except (ValueError, KeyError, TypeError, orjson.JSONDecodeError):
                log.error("event=bad_suppression_entry topic=%s offset=%s", self.topic, msg.offset())
        self._read_at = time.monotonic()

    def current(self) -> Suppressor:
        self.refresh()
        return self.suppressor

    def close(self) -> None:
        self._consumer.close()
