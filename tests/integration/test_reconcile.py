"""`changeflow reconcile` against the live stack: corrupt each derived store behind the pipeline's back,
see exactly those keys reported with the right kind, and `--repair` put them right.

Other tests run against the same stores, so assertions look only at this test's own keys (its own
products plus one stray key no source row can have), and the repair is limited to those keys.
"""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import psycopg
import pytest
import redis

from changeflow.pipelines.load import load
from changeflow.settings import Settings
from changeflow.sinks.clickhouse import client_for
from tests.integration.conftest import eventually, redis_url, search_url

N = 5
VERSIONS_KEY = f"{load().namespace}:versions"  # the Redis store's version hash
BOGUS_VERSION = 2**62  # beyond any WAL position this database will reach


def cli(*args: str) -> tuple[int, dict[str, Any]]:
    done = subprocess.run(
        [sys.executable, "-m", "changeflow", "reconcile", "--entity", "products", "--format", "json", *args],
        capture_output=True, text=True, timeout=300,
    )
    assert done.stdout.strip(), done.stderr
    return done.returncode, orjson.loads(done.stdout)


def own_diffs(run: dict[str, Any], keys: set[str]) -> set[tuple[str, str, str]]:
    return {(r["store"], d["key"], d["kind"]) for r in run["results"] for d in r["diffs"] if d["key"] in keys}


@pytest.fixture
def products(pipeline: Settings, sku_prefix: str) -> Iterator[list[dict[str, Any]]]:
    with psycopg.connect(pipeline.pg_dsn, autocommit=True) as conn:
        rows = conn.execute(
            "INSERT INTO products (sku, name, description, category, price_cents, stock, internal_notes) "
            "SELECT %s || '-' || g, 'reconcile lamp ' || g, 'A lamp', 'lighting', 1000 + g, g, 'secret' "
            "FROM generate_series(1, %s) g RETURNING id, sku",
            (sku_prefix, N),
        ).fetchall()
    made = [{"id": str(i), "sku": s} for i, s in rows]
    yield made
    with psycopg.connect(pipeline.pg_dsn, autocommit=True) as conn:
        conn.execute("DELETE FROM products WHERE sku LIKE %s", (sku_prefix + "-%",))
    # Should the test stop before its repair: a bogus version would outlive the delete.
    ch = client_for(pipeline)
    ch.command("ALTER TABLE changeflow.products DELETE WHERE id IN {i:Array(Int64)} AND _version >= {v:UInt64} "
               "SETTINGS mutations_sync = 2", parameters={"i": [int(i) for i, _ in rows], "v": BOGUS_VERSION})
    ch.close()


@pytest.fixture
def stray(pipeline: Settings) -> Iterator[str]:
    """A product key no source row can have (product ids are positive)."""
    key = str(-int(uuid.uuid4().int % 10**12) - 1)
    yield key
    redis.Redis.from_url(redis_url(pipeline)).delete(f"product:{key}")


def test_reconcile_reports_exactly_the_corrupted_keys_and_repair_fixes_them(
    pipeline: Settings, products: list[dict[str, Any]], stray: str
) -> None:
    s = pipeline
    ids = [p["id"] for p in products]
    r = redis.Redis.from_url(redis_url(s))
    http = httpx.Client(base_url=search_url(s), timeout=30)
    ch = client_for(s)

    def everywhere() -> bool:
        in_redis = all(r.exists(f"product:{i}") for i in ids)
        http.post("/products/_refresh")
        in_search = all(http.get(f"/products/_doc/{i}").json().get("found") for i in ids)
        in_ch = ch.command(
            "SELECT count() FROM changeflow.products FINAL WHERE _is_deleted = 0 AND id IN {ids:Array(Int64)}",
            parameters={"ids": [int(i) for i in ids]},
        )
        return in_redis and in_search and int(in_ch) == N

    eventually(everywhere, timeout=90, what="the new products in every store")

    # A stale Redis copy: the source moves on, Redis gets its previous (genuine) image and version back.
    stale_id = ids[4]
    old_value, old_version = r.get(f"product:{stale_id}"), r.hget(VERSIONS_KEY, f"product:{stale_id}")
    with psycopg.connect(s.pg_dsn, autocommit=True) as conn:
        conn.execute("UPDATE products SET name = 'renamed lamp', updated_at = now() WHERE id = %s", (int(stale_id),))
    eventually(lambda: b"renamed lamp" in (r.get(f"product:{stale_id}") or b""), timeout=60, what="the rename")
    eventually(lambda: int(ch.command(
        "SELECT count() FROM changeflow.changelog WHERE entity = 'products' AND key = {k:String}",
        parameters={"k": stale_id})) >= 2, timeout=60, what="the rename in the changelog")
    assert isinstance(old_value, bytes) and isinstance(old_version, bytes)
    r.set(f"product:{stale_id}", old_value)
    r.hset(VERSIONS_KEY, f"product:{stale_id}", old_version)

    # 1. a Redis value deleted behind the pipeline (its version entry still says "applied").
    r.delete(f"product:{ids[0]}")
    # 2. a search document altered (the engine bumps its version; the pipeline never wrote that content).
    doc = http.get(f"/products/_doc/{ids[1]}").json()
    altered = {**doc["_source"], "name": "tampered name", "price": "0.01"}
    http.put(f"/products/_doc/{ids[1]}", params={"version": doc["_version"] + 1, "version_type": "external",
                                                   "refresh": "true"}, json=altered).raise_for_status()
    # 3. a ClickHouse row removed; 4. a bogus ClickHouse version beyond any source position, other content
    # (a snapshot read could never outrank it: the repair has to drop it first).
    ch.command("ALTER TABLE changeflow.products DELETE WHERE id = {i:Int64} SETTINGS mutations_sync = 2",
               parameters={"i": int(ids[2])})
    row = ch.query("SELECT * EXCEPT (_ingested_at) FROM changeflow.products FINAL WHERE id = {i:Int64}",
                   parameters={"i": int(ids[3])})
    bogus = dict(zip(row.column_names, row.result_rows[0], strict=True))
    bogus.update(stock=99999, _version=BOGUS_VERSION)
    ch.insert("changeflow.products", [list(bogus.values())], column_names=list(bogus))
    # 5. a stray key no source row can have.
    r.set(f"product:{stray}", orjson.dumps({"id": int(stray), "sku": "stray", "name": "stray"}))

    own = {*ids, stray}
    expected = {
        ("redis", ids[0], "missing"),
        ("search", ids[1], "mismatched"),
        ("clickhouse", ids[2], "missing"),
        ("clickhouse", ids[3], "mismatched"),
        ("redis", stray, "extra"),
        ("redis", stale_id, "stale"),
    }
    code, run = cli("--full", "--settle", "1")
    assert code == 1
    assert own_diffs(run, own) == expected
    details = {(r_["store"], d["key"]): d["detail"] for r_ in run["results"] for d in r_["diffs"] if d["key"] in own}
    assert "says applied" in details[("redis", ids[0])]
    assert "name: source=reconcile lamp 2 store=tampered name" in details[("search", ids[1])]
    assert "stock: source=4 store=99999" in details[("clickhouse", ids[3])]
    assert "name: source=renamed lamp store=reconcile lamp 5" in details[("redis", stale_id)]

    runs = ch.query(
        "SELECT store, source_count, store_count, missing, stale, mismatched FROM changeflow.reconciliation_runs "
        "WHERE run_id = {r:String} AND entity = 'products' ORDER BY store", parameters={"r": run["run_id"]},
    ).result_rows
    assert [x[0] for x in runs] == ["clickhouse", "redis", "search"]
    by_store = {x[0]: x for x in runs}
    for res in run["results"]:
        assert by_store[res["store"]][1:] == (res["source_count"], res["store_count"], res["missing"],
                                             res["stale"], res["mismatched"])
    stored = set(ch.query(
        "SELECT store, key, kind FROM changeflow.reconciliation_diffs "
        "WHERE run_id = {r:String} AND key IN {k:Array(String)}",
        parameters={"r": run["run_id"], "k": sorted(own)},
    ).result_rows)
    assert stored == expected

    # Repair only this test's keys (others' drift belongs to their tests), then check everything again.
    keys = [a for k in sorted(own) for a in ("--key", k)]
    code, repaired = cli("--repair", "--settle", "1", "--timeout", "120", *keys)
    assert repaired["repair"]["deleted_strays"] == {"products/redis": [stray]}
    assert repaired["repair"]["snapshot_keys"] == {"products": N}
    assert repaired["repair"]["pending"] == []
    assert repaired["repair"]["dropped_future_versions"] == [f"products/clickhouse/{ids[3]}"]
    assert own_diffs(repaired["after_repair"], own) == set()
    assert code == 0

    code, again = cli("--full", "--settle", "1")
    assert own_diffs(again, own) == set()
    # What a user checks in each store.
    assert orjson.loads(r.get(f"product:{ids[0]}") or b"{}")["name"] == "reconcile lamp 1"
    assert orjson.loads(r.get(f"product:{stale_id}") or b"{}")["name"] == "renamed lamp"
    assert r.get(f"product:{stray}") is None
    assert http.get(f"/products/_doc/{ids[1]}").json()["_source"]["name"] == "reconcile lamp 2"
    assert ch.query("SELECT stock FROM changeflow.products FINAL WHERE id IN {i:Array(Int64)} ORDER BY id",
                    parameters={"i": [int(ids[2]), int(ids[3])]}).result_rows == [(3,), (4,)]
    ch.close()
    http.close()


def test_reconcile_rejects_unknown_entity() -> None:
    done = subprocess.run([sys.executable, "-m", "changeflow", "reconcile", "--entity", "widgets"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "unknown entity 'widgets'" in done.stderr
