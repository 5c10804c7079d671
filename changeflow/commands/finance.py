"""`changeflow report finance`: money per day and the finance exceptions, from the ClickHouse views."""

from __future__ import annotations

import sys
from datetime import datetime
from decimal import Decimal
from enum import StrEnum
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from changeflow.reports import home
from changeflow.reports.finance import GRACE_SECONDS, finance, to_csv, to_json
from changeflow.settings import Settings

if TYPE_CHECKING:
    from changeflow.reports.finance import FinanceReport

# Piped output (CI logs, tests) must not be cut at 80 columns.
console = Console(width=None if sys.stdout.isatty() else 200)
err = Console(stderr=True, soft_wrap=True)


class Format(StrEnum):
    table = "table"
    csv = "csv"
    json = "json"


def _fail(message: str, code: int = 2) -> typer.Exit:
    err.print(f"[bold red]error:[/] {escape(message)}", highlight=False)
    return typer.Exit(code)


def report_finance(
    start: Annotated[
        datetime | None, typer.Option("--from", formats=["%Y-%m-%d"], help="First UTC day (YYYY-MM-DD).")
    ] = None,
    end: Annotated[
        datetime | None, typer.Option("--to", formats=["%Y-%m-%d"], help="Last UTC day, inclusive (YYYY-MM-DD).")
    ] = None,
    format: Annotated[Format, typer.Option("--format", help="table, csv or json")] = Format.table,
) -> None:
    """Per UTC day: orders placed, payments captured, refunds, net; then every finance exception.

    --from/--to select days of the daily figures, and exceptions by the day they were detected.

    Rows younger than a few seconds in ClickHouse are not judged: a transaction still arriving is no exception.

    Exits 1 when there are exceptions, 2 when ClickHouse cannot answer.
    """
    if start and end and start > end:
        raise _fail(f"--from {start.date()} is after --to {end.date()}")
    settings = Settings()
    unreachable, refused = home.errors()
    try:
        report = finance(settings, start.date() if start else None, end.date() if end else None)
    except unreachable as exc:
        raise _fail(f"{home.name()} unreachable at {home.where(settings)}: {exc}") from None
    except refused as exc:
        hint = ""
        if "UNKNOWN_TABLE" in str(exc) or "UNKNOWN_DATABASE" in str(exc):
            hint = " (the ClickHouse sink has not created its tables yet: start the worker first)"
        raise _fail(f"{home.name()}: {exc}{hint}") from None

    if format is Format.json:
        print(to_json(report))
    elif format is Format.csv:
        sys.stdout.write(to_csv(report))
    else:
        _print_tables(report)
    if report.exceptions:
        raise typer.Exit(1)


def _money(value: Decimal | None) -> str:
    if value is None:
        return "-"
    return f"[red]{value}[/]" if value < 0 else str(value)


def _print_tables(report: FinanceReport) -> None:
    daily = Table(title="finance per UTC day")
    for col in ("day", "orders", "orders amount", "captured", "captured amount", "refunds", "refunded", "net"):
        daily.add_column(col, justify="left" if col == "day" else "right")
    for d in report.daily:
        daily.add_row(d.day.isoformat(), str(d.orders_placed), _money(d.orders_amount), str(d.payments_captured),
                      _money(d.captured_amount), str(d.refunds), _money(d.refunded_amount), _money(d.net))
    console.print(daily)

    exceptions = Table(title=f"finance exceptions: {len(report.exceptions)} "
                             f"(rows younger than {GRACE_SECONDS}s not judged yet)")
    for col in ("kind", "order_id", "payment_id", "refund_id", "expected", "actual", "detected_at"):
        exceptions.add_column(col, justify="right" if col in ("expected", "actual") else "left")
    for e in report.exceptions:
        exceptions.add_row(f"[red]{e.kind}[/]", e.order_id or "-", e.payment_id or "-", e.refund_id or "-",
                           _money(e.expected), _money(e.actual), e.detected_at.isoformat(timespec="milliseconds"))
    console.print(exceptions)
