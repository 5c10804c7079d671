"""Finance reconciliation as a user queries it: orders, payments and refunds written in PostgreSQL come out
of the ClickHouse views (and `changeflow report finance`) as exact daily figures and exactly the exceptions
that were planted.

Isolation on a shared stack: every id is a fresh uuid4, the daily figures are checked on two random days
decades ahead that no other test uses, and exceptions are filtered to this test's ids.
"""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

import psycopg
import pytest

from changeflow.pipelines.load import load
from changeflow.pipelines.spec import Pipeline, build
from changeflow.reports.finance import GRACE_SECONDS, ensure_views, read_daily, read_exceptions, report
from changeflow.schemas.book import schema_book
from changeflow.settings import Settings
from changeflow.sinks.clickhouse import META_COLUMNS, ClickHouseStore, client_for, home_database
from tests.integration.conftest import eventually

pytestmark = pytest.mark.integration

Exc = tuple[str, str | None, str | None, str | None, Decimal | None, Decimal | None]


def changeflow(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "changeflow", *args], capture_output=True, text=True, timeout=120,
                          env=None if env is None else {**os.environ, **env})


@dataclass
class Planted:
    """What one test wrote to PostgreSQL, so it can judge the report and clean up after itself."""

    day: date
    ids: dict[str, str] = field(default_factory=dict)
    orders: list[str] = field(default_factory=list)
    payments: list[str] = field(default_factory=list)
    refunds: list[str] = field(default_factory=list)

    def id(self, name: str) -> str:
        return self.ids.setdefault(name, str(uuid.uuid4()))

    def mine(self, exc: dict[str, Any]) -> bool:
        own = set(self.ids.values())
        return bool({exc["order_id"], exc["payment_id"], exc["refund_id"]} & own)


def at(day: date, clock: str) -> datetime:
    return datetime.fromisoformat(f"{day.isoformat()}T{clock}")


@pytest.fixture
def pg(pipeline: Settings) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(pipeline.pg_dsn, autocommit=True) as conn:
        yield conn


@pytest.fixture
def ch(pipeline: Settings) -> Iterator[Any]:
    # The views are made once the entity tables exist: the ClickHouse store makes a table when the first
    # change of the entity arrives (see ``views_ready``).
    client = client_for(pipeline)
    yield client
    client.close()


@pytest.fixture
def planted(pg: psycopg.Connection[Any]) -> Iterator[Planted]:
    # Two consecutive days between 2060 and 2142: nobody else's rows land there.
    p = Planted(day=date(2060, 1, 1) + timedelta(days=uuid.uuid4().int % 30_000))
    yield p
    with pg.transaction():
        pg.execute("DELETE FROM refunds WHERE id = ANY(%s::uuid[])", (p.refunds,))
        pg.execute("DELETE FROM payments WHERE id = ANY(%s::uuid[])", (p.payments,))
        pg.execute("DELETE FROM orders WHERE id = ANY(%s::uuid[])", (p.orders,))


def order(pg: psycopg.Connection[Any], p: Planted, name: str, status: str, total: str, created: datetime) -> str:
    oid = p.id(name)
    pg.execute(
        "INSERT INTO orders (id, user_id, status, total_amount, items, created_at) VALUES (%s, %s, %s, %s, '[]', %s)",
        (oid, f"user-{name}", status, Decimal(total), created),
    )
    p.orders.append(oid)
    return oid


def payment(pg: psycopg.Connection[Any], p: Planted, name: str, order_id: str, amount: str, status: str,
            created: datetime) -> str:
    pid = p.id(name)
    pg.execute(
        "INSERT INTO payments (id, order_id, amount, status, provider_ref, created_at) VALUES (%s, %s, %s, %s, %s, %s)",
        (pid, order_id, Decimal(amount), status, f"psp-{name}", created),
    )
    p.payments.append(pid)
    return pid


def refund(pg: psycopg.Connection[Any], p: Planted, name: str, payment_name: str, order_name: str, amount: str,
           created: datetime) -> str:
    rid = p.id(name)
    pg.execute(
        "INSERT INTO refunds (id, payment_id, order_id, amount, reason, created_at) "
        "VALUES (%s, %s, %s, %s, 'test', %s)",
        (rid, p.id(payment_name), p.id(order_name), Decimal(amount), created),
    )
    p.refunds.append(rid)
    return rid


def plant(pg: psycopg.Connection[Any], p: Planted) -> None:
    """Each order with its payments (and refunds) in one source transaction, as a shop would write them."""
    d, d1 = p.day, p.day + timedelta(days=1)
    with pg.transaction():  # clean: paid in full, partly refunded
        a = order(pg, p, "A", "confirmed", "100.10", at(d, "00:00:00+00:00"))
        payment(pg, p, "pA", a, "100.10", "captured", at(d, "00:00:00+00:00"))
        refund(pg, p, "rA", "pA", "A", "10.00", at(d, "12:00:00+00:00"))
    with pg.transaction():  # shipped, captured 45.55 of 50.00 (authorized and failed ones do not count)
        b = order(pg, p, "B", "shipped", "50.00", at(d, "08:00:00+00:00"))
        payment(pg, p, "pB1", b, "20.00", "captured", at(d, "08:00:00+00:00"))
        payment(pg, p, "pB2", b, "25.55", "captured", at(d, "08:00:01+00:00"))
        payment(pg, p, "pB3", b, "4.45", "authorized", at(d, "08:00:02+00:00"))
        payment(pg, p, "pB4", b, "50.00", "failed", at(d, "08:00:03+00:00"))
    with pg.transaction():  # pending: a short capture is not judged
        c = order(pg, p, "C", "pending", "9.99", at(d, "09:00:00+00:00"))
        payment(pg, p, "pC", c, "1.00", "captured", at(d, "09:00:00+00:00"))
    with pg.transaction():  # refunded 35.00 of a 30.00 payment
        e = order(pg, p, "E", "delivered", "30.00", at(d, "10:00:00+00:00"))
        payment(pg, p, "pE", e, "30.00", "captured", at(d, "10:00:00+00:00"))
        refund(pg, p, "rE1", "pE", "E", "20.00", at(d, "11:00:00+00:00"))
        refund(pg, p, "rE2", "pE", "E", "15.00", at(d, "12:00:00+00:00"))
    with pg.transaction():  # cancelled, 15.00 of 40.00 refunded; the last microsecond of the day
        f = order(pg, p, "F", "cancelled", "40.00", at(d, "23:59:59.999999+00:00"))
        payment(pg, p, "pF", f, "40.00", "captured", at(d, "23:59:59.999999+00:00"))
        refund(pg, p, "rF", "pF", "F", "15.00", at(d, "23:59:59.999999+00:00"))
    with pg.transaction():  # cancelled and fully refunded; placed at 01:30 in UTC+5, i.e. 20:30 UTC on day d
        g = order(pg, p, "G", "cancelled", "25.00", at(d1, "01:30:00+05:00"))
        payment(pg, p, "pG", g, "25.00", "captured", at(d1, "01:30:00+05:00"))
        refund(pg, p, "rG", "pG", "G", "25.00", at(d, "22:00:00+00:00"))
    with pg.transaction():  # cancelled, its only payment failed: nothing to refund
        h = order(pg, p, "H", "cancelled", "12.00", at(d1, "00:00:00+00:00"))
        payment(pg, p, "pH", h, "12.00", "failed", at(d1, "00:00:00+00:00"))
    with pg.transaction():  # paid in full in two captures
        i = order(pg, p, "I", "processing", "60.00", at(d, "13:00:00+00:00"))
        payment(pg, p, "pI1", i, "30.00", "captured", at(d, "13:00:00+00:00"))
        payment(pg, p, "pI2", i, "30.00", "captured", at(d, "13:05:00+00:00"))
    with pg.transaction():  # its order is deleted below: the payment becomes an orphan
        k = order(pg, p, "K", "confirmed", "7.00", at(d1, "05:00:00+00:00"))
        payment(pg, p, "pK", k, "7.00", "captured", at(d1, "05:00:00+00:00"))
    # A payment for an order that never existed, written last.
    payment(pg, p, "pO", p.id("O-missing"), "12.34", "captured", at(d1, "06:00:00+00:00"))


def expected_exceptions(p: Planted, f_refunded: str = "15.00") -> set[Exc]:
    rows: set[Exc] = {
        ("payment_mismatch", p.id("B"), None, None, Decimal("50.00"), Decimal("45.55")),
        ("refund_exceeds_payment", p.id("E"), p.id("pE"), p.id("rE2"), Decimal("30.00"), Decimal("35.00")),
        ("orphan_payment", p.id("O-missing"), p.id("pO"), None, None, Decimal("12.34")),
        ("orphan_payment", p.id("K"), p.id("pK"), None, None, Decimal("7.00")),
    }
    if Decimal(f_refunded) < Decimal("40.00"):
        rows.add(("cancelled_but_paid", p.id("F"), None, None, Decimal("40.00"), Decimal(f_refunded)))
    return rows


def as_tuple(exc: dict[str, Any]) -> Exc:
    def dec(v: Any) -> Decimal | None:
        return None if v in (None, "") else Decimal(v)

    def text(v: Any) -> str | None:
        return None if v in (None, "") else str(v)

    return (exc["kind"], text(exc["order_id"]), text(exc["payment_id"]), text(exc["refund_id"]),
            dec(exc["expected"]), dec(exc["actual"]))


def my_exceptions(ch: Any, settings: Settings, p: Planted) -> set[Exc]:
    found = [e.as_dict() for e in read_exceptions(ch, home_database(load()))]
    mine = [as_tuple(e) for e in found if p.mine(e)]
    assert len(mine) == len(set(mine)), f"duplicate exception rows: {mine}"
    return set(mine)


def views_ready(ch: Any, db: str) -> bool:
    """Create the views as the report does; an entity table not made yet is a wait, not a failure."""
    from clickhouse_connect.driver.exceptions import DatabaseError

    try:
        ensure_views(ch, db)
    except DatabaseError as exc:
        assert "UNKNOWN_TABLE" not in str(exc) and "Unknown table" not in str(exc), str(exc).splitlines()[0]
        raise
    return True


def commerce_versions(settings: Settings, commerce: Pipeline) -> dict[str, Any]:
    """The newest canonical schema per entity: from the schema topic, else from the source catalog (an
    entity without a change yet has no published version)."""
    from changeflow import schemas
    from changeflow.pipelines.catalog import read_dsn
    from changeflow.pipelines.types import from_postgres

    versions: dict[str, Any] = dict(schema_book(settings, commerce, writer=False).latest)
    catalog = read_dsn(settings.pg_dsn, ["public"])
    for name, spec in commerce.entities.items():
        table = catalog.table(spec.source_schema, spec.source_table)
        if name in versions or table is None or spec.source != "postgres":
            continue
        columns = {c.name: from_postgres(c.format_type, is_enum=c.is_enum) for c in table.columns
                   if c.name not in spec.dropped}
        versions[name] = schemas.make_version(name, 1, {**columns, **spec.declared_types}, table.primary_key)
    return versions


def daily_rows(p: Planted) -> list[dict[str, Any]]:
    d, d1 = p.day, p.day + timedelta(days=1)
    return [
        # orders A B C E F G I; captures pA pB1 pB2 pC pE pF pG pI1 pI2; refunds rA rE1 rE2 rF rG
        {"day": d.isoformat(), "orders_placed": 7, "orders_amount": "315.09", "payments_captured": 9,
         "captured_amount": "301.65", "refunds": 5, "refunded_amount": "85.00", "net": "216.65"},
        # orders H (K deleted); captures pK pO (pH failed)
        {"day": d1.isoformat(), "orders_placed": 1, "orders_amount": "12.00", "payments_captured": 2,
         "captured_amount": "19.34", "refunds": 0, "refunded_amount": "0.00", "net": "19.34"},
    ]


def test_report_finds_exactly_the_planted_exceptions_and_exact_daily_figures(
    pipeline: Settings, pg: psycopg.Connection[Any], ch: Any, planted: Planted
) -> None:
    p, db = planted, home_database(load())
    plant(pg, p)
    eventually(lambda: views_ready(ch, db), timeout=90, interval=0.1, what="the finance views")

    # The last write is visible in ClickHouse but younger than the grace window: not judged yet.
    def fresh_orphan() -> tuple[int, int]:
        row = ch.query(
            f"SELECT (SELECT count() FROM {db}.finance_exceptions WHERE payment_id = {{id:String}}), "
            f"(SELECT dateDiff('millisecond', _ingested_at, now64(3)) FROM {db}.payments FINAL "
            "WHERE id = {id:String})",
            parameters={"id": p.id("pO")},
        ).result_rows[0]
        assert row[1] is not None, "orphan payment not in ClickHouse yet"
        return int(row[0]), int(row[1])

    judged, age_ms = eventually(fresh_orphan, timeout=90, interval=0.1, what="orphan payment in ClickHouse")
    assert age_ms < GRACE_SECONDS * 1000, f"took {age_ms} ms to look; the grace window was not exercised"
    assert judged == 0

    pg.execute("DELETE FROM orders WHERE id = %s", (p.id("K"),))

    def settled() -> set[Exc]:
        found = my_exceptions(ch, pipeline, p)
        assert found == expected_exceptions(p), found
        return found

    eventually(settled, timeout=90, interval=0.5, what="the planted exceptions")
    daily = [r.as_dict() for r in read_daily(ch, db, p.day, p.day + timedelta(days=1))]
    assert daily == daily_rows(p)

    # The same through the CLI, as a user pipes it: JSON for the unique days only (no exceptions were
    # detected on those days), then everything, where the planted exceptions are among all the others.
    ranged = changeflow("report", "finance", "--from", p.day.isoformat(),
                        "--to", (p.day + timedelta(days=1)).isoformat(), "--format", "json")
    assert ranged.returncode == 0, ranged.stderr
    assert json.loads(ranged.stdout) == {"daily": daily_rows(p), "exceptions": []}

    full = changeflow("report", "finance", "--format", "json")
    assert full.returncode == 1, full.stderr  # exceptions present → exit 1, like `report drift` on drift
    parsed = json.loads(full.stdout)
    assert {as_tuple(e) for e in parsed["exceptions"] if p.mine(e)} == expected_exceptions(p)
    mine = [e for e in parsed["exceptions"] if p.mine(e)]
    assert all(datetime.fromisoformat(e["detected_at"]).tzinfo is not None for e in mine)
    assert [r for r in parsed["daily"] if r["day"] in {r["day"] for r in daily_rows(p)}] == daily_rows(p)

    as_csv = changeflow("report", "finance", "--format", "csv")
    assert as_csv.returncode == 1, as_csv.stderr
    daily_block, exceptions_block = as_csv.stdout.split("\n\n")  # text mode: CRLF read as LF
    csv_daily = list(csv.DictReader(io.StringIO(daily_block)))
    ours = {r["day"] for r in daily_rows(p)}
    assert [
        {k: int(v) if k in ("orders_placed", "payments_captured", "refunds") else v for k, v in r.items()}
        for r in csv_daily if r["day"] in ours
    ] == daily_rows(p)
    csv_exceptions = list(csv.DictReader(io.StringIO(exceptions_block)))
    assert list(csv_exceptions[0]) == ["kind", "order_id", "payment_id", "refund_id", "expected", "actual",
                                       "detected_at"]
    assert {as_tuple(e) for e in csv_exceptions if p.mine(e)} == expected_exceptions(p)

    table = changeflow("report", "finance", "--from", p.day.isoformat(), "--to", p.day.isoformat())
    assert table.returncode == 0, table.stderr
    day_line = next(line for line in table.stdout.splitlines() if p.day.isoformat() in line)
    assert [cell.strip() for cell in day_line.strip("│ \n").split("│")] == [
        p.day.isoformat(), "7", "315.09", "9", "301.65", "5", "85.00", "216.65"]

    # Refunding the rest of the cancelled order settles it; the other exceptions stay.
    refund(pg, p, "rF2", "pF", "F", "25.00", at(p.day + timedelta(days=1), "09:00:00+00:00"))

    def refunded_in_full() -> set[Exc]:
        found = my_exceptions(ch, pipeline, p)
        assert found == expected_exceptions(p, f_refunded="40.00"), found
        return found

    eventually(refunded_in_full, timeout=90, interval=0.5, what="cancelled_but_paid settled")
    after = {r.day: r for r in read_daily(ch, db, p.day, p.day + timedelta(days=1))}
    assert (after[p.day + timedelta(days=1)].refunds, after[p.day + timedelta(days=1)].refunded_amount,
            after[p.day + timedelta(days=1)].net) == (1, Decimal("25.00"), Decimal("-5.66"))


@pytest.fixture
def scratch(live_stack: Settings) -> Iterator[tuple[Pipeline, Any]]:
    """A database of its own (a copy of the commerce pipeline under another namespace), its tables made by
    the ClickHouse store's own setup() from the commerce schema versions, its views by the report; dropped
    afterwards."""
    commerce = load()
    scratch_pipeline = build(commerce.file.model_copy(update={"namespace": f"finance_test_{uuid.uuid4().hex[:12]}"}),
                             commerce.path)
    store = ClickHouseStore(live_stack, scratch_pipeline)
    store.setup(commerce_versions(live_stack, commerce))
    report(live_stack, scratch_pipeline)  # creates the views, as every report run does
    client = client_for(live_stack)
    yield scratch_pipeline, client
    client.command(f"DROP DATABASE IF EXISTS {home_database(scratch_pipeline)}")
    client.close()
    store.close()


def test_the_report_creates_the_views_with_the_grace_window_stated(scratch: tuple[Pipeline, Any]) -> None:
    scratch_pipeline, client = scratch
    rows = client.query(
        "SELECT name, comment FROM system.tables WHERE database = {db:String} AND engine = 'View' ORDER BY name",
        parameters={"db": home_database(scratch_pipeline)},
    ).result_rows
    assert [name for name, _ in rows] == ["finance_daily", "finance_exceptions"]
    assert f"at least {GRACE_SECONDS} s ago by _ingested_at" in dict(rows)["finance_exceptions"]
    columns = client.query(f"DESCRIBE {home_database(scratch_pipeline)}.finance_exceptions").result_rows
    assert [(c[0], c[1]) for c in columns] == [
        ("kind", "String"), ("order_id", "Nullable(String)"), ("payment_id", "Nullable(String)"),
        ("refund_id", "Nullable(String)"), ("expected", "Nullable(Decimal(38, 2))"),
        ("actual", "Nullable(Decimal(38, 2))"), ("detected_at", "DateTime64(3, 'UTC')"),
    ]


def test_grace_window_holds_back_rows_of_a_transaction_still_arriving(scratch: tuple[Pipeline, Any]) -> None:
    """Rows written straight into the sink's tables with chosen `_ingested_at`, so the window is exact.

    A deleted order whose tombstone carries only the key (REPLICA IDENTITY DEFAULT), an order whose second
    payment just arrived, and a payment whose refund just arrived: each is judged only once the newest row
    it depends on is older than the window.
    """
    scratch_pipeline, client = scratch
    db = home_database(scratch_pipeline)
    now = datetime.now(UTC)
    old, recent = now - timedelta(seconds=60), now
    meta = list(META_COLUMNS)

    existing = {
        entity: [n for (n,) in client.query("SELECT name FROM system.columns WHERE database = {db:String} "
                                            "AND table = {t:String} ORDER BY position",
                                            parameters={"db": db, "t": entity}).result_rows if n not in meta]
        for entity in ("orders", "payments", "refunds")
    }

    def insert(entity: str, rows: list[dict[str, Any]]) -> None:
        columns = existing[entity]
        rows = [{"_key": r.get("id"), **r} for r in rows]  # the canonical key text: the id
        client.insert(f"{db}.{entity}", [[r.get(c) for c in [*columns, *meta]] for r in rows],
                      column_names=[*columns, *meta])

    created = datetime(2030, 1, 1, tzinfo=UTC)
    insert("orders", [
        {"id": "o-del", "status": "confirmed", "total_amount": Decimal("5.00"), "created_at": created,
         "_version": 1, "_is_deleted": 0, "_ts_ms": 1, "_ingested_at": old},
        {"id": "o-del", "_version": 2, "_is_deleted": 1, "_ts_ms": 2, "_ingested_at": recent},  # key-only image
        {"id": "o-two", "status": "shipped", "total_amount": Decimal("10.00"), "created_at": created,
         "_version": 1, "_is_deleted": 0, "_ts_ms": 1, "_ingested_at": old},
    ])
    insert("payments", [
        {"id": "p-del", "order_id": "o-del", "amount": Decimal("5.00"), "status": "captured", "created_at": created,
         "_version": 1, "_is_deleted": 0, "_ts_ms": 1, "_ingested_at": old},
        {"id": "p-two-1", "order_id": "o-two", "amount": Decimal("4.00"), "status": "captured",
         "created_at": created, "_version": 1, "_is_deleted": 0, "_ts_ms": 1, "_ingested_at": old},
        {"id": "p-two-2", "order_id": "o-two", "amount": Decimal("5.00"), "status": "captured",
         "created_at": created, "_version": 1, "_is_deleted": 0, "_ts_ms": 1, "_ingested_at": recent},
        {"id": "p-ref", "order_id": "o-two", "amount": Decimal("1.00"), "status": "authorized",
         "created_at": created, "_version": 1, "_is_deleted": 0, "_ts_ms": 1, "_ingested_at": old},
    ])
    insert("refunds", [
        {"id": "r-1", "payment_id": "p-ref", "order_id": "o-two", "amount": Decimal("3.00"), "created_at": created,
         "_version": 1, "_is_deleted": 0, "_ts_ms": 1, "_ingested_at": recent},
    ])

    def found() -> set[Exc]:
        return {as_tuple(e.as_dict()) for e in read_exceptions(client, db)}

    assert found() == set()

    # The same evidence once every row is older than the window: all three are judged.
    def judged() -> bool:
        assert found() == {
            ("orphan_payment", "o-del", "p-del", None, None, Decimal("5.00")),
            ("payment_mismatch", "o-two", None, None, Decimal("10.00"), Decimal("9.00")),
            ("refund_exceeds_payment", "o-two", "p-ref", "r-1", Decimal("1.00"), Decimal("3.00")),
        }
        return True

    eventually(judged, timeout=GRACE_SECONDS + 10, interval=0.25, what="judgement after the grace window")
    detected = {e.kind: e.detected_at for e in read_exceptions(client, db)}
    assert abs((detected["orphan_payment"] - recent).total_seconds()) < 0.002  # the tombstone's arrival


def test_cli_says_why_it_cannot_report(live_stack: Settings, tmp_path: Any) -> None:
    missing = f"finance_missing_{uuid.uuid4().hex[:12]}"
    commerce = load()
    assert commerce.path is not None
    elsewhere = tmp_path / "pipeline.yml"  # the commerce pipeline under a namespace with no database
    elsewhere.write_text(commerce.path.read_text().replace("namespace: changeflow", f"namespace: {missing}"))
    result = changeflow("report", "finance", env={"CHANGEFLOW_PIPELINE": str(elsewhere)})
    assert result.returncode == 2
    assert f"Database {missing} does not exist. (UNKNOWN_DATABASE)" in result.stderr
    assert "the ClickHouse sink has not created its tables yet: start the worker first" in result.stderr
    assert result.stdout == ""

    backwards = changeflow("report", "finance", "--from", "2030-02-01", "--to", "2030-01-31")
    assert (backwards.returncode, backwards.stderr.strip()) == (2, "error: --from 2030-02-01 is after --to 2030-01-31")
