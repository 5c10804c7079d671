"""``changeflow outbox prune``: delete the outbox rows Debezium has captured, never one it has not.

A row is captured once its transaction's commit is at or below the replication slot's ``confirmed_flush_lsn``
(Debezium confirms an LSN only after the events before it are in Kafka). PostgreSQL keeps no row's commit
LSN, and the LSN at insert time is not enough (a long transaction inserts early and commits late, after
later transactions were confirmed), so the prune takes a watermark instead:

1. in one REPEATABLE READ transaction, the snapshot is taken by the first statement, which then reads
   ``pg_current_wal_insert_lsn()`` (the watermark W), and the ids of the rows that snapshot sees are read
   (at most ``limit``). Every transaction visible in the snapshot wrote its commit record before it became
   visible, so before W;
2. wait (at most ``wait_s``) until the slot's ``confirmed_flush_lsn`` reaches W (the connector's heartbeat
   moves it on even when nothing else is written);
3. delete exactly those ids. A row committed after the snapshot is not among them.

When the slot does not reach W in time, nothing is deleted. The default the README recommends is simpler
still: the writer deletes its outbox row in the same transaction that inserted it (the WAL keeps the
insert, so Debezium publishes it; the DELETE is skipped by the router), and prune is for tables that keep
their rows (the seed's ``outbox_messages``).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass

import psycopg
from psycopg import sql

from changeflow.pipelines.outbox import OutboxSpec
from changeflow.waiting import WaitTimeout, wait_until


class PruneError(RuntimeError):
    pass


@dataclass(frozen=True)
class PruneResult:
    outbox: str
    watermark: str
    confirmed: str | None  # the slot's confirmed_flush_lsn when last read
    candidates: int  # rows seen in the snapshot
    captured: bool  # the slot reached the watermark: every candidate is in Kafka
    deleted: int


def _confirmed(conn: psycopg.Connection, slot: str, watermark: str) -> tuple[str | None, bool]:
    row = conn.execute("SELECT confirmed_flush_lsn::text, confirmed_flush_lsn >= %s::pg_lsn "
                       "FROM pg_catalog.pg_replication_slots WHERE slot_name = %s", (watermark, slot)).fetchone()
    if row is None:
        raise PruneError(f"replication slot {slot!r} does not exist: nothing was captured, nothing is pruned "
                         "(`changeflow connectors apply` creates it)")
    return row[0], bool(row[1])


def prune(conn: psycopg.Connection, spec: OutboxSpec, slot: str, *, wait_s: float = 60.0, limit: int = 100_000,
          dry_run: bool = False, sleep: Callable[[float], None] = time.sleep) -> PruneResult:
    """Delete the rows of ``spec``'s table that the slot has confirmed (see the module); ``conn`` autocommit."""
    table = sql.Identifier(spec.source_schema, spec.source_table)
    id_column = sql.Identifier(spec.config.columns.id)
    with conn.transaction():
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        row = conn.execute("SELECT pg_current_wal_insert_lsn()::text").fetchone()
        assert row is not None
        watermark = str(row[0])
        ids = [r[0] for r in conn.execute(sql.SQL("SELECT {} FROM {} LIMIT %s").format(id_column, table),
                                          (limit,)).fetchall()]
    confirmed, reached = None, False

    def captured() -> bool:  # also checks once with no candidates: the slot must exist
        nonlocal confirmed, reached
        confirmed, reached = _confirmed(conn, slot, watermark)
        return reached or not ids

    with contextlib.suppress(WaitTimeout):  # not captured in time: nothing is deleted, the result says so
        wait_until(captured, wait_s, what=f"replication slot {slot} past {watermark}", sleep=sleep)
    deleted = 0
    if ids and reached and not dry_run:
        with conn.transaction():
            cur = conn.execute(sql.SQL("DELETE FROM {} WHERE {} = ANY(%s)").format(table, id_column), (ids,))
            deleted = cur.rowcount
    return PruneResult(outbox=spec.name, watermark=watermark, confirmed=confirmed, candidates=len(ids),
                       captured=reached, deleted=deleted)
