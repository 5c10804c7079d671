"""ClickHouse warehouse: current state per entity plus a changelog of every change.

``changeflow.<entity>`` is a ``ReplacingMergeTree(_version, _is_deleted)``: the row with the highest
version wins and a delete is a row with ``_is_deleted = 1``, so reads with ``FINAL`` see exactly the
source's current rows and a replayed or late record changes nothing. ``changeflow.changelog`` keeps
every change once per (entity, key, version), so a replay does not double it.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import clickhouse_connect
from clickhouse_connect.driver.exceptions import DatabaseError, OperationalError

from reports.finance import ensure_views as ensure_finance_views
from sinks.base import FatalSinkError, RetriableSinkError, applied_through, fill_partials
from streams import json
from streams.entities import ENTITIES, EntitySpec
from streams.records import ChangeRecord

if TYPE_CHECKING:
    from changeflow.settings import Settings

log = logging.getLogger("changeflow.sinks")

META_COLUMNS = {"_version": "UInt64", "_is_deleted": "UInt8", "_ts_ms": "Int64", "_ingested_at": "DateTime64(3, 'UTC')"}
CHANGELOG_COLUMNS = ["entity", "key", "op", "version", "ts_ms", "before", "after", "ingested_at"]


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


def is_retriable(exc: Exception) -> bool:
    """Whether a ClickHouse server error is worth retrying (by its error code in the message)."""
    match = _CODE.search(str(exc))
    return match is not None and int(match.group(1)) in RETRIABLE_CODES


def client_for(settings: Settings) -> Any:
    return clickhouse_connect.get_client(
        host=settings.clickhouse_host,
        port=settings.clickhouse_port,
        username=settings.clickhouse_user,
        password=settings.clickhouse_password.get_secret_value(),
        connect_timeout=10,
        send_receive_timeout=60,
        compress=settings.clickhouse_compress,
    )


def table_ddl(database: str, spec: EntitySpec) -> str:
    columns = ",\n  ".join(f"`{n}` {t}" for n, t in {**spec.clickhouse_columns, **META_COLUMNS}.items())
    return (
        f"CREATE TABLE IF NOT EXISTS {database}.{spec.name} (\n  {columns}\n)\n"
        f"ENGINE = ReplacingMergeTree(_version, _is_deleted)\nORDER BY {spec.clickhouse_order_by}"
    )


def applied_ddl(database: str) -> str:
    """The highest source position applied per entity ("as of LSN X"); the highest version wins."""
    return (
        f"CREATE TABLE IF NOT EXISTS {database}.applied_through (\n"
        "  entity LowCardinality(String), version UInt64, ts_ms Int64, updated_at DateTime64(3, 'UTC')\n"
        ")\nENGINE = ReplacingMergeTree(version)\nORDER BY entity"
    )


def changelog_ddl(database: str) -> str:
    return (
        f"CREATE TABLE IF NOT EXISTS {database}.changelog (\n"
        "  entity LowCardinality(String), key String, op LowCardinality(String), version UInt64,\n"
        "  ts_ms Int64, before Nullable(String), after Nullable(String), ingested_at DateTime64(3, 'UTC')\n"
        ")\nENGINE = ReplacingMergeTree\nORDER BY (entity, key, version)"
    )


def _column_value(value: Any) -> Any:
    """Free-form JSON (jsonb, sub-documents) is stored as JSON text; everything else as typed."""
    if isinstance(value, dict | list):
        return json.dumps(value).decode()
    return value


def _from_column(spec: EntitySpec, name: str, value: Any) -> Any:
    """Undo `_column_value` for free-form JSON columns (declared `json` in the entity's Avro schema)."""
    import schemas

    if isinstance(value, str) and name in schemas.latest(spec.name).json_fields:
        return json.loads(value)
    return value


def _added_value(value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    return json.dumps(value).decode()


class ClickHouseSink:
    name = "clickhouse"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.database = settings.clickhouse_database
        self._client: Any = None
        self._known_columns: dict[str, set[str]] = {}

    @property
    def client(self) -> Any:
        if self._client is None:
            try:
                self._client = client_for(self.settings)
            except (OperationalError, OSError) as exc:
                raise RetriableSinkError(f"clickhouse unavailable: {exc}") from exc
        return self._client

    def setup(self) -> None:
        # clickhouse-connect imports pandas on a process's first insert (seconds of CPU): paid here, before
        # the first batch, so a starting sink does not stall with records in hand.
        from clickhouse_connect.driver import options

        _ = options.pd
        try:
            self.client.command(f"CREATE DATABASE IF NOT EXISTS {self.database}")
            for spec in ENTITIES.values():
                self.client.command(table_ddl(self.database, spec))
            self.client.command(changelog_ddl(self.database))
            self.client.command(applied_ddl(self.database))
            ensure_finance_views(self.client, self.database)
        except OperationalError as exc:
            raise RetriableSinkError(f"clickhouse: {exc}") from exc

    def fetch_current(self, entity: str, keys: list[str]) -> dict[str, dict[str, Any]]:
        spec = ENTITIES[entity]
        key_type = spec.clickhouse_columns[spec.key_column].replace("Nullable(", "").rstrip(")")
        # Every column but the bookkeeping ones: columns added by schema evolution must survive a merge too.
        columns = "* EXCEPT (" + ", ".join(META_COLUMNS) + ")"
        try:
            result = self.client.query(
                f"SELECT {columns} FROM {self.database}.{entity} FINAL "
                f"WHERE `{spec.key_column}` IN {{keys:Array({key_type})}} AND _is_deleted = 0",
                parameters={"keys": [int(k) if key_type.startswith(("Int", "UInt")) else k for k in keys]},
            )
        except OperationalError as exc:
            self._client = None
            raise RetriableSinkError(f"clickhouse: {exc}") from exc
        rows = {}
        for row in result.named_results():
            rows[str(row[spec.key_column])] = {k: _from_column(spec, k, v) for k, v in row.items()}
        return rows

    def write_batch(self, records: Sequence[ChangeRecord]) -> None:
        records = fill_partials(records, self.fetch_current)
        now = datetime.now(UTC)
        added = self._added_columns(records)
        by_entity: dict[str, list[ChangeRecord]] = {}
        for record in records:
            by_entity.setdefault(record.entity, []).append(record)
        # Column-oriented: the Native format is columnar, so building columns here spares the client a
        # row-to-column pivot of every batch.
        tables: dict[str, list[list[Any]]] = {}
        for entity, group in by_entity.items():
            spec = ENTITIES[entity]
            images = [r.after if r.after is not None else (r.before or {}) for r in group]
            columns: list[list[Any]] = [
                [_column_value(image.get(col)) for image in images] for col in spec.clickhouse_columns
            ]
            keys = columns[0]
            for i, value in enumerate(keys):
                if value is None:
                    keys[i] = group[i].key
            columns += [
                [r.version for r in group],
                [1 if r.is_delete else 0 for r in group],
                [r.ts_ms for r in group],
                [now] * len(group),
            ]
            columns += [[_added_value(image.get(col)) for image in images] for col in added.get(entity, [])]
            tables[entity] = columns
        changelog = [
            [r.entity for r in records],
            [r.key for r in records],
            [r.op for r in records],
            [r.version for r in records],
            [r.ts_ms for r in records],
            [None if r.before is None else json.dumps(r.before).decode() for r in records],
            [None if r.after is None else json.dumps(r.after).decode() for r in records],
            [now] * len(records),
        ]
        try:
            for entity, names in added.items():
                self._ensure_columns(entity, names)
            for entity, data in tables.items():
                spec = ENTITIES[entity]
                self.client.insert(
                    f"{self.database}.{entity}",
                    data,
                    column_names=[*spec.clickhouse_columns, *META_COLUMNS, *added.get(entity, [])],
                    column_oriented=True,
                )
            if records:
                self.client.insert(f"{self.database}.changelog", changelog, column_names=CHANGELOG_COLUMNS,
                                   column_oriented=True)
                self.client.insert(
                    f"{self.database}.applied_through",
                    [[e, v, t, now] for e, (v, t) in applied_through(records).items()],
                    column_names=["entity", "version", "ts_ms", "updated_at"],
                )
        except OperationalError as exc:
            self._client = None
            raise RetriableSinkError(f"clickhouse: {exc}") from exc
        except DatabaseError as exc:
            if is_retriable(exc):
                self._client = None
                raise RetriableSinkError(f"clickhouse: {exc}") from exc
            raise FatalSinkError(f"clickhouse rejected the batch: {exc}") from exc

    @staticmethod
    def _added_columns(records: Sequence[ChangeRecord]) -> dict[str, list[str]]:
        """Source columns an entity's mapping does not declare (added while the pipeline runs)."""
        out: dict[str, list[str]] = {}
        for record in records:
            declared = ENTITIES[record.entity].clickhouse_columns
            for name in record.after or {}:
                if name not in declared and name not in META_COLUMNS and name not in out.get(record.entity, []):
                    out.setdefault(record.entity, []).append(name)
        return out

    def _ensure_columns(self, entity: str, columns: list[str]) -> None:
        """Schema evolution: a new source column becomes a Nullable(String) column (JSON text for
        non-strings) of the warehouse table, added once, without a restart. Declaring it in the entity's
        mapping (and a new schema version) later gives it a proper type."""
        known = self._known_columns.get(entity)
        if known is None or not set(columns) <= known:
            rows = self.client.query(
                "SELECT name FROM system.columns WHERE database = {db:String} AND table = {t:String}",
                parameters={"db": self.database, "t": entity},
            ).result_rows
            known = {name for (name,) in rows}
            self._known_columns[entity] = known
        for name in columns:
            if name not in known:
                quoted = name.replace("`", "``")
                self.client.command(
                    f"ALTER TABLE {self.database}.{entity} ADD COLUMN IF NOT EXISTS `{quoted}` Nullable(String)"
                )
                known.add(name)
                log.info("event=column_added table=%s.%s column=%s", self.database, entity, name)

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
