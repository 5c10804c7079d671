"""The view engine (streams.join) over its real on-disk state (RocksDB): joins, filters, fan-outs, aggregates
with retraction, under every order of arrival; each case ends with the published view equal to the join
recomputed from the final rows."""

from __future__ import annotations

import random
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from changeflow.pipelines.views import View, resolve
from changeflow.streams.join import ViewEngine, tk
from changeflow.streams.records import ChangeRecord
from changeflow.streams.viewstate import Prefixed, RocksState

ENTITIES = {"orders": None, "users": None, "lines": None, "products": None, "categories": None}

NY = View.model_validate({
    "from": "orders",
    "join": {"user": {"entity": "users", "on": "user_id"}},
    "fields": {"total": "total", "status": "status", "user_name": "user.name",
               "city": "user.profile.address.city"},
    "filter": "city == 'New York'",
})
STATS = View.model_validate({
    "from": "orders",
    "fields": {"user_id": "user_id", "status": "status", "total": "total"},
    "group_by": ["user_id", "status"],
    "aggregates": {"orders": "count", "revenue": {"sum": "total"}, "smallest": {"min": "total"},
                   "largest": {"max": "total"}},
})
CHAIN = View.model_validate({
    "from": "lines",
    "join": {"product": {"entity": "products", "on": "product_id"},
             "category": {"entity": "categories", "from": "product", "on": "category_id"}},
    "fields": {"qty": "qty", "product": "product.name", "category": "category.name"},
})


class Published:
    """What a store holds: the newest version per view key wins, as under the sinks' version guard."""

    def __init__(self) -> None:
        self.rows: dict[str, tuple[int, dict[str, Any] | None]] = {}
        self.versions: dict[str, list[int]] = {}

    def take(self, state: Any) -> None:
        for pkey, key, version, row, _ts, key_row in list(ViewEngine.pending(state)):
            assert key_row and all(v is not None or c == "user_id" for c, v in key_row.items())
            self.versions.setdefault(key, []).append(version)
            if key not in self.rows or self.rows[key][0] < version:
                self.rows[key] = (version, row)
            state.delete(pkey)

    def live(self) -> dict[str, dict[str, Any]]:
        return {k: row for k, (_v, row) in self.rows.items() if row is not None}


class Harness:
    def __init__(self, tmp: Path, view: View, budget: int = 3) -> None:
        self.db = RocksState(tmp / "state")
        self.state = Prefixed(self.db, tk(b"V", "v"))
        self.clock = iter(range(1, 10**9))
        self.engine = ViewEngine(resolve("v", view, ENTITIES), lambda: next(self.clock))
        self.budget = budget
        self.out = Published()

    def feed(self, *records: ChangeRecord) -> None:
        for r in records:
            self.engine.apply(self.state, r)
            while self.engine.work(self.state, self.budget):
                pass
            self.db.commit()
            self.out.take(self.state)
            self.db.commit()


def rec(entity: str, key: Any, version: int, after: dict[str, Any] | None, *, partial: bool = False) -> ChangeRecord:
    key_cols = ("id",)
    row = None if after is None else {"id": key, **after}
    return ChangeRecord("postgres", entity, str(key), "d" if after is None else "u", version, version, None, row,
                        partial=partial, key_columns=key_cols)


def user(key: int, version: int, city: str | None, name: str = "u") -> ChangeRecord:
    return rec("users", key, version, {"name": name, "profile": {"address": {"city": city}}})


def order(key: int, version: int, user_id: int | None, total: str = "10.00", status: str = "paid") -> ChangeRecord:
    return rec("orders", key, version, {"user_id": user_id, "total": Decimal(total), "status": status})


def test_an_order_before_its_user_appears_once_the_user_is_in_new_york(tmp_path: Path) -> None:
    h = Harness(tmp_path, NY)
    h.feed(order(1, 100, 7))
    assert h.out.live() == {}
    h.feed(user(7, 50, "Boston", "Ann"))
    assert h.out.live() == {}
    h.feed(user(7, 60, "New York", "Ann"))
    assert h.out.live() == {"1": {"id": 1, "total": Decimal("10.00"), "status": "paid", "user_name": "Ann",
                                  "city": "New York"}}
    h.feed(user(7, 70, "Chicago", "Ann"))
    assert h.out.live() == {}
    assert h.out.rows["1"][1] is None  # a delete, not a silence


def test_moving_user_takes_every_order_in_and_out_in_bounded_steps(tmp_path: Path) -> None:
    h = Harness(tmp_path, NY, budget=7)
    h.feed(user(1, 1, "Boston"), *[order(i, 10 + i, 1) for i in range(100)], order(500, 5, 2))
    h.feed(user(1, 2, "New York"))
    assert sorted(h.out.live(), key=int) == [str(i) for i in range(100)]
    h.feed(user(1, 3, "Boston"))
    assert h.out.live() == {}


def test_a_user_id_changed_a_b_a_lands_the_last_join(tmp_path: Path) -> None:
    h = Harness(tmp_path, NY)
    h.feed(user(1, 1, "New York", "A"), user(2, 2, "New York", "B"))
    h.feed(order(9, 10, 1), order(9, 11, 2), order(9, 12, 1))
    assert h.out.live()["9"]["user_name"] == "A"
    h.feed(user(2, 13, "New York", "B2"))  # the old user's change reaches the order no more
    assert h.out.live()["9"]["user_name"] == "A"
    h.feed(order(9, 14, None))
    assert h.out.live() == {}
    h.feed(order(9, 15, 404))  # a user that does not exist
    assert h.out.live() == {}
    h.feed(user(404, 16, "New York", "late"))
    assert h.out.live()["9"]["user_name"] == "late"


def test_a_user_deleted_then_created_again(tmp_path: Path) -> None:
    h = Harness(tmp_path, NY)
    h.feed(user(1, 1, "New York", "A"), order(1, 2, 1))
    h.feed(rec("users", 1, 3, None))
    assert h.out.live() == {}
    h.feed(user(1, 2, "New York", "stale"))  # older than the delete: never brings the user back
    assert h.out.live() == {}
    h.feed(user(1, 4, "New York", "again"))
    assert h.out.live()["1"]["user_name"] == "again"


def test_a_primary_key_change_is_a_delete_and_a_create_at_one_version(tmp_path: Path) -> None:
    h = Harness(tmp_path, NY)
    h.feed(user(1, 1, "New York"), order(1, 2, 1))
    h.feed(rec("orders", 1, 3, None), order(2, 3, 1))
    assert set(h.out.live()) == {"2"}


def test_chained_lookups_fan_out_from_the_far_end(tmp_path: Path) -> None:
    h = Harness(tmp_path, CHAIN, budget=2)
    h.feed(rec("categories", 1, 1, {"name": "tea"}), rec("products", 5, 2, {"name": "green", "category_id": 1}))
    h.feed(*[rec("lines", i, 10 + i, {"qty": i, "product_id": 5}) for i in range(5)])
    assert {r["category"] for r in h.out.live().values()} == {"tea"}
    h.feed(rec("categories", 1, 30, {"name": "infusions"}))
    assert {r["category"] for r in h.out.live().values()} == {"infusions"}
    h.feed(rec("products", 5, 31, {"name": "green", "category_id": 2}))
    assert {r["category"] for r in h.out.live().values()} == {None}


def test_partial_changes_merge_into_the_row_the_view_holds(tmp_path: Path) -> None:
    h = Harness(tmp_path, NY)
    h.feed(user(1, 1, "New York", "A"), order(1, 2, 1))
    h.feed(rec("users", 1, 3, {"name": "B"}, partial=True))
    assert h.out.live()["1"]["user_name"] == "B" and h.out.live()["1"]["city"] == "New York"


def test_aggregates_take_back_exactly_what_they_added(tmp_path: Path) -> None:
    h = Harness(tmp_path, STATS)
    h.feed(order(1, 1, 7, "10.10"), order(2, 2, 7, "0.20"), order(3, 3, 7, "5.00", "open"))
    assert h.out.live()['["7","paid"]'] == {"user_id": 7, "status": "paid", "orders": 2,
                                            "revenue": Decimal("10.30"), "smallest": Decimal("0.20"),
                                            "largest": Decimal("10.10")}
    h.feed(order(1, 4, 7, "10.10", "open"))  # moves to another group
    h.feed(rec("orders", 2, 5, None))  # the last of its group
    assert '["7","paid"]' not in h.out.live()
    assert h.out.live()['["7","open"]'] == {"user_id": 7, "status": "open", "orders": 2,
                                            "revenue": Decimal("15.10"), "smallest": Decimal("5.00"),
                                            "largest": Decimal("10.10")}
    h.feed(order(1, 6, 8, "1.00", "open"))  # the max leaves: the next one is found among the members
    assert h.out.live()['["7","open"]']["largest"] == Decimal("5.00")


def _expected_row_view(users: dict[int, Any], orders: dict[int, Any]) -> dict[str, Any]:
    out = {}
    for oid, o in orders.items():
        if o is None:
            continue
        u = users.get(o["user_id"]) if o["user_id"] is not None else None
        city = u["profile"]["address"]["city"] if u else None
        if city == "New York":
            out[str(oid)] = {"id": oid, "total": o["total"], "status": o["status"], "user_name": u["name"],
                             "city": city}
    return out


def _expected_stats(orders: dict[int, Any]) -> dict[str, Any]:
    groups: dict[tuple[Any, str], list[Decimal]] = {}
    for o in orders.values():
        if o is not None and o["user_id"] is not None:
            groups.setdefault((o["user_id"], o["status"]), []).append(o["total"])
    from changeflow.streams.keys import key_text

    return {key_text([u, s]): {"user_id": u, "status": s, "orders": len(t), "revenue": sum(t, Decimal(0)),
                               "smallest": min(t), "largest": max(t)} for (u, s), t in groups.items()}


@pytest.mark.parametrize("seed", range(12))
def test_every_order_of_arrival_ends_equal_to_the_join(tmp_path: Path, seed: int) -> None:
    """Random histories of users and orders, delivered in a random interleaving that keeps each row's order,
    with replays of earlier changes mixed in: the view and the aggregates equal the join of the final rows."""
    rnd = random.Random(seed)
    histories: list[list[ChangeRecord]] = []
    final_users: dict[int, Any] = {}
    final_orders: dict[int, Any] = {}
    version = 0
    for uid in range(6):
        changes = []
        for _ in range(rnd.randint(1, 5)):
            version += 1
            if rnd.random() < 0.15:
                changes.append(rec("users", uid, version, None))
                final_users.pop(uid, None)
            else:
                r = user(uid, version, rnd.choice(["New York", "Boston", None]), f"n{version}")
                changes.append(r)
                final_users[uid] = r.after
        histories.append(changes)
    for oid in range(40):
        changes = []
        for _ in range(rnd.randint(1, 4)):
            version += 1
            if rnd.random() < 0.15:
                changes.append(rec("orders", oid, version, None))
                final_orders[oid] = None
            else:
                r = order(oid, version, rnd.choice([0, 1, 2, 3, 4, 5, 99, None]),
                          f"{rnd.randint(0, 10000) / 100:.2f}", rnd.choice(["paid", "open"]))
                changes.append(r)
                final_orders[oid] = r.after
        histories.append(changes)
    stream: list[ChangeRecord] = []
    cursors = [0] * len(histories)
    while any(c < len(h) for c, h in zip(cursors, histories, strict=True)):
        i = rnd.choice([i for i, h in enumerate(histories) if cursors[i] < len(h)])
        stream.append(histories[i][cursors[i]])
        if cursors[i] and rnd.random() < 0.2:
            stream.append(histories[i][rnd.randrange(cursors[i])])  # a replay of an older change
        cursors[i] += 1
    row_view = Harness(tmp_path / "a", NY, budget=rnd.randint(1, 5))
    stats = Harness(tmp_path / "b", STATS, budget=rnd.randint(1, 5))
    row_view.feed(*stream)
    stats.feed(*stream)
    assert row_view.out.live() == _expected_row_view(final_users, final_orders)
    assert stats.out.live() == _expected_stats(final_orders)
    for versions in [*row_view.out.versions.values(), *stats.out.versions.values()]:
        assert versions == sorted(set(versions))  # a view row's version only grows


def test_state_survives_reopening_and_uncommitted_work_is_gone(tmp_path: Path) -> None:
    h = Harness(tmp_path, NY)
    h.feed(user(1, 1, "New York", "A"), order(1, 2, 1))
    h.engine.apply(h.state, order(2, 3, 1))  # never committed: as if the process were killed here
    h.db.close()
    db = RocksState(tmp_path / "state")
    state = Prefixed(db, tk(b"V", "v"))
    assert state.get(tk(b"R", "orders", "2")) is None
    assert state.get(tk(b"R", "orders", "1"))[1]["user_id"] == 1
    assert [k for k, _ in state.scan(tk(b"X", "user", "1"))] == [tk(b"X", "user", "1", "1")]
