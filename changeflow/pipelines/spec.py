"""A loaded pipeline, with every name it creates resolved: what the decode stage, the stores, the reports
and the connectors all read. Pure data (no I/O): built once from the file by ``pipelines.load``.

Defaults for pipeline namespace P and entity E (README "Pipeline file" and "Defaults"): canonical topic
``P.E``, dead letters ``P.dlq``, decode group ``P``, sink groups ``P-sink-<store>``. What a store names
inside itself (keys, indexes, tables) its own module derives from ``EntitySpec.store(name)``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from changeflow.pipelines.model import Entity, PipelineFile
from changeflow.pipelines.names import split_table, topic_part
from changeflow.pipelines.types import ColumnType, parse_type
from changeflow.pipelines.views import ViewDef, ViewError, resolve

Row = dict[str, Any]


@dataclass(frozen=True)
class EntitySpec:
    """One entity of a pipeline, as every part of changeflow sees it."""

    name: str
    pipeline: str
    namespace: str
    source: str  # "postgres" | "mongodb"
    source_schema: str  # PostgreSQL schema, MongoDB database
    source_table: str  # table or collection
    key_columns: tuple[str, ...] | None  # None: the Debezium message key's columns (the primary key)
    raw_topic: str
    canonical_topic: str
    config: Entity
    # Declared column types (file `columns` and derived fields): they win over what the source says.
    declared_types: Mapping[str, ColumnType] = field(default_factory=dict)

    def store(self, name: str) -> Any | None:
        """The entity's configuration for the registered store ``name`` (its module's ``config_model``), or
        None when the entity does not land in it. Names inside a store (keys, indexes, tables) are the store
        module's to derive."""
        cfg = self.config.stores.get(name)
        return cfg if cfg is not None and cfg.enabled else None

    def stored_in(self, store: str) -> bool:
        return self.store(store) is not None

    @property
    def dropped(self) -> frozenset[str]:
        return frozenset(self.config.fields.drop)

    @property
    def hashed(self) -> frozenset[str]:
        return frozenset(self.config.fields.hash)

    @property
    def qualified_table(self) -> str:
        return f"{self.source_schema}.{self.source_table}"


class StackDefaults(Protocol):
    """What a pipeline falls back to for its source connection (``changeflow.settings.Settings`` has it)."""

    @property
    def pg_dsn(self) -> str: ...
    @property
    def pg_host(self) -> str: ...
    @property
    def pg_port(self) -> int: ...


def worker_app_id(decode_group: str) -> str:
    """The Faust app id of a worker whose decode stage reads in ``decode_group`` (``Pipeline.worker_app_id``)."""
    return f"{decode_group}-worker"


@dataclass(frozen=True)
class Pipeline:
    file: PipelineFile
    path: Path | None
    # Every projection the stores hold: captured entities and views (``source == "view"``), one namespace.
    entities: dict[str, EntitySpec]
    views: dict[str, ViewDef] = field(default_factory=dict)
    view_errors: tuple[ViewError, ...] = ()

    @property
    def name(self) -> str:
        return self.file.name

    @property
    def namespace(self) -> str:
        return self.file.namespace or self.file.name

    # --- names ---------------------------------------------------------------------------------------
    @property
    def dlq_topic(self) -> str:
        return f"{self.namespace}.dlq"

    @property
    def schema_topic(self) -> str:
        """Compacted topic holding every canonical Avro schema version (README: "Reading the canonical topics")."""
        return f"{self.namespace}.schemas"

    @property
    def decode_group(self) -> str:
        return self.namespace

    def sink_group(self, store: str) -> str:
        return f"{self.namespace}-sink-{store}"

    @property
    def views_group(self) -> str:
        """The group whose one member holds the views' lease (``views_lease_topic``)."""
        return f"{self.namespace}-views"

    @property
    def views_input_group(self) -> str:
        """The view stage's consumer of the canonical topics (its positions live in its own state)."""
        return f"{self.namespace}-views-input"

    @property
    def worker_app_id(self) -> str:
        """The worker's Faust app id: Faust's own consumer group, and the prefix of the topics Faust makes
        (``<id>-__assignor-__leader``). Another name than ``decode_group``, so Faust never joins that group."""
        return worker_app_id(self.decode_group)

    @property
    def notifications_topic(self) -> str:
        return f"{self.namespace}.debezium.notifications"

    @property
    def postgres_topic_prefix(self) -> str:
        pg = self.file.sources.postgres
        return (pg.topic_prefix if pg else None) or self.namespace

    @property
    def mongodb_topic_prefix(self) -> str:
        mg = self.file.sources.mongodb
        return (mg.topic_prefix if mg else None) or self.namespace

    @property
    def slot(self) -> str:
        pg = self.file.sources.postgres
        assert pg is not None
        return pg.slot or f"{self.namespace}_{pg.database}"

    @property
    def publication(self) -> str:
        pg = self.file.sources.postgres
        assert pg is not None
        return pg.publication or f"{self.namespace}_pub"

    @property
    def signal_table(self) -> str:
        pg = self.file.sources.postgres
        return (pg.signal_table if pg else None) or f"public.{self.namespace}_signal"

    @property
    def heartbeat_table(self) -> str:
        pg = self.file.sources.postgres
        return (pg.heartbeat_table if pg else None) or f"public.{self.namespace}_heartbeat"

    def source_dsn(self, stack: StackDefaults) -> str:
        """Where changeflow itself reads the source (reconcile, drift, rebuild, the catalog): the stack's
        role (``pg_dsn``) on the pipeline's database, host and port (else the stack's host and port)."""
        # psycopg costs 60-600 ms to import (python -X importtime; the first figure on an idle machine), and every
        # CLI command loads this module at start-up: only the commands that read the source pay it.
        from psycopg.conninfo import make_conninfo

        pg = self.file.sources.postgres
        if pg is None:
            return stack.pg_dsn
        return make_conninfo(stack.pg_dsn, dbname=pg.database, host=pg.host or stack.pg_host,
                             port=pg.port or stack.pg_port)

    def connector_name(self, source: str) -> str:
        src = getattr(self.file.sources, source)
        return (src.connector if src else None) or f"{self.namespace}-{source}"

    # --- lookups -------------------------------------------------------------------------------------
    def by_source_table(self, source: str) -> dict[tuple[str, str], EntitySpec]:
        """(schema or database, table or collection) → entity, for the decode stage."""
        return {(e.source_schema, e.source_table): e for e in self.entities.values() if e.source == source}

    def event_topics(self) -> dict[str, tuple[EntitySpec, str]]:
        """Each declared derived event's topic → (its entity, the event's name)."""
        return {f"{e.namespace}.{e.name}.{event}": (e, event)
                for e in self.entities.values() for event in e.config.events}

    def captured(self) -> list[EntitySpec]:
        """The entities read from a source (a view is computed from them, not captured)."""
        return [e for e in self.entities.values() if e.source != "view"]

    @property
    def views_lease_topic(self) -> str:
        """One partition: the worker whose view stage holds it maintains the pipeline's views (streams.views)."""
        return f"{self.namespace}.views.lease"

    @property
    def suppression_topic(self) -> str:
        """Compacted, keyed by mark: the erased rows every write path consults (streams.erasure)."""
        return f"{self.namespace}.erasure.suppressed"

    @property
    def erasure_topic(self) -> str:
        """``erasure.requested`` events, for the services that hold a copy of the person (README "Erasure")."""
        return f"{self.namespace}.erasure.requested"

    def raw_topics(self) -> dict[str, EntitySpec]:
        return {e.raw_topic: e for e in self.captured()}

    def canonical_topics(self) -> list[str]:
        return [e.canonical_topic for e in self.entities.values()]

    def stored_in(self, store: str) -> list[EntitySpec]:
        return [e for e in self.entities.values() if e.stored_in(store)]

    def entity(self, name: str) -> EntitySpec:
        try:
            return self.entities[name]
        except KeyError:
            raise KeyError(f"unknown entity {name!r}; this pipeline has: {', '.join(self.entities)}") from None


def build(file: PipelineFile, path: Path | None = None) -> Pipeline:
    namespace = file.namespace or file.name
    entities: dict[str, EntitySpec] = {}
    for name, cfg in file.entities.items():
        if cfg.source == "mongodb":
            mg = file.sources.mongodb
            assert mg is not None
            schema, table = mg.database, cfg.collection or name
            raw_topic = f"{mg.topic_prefix or namespace}.{topic_part(schema)}.{topic_part(table)}"
        else:
            pg = file.sources.postgres
            assert pg is not None
            ref = cfg.table or name
            schema, table = split_table(ref, pg.schemas[0])
            raw_topic = f"{pg.topic_prefix or namespace}.{topic_part(schema)}.{topic_part(table)}"
        declared = {col: parse_type(t) for col, t in cfg.columns.items()}
        declared.update({col: parse_type(d.type) for col, d in cfg.derive.items()})
        for col in cfg.fields.hash:
            declared[col] = parse_type("string")
        entities[name] = EntitySpec(
            name=name, pipeline=file.name, namespace=namespace, source=cfg.source or "postgres",
            source_schema=schema, source_table=table,
            key_columns=tuple(cfg.key) if cfg.key else None, raw_topic=raw_topic,
            canonical_topic=f"{namespace}.{name}", config=cfg, declared_types=declared,
        )
    views: dict[str, ViewDef] = {}
    errors: list[ViewError] = []
    for name, view in file.views.items():
        try:
            views[name] = resolve(name, view, {n: e for n, e in entities.items() if e.source != "view"})
        except ViewError as exc:
            errors.append(exc)
            continue
        root = entities[view.root]
        group = tuple(view.group_by)
        entities[name] = EntitySpec(
            name=name, pipeline=file.name, namespace=namespace, source="view", source_schema="",
            source_table=name, key_columns=group or root.key_columns, raw_topic="",
            canonical_topic=f"{namespace}.{name}",
            config=Entity.model_validate({"stores": view.stores, **({"key": list(group)} if group else {})}),
        )
    return Pipeline(file=file, path=path, entities=entities, views=views, view_errors=tuple(errors))


HookFn = Callable[[Row], Row]
