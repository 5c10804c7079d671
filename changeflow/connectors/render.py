"""Debezium connector definitions derived from a pipeline: what ``changeflow connectors apply`` registers and
``changeflow connectors render`` prints (Kafka Connect's JSON form, so ``curl`` can send it too).

One connector per source of the pipeline. Everything that names a pipeline's objects (topic prefix, slot,
publication, signal and heartbeat tables, notifications topic) comes from ``pipelines.spec``, so two
pipelines run side by side on one stack.

- PostgreSQL: pgoutput on the pipeline's own slot and publication (created beforehand by
  ``connectors.prepare``; ``publication.autocreate.mode=disabled``, so the replication role owns no
  table); ``table.include.list`` is exactly the entities' tables plus the signal and heartbeat tables;
  every ``fields.drop`` column is in ``column.exclude.list``, so a dropped column never leaves the
  database (not even into the raw topic or the dead-letter topic). Hashed fields are hashed in the decode
  stage (``pipelines.transform``), not here: Debezium's ``column.mask.hash`` takes its salt as plain text in
  the connector config, which Connect stores and shows. Include and exclude lists are regular expressions
  to Debezium, so every name is regex-escaped (and commas escaped as ``\\,``).
- MongoDB: ``collection.include.list`` and ``field.exclude.list`` likewise.

Secrets stay references: ``${env:VAR}`` is passed through as it stands (Connect's EnvVarConfigProvider,
``config.providers=env`` on the worker, resolves it). A pipeline's ``${file:/dir/name}`` means the
file's whole content; Connect's FileConfigProvider reads *properties* files (``${file:/path:key}``),
so the reference becomes DirectoryConfigProvider's form ``${dir:/dir:name}``, whose value is the file's
content as it stands (a trailing newline would be part of it). The worker needs
``config.providers.dir.class=org.apache.kafka.common.config.provider.DirectoryConfigProvider``, which the
native worker (``changeflow/deploy/connect.py``) and docker-compose.yml's both have, limited by ``allowed.paths`` to the
secrets folder (``<state>/secrets/``; compose: ``/run/secrets/``), as ``${env:...}`` is to ``CHANGEFLOW_.*``:
a reference outside stays unresolved.
When the source leaves host or port out, ``${env:CHANGEFLOW_PG_HOST}``/``${env:CHANGEFLOW_PG_PORT}`` are
used: the native Connect worker has them in its environment (``changeflow/deploy/connect.py``).
"""

from __future__ import annotations

import json
import re
from pathlib import PurePosixPath

from changeflow.connectors.client import ConnectorDefinition
from changeflow.pipelines import outbox
from changeflow.pipelines.model import SECRET_REF
from changeflow.pipelines.spec import Pipeline, split_table
from changeflow.settings import Settings

POSTGRES_CLASS = "io.debezium.connector.postgresql.PostgresConnector"
MONGODB_CLASS = "io.debezium.connector.mongodb.MongoDbConnector"

# Tuning that every PostgreSQL connector of changeflow shares (measured for the commerce demo: bench/).
_PG_TUNING = {
    "poll.interval.ms": "50",
    "max.batch.size": "8192",
    "max.queue.size": "32768",
    "snapshot.fetch.size": "20000",
    "heartbeat.interval.ms": "10000",
}
_CONVERTERS = {
    "key.converter": "org.apache.kafka.connect.json.JsonConverter",
    "key.converter.schemas.enable": "true",
    "value.converter": "org.apache.kafka.connect.json.JsonConverter",
    "value.converter.schemas.enable": "true",
}
_TOPIC_CREATION = {
    "topic.creation.default.replication.factor": "1",
    "topic.creation.default.partitions": "3",
}

# PostgreSQL's reserved key words (those that cannot be a bare table or column name).
_RESERVED = frozenset(
    """
all analyse analyze and any array as asc asymmetric authorization binary both case cast check collate collation
column concurrently constraint create cross current_catalog current_date current_role current_schema current_time
current_timestamp current_user default deferrable desc distinct do else end except false fetch for foreign freeze
from full grant group having ilike in initially inner intersect into is isnull join lateral leading left like limit
localtime localtimestamp natural not notnull null offset on only or order outer overlaps placing primary references
returning right select session_user similar some symmetric system_user table tablesample then to trailing true union
unique user using variadic verbose when where window with
""".split()  # noqa: SIM905
)


class RenderError(ValueError):
    pass


def quote_ident(name: str) -> str:
    """A PostgreSQL identifier as SQL: bare when it can be, else double-quoted (quotes doubled)."""
    if re.fullmatch(r"[a-z_][a-z0-9_$]*", name) and name not in _RESERVED:
        return name
    return '"' + name.replace('"', '""') + '"'


def quote_qualified(qualified: str) -> str:
    schema, _, table = qualified.rpartition(".")
    return f"{quote_ident(schema)}.{quote_ident(table)}" if schema else quote_ident(table)


def regex(*parts: str) -> str:
    """Debezium's filter lists are comma-separated Java regular expressions matched against
    ``schema.table[.column]``: each part matched literally, commas escaped for Debezium's splitter."""
    return r"\.".join(re.escape(p) for p in parts).replace(",", r"\,")


def connect_secret(reference: str, what: str) -> str:
    """A pipeline secret reference in the form Kafka Connect's config providers resolve."""
    match = SECRET_REF.match(reference)
    if match is None:
        raise RenderError(f"{what}: {reference!r} is not a ${{env:VAR}} or ${{file:/path}} reference")
    kind, name = match.groups()
    if kind == "env":
        if not name.startswith("CHANGEFLOW_"):
            # Connect's EnvVarConfigProvider resolves only CHANGEFLOW_.* (native stack and compose alike):
            # said here, not as a connector that cannot log in.
            raise RenderError(f"{what}: {reference!r}: Kafka Connect resolves only CHANGEFLOW_* variables; "
                              f"name it ${{env:CHANGEFLOW_{name}}} (and export that)")
        return reference
    path = PurePosixPath(name)
    if not path.is_absolute() or path.name in ("", "..", "."):
        raise RenderError(f"{what}: {reference!r}: Kafka Connect needs an absolute path to a file")
    return f"${{dir:{path.parent}:{path.name}}}"


def postgres(pipeline: Pipeline) -> ConnectorDefinition:
    pg = pipeline.file.sources.postgres
    if pg is None:
        raise RenderError(f"pipeline {pipeline.name} has no postgres source")
    entities = [e for e in pipeline.entities.values() if e.source == "postgres"]
    if not entities:
        raise RenderError(f"pipeline {pipeline.name} has no postgres entity")
    signal, heartbeat = split_table(pipeline.signal_table), split_table(pipeline.heartbeat_table)
    outboxes = outbox.specs(pipeline)
    captured = ([(e.source_schema, e.source_table) for e in entities] + [signal, heartbeat]
                + [(o.source_schema, o.source_table) for o in outboxes])
    excluded = [regex(e.source_schema, e.source_table, col) for e in entities for col in e.config.fields.drop]
    keyed = [f"{regex(e.source_schema, e.source_table)}:{','.join(e.key_columns)}"
             for e in entities if e.key_columns]
    heartbeat_sql = (f"INSERT INTO {quote_ident(heartbeat[0])}.{quote_ident(heartbeat[1])} (id, ts) VALUES (1, now()) "
                     "ON CONFLICT (id) DO UPDATE SET ts = EXCLUDED.ts")
    config: dict[str, str] = {
        "connector.class": POSTGRES_CLASS,
        "tasks.max": "1",
        "plugin.name": "pgoutput",
        "database.hostname": pg.host or "${env:CHANGEFLOW_PG_HOST}",
        "database.port": str(pg.port) if pg.port is not None else "${env:CHANGEFLOW_PG_PORT}",
        "database.user": pg.user,
        "database.password": connect_secret(pg.password, "sources.postgres.password"),
        "database.dbname": pg.database,
        "topic.prefix": pipeline.postgres_topic_prefix,
        "table.include.list": ",".join(regex(s, t) for s, t in dict.fromkeys(captured)),
    }
    if excluded:
        config["column.exclude.list"] = ",".join(excluded)
    if keyed:
        config["message.key.columns"] = ";".join(keyed)
    config.update({
        "publication.name": pipeline.publication,
        "publication.autocreate.mode": "disabled",
        "slot.name": pipeline.slot,
        "snapshot.mode": "initial",
        "decimal.handling.mode": "precise",
        "time.precision.mode": "adaptive_time_microseconds",
        "tombstones.on.delete": "true",
        **_PG_TUNING,
        "heartbeat.action.query": heartbeat_sql,
        "signal.enabled.channels": "source",
        "signal.data.collection": f"{signal[0]}.{signal[1]}",
        "incremental.snapshot.chunk.size": "10000",
        "notification.enabled.channels": "sink",
        "notification.sink.topic.name": pipeline.notifications_topic,
        **_CONVERTERS,
        **_TOPIC_CREATION,
        **outbox_transforms(outboxes, pipeline.postgres_topic_prefix),
    })
    return ConnectorDefinition(name=pipeline.connector_name("postgres"), config=config)


def outbox_transforms(outboxes: list[outbox.OutboxSpec], topic_prefix: str) -> dict[str, str]:
    """Debezium's outbox event router on each outbox table's topic only (a ``TopicNameMatches`` predicate; every
    other table's changes pass untouched), then the unroutable events (``pipelines.outbox``: an aggregate type
    that is no legal topic name part) moved to the outbox DLQ with the reason in a header. Kept to Debezium's
    defaults otherwise: ``c`` and snapshot ``r`` rows are events, ``d`` is skipped; the router drops an UPDATE of
    an outbox row with a warning (``table.op.invalid.behavior=warn``; never ``fatal``, which would stop the
    connector for every table), and the logical decoding message ``connectors.prepare``'s trigger emits for it
    (``<topic prefix>.message``, only changeflow's outbox prefixes captured) is moved to the outbox DLQ with
    its reason."""
    config: dict[str, str] = {}
    transforms: list[str] = []
    predicates: list[str] = []
    for o in outboxes:
        t, table = f"outbox_{o.name}", f"outbox_{o.name}_table"
        c = o.config.columns
        placement = [f"{c.aggregate_type}:header:aggregate_type"]
        if c.type is not None:
            placement.append(f"{c.type}:header:type")
        placement += [f"{h}:header:{h}" for h in o.config.headers]
        config.update({
            f"transforms.{t}.type": "io.debezium.transforms.outbox.EventRouter",
            f"transforms.{t}.predicate": table,
            f"transforms.{t}.table.field.event.id": c.id,
            f"transforms.{t}.table.field.event.key": c.aggregate_id,
            f"transforms.{t}.table.field.event.payload": c.payload,
            f"transforms.{t}.route.by.field": c.aggregate_type,
            f"transforms.{t}.route.topic.regex": o.route_regex,
            f"transforms.{t}.route.topic.replacement": f"{o.topic_prefix}.${{routedByValue}}",
            f"transforms.{t}.table.fields.additional.placement": ",".join(placement),
            f"transforms.{t}.table.expand.json.payload": str(o.config.expand_json_payload).lower(),
            f"transforms.{t}.table.op.invalid.behavior": "warn",
            f"predicates.{table}.type": "org.apache.kafka.connect.transforms.predicates.TopicNameMatches",
            f"predicates.{table}.pattern": re.escape(o.raw_topic),
        })
        if c.timestamp is not None:
            config[f"transforms.{t}.table.field.event.timestamp"] = c.timestamp
        transforms.append(t)
        predicates.append(table)
    # After every router: the unroutable events of each topic prefix (outboxes may share one) to the DLQ.
    first_of: dict[str, outbox.OutboxSpec] = {}
    for o in outboxes:
        first_of.setdefault(o.topic_prefix, o)
    for o in first_of.values():
        t, bad = f"outbox_{o.name}", f"outbox_{o.name}_unroutable"
        config.update({
            f"transforms.{t}_reason.type": "org.apache.kafka.connect.transforms.InsertHeader",
            f"transforms.{t}_reason.predicate": bad,
            f"transforms.{t}_reason.header": outbox.ERROR_HEADER,
            f"transforms.{t}_reason.value.literal": outbox.unroutable_reason(o),
            f"transforms.{t}_dlq.type": "org.apache.kafka.connect.transforms.RegexRouter",
            f"transforms.{t}_dlq.predicate": bad,
            f"transforms.{t}_dlq.regex": ".*",
            f"transforms.{t}_dlq.replacement": o.dlq_topic,
            f"predicates.{bad}.type": "org.apache.kafka.connect.transforms.predicates.TopicNameMatches",
            f"predicates.{bad}.pattern": re.escape(o.unroutable_topic),
        })
        transforms += [f"{t}_reason", f"{t}_dlq"]
        predicates.append(bad)
    if outboxes:
        # An UPDATE of an outbox row, which the router drops: `connectors.prepare`'s trigger emits a logical
        # decoding message for it, which Debezium publishes on <prefix>.message; moved to the DLQ with why.
        first = outboxes[0]
        messages = f"{topic_prefix}.message"
        config.update({
            "message.prefix.include.list": ",".join(re.escape(o.message_prefix) for o in outboxes),
            "transforms.outbox_updates_reason.type": "org.apache.kafka.connect.transforms.InsertHeader",
            "transforms.outbox_updates_reason.predicate": "outbox_updates",
            "transforms.outbox_updates_reason.header": outbox.ERROR_HEADER,
            "transforms.outbox_updates_reason.value.literal": outbox.UPDATE_REASON,
            "transforms.outbox_updates_dlq.type": "org.apache.kafka.connect.transforms.RegexRouter",
            "transforms.outbox_updates_dlq.predicate": "outbox_updates",
            "transforms.outbox_updates_dlq.regex": ".*",
            "transforms.outbox_updates_dlq.replacement": first.dlq_topic,
            "predicates.outbox_updates.type": "org.apache.kafka.connect.transforms.predicates.TopicNameMatches",
            "predicates.outbox_updates.pattern": re.escape(messages),
        })
        transforms += ["outbox_updates_reason", "outbox_updates_dlq"]
        predicates.append("outbox_updates")
    if transforms:
        config["transforms"] = ",".join(transforms)
        config["predicates"] = ",".join(predicates)
    return config


def mongodb(pipeline: Pipeline) -> ConnectorDefinition:
    mg = pipeline.file.sources.mongodb
    if mg is None:
        raise RenderError(f"pipeline {pipeline.name} has no mongodb source")
    entities = [e for e in pipeline.entities.values() if e.source == "mongodb"]
    if not entities:
        raise RenderError(f"pipeline {pipeline.name} has no mongodb entity")
    config: dict[str, str] = {
        "connector.class": MONGODB_CLASS,
        "tasks.max": "1",
        "mongodb.connection.string": connect_secret(mg.connection, "sources.mongodb.connection"),
        "topic.prefix": pipeline.mongodb_topic_prefix,
        "database.include.list": regex(mg.database),
        "collection.include.list": ",".join(regex(mg.database, e.source_table) for e in entities),
    }
    # field.exclude.list takes literal names (database.collection.field), not regular expressions.
    excluded = [f"{mg.database}.{e.source_table}.{col}" for e in entities for col in e.config.fields.drop]
    if excluded:
        config["field.exclude.list"] = ",".join(excluded)
    config.update({
        "capture.mode": "change_streams_update_full",
        "snapshot.mode": "initial",
        "tombstones.on.delete": "true",
        "heartbeat.interval.ms": "10000",
        **_CONVERTERS,
        **_TOPIC_CREATION,
    })
    return ConnectorDefinition(name=pipeline.connector_name("mongodb"), config=config)


def render(pipeline: Pipeline, settings: Settings | None = None,
           sources: list[str] | None = None) -> list[ConnectorDefinition]:
    """One connector per source that has entities (or only ``sources``). ``settings`` is accepted for the
    callers' uniform signature; nothing of it is written into a connector (the worker's environment
    says where the stack's PostgreSQL is)."""
    wanted = sources or ["postgres", "mongodb"]
    out: list[ConnectorDefinition] = []
    for source, build in (("postgres", postgres), ("mongodb", mongodb)):
        if source not in wanted or getattr(pipeline.file.sources, source) is None:
            continue
        if any(e.source == source for e in pipeline.entities.values()):
            out.append(build(pipeline))
    return out


def as_json(definition: ConnectorDefinition) -> str:
    """Kafka Connect's own form (``{"name": ..., "config": {...}}``), as ``changeflow/connectors/*.json`` hold it."""

    return json.dumps({"name": definition.name, "config": definition.config}, indent=2) + "\n"
