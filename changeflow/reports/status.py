"""`changeflow status`: is the pipeline healthy, how far behind is each part, and as of which position.

Everything is read from the real parts: connector and task state from Kafka Connect's REST API, the
replication slot from PostgreSQL (retained WAL is what a stalled pipeline costs the source), consumer lag
per sink from Kafka (committed offsets of each sink's own group against the topics' ends), each sink's
health from the worker, and each sink's applied-through position from the store itself.

When the worker is down, or runs without a sink, the sink's last fatal stop (kept by the worker in
``<state_dir>/fatal/<pipeline>.json``) says why, until its group commits past the batch it stopped on; a sink
that stopped more than once on the same batch is crash-looping.

Changes lost for good are said loudly (an error line starting ``CHANGES LOST``, and exit 1): a replication
slot that PostgreSQL invalidated (``wal_status = 'lost'``: it removed WAL the slot still needed, past
``max_slot_wal_keep_size``), and a sink whose committed offset lies before its topic's earliest retained
offset (retention deleted changes it never applied; ``sinks reset --to-earliest`` would skip them in
silence). A slot about to be invalidated (``unreserved``) is an error too.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import httpx
import psycopg
from confluent_kafka import Consumer, KafkaException, TopicPartition

from changeflow.connectors.client import ConnectUnavailableError, KafkaConnectClient
from changeflow.pipelines.catalog import read_dsn
from changeflow.pipelines.check import uncaptured
from changeflow.pipelines.spec import Pipeline
from changeflow.sinks.base import create, used_by
from changeflow.sinks.offsets import group_lag, topic_partitions
from changeflow.sinks.process import FatalStop, committed_offsets, read_fatal
from changeflow.sinks.runner import canonical_topics
from changeflow.streams.dlq import read_quarantined_counts

if TYPE_CHECKING:
    from changeflow.settings import Settings


@dataclass
class SinkStatus:
    name: str
    group: str
    lag: int | None
    healthy: bool | None  # None: the worker is not reachable
    last_error: str | None = None
    applied_through: dict[str, int] = field(default_factory=dict)
    running: bool = True  # False: the worker answering runs without this sink (`worker --sinks`)
    stopped: dict[str, Any] | None = None  # its fatal stop (FatalStop.as_dict), while it has not moved past it
    crash_loop: bool = False
    # "topic:partition" -> changes deleted by retention before this sink committed past them.
    lost: dict[str, int] = field(default_factory=dict)
    # entity -> records this store refused and still holds in quarantine (README "Quarantine").
    quarantined: dict[str, int] = field(default_factory=dict)


@dataclass
class SlotStatus:
    name: str
    active: bool
    retained_wal_bytes: int
    confirmed_lag_bytes: int | None
    # PostgreSQL's pg_replication_slots.wal_status: reserved, extended, unreserved (about to be lost), lost.
    wal_status: str | None = None


@dataclass(frozen=True)
class RetentionGap:
    """A partition where a group's committed offset lies before the earliest offset the topic still keeps."""

    topic: str
    partition: int
    committed: int
    earliest: int

    @property
    def lost(self) -> int:
        return self.earliest - self.committed


@dataclass
class Status:
    connectors: list[dict[str, Any]]
    slots: list[SlotStatus]
    stream_lag: int | None
    sinks: list[SinkStatus]
    dead_letters: int | None
    worker: bool
    errors: list[str] = field(default_factory=list)
    # Tables of the captured schemas that no entity maps (pipelines.check.uncaptured): not read at all.
    not_captured: list[str] = field(default_factory=list)

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


def slots(settings: Settings, pipeline: Pipeline) -> list[SlotStatus]:
    """The pipeline's replication slot (none for a pipeline without a PostgreSQL source)."""
    if pipeline.file.sources.postgres is None:
        return []
    with psycopg.connect(settings.pg_dsn, connect_timeout=5) as conn:
        rows = conn.execute(
            "SELECT slot_name, active, pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::bigint,"
            " pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::bigint, wal_status"
            " FROM pg_replication_slots WHERE slot_name = %s ORDER BY slot_name", (pipeline.slot,)
        ).fetchall()
    return [SlotStatus(r[0], bool(r[1]), int(r[2] or 0), None if r[3] is None else int(r[3]), r[4]) for r in rows]


def slot_warning(slot: SlotStatus, pipeline: Pipeline) -> str | None:
    """The loud line for a slot that lost (or is about to lose) WAL it needs; None when it is fine."""
    if slot.wal_status == "lost":
        return (f"CHANGES LOST: replication slot {slot.name} was invalidated by PostgreSQL (wal_status=lost): "
                "it removed WAL the slot still needed (max_slot_wal_keep_size), so changes made while the "
                f"connector was behind never reached Kafka. Drop the slot and re-snapshot (recreate connector "
                f"{pipeline.connector_name('postgres')} with a new slot), then `changeflow reconcile --repair`")
    if slot.wal_status == "unreserved":
        return (f"replication slot {slot.name} is about to be invalidated (wal_status=unreserved): it holds more "
                "WAL than max_slot_wal_keep_size; start the connector (`changeflow connectors status`) before "
                "PostgreSQL removes it and changes are lost")
    return None


def retention_gaps(settings: Settings, group: str, topics: list[str]) -> list[RetentionGap]:
    """Partitions of ``topics`` where ``group`` committed an offset below the earliest one still retained:
    the records between were deleted (retention, delete-records) before the group consumed them."""
    consumer = Consumer({"bootstrap.servers": settings.kafka_bootstrap, "group.id": group,
                         "enable.auto.commit": False})
    try:
        partitions = topic_partitions(consumer, topics)
        if not partitions:
            return []
        gaps = []
        for tp in consumer.committed(partitions, timeout=10):
            if tp.offset < 0:  # nothing committed: the group has not started on this partition
                continue
            low, _high = consumer.get_watermark_offsets(TopicPartition(tp.topic, tp.partition), timeout=10)
            if tp.offset < low:
                gaps.append(RetentionGap(tp.topic, tp.partition, tp.offset, low))
        return gaps
    finally:
        consumer.close()


def decode_retention_warning(group: str, gaps: list[RetentionGap]) -> str:
    where = ", ".join(f"{g.topic}[{g.partition}] committed {g.committed} < earliest {g.earliest}" for g in gaps)
    total = sum(g.lost for g in gaps)
    return (f"CHANGES LOST: the decode stage (group {group}) is behind the raw topics' retention: {total} "
            f"change(s) were deleted before it decoded them ({where}). No store has them: run `changeflow "
            "reconcile --repair`, or rebuild each store from the source (`changeflow rebuild <store>`)")


def retention_warning(sink: str, group: str, gaps: list[RetentionGap]) -> str:
    where = ", ".join(f"{g.topic}[{g.partition}] committed {g.committed} < earliest {g.earliest}" for g in gaps)
    total = sum(g.lost for g in gaps)
    return (f"CHANGES LOST: sink {sink} (group {group}) is behind its topics' retention: {total} change(s) were "
            f"deleted before it applied them ({where}). The store misses them; `sinks reset --to-earliest` would "
            f"skip them in silence: rebuild the store from the source (`changeflow rebuild {sink}`) or run "
            "`changeflow reconcile --repair`")


def applied_through(settings: Settings, pipeline: Pipeline) -> tuple[dict[str, dict[str, int]], list[str]]:
    """store → entity → highest version applied, read from each store's own marker; and what failed."""
    out: dict[str, dict[str, int]] = {}
    errors: list[str] = []
    for name in used_by(pipeline):
        out[name] = {}
        try:
            store = create(name, settings, pipeline)
            try:
                out[name] = store.applied_through()
            finally:
                store.close()
        except Exception as exc:  # the store is down: status shows no position rather than failing
            errors.append(f"{name} applied-through: {type(exc).__name__}: {exc}")
    return out, errors


def connector_names(pipeline: Pipeline) -> set[str]:
    return {pipeline.connector_name(source) for source in ("postgres", "mongodb")
            if getattr(pipeline.file.sources, source, None) is not None}


def worker_sinks(settings: Settings) -> dict[str, dict[str, Any]] | None:
    try:
        response = httpx.get(f"http://127.0.0.1:{settings.worker_web_port}/changeflow/sinks/", timeout=3)
        response.raise_for_status()
        states: dict[str, dict[str, Any]] = response.json()
        return states
    except (httpx.HTTPError, ValueError):
        return None


def runs_pipeline(states: dict[str, dict[str, Any]], pipeline: Pipeline) -> bool:
    """Whether the worker that answered runs ``pipeline``: its sinks' groups are this pipeline's. Another
    pipeline's worker on the same port must never show its healthy sinks as this one's."""
    return not states or any(isinstance(st, dict) and st.get("group") == pipeline.sink_group(name)
                             for name, st in states.items())


def fatal_stops(settings: Settings, pipeline: Pipeline) -> dict[str, FatalStop]:
    """store → its last fatal stop, where its group has not moved past the batch since."""
    out: dict[str, FatalStop] = {}
    for name, stop in read_fatal(settings.state, pipeline).items():
        try:
            committed = committed_offsets(settings, stop.group, canonical_topics(pipeline, name))
        except KafkaException:
            committed = dict(stop.committed)  # cannot tell: as it was
        if not stop.resolved(committed):
            out[name] = stop
    return out


def describe_stop(stop: FatalStop) -> str:
    when = datetime.fromtimestamp(stop.at, UTC).isoformat(timespec="seconds")
    if stop.crash_loop:
        return (f"sink {stop.store} is crash-looping: stopped the worker {stop.stops} times on the same batch "
                f"({stop.position}), last at {when}: {stop.error}. Restarting alone will not help: fix the cause "
                "it names, then start the worker again (README: Operating it, Crash loops)")
    return (f"sink {stop.store} stopped the worker (exit {stop.exit_code}) at {when} on {stop.position}: "
            f"{stop.error}")


def not_captured(settings: Settings, pipeline: Pipeline) -> list[str]:
    """Tables of the pipeline's PostgreSQL schemas that no entity captures (one created after ``init``)."""

    pg = pipeline.file.sources.postgres
    if pg is None:
        return []
    schemas = [*pg.schemas, *(e.source_schema for e in pipeline.entities.values() if e.source == "postgres")]
    return [t.qualified for t in uncaptured(pipeline, read_dsn(pipeline.source_dsn(settings), schemas))]


def collect(settings: Settings, pipeline: Pipeline) -> Status:
    errors: list[str] = []
    connectors: list[dict[str, Any]] = []
    client = KafkaConnectClient(settings.connect_url, timeout=5)
    try:
        ours = connector_names(pipeline)
        connectors = [s for s in (client.status(n) for n in client.list() if n in ours) if s]
    except (ConnectUnavailableError, httpx.HTTPError) as exc:
        errors.append(f"kafka connect: {exc}")
    finally:
        client.close()
    try:
        slot_list = slots(settings, pipeline)
    except psycopg.Error as exc:
        slot_list = []
        errors.append(f"postgres: {exc}")
    try:
        left = not_captured(settings, pipeline)
    except psycopg.Error as exc:
        left = []
        errors.append(f"postgres: the catalog of the captured schemas: {exc}")
    for slot in slot_list:
        warning = slot_warning(slot, pipeline)
        if warning:
            errors.append(warning)
    states = worker_sinks(settings)
    if states is not None and not runs_pipeline(states, pipeline):
        states = None
        errors.append(f"the worker on port {settings.worker_web_port} runs another pipeline; set "
                      "CHANGEFLOW_WORKER_WEB_PORT to the port of pipeline " + pipeline.name + "'s worker")
    # Unreachable stores show as no position (and as failing sinks once the worker says so).
    positions, _unreachable = applied_through(settings, pipeline)
    stops = fatal_stops(settings, pipeline)
    try:

        held = read_quarantined_counts(settings, pipeline)
    except Exception as exc:  # the DLQ unreadable: said, and the rest of the status still shown
        held = {}
        errors.append(f"kafka: quarantine counts from {pipeline.dlq_topic}: {exc}")
    sinks = []
    for name in used_by(pipeline):
        state = (states or {}).get(name)
        group = pipeline.sink_group(name)
        # A stop is news while nothing runs the sink now; a running sink shows its own state.
        stop = stops.get(name) if state is None else None
        if stop is not None:
            errors.append(describe_stop(stop))
        try:
            gaps = retention_gaps(settings, group, canonical_topics(pipeline, name))
        except KafkaException as exc:
            gaps = []
            errors.append(f"kafka: retention check of {group}: {exc}")
        if gaps:
            errors.append(retention_warning(name, group, gaps))
        sinks.append(
            SinkStatus(
                name=name,
                group=group,
                lag=group_lag(settings, group, canonical_topics(pipeline, name)),
                healthy=None if states is None else bool(state and state.get("healthy")),
                last_error=state.get("last_error") if state else (stop.error if stop else None),
                applied_through=positions.get(name, {}),
                running=states is None or state is not None,
                stopped=stop.as_dict() if stop else None,
                crash_loop=bool(stop and stop.crash_loop),
                lost={f"{g.topic}:{g.partition}": g.lost for g in gaps},
                quarantined={e: n for (st, e), n in sorted(held.items()) if st == name and n},
            )
        )
    # The decode stage's own group on the raw topics: a gap there is changes Debezium wrote that no store got.
    try:
        decode_gaps = retention_gaps(settings, pipeline.decode_group, list(pipeline.raw_topics()))
    except KafkaException as exc:
        decode_gaps = []
        errors.append(f"kafka: retention check of {pipeline.decode_group}: {exc}")
    if decode_gaps:
        errors.append(decode_retention_warning(pipeline.decode_group, decode_gaps))
    return Status(
        connectors=connectors,
        slots=slot_list,
        stream_lag=group_lag(settings, pipeline.decode_group, list(pipeline.raw_topics())),
        sinks=sinks,
        dead_letters=topic_size(settings, pipeline.dlq_topic),
        worker=states is not None,
        errors=errors,
        not_captured=left,
    )
