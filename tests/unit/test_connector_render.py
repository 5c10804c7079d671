"""Connectors rendered from the pipeline: the commerce pipeline gives exactly the committed connector file
(which curl users send as it stands), and another pipeline gets its own slot, publication and topics."""

from __future__ import annotations

import json
import re

import pytest

from changeflow.connectors.client import CONNECTOR_DIR, ConnectorDefinition
from changeflow.connectors.prepare import script
from changeflow.connectors.render import RenderError, as_json, connect_secret, quote_ident, regex, render
from changeflow.pipelines.load import load, parse

# The committed connector before it was rendered, and the only differences rendering made on purpose.
BEFORE_RENDERING_INCLUDE = ("public.products,public.orders,public.payments,public.refunds,public.debezium_signal,"
                            "public.debezium_heartbeat")


def test_commerce_renders_the_committed_postgres_connector_file() -> None:
    committed = ConnectorDefinition.load(CONNECTOR_DIR / "postgres-commerce.json")
    rendered = render(load(), sources=["postgres"])
    assert len(rendered) == 1
    assert rendered[0].name == committed.name == "commerce-postgres"
    assert rendered[0].config == committed.config
    assert as_json(rendered[0]) == (CONNECTOR_DIR / "postgres-commerce.json").read_text()


def test_commerce_connector_is_todays_plus_the_dropped_column() -> None:
    config = render(load(), sources=["postgres"])[0].config
    # The include list names the same tables, now as escaped regular expressions (Debezium matches regexes).
    assert config["table.include.list"].replace("\\", "") == BEFORE_RENDERING_INCLUDE
    assert config["column.exclude.list"] == r"public\.products\.internal_notes"
    for key, value in {
        "slot.name": "changeflow_commerce", "publication.name": "changeflow_pub",
        "publication.autocreate.mode": "disabled", "plugin.name": "pgoutput", "topic.prefix": "commerce",
        "decimal.handling.mode": "precise", "time.precision.mode": "adaptive_time_microseconds",
        "database.hostname": "${env:CHANGEFLOW_PG_HOST}", "database.port": "${env:CHANGEFLOW_PG_PORT}",
        "database.password": "${env:CHANGEFLOW_PG_REPLICATION_PASSWORD}",
        "signal.data.collection": "public.debezium_signal",
        "notification.sink.topic.name": "changeflow.debezium.notifications",
        "heartbeat.action.query": "INSERT INTO public.debezium_heartbeat (id, ts) VALUES (1, now()) "
                                  "ON CONFLICT (id) DO UPDATE SET ts = EXCLUDED.ts",
    }.items():
        assert config[key] == value, key
    assert "message.key.columns" not in config


def test_commerce_mongodb_connector_matches_the_compose_file_but_for_the_policy() -> None:
    committed = json.loads((CONNECTOR_DIR / "mongodb-users.json").read_text())["config"]
    rendered = render(load(), sources=["mongodb"])[0]
    assert rendered.name == "users-mongodb"
    config = dict(rendered.config)
    assert config.pop("field.exclude.list") == "users.users.hashed_password"
    assert config.pop("collection.include.list") == r"users\.users"
    # Known difference: the pipeline file's reference vs the compose file's variable (see the lead's note).
    assert config.pop("mongodb.connection.string").startswith("${env:CHANGEFLOW_MONGODB_")
    committed.pop("collection.include.list")
    committed.pop("mongodb.connection.string")
    assert config == committed


PIPELINE = """\
name: shop
sources:
  postgres:
    host: db.internal
    port: 5433
    database: shop
    user: cdc
    password: ${file:/run/secrets/pg_password}
    schemas: [sales]
entities:
  lines:
    table: "sales.Order Lines"
    key: [order_id, "line no"]
    fields: {drop: ["notes,private", "a.b"]}
  customers:
    table: sales.customers
"""


def test_another_pipeline_gets_its_own_names_and_exact_lists() -> None:
    (definition,) = render(parse(PIPELINE, "shop.yml"))
    config = definition.config
    assert definition.name == "shop-postgres"
    assert config["slot.name"] == "shop_shop" and config["publication.name"] == "shop_pub"
    assert config["topic.prefix"] == "shop"
    assert config["notification.sink.topic.name"] == "shop.debezium.notifications"
    assert config["database.hostname"] == "db.internal" and config["database.port"] == "5433"
    assert config["database.password"] == "${dir:/run/secrets:pg_password}"
    assert config["table.include.list"] == (r"sales\.Order\ Lines,sales\.customers,public\.shop_signal,"
                                            r"public\.shop_heartbeat")
    # Commas inside a name are escaped for Debezium's splitter; dots are literal.
    assert config["column.exclude.list"] == r"sales\.Order\ Lines\.notes\,private,sales\.Order\ Lines\.a\.b"
    assert config["message.key.columns"] == r"sales\.Order\ Lines:order_id,line no"
    assert config["signal.data.collection"] == "public.shop_signal"
    assert "public.shop_heartbeat (id, ts)" in config["heartbeat.action.query"]


def test_include_list_regexes_match_exactly_their_table() -> None:
    pattern = regex("sales", "Order Lines")
    java_like = pattern.replace(r"\ ", " ")  # Python's re accepts both forms
    assert re.fullmatch(java_like, "sales.Order Lines")
    assert not re.fullmatch(pattern, "salesXOrder Lines")


def test_secret_references_and_identifiers() -> None:
    assert connect_secret("${env:CHANGEFLOW_PW}", "x") == "${env:CHANGEFLOW_PW}"
    with pytest.raises(RenderError, match=r"x: '\$\{env:PW\}': Kafka Connect resolves only CHANGEFLOW_\* variables; "
                                          r"name it \$\{env:CHANGEFLOW_PW\}"):
        connect_secret("${env:PW}", "x")
    assert connect_secret("${file:/a/b/c}", "x") == "${dir:/a/b:c}"
    with pytest.raises(RenderError):
        connect_secret("${file:relative}", "x")
    assert quote_ident("debezium_heartbeat") == "debezium_heartbeat"
    assert quote_ident("user") == '"user"'
    assert quote_ident('Odd "x"') == '"Odd ""x"""'


def test_prepare_script_names_exactly_the_pipeline_tables() -> None:
    text = script(parse(PIPELINE, "shop.yml"))
    assert 'GRANT SELECT ON TABLE "sales"."Order Lines", "sales"."customers" TO "cdc";' in text
    assert 'GRANT USAGE ON SCHEMA "sales", "public" TO "cdc";' in text
    assert ('ALTER PUBLICATION "shop_pub" SET TABLE "sales"."Order Lines", "sales"."customers", '
            '"public"."shop_signal", "public"."shop_heartbeat";') in text
    assert "WHERE pubname = 'shop_pub'" in text
    assert "REPLICA IDENTITY" not in text.split("\n", 4)[-1]
