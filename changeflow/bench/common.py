"""What every benchmark stage shares: isolated names per run, bench settings, Kafka helpers, statistics."""

from __future__ import annotations

import contextlib
import math
import os
import platform
import socket
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from confluent_kafka import Consumer, Message, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from changeflow.pipelines.model import store_classes
from changeflow.pipelines.spec import Pipeline, build
from changeflow.settings import Settings
from changeflow.sinks.base import Store, create, used_by
from changeflow.waiting import WaitTimeout, wait_until

# Redis databases the benchmark writes to: the sinks address keys as `<prefix>:<id>` and keep their version
# hashes under fixed names, so a separate database is what keeps bench rows out of the live cache (and out of
# the drift report). Ids are offset per run (`Isolation.id_base`) so two concurrent runs never collide.


class BenchSettings(Settings):
    """Settings of an isolated bench worker: the live ones plus the run's id.

    Built from the live ``Settings``; the bench worker subprocess receives them as ``CHANGEFLOW_*`` environment
    variables like any worker. Every name the worker creates (topics, groups, and in each store its keys,
    indexes and tables) comes from the run's own pipeline (``Isolation.pipeline``), not from settings.
    """

    bench_run_id: str = ""


def new_run_id() -> str:
    return uuid.uuid4().hex[:8]


@dataclass(frozen=True)
class Isolation:
    """Names owned by one stage ("backlog", "snapshot") of one run; lower case so every store accepts them."""

    run_id: str
    stage: str

    @property
    def tag(self) -> str:
        return f"bench-{self.run_id}-{self.stage}"

    @property
    def namespace(self) -> str:
        """The run's pipeline name and namespace (an identifier): canonical, DLQ and schema topics, consumer
        groups, the ClickHouse database and the Redis version hashes are named by it."""
        return f"bench_{self.run_id}_{self.stage}"

    @property
    def raw_prefix(self) -> str:
        return f"{self.tag}-raw"

    @property
    def decode_group(self) -> str:
        return self.namespace

    def sink_group(self, sink: str) -> str:
        return f"{self.namespace}-sink-{sink}"

    def pipeline(self, base: Pipeline) -> Pipeline:
        """``base`` (the commerce pipeline) under this stage's names: its entities, transforms and hooks as they
        are, with another name and namespace, raw topic prefixes of its own, and in each store objects of its
        own (each store's ``isolate``: keys under the stage's tag, indexes named after it, tables in the
        stage's namespace)."""
        file = base.file
        sources = file.sources
        updates: dict[str, Any] = {}
        if sources.postgres is not None:
            names = {"connector": f"bench-{self.run_id}-snapshot", "slot": f"bench_{self.run_id}",
                     "publication": f"bench_{self.run_id}_pub"}
            updates["postgres"] = sources.postgres.model_copy(update={"topic_prefix": self.raw_prefix, **names})
        if sources.mongodb is not None:
            updates["mongodb"] = sources.mongodb.model_copy(
                update={"topic_prefix": f"{self.raw_prefix}-mongo", "connector": f"{self.tag}-mongodb"})
        entities = {}
        for name, cfg in file.entities.items():
            spec = base.entities[name]
            stores = {store: cfg.stores.get(store) for store in store_classes()}
            isolated = {store: isolate(spec, own, self.tag, self.namespace)
                        for store, own in stores.items()
                        if own is not None and (isolate := getattr(store_classes()[store], "isolate", None))}
            entities[name] = cfg.model_copy(update={"stores": cfg.stores.model_copy(update=isolated)})
        model = file.model_copy(update={
            "name": self.namespace, "namespace": self.namespace,
            "sources": sources.model_copy(update=updates), "entities": entities,
        })
        # The base's path: hooks (`transforms:product`) are found beside the commerce pipeline file.
        return build(model, base.path)

    @property
    def id_base(self) -> int:
        """First primary key of this stage: distinct per run and stage, inside 2^53 (search `long`, JSON)."""
        offset = 0 if self.stage == "backlog" else 5_000_000_000
        return (int(self.run_id, 16) % 900_000 + 1) * 10_000_000_000 + offset

    def settings(self, base: Settings) -> BenchSettings:
        data = base.model_dump()
        data.update(bench_run_id=self.run_id)
        return BenchSettings(**data)

    def env(self, settings: BenchSettings, web_port: int) -> dict[str, str]:
        """The bench worker's environment: the live one (each store's own ``CHANGEFLOW_<STORE>_*`` included) with
        the bench's settings over it."""
        env = dict(os.environ)
        for name, value in settings.model_dump().items():
            if value is None:
                continue  # unset (e.g. `pipeline`: the commerce example); "None" would be read as a value
            if hasattr(value, "get_secret_value"):
                value = value.get_secret_value()
            env[f"CHANGEFLOW_{name.upper()}"] = str(value)
        env["CHANGEFLOW_WORKER_WEB_PORT"] = str(web_port)
        env["CHANGEFLOW_BENCH_STAGE"] = self.stage
        env["PYTHONUNBUFFERED"] = "1"
        return env


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100): a value that was actually observed, as latency reports use."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return float(ordered[rank - 1])


def machine() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem_gb = None
    with contextlib.suppress(OSError, ValueError), open("/proc/meminfo") as f:
        mem_gb = round(int(f.readline().split()[1]) / 1024 / 1024, 1)
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "hostname": platform.node(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "cpu_model": model,
        "cpus": os.cpu_count(),
        "memory_gb": mem_gb,
        "load_avg_at_start": [round(x, 2) for x in os.getloadavg()],
        "note": "the whole local stack (Kafka, Connect, OpenSearch, ClickHouse, PostgreSQL, Redis, live worker) "
        "shares these CPUs with the benchmark",
    }


# --- Kafka ------------------------------------------------------------------------------------------------------
def admin(settings: Settings) -> AdminClient:
    return AdminClient({"bootstrap.servers": settings.kafka_bootstrap})


def create_topics(settings: Settings, names: dict[str, int]) -> None:
    client = admin(settings)
    existing = set(client.list_topics(timeout=15).topics)
    missing = [NewTopic(n, num_partitions=p, replication_factor=1) for n, p in names.items() if n not in existing]
    if missing:
        for future in client.create_topics(missing, operation_timeout=15).values():
            with contextlib.suppress(Exception):
                future.result()


def delete_topics_with_prefix(settings: Settings, prefix: str) -> list[str]:
    client = admin(settings)
    names = [t for t in client.list_topics(timeout=15).topics if t.startswith(prefix) or prefix in t]
    if names:
        for future in client.delete_topics(names, operation_timeout=30).values():
            with contextlib.suppress(Exception):
                future.result()
    return names


def delete_groups_with_prefix(settings: Settings, prefix: str) -> list[str]:
    client = admin(settings)
    try:
        listing = client.list_consumer_groups(request_timeout=15).result()
        names = [g.group_id for g in listing.valid if g.group_id.startswith(prefix)]
    except Exception:
        return []
    if names:
        for future in client.delete_consumer_groups(names, request_timeout=15).values():
            with contextlib.suppress(Exception):
                future.result()
    return names


def partitions(settings: Settings, topics: Sequence[str]) -> list[TopicPartition]:
    meta = admin(settings).list_topics(timeout=15).topics
    return [TopicPartition(t, p) for t in topics if t in meta for p in meta[t].partitions]


class GroupProgress:
    """How many messages a consumer group has committed on some topics: what a sink has applied.

    An unsubscribed consumer with the group's id only fetches committed offsets (OffsetFetch); it never
    joins the group, so it cannot disturb the consumers it watches.
    """

    def __init__(self, settings: Settings, group: str, tps: list[TopicPartition]) -> None:
        self.tps = tps
        self.consumer = Consumer({"bootstrap.servers": settings.kafka_bootstrap, "group.id": group,
                                  "enable.auto.commit": False})

    def committed(self) -> int:
        try:
            offsets = self.consumer.committed(self.tps, timeout=5)
        except Exception:
            return 0
        return sum(max(tp.offset, 0) for tp in offsets)

    def close(self) -> None:
        self.consumer.close()


def high_watermarks(settings: Settings, tps: list[TopicPartition]) -> int:
    consumer = Consumer({"bootstrap.servers": settings.kafka_bootstrap, "group.id": "bench-watermarks",
                         "enable.auto.commit": False})
    try:
        return sum(consumer.get_watermark_offsets(tp, timeout=5)[1] for tp in tps)
    finally:
        consumer.close()


def message_time_span(settings: Settings, tps: list[TopicPartition]) -> tuple[float, float] | None:
    """(first, last) broker/producer timestamps in seconds over the partitions: when a stage produced its output."""
    consumer = Consumer({"bootstrap.servers": settings.kafka_bootstrap, "group.id": "bench-timestamps",
                         "enable.auto.commit": False})
    first: list[float] = []
    last: list[float] = []
    try:
        for tp in tps:
            low, high = consumer.get_watermark_offsets(tp, timeout=5)
            if high <= low:
                continue
            for offset, into in ((low, first), (high - 1, last)):
                consumer.assign([TopicPartition(tp.topic, tp.partition, offset)])
                with contextlib.suppress(WaitTimeout):  # a message gone meanwhile: the span is the others'
                    msg = wait_until(lambda: _one_message(consumer), 10, interval=0,
                                     what=f"the message at {tp.topic}:{tp.partition}:{offset}")
                    into.append(msg.timestamp()[1] / 1000)
        return (min(first), max(last)) if first and last else None
    finally:
        consumer.close()


def _one_message(consumer: Consumer) -> Message | None:
    msg = consumer.poll(0.5)
    return msg if msg is not None and msg.error() is None else None


def readable_stores(settings: Settings, pipeline: Pipeline) -> dict[str, Store]:
    """The pipeline's stores that say what a reader sees (``visible`` and ``visible_count``), by name."""
    out: dict[str, Store] = {}
    for name in used_by(pipeline):
        store = create(name, settings, pipeline)
        if callable(getattr(store, "visible", None)):
            out[name] = store
        else:
            store.close()
    return out
