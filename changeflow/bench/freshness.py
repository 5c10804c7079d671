"""Freshness: milliseconds from PostgreSQL commit to visibility in each store, under a steady insert rate.

Runs against the LIVE pipeline (the `commerce-postgres` connector and the background worker), as a user
would see it. A generator inserts products with this run's SKU prefix at a steady rate, batched per 50 ms tick
(one transaction per tick, `INSERT ... SELECT FROM unnest(...) RETURNING id`); the commit time of each row is the
wall clock right after its transaction's COMMIT returned. One poller per registered store records when each
row first becomes visible to a reader: the store's own ``visible(spec, keys)`` on the oldest
``visibility_batch`` pending keys, every ``visibility_poll_s`` (each store module says how a reader looks: a
pipelined EXISTS, a ``_search`` after the index refresh, a ``SELECT``).

So each figure carries up to one polling interval of over-estimate. Where the time goes is read from Kafka
timestamps of the same rows: commit → raw topic (Debezium) and commit → canonical topic (plus the decode stage).
Rows not visible when the drain timeout expires are counted as `unseen` and enter the percentiles at the timeout
(`censored`): a lower bound.
"""

from __future__ import annotations

import contextlib
import random
import threading
import time
from collections.abc import Callable
from typing import Any

import orjson
import psycopg
from confluent_kafka import Consumer, TopicPartition

from changeflow.bench.common import partitions, percentile, readable_stores
from changeflow.deploy.worker import WorkerService
from changeflow.pipelines.spec import Pipeline
from changeflow.settings import Settings
from changeflow.waiting import WaitTimeout, wait_until

TICK_S = 0.05
INSERT = (
    "INSERT INTO products (sku, name, description, category, price_cents, stock, internal_notes) "
    "SELECT * FROM unnest(%s::text[], %s::text[], %s::text[], %s::text[], %s::int[], %s::int[], %s::text[]) "
    "RETURNING id"
)


class Tracker:
    """Commit time of every generated row, and the first time each store showed it."""

    def __init__(self, stores: list[str]) -> None:
        self.lock = threading.Lock()
        self.committed: dict[int, float] = {}
        self.seen: dict[str, dict[int, float]] = {s: {} for s in stores}
        self.done = threading.Event()

    def add(self, ids: list[int], at: float) -> None:
        with self.lock:
            for i in ids:
                self.committed[i] = at

    def pending(self, store: str, limit: int | None = None) -> list[int]:
        with self.lock:
            seen = self.seen[store]
            out = sorted(i for i in self.committed if i not in seen)
        return out[:limit] if limit else out

    def mark(self, store: str, ids: list[int], at: float) -> None:
        with self.lock:
            seen = self.seen[store]
            for i in ids:
                if i in self.committed and i not in seen:
                    seen[i] = at

    def complete(self) -> bool:
        with self.lock:
            return all(len(seen) >= len(self.committed) for seen in self.seen.values())


def _generate(settings: Settings, tracker: Tracker, prefix: str, rate: int, seconds: float) -> tuple[int, float]:
    rng = random.Random(rate)
    per_tick = max(1, round(rate * TICK_S))
    ticks = int(seconds / TICK_S)
    n = 0
    with psycopg.connect(settings.pg_dsn, autocommit=False) as conn:
        start = time.monotonic()
        for tick in range(ticks):
            delay = start + tick * TICK_S - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            skus = [f"{prefix}{n + i:08d}" for i in range(per_tick)]
            rows = conn.execute(INSERT, (
                skus, [f"bench item {i % 97}" for i in range(per_tick)], ["A benchmark product."] * per_tick,
                [rng.choice(("books", "toys", "tools")) for _ in range(per_tick)],
                [rng.randint(99, 99_999) for _ in range(per_tick)], [rng.randint(0, 500) for _ in range(per_tick)],
                ["bench"] * per_tick,
            )).fetchall()
            conn.commit()
            tracker.add([int(r[0]) for r in rows], time.time())
            n += per_tick
        elapsed = time.monotonic() - start
    return n, elapsed


def _poll_loop(tracker: Tracker, name: str, store: Any, spec: Any) -> None:
    interval, batch = store.visibility_poll_s, store.visibility_batch
    while not tracker.done.is_set():
        started = time.monotonic()
        pending = tracker.pending(name, batch)
        if pending:
            try:
                visible = [int(k) for k in store.visible(spec, [str(i) for i in pending])]
            except Exception:  # a store restarting mid-run: try again next round
                visible = []
            tracker.mark(name, visible, time.time())
        time.sleep(max(0.0, interval - (time.monotonic() - started)))


def run_load(settings: Settings, pipeline: Pipeline, prefix: str, rate: int, seconds: float,
             drain_timeout: float) -> dict[str, Any]:
    stores = readable_stores(settings, pipeline)
    tracker = Tracker(list(stores))
    since_ms = int(time.time() * 1000) - 1000
    products = pipeline.entities["products"]
    pollers = [threading.Thread(target=_poll_loop, args=(tracker, name, store, products), daemon=True)
               for name, store in stores.items()]
    for p in pollers:
        p.start()
    try:
        inserted, elapsed = _generate(settings, tracker, prefix, rate, seconds)
        with contextlib.suppress(WaitTimeout):  # rows still unseen are counted as such (censored)
            wait_until(tracker.complete, drain_timeout, what="every row visible in every store", interval=0.1)
        ended = time.time()
    finally:
        tracker.done.set()
        for p in pollers:
            p.join(5)
        for opened in stores.values():
            opened.close()
    out: dict[str, Any] = {"target_per_s": rate, "rows": inserted, "achieved_per_s": round(inserted / elapsed),
                           "load_seconds": round(elapsed, 1)}
    for store, seen in tracker.seen.items():
        lat = [(seen[i] - t) * 1000 for i, t in tracker.committed.items() if i in seen]
        unseen = [(ended - t) * 1000 for i, t in tracker.committed.items() if i not in seen]
        values = lat + unseen
        out[store] = {
            "p50": _ms(percentile(values, 50)), "p95": _ms(percentile(values, 95)), "p99": _ms(percentile(values, 99)),
            "max": _ms(max(values) if values else None), "seen": len(lat), "unseen": len(unseen),
            "censored": bool(unseen),
        }
    out["stages"] = stage_latency(settings, pipeline, tracker.committed, since_ms)
    return out


def _topic_times(settings: Settings, topic: str, since_ms: int, ids: set[int], key_id: Callable[[bytes], int | None]
                 ) -> dict[int, float]:
    """First Kafka timestamp (s) of each id's message on ``topic`` since ``since_ms``: when a stage emitted it."""

    consumer = Consumer({"bootstrap.servers": settings.kafka_bootstrap, "group.id": "bench-stage-times",
                         "enable.auto.commit": False})
    out: dict[int, float] = {}
    try:
        tps = [TopicPartition(tp.topic, tp.partition, since_ms) for tp in partitions(settings, [topic])]
        starts = consumer.offsets_for_times(tps, timeout=10)
        ends = {tp.partition: consumer.get_watermark_offsets(tp, timeout=10)[1] for tp in tps}
        live = [tp for tp in starts if tp.offset >= 0 and tp.offset < ends[tp.partition]]
        if not live:
            return out
        consumer.assign(live)
        remaining = {tp.partition for tp in live}
        deadline = time.monotonic() + 60
        # A loop, not wait_until: each message read is timed here, and the read ends at each partition's end.
        while remaining and time.monotonic() < deadline:
            for msg in consumer.consume(5000, 0.5):
                if msg.error() is not None:
                    continue
                partition, offset = msg.partition() or 0, msg.offset() or 0
                if offset >= ends[partition] - 1:
                    remaining.discard(partition)
                i = key_id(msg.key() or b"")
                if i is not None and i in ids and i not in out:
                    out[i] = msg.timestamp()[1] / 1000
    finally:
        consumer.close()
    return out


def _raw_key_id(key: bytes) -> int | None:
    try:
        return int(orjson.loads(key)["payload"]["id"])
    except (ValueError, KeyError, TypeError):
        return None


def _canonical_key_id(key: bytes) -> int | None:
    entity, _, k = key.decode(errors="replace").partition(":")
    return int(k) if entity == "products" and k.isdigit() else None


def stage_latency(settings: Settings, pipeline: Pipeline, committed: dict[int, float], since_ms: int
                  ) -> dict[str, Any]:
    """p50/p99 ms from commit to the raw topic (Debezium) and to the canonical topic (Debezium + decode)."""
    products = pipeline.entities["products"]
    ids = set(committed)
    out: dict[str, Any] = {}
    for name, topic, key_id in (
        ("commit_to_raw_topic", products.raw_topic, _raw_key_id),
        ("commit_to_canonical_topic", products.canonical_topic, _canonical_key_id),
    ):
        times = _topic_times(settings, topic, since_ms, ids, key_id)
        lat = [(t - committed[i]) * 1000 for i, t in times.items()]
        out[name] = {"p50": _ms(percentile(lat, 50)), "p99": _ms(percentile(lat, 99)), "rows": len(lat)}
    return out


def _ms(v: float | None) -> float | None:
    return None if v is None else round(v, 1)


def run(settings: Settings, pipeline: Pipeline, sku_prefix: str, rates: list[int], seconds: float, drain_timeout: float,
        say: Callable[[str], None]) -> dict[str, Any]:

    if not WorkerService(settings).healthy():
        raise RuntimeError("freshness needs the live worker: start it (see README) or use `changeflow demo`")
    out: dict[str, Any] = {}
    for rate in rates:
        say(f"freshness: {rate:,} inserts/s for {seconds:.0f}s into commerce.products (live pipeline)")
        out[f"{rate}_per_s"] = run_load(settings, pipeline, f"{sku_prefix}L{rate}-", rate, seconds, drain_timeout)
    return out
