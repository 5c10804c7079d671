"""The worker's Prometheus metrics: one registry, served at ``/metrics`` on the worker's web port.

Everything an on-call engineer needs to tell "slow", "stuck" and "losing data" apart, per sink (each
sink is its own consumer group and can fall behind alone) and, where it matters, per entity:

``changeflow_sink_events_in_total{sink, entity}``
    Canonical records a sink consumed for its store. Counted before the write, so ``in - out`` is what
    a sink holds while its store is down (it retries the same batch and commits nothing). Entities a
    store has no mapping for (payments in the search index, ...) are left alone by the sink and are not
    counted here, nor in ``out`` and freshness.
``changeflow_sink_events_out_total{sink, entity}``
    Records in batches the store accepted (offsets are committed right after). A replayed record the
    version guard turns into a no-op still counts: it was delivered, the store decided.
``changeflow_sink_batch_size{sink}`` (histogram)
    Records per written batch (every consumed record, mapped or not). Batches near ``sink_batch_size``
    mean the sink is catching up.
``changeflow_sink_batch_duration_seconds{sink}`` (histogram)
    Wall time to write one batch, retries included (a down store shows up as very long batches).
``changeflow_sink_errors_total{sink, kind}``
    ``kind`` is one of :data:`ERROR_KINDS`: ``retry`` (a retriable store failure; the batch is retried),
    ``consume`` (Kafka consume error), ``commit`` (offset commit failed; the batch will be redelivered
    and the version guard makes it a no-op), ``fatal`` (the store rejected a batch; the sink stops).
``changeflow_sink_dead_letters_total{sink}``
    Canonical messages a sink could not decode and sent to the dead-letter topic.
``changeflow_quarantined_total{store, entity}``
    Records a store refused (a mapping conflict, a value out of range, a key's script error) and that
    its sink parked on the dead-letter topic for that store only (``on_reject: quarantine``), while the
    rest of the batch was written and committed. ``changeflow dlq list --store S`` shows them.
``changeflow_sink_consumer_lag{sink, topic}``
    Messages in a canonical topic not yet committed by the sink's group (librdkafka's own statistics,
    refreshed every few seconds while the sink consumes).
``changeflow_sink_applied_source_timestamp_seconds{sink, entity}``
    Source commit time (``ts_ms``) of the newest record this worker has written per entity. It only
    moves forward: a replay of old records (``sinks reset``, a redelivered batch) is not "newer".
``changeflow_sink_applied_timestamp_seconds{sink, entity}``
    When that newest record was written. With the gauge above: how old the newest applied change was
    when it landed, and how long ago it did.
``changeflow_freshness_seconds{sink, entity}`` (histogram)
    For every written record: seconds from its source commit time to the moment its batch was written,
    i.e. how stale a reader of that store could have been. Replays and snapshots show up as old.
``changeflow_decode_total{topic, result}``
    Raw Debezium messages the stream processor decoded, per source topic; ``result`` is one of
    :data:`DECODE_RESULTS` (``record``: a canonical record was sent, ``skip``: understood and not
    forwarded, e.g. heartbeats and tombstones, ``dead_letter``: sent to the dead-letter topic).
``changeflow_unmapped_changes_total{table}``
    Changes of a captured source table (``schema.table``, ``database.collection``) that no entity of the
    pipeline maps: skipped, and counted so a table captured by mistake or left out of the file shows.

The helpers below are what the sink runner and the stream call; they take plain values, so the metric
logic is tested without Kafka.
"""

from __future__ import annotations

import bisect
import threading
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import orjson
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

if TYPE_CHECKING:
    from changeflow.pipelines.spec import Pipeline
    from changeflow.streams.records import ChangeRecord

# No `*_created` series: nothing reads them, and they would double the series per label set. (A process-
# wide switch of prometheus_client; the worker has no other registry.)
disable_created_metrics()
REGISTRY = CollectorRegistry(auto_describe=True)
CONTENT_TYPE = CONTENT_TYPE_LATEST

ERROR_KINDS = ("retry", "consume", "commit", "fatal")
DECODE_RESULTS = ("record", "skip", "dead_letter")

# From "instant" to "a replay of old data": the interesting range for a CDC pipeline is 10 ms - 1 min.
FRESHNESS_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0)
BATCH_SIZE_BUCKETS = (1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000)
BATCH_SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

SINK_EVENTS_IN = Counter(
    "changeflow_sink_events_in", "Canonical records a sink consumed.", ["sink", "entity"], registry=REGISTRY
)
SINK_EVENTS_OUT = Counter(
    "changeflow_sink_events_out", "Records in batches the store accepted.", ["sink", "entity"], registry=REGISTRY
)
SINK_BATCH_SIZE = Histogram(
    "changeflow_sink_batch_size", "Records per written batch.", ["sink"], buckets=BATCH_SIZE_BUCKETS,
    registry=REGISTRY,
)
SINK_BATCH_SECONDS = Histogram(
    "changeflow_sink_batch_duration_seconds", "Seconds to write one batch, retries included.", ["sink"],
    buckets=BATCH_SECONDS_BUCKETS, registry=REGISTRY,
)
SINK_ERRORS = Counter(
    "changeflow_sink_errors", "Sink errors by kind (retry, consume, commit, fatal).", ["sink", "kind"],
    registry=REGISTRY,
)
SINK_DEAD_LETTERS = Counter(
    "changeflow_sink_dead_letters", "Undecodable canonical messages a sink sent to the DLQ.", ["sink"],
    registry=REGISTRY,
)
QUARANTINED = Counter(
    "changeflow_quarantined", "Records a store refused, parked on the dead-letter topic for that store only.",
    ["store", "entity"], registry=REGISTRY,
)
SINK_CONSUMER_LAG = Gauge(
    "changeflow_sink_consumer_lag", "Messages not yet committed by the sink's consumer group.", ["sink", "topic"],
    registry=REGISTRY,
)
SINK_APPLIED_SOURCE_TS = Gauge(
    "changeflow_sink_applied_source_timestamp_seconds",
    "Source commit time of the newest record in the last written batch.", ["sink", "entity"], registry=REGISTRY,
)
SINK_APPLIED_AT = Gauge(
    "changeflow_sink_applied_timestamp_seconds", "When the sink last wrote a batch holding the entity.",
    ["sink", "entity"], registry=REGISTRY,
)
FRESHNESS = Histogram(
    "changeflow_freshness_seconds", "Seconds from source commit to the batch write, per written record.",
    ["sink", "entity"], buckets=FRESHNESS_BUCKETS, registry=REGISTRY,
)
DECODE = Counter(
    "changeflow_decode", "Raw Debezium messages decoded, by outcome.", ["topic", "result"], registry=REGISTRY
)
UNMAPPED = Counter(
    "changeflow_unmapped_changes", "Changes of a source table no entity of the pipeline maps (skipped).",
    ["table"], registry=REGISTRY,
)

# The pipeline whose entities the sinks write, given once at process start (``use_pipeline``).
_pipeline: Pipeline | None = None


def use_pipeline(pipeline: Pipeline | None) -> None:
    """Which entities each store holds: set once by the worker and each sink process at start."""
    global _pipeline
    _pipeline = pipeline


# (sink, entity) → newest source time written so far, so the applied gauges never move backwards.
_newest: dict[tuple[str, str], float] = {}
_newest_lock = threading.Lock()


# source (a sink process) → the metric families it reported last.
_absorbed: dict[str, list[Metric]] = {}
_absorbed_lock = threading.Lock()


def absorb(source: str, families: list[Metric]) -> None:
    """Keep the latest families another process of this worker reported (each sink runs in its own)."""
    with _absorbed_lock:
        _absorbed[source] = families


class _Families:
    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> list[Metric]:
        return self.families


def exposition() -> bytes:
    """This process's registry and every absorbed one, merged per metric family, in the Prometheus text
    format (what ``/metrics`` returns). Label sets never collide: each sink's series live in one process."""
    merged: dict[str, Metric] = {}
    with _absorbed_lock:
        sources = [list(REGISTRY.collect()), *_absorbed.values()]
    for families in sources:
        for family in families:
            into = merged.get(family.name)
            if into is None:
                into = merged[family.name] = Metric(family.name, family.documentation, family.type, family.unit)
            into.samples.extend(family.samples)
    return generate_latest(_Families(list(merged.values())))


def count_error(sink: str, kind: str) -> None:
    if kind not in ERROR_KINDS:
        raise ValueError(f"unknown error kind {kind!r}; known: {', '.join(ERROR_KINDS)}")
    SINK_ERRORS.labels(sink=sink, kind=kind).inc()


def count_dead_letter(sink: str) -> None:
    SINK_DEAD_LETTERS.labels(sink=sink).inc()


def count_quarantined(store: str, entity: str, n: int = 1) -> None:
    QUARANTINED.labels(store=store, entity=entity).inc(n)


def quarantined_counts(text: str | bytes | None = None) -> dict[tuple[str, str], int]:
    """(store, entity) → records quarantined since the worker started, from ``/metrics`` text (a scrape of
    a worker's web port) or, without it, from this process and every sink process it absorbed. For
    ``status``: the durable count per store and entity is ``streams.dlq.quarantined_counts`` (the DLQ)."""

    raw = exposition() if text is None else text
    body = raw.decode() if isinstance(raw, bytes) else raw
    out: dict[tuple[str, str], int] = {}
    for family in text_string_to_metric_families(body):
        if family.name != "changeflow_quarantined":
            continue
        for sample in family.samples:
            if sample.name == "changeflow_quarantined_total":
                k = (sample.labels.get("store", ""), sample.labels.get("entity", ""))
                out[k] = out.get(k, 0) + int(sample.value)
    return out


def stores(sink: str, entity: str, pipeline: Pipeline | None = None) -> bool:
    """Whether ``sink`` writes ``entity`` at all (an entity with the store off leaves it alone).

    ``pipeline``: the one to ask; without it the one given to ``use_pipeline``; without either every
    entity counts (nothing to tell them apart by).
    """
    p = pipeline if pipeline is not None else _pipeline
    if p is None:
        return True
    spec = p.entities.get(entity)
    return spec is not None and spec.stored_in(sink)


def observe_many(histogram: Any, amounts: Sequence[float]) -> None:
    """``histogram.observe(a)`` for every ``a``: the same bucket counts (the sum up to float rounding), with
    one increment per bucket touched instead of two locked increments per value (a sink observes every
    record's freshness: 8-10 % of a sink process's samples). Written against prometheus-client's Histogram
    internals (``_upper_bounds``, ``_buckets``, ``_sum``, unchanged since 0.4); tests/unit/test_metrics.py
    checks it against ``observe``."""
    if not amounts:
        return
    bounds = histogram._upper_bounds  # ascending, the last +Inf
    counts = [0] * len(bounds)
    for amount in amounts:
        counts[bisect.bisect_left(bounds, amount)] += 1  # the first bound >= amount, as observe's loop
    histogram._sum.inc(sum(amounts))
    for i, count in enumerate(counts):
        if count:
            histogram._buckets[i].inc(count)


def _per_entity(sink: str, records: Sequence[ChangeRecord]) -> dict[str, list[ChangeRecord]]:
    out: dict[str, list[ChangeRecord]] = defaultdict(list)
    for r in records:
        out[r.entity].append(r)
    return {entity: rs for entity, rs in out.items() if stores(sink, entity)}


def observe_consumed(sink: str, records: Sequence[ChangeRecord]) -> None:
    for entity, rs in _per_entity(sink, records).items():
        SINK_EVENTS_IN.labels(sink=sink, entity=entity).inc(len(rs))


def observe_written(
    sink: str, records: Sequence[ChangeRecord], duration_s: float, written_at: float | None = None
) -> None:
    """After the store accepted a batch: counts, batch size and duration, freshness per record."""
    if not records:
        return
    now = time.time() if written_at is None else written_at
    SINK_BATCH_SIZE.labels(sink=sink).observe(len(records))
    SINK_BATCH_SECONDS.labels(sink=sink).observe(duration_s)
    for entity, rs in _per_entity(sink, records).items():
        SINK_EVENTS_OUT.labels(sink=sink, entity=entity).inc(len(rs))
        newest = max(r.ts_ms for r in rs)
        # A source clock slightly ahead of ours is not negative staleness.
        observe_many(FRESHNESS.labels(sink=sink, entity=entity), [max(0.0, now - r.ts_ms / 1000) for r in rs])
        with _newest_lock:
            if newest / 1000 <= _newest.get((sink, entity), float("-inf")):
                continue
            _newest[(sink, entity)] = newest / 1000
        SINK_APPLIED_SOURCE_TS.labels(sink=sink, entity=entity).set(newest / 1000)
        SINK_APPLIED_AT.labels(sink=sink, entity=entity).set(now)


def observe_decode(topic: str, outcome: str) -> None:
    """One decoded message: ``outcome`` is ``changeflow.streams.records.outcome`` of it (metrics, at the
    bottom of the layers, knows no record types)."""
    count_decoded({(topic, outcome): 1})


def count_unmapped(table: str) -> None:
    """A change of ``table`` (``schema.table`` or ``database.collection``) that no entity maps."""
    UNMAPPED.labels(table=table).inc()


def count_decoded(counts: Mapping[tuple[str, str], int]) -> None:
    """(topic, outcome) → messages: the decode agent counts a whole batch at once (a labelled counter
    update per message was a measurable share of the decode stage)."""
    for (topic, outcome), n in counts.items():
        DECODE.labels(topic=topic, result=outcome).inc(n)


def consumer_lag_from_stats(stats_json: str | bytes) -> dict[str, int]:
    """topic → messages not yet committed, from librdkafka's statistics JSON (``stats_cb``).

    librdkafka reports ``consumer_lag`` per assigned partition (-1 while unknown, e.g. before the first
    fetch); the internal ``-1`` partition is its unassigned-messages queue, not a real partition.
    """
    stats = orjson.loads(stats_json)
    out: dict[str, int] = {}
    for topic, t in (stats.get("topics") or {}).items():
        lags = [
            int(p["consumer_lag"]) for pid, p in (t.get("partitions") or {}).items()
            if pid != "-1" and int(p.get("consumer_lag", -1)) >= 0
        ]
        if lags:
            out[topic] = sum(lags)
    return out


def observe_consumer_stats(sink: str, stats_json: str | bytes) -> None:
    for topic, lag in consumer_lag_from_stats(stats_json).items():
        SINK_CONSUMER_LAG.labels(sink=sink, topic=topic).set(lag)
