"""#20 §9 at the runner (``sinks.runner.complete_partials``): a partial record whose row the store does not hold
is never written as if complete. A PostgreSQL one is re-read from the source (the repair path) and left out of
the write; a MongoDB one is handed back as rejected, with a reason naming the fix. The runner does this for
every store, so no store fills partial rows itself (#19 §2)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest

from changeflow.pipelines.load import parse
from changeflow.pipelines.spec import EntitySpec, Pipeline
from changeflow.sinks.runner import complete_partials
from changeflow.streams.records import ChangeRecord

PIPELINE = """
name: shop
sources:
  postgres: {database: shop}
  mongodb: {database: users}
entities:
  orders: {source: postgres, table: public.orders}
  users: {source: mongodb, collection: users}
  notes: {source: postgres, table: public.notes, stores: {redis: false}}
"""


class FakeStore:
    """A store that holds some rows (``fetch_current``) and lands every entity but ``notes``."""

    name = "redis"

    def __init__(self, rows: dict[tuple[str, str], dict[str, Any]]) -> None:
        self.rows = rows
        self.asked: list[tuple[str, list[str]]] = []

    def fetch_current(self, entity: str, keys: list[str]) -> dict[str, dict[str, Any]]:
        self.asked.append((entity, keys))
        return {k: self.rows[(entity, k)] for k in keys if (entity, k) in self.rows}


@pytest.fixture
def pipeline() -> Pipeline:
    return parse(PIPELINE, "shop.yml")


def rec(entity: str, key: str, version: int, after: dict[str, Any] | None, *, partial: bool = False,
        source: str = "postgres") -> ChangeRecord:
    return ChangeRecord(source, entity, key, "u", version, 0, None, after, partial=partial,  # type: ignore[arg-type]
                        key_columns=("id",))


def test_a_partial_record_whose_row_the_store_holds_is_completed_from_it(pipeline: Pipeline) -> None:
    store = FakeStore({("orders", "7"): {"id": 7, "status": "paid", "note": "x" * 3000}})
    rereads: list[tuple[str, list[str]]] = []
    out, rejected = complete_partials(store, pipeline, [rec("orders", "7", 9, {"id": 7, "status": "shipped"},
                                                            partial=True)],
                                      lambda spec, held: rereads.append((spec.name, [r.key for r in held])))
    assert out == [rec("orders", "7", 9, {"id": 7, "status": "shipped", "note": "x" * 3000})]
    assert (rejected, rereads) == ([], [])


def test_a_postgres_partial_without_a_base_row_is_reread_from_the_source_and_not_written(pipeline: Pipeline) -> None:
    store = FakeStore({})
    rereads: list[tuple[str, list[int]]] = []

    def reread(spec: EntitySpec, held: Sequence[ChangeRecord]) -> None:
        rereads.append((spec.name, [r.version for r in held]))

    full = rec("orders", "8", 5, {"id": 8, "status": "new", "note": None})
    batch = [rec("orders", "7", 9, {"id": 7, "status": "shipped"}, partial=True), full,
             rec("orders", "7", 10, {"id": 7, "status": "lost"}, partial=True)]
    out, rejected = complete_partials(store, pipeline, batch, reread)
    assert out == [full]  # neither partial record of key 7 is written, with or without its missing column
    assert rejected == []
    assert rereads == [("orders", [9, 10])]
    assert store.asked == [("orders", ["7"])]


def test_a_mongodb_partial_without_a_base_row_is_rejected_with_the_fix(pipeline: Pipeline) -> None:
    record = rec("users", "u1", 9, {"id": "u1", "name": "Ada"}, partial=True, source="mongodb")
    out, rejected = complete_partials(FakeStore({}), pipeline, [record],
                                      lambda spec, held: pytest.fail("MongoDB has no signal table to re-read through"))
    assert out == []
    assert [(r.record, r.reason) for r in rejected] == [(record, (
        "a partial change (only the fields it changed) whose row this store does not hold; its other columns "
        "cannot be re-read from a mongodb source, so it is not written as if complete; `changeflow dlq replay "
        "--store redis` once the row is back, or re-send the whole row"))]


def test_records_of_an_entity_the_store_does_not_hold_pass_through_untouched(pipeline: Pipeline) -> None:
    store = FakeStore({})
    record = rec("notes", "1", 3, {"id": 1}, partial=True)
    out, rejected = complete_partials(store, pipeline, [record], lambda spec, held: pytest.fail("no re-read"))
    assert (out, rejected, store.asked) == ([record], [], [])
