"""TOAST placeholders never reach a store: the decoder marks the image partial, sinks fill it."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest

from changeflow.sinks.base import fill_partials
from changeflow.streams.debezium import UNAVAILABLE, decode_postgres
from changeflow.streams.records import ChangeRecord
from tests.unit.commerce import POSTGRES_ENTITIES
from tests.unit.envelopes import encoded, envelope, product_row

ORDER_FIELDS: list[dict[str, Any]] = [
    {"type": "string", "optional": False, "name": "io.debezium.data.Uuid", "version": 1, "field": "id"},
    {"type": "string", "optional": False, "field": "user_id"},
    {"type": "string", "optional": False, "field": "status"},
    {"type": "bytes", "optional": False, "name": "org.apache.kafka.connect.data.Decimal", "version": 1,
     "parameters": {"scale": "2", "connect.decimal.precision": "12"}, "field": "total_amount"},
    {"type": "string", "optional": False, "name": "io.debezium.data.Json", "version": 1, "field": "items"},
]
OID = "8d3c5a0e-4a43-4b0e-9d59-0c8e3f1a2b3c"


def toasted_update() -> bytes:
    after = {"id": OID, "user_id": "u-1", "status": "shipped", "total_amount": "BNI=", "items": UNAVAILABLE}
    return encoded(envelope("u", None, after, table="orders", fields=ORDER_FIELDS, lsn=900))


def test_placeholder_is_dropped_and_the_record_marked_partial() -> None:
    result = decode_postgres(toasted_update(), topic="t", partition=0, offset=1, entities=POSTGRES_ENTITIES)
    assert isinstance(result, ChangeRecord)
    assert result.partial is True
    assert result.after == {"id": OID, "user_id": "u-1", "status": "shipped", "total_amount": Decimal("12.34")}
    assert UNAVAILABLE not in str(result)


def test_complete_image_is_not_partial() -> None:
    result = decode_postgres(
        encoded(envelope("c", None, product_row(1))), topic="t", partition=0, offset=1, entities=POSTGRES_ENTITIES
    )
    assert isinstance(result, ChangeRecord) and result.partial is False


def test_product_with_toasted_description_keeps_price_and_omits_description() -> None:
    row = product_row(4, description=UNAVAILABLE, price_cents=500)
    result = decode_postgres(encoded(envelope("u", None, row)), topic="t", partition=0, offset=1,
                             entities=POSTGRES_ENTITIES)
    assert isinstance(result, ChangeRecord) and result.after is not None
    assert "description" not in result.after
    assert result.after["price"] == Decimal("5.00")


def rec(key: str, version: int, after: dict[str, Any] | None, partial: bool = False, op: str = "u") -> ChangeRecord:
    return ChangeRecord("postgres", "orders", key, op, version, 0, None, after, partial=partial)  # type: ignore[arg-type]


def test_fill_partials_takes_the_missing_columns_from_the_store() -> None:
    calls: list[tuple[str, list[str]]] = []

    def fetch(entity: str, keys: list[str]) -> dict[str, dict[str, Any]]:
        calls.append((entity, keys))
        return {"a": {"id": "a", "status": "paid", "items": [{"sku": "X"}]}}

    out = fill_partials([rec("a", 2, {"id": "a", "status": "shipped"}, partial=True)], fetch)
    assert out == [rec("a", 2, {"id": "a", "status": "shipped", "items": [{"sku": "X"}]})]
    assert calls == [("orders", ["a"])]


def test_fill_partials_prefers_an_earlier_record_of_the_same_batch() -> None:
    def fetch(entity: str, keys: list[str]) -> dict[str, dict[str, Any]]:
        return {"a": {"id": "a", "status": "stale", "items": ["old"]}}

    batch = [rec("a", 1, {"id": "a", "status": "new", "items": ["fresh"]}, op="c"),
             rec("a", 2, {"id": "a", "status": "shipped"}, partial=True)]
    assert fill_partials(batch, fetch)[1].after == {"id": "a", "status": "shipped", "items": ["fresh"]}


def test_fill_partials_after_a_delete_in_the_batch_has_no_base_and_stays_partial() -> None:
    def fetch(entity: str, keys: list[str]) -> dict[str, dict[str, Any]]:
        return {"a": {"id": "a", "status": "old", "items": ["old"]}}

    batch = [rec("a", 1, None, op="d"), rec("a", 2, {"id": "a", "status": "x"}, partial=True)]
    out = fill_partials(batch, fetch)
    assert out[1] == rec("a", 2, {"id": "a", "status": "x"}, partial=True)


def test_a_partial_record_without_a_base_stays_partial_and_so_does_the_next_one_of_its_key() -> None:
    """#20 §9: a row the store does not hold (a Redis TTL expired) never turns a partial record into a
    complete one; a full record of the key later in the batch is a base again."""
    def fetch(entity: str, keys: list[str]) -> dict[str, dict[str, Any]]:
        return {}

    batch = [rec("a", 2, {"id": "a", "status": "x"}, partial=True),
             rec("a", 3, {"id": "a", "status": "y"}, partial=True),
             rec("a", 4, {"id": "a", "status": "z", "items": []}),
             rec("a", 5, {"id": "a", "status": "w"}, partial=True)]
    assert fill_partials(batch, fetch) == [*batch[:3], rec("a", 5, {"id": "a", "status": "w", "items": []})]


def test_batches_without_partials_do_not_touch_the_store() -> None:
    def fetch(entity: str, keys: list[str]) -> dict[str, dict[str, Any]]:
        raise AssertionError("no fetch expected")

    batch = [rec("a", 1, {"id": "a"})]
    assert fill_partials(batch, fetch) == batch


def test_price_changed_event_from_full_before_image() -> None:
    from changeflow.pipelines.load import load
    from changeflow.streams.derived import event

    declared = load().entity("products").config.events["price_changed"]  # examples/commerce/pipeline.yml

    def price_changed(record: ChangeRecord) -> dict[str, object] | None:
        return event(record, "price_changed", declared)

    before, after = product_row(5, price_cents=1000), product_row(5, price_cents=1250)
    result = decode_postgres(encoded(envelope("u", before, after, lsn=77)), topic="t", partition=0, offset=1,
                             entities=POSTGRES_ENTITIES)
    assert isinstance(result, ChangeRecord)
    assert price_changed(result) == {"type": "product.price_changed", "id": "5", "old_price": "10.00",
                                     "new_price": "12.50", "version": 77, "ts_ms": 1_795_000_000_000,
                                     "event_id": "products.price_changed:products:5@77"}
    same = decode_postgres(encoded(envelope("u", before, product_row(5, price_cents=1000, stock=1))), topic="t",
                           partition=0, offset=2, entities=POSTGRES_ENTITIES)
    assert isinstance(same, ChangeRecord) and price_changed(same) is None
    no_before = decode_postgres(encoded(envelope("u", None, after)), topic="t", partition=0, offset=3,
                                entities=POSTGRES_ENTITIES)
    assert isinstance(no_before, ChangeRecord) and price_changed(no_before) is None


def test_a_dropped_column_leaves_the_record_and_a_partial_keeps_only_what_it_carries() -> None:
    """Through the canonical topic: a complete row without a column of the newest version (dropped at the
    source) comes out without it, not with a null; a partial row keeps only its columns."""
    from changeflow import schemas
    from changeflow.pipelines.types import parse_type
    from changeflow.sinks.runner import record_from_bytes
    from changeflow.streams.app import to_avro

    book = schemas.SchemaBook()
    book.add([schemas.make_version("things", 1, {"id": parse_type("int64"), "gone": parse_type("string"),
                                                 "kept": parse_type("string")}, ["id"])])
    types = {"id": parse_type("int64"), "kept": parse_type("string")}

    def through(after: dict[str, Any], partial: bool) -> ChangeRecord:
        record = ChangeRecord("postgres", "things", "1", "u", 10, 0, None, after, partial=partial,  # type: ignore[arg-type]
                              key_columns=("id",), types=types)
        return record_from_bytes(to_avro(book, record), ("t", 0, 0), book)

    complete = through({"id": 1, "kept": "k"}, partial=False)
    assert complete.after == {"id": 1, "kept": "k"} and not complete.partial
    partial = through({"id": 1, "kept": None}, partial=True)
    assert partial.after == {"id": 1, "kept": None} and partial.partial
    full = through({"id": 1, "gone": None, "kept": "k"}, partial=False)
    assert full.after == {"id": 1, "gone": None, "kept": "k"}


def test_derived_events_are_configuration_for_any_entity_and_columns() -> None:
    from changeflow.pipelines.load import parse
    from changeflow.streams.derived import events

    pipeline = parse("name: shop\nsources:\n  postgres:\n    database: shop\nentities:\n  users:\n"
                     "    table: public.users\n    events:\n      moved: {when_changed: [city, country]}\n"
                     "  orders:\n    table: public.orders\n", "shop.yml")
    assert pipeline.event_topics() == {"shop.users.moved": (pipeline.entity("users"), "moved")}
    declared = {"shop.users.moved": ("moved", pipeline.entity("users").config.events["moved"])}

    def change(op: str, before: dict[str, object] | None, after: dict[str, object] | None) -> ChangeRecord:
        return ChangeRecord("postgres", "users", "7", op, 42, 1000, before, after)  # type: ignore[arg-type]

    home = {"id": 7, "city": "Paris", "country": "FR", "name": "Ann"}
    assert list(events(change("u", home, {**home, "city": "New York", "country": "US"}), declared)) == [
        ("shop.users.moved", {"type": "users.moved", "id": "7", "old_city": "Paris", "new_city": "New York",
                              "old_country": "FR", "new_country": "US", "version": 42, "ts_ms": 1000,
                              "event_id": "users.moved:users:7@42"})]
    assert list(events(change("u", home, {**home, "name": "Anne"}), declared)) == []  # another column
    assert list(events(change("c", None, home), declared)) == []  # an insert moves nothing
    assert list(events(change("d", home, None), declared)) == []
    assert list(events(change("u", {"id": 7}, {**home, "city": "Rome"}), declared)) == []  # no before-image


def test_an_event_on_an_unknown_or_dropped_column_is_refused_by_check() -> None:
    from changeflow.pipelines.catalog import Catalog, Column, Table
    from changeflow.pipelines.check import check
    from changeflow.pipelines.load import parse

    table = Table("public", "users", (Column("id", "integer"), Column("city", "text"), Column("ssn", "text")), ("id",))
    catalog = Catalog("shop", ("public",), {("public", "users"): table})
    pipeline = parse("name: shop\nsources:\n  postgres:\n    database: shop\nentities:\n  users:\n"
                     "    table: public.users\n    fields: {drop: [ssn]}\n"
                     "    events:\n      moved: {when_changed: [cty, ssn]}\n", "shop.yml")
    assert [str(p) for p in check(pipeline, catalog)] == [
        "entities.users.events.moved.when_changed: column 'cty' is not in public.users; did you mean 'city'?",
        "entities.users.events.moved.when_changed: 'ssn' is dropped, so no change of it reaches the stream; keep "
        "it or name another column",
        "entities.users.events.moved: reads the old values, which public.users does not publish (its replica "
        "identity is not FULL), so no event would ever be emitted; run ALTER TABLE public.users REPLICA IDENTITY "
        "FULL"]
    full = Table("public", "users", table.columns, ("id",), "f")
    assert len(check(pipeline, Catalog("shop", ("public",), {("public", "users"): full}))) == 2


def test_an_event_declared_by_an_expression_over_old_and_new_carries_its_fields() -> None:
    from changeflow.pipelines.load import PipelineError, parse
    from changeflow.streams.derived import event

    head = "name: shop\nsources:\n  postgres:\n    database: shop\nentities:\n  products:\n    table: public.products\n"
    pipeline = parse(head + "    events:\n      price_up:\n        when: old.price < new.price and new.price > 10\n"
                     "        fields: [sku, price]\n      restocked: {when: 'new.stock > 0'}\n", "shop.yml")
    up = pipeline.entity("products").config.events["price_up"]
    restocked = pipeline.entity("products").config.events["restocked"]

    def change(before: dict[str, object] | None, after: dict[str, object]) -> ChangeRecord:
        return ChangeRecord("postgres", "products", "5", "u", 9, 1000, before, after)  # type: ignore[arg-type]

    row = {"id": 5, "sku": "A-1", "price": Decimal("12.50"), "stock": 0}
    assert event(change(row, {**row, "price": Decimal("13.00")}), "price_up", up) == {
        "type": "products.price_up", "id": "5", "fields": {"sku": "A-1", "price": "13.00"}, "version": 9,
        "ts_ms": 1000, "event_id": "products.price_up:products:5@9"}
    assert event(change(row, {**row, "price": Decimal("11.00")}), "price_up", up) is None  # down
    assert event(change(None, {**row, "price": Decimal("13.00")}), "price_up", up) is None  # no before-image
    assert event(change({"id": 5}, {**row, "price": Decimal("13.00")}), "price_up", up) is None  # old.price missing
    # A `when` that reads only `new` needs no before-image.
    assert event(change(None, {**row, "stock": 3}), "restocked", restocked) is not None
    assert event(change(None, row), "restocked", restocked) is None
    with pytest.raises(PipelineError, match="an event needs `when_changed: \\[columns\\]` or `when: "):
        parse(head + "    events:\n      nothing: {fields: [sku]}\n", "shop.yml")


def test_check_judges_an_events_when_fields_and_before_image() -> None:
    from changeflow.pipelines.catalog import Catalog, Column, Table
    from changeflow.pipelines.check import check
    from changeflow.pipelines.load import parse

    columns = (Column("id", "integer"), Column("sku", "text"), Column("price", "numeric"), Column("cost", "text"))
    head = ("name: shop\nsources:\n  postgres:\n    database: shop\nentities:\n  products:\n"
            "    table: public.products\n    fields: {drop: [cost]}\n    events:\n")
    pipeline = parse(head + "      a: {when: 'old.prise != new.price and x', fields: [sku, colour, cost]}\n"
                     "      b: {when: 'new.price >'}\n      c: {when: 'new.price > 10'}\n", "shop.yml")
    default = Catalog("shop", ("public",), {("public", "products"): Table("public", "products", columns, ("id",))})
    assert [str(p) for p in check(pipeline, default)] == [
        "entities.products.events.b.when: expression 'new.price >' is not valid: invalid syntax; write an "
        "expression over old and new such as `old.price != new.price`",
        "entities.products.events.a.when: reads 'x'; a `when` reads `old.<column>` and `new.<column>` only",
        "entities.products.events.a.when: column 'prise' is not in public.products; did you mean 'price'?",
        "entities.products.events.a.fields: column 'colour' is not in public.products; its columns are: id, sku, "
        "price, cost",
        "entities.products.events.a.fields: 'cost' is dropped, so an event cannot carry it",
        "entities.products.events.a: reads the old values, which public.products does not publish (its replica "
        "identity is not FULL), so no event would ever be emitted; run ALTER TABLE public.products REPLICA "
        "IDENTITY FULL",
    ]
    full = Catalog("shop", ("public",), {("public", "products"): Table("public", "products", columns, ("id",), "f")})
    assert len(check(pipeline, full)) == 5
