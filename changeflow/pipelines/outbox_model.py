"""The ``outbox:`` section's typed model (what a user writes), apart from its resolution (``pipelines.outbox``):
``pipelines.model`` reads it for its ``outbox`` field, and the resolution reads the resolved pipeline, so the two
halves keep the package free of import cycles."""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, field_validator

# Kafka: a topic name is at most 249 characters of [A-Za-z0-9._-] (and neither "." nor "..").
TOPIC_MAX = 249
TOPIC_CHARS = "A-Za-z0-9._-"
# The header a dead-lettered event carries (the pipeline's DLQ uses the same name for its reason).
ERROR_HEADER = "changeflow.error"
# The column type Debezium's router accepts as the event timestamp under changeflow's connector settings
# (time.precision.mode=adaptive_time_microseconds: `timestamp` arrives as Timestamp or MicroTimestamp).
# `timestamptz` arrives as a ZonedTimestamp string, which the router refuses by failing the task.


class Strict(BaseModel):
    # pipelines.model's Strict, restated: that module imports this one for its `outbox` field.
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class OutboxColumns(Strict):
    """Which column holds what. The defaults are Debezium's own names; the seed's
    ``outbox_messages(id, aggregate_type, aggregate_id, event_type, payload, created_at)`` maps them."""

    id: str = Field("id", description="The event id (unique; the `id` header consumers dedupe on).")
    aggregate_type: str = Field("aggregatetype", description="Routes the event: its topic is "
                                                             "<topic_prefix>.<aggregate type>. NOT NULL.")
    aggregate_id: str = Field("aggregateid", description="The Kafka key: one aggregate's events keep their order.")
    type: str | None = Field("type", description="The event type, placed in the `type` header; null: none.")
    payload: str = Field("payload", description="The message value.")
    timestamp: str | None = Field(None, description="The Kafka record's timestamp (a `timestamp` column, "
                                                    "not `timestamptz`); default: when Debezium read the change.")


class Outbox(Strict):
    """One outbox table and how its rows become events."""

    table: str = Field(description="PostgreSQL `schema.table` (or `table` in the first captured schema).")
    columns: OutboxColumns = Field(default_factory=lambda: OutboxColumns.model_validate({}))
    headers: list[str] = Field(default_factory=list, description="Further columns each placed in a header "
                                                                 "of the same name (trace ids, tenants).")
    expand_json_payload: bool = Field(False, description="Send a JSON payload as JSON (a `jsonb` or JSON text "
                                                         "payload becomes the message's JSON value) rather than "
                                                         "as a string holding JSON.")
    max_payload_bytes: int | None = Field(
        262_144, ge=1, le=900_000,
        description="`connectors prepare` adds a CHECK constraint refusing a larger payload (as JSON text) in the "
                    "writer's transaction: one that does not fit in a Kafka message (1 MiB with its headers and "
                    "schema) would fail the connector's task for every table; null: no constraint.")
    event_log: bool = Field(False, description="Also keep the events in ClickHouse, one row per event id "
                                                "(`changeflow outbox eventlog` loads them).")
    topic_prefix: str | None = Field(None, pattern=rf"^[{TOPIC_CHARS}]+$",
                                     description="Events go to <topic_prefix>.<aggregate type>; "
                                                 "default: <namespace>.events.")

    @field_validator("headers")
    @classmethod
    def _header_names(cls, v: list[str]) -> list[str]:
        for name in v:
            if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", name):
                raise ValueError(f"header column {name!r}: name a column of letters, digits and _")
        return v


OutboxSection = dict[Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]*$")], Outbox]
