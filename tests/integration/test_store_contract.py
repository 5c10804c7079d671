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
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import httpx
import psycopg
import pytest
import redis
import yaml
from psycopg import sql

from changeflow.pipelines.load import parse
from changeflow.pipelines.spec import EntitySpec, Pipeline
from changeflow.pipelines.types import parse_type
from changeflow.schemas import SchemaVersion, make_version
from changeflow.settings import Settings
from changeflow.sinks.base import Store, create, names, registry
from changeflow.sinks.redis import row_key
from changeflow.sinks.runner import complete_partials, write_bisecting
from changeflow.sinks.search import index_name
from changeflow.streams.keys import key_text
from changeflow.streams.records import ChangeRecord
from tests.integration.conftest import eventually, redis_url, search_url

pytestmark = pytest.mark.integration

COLUMNS = {"id": "int64", "name": "string", "small": "int16", "price": "decimal(10,2)", "tags": "array<string>"}


def store_with(live_stack: Settings, store_name: str, entity: str, columns: dict[str, str],
               key: tuple[str, ...]) -> Iterator[tuple[Store, Pipeline, SchemaVersion]]:
    """A throwaway pipeline of one entity in one store, set up for the entity's columns; purged afterwards."""
    name = f"contract_{uuid.uuid4().hex[:8]}"
    # Opt-in stores (sinks.base.used_by) need the entity to name them; the others take it by default.
    opt_in = {n: {"database": f"{name}_read"} for n in names() if getattr(registry()[n], "opt_in", False)}
    text = yaml.safe_dump({"name": name, "sources": {"postgres": {"database": "contract"}},
                           "entities": {entity: {"table": f"public.{entity}", "stores": opt_in}}})
    pipeline = parse(text, "contract.yml")
    sv = make_version(entity, 1, {n: parse_type(t) for n, t in columns.items()}, key)
    store = create(store_name, live_stack, pipeline)
    try:
        store.setup({entity: sv})
        yield store, pipeline, sv
    finally:
        try:
            store.purge()
        finally:
            store.close()
            with psycopg.connect(live_stack.pg_dsn, autocommit=True) as conn:
                conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(f"{name}_read")))


@pytest.fixture
def contract(live_stack: Settings, request: pytest.FixtureRequest) -> Iterator[tuple[Store, Pipeline, SchemaVersion]]:
    yield from store_with(live_stack, request.param, "things", COLUMNS, ("id",))

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
    # The reason (dead-letter headers, logs) names the column or the range, never the value (issue 23 §6).
    reason = refused[0].reason
    assert str(2**70) not in reason and ("`small`" in reason or "[small]" in reason or "range" in reason.lower()), \
        reason
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


# --- erasure (issue 23): keys_where, forget, traces, expunge ------------------------------------------------
def erasure_rows(store: Store, sv: SchemaVersion) -> None:
    """Person "p1" in keys 1 (two versions), 2 (deleted: a tombstone or a remembered version) and 4 (anonymised
    at version 130); person "p2" in key 3. One batch per version, so a store that keeps older rows has them."""
    batches = [
        [record(sv, 1, 100, row(1, "p1"), op="c"), record(sv, 2, 100, row(2, "p1"), op="c"),
         record(sv, 3, 100, row(3, "p2", small=3), op="c"), record(sv, 4, 100, row(4, "p1"), op="c")],
        [record(sv, 1, 110, row(1, "p1", small=2))],
        [ChangeRecord("postgres", "things", "2", "d", 120, 1_700_000_000_000, row(2, "p1"), None,  # a full before
                      key_columns=("id",), schema=sv)],
        [record(sv, 4, 130, row(4, "anon", small=4, price="0.00", tags=["-"]))],
    ]
    for batch in batches:
        assert not store.write_batch(batch)


@pytest.mark.parametrize("contract", STORES, indirect=True)
def test_erasure_finds_the_rows_of_a_person_and_forgets_every_trace_of_them(
        contract: tuple[Store, Pipeline, SchemaVersion]) -> None:
    store, pipeline, sv = contract
    spec = pipeline.entity("things")
    erasure_rows(store, sv)
    assert held(store, pipeline) == {"1": ("p1", 110), "3": ("p2", 100), "4": ("anon", 130)}
    # By a column that is not the key, compared as text (an integer column too): live rows, and in a store that
    # keeps history (keeps_history) what a row once held too (key 2 before its delete, key 4 before anonymised).
    history = getattr(store, "keeps_history", False)
    assert store.keys_where(spec, "name", ["p1"]) == (["1", "2", "4"] if history else ["1"])
    assert store.keys_where(spec, "name", ["p1", "anon", "nobody"]) == (["1", "2", "4"] if history else ["1", "4"])
    assert store.keys_where(spec, "small", ["2", "3"]) == ["1", "3"]
    assert store.keys_where(spec, "name", []) == []
    # The deleted key leaves a trace: a tombstone row, a remembered version. Search's memory of a delete is the
    # engine's own (id and version for index.gc_deletes), which no API reads by id: it counts no trace there.
    tombstone = store.traces(spec, ["2"])
    assert (tombstone == 0) if store.name == "search" else (tombstone >= 1), tombstone
    assert store.traces(spec, ["1", "2", "4"]) > store.traces(spec, ["1", "2", "4"], keep={"4": 130}) > 0

    done = store.forget(spec, ["1", "2", "4"], keep={"4": 130})
    assert done and all(line.startswith(store.name) for line in done), done
    assert not any("p1" in line or "anon" in line for line in done), done
    assert store.traces(spec, ["1", "2", "4"], keep={"4": 130}) == 0
    assert store.traces(spec, ["1", "2"]) == 0
    # The kept row is still there, exactly, at its version (and so are its traces, without `keep`).
    assert store.traces(spec, ["4"]) >= 1
    assert held(store, pipeline) == {"3": ("p2", 100), "4": ("anon", 130)}
    kept = store.fetch(spec, ["4"])["4"]
    assert kept.version == 130
    assert {k: kept.row[k] for k in COLUMNS} in (
        {"id": 4, "name": "anon", "small": 4, "price": Decimal("0.00"), "tags": ["-"]},
        {"id": 4, "name": "anon", "small": 4, "price": "0.00", "tags": ["-"]},  # the JSON stores' exact decimals
    )
    other = store.fetch(spec, ["3"])["3"]
    assert (other.version, other.row["name"], other.row["small"]) == (100, "p2", 3)
    assert store.keys_where(spec, "name", ["p1"]) == []
    # Idempotent: nothing left to change, nothing said.
    assert store.forget(spec, ["1", "2", "4"], keep={"4": 130}) == []
    assert store.traces(spec, ["1", "2", "4"], keep={"4": 130}) == 0

    what, seconds = store.expunge(spec)
    assert what.startswith(store.name) and (seconds is None or seconds >= 0), (what, seconds)


# A composite key of text columns, neither named `id`, with quotes, backslashes and the key text's own
# separators in its values; a personal column of the same kind.
HOSTILE_COLUMNS = {"tenant": "string", "handle": "string", "email": "string", "n": "int64"}
HOSTILE_EMAIL = "o'brien\\x\"y@example.com"
HOSTILE_KEYS = [("t'1", 'a\\b"c'), ("t'1", "plain"), ('t"2", "x', 'a\\b"c'), ("t'1", "a\\b\"c ")]


@pytest.fixture
def hostile(live_stack: Settings, request: pytest.FixtureRequest) -> Iterator[tuple[Store, Pipeline, SchemaVersion]]:
    yield from store_with(live_stack, request.param, "people", HOSTILE_COLUMNS, ("tenant", "handle"))


@pytest.mark.parametrize("hostile", STORES, indirect=True)
def test_erasure_finds_and_forgets_rows_of_a_composite_key_with_quotes_and_backslashes(
        hostile: tuple[Store, Pipeline, SchemaVersion]) -> None:
    """Values from data reach each store's query only as values: a key text or an email holding quotes,
    backslashes and the separators of a composite key's text is found exactly, and nothing else is."""
    store, pipeline, sv = hostile
    spec = pipeline.entity("people")

    def person(i: int, version: int, email: str, op: str = "c") -> ChangeRecord:
        tenant, handle = HOSTILE_KEYS[i]
        image = {"tenant": tenant, "handle": handle, "email": email, "n": i}
        return ChangeRecord("postgres", "people", key_text([tenant, handle]), op, version,  # type: ignore[arg-type]
                            1_700_000_000_000, image if op == "d" else None, None if op == "d" else image,
                            key_columns=("tenant", "handle"), schema=sv)

    keys = [key_text(list(k)) for k in HOSTILE_KEYS]
    assert not store.write_batch([person(0, 100, HOSTILE_EMAIL), person(1, 100, "bob@example.com"),
                                  person(2, 100, HOSTILE_EMAIL), person(3, 100, HOSTILE_EMAIL[:-1])])
    assert not store.write_batch([person(2, 110, HOSTILE_EMAIL, op="d")])
    history = getattr(store, "keeps_history", False)
    found = store.keys_where(spec, "email", [HOSTILE_EMAIL])
    assert found == sorted([keys[0], keys[2]] if history else [keys[0]]), found
    assert store.keys_where(spec, "handle", ['a\\b"c']) == sorted([keys[0], keys[2]] if history else [keys[0]])
    assert store.keys_where(spec, "email", ["o'brien"]) == []
    assert store.traces(spec, [keys[0], keys[2]]) >= 1
    assert store.forget(spec, [keys[0], keys[2]])
    assert store.traces(spec, [keys[0], keys[2]]) == 0
    live = {k: r["email"] for k, r, _v in store.scan(spec)}
    assert live == {keys[1]: "bob@example.com", keys[3]: HOSTILE_EMAIL[:-1]}
    assert store.traces(spec, [keys[1], keys[3]]) >= 2


@pytest.mark.parametrize("contract", STORES, indirect=True)
def test_after_forget_the_store_no_longer_refuses_a_late_older_write(
        contract: tuple[Store, Pipeline, SchemaVersion]) -> None:
    """The store's version memory of a forgotten key is gone with it, so a late, older change of that key is
    written again: what stops it is the erasure's suppression list upstream, not the store. Search is the
    exception: forget deletes the document (the engine versions that delete one above it) and the engine keeps
    that version, and a delete's, for index.gc_deletes (7 days), id and version only, so it still refuses."""
    store, pipeline, sv = contract
    spec = pipeline.entity("things")
    erasure_rows(store, sv)
    assert store.forget(spec, ["1", "2"])
    assert store.traces(spec, ["1", "2"]) == 0
    assert not store.write_batch([record(sv, 1, 90, row(1, "late one")), record(sv, 2, 110, row(2, "late two"))])
    if store.name == "search":
        assert held(store, pipeline) == {"3": ("p2", 100), "4": ("anon", 130)}
        # A newer change than the engine's remembered version is written, as any newer change.
        assert not store.write_batch([record(sv, 1, 112, row(1, "newer"))])
        assert held(store, pipeline) == {"1": ("newer", 112), "3": ("p2", 100), "4": ("anon", 130)}
    else:
        assert held(store, pipeline) == {"1": ("late one", 90), "2": ("late two", 110), "3": ("p2", 100),
                                         "4": ("anon", 130)}


@pytest.mark.parametrize("contract", ["clickhouse"], indirect=True)
def test_clickhouse_tombstone_holds_only_the_key_and_forget_expunge_leave_nothing(
        contract: tuple[Store, Pipeline, SchemaVersion]) -> None:
    """Issue 23: `(1, 'alice@example.com', 'Alice', ...)` survived `OPTIMIZE ... FINAL` as a delete's row, and the
    changelog and reconcile's differing keys kept the key after the row was gone."""
    store, pipeline, sv = contract
    spec = pipeline.entity("things")
    client = store.client  # type: ignore[attr-defined]
    table = store.table(spec)  # type: ignore[attr-defined]
    database = pipeline.namespace
    assert not store.write_batch([record(sv, 1, 100, row(1, "alice@example.com", small=7, tags=["x"]), op="c"),
                                  record(sv, 2, 100, row(2, "bob"), op="c")])
    # Debezium's delete carries the whole row as it was (its before image).
    delete = ChangeRecord("postgres", "things", "1", "d", 120, 1_700_000_000_000,
                          row(1, "alice@example.com", small=7, tags=["x"]), None, key_columns=("id",), schema=sv)
    assert not store.write_batch([delete])
    client.command(f"OPTIMIZE TABLE {table} FINAL")
    # Without FINAL: every row the table stores for the key. The delete's row carries the key columns only.
    rows = client.query(f"SELECT id, name, small, price, tags, _version, _is_deleted FROM {table} WHERE _key = '1'"
                        ).result_rows
    assert rows == [(1, None, None, None, [], 120, 1)]
    diffs = f"{database}.reconciliation_diffs"
    client.insert(diffs, [["run1", datetime.now(UTC), "things", "clickhouse", k, "stale", "d", None] for k in "12"],
                  column_names=["run_id", "run_at", "entity", "store", "key", "kind", "detail", "store_version"])
    changelog = f"{database}.changelog"

    def left(key: str) -> tuple[int, int, int]:
        return tuple(int(client.command(f"SELECT count() FROM {t} WHERE {c} = '{key}'" + extra))  # type: ignore[return-value]
                     for t, c, extra in ((table, "_key", ""), (changelog, "key", " AND entity = 'things'"),
                                         (diffs, "key", " AND entity = 'things'")))

    assert left("1") == (1, 2, 1)
    assert store.traces(spec, ["1"]) == 4
    assert store.forget(spec, ["1"]) == [f"clickhouse {database}.things: 1 rows deleted",
                                         f"clickhouse {changelog}: 2 rows deleted",
                                         f"clickhouse {diffs}: 1 rows deleted"]
    what, seconds = store.expunge(spec)
    assert "OPTIMIZE TABLE" in what and seconds is not None and seconds >= 0
    assert left("1") == (0, 0, 0)
    assert store.traces(spec, ["1"]) == 0
    assert client.query(f"SELECT count() FROM {table} WHERE name = 'alice@example.com'").result_rows == [(0,)]
    assert client.query(f"SELECT count() FROM {changelog} WHERE position(ifNull(before, '') || ifNull(after, ''), "
                        "'alice@example.com') > 0").result_rows == [(0,)]
    # The other key: untouched, everywhere.
    assert left("2") == (1, 1, 1)
    assert held(store, pipeline) == {"2": ("bob", 100)}


@pytest.mark.parametrize("contract", ["search"], indirect=True)
def test_search_forget_removes_the_document_from_every_index_behind_the_alias(
        contract: tuple[Store, Pipeline, SchemaVersion], live_stack: Settings) -> None:
    """An alias spanning two indexes (a rebuild's new index beside the old, both aliased): the document of a
    forgotten key goes from both, not only from the write index the alias leads writes to."""
    store, pipeline, sv = contract
    spec = pipeline.entity("things")
    alias = index_name(spec)
    second = f"{alias}-000002"
    store.create_index(spec, second, types=sv.columns)  # type: ignore[attr-defined]
    base = search_url(live_stack)
    httpx.post(f"{base}/_aliases", json={"actions": [{"add": {"index": second, "alias": alias}}]},
               timeout=30).raise_for_status()
    assert store.indexes(spec) == [f"{alias}-000001", second]  # type: ignore[attr-defined]
    assert not store.write_batch([record(sv, 1, 100, row(1, "p1"), op="c"), record(sv, 2, 100, row(2, "p2"), op="c")])
    for key, name in (("1", "p1 copy"), ("3", "p1 only here")):
        httpx.put(f"{base}/{second}/_doc/{key}", params={"version": 100, "version_type": "external", "refresh": "true"},
                  json={"id": int(key), "name": name}, timeout=30).raise_for_status()

    def in_index(index: str) -> dict[str, str]:
        # A write is searchable after the index's next refresh (every 100 ms): refreshed here, so the test
        # reads what the index holds, not what its last refresh happened to catch.
        httpx.post(f"{base}/{index}/_refresh", timeout=30).raise_for_status()
        found = httpx.post(f"{base}/{index}/_search", json={"size": 100}, timeout=30).json()["hits"]["hits"]
        return {h["_id"]: h["_source"]["name"] for h in found}

    assert in_index(f"{alias}-000001") == {"1": "p1", "2": "p2"}
    assert in_index(second) == {"1": "p1 copy", "3": "p1 only here"}
    assert store.keys_where(spec, "name", ["p1", "p1 only here"]) == ["1", "3"]
    assert store.traces(spec, ["1", "3"]) == 3
    assert store.forget(spec, ["1", "3"]) == [f"search {alias}-000001: 1 documents deleted",
                                              f"search {second}: 2 documents deleted"]
    assert store.traces(spec, ["1", "3"]) == 0
    assert in_index(f"{alias}-000001") == {"2": "p2"}
    assert in_index(second) == {}
    assert store.forget(spec, ["1", "3"]) == []
    what, _seconds = store.expunge(spec)  # type: ignore[attr-defined]
    assert f"{alias}-000001" in what and second in what


@pytest.mark.parametrize("contract", STORES, indirect=True)
def test_a_delete_leaves_the_key_and_its_version_never_a_value_of_the_row(
        contract: tuple[Store, Pipeline, SchemaVersion], live_stack: Settings) -> None:
    """Issue 23 §6: what a store remembers of a deleted row (a tombstone row, a version entry) is its key and
    version, read here from each store's own storage, not through the store's reads (which skip deletes)."""
    store, pipeline, sv = contract
    spec = pipeline.entity("things")
    assert not store.write_batch([record(sv, 1, 100, row(1, "alice@example.com", small=7, tags=["x"]), op="c")])
    delete = ChangeRecord("postgres", "things", "1", "d", 120, 1_700_000_000_000,
                          row(1, "alice@example.com", small=7, tags=["x"]), None, key_columns=("id",), schema=sv)
    assert not store.write_batch([delete])
    assert held(store, pipeline) == {}
    if store.name == "clickhouse":
        client, table = store.client, store.table(spec)  # type: ignore[attr-defined]
        # Without FINAL (which hides a delete's row): the row the delete wrote.
        assert client.query(f"SELECT id, name, small, price, tags, _version FROM {table} "
                            "WHERE _key = '1' AND _is_deleted = 1").result_rows == [(1, None, None, None, [], 120)]
    elif store.name == "postgres":
        with psycopg.connect(live_stack.pg_dsn, dbname=f"{pipeline.namespace}_read") as conn:
            assert conn.execute("SELECT id, name, small, price, tags, _cf_version, _cf_deleted FROM public.things"
                                ).fetchall() == [(1, None, None, None, None, Decimal(120), True)]
    elif store.name == "redis":
        client = redis.Redis.from_url(redis_url(live_stack))
        assert client.get(row_key(spec, "1")) is None
        assert client.hget(f"{pipeline.namespace}:versions", row_key(spec, "1")) == b"%020d" % 120
    elif store.name == "search":
        for index in store.indexes(spec):  # type: ignore[attr-defined]
            found = httpx.get(f"{search_url(live_stack)}/{index}/_doc/1", timeout=30).json()
            assert found["found"] is False and "_source" not in found
    else:
        pytest.fail(f"no reading of {store.name}'s own storage here: add one")
