"""The live worker's /metrics counts what a test wrote, and `changeflow watch --once` shows it.

Other tests write products concurrently (and may run a second worker of the same consumer groups), so
counts are compared as "increased by at least what this test wrote", summed over every worker that
answers; the SKUs are this test's own and are deleted afterwards.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator

import httpx
import psycopg
import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from changeflow.settings import Settings
from tests.integration.conftest import eventually, redis_url, search_url

pytestmark = pytest.mark.integration

SINKS = ("redis", "search", "clickhouse")
ENTITIES = ("products", "orders", "payments", "refunds", "users")
WRITTEN = 25


def worker_urls(settings: Settings) -> list[str]:
    """The configured worker and any scaled-out instance next to it (instance n serves port + n - 1)."""
    urls = []
    for port in range(settings.worker_web_port, settings.worker_web_port + 4):
        url = f"http://127.0.0.1:{port}/metrics"
        try:
            if httpx.get(url, timeout=3).status_code == 200:
                urls.append(url)
        except httpx.HTTPError:
            continue
    assert urls, f"no worker serves /metrics on {settings.worker_web_port}"
    return urls


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(urls: list[str]) -> Samples:
    """Every sample summed over the workers, keyed by (sample name, labels); timestamps: the newest."""
    out: Samples = {}
    for url in urls:
        response = httpx.get(url, timeout=5)
        response.raise_for_status()
        assert response.headers["content-type"].startswith("text/plain; version=")
        for family in text_string_to_metric_families(response.text):
            for s in family.samples:
                key = (s.name, frozenset(s.labels.items()))
                if s.name.endswith("_timestamp_seconds"):
                    out[key] = max(out.get(key, 0.0), s.value)
                else:
                    out[key] = out.get(key, 0.0) + s.value
    return out


def sample(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


@pytest.fixture
def products(pipeline: Settings, sku_prefix: str) -> Iterator[list[str]]:
    """WRITTEN new products with this test's SKUs (deleted afterwards)."""
    skus = [f"{sku_prefix}-W{i:03d}" for i in range(WRITTEN)]
    with psycopg.connect(pipeline.pg_dsn, autocommit=True) as pg:
        with pg.transaction():
            for sku in skus:
                pg.execute(
                    "INSERT INTO products (sku, name, description, category, price_cents, stock) "
                    "VALUES (%s, 'watched lamp', 'desk lamp', 'lighting', 2599, 3)",
                    (sku,),
                )
        yield skus
        pg.execute("DELETE FROM products WHERE sku LIKE %s", (f"{sku_prefix}-%",))


def landed(settings: Settings, pid: int) -> dict[str, bool]:
    """Whether product ``pid`` is in each store (what a user would look at)."""
    from changeflow.sinks.clickhouse import client_for

    rds = redis.Redis.from_url(redis_url(settings))
    ch = client_for(settings)
    try:
        in_clickhouse = ch.query(
            "SELECT count() FROM changeflow.changelog WHERE entity = 'products' AND key = {k:String}",
            parameters={"k": str(pid)},
        ).result_rows[0][0]
        in_redis = bool(rds.exists(f"product:{pid}"))
    finally:
        ch.close()
        rds.close()
    return {
        "redis": in_redis,
        "search": httpx.get(f"{search_url(settings)}/products/_doc/{pid}", timeout=5).status_code == 200,
        "clickhouse": bool(in_clickhouse),
    }


def test_worker_metrics_count_every_sinks_writes_and_their_freshness(pipeline: Settings, sku_prefix: str) -> None:
    urls = worker_urls(pipeline)
    before = scrape(urls)
    with psycopg.connect(pipeline.pg_dsn, autocommit=True) as pg:
        committed_after = time.time()
        with pg.transaction():
            for i in range(WRITTEN):
                pg.execute(
                    "INSERT INTO products (sku, name, description, category, price_cents, stock) "
                    "VALUES (%s, 'metered kettle', 'kettle', 'kitchen', 3100, 4)",
                    (f"{sku_prefix}-M{i:03d}",),
                )
        try:
            # One transaction, so once its last row is in a store every row before it was written too.
            row = pg.execute("SELECT max(id) FROM products WHERE sku LIKE %s", (f"{sku_prefix}-%",)).fetchone()
            assert row is not None
            eventually(lambda: all(landed(pipeline, int(row[0])).values()), timeout=120,
                       what="the products in every store")

            def reported() -> Samples | None:
                """Sink processes report their metrics to the worker every 0.5 s: a scrape may trail the
                stores by that much, never more than a few reports."""
                now = scrape(urls)
                grown = all(
                    sample(now, name, sink=sink, entity="products") - sample(before, name, sink=sink,
                                                                             entity="products") >= WRITTEN
                    for sink in SINKS
                    for name in ("changeflow_sink_events_in_total", "changeflow_sink_events_out_total")
                )
                return now if grown else None

            after = eventually(reported, timeout=5, what="the sink processes' reports in the worker's /metrics")
            assert after is not None
        finally:
            pg.execute("DELETE FROM products WHERE sku LIKE %s", (f"{sku_prefix}-%",))

    decoded = sample(after, "changeflow_decode_total", topic="commerce.public.products", result="record")
    assert decoded - sample(before, "changeflow_decode_total", topic="commerce.public.products",
                            result="record") >= WRITTEN
    for sink in SINKS:
        labels = {"sink": sink, "entity": "products"}
        for name in ("changeflow_sink_events_in_total", "changeflow_sink_events_out_total"):
            grew = sample(after, name, **labels) - sample(before, name, **labels)
            assert grew >= WRITTEN, f"{name}{labels} grew by {grew}"
        # Our records were written within the 120 s wait, so at least WRITTEN new observations are in the
        # buckets up to 300 s (others' replays of old rows only add to the larger ones).
        recent = {**labels, "le": "300.0"}
        observed = sample(after, "changeflow_freshness_seconds_bucket", **recent) - sample(
            before, "changeflow_freshness_seconds_bucket", **recent)
        assert observed >= WRITTEN, (sink, observed)
        assert sample(after, "changeflow_sink_batch_size_count", sink=sink) > sample(
            before, "changeflow_sink_batch_size_count", sink=sink)
        # The newest applied change's source time is ts_ms in seconds: at or after our commit.
        newest = sample(after, "changeflow_sink_applied_source_timestamp_seconds", **labels)
        assert committed_after - 1 <= newest <= time.time(), (sink, newest, committed_after)
        # Lag is reported per canonical topic once librdkafka has statistics (every 5 s).
        assert any(
            name == "changeflow_sink_consumer_lag" and dict(lbls).get("sink") == sink for name, lbls in after
        ), f"no consumer lag for {sink}"


def test_watch_once_shows_every_sink_and_entity_with_the_written_products(
    pipeline: Settings, products: list[str]
) -> None:
    urls = worker_urls(pipeline)
    skus = products

    with psycopg.connect(pipeline.pg_dsn) as pg:
        row = pg.execute("SELECT max(id) FROM products WHERE sku = ANY(%s)", (skus,)).fetchone()
    assert row is not None and row[0] is not None
    pid = int(row[0])
    eventually(lambda: all(landed(pipeline, pid).values()), timeout=120, what="the products in every store")
    args = [sys.executable, "-m", "changeflow", "watch", "--once", "--interval", "1", "--changes", "5"]
    for url in urls:
        args += ["--url", url]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert " up" in out.splitlines()[0], out.splitlines()[0]
    rows: dict[tuple[str, str], list[str]] = {}
    entity = ""
    for line in out.splitlines():
        cells = [c.strip() for c in line.split("│")[1:-1]]
        if len(cells) == 10:  # the per entity and sink table (…, newest written, quarantined)
            entity = cells[0] or entity
            rows[(entity, cells[1])] = cells
    for e in ENTITIES:
        assert any(k[0] == e for k in rows), f"{e} missing from:\n{out}"
    for sink in SINKS:
        assert any(k[1] == sink for k in rows), f"{sink} missing from:\n{out}"
        cells = rows[("products", sink)]
        applied, freshness, last_write = cells[3], cells[4], cells[8]
        assert applied != "-" and int(applied.replace(",", "")) >= len(skus), cells
        assert freshness != "-" and last_write.endswith("ago"), cells
    assert "newest changes applied (ClickHouse changelog)" in out
