"""ClickHouse warehouse: current state per entity plus a changelog of every change.

``<database>.<table>`` (default ``<namespace>.<entity>``) is a ``ReplacingMergeTree(_version, _is_deleted)``:
the row with the highest version wins and a delete is a row with ``_is_deleted = 1``, so reads with
``FINAL`` see exactly the source's current rows and a replayed or late record changes nothing.
``<namespace>.changelog`` keeps every change once per (entity, key, version), so a replay does not double it.

Columns and their types come from the canonical schema version the records carry (the source's types):
a table is created for an entity on its first batch (or at setup, when a version is already known) and a
column the source adds gets its real type by ``ALTER TABLE ... ADD COLUMN``. Identifiers are quoted with
clickhouse-connect's own quoting, never by hand.

An insert is accepted or refused as a whole, so a batch holding one row ClickHouse cannot take (a value out
of its column's range, a row the server refuses: :func:`row_rejection`) is refused as a whole
(``sinks.base.RefusedBatch``), and the runner bisects it (``sinks.runner.write_bisecting``): the halves are
written again down to the refused rows, which are quarantined, and every other row lands. A failure of the
server itself (unreachable, authentication, a missing table or database, "not now" codes) is not bisected:
retried or fatal as before.
"""

from __future__ import annotations

import logging
import math
import re
import struct
from collections.abc import Iterator, Mapping, Sequence
from datetime import UTC, datetime, time
from decimal import Decimal
from typing import TYPE_CHECKING, Any, cast

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings

from changeflow.lazy import lazy_import
from changeflow.pipelines.model import ON_REJECT_DOC, OnReject, Strict
from changeflow.pipelines.outbox import event_log_table
from changeflow.pipelines.outbox import specs as outbox_specs
from changeflow.pipelines.problems import Problem, StoredColumns
from changeflow.pipelines.spec import EntitySpec, Pipeline
from changeflow.pipelines.types import ColumnType
from changeflow.schemas import json
from changeflow.schemas.book import schema_book
from changeflow.settings import env_config
from changeflow.sinks.base import (
    FatalSinkError,
    RefusedBatch,
    Rejected,
    RetriableSinkError,
    Versioned,
    applied_through,
    source_row,
    stored_name,
)
from changeflow.streams.records import ChangeRecord

if TYPE_CHECKING:
    import clickhouse_connect
    from clickhouse_connect.driver import binding
    from clickhouse_connect.driver import exceptions as driver_errors

    from changeflow.settings import Settings
else:  # the client library is imported on first use, since loading a pipeline imports this module. Measured on the
    # 2-core dev box (a demo running), median of 7 cold runs, before and after back to back, twice: import +
    # `load(examples/commerce/pipeline.yml)` took 455 / 442 ms of CPU (497 / 445 ms wall) with clickhouse_connect
    # imported here, of which clickhouse_connect ~97 ms (python -X importtime, cumulative); lazy, 371 / 376 ms of
    # CPU (384 / 390 ms wall) and clickhouse_connect not imported. The driver's exception classes are read as
    # `driver_errors.X` in each except clause and isinstance, which Python evaluates only when an exception reaches it.
    clickhouse_connect = lazy_import("clickhouse_connect")
    binding = lazy_import("clickhouse_connect.driver.binding")
    driver_errors = lazy_import("clickhouse_connect.driver.exceptions")

log = logging.getLogger("changeflow.sinks")

# `_key` is the canonical key text (composite keys included), so every lookup by key is one String
# comparison whatever the key's columns and types; the key columns themselves are typed and the ORDER BY.
META_COLUMNS = {"_key": "String", "_version": "UInt64", "_is_deleted": "UInt8", "_ts_ms": "Int64",
                "_ingested_at": "DateTime64(3, 'UTC')"}
CHUNK = 2000
CHANGELOG_COLUMNS = ["entity", "key", "op", "version", "ts_ms", "before", "after", "ingested_at"]
# The pipeline's own tables in its home database (changelog, applied-through), which no entity may take.
RESERVED_TABLES = frozenset({"changelog"})


class ClickHouseSettings(BaseSettings):
    """Where the ClickHouse store connects: ``CHANGEFLOW_CLICKHOUSE_*``, the native stack's server by default."""

    model_config = env_config("CHANGEFLOW_CLICKHOUSE_")

    host: str = "127.0.0.1"
    port: int = 8123
    user: str = "default"
    # Unset (or empty): the one the native stack's server was started with (<state_dir>/secrets/clickhouse_password).
    password: SecretStr | None = None
    # lz4 on inserts and results costs CPU at both ends and saves nothing over loopback (measured: a sixth
    # of the ClickHouse sink's time); turn it on when ClickHouse is across a network.
    compress: bool = False

    @classmethod
    def load(cls, settings: Settings) -> ClickHouseSettings:
        own = cls()
        if own.password is None or not own.password.get_secret_value():
            own.password = settings.stored_secret("clickhouse_password")
        return own


class ClickHouseConfig(Strict):
    """``entities.<e>.stores.clickhouse``: on by default."""

    enabled: bool = True
    database: str | None = Field(None, description="Default: the namespace.")
    table: str | None = Field(None, description="Default: the entity name.")
    order_by: list[str] | None = Field(None, description="Default: the key columns.")
    types: dict[str, str] = Field(default_factory=dict,
                                  description="ClickHouse column types that override the derived ones.")
    on_reject: OnReject = Field("quarantine", description=ON_REJECT_DOC)


def config(spec: EntitySpec) -> ClickHouseConfig | None:
    """The entity's ClickHouse configuration, or None when it does not land in ClickHouse."""
    return cast("ClickHouseConfig | None", spec.store(ClickHouseStore.name))


def home_database(pipeline: Pipeline) -> str:
    """The database of the pipeline's own tables (changelog, applied_through, reconcile's history and the
    report views): ClickHouse is the reports' home store (ARCHITECTURE.md)."""
    return pipeline.namespace


def table_of(spec: EntitySpec) -> tuple[str, str]:
    """(database, table) of the entity: default (``<namespace>``, ``<entity>``)."""
    cfg = spec.config.stores.get(ClickHouseStore.name)
    return ((cfg.database if cfg is not None else None) or spec.namespace,
            (cfg.table if cfg is not None else None) or spec.name)


def check_columns(spec: EntitySpec, columns: StoredColumns) -> list[Problem]:
    """``order_by`` and ``types`` name columns that reach the store."""
    cfg = config(spec)
    if cfg is None:
        return []
    at = f"entities.{spec.name}.stores.clickhouse"
    out: list[Problem] = []
    for name in cfg.order_by or ():
        if name in spec.dropped:
            out.append(Problem(f"{at}.order_by", f"{name!r} is dropped; order by kept columns"))
        elif (problem := columns.unknown(f"{at}.order_by", name)) is not None:
            out.append(problem)
    for name in cfg.types:
        if (problem := columns.unknown(f"{at}.types.{name}", name)) is not None:
            out.append(problem)
    return out


def check_tables(pipeline: Pipeline) -> list[Problem]:
    out: list[Problem] = []
    seen: dict[tuple[str, str], str] = {}
    for spec in pipeline.stored_in(ClickHouseStore.name):
        at, target = f"entities.{spec.name}.stores.clickhouse.table", table_of(spec)
        if target in seen:
            out.append(Problem(at, f"{'.'.join(target)} is also entity {seen[target]!r}'s table; give each entity "
                                   f"its own (default: {spec.namespace}.{spec.name})"))
        elif target[0] == home_database(pipeline) and target[1] in RESERVED_TABLES:
            out.append(Problem(at, f"{'.'.join(target)} is the pipeline's own table; choose another `table`"))
        seen.setdefault(target, spec.name)
    # An outbox's event log is a table of the home database too (`outbox: <name>: event_log: true`).
    for outbox in outbox_specs(pipeline):
        target = (home_database(pipeline), event_log_table(outbox))
        if outbox.config.event_log and target in seen:
            out.append(Problem(f"outbox.{outbox.name}.event_log",
                               f"entity {seen[target]} already lands in ClickHouse table {'.'.join(target)}, this "
                               "outbox's event log; give the entity another `stores.clickhouse.table`"))
    return out


# Server error codes that say "not now" rather than "never": the server is shutting down or overloaded, a
# timeout, too many parts to merge, a replica gone read-only. The batch is retried; anything else (a type
# mismatch, an unknown column) is the batch's fault and stops the worker.
RETRIABLE_CODES = frozenset({
    159,  # TIMEOUT_EXCEEDED
    164,  # READONLY
    202,  # TOO_MANY_SIMULTANEOUS_QUERIES
    209,  # SOCKET_TIMEOUT
    210,  # NETWORK_ERROR (also "Server is shutting down")
    241,  # MEMORY_LIMIT_EXCEEDED
    242,  # TABLE_IS_READ_ONLY
    252,  # TOO_MANY_PARTS
    394,  # QUERY_WAS_CANCELLED
    999,  # KEEPER_EXCEPTION
})
_CODE = re.compile(r"Code: (\d+)\.")


# Server error codes that are about the server or the table, never one row: not bisected (fatal as before).
STORE_CODES = frozenset({
    8,  # THERE_IS_NO_COLUMN
    60,  # UNKNOWN_TABLE
    62,  # SYNTAX_ERROR (ours, not the data's: values travel in Native blocks)
    81,  # UNKNOWN_DATABASE
    115,  # UNKNOWN_SETTING
    192,  # UNKNOWN_USER
    194,  # REQUIRED_PASSWORD
    195,  # IP_ADDRESS_NOT_ALLOWED
    452,  # SETTING_CONSTRAINT_VIOLATION
    497,  # ACCESS_DENIED
    516,  # AUTHENTICATION_FAILED
})
# Errors the client raises while serialising a column: one value does not fit its column's type.
# Server codes that say the rows were refused (the batch is bisected to find them); only these.
ROW_CODES = frozenset({
    6,  # CANNOT_PARSE_TEXT
    27,  # CANNOT_PARSE_INPUT_ASSERTION_FAILED
    38,  # CANNOT_PARSE_DATE
    41,  # CANNOT_PARSE_DATETIME
    53,  # TYPE_MISMATCH
    69,  # ARGUMENT_OUT_OF_BOUND
    70,  # CANNOT_CONVERT_TYPE
    72,  # CANNOT_PARSE_NUMBER
    131,  # TOO_LARGE_STRING_SIZE
    321,  # VALUE_IS_OUT_OF_RANGE_OF_DATA_TYPE
    349,  # CANNOT_INSERT_NULL_IN_ORDINARY_COLUMN
    407,  # DECIMAL_OVERFLOW
    469,  # VIOLATED_CONSTRAINT
    691,  # UNKNOWN_ELEMENT_OF_ENUM
})
VALUE_ERRORS = (ValueError, TypeError, OverflowError, AttributeError, struct.error, ArithmeticError)


def error_code(exc: BaseException) -> int | None:
    match = _CODE.search(str(exc))
    return int(match.group(1)) if match else None


def _reason(exc: BaseException) -> str:
    """The error and what caused it (the driver wraps the value's own error: "short format requires ...")."""
    parts: list[str] = []
    seen: BaseException | None = exc
    while seen is not None and len(parts) < 3:
        text = f"{type(seen).__name__}: {str(seen).strip()}"
        if text not in parts:
            parts.append(text)
        seen = seen.__cause__ or seen.__context__
    return "; caused by ".join(parts)[:1000]


def row_rejection(exc: Exception) -> str | None:
    """The reason when an insert failed because of the rows it carried (then the batch is bisected), or None
    when the server itself failed (unreachable, authentication, a missing table, "not now")."""
    if isinstance(exc, driver_errors.OperationalError) or is_retriable(exc):
        return None
    code = error_code(exc)
    if (isinstance(exc, VALUE_ERRORS) and not isinstance(exc, driver_errors.DatabaseError)) \
            or isinstance(exc, driver_errors.DataError) \
            or refuses_every_row(exc):
        return _reason(exc)  # the client could not encode a value, or the rows carry a column the table lacks
    if code is not None and code in ROW_CODES:
        return _reason(exc)
    # Anything else (a proxy's 503 without a server code, disk full, an aborted query, a code not known to be
    # about the data) is the store's: retried or fatal, never a batch quarantined and committed.
    return None


def refuses_every_row(exc: Exception) -> bool:
    """An insert the client refuses before sending any row (a column the table does not have): every row of
    the insert is refused for the same reason, so bisecting would only repeat it."""
    return isinstance(exc, driver_errors.ProgrammingError) and "Unrecognized column" in str(exc)


def is_retriable(exc: Exception) -> bool:
    """Whether a ClickHouse server error is worth retrying (by its error code in the message)."""
    match = _CODE.search(str(exc))
    return match is not None and int(match.group(1)) in RETRIABLE_CODES


def client_for(settings: Settings, own: ClickHouseSettings | None = None) -> Any:
    """A clickhouse-connect client of the store's server (``own``: other connection settings than the
    environment's)."""
    own = own or ClickHouseSettings.load(settings)
    return clickhouse_connect.get_client(
        host=own.host,
        port=own.port,
        username=own.user,
        password=own.password.get_secret_value() if own.password else "",
        connect_timeout=10,
        send_receive_timeout=60,
        compress=own.compress,
    )


def q(name: str) -> str:
    return binding.quote_identifier(name)


def qualified(spec: EntitySpec) -> str:
    """The entity's table, quoted: ``` `database`.`table` ```."""
    database, table = table_of(spec)
    return f"{q(database)}.{q(table)}"


def column_type(t: ColumnType, nullable: bool = True) -> str:
    """The ClickHouse type of a column type (README "Types")."""
    k = t.kind
    if k == "array":
        assert t.item is not None
        return f"Array({column_type(t.item)})"  # arrays cannot be Nullable: a null array is []
    # Integers as Int64 and floats as Float64 whatever their source width: a widening at the source (int16 →
    # int32 → int64, real → double) keeps its Avro fingerprint and changes no column here, so a value that
    # needs the new width must fit the column already made.
    base = {
        "int16": "Int64", "int32": "Int64", "int64": "Int64", "float32": "Float64", "float64": "Float64",
        "bool": "Bool", "date": "Date32", "timestamp": "DateTime64(6, 'UTC')", "timestamptz": "DateTime64(6, 'UTC')",
        "interval": "Int64",
    }.get(k)
    if k == "decimal" and t.precision is not None:
        base = f"Decimal({t.precision}, {t.scale})"
    if base is None:
        base = "String"  # string, uuid, enum, json (JSON text), bytes, time/timetz (ISO text), exact decimals
    return f"Nullable({base})" if nullable else base


def col(name: str) -> str:
    """A source column's name in the table: its own, unless it is one of the store's (META_COLUMNS)."""
    return stored_name(name, META_COLUMNS)


def table_columns(spec: EntitySpec, columns: Mapping[str, ColumnType], key_columns: Sequence[str]) -> dict[str, str]:
    """Stored column name → ClickHouse type."""
    cfg = config(spec)
    overrides = cfg.types if cfg is not None else {}
    return {col(name): overrides.get(name) or column_type(t, nullable=name not in key_columns)
            for name, t in columns.items()}


def table_ddl(spec: EntitySpec, columns: Mapping[str, str], key_columns: Sequence[str]) -> str:
    cols = ",\n  ".join(f"{q(n)} {t}" for n, t in {**columns, **META_COLUMNS}.items())
    cfg = config(spec)
    order = [col(c) for c in (cfg.order_by if cfg is not None else None) or key_columns]
    order = order or ["_key"]
    return (
        f"CREATE TABLE IF NOT EXISTS {qualified(spec)} (\n  {cols}\n)\n"
        f"ENGINE = ReplacingMergeTree(_version, _is_deleted)\nORDER BY ({', '.join(q(c) for c in order)})"
    )


def applied_ddl(database: str) -> str:
    """The highest source position applied per entity ("as of LSN X"); the highest version wins."""
    return (
        f"CREATE TABLE IF NOT EXISTS {q(database)}.applied_through (\n"
        "  entity LowCardinality(String), version UInt64, ts_ms Int64, updated_at DateTime64(3, 'UTC')\n"
        ")\nENGINE = ReplacingMergeTree(version)\nORDER BY entity"
    )


def reconciliation_runs_ddl(database: str) -> str:
    """``changeflow reconcile``'s history, one row per entity and store of each run (reports.reconcile)."""
    return (
        f"CREATE TABLE IF NOT EXISTS {q(database)}.reconciliation_runs (\n"
        "  run_id String, run_at DateTime64(3, 'UTC'), mode LowCardinality(String),\n"
        "  entity LowCardinality(String), store LowCardinality(String),\n"
        "  source_count UInt64, store_count UInt64, missing UInt64, missing_in_store UInt64,\n"
        "  missing_in_source UInt64, stale UInt64, mismatched UInt64, drift UInt64,\n"
        "  buckets UInt32, differing_buckets UInt32, error Nullable(String), duration_ms UInt64,\n"
        "  repair_of String\n"
        ")\nENGINE = MergeTree\nORDER BY (entity, store, run_at)"
    )


def reconciliation_diffs_ddl(database: str) -> str:
    """Each run's differing keys (reports.reconcile)."""
    return (
        f"CREATE TABLE IF NOT EXISTS {q(database)}.reconciliation_diffs (\n"
        "  run_id String, run_at DateTime64(3, 'UTC'), entity LowCardinality(String),\n"
        "  store LowCardinality(String), key String, kind LowCardinality(String), detail String,\n"
        "  store_version Nullable(UInt64)\n"
        ")\nENGINE = MergeTree\nORDER BY (run_id, entity, store, key)"
    )


def changelog_ddl(database: str) -> str:
    return (
        f"CREATE TABLE IF NOT EXISTS {q(database)}.changelog (\n"
        "  entity LowCardinality(String), key String, op LowCardinality(String), version UInt64,\n"
        "  ts_ms Int64, before Nullable(String), after Nullable(String), ingested_at DateTime64(3, 'UTC')\n"
        ")\nENGINE = ReplacingMergeTree\nORDER BY (entity, key, version)"
    )


def ticks_ms(moment: datetime) -> int:
    """A DateTime64(3) value as the driver writes it: milliseconds since the epoch. Given as an int, the
    driver skips its per-row conversion of datetimes (a Python call per row of every batch)."""
    return (math.floor(moment.timestamp()) * 1_000_000 + moment.microsecond) // 1000


def to_column(value: Any, t: ColumnType | None) -> Any:
    """A canonical value as its ClickHouse column takes it."""
    if value is None:
        return [] if t is not None and t.kind == "array" else None
    if t is None:
        return value if isinstance(value, str) else json.dumps(value).decode()
    k = t.kind
    if k == "json":
        return json.dumps(value).decode()
    if k == "array":
        return [to_column(v, t.item) for v in value]
    if k in ("time", "timetz") and isinstance(value, time):
        return value.isoformat()
    if k == "decimal" and t.precision is None:
        return format(value, "f") if isinstance(value, Decimal) else str(value)
    if k in ("string", "uuid", "enum") and not isinstance(value, str):
        return str(value)
    if k == "bytes" and isinstance(value, str):
        return value.encode()
    return value


def from_column(value: Any, t: ColumnType | None) -> Any:
    """Undo ``to_column`` where the stored form differs (JSON text, exact decimal text)."""
    if value is None or t is None:
        return value
    if t.kind == "json" and isinstance(value, str):
        return json.loads(value)
    if t.kind == "decimal" and t.precision is None and isinstance(value, str):
        return Decimal(value)
    return value


def tombstone_image(record: ChangeRecord) -> dict[str, Any]:
    """The columns a delete's row carries: its key columns, from the before image (nothing else of it)."""
    before = record.before or {}
    return {c: before.get(c) for c in record.key_columns}


def isolate(spec: EntitySpec, cfg: ClickHouseConfig, tag: str, namespace: str) -> ClickHouseConfig:
    """The configuration of an isolated copy of the entity (the bench's stages): its table in the copy's
    namespace database."""
    return cfg.model_copy(update={"database": namespace})


class ClickHouseStore:
    name = "clickhouse"
    config_model = ClickHouseConfig
    check_entity = staticmethod(check_columns)
    check_pipeline = staticmethod(check_tables)
    isolate = staticmethod(isolate)
    # The bench's target for a fresh table's snapshot into this store (`changeflow bench`, snapshot stage).
    snapshot_target_rows_per_s = 50_000
    # An Array column cannot be Nullable in ClickHouse: a NULL array is written as [] (to_column).
    null_is_empty = frozenset({"array"})

    def __init__(self, settings: Settings, pipeline: Pipeline, own: ClickHouseSettings | None = None) -> None:
        self.settings = settings
        self.own = own
        self.pipeline = pipeline
        self.database = home_database(pipeline)
        self._client: Any = None
        # entity → {column: ClickHouse type} as the table has it (read once, kept up to date by ALTERs)
        self._tables: dict[str, dict[str, str]] = {}
        self._types: dict[str, dict[str, ColumnType]] = {}
        self._book_types: dict[str, dict[str, ColumnType]] | None = None

    @property
    def client(self) -> Any:
        if self._client is None:
            try:
                self._client = client_for(self.settings, self.own)
            except (driver_errors.OperationalError, OSError) as exc:
                raise RetriableSinkError(f"clickhouse unavailable: {exc}") from exc
        return self._client

    def _classify(self, exc: Exception, what: str) -> Exception:
        """Connection trouble and "not now" server codes are retried on a new client; anything else is fatal."""
        if isinstance(exc, driver_errors.OperationalError) or is_retriable(exc):
            self._client = None
            return RetriableSinkError(f"clickhouse: {exc}")
        return FatalSinkError(f"clickhouse rejected {what}: {exc}")

    def table(self, spec: EntitySpec) -> str:
        return qualified(spec)

    def setup(self, known: Mapping[str, Any] | None = None) -> None:
        # clickhouse-connect imports pandas on a process's first insert (seconds of CPU): paid here, before
        # the first batch, so a starting sink does not stall with records in hand.
        from clickhouse_connect.driver import options

        _ = options.pd
        try:
            databases = {self.database} | {table_of(s)[0] for s in self.pipeline.stored_in(self.name)}
            for db in sorted(databases):
                self.client.command(f"CREATE DATABASE IF NOT EXISTS {q(db)}")
            # The pipeline's own tables, reconcile's history among them: queryable before any command ran.
            for ddl in (changelog_ddl, applied_ddl, reconciliation_runs_ddl, reconciliation_diffs_ddl):
                self.client.command(ddl(self.database))
            for entity, sv in (known or {}).items():
                spec = self.pipeline.entities.get(entity)
                if spec is not None and config(spec) is not None:
                    self._ensure_table(spec, sv.columns, sv.key_columns)
        except driver_errors.OperationalError as exc:
            raise RetriableSinkError(f"clickhouse: {exc}") from exc

    def _existing_columns(self, spec: EntitySpec) -> dict[str, str]:
        rows = self.client.query(
            "SELECT name, type FROM system.columns WHERE database = {db:String} AND table = {t:String} "
            "ORDER BY position",
            parameters=dict(zip(("db", "t"), table_of(spec), strict=True)),
        ).result_rows
        return {name: t for name, t in rows}

    def _ensure_table(self, spec: EntitySpec, columns: Mapping[str, ColumnType], key_columns: Sequence[str]) -> None:
        """The entity's table holds every column of this schema version, with its type."""
        types = self._types.setdefault(spec.name, {})
        if all(n in types for n in columns) and spec.name in self._tables:
            return
        existing = self._tables.get(spec.name)
        if existing is None:
            existing = self._existing_columns(spec)
        wanted = table_columns(spec, columns, key_columns)
        if not existing:
            self.client.command(table_ddl(spec, wanted, key_columns))
            existing = self._existing_columns(spec)
            log.info("event=table_created table=%s columns=%d", self.table(spec), len(wanted))
        for name, ch_type in wanted.items():
            if name not in existing:
                self.client.command(
                    f"ALTER TABLE {self.table(spec)} ADD COLUMN IF NOT EXISTS {q(name)} {ch_type}"
                )
                existing[name] = ch_type
                log.info("event=column_added table=%s column=%r type=%s", self.table(spec), name, ch_type)
        self._tables[spec.name] = existing
        types.update(columns)

    # --- what a reader sees now (the bench's freshness and snapshot figures) -----------------------------
    visibility_poll_s = 0.05
    visibility_batch = 10_000

    def visible(self, spec: EntitySpec, keys: list[str]) -> set[str]:
        """The keys a query finds (without FINAL: a row is there as soon as its insert is)."""
        rows = self.client.query(f"SELECT DISTINCT _key FROM {qualified(spec)} WHERE _key IN {{keys:Array(String)}}",
                                 parameters={"keys": keys}).result_rows
        return {str(k) for (k,) in rows}

    def visible_count(self, spec: EntitySpec) -> int:
        try:
            return int(self.client.command(f"SELECT uniqExact(_key) FROM {qualified(spec)}"))
        except driver_errors.DatabaseError:  # the table is created with the entity's first batch
            return 0

    def snapshot_reads_since(self, entity: str, since: datetime) -> int:
        """Distinct keys of the entity that a snapshot read brought to the changelog since ``since``
        (``changeflow rebuild``'s progress)."""
        return int(self.client.command(
            f"SELECT uniqExact(key) FROM {q(self.database)}.changelog "
            "WHERE entity = {e:String} AND op = 'r' AND ingested_at >= {t:DateTime64(3, 'UTC')}",
            parameters={"e": entity, "t": since},
        ))

    # The store users query reports in: report modules create their views here (reports.objects), through
    # this one method, once the store has set up its tables.
    reports_queried_here = True
    # The changelog keeps every image: keys_where finds a row by what it once held too (sinks.base.Store).
    keeps_history = True

    def create_report_view(self, statement: str) -> None:
        """Run one report module's ``CREATE OR REPLACE VIEW`` in this store. Raises the server's error."""
        try:
            self.client.command(statement)
        except driver_errors.OperationalError as exc:
            self._client = None
            raise RetriableSinkError(f"clickhouse: {exc}") from exc

    def column_types(self, spec: EntitySpec) -> dict[str, ColumnType]:
        return self._types.get(spec.name, {})

    def fetch_current(self, entity: str, keys: list[str]) -> dict[str, dict[str, Any]]:
        spec = self.pipeline.entities[entity]
        if config(spec) is None:
            return {}
        try:
            return {k: v.row for k, v in self.fetch(spec, keys).items()}
        except driver_errors.OperationalError as exc:
            self._client = None
            raise RetriableSinkError(f"clickhouse: {exc}") from exc

    def write_batch(self, records: Sequence[ChangeRecord]) -> list[Rejected]:
        records = [r for r in records if config(self.pipeline.entities[r.entity]) is not None]
        if not records:
            return []
        try:
            for r in records:
                if r.schema is not None and not all(n in self._types.get(r.entity, {}) for n in r.schema.columns):
                    self._ensure_table(self.pipeline.entities[r.entity], r.schema.columns, r.schema.key_columns)
        except (driver_errors.OperationalError, driver_errors.DatabaseError) as exc:
            raise self._classify(exc, "a schema change") from exc
        now = datetime.now(UTC)
        by_entity: dict[str, list[ChangeRecord]] = {}
        for record in records:
            by_entity.setdefault(record.entity, []).append(record)
        refused: dict[int, Rejected] = {}
        try:
            for entity, group in by_entity.items():
                spec = self.pipeline.entities[entity]
                table = ".".join(table_of(spec))
                try:
                    self._insert_entity(table, entity, group, now)
                except Exception as exc:
                    why = row_rejection(exc)
                    if why is None:
                        raise
                    if not refuses_every_row(exc):  # the runner bisects the batch (sinks.runner.write_bisecting)
                        which = self._which_value(entity, group[0], why) if len(group) == 1 else ""
                        raise self._refused(f"clickhouse {table}: {why}{which}", records, now) from exc
                    refused.update((id(r), Rejected(r, f"clickhouse {table}: {why}")) for r in group)
            kept = [r for r in records if id(r) not in refused]
            try:
                if kept:
                    self._insert_changelog(kept, now)
            except Exception as exc:
                why = row_rejection(exc)
                if why is None:
                    raise
                raise self._refused(f"clickhouse {self.database}.changelog: {why}", records, now) from exc
            # Every record of the batch is handled (written, or quarantined by the runner): the marker moves.
            self._mark_applied(records, now)
        except (driver_errors.OperationalError, driver_errors.DatabaseError) as exc:
            raise self._classify(exc, "the batch") from exc
        return [refused[id(r)] for r in records if id(r) in refused]

    def _refused(self, reason: str, records: Sequence[ChangeRecord], now: datetime) -> RefusedBatch:
        """The call refused for its rows. The marker moves over its records first, as for a written batch: the
        runner writes each of them by a smaller part or quarantines it before the batch's offsets are committed,
        so the marker ends where it did when this store bisected by itself, and is ahead of the rows only while
        the batch is in flight (as the search store's, whose marker is the first action of its bulk request)."""
        self._mark_applied(records, now)
        return RefusedBatch(reason)

    def _mark_applied(self, records: Sequence[ChangeRecord], now: datetime) -> None:
        self.client.insert(
            f"{self.database}.applied_through",
            [[e, v, t, now] for e, (v, t) in applied_through(records).items()],
            column_names=["entity", "version", "ts_ms", "updated_at"],
        )

    def _which_value(self, entity: str, record: ChangeRecord, reason: str) -> str:
        """The refused column and its type, when the error names the column (the driver's does). Never the
        value: a reason reaches dead-letter headers and logs, which carry keys and reasons, not row values."""
        match = re.search(r"column `([^`]+)`", reason)
        column = match.group(1) if match else None
        if column is None or column not in self._tables.get(entity, {}):
            return ""
        return f" (column `{column}` {self._tables[entity][column]})"

    def _insert_entity(self, table: str, entity: str, group: Sequence[ChangeRecord], now: datetime) -> None:
        # Column-oriented: the Native format is columnar, so building columns here spares the client a
        # row-to-column pivot of every batch.
        types = self._types.get(entity, {})
        names = list(types)
        # A delete's row (the tombstone ReplacingMergeTree keeps until a merge with cleanup) holds the key
        # columns only: every other column is NULL (or its default), so no value of the deleted row outlives
        # it in the table, not even through OPTIMIZE ... FINAL.
        images = [r.after if r.after is not None else tombstone_image(r) for r in group]
        columns: list[list[Any]] = [[to_column(image.get(col), types[col]) for image in images] for col in names]
        columns += [
            [r.key for r in group],
            [r.version for r in group],
            [1 if r.is_delete else 0 for r in group],
            [r.ts_ms for r in group],
            [ticks_ms(now)] * len(group),
        ]
        self.client.insert(table, columns, column_names=[*map(col, names), *META_COLUMNS], column_oriented=True)

    def _insert_changelog(self, records: Sequence[ChangeRecord], now: datetime) -> None:
        changelog = [
            [r.entity for r in records],
            [r.key for r in records],
            [r.op for r in records],
            [r.version for r in records],
            [r.ts_ms for r in records],
            # UTF-8 bytes as they are: the driver writes a String column of bytes without re-encoding text.
            [None if r.before is None else json.dumps(r.before) for r in records],
            [None if r.after is None else json.dumps(r.after) for r in records],
            [ticks_ms(now)] * len(records),
        ]
        self.client.insert(f"{self.database}.changelog", changelog, column_names=CHANGELOG_COLUMNS,
                           column_oriented=True)

    # --- the tools ----------------------------------------------------------------------------------
    def _known(self, spec: EntitySpec) -> bool:
        if spec.name not in self._tables:
            existing = self._existing_columns(spec)
            if not existing:
                return False
            self._tables[spec.name] = existing
        return True

    def _read_types(self, spec: EntitySpec) -> Mapping[str, ColumnType]:
        """The column types reads decode with: those this process wrote with, else the newest schema
        version's (a reconcile or drift process writes nothing). Kept apart from ``_types``, which says
        which columns the table is known to have."""
        written = self._types.get(spec.name)
        if written:
            return written
        if self._book_types is None:
            try:
                latest = schema_book(self.settings, self.pipeline, writer=False).latest
                self._book_types = {e: dict(sv.columns) for e, sv in latest.items()}
            except Exception as exc:  # Kafka unreachable: bytes read as text, as before
                log.warning("event=schema_book_unavailable error=%r", str(exc)[:200])
                self._book_types = {}
        return self._book_types.get(spec.name, {})

    def _select(self, spec: EntitySpec, where: str = "", parameters: dict[str, Any] | None = None) -> Any:
        # clickhouse-connect reads a String as text and turns bytes that are not UTF-8 into their hex: a
        # bytea column is read as bytes, as it was written.
        binary = {col(n): "bytes" for n, t in self._read_types(spec).items() if t.kind == "bytes"}
        return self.client.query(
            f"SELECT * EXCEPT (_is_deleted, _ts_ms, _ingested_at), _version AS `__v` "
            f"FROM {self.table(spec)} FINAL WHERE _is_deleted = 0 {where}",
            parameters=parameters, column_formats=binary or None,
        )

    def _rows(self, spec: EntitySpec, result: Any) -> Iterator[tuple[str, dict[str, Any], int | None]]:
        names = list(result.column_names)
        types = self._read_types(spec)
        for values in result.result_rows:
            row = dict(zip(names, values, strict=True))
            version = row.pop("__v")
            key = row.pop("_key")
            row.pop("_version", None)  # the store's own; a source column of that name is `_version_` here
            row = source_row(row, META_COLUMNS)
            yield key, {k: from_column(v, types.get(k)) for k, v in row.items()}, int(version)

    def scan(self, spec: EntitySpec) -> Iterator[tuple[str, dict[str, Any], int | None]]:
        if self._known(spec):
            yield from self._rows(spec, self._select(spec))

    @staticmethod
    def _chunks(keys: list[str]) -> Iterator[list[str]]:
        for i in range(0, len(keys), CHUNK):
            yield keys[i : i + CHUNK]

    def _key_cond(self, keys: list[str], column: str = "_key") -> str:
        """``col IN (...)`` with quoted literals: a long bound array is too long for a URL parameter."""

        return f"{q(column)} IN ({', '.join(binding.format_query_value(k) for k in keys)})"

    def fetch(self, spec: EntitySpec, keys: list[str]) -> dict[str, Versioned]:
        out: dict[str, Versioned] = {}
        if not keys or not self._known(spec):
            return out
        for chunk in self._chunks(keys):
            for k, row, v in self._rows(spec, self._select(spec, f"AND {self._key_cond(chunk)}")):
                out[k] = Versioned(row, v)
        return out

    def count(self, spec: EntitySpec) -> int:
        if not self._known(spec):
            return 0
        return int(self.client.command(f"SELECT count() FROM {self.table(spec)} FINAL WHERE _is_deleted = 0"))

    def delete(self, spec: EntitySpec, keys: list[str]) -> None:
        if not self._known(spec):
            return
        for chunk in self._chunks(keys):
            self.client.command(
                f"ALTER TABLE {self.table(spec)} DELETE WHERE {self._key_cond(chunk)} SETTINGS mutations_sync = 2"
            )

    def drop_versions_above(self, spec: EntitySpec, keys: list[str], position: int) -> list[str]:
        ahead: list[str] = []
        if not self._known(spec):
            return ahead
        for chunk in self._chunks(keys):
            where = f"{self._key_cond(chunk)} AND _version > {int(position)}"
            found = [str(k) for (k,) in self.client.query(
                f"SELECT DISTINCT _key FROM {self.table(spec)} WHERE {where}"
            ).result_rows]
            if found:
                self.client.command(f"ALTER TABLE {self.table(spec)} DELETE WHERE {where} SETTINGS mutations_sync = 2")
            ahead += found
        return ahead

    # --- erasure (changeflow.erasure) ---------------------------------------------------------------
    def keys_where(self, spec: EntitySpec, column: str, values: Sequence[str]) -> list[str]:
        stored = col(column)
        if not values or not self._known(spec) or stored not in self._tables.get(spec.name, {}):
            return []
        found: set[str] = set()
        # Every version the table and the changelog still hold, not only the live one: a row whose link was
        # cut at the source, or by an erasure that stopped half-way, still has its history to remove.
        for chunk in self._chunks(sorted(set(values))):
            listed = ", ".join(binding.format_query_value(v) for v in chunk)
            found.update(str(k) for (k,) in self.client.query(
                f"SELECT DISTINCT _key FROM {self.table(spec)} WHERE toString({q(stored)}) IN ({listed})"
            ).result_rows)
            image = "trim(BOTH '\"' FROM JSONExtractRaw({}, {}))"
            found.update(str(k) for (k,) in self.client.query(
                f"SELECT DISTINCT key FROM {q(self.database)}.changelog "
                f"WHERE entity = {binding.format_query_value(spec.name)} "
                f"AND ({image.format('after', binding.format_query_value(column))} IN ({listed}) "
                f"OR {image.format('before', binding.format_query_value(column))} IN ({listed}))"
            ).result_rows)
        return sorted(found)

    def _has_table(self, database: str, table: str) -> bool:
        return bool(int(self.client.command(
            "SELECT count() FROM system.tables WHERE database = {db:String} AND name = {t:String}",
            parameters={"db": database, "t": table})))

    def _erasure_conds(self, keys: list[str], keep: Mapping[str, int] | None, key: str, version: str
                       ) -> Iterator[str]:
        """WHERE conditions (quoted literals) selecting what ``forget`` removes: every row of a key not in
        ``keep``, the rows older than the kept version of a key in it (``keep`` None: every row of every key)."""
        keep = keep or {}
        whole = [k for k in keys if k not in keep]
        for chunk in self._chunks(whole):
            yield self._key_cond(chunk, key)
        kept = [k for k in keys if k in keep]
        for i in range(0, len(kept), 200):
            yield " OR ".join(f"({q(key)} = {binding.format_query_value(k)} AND {q(version)} < {int(keep[k])})"
                              for k in kept[i : i + 200])

    def _erasure_targets(self, spec: EntitySpec) -> list[tuple[str, str, str, str, str]]:
        """(label, table, entity filter, key column, version column) of every table holding traces of a key:
        the entity's table (all its rows: live, older versions, tombstones), the changelog's rows of the
        entity, reconcile's differing keys of the entity (history: removed for a kept key too)."""
        out: list[tuple[str, str, str, str, str]] = []
        if self._known(spec):
            out.append((".".join(table_of(spec)), self.table(spec), "1", "_key", "_version"))
        entity = binding.format_query_value(spec.name)
        if self._has_table(self.database, "changelog"):
            out.append((f"{self.database}.changelog", f"{q(self.database)}.changelog", f"entity = {entity}", "key",
                        "version"))
        if self._has_table(self.database, "reconciliation_diffs"):
            out.append((f"{self.database}.reconciliation_diffs", f"{q(self.database)}.reconciliation_diffs",
                        f"entity = {entity}", "key", ""))
        return out

    def _traces_by_table(self, spec: EntitySpec, keys: list[str], keep: Mapping[str, int] | None
                         ) -> list[tuple[str, str, str, int]]:
        out: list[tuple[str, str, str, int]] = []
        for label, table, entity, key, version in self._erasure_targets(spec):
            # reconcile's history has no version: all of it goes, for a kept key too
            for cond in self._erasure_conds(keys, keep if version else None, key, version):
                # Without FINAL: every stored row counts, older versions and tombstones included.
                n = int(self.client.command(f"SELECT count() FROM {table} WHERE {entity} AND ({cond})"))
                if n:
                    out.append((label, table, f"{entity} AND ({cond})", n))
        return out

    def traces(self, spec: EntitySpec, keys: list[str], keep: Mapping[str, int] | None = None) -> int:
        if not keys:
            return 0
        return sum(n for *_, n in self._traces_by_table(spec, keys, keep))

    def forget(self, spec: EntitySpec, keys: list[str], keep: Mapping[str, int] | None = None) -> list[str]:
        """``ALTER TABLE ... DELETE`` (a mutation, waited for: ``mutations_sync = 2``) in the entity's table, the
        changelog and reconcile's differing keys. The mutation rewrites the parts without those rows; the parts
        it replaced stay on disk until ``old_parts_lifetime`` (``expunge``)."""
        done: dict[str, int] = {}
        for label, table, where, n in self._traces_by_table(spec, keys, keep):
            self.client.command(f"ALTER TABLE {table} DELETE WHERE {where} SETTINGS mutations_sync = 2")
            done[label] = done.get(label, 0) + n
        return [f"clickhouse {label}: {n} rows deleted" for label, n in done.items()]

    def expunge(self, spec: EntitySpec) -> tuple[str, float | None]:
        """``OPTIMIZE TABLE ... FINAL`` of the entity's table, the changelog and reconcile's differing keys:
        their parts are merged into new ones; the replaced parts linger for the server's
        ``old_parts_lifetime`` (480 s by default), the seconds returned."""
        tables = self._erasure_targets(spec)
        for _label, table, *_ in tables:
            self.client.command(f"OPTIMIZE TABLE {table} FINAL")
        found = self.client.query(
            "SELECT value FROM system.merge_tree_settings WHERE name = 'old_parts_lifetime'").result_rows
        lifetime = float(found[0][0]) if found else 480.0
        return (f"clickhouse: OPTIMIZE TABLE ... FINAL on {', '.join(label for label, *_ in tables)}; the replaced "
                f"parts are removed after old_parts_lifetime ({lifetime:.0f} s)", lifetime)

    def changelog(self, spec: EntitySpec, keys: list[str]) -> dict[str, dict[int, dict[str, Any]]]:
        """The pipeline's own images of these keys, by version (what each store should hold at it)."""
        out: dict[str, dict[int, dict[str, Any]]] = {}
        for chunk in self._chunks(keys):
            result = self.client.query(
                f"SELECT key, version, after FROM {q(self.database)}.changelog "
                f"WHERE entity = {{e:String}} AND {self._key_cond(chunk, 'key')} AND after IS NOT NULL",
                parameters={"e": spec.name},
            )
            for key, version, after in result.result_rows:
                out.setdefault(key, {})[int(version)] = json.loads(after)
        return out

    def applied_through(self) -> dict[str, int]:
        rows = self.client.query(
            f"SELECT entity, max(version) FROM {q(self.database)}.applied_through GROUP BY entity"
        ).result_rows
        return {e: int(v) for e, v in rows}

    def drop_entity(self, spec: EntitySpec) -> list[str]:
        """One entity's table (a view dropped: `changeflow views drop`); the pipeline's own tables stay."""
        database, table = table_of(spec)
        self.client.command(f"DROP TABLE IF EXISTS {q(database)}.{q(table)} SYNC")
        self._tables.pop(spec.name, None)
        return [f"clickhouse: table {database}.{table} dropped"]

    def purge(self) -> list[str]:
        """The pipeline's tables (its entities', changelog, applied-through, reconciliation runs) and the
        views in its database (reports over those tables); the database itself only once nothing else
        is left in it, so a table a user made there survives."""
        done: list[str] = []
        ours = {table_of(s) for s in self.pipeline.stored_in(self.name)}
        ours |= {(self.database, t) for t in ("changelog", "applied_through", "reconciliation_runs",
                                              "reconciliation_diffs")}
        databases = sorted({db for db, _ in ours})
        rows = self.client.query(
            "SELECT database, name, engine FROM system.tables WHERE database IN {dbs:Array(String)} "
            "ORDER BY engine = 'View' DESC, name", parameters={"dbs": databases}).result_rows
        for db, name, engine in rows:
            if (db, name) in ours or (db == self.database and engine == "View"):
                kind = "view" if engine == "View" else "table"
                self.client.command(f"DROP {'VIEW' if kind == 'view' else 'TABLE'} IF EXISTS {q(db)}.{q(name)} SYNC")
                done.append(f"clickhouse: {kind} {db}.{name} dropped")
        left = [n for (n,) in self.client.query("SELECT name FROM system.tables WHERE database = {db:String}",
                                                parameters={"db": self.database}).result_rows]
        exists = int(self.client.command("SELECT count() FROM system.databases WHERE name = {db:String}",
                                         parameters={"db": self.database}))
        if exists and not left and self.database not in ("default", "system"):
            self.client.command(f"DROP DATABASE IF EXISTS {q(self.database)} SYNC")
            done.append(f"clickhouse: database {self.database} dropped")
        elif left:
            done.append(f"clickhouse: database {self.database} kept: it holds what the pipeline did not create "
                        f"({', '.join(left[:5])})")
        self._tables.clear()
        self._types.clear()
        return done

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
