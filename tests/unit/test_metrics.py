"""The worker's metrics as Prometheus sees them, and the Grafana dashboard that reads them.

Each test labels its samples with its own sink name, so tests never see each other's counts in the one
process-wide registry.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from changeflow import metrics
from changeflow.pipelines.load import load
from changeflow.pipelines.spec import Pipeline
from changeflow.streams.records import ChangeRecord, DeadLetter, Skip, outcome

REPO = Path(__file__).resolve().parents[2]
DASHBOARD = REPO / "changeflow" / "deploy" / "docker" / "grafana" / "dashboards" / "changeflow.json"
DATASOURCE = REPO / "changeflow" / "deploy" / "docker" / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
STATS = REPO / "tests" / "fixtures" / "librdkafka" / "consumer_stats.json"

# name → (type, labels): the contract the dashboard, `changeflow watch` and any alert rule rely on.
EXPECTED = {
    "changeflow_sink_events_in": ("counter", {"sink", "entity"}),
    "changeflow_sink_events_out": ("counter", {"sink", "entity"}),
    "changeflow_sink_batch_size": ("histogram", {"sink"}),
    "changeflow_sink_batch_duration_seconds": ("histogram", {"sink"}),
    "changeflow_sink_errors": ("counter", {"sink", "kind"}),
    "changeflow_sink_dead_letters": ("counter", {"sink"}),
    "changeflow_sink_consumer_lag": ("gauge", {"sink", "topic"}),
    "changeflow_sink_applied_source_timestamp_seconds": ("gauge", {"sink", "entity"}),
    "changeflow_sink_applied_timestamp_seconds": ("gauge", {"sink", "entity"}),
    "changeflow_freshness_seconds": ("histogram", {"sink", "entity"}),
    "changeflow_decode": ("counter", {"topic", "result"}),
    "changeflow_unmapped_changes": ("counter", {"table"}),
    "changeflow_quarantined": ("counter", {"store", "entity"}),
}
SUFFIXES = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count")}


def record(entity: str, key: str, ts_ms: int, op: str = "u") -> ChangeRecord:
    return ChangeRecord(source="postgres", entity=entity, key=key, op=op, version=int(ts_ms), ts_ms=ts_ms,  # type: ignore[arg-type]
                        before=None, after=None if op == "d" else {"id": key})


def value(name: str, **labels: str) -> float | None:
    return metrics.REGISTRY.get_sample_value(name, labels)


@pytest.fixture
def sink() -> str:
    return f"test-{uuid.uuid4().hex[:8]}"


def test_the_registry_exposes_exactly_the_documented_metrics(sink: str) -> None:
    # One sample of each, so the exposition carries every label name.
    metrics.observe_consumed(sink, [record("products", "1", 1_000)])
    metrics.observe_written(sink, [record("products", "1", 1_000)], 0.01, written_at=2.0)
    metrics.count_error(sink, "retry")
    metrics.count_dead_letter(sink)
    metrics.SINK_CONSUMER_LAG.labels(sink=sink, topic="changeflow.products").set(3)
    metrics.observe_decode(f"{sink}.topic", outcome(Skip("heartbeat")))
    metrics.count_unmapped(f"{sink}.unmapped")
    metrics.count_quarantined(sink, "products")

    families = {f.name: f for f in text_string_to_metric_families(metrics.exposition().decode())}
    assert {name: f.type for name, f in families.items()} == {name: t for name, (t, _) in EXPECTED.items()}
    for name, (kind, labels) in EXPECTED.items():
        samples = [s for s in families[name].samples if s.name.endswith(SUFFIXES[kind])]
        assert samples, name
        for s in samples:
            assert set(s.labels) - {"le"} == labels, (name, s.labels)
    for name in EXPECTED:
        assert name in metrics.__doc__, f"{name} is not explained in changeflow/metrics.py's docstring"


def test_a_written_batch_counts_per_entity_and_observes_each_records_freshness(sink: str) -> None:
    written_at = 1_000_000.0
    batch = [
        record("products", "1", 999_999_700),       # 0.3 s old
        record("products", "2", 999_998_000),       # 2 s old
        record("orders", "7", 999_999_960),          # 0.04 s old
        record("orders", "8", 1_000_000_500),        # source clock ahead: 0, not negative
    ]
    metrics.observe_written(sink, batch, 0.2, written_at=written_at)

    assert value("changeflow_sink_events_out_total", sink=sink, entity="products") == 2
    assert value("changeflow_sink_events_out_total", sink=sink, entity="orders") == 2
    assert value("changeflow_sink_batch_size_count", sink=sink) == 1
    assert value("changeflow_sink_batch_size_sum", sink=sink) == 4
    assert value("changeflow_sink_batch_duration_seconds_sum", sink=sink) == pytest.approx(0.2)

    def bucket(entity: str, le: str) -> float | None:
        return value("changeflow_freshness_seconds_bucket", sink=sink, entity=entity, le=le)

    assert value("changeflow_freshness_seconds_count", sink=sink, entity="products") == 2
    assert value("changeflow_freshness_seconds_sum", sink=sink, entity="products") == pytest.approx(2.3)
    assert bucket("products", "0.25") == 0 and bucket("products", "0.5") == 1 and bucket("products", "2.5") == 2
    assert value("changeflow_freshness_seconds_sum", sink=sink, entity="orders") == pytest.approx(0.04)
    assert bucket("orders", "0.01") == 1 and bucket("orders", "0.05") == 2
    # The newest record's source time per entity, and when its batch landed.
    assert value("changeflow_sink_applied_source_timestamp_seconds", sink=sink, entity="products") == 999_999.7
    assert value("changeflow_sink_applied_source_timestamp_seconds", sink=sink, entity="orders") == 1_000_000.5
    assert value("changeflow_sink_applied_timestamp_seconds", sink=sink, entity="orders") == written_at
    # A replayed, older record later does not make the newest applied change older.
    metrics.observe_written(sink, [record("orders", "7", 5_000)], 0.1, written_at=written_at + 60)
    assert value("changeflow_sink_applied_source_timestamp_seconds", sink=sink, entity="orders") == 1_000_000.5
    assert value("changeflow_sink_applied_timestamp_seconds", sink=sink, entity="orders") == written_at
    assert value("changeflow_sink_events_out_total", sink=sink, entity="orders") == 3


@pytest.fixture
def commerce() -> Iterator[Pipeline]:
    pipeline = load()
    metrics.use_pipeline(pipeline)
    yield pipeline
    metrics.use_pipeline(None)


def test_entities_a_store_does_not_map_are_not_counted_as_written_to_it(commerce: Pipeline) -> None:
    sink = "search"  # payments and refunds have no search index
    metrics.observe_consumed(sink, [record("payments", "1", 1_000)])
    metrics.observe_written(sink, [record("payments", "1", 1_000)], 0.01, written_at=2.0)
    assert value("changeflow_sink_events_in_total", sink=sink, entity="payments") is None
    assert value("changeflow_sink_events_out_total", sink=sink, entity="payments") is None
    assert value("changeflow_freshness_seconds_count", sink=sink, entity="payments") is None
    assert metrics.stores("search", "products") and metrics.stores("clickhouse", "payments")
    assert not metrics.stores("redis", "payments") and not metrics.stores("search", "refunds")
    assert not metrics.stores("redis", "no-such-entity")
    assert metrics.stores("redis", "products", commerce) and not metrics.stores("redis", "payments", commerce)


def test_unmapped_changes_are_counted_per_table(sink: str) -> None:
    metrics.count_unmapped(f"{sink}.audit_log")
    metrics.count_unmapped(f"{sink}.audit_log")
    assert value("changeflow_unmapped_changes_total", table=f"{sink}.audit_log") == 2


def test_events_in_are_counted_before_the_write_so_in_minus_out_is_what_the_sink_holds(sink: str) -> None:
    metrics.observe_consumed(sink, [record("products", str(i), 1_000) for i in range(5)])
    assert value("changeflow_sink_events_in_total", sink=sink, entity="products") == 5
    assert value("changeflow_sink_events_out_total", sink=sink, entity="products") is None
    metrics.observe_written(sink, [], 0.0)  # an all-dead-letter batch writes nothing
    assert value("changeflow_sink_batch_size_count", sink=sink) is None


def test_error_kinds_are_a_closed_set(sink: str) -> None:
    for kind in metrics.ERROR_KINDS:
        metrics.count_error(sink, kind)
    metrics.count_error(sink, "retry")
    assert value("changeflow_sink_errors_total", sink=sink, kind="retry") == 2
    assert value("changeflow_sink_errors_total", sink=sink, kind="fatal") == 1
    with pytest.raises(ValueError, match="unknown error kind 'oops'; known: retry, consume, commit, fatal"):
        metrics.count_error(sink, "oops")


def test_decode_outcomes_are_counted_per_source_topic(sink: str) -> None:
    topic = f"{sink}.public.products"
    metrics.observe_decode(topic, outcome(record("products", "1", 1)))
    metrics.observe_decode(topic, outcome(record("products", "2", 1)))
    metrics.observe_decode(topic, outcome(Skip("tombstone")))
    metrics.observe_decode(topic, outcome(DeadLetter(b"k", b"v", topic, 0, 1, "bad")))
    assert value("changeflow_decode_total", topic=topic, result="record") == 2
    assert value("changeflow_decode_total", topic=topic, result="skip") == 1
    assert value("changeflow_decode_total", topic=topic, result="dead_letter") == 1


def test_consumer_lag_comes_from_librdkafkas_statistics(sink: str) -> None:
    # Captured from a real consumer on this stack: partitions 0..2 of changeflow.products lag 37, 25 and
    # 25 behind their committed offsets; partition "-1" is librdkafka's internal queue (lag -1).
    stats = STATS.read_text()
    partitions = json.loads(stats)["topics"]["changeflow.products"]["partitions"]
    assert partitions["-1"]["consumer_lag"] == -1
    assert metrics.consumer_lag_from_stats(stats) == {"changeflow.products": 37 + 25 + 25}
    metrics.observe_consumer_stats(sink, stats)
    assert value("changeflow_sink_consumer_lag", sink=sink, topic="changeflow.products") == 87
    # Before the first fetch every partition reports -1: no number rather than a false zero.
    unknown = {"topics": {"t": {"partitions": {"0": {"consumer_lag": -1}, "-1": {"consumer_lag": -1}}}}}
    assert metrics.consumer_lag_from_stats(json.dumps(unknown)) == {}


def test_the_exposition_is_the_prometheus_text_format() -> None:
    assert metrics.CONTENT_TYPE.startswith("text/plain; version=")
    assert b"# TYPE changeflow_freshness_seconds histogram" in metrics.exposition()


# --- the Grafana dashboard -----------------------------------------------------------------------------


def sample_names() -> set[str]:
    return {name + suffix for name, (kind, _) in EXPECTED.items() for suffix in SUFFIXES[kind]}


def dashboard_exprs() -> list[tuple[str, str]]:
    board = json.loads(DASHBOARD.read_text())
    return [(p["title"], t["expr"]) for p in board["panels"] for t in p["targets"]]


def test_dashboard_is_valid_json_with_unique_panels_on_the_provisioned_datasource() -> None:
    board = json.loads(DASHBOARD.read_text())
    assert board["uid"] and board["title"]
    panels = board["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    uid = re.search(r"^\s*uid:\s*(\S+)", DATASOURCE.read_text(), re.MULTILINE)
    assert uid is not None
    for p in panels:
        assert p["targets"], p["title"]
        assert p["datasource"] == {"type": "prometheus", "uid": uid.group(1)}, p["title"]
        assert {t["refId"] for t in p["targets"]} == {chr(65 + i) for i in range(len(p["targets"]))}


def test_every_dashboard_query_reads_metrics_the_worker_defines() -> None:
    defined = sample_names()
    for title, expr in dashboard_exprs():
        used = set(re.findall(r"\bchangeflow_[a-z_]+", expr))
        assert used, f"{title!r} reads no changeflow metric: {expr}"
        assert used <= defined, f"{title!r} reads undefined {sorted(used - defined)}"
        assert expr.count("(") == expr.count(")"), f"{title!r}: unbalanced parentheses in {expr}"
        # Label matchers and `by` clauses only name labels the metric has.
        for clause in re.findall(r"by \(([^)]*)\)", expr):
            assert {lbl.strip() for lbl in clause.split(",")} <= {"sink", "entity", "kind", "topic", "result", "le"}


def test_dashboard_covers_throughput_lag_errors_and_freshness_quantiles() -> None:
    exprs = "\n".join(e for _, e in dashboard_exprs())
    assert "rate(changeflow_sink_events_out_total" in exprs
    assert "changeflow_sink_consumer_lag" in exprs
    assert "changeflow_sink_errors_total" in exprs
    for q in ("0.5", "0.95", "0.99"):
        assert f"histogram_quantile({q}, sum by (le, sink) (rate(changeflow_freshness_seconds_bucket" in exprs


def test_families_reported_by_a_sink_process_merge_into_one_exposition(sink: str) -> None:
    """Each sink runs in its own process and reports its families; /metrics shows them beside the decode
    process's own, one family each (a repeated HELP/TYPE would make Prometheus reject the scrape)."""
    from prometheus_client import CollectorRegistry, Counter, Histogram

    child = CollectorRegistry()
    Counter("changeflow_sink_events_out", "doc", ["sink", "entity"], registry=child).labels(
        sink=sink, entity="products").inc(7)
    Histogram("changeflow_sink_batch_size", "doc", ["sink"], buckets=metrics.BATCH_SIZE_BUCKETS,
              registry=child).labels(sink=sink).observe(3)
    metrics.count_decoded({(f"{sink}.raw", "record"): 2})
    metrics.absorb(f"sink-{sink}", list(child.collect()))

    text = metrics.exposition().decode()
    families = [f for f in text_string_to_metric_families(text)]
    names = [f.name for f in families]
    assert len(names) == len(set(names))
    assert text.count("# TYPE changeflow_sink_events_out") == 1
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families for s in f.samples}
    assert samples[("changeflow_sink_events_out_total", (("entity", "products"), ("sink", sink)))] == 7
    assert samples[("changeflow_sink_batch_size_count", (("sink", sink),))] == 1
    assert samples[("changeflow_decode_total", (("result", "record"), ("topic", f"{sink}.raw")))] == 2

    # A later report replaces the earlier one (counters are cumulative in the child).
    Counter("changeflow_sink_dead_letters", "doc", ["sink"], registry=child).labels(sink=sink).inc()
    metrics.absorb(f"sink-{sink}", list(child.collect()))
    assert f'changeflow_sink_dead_letters_total{{sink="{sink}"}} 1.0' in metrics.exposition().decode()
    series = f'changeflow_sink_events_out_total{{entity="products",sink="{sink}"}}'
    assert metrics.exposition().decode().count(series) == 1


def test_observe_many_counts_exactly_as_observe() -> None:
    """The batched freshness observation counts what observe() would, bucket by bucket, at the bounds too."""
    import random

    from prometheus_client import CollectorRegistry, Histogram

    from changeflow.metrics import observe_many

    registry = CollectorRegistry()
    one = Histogram("one", "x", buckets=(0.05, 0.1, 0.25, 1.0, 5.0), registry=registry)
    many = Histogram("many", "x", buckets=(0.05, 0.1, 0.25, 1.0, 5.0), registry=registry)
    rng = random.Random(3)
    amounts = [0.0, 0.05, 0.1, 0.25, 1.0, 5.0, 5.0001, 1e9] + [rng.uniform(0, 7) for _ in range(500)]
    for a in amounts:
        one.observe(a)
    observe_many(many, amounts[:100])
    observe_many(many, amounts[100:])
    observe_many(many, [])

    def samples(name: str) -> list[tuple[str, dict[str, str], float]]:
        return [(s.name.removeprefix(name), s.labels, round(s.value, 9))
                for m in registry.collect() if m.name == name for s in m.samples if not s.name.endswith("_created")]

    def counts(name: str) -> list[tuple[str, dict[str, str], float]]:
        return [s for s in samples(name) if s[0] != "_sum"]

    assert counts("one") == counts("many")  # every bucket and the count, exactly
    assert registry.get_sample_value("many_count") == len(amounts)
    # the sum, up to float rounding (added as one batch, not value by value)
    assert registry.get_sample_value("many_sum") == pytest.approx(registry.get_sample_value("one_sum"), rel=1e-12)
