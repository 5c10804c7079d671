"""``outbox:`` in the pipeline file: tables a service writes its events into (the transactional outbox),
published by Debezium's outbox event router (``io.debezium.transforms.outbox.EventRouter``).

The model (what a user writes), the names an outbox creates (its topics, the router's regular expression)
and what ``pipeline check`` judges against the source's catalog: pure, no I/O. The connector's
transforms are rendered in ``connectors.render``; the consumer side (inbox, tail, prune) is
``changeflow.outbox``.

Routing: an event goes to ``<topic_prefix>.<aggregate type>`` (``<namespace>.events.<type>`` by default),
keyed by the aggregate id, so one aggregate's events keep their order. An aggregate type that cannot be part
of a topic name (a character outside ``[A-Za-z0-9._-]``, empty, or too long for Kafka's 249 characters)
never reaches a topic name, so it cannot stop the connector's task: the router's regular expression sends it
to ``<namespace>.outbox.dlq`` with a ``changeflow.error`` header naming why.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from changeflow.pipelines.names import split_table, topic_part
from changeflow.pipelines.outbox_model import ERROR_HEADER, TOPIC_CHARS, TOPIC_MAX, Outbox, OutboxColumns, OutboxSection

__all__ = ["ERROR_HEADER", "TOPIC_CHARS", "TOPIC_MAX", "Outbox", "OutboxColumns", "OutboxSection", "OutboxSpec",
           "check", "event_log_table", "specs", "unroutable_reason"]

if TYPE_CHECKING:
    from changeflow.pipelines.catalog import Catalog
    from changeflow.pipelines.spec import Pipeline

@dataclass(frozen=True)
class OutboxSpec:
    """An outbox with every name resolved."""

    name: str
    config: Outbox
    source_schema: str
    source_table: str
    raw_topic: str  # Debezium's topic for the table, which the router's predicate matches
    topic_prefix: str
    dlq_topic: str

    @property
    def qualified_table(self) -> str:
        return f"{self.source_schema}.{self.source_table}"

    @property
    def payload_constraint(self) -> str:
        return f"changeflow_{self.name}_payload_size"

    @property
    def update_trigger(self) -> str:
        """The name of the trigger (and its function, in the table's schema) ``connectors.prepare`` adds."""
        return f"changeflow_outbox_{self.name}_update"

    @property
    def message_prefix(self) -> str:
        """The prefix of the logical decoding message an UPDATE of a row emits (``connectors.prepare``)."""
        return f"changeflow.outbox.{self.name}"

    @property
    def longest_type(self) -> int:
        """The longest aggregate type whose topic name Kafka still accepts."""
        return TOPIC_MAX - len(self.topic_prefix) - 1

    @property
    def route_regex(self) -> str:
        """The router's ``route.topic.regex`` (Java). Kafka's RegexRouter replaces the first match found, so
        both branches are anchored; a type the first branch refuses leaves ``routedByValue`` unset and the
        event on ``<topic_prefix>.`` (nothing else ends there), which the next transform moves to the DLQ."""
        return rf"(?s)^(?<routedByValue>[{TOPIC_CHARS}]{{1,{self.longest_type}}})$|^.*$"

    @property
    def unroutable_topic(self) -> str:
        return f"{self.topic_prefix}."

    def topic(self, aggregate_type: str) -> str | None:
        """The topic an aggregate type's events go to; None: the DLQ (the same rule as ``route_regex``)."""
        if re.fullmatch(rf"[{TOPIC_CHARS}]{{1,{self.longest_type}}}", aggregate_type):
            return f"{self.topic_prefix}.{aggregate_type}"
        return None

    @property
    def columns(self) -> list[str]:
        c = self.config.columns
        named = [c.id, c.aggregate_type, c.aggregate_id, c.type, c.payload, c.timestamp, *self.config.headers]
        return [n for n in dict.fromkeys(named) if n is not None]


UPDATE_REASON = ("an UPDATE of an outbox row: Debezium's router publishes a row once, when it is inserted, and "
                 "drops its updates; insert a new event instead")


def unroutable_reason(spec: OutboxSpec) -> str:
    return (f"the aggregate type is not a legal topic name part (1 to {spec.longest_type} characters of "
            f"{TOPIC_CHARS}); the event is kept here, its type in the aggregate_type header")


def event_log_table(spec: OutboxSpec) -> str:
    """The outbox's event log table in the home store's database (`event_log: true`)."""
    return f"outbox_{spec.name}"


def specs(pipeline: Pipeline) -> list[OutboxSpec]:
    pg = pipeline.file.sources.postgres
    out: list[OutboxSpec] = []
    for name, cfg in pipeline.file.outbox.items():
        schema, table = split_table(cfg.table, pg.schemas[0] if pg else "public")
        prefix = pipeline.postgres_topic_prefix
        out.append(OutboxSpec(
            name=name, config=cfg, source_schema=schema, source_table=table,
            raw_topic=f"{prefix}.{topic_part(schema)}.{topic_part(table)}",
            topic_prefix=cfg.topic_prefix or f"{pipeline.namespace}.events",
            dlq_topic=f"{pipeline.namespace}.outbox.dlq"))
    return out


def check(pipeline: Pipeline, catalog: Catalog | None) -> list[tuple[str, str]]:
    """(location, message) for every problem of the outbox section; the catalog judges columns and types."""
    out: list[tuple[str, str]] = []
    outboxes = specs(pipeline)
    if outboxes and pipeline.file.sources.postgres is None:
        return [("outbox", "an outbox is a PostgreSQL table; declare `sources.postgres`")]
    entity_tables = {(e.source_schema, e.source_table) for e in pipeline.entities.values() if e.source == "postgres"}
    for spec in outboxes:
        at = f"outbox.{spec.name}"
        if spec.longest_type < 1:
            out.append((f"{at}.topic_prefix", f"{spec.topic_prefix!r} leaves no room for an aggregate type in a "
                                              f"{TOPIC_MAX}-character topic name; shorten it"))
        if (spec.source_schema, spec.source_table) in entity_tables:
            out.append((f"{at}.table", f"{spec.qualified_table} is also an entity: the router would turn its "
                                       "changes into events; keep outbox tables out of `entities`"))
        if catalog is None:
            continue
        table = catalog.table(spec.source_schema, spec.source_table)
        if table is None:
            out.append((f"{at}.table", f"{spec.qualified_table} is not a table of database {catalog.database}"))
            continue
        c = spec.config.columns
        named = [("columns.id", c.id), ("columns.aggregate_type", c.aggregate_type),
                 ("columns.aggregate_id", c.aggregate_id), ("columns.type", c.type),
                 ("columns.payload", c.payload), ("columns.timestamp", c.timestamp),
                 *[("headers", h) for h in spec.config.headers]]
        for where, col in named:
            if col is None:
                continue
            column = table.column(col)
            if column is None:
                out.append((f"{at}.{where}", f"column {col!r} is not in {table.qualified}; its columns are: "
                                             f"{', '.join(table.column_names)}"))
            elif where == "columns.aggregate_type" and column.nullable:
                out.append((f"{at}.{where}", f"{table.qualified}.{col} may be null, and a null aggregate type "
                                             "stops the connector's task; run ALTER TABLE "
                                             f"{table.qualified} ALTER COLUMN {col} SET NOT NULL"))
            elif where == "columns.timestamp" and not (column.format_type.startswith("timestamp")
                                                       and column.format_type.endswith("without time zone")):
                out.append((f"{at}.{where}", f"{table.qualified}.{col} is {column.format_type}; the router "
                                             "takes `timestamp` (without time zone) and fails the task on "
                                             "anything else; place this column in `headers` instead, or leave "
                                             "`timestamp` out"))
    return out
