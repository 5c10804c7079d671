"""What the stores' write paths build by hand instead of through a client helper, checked value for value."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, cast

import orjson
import psycopg

from changeflow.pipelines.types import parse_type
from changeflow.sinks.clickhouse import ClickHouseStore
from changeflow.sinks.postgres import _row_rejection
from changeflow.sinks.search import bulk_body
from changeflow.streams.records import ChangeRecord

if TYPE_CHECKING:
    from changeflow.pipelines.spec import Pipeline
    from changeflow.settings import Settings


def test_each_action_is_one_line_and_a_delete_carries_no_document() -> None:
    body = bulk_body([
        {"_op_type": "index", "_index": "p", "_id": 'a"b\\c\nd', "version": 7, "version_type": "external",
         "_source": {"price": Decimal("12345678901234567890.120"), "name": "x\ny"}},
        {"_op_type": "delete", "_index": "p", "_id": "2", "version": 9, "version_type": "external"},
    ])
    assert body.endswith(b"\n")
    lines = body.split(b"\n")[:-1]
    assert [orjson.loads(line) for line in lines] == [
        {"index": {"_index": "p", "_id": 'a"b\\c\nd', "version": 7, "version_type": "external"}},
        {"price": "12345678901234567890.120", "name": "x\ny"},
        {"delete": {"_index": "p", "_id": "2", "version": 9, "version_type": "external"}},
    ]


def test_clickhouse_millisecond_ticks_are_the_drivers_own() -> None:
    """``ticks_ms`` spares the driver a conversion per row; it must give the value the driver would."""
    from datetime import UTC, datetime

    from clickhouse_connect.datatypes.registry import get_from_name

    from changeflow.sinks.clickhouse import ticks_ms

    column = get_from_name("DateTime64(3, 'UTC')")
    for moment in (datetime(2026, 12, 2, 0, 1, 2, 345678, tzinfo=UTC), datetime(1970, 1, 1, tzinfo=UTC),
                   datetime(1969, 12, 31, 23, 59, 59, 999999, tzinfo=UTC), datetime.now(UTC)):
        assert ticks_ms(moment) == column._datetime64_ticks(moment)


def test_a_search_document_id_is_the_key_or_its_hash_when_the_key_is_too_long() -> None:
    import hashlib

    from changeflow.sinks.search import KEY_FIELD, MAX_ID_BYTES, doc_id, key_of

    assert doc_id("42") == "42"
    fits = "é" * (MAX_ID_BYTES // 2)  # 512 bytes exactly
    assert doc_id(fits) == fits
    long = fits + "x"
    assert doc_id(long) == "sha256:" + hashlib.sha256(long.encode()).hexdigest()
    assert doc_id(long) == doc_id(long) and doc_id(long) != doc_id(long + "y")
    assert key_of(doc_id(long), {"id": 1, KEY_FIELD: long}) == (long, {"id": 1})
    assert key_of("42", {"id": 42}) == ("42", {"id": 42})


class _Capture:
    """A ClickHouse client that keeps what it is given to insert."""

    def __init__(self) -> None:
        self.inserts: list[tuple[str, list[list[Any]], list[str]]] = []

    def insert(self, table: str, data: list[list[Any]], column_names: list[str], **_: Any) -> None:
        self.inserts.append((table, data, column_names))


def _clickhouse_store() -> tuple[ClickHouseStore, _Capture]:
    store = ClickHouseStore(cast("Settings", None), cast("Pipeline", SimpleNamespace(namespace="shop")))
    capture = _Capture()
    store._client = capture
    store._types["users"] = {n: parse_type(t) for n, t in
                             {"id": "int64", "email": "string", "name": "string", "tags": "array<string>"}.items()}
    store._tables["users"] = {"id": "Int64", "email": "Nullable(String)", "name": "Nullable(String)",
                              "tags": "Array(Nullable(String))"}
    return store, capture


def test_a_clickhouse_delete_row_carries_the_key_columns_and_nothing_of_the_row() -> None:
    """Issue 23 §6: `(1, 'alice@example.com', 'Alice', ...)` was a delete's row, written from its before image, and
    survived OPTIMIZE ... FINAL. The row a delete writes holds its key columns only."""
    store, capture = _clickhouse_store()
    before = {"id": 1, "email": "alice@example.com", "name": "Alice", "tags": ["vip"]}
    delete = ChangeRecord("postgres", "users", "1", "d", 120, 1_700_000_000_000, before, None, key_columns=("id",))
    store._insert_entity("shop.users", "users", [delete], datetime(2026, 1, 1, tzinfo=UTC))
    [(table, columns, names)] = capture.inserts
    assert table == "shop.users"
    by_name = dict(zip(names, columns, strict=True))
    assert {n: by_name[n] for n in ("id", "email", "name", "tags", "_key", "_version", "_is_deleted")} == {
        "id": [1], "email": [None], "name": [None], "tags": [[]], "_key": ["1"], "_version": [120], "_is_deleted": [1]}


def test_a_clickhouse_rejection_names_the_column_and_its_type_never_the_value() -> None:
    store, _ = _clickhouse_store()
    record = ChangeRecord("postgres", "users", "7", "c", 100, 1_700_000_000_000, None,
                          {"id": 7, "email": "alice@example.com", "name": "Alice", "tags": []}, key_columns=("id",))
    said = store._which_value("users", record, "DataError: Unable to create native array for column `email`: bad")
    assert said == " (column `email` Nullable(String))"
    assert store._which_value("users", record, "no column named here") == ""


def test_a_postgres_rejection_says_what_failed_without_the_value_it_quotes() -> None:
    exc = psycopg.errors.InvalidTextRepresentation('invalid input syntax for type uuid: "alice@example.com"\n'
                                                   "DETAIL:  Failing row contains (1, alice@example.com).")
    assert _row_rejection(exc) == 'InvalidTextRepresentation: invalid input syntax for type uuid: "…"'
    assert _row_rejection(psycopg.errors.NumericValueOutOfRange("bigint out of range")) == \
        "NumericValueOutOfRange: bigint out of range"
