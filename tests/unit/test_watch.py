"""`changeflow watch` computed from scrapes: rates, freshness quantiles, merged workers, the rendered screen."""

from __future__ import annotations

import pytest
from rich.console import Console

from changeflow import metrics
from changeflow.commands.watch import (
    Change,
    Frame,
    Scrape,
    histogram_quantile,
    merge,
    parse_scrape,
    rate,
    render,
    window_quantiles,
)
from changeflow.pipelines.load import load
from changeflow.streams.records import ChangeRecord

SINKS = ["redis", "search", "clickhouse"]
ENTITIES = ["products", "orders", "payments"]


def exposition(lines: list[str]) -> str:
    return "\n".join(lines) + "\n"


def scrape_at(at: float, out: float, buckets: dict[str, float], source_ts: float, applied_at: float) -> Scrape:
    lines = [
        "# TYPE changeflow_sink_events_out_total counter",
        f'changeflow_sink_events_out_total{{sink="redis",entity="products"}} {out}',
        "# TYPE changeflow_freshness_seconds histogram",
        *(f'changeflow_freshness_seconds_bucket{{sink="redis",entity="products",le="{le}"}} {v}'
          for le, v in buckets.items()),
        f'changeflow_freshness_seconds_count{{sink="redis",entity="products"}} {buckets["+Inf"]}',
        'changeflow_freshness_seconds_sum{sink="redis",entity="products"} 1.0',
        "# TYPE changeflow_sink_applied_source_timestamp_seconds gauge",
        f'changeflow_sink_applied_source_timestamp_seconds{{sink="redis",entity="products"}} {source_ts}',
        "# TYPE changeflow_sink_applied_timestamp_seconds gauge",
        f'changeflow_sink_applied_timestamp_seconds{{sink="redis",entity="products"}} {applied_at}',
    ]
    return parse_scrape(exposition(lines), at)


def test_rate_is_the_counter_increase_over_the_time_between_scrapes() -> None:
    a = scrape_at(100.0, 1_000, {"0.5": 0, "1.0": 0, "+Inf": 0}, 0, 0)
    b = scrape_at(102.0, 1_300, {"0.5": 0, "1.0": 0, "+Inf": 0}, 0, 0)
    assert rate(b, a, "changeflow_sink_events_out_total", sink="redis") == 150.0
    assert rate(b, None, "changeflow_sink_events_out_total", sink="redis") is None
    # A restarted worker starts from zero: the new count is the increase, not a negative rate.
    c = scrape_at(104.0, 40, {"0.5": 0, "1.0": 0, "+Inf": 0}, 0, 0)
    assert rate(c, b, "changeflow_sink_events_out_total", sink="redis") == 20.0


def test_histogram_quantile_interpolates_like_promql() -> None:
    cumulative = {0.1: 0.0, 0.5: 10.0, 1.0: 20.0, float("inf"): 20.0}
    assert histogram_quantile(0.5, cumulative) == pytest.approx(0.5)
    assert histogram_quantile(0.75, cumulative) == pytest.approx(0.75)
    assert histogram_quantile(0.25, cumulative) == pytest.approx(0.3)
    # Beyond the largest finite bound PromQL answers that bound.
    assert histogram_quantile(0.9, {1.0: 5.0, float("inf"): 10.0}) == 1.0
    assert histogram_quantile(0.5, {1.0: 0.0, float("inf"): 0.0}) is None
    assert histogram_quantile(0.5, {}) is None


def test_window_quantiles_use_only_observations_since_the_window_start() -> None:
    old = scrape_at(0.0, 0, {"0.5": 100, "5.0": 100, "+Inf": 100}, 0, 0)  # a minute ago: 100 fast ones
    now = scrape_at(60.0, 0, {"0.5": 100, "5.0": 110, "+Inf": 110}, 0, 0)  # since: 10 between 0.5 and 5 s
    qs = window_quantiles(now, old, sink="redis", entity="products")
    assert qs[0.5] == pytest.approx(0.5 + 4.5 * 0.5)
    assert qs[0.99] == pytest.approx(0.5 + 4.5 * 0.99)
    assert window_quantiles(now, None, sink="redis", entity="products") == {0.5: None, 0.95: None, 0.99: None}


def test_merged_workers_add_counts_and_keep_the_newest_timestamp() -> None:
    a = scrape_at(10.0, 100, {"0.5": 1, "5.0": 2, "+Inf": 2}, 1_000.0, 1_001.0)
    b = scrape_at(11.0, 50, {"0.5": 3, "5.0": 3, "+Inf": 3}, 2_000.0, 2_000.5)
    m = merge([a, b])
    assert m.at == 11.0
    assert m.total("changeflow_sink_events_out_total") == 150
    assert m.buckets("changeflow_freshness_seconds") == {0.5: 4, 5.0: 5, float("inf"): 5}
    assert m.total("changeflow_sink_applied_source_timestamp_seconds") == 2_000.0


def test_the_real_exposition_parses_into_the_figures_watch_shows() -> None:
    sink = "clickhouse-watch-test"
    batch = [ChangeRecord("postgres", "products", str(i), "c", i, 1_000_000, None, {"id": i}) for i in range(3)]
    metrics.observe_written(sink, batch, 0.1, written_at=1_000.25)
    s = parse_scrape(metrics.exposition().decode(), 5.0)
    assert s.total("changeflow_sink_events_out_total", sink=sink, entity="products") == 3
    assert s.total("changeflow_freshness_seconds_count", sink=sink) == 3
    assert s.buckets("changeflow_freshness_seconds", sink=sink)[0.25] == 3


def screen(frame: Frame) -> str:
    console = Console(width=200, record=True, color_system=None)
    console.print(render(frame))
    return console.export_text()


def test_the_screen_shows_every_mapped_entity_and_sink_with_rates_and_freshness() -> None:
    prev = scrape_at(100.0, 1_000, {"0.5": 0, "5.0": 0, "+Inf": 0}, 0, 0)
    cur = scrape_at(101.0, 1_250, {"0.5": 200, "5.0": 250, "+Inf": 250}, 1_000.0, 1_000.4)
    changes = [Change("products", "42", "u", 7, 1_000_000, 1_000_350)]
    text = screen(Frame(now=1_002.0, urls=["http://127.0.0.1:6066"], entities=ENTITIES, sinks=SINKS,
                        cur=cur, prev=prev, base=prev, changes=changes, pipeline=load()))
    assert "worker http://127.0.0.1:6066 up" in text
    rows = {tuple(c.strip() for c in line.split("│")[1:3]): line for line in text.splitlines() if "│" in line}
    products_redis = rows[("products", "redis")]
    assert "250.0" in products_redis and "1,250" in products_redis  # events/s, applied
    assert "400 ms" in products_redis  # newest change: applied 0.4 s after its source commit
    assert "1.6 s ago" in products_redis
    # payments are only in ClickHouse: no redis or search row for them
    assert ("payments", "clickhouse") in rows and ("orders", "redis") in rows and ("", "search") in rows
    assert not any(k[0] == "payments" and k[1] != "clickhouse" for k in rows)
    for sink in SINKS:
        assert any(k[1] == sink for k in rows), sink
    # p50 over the window: 200 of 250 observations within 0.5 s, so the 125th is at 0.5 * 125/200 s.
    assert "312 ms" in products_redis
    change = next(line for line in text.splitlines() if "│ 42 " in line)
    assert "products" in change and "│ u " in change
    assert "350 ms" in change  # the change's own delay: ingested_at - ts_ms


def test_an_unreachable_worker_is_said_plainly_and_shows_no_numbers() -> None:
    text = screen(Frame(now=0.0, urls=["http://127.0.0.1:6066"], entities=ENTITIES, sinks=SINKS, cur=None,
                        prev=None, base=None, worker_error="[Errno 111] Connection refused",
                        changes_error="clickhouse down"))
    assert "unreachable ([Errno 111] Connection refused)" in text
    assert "changelog unavailable: clickhouse down" in text
    assert "products" in text and "clickhouse" in text
