"""The decode stage's feed against the real broker: raw offsets are committed only for batches the agent
delivered, so a failed delivery loses nothing (the batch is read again by the next worker)."""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from changeflow.settings import Settings
from changeflow.streams.app import RawBatch, RawFeed
from tests.integration.conftest import eventually

pytestmark = pytest.mark.integration

PARTITIONS = 3
MESSAGES = 900


@pytest.fixture
def raw_topic(live_stack: Settings) -> Iterator[tuple[str, str]]:
    """A raw topic of our own holding MESSAGES keyed messages, and a consumer group name; both removed after."""
    tag = uuid.uuid4().hex[:10]
    topic, group = f"test-feed-{tag}.public.products", f"test-feed-{tag}"
    admin = AdminClient({"bootstrap.servers": live_stack.kafka_bootstrap})
    admin.create_topics([NewTopic(topic, num_partitions=PARTITIONS, replication_factor=1)])[topic].result(30)
    producer = Producer({"bootstrap.servers": live_stack.kafka_bootstrap})
    for i in range(MESSAGES):
        producer.produce(topic, key=f"products:{i % 50}".encode(), value=f"change {i}".encode())
    assert producer.flush(30) == 0
    try:
        yield topic, group
    finally:
        admin.delete_topics([topic])[topic].result(30)
        admin.delete_consumer_groups([group])[group].result(30)


def committed(settings: Settings, topic: str, group: str) -> int:
    consumer = Consumer({"bootstrap.servers": settings.kafka_bootstrap, "group.id": group})
    try:
        tps = consumer.committed([TopicPartition(topic, p) for p in range(PARTITIONS)], timeout=10)
        return sum(max(tp.offset, 0) for tp in tps)
    finally:
        consumer.close()


def run_feed(settings: Settings, topic: str, group: str, agent: Callable[[RawBatch], None],
             until: Callable[[], bool]) -> list[str]:
    """Run the feed with ``agent`` standing in for the decode agent until ``until()``; returns fatal calls."""
    loop = asyncio.new_event_loop()
    looper = threading.Thread(target=loop.run_forever, daemon=True)
    looper.start()
    fatal: list[str] = []

    async def deliver(batch: RawBatch) -> None:
        agent(batch)

    feed = RawFeed(
        config={"bootstrap.servers": settings.kafka_bootstrap, "group.id": group, "enable.auto.commit": False,
                "auto.offset.reset": "earliest"},
        topics=[topic], deliver=deliver, on_fatal=lambda: fatal.append("stop"), loop=loop,
    )
    runner = threading.Thread(target=feed._run, args=(loop,), daemon=True)
    runner.start()
    try:
        eventually(until, timeout=60, what="the feed to get there")
    finally:
        feed._halt.set()
        runner.join(30)
        loop.call_soon_threadsafe(loop.stop)
        looper.join(10)
        loop.close()
    assert not runner.is_alive()
    return fatal


def test_every_delivered_batch_is_committed_and_each_message_handed_over_once(
    live_stack: Settings, raw_topic: tuple[str, str]
) -> None:
    topic, group = raw_topic
    seen: list[Any] = []

    def agent(batch: RawBatch) -> None:
        seen.extend((m.partition(), m.offset()) for m in batch.messages)
        batch.done.set_result(len(batch.messages))

    fatal = run_feed(live_stack, topic, group, agent, until=lambda: committed(live_stack, topic, group) == MESSAGES)
    assert fatal == []
    assert len(seen) == len(set(seen)) == MESSAGES


def test_a_batch_that_was_not_delivered_is_never_committed_and_stops_the_worker(
    live_stack: Settings, raw_topic: tuple[str, str]
) -> None:
    topic, group = raw_topic
    batches: list[int] = []

    def agent(batch: RawBatch) -> None:
        batches.append(len(batch.messages))
        batch.done.set_exception(RuntimeError("3 records undelivered"))

    fatal = run_feed(live_stack, topic, group, agent, until=lambda: bool(batches))
    assert fatal == ["stop"]
    assert len(batches) == 1  # nothing read past the failed batch
    assert committed(live_stack, topic, group) == 0  # the next worker reads it all again
