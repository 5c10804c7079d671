"""`changeflow pipeline check`'s pure part: a pipeline judged against catalog data, no database needed."""

from __future__ import annotations

from pathlib import Path

import pytest

from changeflow.pipelines.catalog import Catalog, Column, Table
from changeflow.pipelines.check import Problem, check
from changeflow.pipelines.load import PipelineError, load, parse


def catalog() -> Catalog:
    tables = [
        Table("public", "orders", (Column("id", "uuid"), Column("status", "text"), Column("total", "numeric(12,2)"),
                                   Column("email", "text"), Column("notes", "text")), ("id",)),
        Table("public", "order_lines", (Column("order_id", "uuid"), Column("line_no", "integer"),
                                        Column("qty", "integer")), ("order_id", "line_no")),
        Table("public", "events", (Column("at", "timestamp with time zone"), Column("what", "text"))),
        Table("public", "events_full", (Column("at", "timestamp with time zone"), Column("what", "text")),
              replica_identity="f"),
    ]
    return Catalog("shop", ("public",), {(t.schema, t.name): t for t in tables})


HEAD = "name: shop\nsources:\n  postgres:\n    database: shop\nentities:\n"


def problems(entities: str, **kwargs: object) -> list[str]:
    pipeline = parse(HEAD + entities, "shop.yml")
    return [str(p) for p in check(pipeline, catalog(), **kwargs)]  # type: ignore[arg-type]


def test_a_good_pipeline_has_no_problems() -> None:
    assert problems("""\
  orders:
    table: public.orders
    fields: {drop: [notes], hash: [email], salt: "${env:SALT}"}
    derive:
      total_cents: {expr: "int(total * 100)", type: int64}
    filter: "status != 'draft'"
    stores: {clickhouse: {order_by: [status, id], types: {total_cents: Int64}}}
  lines:
    table: public.order_lines
  events:
    table: public.events_full
    key: [at]
""") == []


def test_unknown_table_suggests_the_close_one() -> None:
    assert problems("  orders:\n    table: public.order\n") == [
        "entities.orders.table: public.order is not a table of database shop; did you mean public.orders?"]


def test_unknown_columns_everywhere_they_are_named() -> None:
    found = problems("""\
  orders:
    table: public.orders
    key: [idd]
    fields: {drop: [note], allow: [status, totl]}
    columns: {stats: string}
    derive:
      x: {expr: "totall + 1", type: decimal}
    filter: "sttus == 'paid'"
    stores: {clickhouse: {order_by: [staus], types: {xx: String}}}
""")
    assert found == [
        "entities.orders.key: key column 'idd' is not in public.orders; did you mean 'id'?",
        "entities.orders.fields.drop: column 'note' is not in public.orders; did you mean 'notes'?",
        "entities.orders.fields.allow: column 'totl' is not in public.orders; did you mean 'total'?",
        "entities.orders.columns.stats: column 'stats' is not in public.orders; did you mean 'status'?",
        "entities.orders.derive.x.expr: reads 'totall', which is not a column of public.orders nor a field derived "
        "before it; did you mean 'total'?",
        "entities.orders.filter: reads 'sttus', which is not a column of public.orders nor a derived field; "
        "did you mean 'status'?",
        "entities.orders.stores.clickhouse.order_by: column 'staus' is not in public.orders; did you mean 'status'?",
        "entities.orders.stores.clickhouse.types.xx: column 'xx' is not in public.orders; its columns are: "
        "id, status, total, email, notes",
    ]


def test_table_without_primary_key_needs_a_key_and_a_replica_identity() -> None:
    found = problems("  events:\n    table: public.events\n")
    assert found[0] == ("entities.events.key: public.events has no primary key; declare `key: [columns that "
                        "identify a row]` (or add a primary key to the table)")
    assert found[1].startswith("entities.events.table: public.events has no replica identity")
    assert problems("  events:\n    table: public.events_full\n    key: [at]\n") == []


def test_two_entities_on_one_store_object() -> None:
    found = problems("""\
  a:
    table: public.orders
    stores: {redis: {prefix: shop}, search: {index: shared}, clickhouse: {table: t}}
  b:
    table: public.order_lines
    stores: {redis: {prefix: "shop:b"}, search: {index: shared}, clickhouse: {table: t}}
  c:
    table: public.orders
    stores: {redis: false, search: false, clickhouse: {table: changelog}}
""")
    assert found == [
        # each store's own check, in the registry's order
        "entities.b.stores.clickhouse.table: shop.t is also entity 'a''s table; give each entity its own "
        "(default: shop.b)",
        "entities.b.stores.redis.prefix: 'shop:b' and entity 'a''s 'shop' share keys; use prefixes where neither "
        "starts with the other and ':'",
        "entities.b.stores.search.index: 'shared' is also entity 'a''s index; give each entity its own "
        "(default: shop-b)",
        "entities.c.table: public.orders is already read by entity 'a'; one table maps to one entity",
        "entities.c.stores.clickhouse.table: shop.changelog is the pipeline's own table; choose another `table`",
    ]


def test_bad_expression_hook_and_an_unknown_erasure_subject_entity(tmp_path: Path) -> None:
    (tmp_path / "hooks.py").write_text("def fine(row):\n    return row\n")
    text = HEAD + """\
  orders:
    table: public.orders
    derive:
      x: {expr: "total +", type: decimal}
    hook: hooks:missing
  lines:
    table: public.order_lines
    hook: hooks:fine
erasure:
  subjects:
    user: {entity: userz}
"""
    path = tmp_path / "shop.yml"
    path.write_text(text)
    found = [str(p) for p in check(load(path), catalog())]
    assert found[0].startswith("entities.orders.derive.x.expr: expression 'total +' is not valid")
    assert found[1].startswith("entities.orders.hook: 'hooks:missing' does not import (ExpressionError: ")
    assert found[2] == "erasure.subjects.user.entity: unknown entity 'userz'; the entities are: orders, lines"
    assert len(found) == 3


def test_hash_without_salt_is_a_problem_even_when_the_model_was_bypassed() -> None:
    pipeline = parse(HEAD + "  orders:\n    table: public.orders\n", "shop.yml")
    pipeline.entity("orders").config.fields.hash.append("email")
    assert [str(p) for p in check(pipeline, catalog())] == [
        "entities.orders.fields.salt: `hash` needs a `salt` (a reference such as ${env:CHANGEFLOW_HASH_SALT})"]


def test_without_a_catalog_only_the_file_is_judged() -> None:
    pipeline = parse(HEAD + "  orders:\n    table: public.nope\n", "shop.yml")
    assert check(pipeline, None) == []


def test_commerce_passes_against_its_own_schema() -> None:
    commerce = load()
    tables = {
        ("public", "products"): Table("public", "products", tuple(Column(c, "text") for c in (
            "id", "sku", "name", "description", "category", "price_cents", "stock", "internal_notes", "updated_at")),
            ("id",), "f"),
        ("public", "orders"): Table("public", "orders", (
            Column("id", "uuid"), Column("user_id", "text"), Column("status", "text"),
            Column("total_amount", "numeric(12,2)"), Column("items", "jsonb")), ("id",)),
        **{("public", t): Table("public", t, (Column("id", "uuid"),), ("id",)) for t in ("payments", "refunds")},
    }
    assert check(commerce, Catalog("commerce", ("public",), tables)) == []
    assert Problem("a.b", "c").__str__() == "a.b: c"


def test_a_hashed_key_column_is_refused_because_the_key_would_carry_it_in_clear() -> None:
    """Issue 20 §3: with `key: [email]` and `hash: [email]`, every store's key held alice@example.com."""
    message = ("entities.orders.fields.hash: {col!r} is a key column: the row's key (every store's key, the Kafka "
               "key, the changelog, the dead letters) would still carry its clear value; key the entity by another "
               "column (`key: [...]`) or leave this one unhashed")
    assert problems("""\
  orders:
    table: public.orders
    key: [email]
    fields: {hash: [email], salt: "${env:SALT}"}
""") == [message.format(col="email")]
    assert problems("""\
  orders:
    table: public.orders
    fields: {hash: [id, email], salt: "${env:SALT}"}
""") == [message.format(col="id")]


VIEW_ENTITIES = """\
  orders:
    table: public.orders
  lines:
    table: public.order_lines
views:
"""


def test_a_good_view_has_no_problems() -> None:
    assert problems(VIEW_ENTITIES + """\
  line_orders:
    from: lines
    join: {order: {entity: orders, on: order_id}}
    fields: {qty: qty, status: order.status, total: order.total}
    filter: "status == 'paid'"
  totals:
    from: orders
    fields: {status: status, total: total}
    group_by: [status]
    aggregates: {n: count, revenue: {sum: total}}
""") == []


@pytest.mark.parametrize(("view", "expected"), [
    ("{from: nope, fields: {a: a}}",
     "views.v.from: unknown entity 'nope'; the pipeline's entities are: orders, lines"),
    ("{from: lines, join: {o: {entity: orderz, on: order_id}}, fields: {a: qty}}",
     "views.v.join.o.entity: unknown entity 'orderz'; the pipeline's entities are: orders, lines"),
    ("{from: lines, join: {a: {entity: orders, on: x, from: b}, b: {entity: orders, on: y, from: a}}, "
     "fields: {q: qty}}",
     "views.v.join: the lookups a, b form a cycle through `from`; each lookup's `from` must lead back to the root"),
    ("{from: lines, join: {o: {entity: orders, on: order_id}}, fields: {s: o.statuz}}",
     "views.v.fields.s: column 'statuz' is not in public.orders; did you mean 'status'?"),
    ("{from: lines, join: {o: {entity: orders, on: qty}}, fields: {s: o.status}}",
     "views.v.join.o.on: 'qty' is integer but orders.id is uuid: equal values would not match; join columns of "
     "one kind (integers with integers, text with text)"),
    ("{from: orders, join: {l: {entity: lines, on: id}}, fields: {q: l.qty}}",
     "views.v.join.l.on: lines's key has 2 column(s) (order_id, line_no); name as many columns of the left side, "
     "in key order"),
    ("{from: orders, fields: {s: status.city}}",
     "views.v.fields.s: 'status' is text, not a document: a nested path reads a json or jsonb column; name the "
     "column alone"),
    ("{from: orders, fields: {s: status}, filter: \"city == 'NY'\"}",
     "views.v.filter: 'city' is not one of the view's fields; a filter reads the names under `fields` (s)"),
    ("{from: orders, fields: {s: status}, group_by: [t], aggregates: {n: count}}",
     "views.v.group_by: 't' is not one of the view's fields (s); group by a field declared under `fields`"),
])
def test_view_problems_name_the_path_and_the_fix(view: str, expected: str) -> None:
    assert problems(VIEW_ENTITIES + f"  v: {view}\n") == [expected]


def test_a_view_named_like_an_entity_is_refused() -> None:
    with pytest.raises(PipelineError, match=r"views\.orders: an entity has this name too"):
        parse(HEAD + VIEW_ENTITIES + "  orders: {from: lines, fields: {q: qty}}\n", "shop.yml")
