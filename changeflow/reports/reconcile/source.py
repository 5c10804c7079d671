"""PostgreSQL read with psycopg: every row goes through the entity's compiled transform, so it compares to
what the stores hold; keys are the stream's key text (``streams.keys.key_text``)."""

from __future__ import annotations

import random
import time
import uuid
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

import psycopg
from psycopg import sql
from psycopg.rows import dict_row

from changeflow.pipelines.catalog import read_dsn
from changeflow.pipelines.load import resolve_secret
from changeflow.pipelines.spec import EntitySpec, Pipeline
from changeflow.pipelines.transform import FILTERED, Transformer, compile_entity
from changeflow.pipelines.types import ColumnType, from_postgres
from changeflow.pipelines.views import output_type
from changeflow.reports.reconcile.normalise import Row, comparable_row, debezium_typed
from changeflow.reports.reconcile.views import view_rows
from changeflow.streams.erasure import Suppressor
from changeflow.streams.keys import key_parts, key_text
from changeflow.streams.records import ChangeRecord
from changeflow.streams.suppression import SuppressionFeed

if TYPE_CHECKING:
    from changeflow.settings import Settings

BATCH = 5000
INTEGERS = ("int16", "int32", "int64")


def source_row(raw: Mapping[str, Any], transform: Transformer) -> Row | None:
    """The canonical row the stream would emit for this source row (None: the entity's filter drops it)."""
    out = transform.apply(debezium_typed(raw))
    return None if out is FILTERED else out  # type: ignore[return-value]


def table_identifier(spec: EntitySpec) -> sql.Composable:
    return sql.Identifier(spec.source_schema, spec.source_table)


class Source:
    """One pipeline's PostgreSQL source, as reconcile and repair read it."""

    def __init__(self, settings: Settings, pipeline: Pipeline,
                 types: Mapping[str, Mapping[str, ColumnType]] | None = None,
                 keys: Mapping[str, tuple[str, ...]] | None = None) -> None:
        self.settings = settings
        self.pipeline = pipeline
        self.dsn = pipeline.source_dsn(settings)
        self._types: dict[str, Mapping[str, ColumnType]] = dict(types or {})
        self._keys: dict[str, tuple[str, ...]] = dict(keys or {})
        self._transforms: dict[str, Transformer] = {}
        self._catalog: Any = None
        self._suppressor: Suppressor | None = None
        self._suppressor_read = False

    def suppressor(self) -> Suppressor | None:
        """The erased rows (README "Erasure"), read once: a row the stream anonymises or drops is compared
        as the stream writes it, so an erasure is not reported (nor repaired) as drift."""
        if not self._suppressor_read:
            feed = SuppressionFeed.for_pipeline(self.settings, self.pipeline)
            if feed is not None:
                try:
                    feed.refresh(force=True)
                    self._suppressor = feed.suppressor
                finally:
                    feed.close()
            self._suppressor_read = True
        return self._suppressor

    # --- what the entity is ---------------------------------------------------------------------------
    def _table(self, spec: EntitySpec) -> Any:
        if self._catalog is None:

            schemas = sorted({e.source_schema for e in self.pipeline.entities.values() if e.source == "postgres"})
            self._catalog = read_dsn(self.dsn, schemas)
        return self._catalog.table(spec.source_schema, spec.source_table)

    def key_columns(self, spec: EntitySpec) -> tuple[str, ...]:
        """The entity's declared key, the canonical schema's, or else the table's primary key (a row view's is
        its root's)."""
        if spec.key_columns:
            return spec.key_columns
        if spec.source == "view" and spec.name not in self._keys:
            self._keys[spec.name] = self.key_columns(self.pipeline.entities[self.pipeline.views[spec.name].root])
        if spec.name not in self._keys:
            table = self._table(spec)
            if table is None or not table.primary_key:
                raise ValueError(f"{spec.name}: {spec.qualified_table} has no primary key and no declared key")
            self._keys[spec.name] = tuple(table.primary_key)
        return self._keys[spec.name]

    def types(self, spec: EntitySpec) -> Mapping[str, ColumnType]:
        """The canonical column types (from the schema topic when given), else the catalog's and the declared."""
        if spec.name not in self._types and spec.source == "view":
            view = self.pipeline.views[spec.name]

            def column_type(alias: str, column: str) -> ColumnType | None:
                return self.types(self.pipeline.entities[view.entity_of(alias)]).get(column)

            names = [*(f.name for f in view.fields), *(a.name for a in view.aggregates)]
            self._types[spec.name] = {n: output_type(view, n, column_type) for n in names}
        if spec.name not in self._types:

            table = self._table(spec)
            found: dict[str, ColumnType] = {}
            if table is not None:
                found = {c.name: from_postgres(c.format_type, is_enum=c.is_enum) for c in table.columns}
            self._types[spec.name] = {**found, **spec.declared_types}
        return self._types[spec.name]

    def key_is_numeric(self, spec: EntitySpec) -> bool:
        cols = self.key_columns(spec)
        t = self.types(spec).get(cols[0]) if len(cols) == 1 else None
        return t is not None and t.kind in INTEGERS

    def transform(self, spec: EntitySpec) -> Transformer:
        if spec.name not in self._transforms:
            base = self.pipeline.path.parent if self.pipeline.path is not None else None
            self._transforms[spec.name] = compile_entity(spec, base, resolve_secret)
        return self._transforms[spec.name]

    def _keyed(self, spec: EntitySpec, raw: Mapping[str, Any]) -> tuple[str, Row] | None:
        typed = debezium_typed(raw)
        key = key_text([typed[c] for c in self.key_columns(spec)])
        row = source_row(raw, self.transform(spec))
        if row is None:
            return None
        suppressor = self.suppressor()
        if suppressor is not None and suppressor.judges(spec.name):
            # As read now: a referring row the erasure found stays anonymised; one found later, or new, is whole.
            kept = suppressor.apply(ChangeRecord(spec.source, spec.name, key, "r", 0, int(time.time() * 1000),
                                                 None, row))
            if kept is None or kept.after is None:
                return None
            row = kept.after
        return key, comparable_row(row, self.types(spec))

    def key_condition(self, spec: EntitySpec, keys: list[str]) -> tuple[sql.Composable, tuple[Any, ...]]:
        """A condition selecting exactly these keys, and its parameters."""
        cols = self.key_columns(spec)
        if len(cols) == 1:
            if self.key_is_numeric(spec):
                return (sql.SQL("{} = ANY(%s)").format(sql.Identifier(cols[0])),
                        ([int(k) for k in keys if k.lstrip("-").isdigit()],))
            return sql.SQL("{}::text = ANY(%s)").format(sql.Identifier(cols[0])), (keys,)
        columns = [[] for _ in cols]  # type: list[list[str]]
        for k in keys:
            try:
                parts = key_parts(k, len(cols))
            except ValueError:
                continue
            for i, p in enumerate(parts):
                columns[i].append(p)
        lhs = sql.SQL(", ").join(sql.SQL("{}::text").format(sql.Identifier(c)) for c in cols)
        rhs = sql.SQL(", ").join(sql.SQL("%s::text[]") for _ in cols)
        return sql.SQL("({}) IN (SELECT * FROM unnest({}))").format(lhs, rhs), tuple(columns)

    # --- reading --------------------------------------------------------------------------------------
    def _view(self, spec: EntitySpec) -> dict[str, Row]:
        """A view computed at the source now (reports.reconcile.views), as comparable rows."""
        view = self.pipeline.views[spec.name]
        suppressor = self.suppressor()
        # As the stream computes it: each row it reads judged by the erasures (an anonymised order's link cut).
        standing = (suppressor.read_now if suppressor is not None and any(suppressor.judges(e) for e in view.entities)
                    else None)
        rows = view_rows(self.dsn, self.pipeline, view, self.key_columns, standing)
        types = self.types(spec)
        return {k: comparable_row(r, types) for k, r in rows.items()}

    def scan(self, spec: EntitySpec) -> Iterator[tuple[str, Row]]:
        if spec.source == "view":
            yield from self._view(spec).items()
            return
        with (
            psycopg.connect(self.dsn, connect_timeout=5) as conn,
            conn.transaction(),
            conn.cursor(name=f"reconcile_{uuid.uuid4().hex[:8]}", row_factory=dict_row) as cur,
        ):
            cur.itersize = BATCH
            cur.execute(sql.SQL("SELECT * FROM {}").format(table_identifier(spec)))
            for raw in cur:
                keyed = self._keyed(spec, raw)
                if keyed is not None:
                    yield keyed

    def fetch(self, spec: EntitySpec, keys: list[str]) -> dict[str, Row]:
        if not keys:
            return {}
        if spec.source == "view":
            rows = self._view(spec)
            return {k: rows[k] for k in keys if k in rows}
        cond, params = self.key_condition(spec, keys)
        query = sql.SQL("SELECT * FROM {} WHERE ").format(table_identifier(spec)) + cond
        out: dict[str, Row] = {}
        with psycopg.connect(self.dsn, connect_timeout=5) as conn, conn.cursor(row_factory=dict_row) as cur:
            cur.execute(query, params)
            for raw in cur:
                keyed = self._keyed(spec, raw)
                if keyed is not None:
                    out[keyed[0]] = keyed[1]
        return out

    def sample_keys(self, spec: EntitySpec, n: int) -> list[str]:
        if spec.source == "view":
            found = sorted(self._view(spec))
            return random.sample(found, min(n, len(found)))
        cols = self.key_columns(spec)
        query = sql.SQL("SELECT {} FROM {} ORDER BY random() LIMIT %s").format(
            sql.SQL(", ").join(sql.Identifier(c) for c in cols), table_identifier(spec)
        )
        with psycopg.connect(self.dsn, connect_timeout=5) as conn, conn.cursor(row_factory=dict_row) as cur:
            cur.execute(query, (n,))
            return [key_text([debezium_typed(r)[c] for c in cols]) for r in cur]

    def count(self, spec: EntitySpec) -> int:
        if spec.source == "view":
            return len(self._view(spec))
        with psycopg.connect(self.dsn, connect_timeout=5) as conn:
            row = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(table_identifier(spec))).fetchone()
        return int(row[0]) if row else 0

    def position(self) -> int:
        """The current WAL position: no version the pipeline wrote can be beyond it."""
        with psycopg.connect(self.dsn, connect_timeout=5) as conn:
            row = conn.execute("SELECT (pg_current_wal_lsn() - '0/0'::pg_lsn)::bigint").fetchone()
        return int(row[0]) if row else 0
