"""PostgreSQL catalog introspection: what ``changeflow init`` and ``changeflow pipeline check`` read.

The I/O edge of ``pipelines``: one function reads the catalog into plain data (``Catalog``), and everything
that judges it (``pipelines.init``, ``pipelines.check``) is pure and unit-tested on hand-built catalogs.
Schema names are bound as values; nothing of the user's is put into SQL text.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from changeflow.lazy import lazy_import

if TYPE_CHECKING:
    import psycopg
    from psycopg import sql
else:  # the client library is imported on first use, since loading a pipeline imports this module; measured
    # (python -X importtime, `load(examples/commerce/pipeline.yml)`, median of 7 cold runs on the 2-core dev box):
    # 620 ms with redis, httpx and psycopg imported at the tops of the store modules and pipelines.catalog, 373 ms
    # with them lazy (clickhouse_connect, ~95 ms, is lazy too: measured in sinks/clickhouse.py)
    psycopg = lazy_import("psycopg")
    sql = lazy_import("psycopg.sql")


@dataclass(frozen=True)
class Column:
    name: str
    format_type: str  # pg_catalog.format_type(atttypid, atttypmod): "numeric(12,2)", "text[]", ...
    is_enum: bool = False  # an enum, or an array of one
    nullable: bool = True


@dataclass(frozen=True)
class Table:
    schema: str
    name: str
    columns: tuple[Column, ...]
    primary_key: tuple[str, ...] = ()  # in key order; empty: none
    # pg_class.relreplident: d default (the primary key), n nothing, f full, i an index.
    replica_identity: str = "d"
    # relkind 'p': a partitioned table (its rows live in its partitions; README "Partitioned tables").
    partitioned: bool = False

    @property
    def qualified(self) -> str:
        return f"{self.schema}.{self.name}"

    @property
    def column_names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.columns)

    def column(self, name: str) -> Column | None:
        return next((c for c in self.columns if c.name == name), None)


@dataclass(frozen=True)
class Catalog:
    database: str
    schemas: tuple[str, ...]  # the schemas that were read
    tables: dict[tuple[str, str], Table] = field(default_factory=dict)
    # Every partition in the schemas read (at any depth) → its root table: a partition is never an entity of
    # its own, its changes reach Debezium under the root's name (publish_via_partition_root).
    partitions: dict[tuple[str, str], tuple[str, str]] = field(default_factory=dict)
    # The pipeline's publication as it stands: None when it does not exist (or was not asked for), else
    # whether it publishes partitions' changes under their root (pg_publication.pubviaroot).
    publication_via_root: bool | None = None

    def table(self, schema: str, name: str) -> Table | None:
        return self.tables.get((schema, name))

    def root_of(self, schema: str, name: str) -> tuple[str, str] | None:
        """The root table of a partition; None for anything that is not one."""
        return self.partitions.get((schema, name))

    def with_primary_key(self) -> list[Table]:
        return [t for t in self.tables.values() if t.primary_key]

    def without_primary_key(self) -> list[Table]:
        return [t for t in self.tables.values() if not t.primary_key]


# Ordinary and partitioned tables (not the partitions themselves: their changes arrive under the parent
# only with publish_via_partition_root, and a user captures the parent).
_TABLES = """
SELECT c.oid, n.nspname, c.relname, c.relreplident, c.relkind = 'p'
FROM pg_catalog.pg_class c
JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = ANY(%s) AND c.relkind IN ('r', 'p') AND NOT c.relispartition
ORDER BY n.nspname, c.relname
"""
# Partitions (of any depth) of the schemas read, each with its root (pg_partition_root, PostgreSQL 12+).
_PARTITIONS = """
SELECT n.nspname, c.relname, rn.nspname, r.relname
FROM pg_catalog.pg_class c
JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
JOIN pg_catalog.pg_class r ON r.oid = pg_catalog.pg_partition_root(c.oid)
JOIN pg_catalog.pg_namespace rn ON rn.oid = r.relnamespace
WHERE n.nspname = ANY(%s) AND c.relispartition
ORDER BY n.nspname, c.relname
"""
_COLUMNS = """
SELECT a.attrelid, a.attname, pg_catalog.format_type(a.atttypid, a.atttypmod),
       COALESCE(elem.typtype, t.typtype) = 'e', NOT a.attnotnull
FROM pg_catalog.pg_attribute a
JOIN pg_catalog.pg_type t ON t.oid = a.atttypid
LEFT JOIN pg_catalog.pg_type elem ON elem.oid = t.typelem AND t.typcategory = 'A'
WHERE a.attrelid = ANY(%s) AND a.attnum > 0 AND NOT a.attisdropped
ORDER BY a.attrelid, a.attnum
"""
_PRIMARY_KEYS = """
SELECT i.indrelid, a.attname
FROM pg_catalog.pg_index i
CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, position)
JOIN pg_catalog.pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
WHERE i.indisprimary AND i.indrelid = ANY(%s)
ORDER BY i.indrelid, k.position
"""


def read(conn: psycopg.Connection, schemas: Sequence[str], publication: str | None = None) -> Catalog:
    """Every table of ``schemas`` with its columns in order, its primary key and its replica identity, the
    partitions with their roots, and (given its name) whether ``publication`` publishes through the root."""
    with conn.cursor() as cur:
        database = str(cur.execute("SELECT current_database()").fetchone()[0])  # type: ignore[index]
        rows = cur.execute(_TABLES, (list(schemas),)).fetchall()
        oids = [r[0] for r in rows]
        columns: dict[int, list[Column]] = {}
        for relid, name, ftype, is_enum, nullable in cur.execute(_COLUMNS, (oids,)).fetchall():
            columns.setdefault(relid, []).append(Column(name, ftype, bool(is_enum), bool(nullable)))
        keys: dict[int, list[str]] = {}
        for relid, name in cur.execute(_PRIMARY_KEYS, (oids,)).fetchall():
            keys.setdefault(relid, []).append(name)
        partitions = {(str(s), str(t)): (str(rs), str(rt))
                      for s, t, rs, rt in cur.execute(_PARTITIONS, (list(schemas),)).fetchall()}
        via_root = None
        if publication is not None:
            row = cur.execute("SELECT pubviaroot FROM pg_catalog.pg_publication WHERE pubname = %s",
                              (publication,)).fetchone()
            via_root = None if row is None else bool(row[0])
    tables = {
        (schema, name): Table(schema, name, tuple(columns.get(oid, ())), tuple(keys.get(oid, ())), str(ident),
                              bool(partitioned))
        for oid, schema, name, ident, partitioned in rows
    }
    return Catalog(database=database, schemas=tuple(schemas), tables=tables, partitions=partitions,
                   publication_via_root=via_root)


def count_rows(dsn: str, schema: str, table: str) -> int:
    """``count(*)`` of one table (drift, rebuild's progress); the names are quoted identifiers."""

    with psycopg.connect(dsn, connect_timeout=5) as conn:
        row = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(schema, table))).fetchone()
    return int(row[0]) if row else 0


def read_dsn(dsn: str, schemas: Iterable[str], publication: str | None = None) -> Catalog:
    """Connect (read only, a short timeout), read, close."""
    with psycopg.connect(dsn, connect_timeout=10) as conn:
        conn.read_only = True  # BEGIN READ ONLY: reading the catalog never writes
        return read(conn, list(dict.fromkeys(schemas)), publication)
