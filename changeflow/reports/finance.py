"""Finance reconciliation: money per day and the exceptions a finance team chases, as ClickHouse views.

The logic lives in SQL views (``changeflow/reports/sql/finance_*.sql``) so that anyone with a ClickHouse client
sees the same figures as ``changeflow report finance``. The worker's ClickHouse sink creates the views as
soon as it has set up (``reports.objects``), so they can be queried from the first minute; this module also
re-creates them every time the report runs (keeping them in step with the SQL files), reads them and
renders what it read. Amounts stay ``Decimal`` from the warehouse to the output (strings in JSON and
CSV), because a reconciliation that rounds is not one.
"""

from __future__ import annotations

import csv
import io
import re
from dataclasses import dataclass
from datetime import UTC, date, datetime
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from changeflow.pipelines.load import load
from changeflow.reports import home

if TYPE_CHECKING:
    from changeflow.pipelines.spec import Pipeline
    from changeflow.settings import Settings

SQL_DIR = Path(__file__).parent / "sql"
VIEW_FILES = ("finance_daily.sql", "finance_exceptions.sql")  # daily first: no dependency, cheapest to fail
# Rows younger than this (by `_ingested_at`) are not judged: a source transaction the sink is still
# writing must not show up as an exception. See finance_exceptions.sql.
GRACE_SECONDS = 5
# The entities (and ClickHouse tables of the pipeline's database) the views read.
ENTITIES = ("orders", "payments", "refunds")
EXCEPTION_KINDS = ("payment_mismatch", "orphan_payment", "refund_exceeds_payment", "cancelled_but_paid")
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclass(frozen=True)
class DailyRow:
    day: date
    orders_placed: int
    orders_amount: Decimal
    payments_captured: int
    captured_amount: Decimal
    refunds: int
    refunded_amount: Decimal
    net: Decimal

    def as_dict(self) -> dict[str, Any]:
        return {
            "day": self.day.isoformat(),
            "orders_placed": self.orders_placed,
            "orders_amount": str(self.orders_amount),
            "payments_captured": self.payments_captured,
            "captured_amount": str(self.captured_amount),
            "refunds": self.refunds,
            "refunded_amount": str(self.refunded_amount),
            "net": str(self.net),
        }


@dataclass(frozen=True)
class FinanceException:
    kind: str
    order_id: str | None
    payment_id: str | None
    refund_id: str | None
    expected: Decimal | None
    actual: Decimal | None
    detected_at: datetime

    def as_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "order_id": self.order_id,
            "payment_id": self.payment_id,
            "refund_id": self.refund_id,
            "expected": None if self.expected is None else str(self.expected),
            "actual": None if self.actual is None else str(self.actual),
            "detected_at": self.detected_at.isoformat(),
        }


DAILY_COLUMNS = tuple(DailyRow.__dataclass_fields__)
EXCEPTION_COLUMNS = tuple(FinanceException.__dataclass_fields__)


@dataclass(frozen=True)
class FinanceReport:
    daily: list[DailyRow]
    exceptions: list[FinanceException]

    def as_dict(self) -> dict[str, Any]:
        return {"daily": [r.as_dict() for r in self.daily], "exceptions": [e.as_dict() for e in self.exceptions]}


def view_statements(database: str, grace_seconds: int = GRACE_SECONDS) -> list[str]:
    """The views' DDL for ``database``; names are checked because they are spliced into SQL."""
    if not _IDENTIFIER.fullmatch(database):
        raise ValueError(f"not a plain ClickHouse database name: {database!r}")
    if isinstance(grace_seconds, bool) or not isinstance(grace_seconds, int) or grace_seconds < 0:
        raise ValueError(f"grace_seconds must be a non-negative integer, got {grace_seconds!r}")
    return [
        (SQL_DIR / name).read_text().replace("{database}", database).replace("{grace_seconds}", str(grace_seconds))
        for name in VIEW_FILES
    ]


def ensure_views(client: Any, database: str, grace_seconds: int = GRACE_SECONDS) -> None:
    """Create or replace the finance views; needs the entity tables (made by the ClickHouse store).

    ``CREATE OR REPLACE`` keeps the views in step with the SQL files on every report run.
    """
    for statement in view_statements(database, grace_seconds):
        client.command(statement)


def _date_filter(column: str, start: date | None, end: date | None) -> tuple[str, dict[str, Any]]:
    clauses, params = [], {}
    if start is not None:
        clauses.append(f"toDate32({column}) >= {{start:Date32}}")
        params["start"] = start
    if end is not None:
        clauses.append(f"toDate32({column}) <= {{end:Date32}}")
        params["end"] = end
    return (" WHERE " + " AND ".join(clauses)) if clauses else "", params


def read_daily(client: Any, database: str, start: date | None = None, end: date | None = None) -> list[DailyRow]:
    where, params = _date_filter("day", start, end)
    result = client.query(
        f"SELECT {', '.join(DAILY_COLUMNS)} FROM {database}.finance_daily{where} ORDER BY day", parameters=params
    )
    return [DailyRow(*row) for row in result.result_rows]


def read_exceptions(
    client: Any, database: str, start: date | None = None, end: date | None = None
) -> list[FinanceException]:
    """Exceptions detected (last evidence arrived) within the range; all open ones without a range."""
    where, params = _date_filter("detected_at", start, end)
    result = client.query(
        f"SELECT {', '.join(EXCEPTION_COLUMNS)} FROM {database}.finance_exceptions{where} "
        "ORDER BY detected_at, kind, order_id, payment_id",
        parameters=params,
    )
    # The column is UTC; say so, so that isoformat() carries the offset.
    return [
        FinanceException(kind, order_id, payment_id, refund_id, expected, actual,
                         detected_at if detected_at.tzinfo else detected_at.replace(tzinfo=UTC))
        for kind, order_id, payment_id, refund_id, expected, actual, detected_at in result.result_rows
    ]


def report(settings: Settings, pipeline: Pipeline, start: date | None = None,
           end: date | None = None) -> FinanceReport:
    """Both halves of the report from one connection; the views are (re)created first, in the pipeline's
    ClickHouse database."""
    database = home.database(pipeline)
    client = home.client(settings)
    try:
        ensure_views(client, database)
        return FinanceReport(
            daily=read_daily(client, database, start, end),
            exceptions=read_exceptions(client, database, start, end),
        )
    finally:
        client.close()


def finance(settings: Settings, start: date | None = None, end: date | None = None,
            pipeline: Pipeline | None = None) -> FinanceReport:
    """``report`` for the given pipeline (default: the settings' pipeline file, else the commerce example)."""
    if pipeline is None:

        pipeline = load(settings.pipeline)
    return report(settings, pipeline, start, end)


def to_json(report: FinanceReport) -> str:
    return orjson.dumps(report.as_dict(), option=orjson.OPT_INDENT_2).decode()


def to_csv(report: FinanceReport) -> str:
    """Two CSV tables, daily then exceptions, each with its header, separated by one empty line.

    Absent values (an order-level exception has no payment_id) are empty cells.
    """
    out = io.StringIO()
    for columns, rows in ((DAILY_COLUMNS, report.daily), (EXCEPTION_COLUMNS, report.exceptions)):
        if out.tell():
            out.write("\r\n")
        writer = csv.DictWriter(out, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: "" if v is None else v for k, v in row.as_dict().items()})
    return out.getvalue()
