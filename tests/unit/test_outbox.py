"""The pipeline file's `outbox:` section: the model, what `pipeline check` says, the router in the rendered
connector, the routing rule, and events as consumers parse them (README "Outbox and events")."""

from __future__ import annotations

import json
import re
from decimal import Decimal

import pytest

from changeflow.connectors.prepare import script
from changeflow.connectors.render import as_json, render
from changeflow.outbox.events import BadEvent, parse
from changeflow.pipelines.catalog import Catalog, Column, Table
from changeflow.pipelines.check import check, uncaptured
from changeflow.pipelines.load import PipelineError
from changeflow.pipelines.load import parse as parse_pipeline
from changeflow.pipelines.outbox import specs

HEAD = """\
name: shop
sources:
  postgres: {database: shop}
entities:
  orders: {table: public.orders}
"""
SEED = HEAD + """\
outbox:
  orders:
    table: public.outbox_messages
    columns: {aggregate_type: aggregate_type, aggregate_id: aggregate_id, type: event_type}
    headers: [trace_id]
    expand_json_payload: true
"""


def catalog(aggregate_type_nullable: bool = False, created_at: str = "timestamp with time zone") -> Catalog:
    tables = [
        Table("public", "orders", (Column("id", "bigint", nullable=False),), ("id",)),
        Table("public", "outbox_messages", (
            Column("id", "uuid", nullable=False), Column("aggregate_type", "text", nullable=aggregate_type_nullable),
            Column("aggregate_id", "text", nullable=False), Column("event_type", "text", nullable=False),
            Column("payload", "jsonb"), Column("trace_id", "text"), Column("created_at", created_at)), ("id",)),
    ]
    return Catalog("shop", ("public",), {(t.schema, t.name): t for t in tables})


def test_the_seeds_outbox_maps_and_passes_check() -> None:
    pipeline = parse_pipeline(SEED, "shop.yml")
    assert check(pipeline, catalog()) == []
    assert [t.name for t in uncaptured(pipeline, catalog())] == []  # the outbox table is captured
    [spec] = specs(pipeline)
    assert (spec.raw_topic, spec.topic_prefix, spec.dlq_topic) == ("shop.public.outbox_messages", "shop.events",
                                                                    "shop.outbox.dlq")
    assert spec.config.columns.id == "id" and spec.config.columns.payload == "payload"  # Debezium's defaults


def test_check_names_every_outbox_problem() -> None:
    text = HEAD + """\
outbox:
  orders:
    table: public.outbox_messages
    columns: {aggregate_type: aggregate_type, aggregate_id: aggregate, type: event_type, timestamp: created_at}
    headers: [trace]
  twice:
    table: public.orders
  gone:
    table: public.nowhere
"""
    found = [str(p) for p in check(parse_pipeline(text, "shop.yml"), catalog(aggregate_type_nullable=True))]
    columns = "id, aggregate_type, aggregate_id, event_type, payload, trace_id, created_at"
    assert found == [
        "outbox.orders.columns.aggregate_type: public.outbox_messages.aggregate_type may be null, and a null "
        "aggregate type stops the connector's task; run ALTER TABLE public.outbox_messages ALTER COLUMN "
        "aggregate_type SET NOT NULL",
        f"outbox.orders.columns.aggregate_id: column 'aggregate' is not in public.outbox_messages; its columns "
        f"are: {columns}",
        "outbox.orders.columns.timestamp: public.outbox_messages.created_at is timestamp with time zone; the "
        "router takes `timestamp` (without time zone) and fails the task on anything else; place this column in "
        "`headers` instead, or leave `timestamp` out",
        f"outbox.orders.headers: column 'trace' is not in public.outbox_messages; its columns are: {columns}",
        "outbox.twice.table: public.orders is also an entity: the router would turn its changes into events; keep "
        "outbox tables out of `entities`",
        "outbox.twice.columns.aggregate_type: column 'aggregatetype' is not in public.orders; its columns are: id",
        "outbox.twice.columns.aggregate_id: column 'aggregateid' is not in public.orders; its columns are: id",
        "outbox.twice.columns.type: column 'type' is not in public.orders; its columns are: id",
        "outbox.twice.columns.payload: column 'payload' is not in public.orders; its columns are: id",
        "outbox.gone.table: public.nowhere is not a table of database shop",
    ]
    timestamp = SEED.replace("type: event_type}", "type: event_type, timestamp: created_at}")
    assert check(parse_pipeline(timestamp, "shop.yml"), catalog(created_at="timestamp(3) without time zone")) == []


@pytest.mark.parametrize(("section", "error"), [
    ("outbox:\n  Orders: {table: t}\n", "outbox.Orders"),
    ("outbox:\n  o: {table: t, colums: {}}\n", "outbox.o.colums: unknown field"),
    ("outbox:\n  o: {table: t, headers: ['a b']}\n", "header column 'a b'"),
    ("outbox:\n  o: {table: t, topic_prefix: 'a b'}\n", "outbox.o.topic_prefix"),
])
def test_the_model_refuses_what_it_cannot_mean(section: str, error: str) -> None:
    with pytest.raises(PipelineError) as exc:
        parse_pipeline(HEAD + section, "shop.yml")
    assert error in str(exc.value)


def test_the_connector_applies_the_router_to_the_outbox_table_only() -> None:
    [definition] = render(parse_pipeline(SEED, "shop.yml"), sources=["postgres"])
    config = definition.config
    assert config["table.include.list"] == (r"public\.orders,public\.shop_signal,public\.shop_heartbeat,"
                                            r"public\.outbox_messages")
    assert config["transforms"] == ("outbox_orders,outbox_orders_reason,outbox_orders_dlq,outbox_updates_reason,"
                                    "outbox_updates_dlq")
    assert config["predicates"] == "outbox_orders_table,outbox_orders_unroutable,outbox_updates"
    # An UPDATE of an outbox row: prepare's trigger emits a logical message, moved to the DLQ with why.
    assert config["message.prefix.include.list"] == r"changeflow\.outbox\.orders"
    assert config["predicates.outbox_updates.pattern"] == r"shop\.message"
    assert config["transforms.outbox_updates_dlq.replacement"] == "shop.outbox.dlq"
    assert config["transforms.outbox_updates_reason.value.literal"].startswith("an UPDATE of an outbox row: ")
    outbox = {k.removeprefix("transforms.outbox_orders."): v for k, v in config.items()
              if k.startswith("transforms.outbox_orders.")}
    assert outbox == {
        "type": "io.debezium.transforms.outbox.EventRouter",
        "predicate": "outbox_orders_table",
        "table.field.event.id": "id",
        "table.field.event.key": "aggregate_id",
        "table.field.event.payload": "payload",
        "route.by.field": "aggregate_type",
        "route.topic.regex": r"(?s)^(?<routedByValue>[A-Za-z0-9._-]{1,237})$|^.*$",
        "route.topic.replacement": "shop.events.${routedByValue}",
        "table.fields.additional.placement": "aggregate_type:header:aggregate_type,event_type:header:type,"
                                             "trace_id:header:trace_id",
        "table.expand.json.payload": "true",
        "table.op.invalid.behavior": "warn",
    }
    assert config["predicates.outbox_orders_table.pattern"] == r"shop\.public\.outbox_messages"
    assert config["predicates.outbox_orders_unroutable.pattern"] == r"shop\.events\."
    assert config["transforms.outbox_orders_dlq.replacement"] == "shop.outbox.dlq"
    assert config["transforms.outbox_orders_reason.header"] == "changeflow.error"
    assert json.loads(as_json(definition))["config"] == config  # `connectors render` prints it for curl


def test_without_an_outbox_the_connector_has_no_transforms() -> None:
    [definition] = render(parse_pipeline(HEAD, "shop.yml"), sources=["postgres"])
    assert not [k for k in definition.config if k.startswith(("transforms", "predicates"))]


@pytest.mark.parametrize(("aggregate_type", "topic"), [
    ("order", "shop.events.order"), ("Order-v2.x_y", "shop.events.Order-v2.x_y"), ("..", "shop.events..."),
    ("o" * 237, "shop.events." + "o" * 237), ("o" * 238, None), ("order line", None), ("commande_é", None),
    ("a\nb", None), ("", None), ("a/b", None),
])
def test_routing_sends_what_is_no_topic_name_part_to_the_dlq(aggregate_type: str, topic: str | None) -> None:
    [spec] = specs(parse_pipeline(SEED, "shop.yml"))
    assert spec.topic(aggregate_type) == topic
    # The same rule as the router's regular expression (Java's syntax is Python's here, bar the named group).
    java = spec.route_regex.replace("(?<routedByValue>", "(?P<routedByValue>")
    match = re.search(java, aggregate_type)
    assert match is not None and (match.group("routedByValue") is not None) == (topic is not None)
    if topic is not None:
        assert len(topic) <= 249


def test_an_event_is_parsed_from_what_the_router_writes() -> None:
    key = b'{"schema":{"type":"string","optional":false},"payload":"A-\\"1\\"\\\\\\n"}'
    value = b'{"schema":{"type":"string","optional":true,"name":"io.debezium.data.Json"},"payload":"{\\"n\\": 1.10}"}'
    headers = [("id", b"e-1"), ("aggregate_type", b"order"), ("type", b"order_placed"), ("trace_id", None)]
    event = parse("shop.events.order", 2, 7, key, value, headers)
    assert (event.id, event.aggregate_id, event.aggregate_type, event.type) == ("e-1", 'A-"1"\\\n', "order",
                                                                                 "order_placed")
    assert event.payload == '{"n": 1.10}'
    assert event.data == {"n": Decimal("1.10")}
    assert parse("t", 0, 0, None, None, [("id", b"e-2")]).payload is None
    with pytest.raises(BadEvent, match="t:0:3: no `id` header"):
        parse("t", 0, 3, None, b"{}", [])
    with pytest.raises(BadEvent, match="t:0:4: not JSON"):
        parse("t", 0, 4, None, b"{nope", [("id", b"x")])
    with pytest.raises(ValueError):
        _ = parse("t", 0, 5, None, b'{"schema": {}, "payload": "{nope"}', [("id", b"x")]).data


def test_prepare_limits_the_payload_in_the_writers_transaction() -> None:
    text = script(parse_pipeline(SEED, "shop.yml"))
    assert ('ALTER TABLE "public"."outbox_messages" DROP CONSTRAINT IF EXISTS "changeflow_orders_payload_size";\n'
            'ALTER TABLE "public"."outbox_messages" ADD CONSTRAINT "changeflow_orders_payload_size" CHECK '
            '(octet_length("payload"::text) <= 262144) NOT VALID;') in text
    assert "GRANT SELECT ON TABLE \"public\".\"orders\", \"public\".\"outbox_messages\" TO" in text
    assert ('CREATE OR REPLACE FUNCTION "public"."changeflow_outbox_orders_update"() RETURNS trigger LANGUAGE plpgsql '
            "AS $changeflow_prepare$\nBEGIN\n    PERFORM pg_catalog.pg_logical_emit_message(true, "
            "'changeflow.outbox.orders', pg_catalog.json_build_object('outbox', 'orders', 'id', NEW.\"id\"::text, "
            "'reason', 'an UPDATE of an outbox row: ") in text
    assert ('CREATE TRIGGER "changeflow_outbox_orders_update" AFTER UPDATE ON "public"."outbox_messages" FOR EACH ROW '
            'EXECUTE FUNCTION "public"."changeflow_outbox_orders_update"();') in text
    unlimited = script(parse_pipeline(SEED + "    max_payload_bytes: null\n", "shop.yml"))
    assert "payload_size" not in unlimited


def test_a_derived_event_parses_like_an_outbox_event_with_its_stable_id() -> None:
    from changeflow.streams.derived import headers

    payload = {"type": "product.price_changed", "id": "5", "version": 77,
               "event_id": "products.price_changed:products:5@77"}
    event = parse("changeflow.products.price_changed", 0, 3, b"products:5", json.dumps(payload).encode(),
                  headers(payload, "products"))
    assert (event.id, event.aggregate_id, event.aggregate_type, event.type) == (
        "products.price_changed:products:5@77", "products:5", "products", "product.price_changed")
    assert event.payload == payload


def test_the_event_log_table_is_the_outboxs_own() -> None:
    text = SEED.replace("  orders: {table: public.orders}\n", "  orders: {table: public.orders, stores: "
                        "{clickhouse: {table: outbox_orders}}}\n") + "    event_log: true\n"
    assert [str(p) for p in check(parse_pipeline(text, "shop.yml"))] == [
        "outbox.orders.event_log: entity orders already lands in ClickHouse table shop.outbox_orders, this "
        "outbox's event log; give the entity another `stores.clickhouse.table`"]


def test_the_example_pipeline_renders_its_timestamp_column_and_headers() -> None:
    from pathlib import Path

    from changeflow.pipelines.load import load

    example = Path(__file__).resolve().parents[2] / "examples" / "outbox" / "pipeline.yml"
    [definition] = render(load(example), sources=["postgres"])
    assert definition.config["transforms.outbox_orders.table.field.event.timestamp"] == "occurred_at"
    assert definition.config["transforms.outbox_orders.table.fields.additional.placement"] == (
        "aggregate_type:header:aggregate_type,event_type:header:type,trace_id:header:trace_id,"
        "created_at:header:created_at")


def test_two_outboxes_sharing_a_prefix_route_first_then_share_one_dead_letter_path() -> None:
    text = SEED + "  raw:\n    table: public.outbox_raw\n  other:\n    table: public.outbox_other\n" \
                  "    topic_prefix: shop.other\n"
    [definition] = render(parse_pipeline(text, "shop.yml"), sources=["postgres"])
    assert definition.config["transforms"] == (
        "outbox_orders,outbox_raw,outbox_other,outbox_orders_reason,outbox_orders_dlq,outbox_other_reason,"
        "outbox_other_dlq,outbox_updates_reason,outbox_updates_dlq")
    assert definition.config["predicates.outbox_other_unroutable.pattern"] == r"shop\.other\."
    assert definition.config["message.prefix.include.list"] == (r"changeflow\.outbox\.orders,"
                                                                r"changeflow\.outbox\.raw,changeflow\.outbox\.other")
