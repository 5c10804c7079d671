"""The store contract (issue 19): every registered store, against its real server, keeps the same promises.

Parametrised over the store registry, so a store added as one module and one entry point is held to them
with no test of its own to write: a write lands and reads back exactly (scan, fetch, count); an older
version never overwrites a newer one; a delete removes the row and remembers its version, so a late older
update cannot bring it back; a partial record is completed from what the store holds (by the runner), and one
whose row the store lacks is re-read, never written incomplete; a batch with a row
the store refuses writes every other row and hands the refused one back; purge removes what was made.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Sequence
from decimal import Decimal
from typing import Any

import psycopg
import pytest
import yaml
from psycopg import sql

from changeflow.pipelines.load import parse
from changeflow.pipelines.spec import EntitySpec, Pipeline
from changeflow.pipelines.types import parse_type
from changeflow.schemas import SchemaVersion, make_version
from changeflow.settings import Settings
from changeflow.sinks.base import Store, create, names, registry
from changeflow.sinks.runner import complete_partials, write_bisecting
from changeflow.streams.records import ChangeRecord
from tests.integration.conftest import eventually

pytestmark = pytest.mark.integration

COLUMNS = {"id": "int64", "name": "string", "small": "int16", "price": "decimal(10,2)", "tags": "array<string>"}


@pytest.fixture
def contract(live_stack: Settings, request: pytest.FixtureRequest) -> Iterator[tuple[Store, Pipeline, SchemaVersion]]:
    store_name: str = request.param
    tag = uuid.uuid4().hex[:8]
    name = f"contract_{tag}"
    # Opt-in stores (sinks.base.used_by) need the entity to name them; the others take it by default.
    opt_in = {n: {"database": f"{name}_read"} for n in names() if getattr(registry()[n], "opt_in", False)}
    text = yaml.safe_dump({"name": name, "sources": {"postgres": {"database": "contract"}},
                           "entities": {"things": {"table": "public.things", "stores": opt_in}}})
    pipeline = parse(text, "contract.yml")
    sv = make_version("things", 1, {n: parse_type(t) for n, t in COLUMNS.items()}, ("id",))
    store = create(store_name, live_stack, pipeline)
    try:
        store.setup({"things": sv})
        yield store, pipeline, sv
    finally:
        try:
            store.purge()
        finally:
            store.close()
            with psycopg.connect(live_stack.pg_dsn, autocommit=True) as conn:
                conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(f"{name}_read")))


def record(sv: SchemaVersion, key: int, version: int, after: dict[str, Any] | None, *, op: str = "u",
           partial: bool = False) -> ChangeRecord:
    return ChangeRecord("postgres", "things", str(key), op, version, 1_700_000_000_000, {"id": key}, after,  # type: ignore[arg-type]
                        partial=partial, key_columns=("id",), schema=sv)


def row(key: int, name: str, small: int = 1, price: str = "1.50", tags: list[str] | None = None) -> dict[str, Any]:
    return {"id": key, "name": name, "small": small, "price": Decimal(price), "tags": tags or ["a"]}


def held(store: Store, pipeline: Pipeline) -> dict[str, tuple[str, int | None]]:
    """key → (name, version) as the store holds it now, read by scan and by fetch alike."""
    spec = pipeline.entity("things")
    scanned = {k: (r.get("name"), v) for k, r, v in store.scan(spec)}
    fetched = {k: (v.row.get("name"), v.version) for k, v in store.fetch(spec, [*scanned, "404"]).items()}
    assert scanned == fetched
    assert store.count(spec) == len(scanned)
    return scanned


STORES = names()


@pytest.mark.parametrize("contract", STORES, indirect=True)
def test_writes_read_back_and_the_version_guard_holds(contract: tuple[Store, Pipeline, SchemaVersion]) -> None:
    store, pipeline, sv = contract
    assert store.write_batch([record(sv, 1, 100, row(1, "one"), op="c"), record(sv, 2, 100, row(2, "two"), op="c")]) \
        in ([], None)
    assert held(store, pipeline) == {"1": ("one", 100), "2": ("two", 100)}
    # A replay (the same change again) and an older version change nothing; a newer one wins, in one batch or
    # across batches.
    assert not store.write_batch([record(sv, 1, 90, row(1, "old")), record(sv, 1, 100, row(1, "one"), op="c")])
    assert not store.write_batch([record(sv, 2, 110, row(2, "newer")), record(sv, 2, 105, row(2, "late"))])
    assert held(store, pipeline) == {"1": ("one", 100), "2": ("newer", 110)}
    # The applied-through marker (search's becomes visible with its next refresh).
    eventually(lambda: store.applied_through().get("things") == 110, timeout=10, what="applied-through marker")


@pytest.mark.parametrize("contract", STORES, indirect=True)
def test_a_delete_is_remembered_so_a_late_update_cannot_resurrect(contract: tuple[Store, Pipeline, SchemaVersion]
                                                                   ) -> None:
    store, pipeline, sv = contract
    assert not store.write_batch([record(sv, 1, 100, row(1, "one"), op="c"), record(sv, 2, 100, row(2, "two"))])
    assert not store.write_batch([record(sv, 1, 120, None, op="d")])
    assert held(store, pipeline) == {"2": ("two", 100)}
    assert not store.write_batch([record(sv, 1, 110, row(1, "late"))])
    assert held(store, pipeline) == {"2": ("two", 100)}
    assert not store.write_batch([record(sv, 1, 130, row(1, "back"), op="c")])  # a newer insert does come back
    assert held(store, pipeline) == {"1": ("back", 130), "2": ("two", 100)}


@pytest.mark.parametrize("contract", STORES, indirect=True)
def test_a_partial_record_is_completed_from_the_stored_row(contract: tuple[Store, Pipeline, SchemaVersion]) -> None:
    store, pipeline, sv = contract
    assert not store.write_batch([record(sv, 1, 100, row(1, "one", price="9.99", tags=["x", "y"]), op="c")])
    # The runner completes partial records from the store before the store writes (#19 §2: a store only writes).
    writable, refused = complete_partials(store, pipeline, [record(sv, 1, 101, {"id": 1, "name": "renamed"},
                                                                   partial=True)], no_reread)
    assert refused == [] and [r.partial for r in writable] == [False]
    assert not store.write_batch(writable)
    spec = pipeline.entity("things")
    version = store.fetch(spec, ["1"])["1"]
    assert version.version == 101
    assert {k: version.row[k] for k in ("name", "price", "tags")} in (
        {"name": "renamed", "price": Decimal("9.99"), "tags": ["x", "y"]},
        {"name": "renamed", "price": "9.99", "tags": ["x", "y"]},  # the JSON stores keep exact decimals as text
    )


def no_reread(spec: EntitySpec, held: Sequence[ChangeRecord]) -> None:
    raise AssertionError(f"no re-read expected, got {[r.key for r in held]}")


@pytest.mark.parametrize("contract", STORES, indirect=True)
def test_a_partial_record_whose_row_the_store_lacks_is_reread_never_written(
    contract: tuple[Store, Pipeline, SchemaVersion]
) -> None:
    """#20 §9: the store has no row for the key (a Redis TTL expired, a row removed): the partial record is not
    written with its columns missing; its row is re-read from the source instead."""
    store, pipeline, sv = contract
    assert not store.write_batch([record(sv, 2, 100, row(2, "two"), op="c")])
    rereads: list[tuple[str, list[str]]] = []
    writable, refused = complete_partials(
        store, pipeline, [record(sv, 1, 101, {"id": 1, "name": "renamed"}, partial=True)],
        lambda spec, held: rereads.append((spec.name, [r.key for r in held])))
    assert (writable, refused, rereads) == ([], [], [("things", ["1"])])
    assert held(store, pipeline) == {"2": ("two", 100)}


@pytest.mark.parametrize("contract", STORES, indirect=True)
def test_a_row_the_store_refuses_is_handed_back_and_the_rest_lands(contract: tuple[Store, Pipeline, SchemaVersion]
                                                                  ) -> None:
    """An integer beyond 64 bits: the typed stores refuse it (ClickHouse's Int64, search's `long`, PostgreSQL's
    bigint); Redis holds JSON and takes any value."""
    store, pipeline, sv = contract
    batch = [record(sv, i, 100, row(i, f"n{i}"), op="c") for i in range(1, 6)]
    batch[2] = record(sv, 3, 100, row(3, "too big", small=2**70), op="c")
    refused = write_bisecting(store, batch)  # a whole refused call is bisected by the runner
    if store.name == "redis":
        assert refused == []
        assert set(held(store, pipeline)) == {"1", "2", "3", "4", "5"}
        return
    assert [(r.record.key, r.record.version) for r in refused] == [("3", 100)]
    assert str(2**70) in refused[0].reason or "range" in refused[0].reason.lower(), refused[0].reason
    assert set(held(store, pipeline)) == {"1", "2", "4", "5"}


@pytest.mark.parametrize("contract", STORES, indirect=True)
def test_a_key_longer_than_any_document_id_is_written_and_read_back(contract: tuple[Store, Pipeline, SchemaVersion]
                                                                    ) -> None:
    """Issue 20 §11: a key over search's 512-byte `_id` limit was always quarantined; every store takes it (search
    under a deterministic hashed id, the full key kept in the document and given back by every read)."""
    store, pipeline, sv = contract
    long_key = "ключ/" * 130  # 650 characters, 1,300 bytes
    record_long = ChangeRecord("postgres", "things", long_key, "c", 100, 1_700_000_000_000, None,
                               row(1, "long"), key_columns=("id",), schema=sv)
    assert not store.write_batch([record_long, record(sv, 2, 100, row(2, "short"), op="c")])
    assert held(store, pipeline) == {long_key: ("long", 100), "2": ("short", 100)}
    spec = pipeline.entity("things")
    assert store.fetch(spec, [long_key])[long_key].row["name"] == "long"
    gone = ChangeRecord("postgres", "things", long_key, "d", 110, 1_700_000_000_000, {"id": 1}, None,
                        key_columns=("id",), schema=sv)
    assert not store.write_batch([gone])
    assert held(store, pipeline) == {"2": ("short", 100)}


CLASHING = ["_key", "_version", "_is_deleted", "_ts_ms", "_ingested_at", "_id", "_source", "_index", "_routing",
            "_seq_no", "_cf_key", "_cf_version", "_cf_deleted", "_changeflow_key", "_version_", "_key__"]


@pytest.mark.parametrize("contract", STORES, indirect=True)
def test_source_columns_named_like_every_stores_own_are_kept_under_their_names(
        contract: tuple[Store, Pipeline, SchemaVersion]) -> None:
    """Issue 20 §5: a column named `_version` stopped the ClickHouse sink (DUPLICATE_COLUMN) and was refused by
    search (a metadata field). Every store keeps each of these under its own name, the escaped forms too."""
    store, pipeline, _ = contract
    sv = make_version("things", 2, {"id": parse_type("int64"), "name": parse_type("string"),
                                    **{c: parse_type("int64") for c in CLASHING}}, ("id",))
    store.setup({"things": sv})
    values = {c: 1000 + i for i, c in enumerate(CLASHING)}
    assert not store.write_batch([record(sv, 1, 100, {"id": 1, "name": "one", **values}, op="c")])
    spec = pipeline.entity("things")
    (key, row, version), = list(store.scan(spec))
    assert (key, version) == ("1", 100)
    assert {k: row.get(k) for k in ["id", "name", *CLASHING]} == {"id": 1, "name": "one", **values}
    assert store.fetch(spec, ["1"])["1"].row == row
    # A partial change of one of them keeps the others; a delete removes the row.
    writable, refused = complete_partials(store, pipeline, [record(sv, 1, 101, {"id": 1, "_version": 7},
                                                                   partial=True)], no_reread)
    assert refused == [] and not store.write_batch(writable)
    assert store.fetch(spec, ["1"])["1"].row == {**row, "_version": 7}
    assert not store.write_batch([record(sv, 1, 102, None, op="d")])
    assert store.count(spec) == 0


@pytest.mark.parametrize("contract", STORES, indirect=True)
def test_a_value_that_needs_a_widened_type_lands(contract: tuple[Store, Pipeline, SchemaVersion]) -> None:
    """Issue 20 §6: after int16 → int32 → int64 and real → double at the source, a value that needs the new
    width lands in every store: each one's columns are wide enough from the start."""
    store, pipeline, _ = contract
    narrow = make_version("things", 3, {"id": parse_type("int64"), "n": parse_type("int16"),
                                        "f": parse_type("float32")}, ("id",))
    store.setup({"things": narrow})
    assert not store.write_batch([record(narrow, 1, 100, {"id": 1, "n": 7, "f": 1.5}, op="c")])
    for version, wide in ((101, "int32"), (102, "int64")):
        sv = make_version("things", version, {"id": parse_type("int64"), "n": parse_type(wide),
                                              "f": parse_type("float64")}, ("id",))
        big = 70_000 if wide == "int32" else 2**40
        assert not store.write_batch([record(sv, 1, version, {"id": 1, "n": big, "f": 1e300})])
        assert {k: store.fetch(pipeline.entity("things"), ["1"])["1"].row[k] for k in ("n", "f")} == {
            "n": big, "f": 1e300}
