"""The finance report's pure parts: the view DDL it sends, and how it renders exact money."""

from __future__ import annotations

import csv
import io
import json
from datetime import UTC, date, datetime
from decimal import Decimal

import pytest

from changeflow.reports.finance import (
    DailyRow,
    FinanceException,
    FinanceReport,
    to_csv,
    to_json,
    view_statements,
)

REPORT = FinanceReport(
    daily=[DailyRow(date(2101, 2, 3), 2, Decimal("10.10"), 1, Decimal("0.10"), 1, Decimal("0.30"), Decimal("-0.20"))],
    exceptions=[
        FinanceException("payment_mismatch", "o-1", None, None, Decimal("50.00"), Decimal("45.55"),
                         datetime(2026, 1, 2, 3, 4, 5, 678000, tzinfo=UTC)),
        FinanceException("orphan_payment", "o-x", "p-1", None, None, Decimal("12.34"),
                         datetime(2026, 1, 2, 3, 4, 6, tzinfo=UTC)),
    ],
)


def test_views_are_created_in_the_configured_database_with_the_grace_window() -> None:
    daily, exceptions = view_statements("warehouse_2", grace_seconds=7)
    assert "\nCREATE OR REPLACE VIEW warehouse_2.finance_daily AS\n" in daily
    assert "CREATE OR REPLACE VIEW warehouse_2.finance_exceptions AS" in exceptions
    assert "FROM warehouse_2.payments FINAL" in exceptions
    assert "now64(3) - toIntervalSecond(7)" in exceptions
    assert "at least 7 s ago" in exceptions.rsplit("COMMENT", 1)[1]
    assert "{" not in daily + exceptions  # every placeholder substituted
    assert "changeflow." not in daily + exceptions


@pytest.mark.parametrize("database", ["changeflow; DROP TABLE x", "a.b", "", "1abc", "name`"])
def test_database_names_that_are_not_plain_identifiers_are_refused(database: str) -> None:
    with pytest.raises(ValueError, match="not a plain ClickHouse database name"):
        view_statements(database)


@pytest.mark.parametrize("grace", [-1, 1.5, True, "5"])
def test_grace_must_be_a_non_negative_integer(grace: object) -> None:
    with pytest.raises(ValueError, match="grace_seconds must be a non-negative integer"):
        view_statements("changeflow", grace)  # type: ignore[arg-type]


def test_json_keeps_amounts_exact_as_strings_and_times_with_their_offset() -> None:
    assert json.loads(to_json(REPORT)) == {
        "daily": [{"day": "2101-02-03", "orders_placed": 2, "orders_amount": "10.10", "payments_captured": 1,
                   "captured_amount": "0.10", "refunds": 1, "refunded_amount": "0.30", "net": "-0.20"}],
        "exceptions": [
            {"kind": "payment_mismatch", "order_id": "o-1", "payment_id": None, "refund_id": None,
             "expected": "50.00", "actual": "45.55", "detected_at": "2026-01-02T03:04:05.678000+00:00"},
            {"kind": "orphan_payment", "order_id": "o-x", "payment_id": "p-1", "refund_id": None,
             "expected": None, "actual": "12.34", "detected_at": "2026-01-02T03:04:06+00:00"},
        ],
    }


def test_csv_is_two_tables_separated_by_an_empty_line_with_absent_values_empty() -> None:
    text = to_csv(REPORT)
    daily, exceptions = text.split("\r\n\r\n")
    assert list(csv.reader(io.StringIO(daily))) == [
        ["day", "orders_placed", "orders_amount", "payments_captured", "captured_amount", "refunds",
         "refunded_amount", "net"],
        ["2101-02-03", "2", "10.10", "1", "0.10", "1", "0.30", "-0.20"],
    ]
    assert list(csv.reader(io.StringIO(exceptions))) == [
        ["kind", "order_id", "payment_id", "refund_id", "expected", "actual", "detected_at"],
        ["payment_mismatch", "o-1", "", "", "50.00", "45.55", "2026-01-02T03:04:05.678000+00:00"],
        ["orphan_payment", "o-x", "p-1", "", "", "12.34", "2026-01-02T03:04:06+00:00"],
    ]


def test_csv_of_an_empty_report_still_has_both_headers() -> None:
    assert to_csv(FinanceReport([], [])) == (
        "day,orders_placed,orders_amount,payments_captured,captured_amount,refunds,refunded_amount,net\r\n"
        "\r\n"
        "kind,order_id,payment_id,refund_id,expected,actual,detected_at\r\n"
    )
