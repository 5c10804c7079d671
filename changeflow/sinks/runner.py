"""Feed one sink from the canonical topics: consume a batch, write it, then commit its offsets.

Each sink is its own consumer group (``changeflow-sink-<name>``), so a slow or failing store never holds
back the others. A retriable store failure retries the same batch with capped exponential backoff and
holds the stream (nothing is committed, nothing dropped) until the store is back; a fatal one stops
the runner loudly.

A record the store *refuses* (``write_batch`` returns it as ``Rejected``: a mapping conflict, a value out
of range, a key's script error; or the store refuses the whole call, ``RefusedBatch``, and the runner bisects
the batch down to the refused records: :func:`write_bisecting`; see ``sinks.base``) is quarantined for this
store only: parked on the pipeline's dead-letter topic with the canonical message's exact bytes and headers
naming the store, the entity, the key, the version, the canonical topic/partition/offset and the store's own
error; the batch's other records are written and its offsets committed, and the other stores (their own
consumer groups) get the record as usual. The per-store policy ``on_reject: stop`` in the pipeline file stops
the worker on it instead. ``changeflow dlq replay --store S`` writes a quarantined record back into that store only
(:func:`replay_into_store`), under the store's version guard: it applies only if it is still the newest.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, TypeVar

import psycopg
from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer
from tenacity import Retrying, retry_if_exception_type, wait_exponential

from changeflow import metrics, schemas
from changeflow.pipelines.spec import EntitySpec, Pipeline
from changeflow.schemas.book import schema_book
from changeflow.sinks import base
from changeflow.sinks.base import FatalSinkError, RefusedBatch, Rejected, RetriableSinkError, Store, fill_partials
from changeflow.sinks.reread import send_signals
from changeflow.streams.canonical import record_from_bytes, to_avro
from changeflow.streams.records import ChangeRecord
from changeflow.streams.suppression import SuppressionFeed

# Default of Settings.sink_schema_wait_s (which says why).
SCHEMA_WAIT_S = 10.0

T = TypeVar("T")


def decode_waiting(decode: Callable[[], T], stop: threading.Event, *, wait_s: float = SCHEMA_WAIT_S,
                   sleep: Callable[[float], None] = time.sleep, clock: Callable[[], float] = time.monotonic,
                   what: str = "") -> T:
    """``decode()``, waiting while the schema it needs cannot be had yet: a schema topic that cannot be read is
    waited for as long as it takes (a store failing holds the stream, never drops it), a fingerprint not on
    the topic for up to ``wait_s``. The batch stays uncommitted meanwhile; ``InterruptedError`` on stop."""
    delay, unknown_since, said = 0.2, None, False
    while True:
        try:
            return decode()
        except schemas.SchemaFetchError as exc:
            reason = str(exc)
        except schemas.UnknownSchemaError as exc:
            if not str(exc).startswith("unknown schema fingerprint"):
                raise  # not a canonical record at all: a dead letter now
            now = clock()
            unknown_since = now if unknown_since is None else unknown_since
            if now - unknown_since >= wait_s:
                raise schemas.UnknownSchemaError(f"{exc}, still after {wait_s:.0f} s of re-reading the schema "
                                                 "topic: no version of this pipeline") from None
            reason = str(exc)
        if stop.is_set():
            raise InterruptedError(f"stopping while waiting for a schema version ({reason})")
        if not said:
            log.warning("event=schema_wait record=%s reason=%r", what, reason[:300])
            said = True
        sleep(delay)
        delay = min(delay * 2, 10.0)


# --- partial records: completed here, for every store ---------------------------------------------------
# entity, the partial records of it whose row the store does not hold → the source re-reads those rows
Reread = Callable[[EntitySpec, Sequence[ChangeRecord]], None]

NOT_REREADABLE = ("a partial change (only the fields it changed) whose row this store does not hold; its other "
                  "columns cannot be re-read from a {source} source, so it is not written as if complete; "
                  "`changeflow dlq replay --store {store}` once the row is back, or re-send the whole row")


def complete_partials(store: Store, pipeline: Pipeline, records: Sequence[ChangeRecord], reread: Reread
                      ) -> tuple[list[ChangeRecord], list[Rejected]]:
    """The records to write into ``store``, every partial one completed from an earlier record of the batch or
    from the row the store holds (``sinks.base.fill_partials``, the store's ``fetch_current``); and the
    records handed back as rejected.

    A partial record whose row the store does not hold (never seen, expired, removed) stays partial: it is
    never written as if complete, which would leave its missing columns out (or NULL). For a PostgreSQL
    entity the row is re-read from the source by the repair path (``reread``: an incremental snapshot of
    those keys), whose read travels the normal path with a newer version and lands in its place; the
    partial record itself is left out. A source that cannot be re-read (MongoDB) hands the record back as
    rejected, quarantined for this store with the reason. A failure to reach the store or the source raises
    (the batch is retried, nothing committed).
    """
    mine = [r for r in records if pipeline.entities[r.entity].stored_in(store.name)]
    if not any(r.partial for r in mine):
        return list(records), []
    filled = iter(fill_partials(mine, store.fetch_current))
    out: list[ChangeRecord] = []
    unresolved: dict[str, list[ChangeRecord]] = {}
    for r in records:
        if not pipeline.entities[r.entity].stored_in(store.name):
            out.append(r)
            continue
        done = next(filled)
        if done.partial:
            unresolved.setdefault(done.entity, []).append(done)
        else:
            out.append(done)
    rejected: list[Rejected] = []
    for entity, held_back in unresolved.items():
        spec = pipeline.entities[entity]
        if spec.source == "postgres":
            reread(spec, held_back)
            log.warning("sink=%s event=partial_reread entity=%s records=%d", store.name, entity, len(held_back))
        else:
            rejected += [Rejected(r, NOT_REREADABLE.format(source=spec.source, store=store.name)) for r in held_back]
    return out, rejected


# --- a batch the store refuses as a whole: bisected here, for every store ------------------------------------
def write_bisecting(store: Store, records: Sequence[ChangeRecord]) -> list[Rejected]:
    """``store.write_batch(records)``; when the store refuses the call as a whole because of its data
    (:class:`sinks.base.RefusedBatch`: a ClickHouse insert, a PostgreSQL transaction), split it in halves and
    write each, down to the single records refused, which come back as ``Rejected`` with the store's reason,
    in batch order, with any the store returned itself. A refusal of ``every`` record of a part is not split.

    Each record is written once when nothing is refused; a single refused record among n costs about 2·log2(n)
    more calls. A failure of the store itself (RetriableSinkError, FatalSinkError, anything else) propagates:
    the whole batch is retried or the sink stops, as for any write.
    """
    rejected: list[Rejected] = []

    def attempt(part: Sequence[ChangeRecord]) -> None:
        try:
            rejected.extend(store.write_batch(part) or [])
            return
        except RefusedBatch as refused:
            if len(part) <= 1 or refused.every:
                rejected.extend(Rejected(r, refused.reason) for r in part)
                return
        middle = len(part) // 2
        attempt(part[:middle])
        attempt(part[middle:])

    attempt(records)
    if not rejected:
        return []
    order = {id(r): i for i, r in enumerate(records)}
    rejected.sort(key=lambda rej: order.get(id(rej.record), len(order)))
    log.warning("sink=%s event=rows_refused rows=%d of=%d reason=%r", store.name, len(rejected), len(records),
                rejected[0].reason[:300])
    return rejected


def reread_from_source(settings: Settings, pipeline: Pipeline) -> Reread:
    """The repair path for partial records: one incremental snapshot signal per entity for their keys."""
    def reread(spec: EntitySpec, held_back: Sequence[ChangeRecord]) -> None:
        first = held_back[0]
        columns = first.key_columns
        image = first.after or {}
        numeric = len(columns) == 1 and isinstance(image.get(columns[0]), int) \
            and not isinstance(image.get(columns[0]), bool)
        keys = sorted({r.key for r in held_back})
        try:
            send_signals(settings, pipeline, spec, columns, keys, numeric)
        except psycopg.OperationalError as exc:
            raise RetriableSinkError(f"re-reading {len(keys)} rows of {spec.name} from the source: {exc}") from exc
        except psycopg.Error as exc:
            raise FatalSinkError(f"re-reading {len(keys)} rows of {spec.name} from the source (the signal table "
                                 f"{pipeline.signal_table}; `changeflow connectors apply` prepares it): {exc}") from exc
    return reread


# What a higher layer builds over a store once it is set up (reports.objects.ensure): called with the store.
AfterSetup = Callable[[Store, Pipeline], None]
AFTER_SETUP_RETRY_S = 30.0

if TYPE_CHECKING:
    from changeflow.settings import Settings

log = logging.getLogger("changeflow.sinks")


def canonical_topics(pipeline: Pipeline, store: str | None = None) -> list[str]:
    """The canonical topics a store reads: those of the entities it holds (all of them without a store)."""
    specs = pipeline.stored_in(store) if store else list(pipeline.entities.values())
    return [spec.canonical_topic for spec in specs]


# Headers of a quarantined record, beside the dead-letter headers every DLQ message carries
# (changeflow/streams/dlq.py: source topic, partition, offset, error).
STORE_HEADER = "changeflow.store"
ENTITY_HEADER = "changeflow.entity"
KEY_HEADER = "changeflow.key"
VERSION_HEADER = "changeflow.version"


def on_reject(pipeline: Pipeline, store: str, entity: str) -> str:
    """The entity's policy for records this store refuses: ``quarantine`` (default) or ``stop``."""
    spec = pipeline.entities.get(entity)
    cfg = getattr(spec.config.stores, store, None) if spec is not None else None
    return str(getattr(cfg, "on_reject", "quarantine"))


def quarantine_headers(store: str, rejected: Rejected) -> list[tuple[str, str | bytes | None]]:
    r = rejected.record
    assert r.origin is not None
    topic, partition, offset = r.origin
    return [
        ("changeflow.source_topic", topic.encode()),
        ("changeflow.partition", str(partition).encode()),
        ("changeflow.offset", str(offset).encode()),
        ("changeflow.error", rejected.reason[:4000].encode()),
        (STORE_HEADER, store.encode()),
        (ENTITY_HEADER, r.entity.encode()),
        (KEY_HEADER, r.key.encode()),
        (VERSION_HEADER, str(r.version).encode()),
    ]


def record_from_message(msg: Message, book: schemas.SchemaBook) -> ChangeRecord:
    return record_from_bytes(msg.value(), (msg.topic(), msg.partition(), msg.offset()), book)  # type: ignore[arg-type]


class SinkRunner:
    def __init__(self, sink: Store, settings: Settings, pipeline: Pipeline, stop: threading.Event | None = None,
                 group: str | None = None, book: schemas.SchemaBook | None = None,
                 after_setup: AfterSetup | None = None) -> None:
        self.sink = sink
        # Objects built over the store's tables by a higher layer (report views): tried once the store has set
        # up, and again after batches (at most every AFTER_SETUP_RETRY_S) while a table they read is missing.
        self._after_setup = after_setup
        self._after_setup_tried = 0.0
        self.pipeline = pipeline
        self.group = group or pipeline.sink_group(sink.name)
        self.settings = settings
        self.book = book or schema_book(settings, pipeline, writer=False)
        self.stop = stop or threading.Event()
        self.applied = 0
        self.last_error: str | None = None
        self.failing_since: float | None = None
        self.last_batch_at: float | None = None
        self.quarantined = 0
        self.reread = reread_from_source(settings, pipeline)
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
        # The erased rows (README "Erasure"): consulted before every batch; None when nothing can be erased.
        self.suppression = SuppressionFeed.for_pipeline(settings, pipeline)
        self.suppressed = 0
        self._judged: dict[tuple[str, int, int], ChangeRecord] = {}

    def _suppressed(self, record: ChangeRecord) -> None:
        # Never the key: it is an erased person's.
        self.suppressed += 1
        log.info("sink=%s event=suppressed entity=%s", self.sink.name, record.entity)

    def _judge(self, records: Sequence[ChangeRecord]) -> list[ChangeRecord]:
        """The records as the suppression list leaves them (README "Erasure"); the origins of those it changed
        are noted, so a quarantined one is parked as judged, never with the bytes it arrived with."""
        if self.suppression is None:
            return list(records)
        suppressor = self.suppression.current()
        judged = suppressor.apply_all(records, dropped=self._suppressed)
        kept = {id(r) for r in records}
        self._judged = {r.origin: r for r in judged if id(r) not in kept and r.origin is not None}
        return judged

    def _write_with_retry(self, records: Sequence[ChangeRecord]) -> list[Rejected]:
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
                # Judged again on every attempt: an erasure that happened while the store was down must not be
                # overtaken by a batch judged before it (streams.suppression's settle time does not cover that).
                judged = self._judge(records)
                writable, held_back = complete_partials(self.sink, self.pipeline, judged, self.reread)
                rejected = held_back + write_bisecting(self.sink, writable)
        self.last_error = None
        self.failing_since = None
        self.last_batch_at = time.time()
        return rejected

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
            "quarantined": self.quarantined,
        }

    def _quarantine(self, rejected: Sequence[Rejected], messages: dict[tuple[str, int, int], Message]) -> None:
        """Park each refused record on the DLQ for this store (or stop, by the entity's policy); returns only
        once every one is acknowledged, so the batch's offsets are never committed past a record that is
        neither in the store nor in the dead-letter topic."""
        name = self.sink.name
        for rej in rejected:
            r = rej.record
            if on_reject(self.pipeline, name, r.entity) == "stop":
                raise FatalSinkError(
                    f"{name} refused {r.entity} key {r.key!r} version {r.version} at "
                    f"{':'.join(map(str, r.origin or ()))} (on_reject: stop): {rej.reason}"
                )
        errors: list[str] = []
        for rej in rejected:
            r = rej.record
            msg = messages.get(r.origin) if r.origin is not None else None
            if msg is None:  # a store returned a record it was not given: nothing to park, nothing to lose
                raise FatalSinkError(f"{name} returned a rejected record not in the batch: {r.entity} {r.key!r}")
            log.error(
                "sink=%s event=quarantined entity=%s key=%r version=%s topic=%s partition=%s offset=%s reason=%r",
                name, r.entity, r.key, r.version, msg.topic(), msg.partition(), msg.offset(), rej.reason[:500],
            )
            # A record the suppression list changed (anonymised) is parked as judged: the dead-letter topic is
            # kept for ever, and the bytes it arrived with carry what the erasure removed.
            value = to_avro(self.book, rej.record) if r.origin in self._judged else msg.value()
            self.dlq.produce(self.pipeline.dlq_topic, key=msg.key(), value=value,
                             headers=quarantine_headers(name, rej),
                             on_delivery=lambda err, _m: errors.append(str(err)) if err else None)
            self.dlq.poll(0)
        if self.dlq.flush(30) or errors:
            raise RetriableSinkError(f"quarantine not delivered to {self.pipeline.dlq_topic}: {errors or 'timeout'}")
        for rej in rejected:
            metrics.count_quarantined(name, rej.record.entity)
        self.quarantined += len(rejected)

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

    def _quarantine_with_retry(self, rejected: Sequence[Rejected],
                               messages: dict[tuple[str, int, int], Message]) -> None:
        for attempt in Retrying(retry=retry_if_exception_type(RetriableSinkError),
                                wait=wait_exponential(multiplier=0.2, max=10), reraise=True):
            if self.stop.is_set() and attempt.retry_state.attempt_number > 1:
                raise InterruptedError("stopping while the dead-letter topic is unavailable; batch left uncommitted")
            with attempt:
                self._quarantine(rejected, messages)

    def _run_after_setup(self) -> None:
        """Never fatal: a report view that cannot be made yet (its table not written yet) must not hold the
        changes back; it is tried again, and `changeflow report ...` makes it on demand too."""
        if self._after_setup is None:
            return
        self._after_setup_tried = time.monotonic()
        try:
            self._after_setup(self.sink, self.pipeline)
        except Exception as exc:  # any failure: logged, retried after later batches
            log.warning("sink=%s event=report_objects_pending error=%r", self.sink.name, str(exc)[:300])
            return
        self._after_setup = None
        log.info("sink=%s event=report_objects_ready", self.sink.name)

    def run(self) -> None:
        for attempt in Retrying(retry=retry_if_exception_type(RetriableSinkError), wait=wait_exponential(max=10)):
            with attempt:
                if self.stop.is_set():
                    return
                self.sink.setup(self.book.latest)
        self._run_after_setup()
        self.consumer.subscribe(canonical_topics(self.pipeline, self.sink.name))
        log.info("sink=%s event=started group=%s", self.sink.name, self.group)
        try:
            while not self.stop.is_set():
                msgs = self.consumer.consume(self.settings.sink_batch_size, self.settings.sink_batch_timeout_s)
                if not msgs:
                    continue
                records: list[ChangeRecord] = []
                by_origin: dict[tuple[str, int, int], Message] = {}
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
                        records.append(decode_waiting(partial(record_from_message, msg, self.book), self.stop,
                                                      wait_s=self.settings.sink_schema_wait_s,
                                                      what=f"{msg.topic()}:{msg.partition()}:{msg.offset()}"))
                        by_origin[(msg.topic(), msg.partition(), msg.offset())] = msg  # type: ignore[index]
                    except InterruptedError:
                        log.info("sink=%s event=stopped_uncommitted reason=schema_wait", self.sink.name)
                        return
                    except Exception as exc:  # any undecodable record is a dead letter, never a stopped sink
                        # The error's type only: a decoder's message may quote the value it could not read
                        # (logs carry keys and reasons, never row values); the full reason travels with the
                        # record itself, in the dead-letter topic.
                        log.error(
                            "sink=%s event=dead_letter topic=%s partition=%s offset=%s error=%s",
                            self.sink.name, msg.topic(), msg.partition(), msg.offset(), type(exc).__name__,
                        )
                        self._to_dlq(msg, f"undecodable canonical record: {type(exc).__name__}: {str(exc)[:300]}")
                        metrics.count_dead_letter(self.sink.name)
                metrics.observe_consumed(self.sink.name, records)
                started = time.perf_counter()
                try:
                    rejected = self._write_with_retry(records)
                    if rejected:
                        self._quarantine_with_retry(rejected, by_origin)
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
                if self._after_setup is not None and time.monotonic() - self._after_setup_tried > AFTER_SETUP_RETRY_S:
                    self._run_after_setup()
                log.debug(
                    "sink=%s event=batch size=%d ms=%.1f", self.sink.name, len(records),
                    (time.perf_counter() - started) * 1000,
                )
        finally:
            self.consumer.close()
            if self.suppression is not None:
                self.suppression.close()
            self.sink.close()


# --- replay of quarantined records into their store ---------------------------------------------------
@dataclass(frozen=True)
class StoreReplay:
    """What replaying one quarantined record into its store did."""

    entity: str
    key: str
    version: int
    # "applied" | "superseded" (the store holds a newer version) | "rejected" (refused again) | "suppressed" (the
    # row was erased: README "Erasure") | "reread" (a
    # partial record whose row the store does not hold: the row is re-read from the source instead)
    outcome: str
    detail: str


def replay_into_store(settings: Settings, pipeline: Pipeline, store_name: str,
                      messages: Sequence[tuple[bytes, tuple[str, int, int]]],
                      store: Store | None = None) -> list[StoreReplay]:
    """Write quarantined canonical records (their exact bytes and origin) into one store only, under its
    version guard: a record applies only if it is still newer than what the store holds. Nothing goes
    back to Kafka, so the other stores never see the replay. A failure of the store raises, as in a sink."""
    book = schema_book(settings, pipeline, writer=False)
    own = store is None
    target = store or base.create(store_name, settings, pipeline)
    out: list[StoreReplay] = []
    suppression = SuppressionFeed.for_pipeline(settings, pipeline)
    try:
        target.setup(book.latest)
        for value, origin in messages:
            record = record_from_bytes(value, origin, book)
            kept = suppression.current().apply(record) if suppression is not None else record
            if kept is None:
                out.append(StoreReplay(record.entity, "(erased)", record.version, "suppressed",
                                       "the row was erased (`changeflow erasure status`); not written"))
                continue
            record = kept
            writable, refused = complete_partials(target, pipeline, [record], reread_from_source(settings, pipeline))
            if not writable and not refused:  # a partial record the store has no row for: re-read instead
                out.append(StoreReplay(record.entity, record.key, record.version, "reread",
                                       f"{store_name} does not hold the row this partial change needs; the whole "
                                       "row is re-read from the source"))
                continue
            refused += write_bisecting(target, writable) if writable else []
            if refused:
                out.append(StoreReplay(record.entity, record.key, record.version, "rejected", refused[0].reason))
                continue
            held = _held_version(target, pipeline, record)
            if held is not None and held > record.version:
                out.append(StoreReplay(record.entity, record.key, record.version, "superseded",
                                       f"{store_name} holds the newer version {held}; nothing changed"))
            else:
                out.append(StoreReplay(record.entity, record.key, record.version, "applied",
                                       f"written into {store_name}" + (" (delete)" if record.is_delete else "")))
    finally:
        if suppression is not None:
            suppression.close()
        if own:
            target.close()
    return out


def _held_version(store: Any, pipeline: Pipeline, record: ChangeRecord) -> int | None:
    try:
        found = store.fetch(pipeline.entities[record.entity], [record.key])
    except Exception:  # the outcome line is informative only; the write itself already succeeded
        return None
    held = found.get(record.key)
    return None if held is None else held.version
