"""The pure half of reconciliation: one comparable form for every side, bucketed checksums, diff kinds."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal

import orjson
import pytest

from changeflow.pipelines.load import load, resolve_secret
from changeflow.pipelines.transform import compile_entity
from changeflow.pipelines.types import ColumnType, parse_type
from changeflow.reports.reconcile import (
    Diff,
    Run,
    StoreResult,
    bucket_checksums,
    bucket_of,
    classify_content,
    comparable_row,
    diff_keys,
    key_filter,
    normalise_value,
    plan_repair,
    row_digest,
    snapshot_signals,
    source_row,
)
from changeflow.schemas import json
from changeflow.sinks.clickhouse import to_column

COMMERCE = load()
BASE = COMMERCE.path.parent if COMMERCE.path else None
PRODUCTS = compile_entity(COMMERCE.entity("products"), BASE, resolve_secret)
ORDERS = compile_entity(COMMERCE.entity("orders"), BASE, resolve_secret)


def types(**columns: str) -> dict[str, ColumnType]:
    return {name: parse_type(t) for name, t in columns.items()}


# The canonical column types, as the schema topic carries them for the commerce entities.
PRODUCT_TYPES = types(id="int64", sku="string", name="string", description="string", category="string",
                      price="decimal(12,2)", stock="int32", updated_at="timestamptz")
ORDER_TYPES = types(id="uuid", user_id="string", status="string", total_amount="decimal(12,2)", items="json",
                    created_at="timestamptz", updated_at="timestamptz")
CET = timezone(timedelta(hours=1))


def product_pg_row() -> dict[str, object]:
    """A products row as psycopg returns it (session time zone CET)."""
    return {
        "id": 42, "sku": "SKU-42", "name": "lamp", "description": None, "category": "lighting",
        "price_cents": 1250, "stock": 7, "internal_notes": "margin 12%",
        "updated_at": datetime(2026, 1, 2, 4, 5, 6, 789000, tzinfo=CET),
    }


def order_pg_row() -> dict[str, object]:
    return {
        "id": uuid.UUID("53787f1a-87a6-4a8a-bb8b-ed7bb6416fa5"), "user_id": "u1", "status": "pending",
        "total_amount": Decimal("12.50"), "items": [{"sku": "A", "qty": 1}],
        "created_at": datetime(2026, 1, 1, tzinfo=UTC), "updated_at": datetime(2026, 1, 1, 0, 0, 1, tzinfo=UTC),
    }


def canonical_product() -> dict[str, object]:
    row = source_row(product_pg_row(), PRODUCTS)
    assert row is not None
    return row


def canonical_order() -> dict[str, object]:
    row = source_row(order_pg_row(), ORDERS)
    assert row is not None
    return row


def test_source_row_uses_the_stream_transform() -> None:
    row = canonical_product()
    assert "internal_notes" not in row and "price_cents" not in row
    assert row["price"] == Decimal("12.50")
    assert row["updated_at"] == datetime(2026, 1, 2, 3, 5, 6, 789000, tzinfo=UTC)
    assert canonical_order()["id"] == "53787f1a-87a6-4a8a-bb8b-ed7bb6416fa5"


def test_every_store_representation_of_a_product_compares_equal_to_the_source() -> None:
    canonical = canonical_product()
    expected = comparable_row(canonical, PRODUCT_TYPES)
    redis_value = orjson.loads(json.dumps(canonical))  # what the Redis sink SETs
    search_source = json.loads(json.dumps(canonical))  # what the search sink indexes
    clickhouse_row = {  # as the store gives it back: typed columns, naive UTC datetimes, its bookkeeping left out
        "id": 42, "sku": "SKU-42", "name": "lamp", "description": None, "category": "lighting",
        "price": Decimal("12.50"), "stock": 7, "updated_at": datetime(2026, 1, 2, 3, 5, 6, 789000),
    }
    assert comparable_row(redis_value, PRODUCT_TYPES) == expected
    assert comparable_row(search_source, PRODUCT_TYPES) == expected
    assert comparable_row(clickhouse_row, PRODUCT_TYPES) == expected
    assert expected == {
        "id": 42, "sku": "SKU-42", "name": "lamp", "category": "lighting", "price": "12.5", "stock": 7,
        "updated_at": "2026-01-02T03:05:06.789000+00:00",
    }


def test_order_json_column_compares_structurally_whatever_the_key_order() -> None:
    canonical = canonical_order()
    expected = comparable_row(canonical, ORDER_TYPES)
    as_clickhouse = {k: to_column(v, ORDER_TYPES.get(k)) for k, v in canonical.items()}  # items as JSON text
    as_clickhouse["items"] = '[{"qty":1,"sku":"A"}]'
    assert comparable_row(as_clickhouse, ORDER_TYPES) == expected
    assert comparable_row(orjson.loads(json.dumps(canonical)), ORDER_TYPES) == expected


@pytest.mark.parametrize(
    ("value", "column_type", "expected"),
    [
        (Decimal("12.50"), "decimal(12,2)", "12.5"),
        ("12.5", "decimal(12,2)", "12.5"),
        (Decimal("100"), "decimal(12,2)", "100"),
        (Decimal("0.00"), "decimal(12,2)", "0"),
        ("0.1", "decimal(12,2)", "0.1"),
        ("2026-01-01T00:00:00+00:00", "timestamptz", "2026-01-01T00:00:00.000000+00:00"),
        (datetime(2026, 1, 1, 1, tzinfo=CET), "timestamptz", "2026-01-01T00:00:00.000000+00:00"),
        ("7", "int32", 7),
        (7, None, "7"),
        ("7", None, "7"),
        ({"b": 1, "a": 2}, None, '{"a":2,"b":1}'),
        ('{"b":1,"a":2}', None, '{"a":2,"b":1}'),
        ('"12.50"', None, "12.50"),
        (Decimal("12.50"), None, "12.50"),
        ("plain text", None, "plain text"),
        (None, "string", None),
        ("not a number", "decimal(12,2)", "<unparsable 'not a number'>"),
    ],
)
def test_normalise_value(value: object, column_type: str | None, expected: object) -> None:
    assert normalise_value(value, parse_type(column_type) if column_type else None) == expected


def test_null_and_absent_fields_are_the_same_content() -> None:
    assert comparable_row({"id": 1, "description": None}, PRODUCT_TYPES) == {"id": 1}


def test_digest_changes_with_any_field_and_not_with_order() -> None:
    a = {"id": 1, "name": "lamp", "price": "12.5"}
    assert row_digest(a) == row_digest(dict(reversed(list(a.items()))))
    assert row_digest(a) != row_digest({**a, "price": "12.6"})


def test_buckets_are_key_ranges() -> None:
    assert bucket_of("5", numeric=True) == "0..1023"
    assert bucket_of("2048", numeric=True) == "2048..3071"
    assert bucket_of("-3", numeric=True) == "-1024..-1"
    assert bucket_of("53787F1A-87a6", numeric=False) == "53*"


def test_bucket_checksum_sees_swapped_contents() -> None:
    left = {"1": 111, "2": 222}
    swapped = {"1": 222, "2": 111}
    assert bucket_checksums(left, True)["0..1023"][0] == 2
    assert bucket_checksums(left, True) != bucket_checksums(swapped, True)


def test_diff_keys_only_examines_differing_buckets() -> None:
    source = {str(i): i for i in range(5000)}
    store = dict(source)
    del store["10"]  # missing in store
    store["4000"] = -1  # content differs
    store["-5"] = 5  # stray
    d = diff_keys(source, store, numeric=True)
    assert d.missing_in_store == ["10"]
    assert d.content_differs == ["4000"]
    assert d.missing_in_source == ["-5"]
    assert d.differing_buckets == ["-1024..-1", "0..1023", "3072..4095"]
    assert d.buckets == 6


def test_identical_sides_have_no_differing_bucket() -> None:
    source = {uuid.uuid4().hex: i for i in range(300)}
    d = diff_keys(source, dict(source), numeric=False)
    assert (d.differing_buckets, d.missing_in_store, d.missing_in_source, d.content_differs) == ([], [], [], [])


SOURCE = {"id": 1, "name": "renamed", "price": "12.5"}
OLD = {"id": 1, "name": "lamp", "price": "12.5"}


def test_a_genuine_older_image_is_stale() -> None:
    kind, detail = classify_content(SOURCE, OLD, 100, {100: OLD, 200: SOURCE}, [200])
    assert kind == "stale"
    assert detail == "holds the pipeline's image at version 100, 200 is newer; name: source=renamed store=lamp"


def test_the_newest_image_while_the_source_moved_on_is_stale_in_flight() -> None:
    kind, detail = classify_content(SOURCE, OLD, 100, {100: OLD}, [])
    assert kind == "stale"
    assert detail.startswith("holds the pipeline's newest image (version 100): the source's latest change")


def test_behind_another_current_store_is_stale_even_without_changelog() -> None:
    kind, detail = classify_content(SOURCE, OLD, 100, {}, [200])
    assert kind == "stale" and detail.startswith("version 100 behind 200 in another store")


def test_content_the_pipeline_never_wrote_is_mismatched() -> None:
    tampered = {**SOURCE, "price": "0.01"}
    kind, detail = classify_content(SOURCE, tampered, 201, {100: OLD, 200: SOURCE}, [200])
    assert kind == "mismatched"
    assert detail == "version 201 but content the pipeline never wrote there; price: source=12.5 store=0.01"
    # Same version as the changelog's but other content: altered behind the pipeline's back.
    assert classify_content(SOURCE, tampered, 200, {200: SOURCE}, [200])[0] == "mismatched"


def test_repair_plan_snapshots_source_keys_and_deletes_strays() -> None:
    run = Run("r", datetime.now(UTC), "full", [
        StoreResult("products", "redis", 3, 3, "full", diffs=[Diff("1", "missing", ""), Diff("-9", "extra", "")]),
        StoreResult("products", "search", 3, 3, "full", diffs=[Diff("1", "mismatched", ""), Diff("2", "stale", "")]),
    ], {})
    plan = plan_repair(run)
    assert plan.snapshot == {"products": ["1", "2"]}
    assert plan.strays == {("products", "redis"): ["-9"]}
    assert plan.pairs == {("products", "redis", "1"), ("products", "search", "1"), ("products", "search", "2")}


def test_drift_limit_is_per_store() -> None:
    results = [StoreResult("products", s, 1, 1, "full", diffs=[Diff("1", "missing", "")]) for s in ("redis", "search")]
    run = Run("r", datetime.now(UTC), "full", results, {})
    assert run.drift_exceeds(0) and not run.drift_exceeds(1)
    unreachable = Run("r", datetime.now(UTC), "full", [StoreResult("products", "redis", 1, 0, "full", error="x")], {})
    assert unreachable.drift_exceeds(5)
    assert run.results[0].as_dict()["missing_in_store"] == 1


def test_repair_signals_are_chunked_to_fit_and_select_exactly_the_keys() -> None:
    keys = [str(i) for i in range(10_000)]
    signals = [orjson.loads(s) for s in snapshot_signals(None, "public.products", ["id"], keys, numeric=True)]
    assert len(signals) > 1 and all(len(orjson.dumps(s)) <= 60_000 for s in signals)
    conditions = [s["additional-conditions"][0]["filter"] for s in signals]
    assert sum(c.count(",") + 1 for c in conditions) == len(keys)
    assert signals[0]["data-collections"] == ["public.products"]
    assert key_filter(["a", "b"], ['["x","y\'z"]'], numeric=False).as_string(None) == (
        """("a"::text, "b"::text) IN (('x', 'y''z'))""")


def test_timetz_compares_by_its_utc_instant_as_debezium_sends_it() -> None:
    from datetime import time, timedelta, timezone

    from changeflow.reports.reconcile.normalise import _as_time

    assert _as_time(time(10, 0, tzinfo=timezone(timedelta(hours=2)))) == _as_time("08:00:00Z")
    assert _as_time(time(1, 0, tzinfo=timezone(timedelta(hours=2)))) == _as_time("23:00:00Z")
    assert _as_time("23:59:59.999999") == "23:59:59.999999"


def test_nan_and_infinity_compare_as_the_json_stores_null() -> None:
    from changeflow.pipelines.types import parse_type
    from changeflow.reports.reconcile.normalise import normalise_value

    t = parse_type("float64")
    assert normalise_value(float("nan"), t) is None and normalise_value(float("-inf"), t) is None
    assert normalise_value(None, t) is None and normalise_value(1.5, t) == 1.5


def test_a_source_column_named_like_a_stores_own_is_compared_like_any_other() -> None:
    """Issue 20 §5: stores give rows back under the source's names, so `_version` is content, not bookkeeping."""
    types = {"id": PRODUCT_TYPES["id"], "_version": PRODUCT_TYPES["stock"]}
    assert comparable_row({"id": 1, "_version": 7}, types) == {"id": 1, "_version": 7}
    assert comparable_row({"id": 1, "_version": 7}, types) != comparable_row({"id": 1, "_version": 8}, types)
