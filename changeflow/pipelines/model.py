"""The pipeline file's typed model (pydantic): what a user writes, checked before anything runs.

Every field has a default that makes the common case one line; ``changeflow pipeline schema`` prints the
JSON Schema of this model for editors. Names a pipeline creates (topics, groups, tables, indexes, keys)
are not written here but derived in ``pipelines.spec`` from ``namespace`` (default: ``name``).
"""

from __future__ import annotations

import importlib.metadata
import re
from functools import cache
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from changeflow.pipelines.erasure_model import ErasureSection
from changeflow.pipelines.outbox_model import OutboxSection
from changeflow.pipelines.types import UnknownTypeError, parse_type
from changeflow.pipelines.views import View

IDENTIFIER = r"^[a-z][a-z0-9_]*$"
# A secret is never inline: `${env:VAR}` (the process environment) or `${file:/path}` (a file's content).
SECRET_REF = re.compile(r"^\$\{(env|file):([^}]+)\}$")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


def _secret_ref(value: str | None, what: str) -> str | None:
    if value is not None and not SECRET_REF.match(value):
        raise ValueError(
            f"{what} is never written inline; write a reference: ${{env:VAR}} or ${{file:/path/to/secret}}"
        )
    return value


class PostgresSource(Strict):
    """A PostgreSQL database captured by Debezium's pgoutput connector."""

    host: str | None = Field(None, description="Default: the native stack's PostgreSQL (CHANGEFLOW_PG_HOST).")
    port: int | None = Field(None, description="Default: CHANGEFLOW_PG_PORT.")
    database: str
    user: str = Field("debezium", description="A role with REPLICATION and SELECT on the captured tables.")
    password: str = Field("${env:CHANGEFLOW_PG_REPLICATION_PASSWORD}", description="${env:VAR} or ${file:/path}.")
    schemas: list[str] = Field(default_factory=lambda: ["public"], description="Schemas whose tables are captured.")
    topic_prefix: str | None = Field(None, description="Debezium topic.prefix; default: the namespace.")
    connector: str | None = Field(None, description="Kafka Connect connector name; default: <namespace>-postgres.")
    slot: str | None = Field(None, description="Replication slot; default: <namespace>_<database>.")
    publication: str | None = Field(None, description="Publication; default: <namespace>_pub.")
    signal_table: str | None = Field(None, description="Debezium signal table; default: public.<namespace>_signal.")
    heartbeat_table: str | None = Field(None, description="Heartbeat table; default: public.<namespace>_heartbeat.")

    @field_validator("password")
    @classmethod
    def _password_is_reference(cls, v: str) -> str:
        return _secret_ref(v, "a password") or v


class MongoSource(Strict):
    """A MongoDB replica set captured by Debezium's change-stream connector (docker-compose here)."""

    connection: str = Field("${env:CHANGEFLOW_MONGODB_URI}", description="${env:VAR} or ${file:/path}.")
    database: str
    topic_prefix: str | None = Field(None, description="Debezium topic.prefix; default: the namespace.")
    connector: str | None = Field(None, description="Connector name; default: <namespace>-mongodb.")

    @field_validator("connection")
    @classmethod
    def _connection_is_reference(cls, v: str) -> str:
        return _secret_ref(v, "a connection string (it holds credentials)") or v


class Sources(Strict):
    postgres: PostgresSource | None = None
    mongodb: MongoSource | None = None


class FieldPolicy(Strict):
    """Which fields reach the stores. ``allow`` is the strict form: only those (and the key) leave the stream,
    so a column added at the source stays out until it is declared."""

    drop: list[str] = Field(default_factory=list, description="Never leave the database (excluded in the connector).")
    hash: list[str] = Field(default_factory=list,
                            description="Replaced by HMAC-SHA256(salt, value) in the decode stage.")
    salt: str | None = Field(None, description="The hash salt: ${env:VAR} or ${file:/path}; required with `hash`.")
    allow: list[str] | None = Field(None, description="Only these fields (plus key and derived ones) are kept.")

    @field_validator("salt")
    @classmethod
    def _salt_is_reference(cls, v: str | None) -> str | None:
        return _secret_ref(v, "a hash salt")

    @model_validator(mode="after")
    def _consistent(self) -> FieldPolicy:
        if self.hash and not self.salt:
            raise ValueError("`hash` needs a `salt` (a reference such as ${env:CHANGEFLOW_HASH_SALT})")
        both = sorted(set(self.drop) & set(self.hash))
        if both:
            raise ValueError(f"{both[0]!r} is both dropped and hashed; keep it in one list")
        return self


def _checked_type(v: str) -> str:
    try:
        return str(parse_type(v))
    except UnknownTypeError as exc:
        raise ValueError(str(exc)) from None


class Derived(Strict):
    expr: str = Field(description="A sandboxed expression over the row's fields (simpleeval), "
                                  "e.g. `decimal(price_cents) / 100`.")
    type: str = Field(description="Its column type, e.g. decimal(12,2).")

    _type = field_validator("type")(classmethod(lambda cls, v: _checked_type(v)))


ON_REJECT_DOC = (
    "What to do with a record this store refuses (a mapping conflict, a value out of range, a key's script "
    "error; not the store being down): `quarantine` (default) parks it on the pipeline's dead-letter topic "
    "for this store only and goes on (`changeflow dlq list/replay --store`); `stop` stops the worker on it, "
    "for a store where a gap is worse than a halt."
)
OnReject = Literal["quarantine", "stop"]


def store_shorthand(v: Any) -> Any:
    """``redis: true`` / ``postgres: false`` for a store's default configuration, on or off."""
    return {"enabled": v} if isinstance(v, bool) else v


@cache
def store_classes() -> dict[str, Any]:
    """Store name → its class, from the ``changeflow.stores`` entry points, in their order. Each store module
    carries its own typed ``config_model`` (Redpanda Connect's way: a component registers with its typed
    config spec), so adding a store changes no file here. The entry points are loaded by name at run time:
    the registry, not an import, ties this layer to a store (``changeflow.sinks.base.registry`` reads this)."""
    found = {ep.name: ep for ep in importlib.metadata.entry_points(group="changeflow.stores")}
    if not found:
        raise RuntimeError("no store is registered under the `changeflow.stores` entry points: changeflow is not "
                           "installed; run `pip install -e .` (or `make`) in the checkout")
    return {name: ep.load() for name, ep in found.items()}


def store_configs() -> dict[str, type[BaseModel]]:
    """Store name → the typed model of ``entities.<e>.stores.<name>``."""
    out: dict[str, type[BaseModel]] = {}
    for name, cls in store_classes().items():
        model = getattr(cls, "config_model", None)
        if isinstance(model, type) and issubclass(model, BaseModel):
            out[name] = model
    return out


class StoreConfigError(ValueError):
    """A store's own configuration is wrong: ``location`` continues the path below ``stores``."""

    def __init__(self, location: str, message: str) -> None:
        self.location, self.message = location, message
        super().__init__(f"{location}: {message}")


def _store_schemas(schema: dict[str, Any]) -> None:
    schema["properties"] = {name: model.model_json_schema() for name, model in store_configs().items()}
    schema["additionalProperties"] = False


class EntityStores(BaseModel):
    """Per registered store, whether and how an entity lands in it, validated by the store's own
    ``config_model``. A store whose class says ``opt_in = True`` (one that needs a target the user names) is
    off unless the entity names it; every other store is on with its defaults."""

    model_config = ConfigDict(extra="allow", populate_by_name=True, json_schema_extra=_store_schemas)

    @model_validator(mode="after")
    def _registered_stores(self) -> EntityStores:
        extra = self.__pydantic_extra__
        assert extra is not None
        models = store_configs()
        for name, value in list(extra.items()):
            model = models.get(name)
            if model is None:
                raise ValueError(f"unknown store {name!r}; the registered stores are: {', '.join(models)}")
            try:
                extra[name] = model.model_validate(store_shorthand(value))
            except ValidationError as exc:
                first = exc.errors()[0]
                where = ".".join(str(part) for part in (name, *first["loc"]))
                raise StoreConfigError(where, first["msg"].removeprefix("Value error, ")) from None
        for name, model in models.items():
            if name not in extra and not getattr(store_classes()[name], "opt_in", False):
                extra[name] = model.model_validate({})
        return self

    def get(self, name: str) -> Any | None:
        """The store's configuration (None when the store is not registered)."""
        return (self.__pydantic_extra__ or {}).get(name)


class DerivedEvent(Strict):
    """A fact other services subscribe to, published when an update changes any of ``when_changed`` (and
    ``when`` holds): JSON on ``<namespace>.<entity>.<event name>``, keyed like the entity's changes (so one row's
    events keep their order), with ``old_<column>`` and ``new_<column>`` for each ``when_changed`` column and the
    new value of each of ``fields``. The old values come from the change's before-image, so the table needs
    ``REPLICA IDENTITY FULL``."""

    type: str | None = Field(None, description="The event's `type` field; default: `<entity>.<event name>`.")
    when_changed: list[str] = Field(default_factory=list, description="Columns whose change emits the event.")
    when: str | None = Field(None, description="An expression over `old` and `new` (the row before and after an "
                                               "update), e.g. `old.price != new.price`; the event is emitted "
                                               "when it is true (and any `when_changed` column changed).")
    fields: list[str] = Field(default_factory=list, description="Columns the event carries (their new values).")

    @model_validator(mode="after")
    def _has_a_condition(self) -> DerivedEvent:
        if not self.when_changed and self.when is None:
            raise ValueError("an event needs `when_changed: [columns]` or `when: <expression over old and new>`")
        return self


class Entity(Strict):
    """One table or collection and where its changes land."""

    source: Literal["postgres", "mongodb"] | None = Field(None, description="Default: the pipeline's only source.")
    table: str | None = Field(None, description="PostgreSQL `schema.table` (or `table` in the first captured schema).")
    collection: str | None = Field(None, description="MongoDB collection.")
    key: list[str] | None = Field(None, description="Key columns; default: the table's primary key.")
    fields: FieldPolicy = Field(default_factory=lambda: FieldPolicy.model_validate({}))
    filter: str | None = Field(None,
                               description="Rows for which this expression is false are removed from every store.")
    derive: dict[str, Derived] = Field(default_factory=dict)
    hook: str | None = Field(None, description="`module:function` taking and returning a row, "
                                               "for what expressions cannot do.")
    columns: dict[str, str] = Field(default_factory=dict, description="Column types where the source cannot say "
                                                                      "(MongoDB) or must be overridden.")
    stores: EntityStores = Field(default_factory=lambda: EntityStores.model_validate({}))
    events: dict[Annotated[str, Field(pattern=IDENTIFIER)], DerivedEvent] = Field(
        default_factory=dict, description="Derived events by name (their topics are created only when declared).")

    @field_validator("hook")
    @classmethod
    def _hook_form(cls, v: str | None) -> str | None:
        if v is not None and not re.match(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$", v):
            raise ValueError(f"{v!r} is not `module:function` (e.g. transforms:product)")
        return v

    @field_validator("columns")
    @classmethod
    def _column_types(cls, v: dict[str, str]) -> dict[str, str]:
        return {name: _checked_type(t) for name, t in v.items()}

    @field_validator("key")
    @classmethod
    def _key_not_empty(cls, v: list[str] | None) -> list[str] | None:
        if v is not None and not v:
            raise ValueError("an empty key; list at least one column, or leave `key` out for the primary key")
        return v


class PipelineFile(Strict):
    """A changeflow pipeline: its sources, its entities and, per entity, the stores it lands in."""

    name: str = Field(pattern=IDENTIFIER, description="Lower-case identifier.")
    namespace: str | None = Field(None, pattern=IDENTIFIER,
                                  description="Names every topic, group, table, index and key; default: name.")
    sources: Sources
    entities: dict[str, Entity]
    # Room for what comes next; refused by `pipeline check` until implemented, so a file never silently
    # means less than it says.
    views: dict[str, View] = Field(default_factory=dict, description="Read models joining entities, kept fresh "
                                                                     "incrementally (README \"Read models\").")
    outbox: OutboxSection = Field(default_factory=dict, description="Outbox tables published by Debezium's "
                                                                    "outbox event router, by name.")
    erasure: ErasureSection = Field(default_factory=lambda: ErasureSection.model_validate({}),
                                    description="Who can be erased, and what refers to them (README \"Erasure\").")

    @field_validator("entities")
    @classmethod
    def _entity_names(cls, v: dict[str, Entity]) -> dict[str, Entity]:
        for name in v:
            if not re.match(IDENTIFIER, name):
                raise ValueError(f"entity name {name!r} is not a lower-case identifier (letters, digits, _)")
        if not v:
            raise ValueError("a pipeline needs at least one entity")
        return v

    @model_validator(mode="after")
    def _entities_have_sources(self) -> PipelineFile:
        available = [k for k in ("postgres", "mongodb") if getattr(self.sources, k) is not None]
        if not available:
            raise ValueError("sources: declares neither postgres nor mongodb; add a `postgres:` (or `mongodb:`) block")
        for name, entity in self.entities.items():
            if entity.source is None:
                if len(available) > 1:
                    raise ValueError(f"entities.{name}.source: two sources are declared; "
                                     "say `source: postgres` or `source: mongodb`")
                entity.source = available[0]  # type: ignore[assignment]
            if entity.source not in available:
                raise ValueError(f"entities.{name}.source: {entity.source} is not declared under `sources`")
            if entity.source == "postgres" and entity.collection is not None:
                raise ValueError(f"entities.{name}.collection: a postgres entity names a `table`")
            if entity.source == "mongodb" and entity.table is not None:
                raise ValueError(f"entities.{name}.table: a mongodb entity names a `collection`")
        for name in self.views:
            if not re.match(IDENTIFIER, name):
                raise ValueError(f"views.{name}: a view's name is a lower-case identifier (letters, digits, _)")
            if name in self.entities:
                raise ValueError(f"views.{name}: an entity has this name too; a view's topic, tables and index are "
                                 "named like an entity's, so rename the view")
        return self
