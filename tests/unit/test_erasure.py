"""Erasure's pure parts: the ``erasure:`` section resolved and judged, and the suppression list judging records
in every order of arrival (README "Erasure")."""

from __future__ import annotations

import itertools
import random
from dataclasses import replace

import pytest

from changeflow.pipelines.catalog import Catalog, Column, Table
from changeflow.pipelines.check import check
from changeflow.pipelines.erasure import mark, subjects
from changeflow.pipelines.load import PipelineError, parse
from changeflow.reports.reconcile.views import erased_fields
from changeflow.streams.erasure import Entry, Suppressor, anonymised
from changeflow.streams.records import ChangeRecord, without_values

KEY = b"k" * 32
AT = 1_000_000


def catalog() -> Catalog:
    tables = [
        Table("public", "accounts", (Column("account_no", "bigint"), Column("email", "text")), ("account_no",)),
        Table("public", "orders", (Column("id", "uuid"), Column("account_no", "bigint"), Column("ship_to", "text"),
                                   Column("total", "numeric(12,2)")), ("id",)),
        Table("public", "payments", (Column("id", "uuid"), Column("order_id", "uuid"), Column("card", "text")),
              ("id",)),
        Table("public", "reviews", (Column("id", "uuid"), Column("account_no", "bigint"), Column("body", "text")),
              ("id",)),
    ]
    return Catalog("shop", ("public",), {(t.schema, t.name): t for t in tables})


HEAD = """\
name: shop
sources: {postgres: {database: shop}}
entities:
  accounts: {table: public.accounts}
  orders: {table: public.orders}
  payments: {table: public.payments}
  reviews: {table: public.reviews}
"""

GOOD = HEAD + """\
erasure:
  subjects:
    customer:
      entity: accounts
      refers:
        payments: {column: order_id, through: orders, action: delete}
        orders: {column: account_no, action: anonymise, clear: [ship_to]}
        reviews: {column: account_no, action: delete}
      external:
        billing: {description: "invoices, in the billing service"}
"""


def problems(text: str) -> list[str]:
    return [str(p) for p in check(parse(text, "shop.yml"), catalog())]


def test_a_good_section_resolves_parents_first_and_has_no_problems() -> None:
    pipeline = parse(GOOD, "shop.yml")
    assert problems(GOOD) == []
    subject = subjects(pipeline)["customer"]
    assert subject.entity == "accounts"
    assert [(r.entity, r.parent, r.action) for r in subject.references] == [
        ("orders", "accounts", "anonymise"), ("reviews", "accounts", "delete"), ("payments", "orders", "delete")]
    assert subject.reference("orders").cleared == ("account_no", "ship_to")  # type: ignore[union-attr]
    assert subject.external == {"billing": "invoices, in the billing service"}


@pytest.mark.parametrize(("section", "expected"), [
    ("    customer: {entity: acounts}\n",
     "erasure.subjects.customer.entity: unknown entity 'acounts'; did you mean 'accounts'?"),
    ("    customer: {entity: accounts, refers: {ordrs: {column: account_no, action: delete}}}\n",
     "erasure.subjects.customer.refers.ordrs: unknown entity 'ordrs'; did you mean 'orders'?"),
    ("    customer: {entity: accounts, refers: {orders: {column: acount_no, action: delete}}}\n",
     "erasure.subjects.customer.refers.orders.column: column 'acount_no' is not in public.orders; did you mean "
     "'account_no'?"),
    ("    customer: {entity: accounts, refers: {orders: {column: account_no, action: delete, clear: [ship_to]}}}\n",
     "erasure.subjects.customer.refers.orders.clear: a deleted row has no fields left to clear; remove `clear`, or "
     "use `action: anonymise`"),
    ("    customer: {entity: accounts, refers: {orders: {column: account_no, action: anonymise, clear: [id]}}}\n",
     "erasure.subjects.customer.refers.orders.clear: 'id' is part of orders's key: an anonymised row keeps its "
     "key; use `action: delete` to remove the row"),
    ("    customer: {entity: accounts, refers: {payments: {column: order_id, through: orders, action: delete}}}\n",
     "erasure.subjects.customer.refers.payments.through: 'orders' is neither the subject's entity nor under "
     "`refers`; name one of: accounts, payments"),
    ("    customer: {entity: accounts, refers: {accounts: {column: account_no, action: delete}}}\n",
     "erasure.subjects.customer.refers.accounts: the subject's own entity is erased whole; list only the entities "
     "that refer to it"),
    ("    customer:\n      entity: accounts\n      refers:\n"
     "        orders: {column: id, through: payments, action: delete}\n"
     "        payments: {column: order_id, through: orders, action: delete}\n",
     "erasure.subjects.customer.refers.orders.through: the references go round in a circle; one of them must "
     "point at the subject's entity"),
])
def test_each_mistake_is_named_with_its_path_and_fix(section: str, expected: str) -> None:
    assert expected in problems(HEAD + "erasure:\n  subjects:\n" + section)


def test_a_view_embedding_the_person_from_an_undeclared_entity_is_refused() -> None:
    text = HEAD + """\
views:
  review_authors:
    from: reviews
    join: {author: {entity: accounts, on: account_no}}
    fields: {body: body, email: author.email}
erasure:
  subjects:
    customer: {entity: accounts}
"""
    assert problems(text) == [
        "views.review_authors: embeds accounts (erasure subject 'customer') from 'reviews', which "
        "`erasure.subjects.customer.refers` does not name: declare reviews there (delete or anonymise), so an "
        "erasure can find the view's rows"]


def test_the_file_model_refuses_unknown_keys_and_actions() -> None:
    with pytest.raises(PipelineError) as raised:
        parse(HEAD + "erasure:\n  subjects:\n    customer: {entity: accounts, refers: {orders: "
                     "{column: account_no, action: shred}}}\n", "shop.yml")
    assert "erasure.subjects.customer.refers.orders.action" in str(raised.value)
    with pytest.raises(PipelineError) as raised:
        parse(HEAD + "erasure:\n  subject: {}\n", "shop.yml")
    assert "erasure.subject" in str(raised.value)


def test_a_mark_is_an_hmac_of_entity_and_key_and_keeps_the_parts_apart() -> None:
    assert mark(KEY, "accounts", "7") == mark(KEY, "accounts", "7")
    assert mark(KEY, "accounts", "7") != mark(b"another key", "accounts", "7")
    assert mark(KEY, "a", "b:c") != mark(KEY, "a:b", "c")
    # HMAC-SHA256 of "entity<US>key" (RFC 4231's construction through hashlib), fixed for this key.
    assert mark(KEY, "accounts", "7") == "e55236a055c3930e020f6f5c32d3dfc6126f2eea4a57f1ae2f7291ff9bb0cbc5"


# --- the suppression list ---------------------------------------------------------------------------------
def suppressor(*entries: Entry) -> Suppressor:
    return Suppressor(subjects(parse(GOOD, "shop.yml")).values(), KEY, {e.mark: e for e in entries})


def rec(entity: str, key: str, after: dict[str, object] | None, ts_ms: int, op: str = "u", partial: bool = False,
        version: int = 1) -> ChangeRecord:
    return ChangeRecord("postgres", entity, key, op, version, ts_ms, None, after,  # type: ignore[arg-type]
                        partial=partial, types={"id": None, "account_no": None, "ship_to": None, "total": None})


ERASED = Entry(mark(KEY, "accounts", "7"), "erase", AT, "r1")
ORDER_A = Entry(mark(KEY, "orders", "a"), "anonymise", AT, "r1")
PAYMENT = Entry(mark(KEY, "payments", "p"), "erase", AT, "r1")


def test_the_persons_row_written_before_the_request_is_dropped_and_after_it_flows() -> None:
    s = suppressor(ERASED)
    assert s.apply(rec("accounts", "7", {"account_no": 7, "email": "x@y"}, AT - 5)) is None  # late, or replayed
    assert s.apply(rec("accounts", "7", {"account_no": 7, "email": "x@y"}, AT)) is None
    again = rec("accounts", "7", {"account_no": 7, "email": "new@y"}, AT + 1)  # registered again: new data
    assert s.apply(again) == again
    other = rec("accounts", "8", {"account_no": 8}, AT - 5)
    assert s.apply(other) == other


def test_a_delete_passes_unless_it_is_a_replayed_delete_of_an_erased_row() -> None:
    """A replayed delete of an erased row would leave a tombstone (a trace of the key) in a store; the erasure's
    own delete, newer than the request, passes; an anonymised row's delete passes whenever it comes."""
    s = suppressor(ERASED, ORDER_A, PAYMENT)
    assert s.apply(rec("accounts", "7", None, AT - 5, op="d")) is None
    assert s.apply(rec("payments", "p", None, AT, op="d")) is None
    for r in (rec("accounts", "7", None, AT + 1, op="d"), rec("orders", "a", None, AT - 5, op="d"),
              rec("accounts", "8", None, AT - 5, op="d")):
        assert s.apply(r) == r


def test_an_order_found_by_the_erasure_is_anonymised_in_every_later_change() -> None:
    s = suppressor(ERASED, ORDER_A)
    for ts in (AT - 5, AT + 10_000):
        out = s.apply(rec("orders", "a", {"id": "a", "account_no": 7, "ship_to": "5th Ave", "total": 3}, ts))
        assert out is not None and out.after == {"id": "a", "account_no": None, "ship_to": None, "total": 3}


def test_a_late_order_not_found_by_the_erasure_is_anonymised_through_its_link_and_a_new_one_flows() -> None:
    s = suppressor(ERASED)
    late = s.apply(rec("orders", "b", {"id": "b", "account_no": 7, "ship_to": "5th Ave", "total": 3}, AT - 1))
    assert late is not None and late.after == {"id": "b", "account_no": None, "ship_to": None, "total": 3}
    new = rec("orders", "c", {"id": "c", "account_no": 7, "ship_to": "Elm St", "total": 4}, AT + 1)
    assert s.apply(new) == new


def test_a_partial_change_keeps_its_shape_with_the_cleared_fields_added() -> None:
    s = suppressor(ERASED, ORDER_A)
    out = s.apply(rec("orders", "a", {"total": 9}, AT + 1, partial=True))
    assert out is not None and out.partial and out.after == {"total": 9, "account_no": None, "ship_to": None}


def test_payments_through_an_erased_order_are_dropped_by_key_and_by_link() -> None:
    s = suppressor(ERASED, ORDER_A, PAYMENT)
    assert s.apply(rec("payments", "p", {"id": "p", "order_id": "z", "card": "4111"}, AT + 99)) is None
    assert s.apply(rec("payments", "q", {"id": "q", "order_id": "a", "card": "4111"}, AT - 1)) is None
    unrelated = rec("payments", "r", {"id": "r", "order_id": "b", "card": "4111"}, AT - 1)
    assert s.apply(unrelated) == unrelated


def test_reviews_pointing_at_the_person_are_dropped_before_the_request_only() -> None:
    s = suppressor(ERASED)
    assert s.apply(rec("reviews", "v", {"id": "v", "account_no": 7, "body": "great"}, AT - 1)) is None
    kept = rec("reviews", "w", {"id": "w", "account_no": 7, "body": "new"}, AT + 1)
    assert s.apply(kept) == kept


def test_an_entity_the_section_does_not_name_is_never_judged() -> None:
    s = Suppressor(subjects(parse(GOOD, "shop.yml")).values(), KEY, {ERASED.mark: ERASED})
    assert not s.judges("products") and s.judges("orders")
    assert not Suppressor([], KEY).judges("accounts")


def test_the_strongest_entry_wins_and_keeps_the_latest_time() -> None:
    s = suppressor()
    s.add([Entry(ERASED.mark, "anonymise", AT, "r1"), Entry(ERASED.mark, "erase", AT - 10, "r2")])
    assert s.entries[ERASED.mark].action == "erase" and s.entries[ERASED.mark].at_ms == AT
    s.add([Entry(ERASED.mark, "anonymise", AT + 5, "r3")])
    assert s.entries[ERASED.mark].action == "erase" and s.entries[ERASED.mark].at_ms == AT + 5


def test_an_entry_from_the_topic_is_checked() -> None:
    assert Entry.from_json(ERASED.to_json()) == ERASED
    for bad in ({"mark": "m", "action": "forget", "at_ms": 1}, {"mark": "m", "action": "erase", "at_ms": "1"},
                {"action": "erase", "at_ms": 1}):
        with pytest.raises((ValueError, KeyError)):
            Entry.from_json(bad)


def test_every_order_of_arrival_ends_with_nothing_of_the_person() -> None:
    """Replays, late messages and new data, in every interleaving: the surviving records never carry the
    person's link or personal fields from before the request, and new data after it is whole."""
    s = suppressor(ERASED, ORDER_A)
    history = [
        rec("accounts", "7", {"account_no": 7, "email": "old@x"}, AT - 30),
        rec("orders", "a", {"id": "a", "account_no": 7, "ship_to": "5th", "total": 1}, AT - 20),
        rec("orders", "b", {"id": "b", "account_no": 7, "ship_to": "6th", "total": 2}, AT - 10),
        rec("accounts", "7", {"account_no": 7, "email": "new@x"}, AT + 10),
        rec("orders", "c", {"id": "c", "account_no": 7, "ship_to": "7th", "total": 3}, AT + 20),
        rec("accounts", "7", None, AT - 5, op="d"),
    ]
    rng = random.Random(7)
    orders = list(itertools.permutations(history))
    for order in rng.sample(orders, 200):
        out = [s.apply(r) for r in order]
        kept = [r for r in out if r is not None]
        for r in kept:
            image = r.after or {}
            if r.ts_ms <= AT:
                assert image.get("email") is None and image.get("ship_to") is None and image.get("account_no") is None
        assert sorted((r.entity, r.key, r.ts_ms) for r in kept) == [
            ("accounts", "7", AT + 10), ("orders", "a", AT - 20), ("orders", "b", AT - 10), ("orders", "c", AT + 20)]


def test_anonymised_leaves_a_row_without_the_columns_alone() -> None:
    ref = subjects(parse(GOOD, "shop.yml"))["customer"].reference("orders")
    assert ref is not None
    r = ChangeRecord("postgres", "orders", "a", "u", 1, 1, {"id": "a"}, {"id": "a", "account_no": 7})
    out = anonymised(r, ref)
    assert out.before == {"id": "a"} and out.after == {"id": "a", "account_no": None}


@pytest.mark.parametrize(("reason", "logged"), [
    ("price value 'abc@example.com' is not a number", "price value '…' is not a number"),
    ("Decimal bytes are not base64: b'\\x00ann'", "Decimal bytes are not base64: b'…'"),
    ('ZonedTimestamp without an offset: "2020-01-01 \\"Ann\\""', "ZonedTimestamp without an offset: '…'"),
    ("no op field", "no op field"),
])
def test_a_dead_letters_reason_is_logged_without_the_values_it_quotes(reason: str, logged: str) -> None:
    assert without_values(reason) == logged


VIEWS = GOOD.replace("erasure:", """views:
  order_view:
    from: orders
    join: {buyer: {entity: accounts, on: account_no}}
    fields: {total: total, email: buyer.email, ship_to: ship_to}
  per_buyer:
    from: orders
    fields: {account_no: account_no, total: total}
    group_by: [account_no]
    aggregates: {orders: count}
erasure:""")


def test_a_views_rows_from_before_the_request_are_judged_by_their_root_row() -> None:
    """A replay of a view's topic, or a store added later, must not bring back the rows the view published
    before the erasure: a row of an anonymised root loses the fields holding the person."""
    pipeline = parse(VIEWS, "shop.yml")
    subject = subjects(pipeline)["customer"]
    assert subject.view_fields == {"order_view": ("orders", ("email", "ship_to"))}  # an aggregate has no row per person
    s = Suppressor(subjects(pipeline).values(), KEY, {ORDER_A.mark: ORDER_A, PAYMENT.mark: PAYMENT})
    old = ChangeRecord("view", "order_view", "a", "u", 5, AT - 1, None, {"total": 3, "email": "x@y", "ship_to": "5th"})
    out = s.apply(old)
    assert out is not None and out.after == {"total": 3, "email": None, "ship_to": None}
    new = replace(old, ts_ms=AT + 1)
    assert s.apply(new) is new
    other = replace(old, key="z")
    assert s.apply(other) is other
    erased = Suppressor(subjects(pipeline).values(), KEY, {mark(KEY, "orders", "a"): Entry(
        mark(KEY, "orders", "a"), "erase", AT, "r1")})
    assert erased.apply(old) is None


def test_an_entity_referring_to_two_subjects_is_refused() -> None:
    text = GOOD + """\
    courier:
      entity: payments
      refers:
        orders: {column: id, action: anonymise}
"""
    assert "erasure.subjects.courier.refers.orders: 'orders' is already under subject 'customer''s `refers`: an " \
           "entity refers to one subject (its anonymisation is that subject's); merge the two subjects' references" \
           in problems(text)


def test_a_row_read_at_the_source_now_stands_as_the_stream_writes_it() -> None:
    """Reconcile reads the source now: only a referring row's own mark counts (the person's row, if there, has
    registered again; a link written after the request is new data)."""
    s = suppressor(ERASED, ORDER_A, PAYMENT)
    assert s.read_now("accounts", "7") == frozenset()
    assert s.read_now("orders", "a") == frozenset({"account_no", "ship_to"})
    assert s.read_now("orders", "b") == frozenset()
    assert s.read_now("payments", "p") is None
    assert s.read_now("shipments", "a") == frozenset()
    assert suppressor().read_now("payments", "p") == frozenset()
    # The same answer apply gives a record read now.
    now = AT + 10
    assert s.apply(rec("payments", "p", {"id": "p", "order_id": "a"}, now)) is None
    order = s.apply(rec("orders", "a", {"id": "a", "account_no": 7, "ship_to": "5th", "total": 3}, now))
    assert order is not None and order.after == {"id": "a", "account_no": None, "ship_to": None, "total": 3}


CHAINED = GOOD.replace("erasure:", """views:
  payment_view:
    from: payments
    join:
      order: {entity: orders, on: order_id}
      buyer: {entity: accounts, from: order, on: account_no}
    fields: {card: card, total: order.total, ship_to: order.ship_to, email: buyer.email}
erasure:""")


@pytest.mark.parametrize(("entries", "keys", "expected"), [
    # Nothing erased: the row as SQL joined it.
    ((), {"": ["q"], "order": ["b"], "buyer": [8]},
     {"card": "4111", "total": 3, "ship_to": "5th", "email": "x@y"}),
    # The order anonymised: its ship_to cleared, and its link to the buyer cut (the buyer's fields too).
    ((ORDER_A,), {"": ["q"], "order": ["a"], "buyer": [7]},
     {"card": "4111", "total": 3, "ship_to": None, "email": None}),
    # The payment, the root, deleted by the erasure: no row.
    ((PAYMENT,), {"": ["p"], "order": ["a"], "buyer": [7]}, None),
    # The person erased, a new account row of theirs at the source: registered again, it joins.
    ((ERASED,), {"": ["q"], "order": ["b"], "buyer": [7]},
     {"card": "4111", "total": 3, "ship_to": "5th", "email": "x@y"}),
    # An erased order looked up: no match, nor anything chained from it.
    ((Entry(mark(KEY, "orders", "a"), "erase", AT, "r1"),), {"": ["q"], "order": ["a"], "buyer": [7]},
     {"card": "4111", "total": None, "ship_to": None, "email": None}),
])
def test_a_view_computed_at_the_source_takes_each_row_it_reads_as_the_stream_does(
        entries: tuple[Entry, ...], keys: dict[str, list[object]], expected: dict[str, object] | None) -> None:
    pipeline = parse(CHAINED, "shop.yml")
    s = Suppressor(subjects(pipeline).values(), KEY, {e.mark: e for e in entries})
    joined = {"card": "4111", "total": 3, "ship_to": "5th", "email": "x@y"}
    assert erased_fields(pipeline.views["payment_view"], joined, keys, s.read_now) == expected


def test_a_lookup_that_sql_found_no_row_for_stays_empty() -> None:
    pipeline = parse(CHAINED, "shop.yml")
    s = suppressor(ORDER_A)
    joined = {"card": "4111", "total": None, "ship_to": None, "email": None}
    assert erased_fields(pipeline.views["payment_view"], joined, {"": ["q"], "order": [None], "buyer": [None]},
                         s.read_now) == joined
