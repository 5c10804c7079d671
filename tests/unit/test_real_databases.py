"""Issue 24's pure parts: partitioned tables in check and prepare, tables nobody captures, NULL against empty
per store, float32 values as the source prints them, the report views' preconditions, and ``init`` beside
``CHANGEFLOW_PIPELINE``. The same paths run against the real stack in tests/integration/test_real_databases.py."""

from __future__ import annotations

import os
import random
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from changeflow import schemas
from changeflow.connectors.prepare import script
from changeflow.pipelines.catalog import Catalog, Column, Table
from changeflow.pipelines.check import check, uncaptured
from changeflow.pipelines.load import load, parse
from changeflow.pipelines.types import parse_type
from changeflow.reports.objects import finance_entities_present
from changeflow.reports.reconcile.normalise import comparable_row, fold_empty, normalise_value
from changeflow.schemas import float32_shortest, make_version
from tests.unit.test_codec import fastavro_only

REPO = Path(__file__).resolve().parents[2]
HEAD = "name: shop\nsources:\n  postgres:\n    database: shop\nentities:\n"
PAYMENT_COLUMNS = (Column("id", "uuid", nullable=False), Column("paid_at", "timestamp with time zone", nullable=False),
                   Column("amount", "numeric(12,2)"))


def shop(publication_via_root: bool | None) -> Catalog:
    tables = [
        Table("public", "payments", PAYMENT_COLUMNS, ("id", "paid_at"), partitioned=True),
        Table("public", "orders", (Column("id", "uuid"),), ("id",)),
        Table("public", "audit", (Column("at", "timestamp with time zone"),)),
        Table("public", "shop_signal", (Column("id", "text"),), ("id",)),
        Table("public", "shop_heartbeat", (Column("id", "integer"),), ("id",)),
    ]
    partitions = {("public", "payments_2026_01"): ("public", "payments"),
                  ("public", "payments_default"): ("public", "payments")}
    return Catalog("shop", ("public",), {(t.schema, t.name): t for t in tables}, partitions, publication_via_root)


def problems(entities: str, publication_via_root: bool | None = True) -> list[str]:
    return [str(p) for p in check(parse(HEAD + entities, "shop.yml"), shop(publication_via_root))]


def test_a_partitioned_table_captured_through_its_root_is_one_entity() -> None:
    assert problems("  payments:\n    table: public.payments\n") == []
    assert problems("  payments:\n    table: public.payments\n", publication_via_root=None) == []  # made by apply


def test_an_entity_naming_a_partition_is_refused_with_the_root_to_capture() -> None:
    assert problems("  payments:\n    table: public.payments_2026_01\n") == [
        "entities.payments.table: public.payments_2026_01 is a partition of public.payments: its changes are "
        "published under public.payments's name, so this entity would get none after the snapshot; capture the "
        "partitioned table itself: `table: public.payments`"]


def test_a_publication_without_publish_via_partition_root_is_refused_with_the_fix() -> None:
    assert problems("  payments:\n    table: public.payments\n  orders:\n    table: public.orders\n",
                    publication_via_root=False) == [
        "entities.payments.table: public.payments is partitioned and publication shop_pub publishes its "
        "partitions' changes under their own names, which the connector drops (every change after the snapshot "
        "lost); run `changeflow connectors apply` (it sets publish_via_partition_root = true), or ALTER "
        "PUBLICATION shop_pub SET (publish_via_partition_root = true)"]


def test_tables_no_entity_captures_are_listed_without_partitions_or_the_pipelines_own() -> None:
    pipeline = parse(HEAD + "  payments:\n    table: public.payments\n", "shop.yml")
    assert [t.qualified for t in uncaptured(pipeline, shop(True))] == ["public.audit", "public.orders"]
    both = parse(HEAD + "  payments:\n    table: public.payments\n  orders:\n    table: public.orders\n", "shop.yml")
    assert [t.qualified for t in uncaptured(both, shop(True))] == ["public.audit"]


def test_the_dbas_script_publishes_through_the_root() -> None:
    text = script(load())
    assert "WITH (publish_via_partition_root = true);" in text
    assert "SET (publish_via_partition_root = true);" in text


# --- NULL against empty, per store ---------------------------------------------------------------------
TYPES = {"id": parse_type("int64"), "tags": parse_type("array<string>"), "note": parse_type("string"),
         "doc": parse_type("json")}


@pytest.mark.parametrize(("source", "clickhouse"), [
    ({"id": 1, "tags": None}, {"id": 1, "tags": []}),
    ({"id": 1, "tags": []}, {"id": 1, "tags": []}),
    ({"id": 1}, {"id": 1, "tags": []}),
])
def test_a_null_array_equals_an_empty_one_only_for_a_store_that_cannot_tell_them_apart(
        source: dict[str, object], clickhouse: dict[str, object]) -> None:
    folded = frozenset({"array"})
    src, held = comparable_row(source, TYPES), comparable_row(clickhouse, TYPES)
    assert fold_empty(src, TYPES, folded) == fold_empty(held, TYPES, folded) == {"id": 1}
    if source.get("tags") is None:
        assert src != held  # a store that keeps NULL apart from [] (Redis, search) is still held to it


def test_folding_keeps_everything_else() -> None:
    folded = frozenset({"array"})
    row = comparable_row({"id": 1, "tags": ["a"], "note": "", "doc": []}, TYPES)
    assert fold_empty(row, TYPES, folded) == row  # a non-empty array, an empty string, an empty JSON array
    assert fold_empty({"id": 1, "tags": []}, TYPES, frozenset()) == {"id": 1, "tags": []}


def test_the_clickhouse_store_says_which_kinds_it_cannot_keep_null() -> None:
    from changeflow.sinks.clickhouse import ClickHouseStore
    from changeflow.sinks.redis import RedisStore
    from changeflow.sinks.search import SearchStore

    assert ClickHouseStore.null_is_empty == frozenset({"array"})
    assert getattr(RedisStore, "null_is_empty", frozenset()) == frozenset()
    assert getattr(SearchStore, "null_is_empty", frozenset()) == frozenset()


# --- float32 ---------------------------------------------------------------------------------------------
def widened(value: float) -> float:
    return float(struct.unpack("<f", struct.pack("<f", value))[0])


@pytest.mark.parametrize(("value", "shortest"), [
    (21.35, 21.35), (0.1, 0.1), (1.0, 1.0), (-0.0, -0.0), (16777217.0, 16777216.0),
    (3.4028234663852886e38, 3.4028235e38), (1.17549435e-38, 1.1754944e-38), (1e-45, 1e-45), (0.15, 0.15),
])
def test_float32_values_read_as_postgresql_prints_them(value: float, shortest: float) -> None:
    assert repr(float32_shortest(widened(value))) == repr(shortest)


def test_float32_shortest_is_the_same_float32_for_random_bit_patterns() -> None:
    rng = random.Random(24)
    for _ in range(20_000):
        bits = rng.getrandbits(32)
        value = struct.unpack("<f", bits.to_bytes(4, "little"))[0]
        out = float32_shortest(value)
        if value != value:  # NaN stays NaN
            assert out != out
            continue
        assert struct.pack("<f", out) == struct.pack("<f", value), (bits, value, out)
        assert len(repr(out)) <= len(repr(value))


def test_non_finite_and_out_of_range_values_are_left_as_they_are() -> None:
    assert float32_shortest(float("inf")) == float("inf")
    assert float32_shortest(1e300) == 1e300


def test_a_real_column_decodes_as_the_source_wrote_it_on_both_codec_paths() -> None:
    sv = make_version("prices", 1, {"id": parse_type("int64"), "price": parse_type("float32"),
                                    "prices": parse_type("array<float32>")}, ("id",))
    record = {"source": "postgres", "entity": "prices", "key": "1", "op": "c", "version": 1, "ts_ms": 0,
              "before": None, "after": {"id": 1, "price": 21.35, "prices": [0.1, None, 21.35]},
              "present": None, "carried": None}
    data = schemas.encode(sv, record)
    lookup = {sv.fingerprint: sv}.get
    _, fast = schemas.decode(data, lookup)
    with fastavro_only(sv):
        _, reference = schemas.decode(data, lookup)
    assert fast["after"] == reference["after"] == {"id": 1, "price": 21.35, "prices": [0.1, None, 21.35]}


def test_reconcile_compares_a_real_at_float32_precision() -> None:
    t = parse_type("float32")
    assert normalise_value(21.35, t) == normalise_value(widened(21.35), t) == normalise_value("21.35", t) == 21.35
    assert normalise_value(21.35, t) != normalise_value(21.36, t)


# --- report views ----------------------------------------------------------------------------------------
def test_finance_views_apply_to_a_pipeline_with_orders_payments_and_refunds_in_its_own_database() -> None:
    assert finance_entities_present(load(), "clickhouse")
    without = parse(HEAD + "  orders:\n    table: public.orders\n", "shop.yml")
    assert not finance_entities_present(without, "clickhouse")
    elsewhere = parse(HEAD + "".join(
        f"  {n}:\n    table: public.{n}\n    stores: {{clickhouse: {{table: {n}_v2}}}}\n"
        for n in ("orders", "payments", "refunds")), "shop.yml")
    assert not finance_entities_present(elsewhere, "clickhouse")


# --- init beside CHANGEFLOW_PIPELINE ------------------------------------------------------------------------
def test_init_never_reads_the_pipeline_file_it_is_about_to_write(tmp_path: Path) -> None:
    target = tmp_path / "pipeline.yaml"
    env = {**os.environ, "CHANGEFLOW_PIPELINE": str(target)}
    result = subprocess.run([sys.executable, "-m", "changeflow", "init", "postgres", "not a dsn at all",
                             "-o", str(target)], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert "no such file" not in result.stderr
    assert result.stderr.startswith("error: not a PostgreSQL DSN"), result.stderr
    assert result.returncode == 1
    # Every other command still refuses a pipeline file that does not exist.
    other = subprocess.run([sys.executable, "-m", "changeflow", "pipeline", "check", "--offline"], cwd=REPO,
                           env=env, capture_output=True, text=True, timeout=60)
    assert other.returncode == 2 and f"pipeline file {target}: no such file" in other.stderr
