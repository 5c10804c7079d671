"""`changeflow bench` end to end at a small size: every figure present, positive and consistent, nothing left behind.

No timing assertions: the figures depend on the machine and on what else runs on it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx
import psycopg
from confluent_kafka.admin import AdminClient

from changeflow.settings import Settings
from changeflow.sinks.clickhouse import client_for
from tests.integration.conftest import search_url

CHANGES = 3000
SNAPSHOT_ROWS = 2000
RATES = (100, 300)


def test_bench_quick_small(pipeline: Settings, tmp_path: Path) -> None:
    chart = tmp_path / "bench.png"
    proc = subprocess.run(
        [sys.executable, "-m", "changeflow", "bench", "--quick", "--format", "json", "--chart", str(chart),
         "--changes", str(CHANGES), "--snapshot-rows", str(SNAPSHOT_ROWS), "--freshness-seconds", "2",
         "--rates", ",".join(map(str, RATES)), "--naive-seconds", "2"],
        capture_output=True, text=True, timeout=540, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)

    for key in ("throughput_changes_per_s", "naive_changes_per_s", "ceiling_changes_per_s", "ratio_vs_naive",
                "ratio_vs_ceiling", "snapshot_rows_per_s"):
        assert isinstance(result[key], float | int) and result[key] > 0, (key, result[key])
    assert result["ratio_vs_naive"] == round(result["throughput_changes_per_s"] / result["naive_changes_per_s"], 3)
    assert result["ratio_vs_ceiling"] == round(result["throughput_changes_per_s"] / result["ceiling_changes_per_s"], 3)
    assert {"cpus", "cpu_model", "date", "python"} <= set(result["machine"])

    backlog = result["backlog"]
    assert backlog["changes"] == CHANGES
    assert backlog["ceiling_changes"] == CHANGES
    assert backlog["complete"]
    assert backlog["applied"] == {"redis": CHANGES, "search": CHANGES, "clickhouse": CHANGES}
    # CPU per change per process: decode, each sink, the stack's servers, and changeflow's own sum.
    cpu = backlog["cpu_us_per_change"]
    assert {"decode", "sink:redis", "sink:search", "sink:clickhouse", "kafka", "changeflow"} <= set(cpu), cpu
    own = sum(cpu[k] for k in ("decode", "sink:redis", "sink:search", "sink:clickhouse"))
    assert abs(cpu["changeflow"] - own) < 0.5, cpu  # each figure is rounded to 0.1 µs
    # /proc counts CPU in clock ticks (10 ms here): at 3,000 changes one tick is 3.3 µs a change, so a sink that
    # used less than a tick reads 0 (seen once in a fresh-clone run); changeflow's total over its processes is
    # what must be there.
    assert all(v >= 0 for k, v in cpu.items() if k == "decode" or k.startswith("sink:")), cpu
    assert cpu["changeflow"] > 0, cpu
    assert backlog["ceiling_cpu_us_per_change"] > 0
    # End to end cannot be faster than its slowest stage.
    slowest = min(backlog["decode_stage_changes_per_s"], *backlog["per_sink_changes_per_s"].values())
    assert backlog["throughput_changes_per_s"] <= slowest

    assert set(result["freshness_ms"]) == {f"{r}_per_s" for r in RATES}
    for load, stores in result["freshness_ms"].items():
        detail = result["freshness"][load]
        for store in ("redis", "search", "clickhouse"):
            q = stores[store]
            assert 0 < q["p50"] <= q["p95"] <= q["p99"], (load, store, q)
            assert detail[store]["seen"] + detail[store]["unseen"] == detail["rows"]
        assert detail["stages"]["commit_to_raw_topic"]["rows"] > 0

    snapshot = result["snapshot"]
    assert snapshot["complete"]
    assert snapshot["visible"] == {"redis": SNAPSHOT_ROWS, "search": SNAPSHOT_ROWS, "clickhouse": SNAPSHOT_ROWS}
    assert result["snapshot_rows_per_s"] == min(snapshot["per_store_rows_per_s"].values())

    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # Everything the run created is gone: topics, consumer groups, connector, slot, databases, indexes, tables,
    # the freshness rows in commerce.products.
    run = result["run_id"]
    admin = AdminClient({"bootstrap.servers": pipeline.kafka_bootstrap})
    # bench-<run>-...: raw topics, naive groups; bench_<run>_<stage>...: the names of each stage's pipeline.
    ours = (f"bench-{run}", f"bench_{run}_")
    assert not [t for t in admin.list_topics(timeout=15).topics if any(o in t for o in ours)]
    groups = admin.list_consumer_groups(request_timeout=15).result().valid
    assert not [g.group_id for g in groups if g.group_id.startswith(ours)]
    assert f"bench-{run}-snapshot" not in httpx.get(f"{pipeline.connect_url}/connectors", timeout=10).json()
    assert httpx.get(f"{search_url(pipeline)}/_cat/indices/bench-{run}-*?format=json", timeout=10).json() == []
    with psycopg.connect(pipeline.pg_dsn) as conn:
        assert conn.execute("SELECT count(*) FROM pg_replication_slots WHERE slot_name = %s",
                            (f"bench_{run}",)).fetchone() == (0,)
        assert conn.execute("SELECT count(*) FROM pg_database WHERE datname = %s", (f"bench_{run}",)).fetchone() == (0,)
        assert conn.execute("SELECT count(*) FROM products WHERE sku LIKE %s",
                            (f"BENCH{run.upper()}-%",)).fetchone() == (0,)
    ch = client_for(pipeline)
    try:
        assert ch.command(f"SELECT count() FROM system.databases WHERE name LIKE 'bench_{run}%'") == 0
    finally:
        ch.close()
