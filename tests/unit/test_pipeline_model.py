"""The pipeline file's model: every invalid file is refused with `FILE: path.inside: what is wrong` (and what
would be right); the commerce example loads with the names the demo always had."""

from __future__ import annotations

from pathlib import Path

import pytest

from changeflow.pipelines.load import COMMERCE, PipelineError, load, parse
from changeflow.sinks.clickhouse import table_of
from changeflow.sinks.redis import row_key
from changeflow.sinks.search import index_name

BASE = """\
name: shop
sources:
  postgres:
    database: shop
entities:
  orders:
    table: public.orders
"""


def refused(text: str) -> str:
    with pytest.raises(PipelineError) as caught:
        parse(text, "shop.yml")
    return str(caught.value)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param(BASE + "    colour: red\n",
                     "shop.yml: entities.orders.colour: unknown field; check the spelling against "
                     "`changeflow pipeline schema`", id="unknown-field"),
        pytest.param(BASE + "colour: 1\n", "shop.yml: colour: unknown field", id="unknown-top-level-field"),
        pytest.param(BASE.replace("name: shop", "name: Shop"),
                     "shop.yml: name: 'Shop' is not a lower-case identifier (a letter, then letters, digits or _)",
                     id="bad-pipeline-name"),
        pytest.param(BASE.replace("  orders:", "  Orders:"),
                     "shop.yml: entities: entity name 'Orders' is not a lower-case identifier", id="bad-entity-name"),
        pytest.param(BASE.replace("database: shop", "database: shop\n    password: hunter2"),
                     "shop.yml: sources.postgres.password: a password is never written inline; write a reference: "
                     "${env:VAR} or ${file:/path/to/secret}", id="inline-password"),
        pytest.param(BASE + "    fields:\n      hash: [email]\n",
                     "shop.yml: entities.orders.fields: `hash` needs a `salt` (a reference such as "
                     "${env:CHANGEFLOW_HASH_SALT})", id="hash-without-salt"),
        pytest.param(BASE + "    fields:\n      hash: [email]\n      salt: pepper\n",
                     "shop.yml: entities.orders.fields.salt: a hash salt is never written inline", id="inline-salt"),
        pytest.param(BASE + "    columns:\n      total: decimal(99,1)\n",
                     "shop.yml: entities.orders.columns: 'decimal(99,1)': decimal(P,S) needs 1 <= P <= 76 and S <= P",
                     id="bad-decimal-type"),
        pytest.param(BASE + "    columns:\n      total: money\n",
                     "shop.yml: entities.orders.columns: unknown type 'money'; use one of", id="unknown-type"),
        pytest.param(BASE + "    stores: {redis: maybe}\n", "shop.yml: entities.orders.stores.redis: ",
                     id="bad-store-shorthand"),
        pytest.param(BASE + "  users:\n    source: mongodb\n    collection: users\n",
                     "shop.yml: entities.users.source: mongodb is not declared under `sources`",
                     id="entity-source-missing"),
        pytest.param(BASE.replace("entities:", "  mongodb:\n    database: users\nentities:"),
                     "shop.yml: entities.orders.source: two sources are declared; say `source: postgres` or "
                     "`source: mongodb`", id="entity-source-ambiguous"),
        pytest.param(BASE.replace("    database: shop\n", "    user: x\n"),
                     "shop.yml: sources.postgres.database: required field is missing", id="required-field"),
        pytest.param(BASE + "    stores: {search: {index: Orders_Index}}\n",
                     "shop.yml: entities.orders.stores.search.index: 'Orders_Index' is not a valid index name; "
                     "use lower-case letters, digits, '-', '_' or '.'", id="bad-index-name"),
        pytest.param(BASE + "    hook: transforms.product\n",
                     "shop.yml: entities.orders.hook: 'transforms.product' is not `module:function` "
                     "(e.g. transforms:product)", id="bad-hook-form"),
        pytest.param(BASE + "    key: []\n", "shop.yml: entities.orders.key: an empty key", id="empty-key"),
        pytest.param("name: shop\nsources:\n  postgres:\n    database: shop\nentities: {}\n",
                     "shop.yml: entities: a pipeline needs at least one entity", id="no-entities"),
        pytest.param(BASE + "    table: [unclosed\n", "shop.yml: line 9, column 1: not valid YAML: ", id="yaml-syntax"),
        pytest.param("- a\n", "shop.yml: expected a mapping with `name`, `sources` and `entities`", id="not-a-mapping"),
    ],
)
def test_invalid_file_names_file_path_and_fix(text: str, expected: str) -> None:
    assert refused(text).startswith(expected)


def test_no_source_names_the_sources_path() -> None:
    assert refused("name: shop\nsources: {}\nentities:\n  orders: {table: public.orders}\n").startswith(
        "shop.yml: sources: ")


def test_store_shorthand_turns_stores_off() -> None:
    pipeline = parse(BASE + "    stores: {redis: false, search: false}\n", "shop.yml")
    orders = pipeline.entity("orders")
    assert not orders.stored_in("redis") and not orders.stored_in("search") and orders.stored_in("clickhouse")


def test_unreadable_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(PipelineError) as caught:
        load(tmp_path / "missing.yml")
    assert str(caught.value).startswith(f"{tmp_path / 'missing.yml'}: cannot be read")


def test_commerce_example_loads_with_the_demo_names() -> None:
    pipeline = load()
    assert pipeline.path == COMMERCE
    assert pipeline.name == "commerce" and pipeline.namespace == "changeflow"
    assert {e.name for e in pipeline.captured()} == {"products", "orders", "payments", "refunds", "users"}
    assert set(pipeline.views) == {"ny_orders", "order_stats"}
    assert set(pipeline.entities) == {*(e.name for e in pipeline.captured()), *pipeline.views}
    products = pipeline.entity("products")
    assert row_key(products, "7") == "product:7"
    assert index_name(products) == "products"
    assert (table_of(products)[0], table_of(products)[1]) == ("changeflow", "products")
    assert products.canonical_topic == "changeflow.products"
    assert products.raw_topic == "commerce.public.products"
    assert pipeline.slot == "changeflow_commerce" and pipeline.publication == "changeflow_pub"
    assert pipeline.connector_name("postgres") == "commerce-postgres"
    assert pipeline.entity("users").raw_topic == "users.users.users"


def test_json_schema_describes_the_file() -> None:
    from changeflow.pipelines.model import PipelineFile

    schema = PipelineFile.model_json_schema()
    assert set(schema["required"]) == {"name", "sources", "entities"}
    assert "Entity" in schema["$defs"] and schema["additionalProperties"] is False
