"""`changeflow status`: is the pipeline healthy, how far behind is each part, and as of which position.

Everything is read from the real parts: connector and task state from Kafka Connect's REST API, the
replication slot from PostgreSQL (retained WAL is what a stalled pipeline costs the source), consumer lag
per sink from Kafka (committed offsets of each sink's own group against the topics' ends), each sink's
health from the worker, and each sink's applied-through position from the store itself.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import httpx
import psycopg
import redis
from confluent_kafka import Consumer, KafkaException, TopicPartition

from sinks.runner import canonical_topics, group_id
from streams.app import DECODE_GROUP, raw_topic_names

if TYPE_CHECKING:
    from changeflow.settings import Settings

SINKS = ("redis", "search", "clickhouse")


@dataclass
class SinkStatus:
    name: str
    group: str
    lag: int | None
    healthy: bool | None  # None: the worker is not reachable
    last_error: str | None = None
    applied_through: dict[str, int] = field(default_factory=dict)


@dataclass
class SlotStatus:
    name: str
    active: bool
    retained_wal_bytes: int
    confirmed_lag_bytes: int | None


@dataclass
class Status:
    connectors: list[dict[str, Any]]
    slots: list[SlotStatus]
    stream_lag: int | None
    sinks: list[SinkStatus]
    dead_letters: int | None
    worker: bool
    errors: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def healthy(self) -> bool:
        connectors_ok = bool(self.connectors) and all(
            c.get("connector", {}).get("state") == "RUNNING"
            and all(t.get("state") == "RUNNING" for t in c.get("tasks", []))
            for c in self.connectors
        )
        return connectors_ok and self.worker and all(s.healthy for s in self.sinks) and not self.errors


def group_lag(settings: Settings, group: str, topics: list[str]) -> int | None:
    """Messages in ``topics`` not yet committed by ``group`` (uncommitted partitions count from the start)."""
    consumer = Consumer({"bootstrap.servers": settings.kafka_bootstrap, "group.id": group,
                         "enable.auto.commit": False})
    try:
        metadata = consumer.list_topics(timeout=10)
        partitions = [
            TopicPartition(t, p) for t in topics if t in metadata.topics for p in metadata.topics[t].partitions
        ]
        committed = consumer.committed(partitions, timeout=10)
        lag = 0
        for tp in committed:
            low, high = consumer.get_watermark_offsets(TopicPartition(tp.topic, tp.partition), timeout=10)
            position = tp.offset if tp.offset >= 0 else low
            lag += max(0, high - position)
        return lag
    except KafkaException:
        return None
    finally:
        consumer.close()


def topic_size(settings: Settings, topic: str) -> int | None:
    consumer = Consumer({"bootstrap.servers": settings.kafka_bootstrap, "group.id": "changeflow-status"})
    try:
        metadata = consumer.list_topics(topic, timeout=10).topics.get(topic)
        if metadata is None or metadata.error is not None:
            return 0
        total = 0
        for p in metadata.partitions:
            low, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
            total += high - low
        return total
    except KafkaException:
        return None
    finally:
        consumer.close()


def slots(settings: Settings) -> list[SlotStatus]:
    with psycopg.connect(settings.pg_dsn, connect_timeout=5) as conn:
        rows = conn.execute(
            "SELECT slot_name, active, pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::bigint,"
            " pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::bigint"
            " FROM pg_replication_slots ORDER BY slot_name"
        ).fetchall()
    return [SlotStatus(r[0], bool(r[1]), int(r[2] or 0), None if r[3] is None else int(r[3])) for r in rows]


def applied_through(settings: Settings) -> dict[str, dict[str, int]]:
    """sink → entity → highest version applied, read from each store's own marker."""
    out: dict[str, dict[str, int]] = {s: {} for s in SINKS}
    try:
        client = redis.Redis.from_url(settings.redis_url, socket_timeout=3, decode_responses=True)
        out["redis"] = {str(k): int(v) for k, v in client.hgetall("changeflow:applied").items()}
    except redis.RedisError:
        pass
    try:
        response = httpx.post(f"{settings.search_url}/changeflow-applied/_search", json={"size": 100}, timeout=5)
        if response.status_code == 200:
            out["search"] = {h["_id"]: int(h["_source"]["version"]) for h in response.json()["hits"]["hits"]}
    except httpx.HTTPError:
        pass
    try:
        from sinks.clickhouse import client_for

        client = client_for(settings)
        try:
            rows = client.query(
                f"SELECT entity, max(version) FROM {settings.clickhouse_database}.applied_through GROUP BY entity"
            ).result_rows
            out["clickhouse"] = {e: int(v) for e, v in rows}
        finally:
            client.close()
    except Exception:  # the store is down: status shows no position rather than failing
        pass
    return out


def worker_sinks(settings: Settings) -> dict[str, dict[str, Any]] | None:
    try:
        response = httpx.get(f"http://127.0.0.1:{settings.worker_web_port}/changeflow/sinks/", timeout=3)
        response.raise_for_status()
        states: dict[str, dict[str, Any]] = response.json()
        return states
    except (httpx.HTTPError, ValueError):
        return None


def collect(settings: Settings) -> Status:
    from connectors.client import ConnectUnavailableError, KafkaConnectClient

    errors: list[str] = []
    connectors: list[dict[str, Any]] = []
    client = KafkaConnectClient(settings.connect_url, timeout=5)
    try:
        connectors = [s for s in (client.status(n) for n in client.list()) if s]
    except (ConnectUnavailableError, httpx.HTTPError) as exc:
        errors.append(f"kafka connect: {exc}")
    finally:
        client.close()
    try:
        slot_list = slots(settings)
    except psycopg.Error as exc:
        slot_list = []
        errors.append(f"postgres: {exc}")
    states = worker_sinks(settings)
    positions = applied_through(settings)
    canonical = canonical_topics(settings)
    sinks = []
    for name in SINKS:
        state = (states or {}).get(name)
        sinks.append(
            SinkStatus(
                name=name,
                group=group_id(name),
                lag=group_lag(settings, group_id(name), canonical),
                healthy=None if states is None else bool(state and state.get("healthy")),
                last_error=state.get("last_error") if state else None,
                applied_through=positions.get(name, {}),
            )
        )
    return Status(
        connectors=connectors,
        slots=slot_list,
        stream_lag=group_lag(settings, DECODE_GROUP, raw_topic_names(settings)),
        sinks=sinks,
        dead_letters=topic_size(settings, settings.dlq_topic),
        worker=states is not None,
        errors=errors,
    )
