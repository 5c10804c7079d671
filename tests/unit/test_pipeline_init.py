"""`changeflow init`'s pure part: a catalog becomes a starter pipeline file that loads and round-trips."""

from __future__ import annotations

import yaml

from changeflow.pipelines.catalog import Catalog, Column, Table
from changeflow.pipelines.init import PASSWORD_REF, entity_names, identifier, source_block, starter
from changeflow.pipelines.load import parse
from changeflow.pipelines.types import from_postgres


def catalog() -> Catalog:
    tables = [
        Table("public", "customers", (Column("id", "bigint", nullable=False), Column("email", "text"),
                                      Column("mood", "mood", is_enum=True), Column("tags", "text[]")), ("id",)),
        Table("sales", "Order Lines", (Column("order_id", "uuid", nullable=False),
                                       Column("line no", "integer", nullable=False),
                                       Column('odd"name\\x', "numeric(12,2)"),
                                       Column("at", "timestamp with time zone")),
              ("order_id", "line no")),
        Table("sales", "customers", (Column("code", "character varying(8)", nullable=False),), ("code",)),
        Table("public", "audit_log", (Column("at", "timestamp without time zone"), Column("what", "jsonb"))),
        Table("public", "debezium_signal", (Column("id", "character varying(64)"),), ("id",)),
    ]
    return Catalog("shop", ("public", "sales"), {(t.schema, t.name): t for t in tables})


SOURCE = source_block({"host": "db.example", "port": "5433", "dbname": "shop", "user": "cdc",
                       "password": "s3cret"}, ["public", "sales"])


def test_identifiers_are_lower_case_and_unique() -> None:
    assert identifier("Order Lines") == "order_lines"
    assert identifier("2024 sales") == "t_2024_sales"
    assert identifier('odd"name') == "odd_name"
    names = entity_names(list(catalog().tables.values()))
    # `customers` in two schemas: each gets its schema in front.
    assert names[("public", "customers")] == "public_customers"
    assert names[("sales", "customers")] == "sales_customers"
    assert names[("sales", "Order Lines")] == "order_lines"


def test_source_block_never_takes_the_dsn_password() -> None:
    assert SOURCE == {"host": "db.example", "port": 5433, "database": "shop", "user": "cdc",
                      "password": PASSWORD_REF, "schemas": ["public", "sales"]}
    assert "s3cret" not in starter(catalog(), name="shop", source=SOURCE)
    # A Unix socket directory is no host for Kafka Connect.
    assert "host" not in source_block({"host": "/var/run/postgresql", "dbname": "x"}, ["public"])


def test_starter_loads_with_every_primary_key_table_and_catalog_types() -> None:
    text = starter(catalog(), name="shop", source=SOURCE)
    pipeline = parse(text, "shop.yml")
    assert set(pipeline.entities) == {"public_customers", "order_lines", "sales_customers"}
    lines = pipeline.entity("order_lines")
    assert (lines.source_schema, lines.source_table) == ("sales", "Order Lines")
    assert lines.key_columns is None  # the primary key: never written by default
    assert [str(t) for t in lines.declared_types.values()] == ["uuid", "int32", "decimal(12,2)", "timestamptz"]
    assert list(lines.declared_types) == ["order_id", "line no", 'odd"name\\x', "at"]
    customers = pipeline.entity("public_customers")
    assert str(customers.declared_types["mood"]) == "enum"
    assert str(customers.declared_types["tags"]) == "array<string>"
    for spec in pipeline.entities.values():
        assert all(spec.stored_in(store) for store in ("redis", "search", "clickhouse"))
    pg = pipeline.file.sources.postgres
    assert pg is not None and (pg.host, pg.port, pg.database, pg.user) == ("db.example", 5433, "shop", "cdc")
    assert pg.password == PASSWORD_REF


def test_starter_round_trips_through_the_model() -> None:
    text = starter(catalog(), name="shop", source=SOURCE)
    data = yaml.safe_load(text)
    model = parse(text, "shop.yml").file
    dumped = model.model_dump(mode="json", exclude_defaults=True, include={"name", "sources", "entities"})
    for name, entity in data["entities"].items():
        assert dumped["entities"][name]["table"] == entity["table"]
        assert dumped["entities"][name]["columns"] == entity["columns"]
    assert dumped["sources"]["postgres"]["database"] == "shop"
    # Written again from the model, the same file loads to the same model.
    again = parse(yaml.safe_dump(model.model_dump(mode="json", exclude_none=True)), "again.yml").file
    assert again == model


def test_tables_without_primary_key_are_comments_with_the_reason() -> None:
    text = starter(catalog(), name="shop", source=SOURCE)
    assert "#   public.audit_log: no primary key" in text
    assert "audit_log" not in yaml.safe_dump(yaml.safe_load(text))
    # Debezium's own tables are never entities.
    assert "debezium_signal" not in yaml.safe_load(text)["entities"]
    assert "#   public.debezium_signal" in text


def test_types_come_from_the_catalog_vocabulary() -> None:
    assert str(from_postgres("numeric")) == "decimal"
    assert str(from_postgres("character varying(8)")) == "string"
