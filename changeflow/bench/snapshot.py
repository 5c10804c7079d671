"""Snapshot: rows/s of Debezium's initial snapshot of a fresh table, through changeflow into every store.

A dedicated PostgreSQL database (`bench_<run>`, created as superuser, dropped at the end) holds `public.products`
with the production columns and N generated rows, so the live `commerce` database, its publication and its slot
are untouched and the table is still named `products` (the entity the decoder maps). A dedicated connector,
built from changeflow/connectors/postgres-commerce.json with only its names changed (database, topic prefix,
publication, slot, `snapshot.mode=initial`), snapshots it into its own raw topic; an isolated bench worker (Faust
decode agent and the three sink runners, the production code path) is already running and waiting.

Progress is read from the stores themselves (decoding is at-least-once, so a consumer group's committed count
can include redeliveries): each store's ``visible_count``, the rows a reader sees (distinct keys of a table,
an index's `_count` after its refresh, the keys under the entity's prefix). Rows/s per store = N / (time the
store held all N - time the connector was created), which includes Kafka Connect starting the task; the same
rate from the first snapshot record in Kafka is reported too, and Debezium's own rate (N / time the raw topic
held N messages).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from changeflow.bench.cleanup import snapshot_names
from changeflow.bench.common import (
    BenchSettings,
    Isolation,
    high_watermarks,
    message_time_span,
    partitions,
    readable_stores,
)
from changeflow.bench.pipeline import BenchWorker
from changeflow.connectors.client import CONNECTOR_DIR, ConnectorDefinition, KafkaConnectClient
from changeflow.pipelines.spec import EntitySpec, Pipeline
from changeflow.sinks.base import Store, used_by
from changeflow.waiting import WaitTimeout, wait_until

DDL = """
CREATE TABLE products (
  id bigint PRIMARY KEY, sku text NOT NULL UNIQUE, name text NOT NULL, description text, category text,
  price_cents integer NOT NULL CHECK (price_cents >= 0), stock integer NOT NULL DEFAULT 0, internal_notes text,
  updated_at timestamptz NOT NULL DEFAULT now()
)
"""
FILL = """
INSERT INTO products (id, sku, name, description, category, price_cents, stock, internal_notes)
SELECT g, 'SNAP-' || g, 'snapshot item ' || mod(g, 997), 'A product of the snapshot benchmark.',
       (ARRAY['books','garden','kitchen','toys','tools','music'])[1 + mod(g, 6)], 99 + mod(g, 99900), mod(g, 500),
       'supplier margin 12 percent'
FROM generate_series(%s::bigint, %s::bigint) AS g
"""


def prepare_database(settings: BenchSettings, run_id: str, rows: int, id_base: int) -> None:
    names = snapshot_names(run_id)
    with psycopg.connect(settings.pg_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(names["database"])))
    dsn = settings.pg_dsn.rsplit("/", 1)[0] + "/" + names["database"]
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(DDL)
        conn.execute(FILL, (id_base, id_base + rows - 1))
        conn.execute("ANALYZE products")
        conn.execute(sql.SQL("GRANT SELECT ON products TO {}").format(sql.Identifier(settings.pg_replication_user)))
        conn.execute(sql.SQL("CREATE PUBLICATION {} FOR TABLE products").format(sql.Identifier(names["publication"])))


def connector(settings: BenchSettings, run_id: str, raw_prefix: str) -> ConnectorDefinition:
    names = snapshot_names(run_id)
    base = ConnectorDefinition.load(CONNECTOR_DIR / "postgres-commerce.json")
    # The live connector's heartbeat action and signal table live in `commerce`; this database has neither.
    dropped = ("heartbeat.action.query", "signal.enabled.channels", "signal.data.collection")
    config = {
        **{k: v for k, v in base.config.items() if k not in dropped},
        "database.dbname": names["database"], "topic.prefix": raw_prefix, "table.include.list": "public.products",
        "publication.name": names["publication"], "publication.autocreate.mode": "disabled",
        "slot.name": names["slot"], "snapshot.mode": "initial",
    }
    return ConnectorDefinition(name=names["connector"], config=config)


def store_counters(stores: dict[str, Store], products: EntitySpec) -> dict[str, Callable[[], int]]:
    """Rows of this stage a reader sees in each store (``visible_count``: the stage's tables, indexes and keys
    are its own), by store name."""

    def counter(store: Any) -> Callable[[], int]:
        def count() -> int:
            try:
                return int(store.visible_count(products))
            except Exception:  # a store restarting mid-run: counted again next round
                return 0
        return count

    return {name: counter(store) for name, store in stores.items()}


def run(base: BenchSettings, live: Pipeline, run_id: str, rows: int, log_dir: Path, say: Callable[[str], None],
        timeout: float | None = None) -> dict[str, Any]:
    iso = Isolation(run_id, "snapshot")
    settings = iso.settings(base)
    pipeline = iso.pipeline(live)
    say(f"snapshot: creating database {snapshot_names(run_id)['database']} with {rows:,} products")
    started = time.perf_counter()
    prepare_database(base, run_id, rows, iso.id_base)
    fill_s = time.perf_counter() - started
    worker = BenchWorker(settings, pipeline, iso, log_dir)
    stores = readable_stores(settings, pipeline)
    worker.start()
    client = KafkaConnectClient(settings.connect_url)
    raw_topic = pipeline.entities["products"].raw_topic
    try:
        worker.wait_ready()
        say(f"snapshot: connector created; Debezium snapshot → Faust decode → {'/'.join(used_by(pipeline))}")
        definition = connector(settings, run_id, iso.raw_prefix)
        t0 = time.time()
        client.put_config(definition)
        raw_tps = partitions(settings, [raw_topic])
        counts = store_counters(stores, pipeline.entities["products"])
        raw_done: float | None = None
        done: dict[str, float | None] = dict.fromkeys(counts)

        def finished() -> bool:
            nonlocal raw_done, raw_tps
            now = time.time()
            if raw_done is None:
                raw_tps = raw_tps or partitions(settings, [raw_topic])
                if raw_tps and high_watermarks(settings, raw_tps) >= rows:
                    raw_done = now
            elif high_watermarks(settings, raw_tps) > rows * 1.5:
                raise RuntimeError(f"connector {definition.name} is snapshotting again and again (task restarts?); "
                                   "see the Kafka Connect log")
            for sink, count in counts.items():
                if done[sink] is None and count() >= rows:
                    done[sink] = now
            return raw_done is not None and all(v is not None for v in done.values())

        with contextlib.suppress(WaitTimeout):  # what did not finish is reported as such (None)
            wait_until(finished, timeout or max(120.0, rows / 100), what="the snapshot in every store", interval=0.1)
        applied = {sink: count() for sink, count in counts.items()}
    finally:
        worker.stop()
        client.close()
        for store in stores.values():
            store.close()
    span = message_time_span(settings, partitions(settings, [raw_topic]))
    first = span[0] if span else t0
    per_store = {s: (round(rows / (t - t0)) if t else None) for s, t in done.items()}
    from_first = {s: (round(rows / (t - first)) if t and t > first else None) for s, t in done.items()}
    all_done = all(done.values())
    return {
        "rows": rows,
        "fill_table_s": round(fill_s, 1),
        "debezium_rows_per_s": round(rows / (raw_done - t0)) if raw_done else None,
        "per_store_rows_per_s": per_store,
        "all_stores_rows_per_s": round(rows / (max(v for v in done.values() if v) - t0)) if all_done else None,
        "connector_start_s": round(first - t0, 2),
        "per_store_rows_per_s_from_first_record": from_first,
        "visible": applied,
        "complete": all_done,
        "decode_stage": "Faust agent streams.app.decode (production code path)",
        "worker_log": str(worker.log_path),
    }
