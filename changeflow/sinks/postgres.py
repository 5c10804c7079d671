"""PostgreSQL as a store: a query service's read model, or the database a service is extracted into.

One module holds everything about it (``changeflow.stores`` entry point ``postgres``): its configuration in
the pipeline file (:class:`PostgresStoreConfig`, ``entities.<e>.stores.postgres``), its connection settings
(:class:`PostgresStoreSettings`, ``CHANGEFLOW_PGSTORE_*``), its writer and its admin operations. Drift,
reconcile, status, watch and purge reach it through the registry, like every store.

Each entity is a typed table (``<schema>.<table>``, default ``public.<entity>`` in the database named after the
pipeline's namespace) with the canonical schema's columns and four of the store's own:
``_cf_key`` (the canonical key text, the primary key), ``_cf_version``, ``_cf_deleted`` and ``_cf_ts_ms``.
A record is an upsert under the version guard, ``INSERT ... ON CONFLICT (_cf_key) DO UPDATE ... WHERE
the stored version is older``, so replays, restarts and rebalances change nothing; a delete is a row whose
``_cf_deleted`` is true and whose version is remembered, so a late older update cannot bring it back.
A column the source adds gets its type by ``ALTER TABLE ... ADD COLUMN``. Identifiers are quoted by
psycopg's ``sql.Identifier`` and values bound, never spliced. A row PostgreSQL refuses (a value out of its
column's range, a constraint a user added) refuses its transaction (``RefusedBatch``); the runner bisects it
out and it is quarantined for this store only; a failure of
the server itself is retried (connection) or stops the sink (anything else).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator, Mapping, Sequence
from datetime import time
from typing import TYPE_CHECKING, Any

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from changeflow.lazy import lazy_import
from changeflow.pipelines.model import ON_REJECT_DOC, OnReject, Strict
from changeflow.pipelines.spec import EntitySpec, Pipeline
from changeflow.pipelines.types import ColumnType
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
    import psycopg
    from psycopg import conninfo, sql
    from psycopg import rows as pgrows
    from psycopg.types import json as pgjson

    from changeflow.settings import Settings
else:  # the client library is imported on first use, since loading a pipeline imports this module; measured
    # (python -X importtime, `load(examples/commerce/pipeline.yml)`, median of 7 cold runs on the 2-core dev box):
    # 620 ms with redis, httpx and psycopg imported at the tops of the store modules and pipelines.catalog, 373 ms
    # with them lazy (clickhouse_connect, ~95 ms, is lazy too: measured in sinks/clickhouse.py)
    psycopg = lazy_import("psycopg")
    sql = lazy_import("psycopg.sql")
    conninfo = lazy_import("psycopg.conninfo")
    pgrows = lazy_import("psycopg.rows")
    pgjson = lazy_import("psycopg.types.json")

log = logging.getLogger("changeflow.sinks")

KEY, VERSION, DELETED, TS_MS = "_cf_key", "_cf_version", "_cf_deleted", "_cf_ts_ms"
META_COLUMNS = {KEY: "text PRIMARY KEY", VERSION: "numeric(20, 0) NOT NULL", DELETED: "boolean NOT NULL",
                TS_MS: "bigint NOT NULL"}
APPLIED_TABLE = "changeflow_applied_through"
CHUNK = 5000


class PostgresStoreConfig(Strict):
    """``entities.<e>.stores.postgres``: off unless an entity names it (``postgres: true`` for the defaults)."""

    enabled: bool = True
    database: str | None = Field(None, description="Default: the pipeline's namespace (created if missing).")
    db_schema: str = Field("public", alias="schema", description="The schema of the entity's table.")
    table: str | None = Field(None, description="Default: the entity name.")
    on_reject: OnReject = Field("quarantine", description=ON_REJECT_DOC)


class PostgresStoreSettings(BaseSettings):
    """Where the store's databases live: the native stack's PostgreSQL unless ``CHANGEFLOW_PGSTORE_*`` says."""

    model_config = SettingsConfigDict(env_prefix="CHANGEFLOW_PGSTORE_", extra="ignore")

    host: str | None = None  # default: the stack's (CHANGEFLOW_PG_HOST)
    port: int | None = None
    user: str | None = None  # default: the stack's superuser
    password: SecretStr | None = None
    # The database the store connects to for CREATE DATABASE.
    maintenance_database: str = "postgres"


def column_type(t: ColumnType) -> str:
    """The PostgreSQL type of a canonical column type (README "Types"): the source's own, where it has one."""
    k = t.kind
    if k == "array":
        assert t.item is not None
        return f"{column_type(t.item)}[]"
    if k == "decimal":
        return f"numeric({t.precision}, {t.scale or 0})" if t.precision is not None else "numeric"
    return {
        # Wide enough for every widening the source may make while running (int16 → int32 → int64, real →
        # double): those keep their Avro fingerprint, so no new column type would reach this table.
        "int16": "bigint", "int32": "bigint", "int64": "bigint", "float32": "double precision",
        "float64": "double precision",
        "bool": "boolean", "string": "text", "uuid": "uuid", "enum": "text", "json": "jsonb", "bytes": "bytea",
        "date": "date", "time": "time", "timetz": "timetz", "timestamp": "timestamptz", "timestamptz": "timestamptz",
        "interval": "bigint",  # Debezium's microseconds, as every store holds them
    }.get(k, "text")


def to_column(value: Any, t: ColumnType | None) -> Any:
    """A canonical value as psycopg binds it for its column."""
    if value is None or t is None:
        return pgjson.Jsonb(value) if t is None and isinstance(value, dict | list) else value
    k = t.kind
    if k == "json":
        return pgjson.Jsonb(value)
    if k == "array" and isinstance(value, list):
        return [to_column(v, t.item) for v in value]
    if k in ("time", "timetz") and isinstance(value, time):
        return value.isoformat()
    return value


class PostgresStore:
    name = "postgres"
    opt_in = True  # runs only for a pipeline that names it: its target database is the user's choice
    config_model = PostgresStoreConfig
    null_is_empty: frozenset[str] = frozenset()  # PostgreSQL keeps NULL apart from every empty value

    def __init__(self, settings: Settings, pipeline: Pipeline) -> None:
        self.settings = settings
        self.pipeline = pipeline
        own = PostgresStoreSettings()
        self._server: dict[str, str | int] = {
            "host": own.host or settings.pg_host, "port": own.port or settings.pg_port,
            "user": own.user or settings.pg_superuser,
            **({"password": password.get_secret_value()}
               if (password := own.password or (None if own.user else settings.pg_superuser_password)) else {}),
        }
        self._maintenance = own.maintenance_database
        self._connections: dict[str, psycopg.Connection[Any]] = {}
        # entity → {column: canonical type} the table is known to have (read once, kept up to date by ALTERs)
        self._columns: dict[str, dict[str, ColumnType]] = {}
        self._book_types: dict[str, dict[str, ColumnType]] | None = None

    # --- where each entity lives ---------------------------------------------------------------------
    def config(self, spec: EntitySpec) -> PostgresStoreConfig | None:
        cfg = getattr(spec.config.stores, self.name, None)
        return cfg if isinstance(cfg, PostgresStoreConfig) and cfg.enabled else None

    def database(self, spec: EntitySpec) -> str:
        cfg = self.config(spec)
        return (cfg.database if cfg is not None and cfg.database else None) or self.pipeline.namespace

    def place(self, spec: EntitySpec) -> tuple[str, str]:
        """(schema, table) of the entity's table."""
        cfg = self.config(spec)
        schema = cfg.db_schema if cfg is not None else "public"
        return schema, (cfg.table if cfg is not None and cfg.table else None) or spec.name

    def table(self, spec: EntitySpec) -> sql.Identifier:
        return sql.Identifier(*self.place(spec))

    def _entities(self) -> list[EntitySpec]:
        return [s for s in self.pipeline.entities.values() if self.config(s) is not None]

    def _conn(self, database: str) -> psycopg.Connection[Any]:
        conn = self._connections.get(database)
        if conn is None or conn.closed:
            try:
                conn = psycopg.connect(conninfo.make_conninfo("", dbname=database, connect_timeout=10, **self._server),
                                       autocommit=True)
            except psycopg.OperationalError as exc:
                raise RetriableSinkError(f"postgres store: {exc}".strip()) from exc
            self._connections[database] = conn
        return conn

    def _run(self, database: str, what: str, work: Any) -> Any:
        """``work(connection)``, with the store's errors classified: connection trouble is retried on a new
        connection, anything else the server says stops the sink with what it was doing."""
        try:
            return work(self._conn(database))
        except psycopg.OperationalError as exc:
            self._connections.pop(database, None)
            raise RetriableSinkError(f"postgres store: {exc}".strip()) from exc
        except psycopg.Error as exc:
            raise FatalSinkError(f"postgres store refused {what}: {exc}".strip()) from exc

    # --- the stream ----------------------------------------------------------------------------------
    def setup(self, known: Mapping[str, Any] | None = None) -> None:
        for database in sorted({self.database(s) for s in self._entities()}):
            self._ensure_database(database)
            self._run(database, "the applied-through table", lambda c: c.execute(sql.SQL(
                "CREATE TABLE IF NOT EXISTS public.{} (namespace text, entity text, version numeric(20, 0) NOT NULL, "
                "ts_ms bigint NOT NULL, PRIMARY KEY (namespace, entity))").format(sql.Identifier(APPLIED_TABLE))))
        for entity, sv in (known or {}).items():
            spec = self.pipeline.entities.get(entity)
            if spec is not None and self.config(spec) is not None:
                self._ensure_table(spec, sv.columns, sv.key_columns)

    def _ensure_database(self, database: str) -> None:
        def create(conn: psycopg.Connection[Any]) -> None:
            if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (database,)).fetchone() is None:
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(database)))
                log.info("event=database_created store=postgres database=%r", database)

        self._run(self._maintenance, f"CREATE DATABASE {database}", create)

    def _existing(self, spec: EntitySpec) -> dict[str, str]:
        schema, name = self.place(spec)
        rows = self._run(self.database(spec), "reading the catalog", lambda c: c.execute(
            "SELECT a.attname, pg_catalog.format_type(a.atttypid, a.atttypmod) FROM pg_catalog.pg_attribute a "
            "JOIN pg_catalog.pg_class t ON t.oid = a.attrelid JOIN pg_catalog.pg_namespace n ON n.oid = t.relnamespace "
            "WHERE n.nspname = %s AND t.relname = %s AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum",
            (schema, name)).fetchall())
        return {str(n): str(t) for n, t in rows}

    def _ensure_table(self, spec: EntitySpec, columns: Mapping[str, ColumnType], key_columns: Sequence[str]) -> None:
        """The entity's table holds every column of this schema version, with its type."""
        known = self._columns.get(spec.name)
        if known is not None and all(n in known for n in columns):
            return
        table, database = self.table(spec), self.database(spec)
        existing = self._existing(spec)

        def create(conn: psycopg.Connection[Any]) -> None:
            with conn.transaction():
                conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(self.place(spec)[0])))
                if not existing:
                    defs = [sql.SQL("{} {}").format(sql.Identifier(stored_name(n, META_COLUMNS)),
                                                    sql.SQL(column_type(t)))
                            for n, t in columns.items()]
                    defs += [sql.SQL("{} {}").format(sql.Identifier(n), sql.SQL(d)) for n, d in META_COLUMNS.items()]
                    conn.execute(sql.SQL("CREATE TABLE IF NOT EXISTS {} ({})").format(table, sql.SQL(", ").join(defs)))
                    log.info("event=table_created store=postgres table=%s columns=%d", table.as_string(None),
                             len(columns))
                for n, t in columns.items():
                    if existing and stored_name(n, META_COLUMNS) not in existing:
                        conn.execute(sql.SQL("ALTER TABLE {} ADD COLUMN IF NOT EXISTS {} {}").format(
                            table, sql.Identifier(stored_name(n, META_COLUMNS)), sql.SQL(column_type(t))))
                        log.info("event=column_added store=postgres table=%s column=%r", table.as_string(None), n)

        self._run(database, f"creating {table.as_string(None)}", create)
        self._columns[spec.name] = {**(known or {}), **columns}

    def write_batch(self, records: Sequence[ChangeRecord]) -> list[Rejected]:
        records = [r for r in records if self.config(self.pipeline.entities[r.entity]) is not None]
        if not records:
            return []
        for r in records:
            if r.schema is not None:
                self._ensure_table(self.pipeline.entities[r.entity], r.schema.columns, r.schema.key_columns)
        by_entity: dict[str, list[ChangeRecord]] = {}
        for record in records:
            by_entity.setdefault(record.entity, []).append(record)
        for entity, group in by_entity.items():
            spec = self.pipeline.entities[entity]
            try:
                self._upsert(spec, group)
            except Exception as exc:
                why = _row_rejection(exc)
                if why is None:
                    raise
                # Refused as a whole (one transaction): the runner bisects (sinks.runner.write_bisecting), and
                # handles every record of the call before the offsets commit, so the marker moves over them now.
                self._mark_applied(records)
                raise RefusedBatch(f"postgres {'.'.join(self.place(spec))}: {why}") from exc
        self._mark_applied(records)
        return []

    def _mark_applied(self, records: Sequence[ChangeRecord]) -> None:
        marks = applied_through(records)
        mark = sql.SQL(
            "INSERT INTO public.{t} AS a VALUES (%s, %s, %s, %s) ON CONFLICT (namespace, entity) DO UPDATE "
            "SET version = EXCLUDED.version, ts_ms = EXCLUDED.ts_ms WHERE a.version < EXCLUDED.version"
        ).format(t=sql.Identifier(APPLIED_TABLE))
        for database in sorted({self.database(self.pipeline.entities[e]) for e in marks}):
            rows = [(self.pipeline.namespace, e, v, t) for e, (v, t) in marks.items()
                    if self.database(self.pipeline.entities[e]) == database]

            def write_marks(conn: psycopg.Connection[Any], rows: list[tuple[Any, ...]] = rows) -> None:
                with conn.cursor() as cur:
                    cur.executemany(mark, rows)

            self._run(database, "the applied-through marker", write_marks)

    def _upsert(self, spec: EntitySpec, records: Sequence[ChangeRecord]) -> None:
        """One transaction: each record under the version guard (a refusal rolls the whole part back)."""
        types = self._columns.get(spec.name, {})
        names = list(types)
        target = self.table(spec)
        stored = [stored_name(n, META_COLUMNS) for n in names]
        columns = sql.SQL(", ").join(sql.Identifier(n) for n in [*stored, KEY, VERSION, DELETED, TS_MS])
        updates = sql.SQL(", ").join(sql.SQL("{0} = EXCLUDED.{0}").format(sql.Identifier(n))
                                     for n in [*stored, VERSION, DELETED, TS_MS])
        statement = sql.SQL(
            "INSERT INTO {t} AS t ({columns}) VALUES ({values}) ON CONFLICT ({key}) DO UPDATE SET {updates} "
            "WHERE t.{version} < EXCLUDED.{version}"
        ).format(t=target, columns=columns, values=sql.SQL(", ").join(sql.Placeholder() * (len(names) + 4)),
                 key=sql.Identifier(KEY), updates=updates, version=sql.Identifier(VERSION))
        rows = []
        for r in records:
            image = r.after if r.after is not None else {c: (r.before or {}).get(c) for c in r.key_columns}
            rows.append([*(to_column(image.get(n), types[n]) for n in names), r.key, r.version, r.after is None,
                         r.ts_ms])

        def write(conn: psycopg.Connection[Any]) -> None:
            with conn.transaction(), conn.cursor() as cur:
                cur.executemany(statement, rows)

        try:
            write(self._conn(self.database(spec)))
        except psycopg.OperationalError as exc:
            self._connections.pop(self.database(spec), None)
            raise RetriableSinkError(f"postgres store: {exc}".strip()) from exc

    def fetch_current(self, entity: str, keys: list[str]) -> dict[str, dict[str, Any]]:
        spec = self.pipeline.entities[entity]
        if self.config(spec) is None or not keys:
            return {}
        return {k: v.row for k, v in self.fetch(spec, keys).items()}

    # --- the tools -----------------------------------------------------------------------------------
    def _select(self, spec: EntitySpec, where: sql.Composable, params: Sequence[Any]
                ) -> Iterator[tuple[str, dict[str, Any], int | None]]:
        existing = self._existing(spec)
        if not existing:
            return
        names = [n for n in existing if n not in META_COLUMNS]
        query = sql.SQL("SELECT {cols} {key} AS __cf_key, {version} AS __cf_version FROM {t} WHERE NOT {deleted}"
                        ).format(cols=sql.SQL("").join(sql.SQL("{}, ").format(sql.Identifier(n)) for n in names),
                                 key=sql.Identifier(KEY), version=sql.Identifier(VERSION), t=self.table(spec),
                                 deleted=sql.Identifier(DELETED)) + where

        def read(conn: psycopg.Connection[Any]) -> list[dict[str, Any]]:
            with conn.cursor(row_factory=pgrows.dict_row) as cur:
                return cur.execute(query, params).fetchall()

        for row in self._run(self.database(spec), "a read", read):
            key, version = row.pop("__cf_key"), row.pop("__cf_version")
            yield str(key), source_row(row, META_COLUMNS), int(version)

    def scan(self, spec: EntitySpec) -> Iterator[tuple[str, dict[str, Any], int | None]]:
        if self.config(spec) is not None:
            yield from self._select(spec, sql.SQL(""), ())

    def fetch(self, spec: EntitySpec, keys: list[str]) -> dict[str, Versioned]:
        out: dict[str, Versioned] = {}
        if self.config(spec) is None or not keys:
            return out
        for i in range(0, len(keys), CHUNK):
            where = sql.SQL(" AND {} = ANY(%s)").format(sql.Identifier(KEY))
            for key, row, version in self._select(spec, where, (keys[i : i + CHUNK],)):
                out[key] = Versioned(row, version)
        return out

    def count(self, spec: EntitySpec) -> int:
        if self.config(spec) is None or not self._existing(spec):
            return 0
        row = self._run(self.database(spec), "a count", lambda c: c.execute(sql.SQL(
            "SELECT count(*) FROM {} WHERE NOT {}").format(self.table(spec), sql.Identifier(DELETED))).fetchone())
        return int(row[0])

    def delete(self, spec: EntitySpec, keys: list[str]) -> None:
        if self.config(spec) is None or not keys or not self._existing(spec):
            return
        self._run(self.database(spec), "a delete", lambda c: c.execute(sql.SQL(
            "DELETE FROM {} WHERE {} = ANY(%s)").format(self.table(spec), sql.Identifier(KEY)), (keys,)))

    def drop_versions_above(self, spec: EntitySpec, keys: list[str], position: int) -> list[str]:
        if self.config(spec) is None or not keys or not self._existing(spec):
            return []
        rows = self._run(self.database(spec), "forgetting versions", lambda c: c.execute(sql.SQL(
            "DELETE FROM {t} WHERE {key} = ANY(%s) AND {version} > %s RETURNING {key}").format(
            t=self.table(spec), key=sql.Identifier(KEY), version=sql.Identifier(VERSION)),
            (keys, position)).fetchall())
        return [str(k) for (k,) in rows]

    # --- erasure (changeflow.erasure) ---------------------------------------------------------------
    def keys_where(self, spec: EntitySpec, column: str, values: Sequence[str]) -> list[str]:
        stored = stored_name(column, META_COLUMNS)
        if self.config(spec) is None or not values or stored not in self._existing(spec):
            return []
        rows = self._run(self.database(spec), "finding keys", lambda c: c.execute(sql.SQL(
            "SELECT {key} FROM {t} WHERE NOT {deleted} AND {col}::text = ANY(%s) ORDER BY {key}").format(
            key=sql.Identifier(KEY), t=self.table(spec), deleted=sql.Identifier(DELETED),
            col=sql.Identifier(stored)), (list(values),)).fetchall())
        return [str(k) for (k,) in rows]

    def _erasure_where(self, keys: list[str], keep: Mapping[str, int] | None) -> tuple[sql.Composable, list[Any]]:
        """Every row of a key not in ``keep`` (live or a remembered delete), the row of a kept key only while
        it is older than the kept version (the table holds one row per key: nothing older to remove)."""
        keep = keep or {}
        whole = [k for k in keys if k not in keep]
        kept = [k for k in keys if k in keep]
        where = sql.SQL("{key} = ANY(%s) OR EXISTS (SELECT FROM unnest(%s::text[], %s::numeric[]) AS u(k, v) "
                        "WHERE u.k = {key} AND {version} < u.v)").format(
            key=sql.Identifier(KEY), version=sql.Identifier(VERSION))
        return where, [whole, kept, [keep[k] for k in kept]]

    def traces(self, spec: EntitySpec, keys: list[str], keep: Mapping[str, int] | None = None) -> int:
        """Rows of the keys, a remembered delete (``_cf_deleted``: key and version) counting as one."""
        if self.config(spec) is None or not keys or not self._existing(spec):
            return 0
        where, params = self._erasure_where(keys, keep)
        row = self._run(self.database(spec), "counting traces", lambda c: c.execute(
            sql.SQL("SELECT count(*) FROM {} WHERE ").format(self.table(spec)) + where, params).fetchone())
        return int(row[0])

    def forget(self, spec: EntitySpec, keys: list[str], keep: Mapping[str, int] | None = None) -> list[str]:
        if self.config(spec) is None or not keys or not self._existing(spec):
            return []
        where, params = self._erasure_where(keys, keep)
        n = self._run(self.database(spec), "forgetting keys", lambda c: c.execute(
            sql.SQL("DELETE FROM {} WHERE ").format(self.table(spec)) + where, params).rowcount)
        return [f"postgres {self.database(spec)}.{'.'.join(self.place(spec))}: {n} rows deleted"] if n else []

    def expunge(self, spec: EntitySpec) -> tuple[str, float | None]:
        """``VACUUM`` of the entity's table (the connection is in autocommit, as VACUUM needs): the dead tuples
        that ``forget`` and every update left are pruned from the table's pages."""
        if self.config(spec) is None or not self._existing(spec):
            return "postgres: no table, nothing to vacuum", None
        self._run(self.database(spec), "VACUUM", lambda c: c.execute(
            sql.SQL("VACUUM {}").format(self.table(spec))))
        return (f"postgres {self.database(spec)}.{'.'.join(self.place(spec))}: VACUUM (dead tuples pruned; "
                "the server's WAL segments hold them until they are recycled)", None)

    def applied_through(self) -> dict[str, int]:
        def read(conn: psycopg.Connection[Any]) -> list[tuple[Any, ...]]:
            found = conn.execute("SELECT to_regclass(%s)", (f"public.{APPLIED_TABLE}",)).fetchone()
            if found is None or found[0] is None:
                return []  # not set up in this database yet
            return conn.execute(sql.SQL("SELECT entity, version FROM public.{} WHERE namespace = %s").format(
                sql.Identifier(APPLIED_TABLE)), (self.pipeline.namespace,)).fetchall()

        out: dict[str, int] = {}
        for database in sorted({self.database(s) for s in self._entities()}):
            out.update({str(e): int(v) for e, v in self._run(database, "the applied-through marker", read)})
        return out

    def drop_entity(self, spec: EntitySpec) -> list[str]:
        """One entity's table (a view dropped: `changeflow views drop`)."""
        if not self._existing(spec):
            return []
        self._run(self.database(spec), "DROP TABLE", lambda c, s=spec: c.execute(
            sql.SQL("DROP TABLE IF EXISTS {}").format(self.table(s))))
        return [f"postgres: table {self.database(spec)}.{'.'.join(self.place(spec))} dropped"]

    def purge(self) -> list[str]:
        """The entities' tables and the pipeline's applied-through rows; the databases stay (a read model's
        database may hold what the pipeline did not create)."""
        done: list[str] = []
        for spec in self._entities():
            done += self.drop_entity(spec)
        for database in sorted({self.database(s) for s in self._entities()}):
            try:
                self._run(database, "the applied-through rows", lambda c: c.execute(sql.SQL(
                    "DELETE FROM public.{} WHERE namespace = %s").format(sql.Identifier(APPLIED_TABLE)),
                    (self.pipeline.namespace,)))
            except FatalSinkError:
                continue  # never set up there: nothing to remove
        self._columns.clear()
        return done

    def close(self) -> None:
        for conn in self._connections.values():
            conn.close()
        self._connections.clear()


_QUOTED = re.compile(r'"[^"]*"')
HIDDEN = '"…"'


def _row_rejection(exc: Exception) -> str | None:
    """The data's fault (a value out of range, a constraint, text that is no value of the column's type): the
    row is quarantined. Anything else is the store's: None, and it propagates."""
    if isinstance(exc, psycopg.errors.DataError | psycopg.errors.IntegrityError):
        # The server's first line, without what it quotes (`invalid input syntax for type uuid: "…"`): a reason
        # reaches dead-letter headers and logs, which carry keys and reasons, never row values. The DETAIL line
        # ("Failing row contains (...)") is left out.
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        column = f" (column {exc.diag.column_name})" if exc.diag.column_name else ""
        return f"{type(exc).__name__}: {_QUOTED.sub(HIDDEN, first)[:300]}{column}"
    if isinstance(exc, psycopg.Error) and not isinstance(exc, psycopg.OperationalError):
        raise FatalSinkError(f"postgres store refused the batch: {str(exc).strip()[:300]}") from exc
    return None

