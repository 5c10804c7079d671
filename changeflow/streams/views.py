"""The view stage: keeps a pipeline's views (``views:``) fresh from its entities' canonical topics.

One worker at a time maintains a pipeline's views: the one whose lease consumer holds the single partition of
``<namespace>.views.lease`` (a consumer group: a worker that stops or dies hands it to another within the
session timeout). The owner reads every canonical topic its views need with its own positions, kept in the
view state (``streams.viewstate``) and committed with it, applies each record to each view
(``streams.join``), and publishes the outputs as canonical records of the view on ``<namespace>.<view>``,
where the store plugins pick them up like any entity's.

A new owner checks that the state on its disk is the last owner's (its acquisition is the last one on the
lease topic). If not (another worker owned the views in between, or there is no state), it starts from
empty and rebuilds from the canonical topics (compacted: they hold every row's latest change), and publishes
nothing until it has caught up with where the topics ended when it took over: then it publishes each view
row once, with a version newer than any published before. So no view row ever goes back to an older state,
through restarts, SIGKILLs and rebalances.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, Producer, TopicPartition

from changeflow import schemas
from changeflow.pipelines.spec import Pipeline
from changeflow.pipelines.types import ColumnType
from changeflow.pipelines.views import output_type
from changeflow.runtime import die_with_parent
from changeflow.schemas.book import schema_book
from changeflow.streams.canonical import record_from_bytes, to_avro
from changeflow.streams.join import ViewEngine, tk
from changeflow.streams.records import ChangeRecord
from changeflow.streams.suppression import SuppressionFeed
from changeflow.streams.viewstate import Prefixed, RocksState
from changeflow.waiting import wait_until

if TYPE_CHECKING:
    from changeflow.settings import Settings

log = logging.getLogger("changeflow.views")

INPUT_BATCH = 2000
# Referrers a fan-out advances per step, between input batches (a step of 1,000 takes about 0.2 s here: what
# another key waits at most); a user with 100,000 orders changing city is
# worked off in steps this size while other keys' changes keep flowing.
FANOUT_STEP = 1000
PUBLISH_CHUNK = 5000


def clock_us() -> int:
    """A view row's version: the stage's clock in microseconds (below 2^53, so every store compares it
    exactly, Redis' Lua numbers included), never less than the last version given plus one."""
    return time.time_ns() // 1000


class ViewStage:
    def __init__(self, settings: Settings, pipeline: Pipeline, stop: threading.Event,
                 state_dir: Path | None = None) -> None:
        self.settings = settings
        self.pipeline = pipeline
        self.stop = stop
        self.state_dir = state_dir or (settings.state / "worker-data"
                                       / f"views-{pipeline.namespace}-{settings.worker_web_port}")
        self.owner_id = f"{socket.gethostname()}:{self.state_dir}"
        self.engines = {name: ViewEngine(view, clock_us) for name, view in pipeline.views.items()}
        self.topics = sorted({pipeline.entities[e].canonical_topic
                              for view in pipeline.views.values() for e in view.entities})
        self.owned = False
        self.caught_up = False
        self.rebuilt = False
        self._parts: dict[int, dict[str, Prefixed]] = {}
        self.published = 0
        self.applied = 0
        # The erased rows (README "Erasure"): a rebuild from the canonical topics never brings one back.
        self.suppression = SuppressionFeed.for_pipeline(settings, pipeline)

    def _part(self, state: RocksState, name: str) -> Prefixed:
        """View ``name``'s part of the shared state, made once per state (not per record: the prefix is an
        encoded key)."""
        parts = self._parts.get(id(state))
        if parts is None:
            parts = self._parts[id(state)] = {n: Prefixed(state, tk(b"V", n)) for n in self.engines}
        return parts[name]

    # --- ownership -----------------------------------------------------------------------------------
    def _lease_consumer(self) -> Consumer:
        def assigned(_c: Any, partitions: list[TopicPartition]) -> None:
            if partitions:
                self.owned = True
                log.info("event=views_lease_acquired pipeline=%s", self.pipeline.name)

        def revoked(_c: Any, partitions: list[TopicPartition]) -> None:
            if partitions:
                self.owned = False
                log.info("event=views_lease_lost pipeline=%s", self.pipeline.name)

        consumer = Consumer({"bootstrap.servers": self.settings.kafka_bootstrap,
                             "group.id": self.pipeline.views_group, "enable.auto.commit": False,
                             "session.timeout.ms": 10000, "heartbeat.interval.ms": 2000,
                             "auto.offset.reset": "latest"})
        consumer.subscribe([self.pipeline.views_lease_topic], on_assign=assigned, on_revoke=revoked,
                           on_lost=revoked)
        return consumer

    def _last_acquisition(self) -> tuple[int, str] | None:
        """(offset, owner) of the last acquisition recorded on the lease topic."""
        reader = Consumer({"bootstrap.servers": self.settings.kafka_bootstrap, "group.id": "changeflow-views-read",
                           "enable.auto.commit": False})
        try:
            tp = TopicPartition(self.pipeline.views_lease_topic, 0)
            _low, high = reader.get_watermark_offsets(tp, timeout=10)
            if high <= 0:
                return None
            reader.assign([TopicPartition(tp.topic, 0, high - 1)])

            def last() -> tuple[int, str] | None:
                msg = reader.poll(0.5)
                if msg is not None and msg.error() is None:
                    return int(msg.offset() or 0), str(orjson.loads(msg.value() or b"{}").get("owner", ""))
                return None

            return wait_until(last, 10, what=f"the last record of {tp.topic}", interval=0,  # poll() waits
                              error=lambda _: RuntimeError(f"the lease topic {tp.topic} could not be read"))
        finally:
            reader.close()

    def _acquire(self, state: RocksState, producer: Producer) -> None:
        """Record this acquisition; start from empty unless the state on disk is the last owner's."""
        last = self._last_acquisition()
        mine = state.get(b"Sacquired")
        continuous = last is not None and mine is not None and last == (mine, self.owner_id)
        declared = sorted((name, repr(view)) for name, view in self.pipeline.views.items())
        same_views = state.get(b"Sviews") == declared
        self.rebuilt = not (continuous and same_views)
        if self.rebuilt and not state.empty():
            # A view added or changed is filled from the entities' current state (the compacted canonical
            # topics), never from a new snapshot of the sources; the others are rebuilt with it, since the
            # views share their input positions.
            reason = ("another worker maintained the views since this state was written" if not continuous
                      else "the pipeline's views changed")
            log.info("event=views_state_reset pipeline=%s reason=%r", self.pipeline.name, reason)
            state.wipe()
        state.put(b"Sviews", declared)
        offsets: list[int] = []

        def delivered(err: Any, msg: Any) -> None:
            if err is None:
                offsets.append(msg.offset())

        producer.produce(self.pipeline.views_lease_topic, key=b"lease",
                         value=orjson.dumps({"owner": self.owner_id, "at": time.time()}), on_delivery=delivered)
        if producer.flush(30) or not offsets:
            raise RuntimeError("the views lease topic could not be written")
        state.put(b"Sacquired", offsets[0])
        state.commit()

    # --- input ---------------------------------------------------------------------------------------
    def _assign(self, state: RocksState, consumer: Consumer) -> dict[tuple[str, int], int]:
        """Assign every input partition at the stored position; returns where each topic ended now."""
        meta = consumer.list_topics(timeout=15)
        assignment, targets = [], {}
        for topic in self.topics:
            for partition in sorted(meta.topics[topic].partitions):
                stored = state.get(tk(b"S", "offset", topic, str(partition)))
                assignment.append(TopicPartition(topic, partition, stored if stored is not None else OFFSET_BEGINNING))
                _low, high = consumer.get_watermark_offsets(TopicPartition(topic, partition), timeout=15)
                targets[(topic, partition)] = high
        consumer.assign(assignment)
        return targets

    def _caught_up(self, state: RocksState, targets: dict[tuple[str, int], int]) -> bool:
        return all((state.get(tk(b"S", "offset", t, str(p))) or 0) >= high for (t, p), high in targets.items())

    def _decode(self, book: schemas.SchemaBook, msg: Any) -> ChangeRecord | None:
        try:
            return record_from_bytes(msg.value(), (msg.topic(), msg.partition(), msg.offset()), book)
        except schemas.SchemaFetchError:
            raise
        except Exception as exc:  # a record no sink could read either: the sinks quarantine it
            log.warning("event=view_input_unreadable topic=%s partition=%s offset=%s error=%s", msg.topic(),
                        msg.partition(), msg.offset(), type(exc).__name__)
            return None

    # --- output --------------------------------------------------------------------------------------
    def _types(self, book: schemas.SchemaBook, engine: ViewEngine) -> tuple[dict[str, ColumnType], tuple[str, ...]]:
        view = engine.view

        def column_type(alias: str, column: str) -> ColumnType | None:
            entity = view.entity_of(alias)
            sv = book.latest.get(entity)
            found = sv.columns.get(column) if sv is not None else None
            return found or self.pipeline.entities[entity].declared_types.get(column)

        types = {f.name: output_type(view, f.name, column_type) for f in view.fields}
        if view.aggregated:
            types = {c: types[c] for c in view.group_by}
            types.update({a.name: output_type(view, a.name, column_type) for a in view.aggregates})
            return types, view.group_by
        root_sv = book.latest.get(view.root)
        keys = engine.root_key_columns or (tuple(root_sv.key_columns) if root_sv is not None else ())
        for col in keys:
            types.setdefault(col, column_type("", col) or ColumnType("string"))
        return types, tuple(keys)

    def _publish(self, state: RocksState, book: schemas.SchemaBook, producer: Producer) -> int:
        """Produce every pending output, wait for Kafka to have them, then forget them."""
        total = 0
        failures: list[str] = []

        def delivered(err: Any, _msg: Any) -> None:
            if err is not None:
                failures.append(str(err))

        for name, engine in self.engines.items():
            view_state = self._part(state, name)
            types, keys = self._types(book, engine)
            topic = self.pipeline.entities[name].canonical_topic
            while True:
                chunk = []
                for item in ViewEngine.pending(view_state):
                    chunk.append(item)
                    if len(chunk) >= PUBLISH_CHUNK:
                        break
                if not chunk:
                    break
                for _pkey, view_key, version, row, ts_ms, key_row in chunk:
                    record = ChangeRecord(source="view", entity=name, key=view_key, op="d" if row is None else "u",
                                          version=version, ts_ms=ts_ms, before=key_row if row is None else None,
                                          after=row, key_columns=keys, types=types)
                    value = to_avro(book, record)
                    while True:
                        try:
                            producer.produce(topic, key=record.kafka_key.encode(), value=value, on_delivery=delivered)
                            break
                        except BufferError:
                            producer.poll(0.05)
                if producer.flush(60) or failures:
                    raise RuntimeError(f"view outputs not delivered: {failures[:3]!r}")
                for pkey, *_ in chunk:
                    view_state.delete(pkey)
                state.commit()
                total += len(chunk)
        self.published += total
        return total

    def _retire(self, state: RocksState, book: schemas.SchemaBook) -> None:
        """After a rebuild: a view row the stores hold (the view's own topic says so) that the rebuilt state
        has not (its user moved away meanwhile, say) is deleted, as the previous owner would have."""
        reader = Consumer({"bootstrap.servers": self.settings.kafka_bootstrap, "group.id": "changeflow-views-read",
                           "enable.auto.commit": False, "enable.partition.eof": True})
        try:
            for name, engine in self.engines.items():
                view_state = self._part(state, name)
                topic = self.pipeline.entities[name].canonical_topic
                meta = reader.list_topics(topic, timeout=15).topics[topic]
                ends = {p: reader.get_watermark_offsets(TopicPartition(topic, p), timeout=15)[1]
                        for p in meta.partitions}
                reader.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p, end in ends.items() if end > 0])
                remaining = {p for p, end in ends.items() if end > 0}
                while remaining:
                    for msg in reader.consume(PUBLISH_CHUNK, 1.0):
                        error, partition, offset = msg.error(), msg.partition() or 0, msg.offset() or 0
                        if error is not None:
                            if error.code() == KafkaError._PARTITION_EOF:
                                remaining.discard(partition)
                            continue
                        if offset >= ends[partition] - 1:
                            remaining.discard(partition)
                        record = self._decode(book, msg) if msg.value() is not None else None
                        if record is None:
                            continue
                        seen = tk(b"L", record.key)
                        if record.is_delete:
                            view_state.delete(seen)
                        else:
                            view_state.put(seen, {c: record.after.get(c) for c in record.key_columns}
                                           if record.after else {})
                    state.commit()
                retired = 0
                for seen, key_row in list(view_state.scan(b"L")):
                    key = engine.view_key(seen)
                    if not engine.live(view_state, key):
                        engine.retire(view_state, key, key_row)
                        retired += 1
                    view_state.delete(seen)
                state.commit()
                log.info("event=views_retired view=%s rows=%d", name, retired)
        finally:
            reader.close()

    # --- the loop ------------------------------------------------------------------------------------
    def run(self) -> None:
        state = RocksState(self.state_dir / "state")
        book = schema_book(self.settings, self.pipeline, writer=True)
        producer = Producer({"bootstrap.servers": self.settings.kafka_bootstrap, "acks": "all",
                             "enable.idempotence": True, "linger.ms": 5, "compression.type": "lz4"})
        lease = self._lease_consumer()
        consumer = Consumer({"bootstrap.servers": self.settings.kafka_bootstrap,
                             "group.id": self.pipeline.views_input_group, "enable.auto.commit": False,
                             "enable.partition.eof": False})
        try:
            while not self.stop.is_set():
                lease.poll(0.5)
                if not self.owned:
                    continue
                self._own(state, book, producer, lease, consumer)
        finally:
            state.rollback()
            consumer.close()
            lease.close()
            state.close()

    def _own(self, state: RocksState, book: schemas.SchemaBook, producer: Producer, lease: Consumer,
             consumer: Consumer) -> None:
        self._acquire(state, producer)
        targets = self._assign(state, consumer)
        self.caught_up = self._caught_up(state, targets)
        log.info("event=views_started pipeline=%s views=%d topics=%d caught_up=%s", self.pipeline.name,
                 len(self.engines), len(self.topics), self.caught_up)
        if self.caught_up:
            self._publish(state, book, producer)  # what a killed predecessor on this disk left pending
        try:
            while not self.stop.is_set():
                lease.poll(0)
                if not self.owned:
                    state.rollback()
                    return
                messages = consumer.consume(INPUT_BATCH, 0.2)
                moved = self._apply(state, book, messages)
                busy = False
                for name, engine in self.engines.items():
                    part = self._part(state, name)
                    busy = engine.work(part, FANOUT_STEP) > 0 or busy
                    busy = engine.has_work(part) or busy
                state.commit()
                if not self.caught_up and self._caught_up(state, targets):
                    self.caught_up = True
                    log.info("event=views_caught_up pipeline=%s", self.pipeline.name)
                    if self.rebuilt:
                        self._retire(state, book)
                        self.rebuilt = False
                if self.caught_up:
                    self._publish(state, book, producer)
                if not (moved or busy):
                    continue
        finally:
            consumer.unassign()

    def _apply(self, state: RocksState, book: schemas.SchemaBook, messages: list[Any]) -> int:
        n = 0
        suppressor = self.suppression.current() if self.suppression is not None else None
        for msg in messages:
            if msg.error() is not None:
                if msg.error().code() != KafkaError._PARTITION_EOF:
                    log.warning("event=view_consume_error error=%s", msg.error())
                continue
            record = self._decode(book, msg) if msg.value() is not None else None
            if record is not None and suppressor is not None:
                record = suppressor.apply(record)
            if record is not None:
                for name, engine in self.engines.items():
                    engine.apply(self._part(state, name), record)
                    if record.is_delete and suppressor is not None and suppressor.erased(record.entity, record.key):
                        # An erased row leaves no versioned delete behind (the suppression list stops late ones).
                        self._part(state, name).delete(tk(b"R", record.entity, record.key))
                self.applied += 1
            state.put(tk(b"S", "offset", msg.topic(), str(msg.partition())), msg.offset() + 1)
            n += 1
        return n


def _process_main(settings: Settings, pipeline: Pipeline, loglevel: str, parent: int) -> None:
    die_with_parent()
    if os.getppid() != parent:
        return
    logging.basicConfig(level=loglevel.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s")
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    ViewStage(settings, pipeline, stop).run()


class ViewProcess:
    """The view stage in a process of its own (beside the decode stage and the sinks: one GIL each); when it
    dies, ``on_exit`` is told, and the worker stops loudly as for a sink."""

    def __init__(self, settings: Settings, pipeline: Pipeline, loglevel: str,
                 on_exit: Callable[[int | None], None]) -> None:
        self._proc = multiprocessing.get_context("spawn").Process(
            target=_process_main, args=(settings, pipeline, loglevel, os.getpid()), name="views", daemon=False)
        self._on_exit = on_exit
        self._stopping = threading.Event()

    def start(self) -> None:
        self._proc.start()
        log.info("event=views_process_started pid=%s", self._proc.pid)
        threading.Thread(target=self._watch, name="views-watch", daemon=True).start()

    def _watch(self) -> None:
        self._proc.join()
        if not self._stopping.is_set():
            log.critical("event=views_process_exited exit_code=%s", self._proc.exitcode)
            self._on_exit(self._proc.exitcode)

    def stop(self, timeout: float = 45.0) -> None:
        self._stopping.set()
        if self._proc.is_alive():
            self._proc.terminate()
            self._proc.join(timeout)
            if self._proc.is_alive():
                self._proc.kill()
                self._proc.join(5)
