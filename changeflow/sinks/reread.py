"""Re-reading chosen keys from the source: the repair path.

An incremental snapshot limited to some keys (``execute-snapshot`` signals in the pipeline's PostgreSQL signal
table, in chunks that fit): Debezium re-reads those rows and they travel the normal path (decode, transforms,
every store's version guard), with the stream position at read time as their version, so they beat what a
store holds. Used by reconcile's repair (``reports.reconcile.repair``) and by the sink runner for a partial
record whose row a store does not hold (``sinks.runner``). Identifiers are quoted and key values written as
literals by psycopg, never spliced.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import orjson
import psycopg
from psycopg import sql

from changeflow.pipelines.spec import EntitySpec, Pipeline
from changeflow.streams.keys import key_parts

if TYPE_CHECKING:
    from changeflow.settings import Settings

SIGNAL_KEYS = 2000  # keys per snapshot signal
SIGNAL_CHARS = 60_000  # the signal's data text at most (debezium_signal.data is text; Debezium parses it whole)


def key_filter(columns: Sequence[str], keys: Sequence[str], numeric: bool) -> sql.Composable:
    """A condition selecting exactly these keys: identifiers quoted, values as literals."""
    if len(columns) == 1:
        values = [sql.Literal(int(k)) if numeric else sql.Literal(k) for k in keys]
        col = sql.Identifier(columns[0]) if numeric else sql.SQL("{}::text").format(sql.Identifier(columns[0]))
        return sql.SQL("{} IN ({})").format(col, sql.SQL(", ").join(values))
    lhs = sql.SQL(", ").join(sql.SQL("{}::text").format(sql.Identifier(c)) for c in columns)
    rows = [sql.SQL("({})").format(sql.SQL(", ").join(sql.Literal(p) for p in key_parts(k, len(columns))))
            for k in keys]
    return sql.SQL("({}) IN ({})").format(lhs, sql.SQL(", ").join(rows))


def snapshot_signals(conn: psycopg.Connection[Any] | None, collection: str, columns: Sequence[str], keys: Sequence[str],
                     numeric: bool) -> list[str]:
    """The ``execute-snapshot`` signals' data for these keys: as few as fit SIGNAL_KEYS and SIGNAL_CHARS."""
    out: list[str] = []

    def data(chunk: Sequence[str]) -> str:
        cond = key_filter(columns, chunk, numeric).as_string(conn)
        return orjson.dumps({"data-collections": [collection], "type": "incremental",
                             "additional-conditions": [{"data-collection": collection, "filter": cond}]}).decode()

    pending = list(keys)
    while pending:
        n = min(SIGNAL_KEYS, len(pending))
        text = data(pending[:n])
        while len(text) > SIGNAL_CHARS and n > 1:
            n //= 2
            text = data(pending[:n])
        out.append(text)
        pending = pending[n:]
    return out


def send_signals(settings: Settings, pipeline: Pipeline, spec: EntitySpec, columns: Sequence[str],
                 keys: Sequence[str], numeric: bool) -> list[str]:
    """Insert the snapshot signals into the pipeline's signal table; returns their ids."""
    schema, _, table = pipeline.signal_table.rpartition(".")
    target = sql.Identifier(schema, table) if schema else sql.Identifier(table)
    ids = []
    with psycopg.connect(pipeline.source_dsn(settings), autocommit=True) as conn:
        for text in snapshot_signals(conn, spec.qualified_table, columns, keys, numeric):
            signal_id = f"changeflow-{uuid.uuid4()}"
            conn.execute(sql.SQL("INSERT INTO {} (id, type, data) VALUES (%s, 'execute-snapshot', %s)").format(target),
                         (signal_id, text))
            ids.append(signal_id)
    return ids
