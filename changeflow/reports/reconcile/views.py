"""A view computed at the source, for reconcile: the lookups as one SQL query of LEFT JOINs over the source
tables (each lookup matches the looked-up table's key columns), its fields selected in SQL (a nested path with
``#>>``), then the view's filter over those fields and, for an aggregate view, the groups counted and summed
here, exactly (decimals stay decimals). Nothing of the incremental stage (``streams.join``) is used: this is
the independent answer the stores are compared with.

A view can be computed here when every entity it reads is a PostgreSQL table of the pipeline's database and
every column it reads leaves the source unchanged (not hashed, not derived, no entity filter or hook);
otherwise ``unsupported`` says why, and reconcile lists the view as skipped with that reason.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import dict_row

from changeflow.pipelines.spec import EntitySpec, Pipeline
from changeflow.pipelines.transform import ExpressionError, compile_expression
from changeflow.pipelines.views import ViewDef
from changeflow.reports.reconcile.normalise import Row, debezium_typed
from changeflow.streams.keys import key_text

BATCH = 5000


def unsupported(pipeline: Pipeline, view: ViewDef) -> str | None:
    """Why this view cannot be computed at the source (None: it can)."""
    for alias, columns in view.columns_read().items():
        spec = pipeline.entities[view.entity_of(alias)]
        if spec.source != "postgres":
            return f"it reads {spec.name}, from {spec.source}: reconcile computes views from PostgreSQL tables"
        cfg = spec.config
        if cfg.filter or cfg.hook:
            return f"{spec.name} has a filter or a hook, which SQL at the source cannot apply"
        changed = sorted(columns & (set(cfg.fields.hash) | set(cfg.derive) | set(cfg.fields.drop)))
        if changed:
            return f"it reads {spec.name}.{changed[0]}, which the stream hashes, derives or drops"
    return None


# How a row read at the source now stands after erasures (``Suppressor.read_now``): None, dropped; else the
# columns the stream sets to null in it (empty: whole). Given the entity and the row's key text.
RowStanding = Callable[[str, str], "frozenset[str] | None"]


def view_query(pipeline: Pipeline, view: ViewDef, key_columns: Callable[[EntitySpec], tuple[str, ...]],
               root_keys: tuple[str, ...], lookup_keys: bool = False) -> sql.Composed:
    """SELECT the root's key columns and every field, the lookups LEFT JOINed on the looked-up keys; with
    ``lookup_keys``, each looked-up row's key columns too (``a{i}_{j}``, lookup i's key column j)."""
    alias_sql = {"": "t0", **{lk.alias: f"t{i + 1}" for i, lk in enumerate(view.lookups)}}

    def table(alias: str) -> sql.Composable:
        spec = pipeline.entities[view.entity_of(alias)]
        return sql.SQL("{} AS {}").format(sql.Identifier(spec.source_schema, spec.source_table),
                                          sql.Identifier(alias_sql[alias]))

    selected = [sql.SQL("{} AS {}").format(sql.Identifier("t0", c), sql.Identifier(f"k_{i}"))
                for i, c in enumerate(root_keys)]
    for i, f in enumerate(view.fields):
        column = sql.Identifier(alias_sql[f.alias], f.column)
        expr = (sql.SQL("{} #>> {}").format(column, sql.Literal(list(f.nested))) if f.nested else column)
        selected.append(sql.SQL("{} AS {}").format(expr, sql.Identifier(f"f_{i}")))
    if lookup_keys:
        for i, lk in enumerate(view.lookups):
            selected.extend(sql.SQL("{} AS {}").format(sql.Identifier(alias_sql[lk.alias], rk),
                                                       sql.Identifier(f"a{i}_{j}"))
                            for j, rk in enumerate(key_columns(pipeline.entities[lk.entity])))
    joins = []
    for lk in view.lookups:
        right_keys = key_columns(pipeline.entities[lk.entity])
        on = sql.SQL(" AND ").join(
            sql.SQL("{} = {}").format(sql.Identifier(alias_sql[lk.alias], rk), sql.Identifier(alias_sql[lk.left], lc))
            for rk, lc in zip(right_keys, lk.on, strict=True))
        joins.append(sql.SQL(" LEFT JOIN {} ON {}").format(table(lk.alias), on))
    return sql.SQL("SELECT {} FROM {}{}").format(sql.SQL(", ").join(selected), table(""), sql.SQL("").join(joins))


def view_rows(dsn: str, pipeline: Pipeline, view: ViewDef, key_columns: Callable[[EntitySpec], tuple[str, ...]],
              standing: RowStanding | None = None) -> dict[str, Row]:
    """key text → the view's row, as the stream publishes it (before the stores' normalisation). With
    ``standing``, each row the view reads is taken as the stream takes it after an erasure (``erased_fields``)."""
    root_keys = key_columns(pipeline.entities[view.root])
    query = view_query(pipeline, view, key_columns, root_keys, lookup_keys=standing is not None)
    lookup_widths = [len(key_columns(pipeline.entities[lk.entity])) for lk in view.lookups]
    predicate = compile_expression(view.filter) if view.filter else None
    rows: dict[str, Row] = {}
    groups: dict[str, dict[str, Any]] = {}
    with (
        psycopg.connect(dsn, connect_timeout=5) as conn,
        conn.transaction(),
        conn.cursor(name=f"reconcile_view_{uuid.uuid4().hex[:8]}", row_factory=dict_row) as cur,
    ):
        cur.itersize = BATCH
        cur.execute(query)
        for raw in cur:
            typed = debezium_typed(raw)
            out = {f.name: typed[f"f_{i}"] for i, f in enumerate(view.fields)}
            if standing is not None:
                keys_of = {"": [typed[f"k_{i}"] for i in range(len(root_keys))],
                           **{lk.alias: [typed[f"a{i}_{j}"] for j in range(width)]
                              for i, (lk, width) in enumerate(zip(view.lookups, lookup_widths, strict=True))}}
                judged_out = erased_fields(view, out, keys_of, standing)
                if judged_out is None:
                    continue
                out = judged_out
            if predicate is not None:
                try:
                    if predicate.evaluate(out) is not True:
                        continue
                except ExpressionError:
                    continue
            if not view.aggregated:
                keys = [typed[f"k_{i}"] for i in range(len(root_keys))]
                for c, v in zip(root_keys, keys, strict=True):
                    out.setdefault(c, v)
                rows[key_text(keys)] = out
                continue
            group = [out[c] for c in view.group_by]
            if any(v is None for v in group):
                continue  # no store keys on NULL: the stage leaves such rows out too
            _accumulate(groups.setdefault(key_text(group), {"n": 0, **dict(zip(view.group_by, group, strict=True))}),
                        view, out)
    if not view.aggregated:
        return rows
    return {k: _finish(g, view) for k, g in groups.items()}


def erased_fields(view: ViewDef, out: Row, keys_of: dict[str, list[Any]], standing: RowStanding) -> Row | None:
    """The view's row as the stream computes it from rows an erasure has judged: None when the root row is
    dropped; a looked-up row dropped, or its link cut by an anonymised row on its left, is no match (its fields
    null, and the lookups chained from it too); an anonymised row's cleared columns read null. Values that SQL
    joined are only ever removed here, never invented."""
    cleared: dict[str, frozenset[str]] = {}
    absent: set[str] = set()
    root = standing(view.root, key_text(keys_of[""]))
    if root is None:
        return None
    cleared[""] = root
    for lk in view.lookups:
        keys = keys_of[lk.alias]
        if lk.left in absent or cleared[lk.left] & set(lk.on) or any(k is None for k in keys):
            absent.add(lk.alias)
            continue
        found = standing(lk.entity, key_text(keys))
        if found is None:
            absent.add(lk.alias)
        else:
            cleared[lk.alias] = found
    if not absent and not any(cleared.values()):
        return out
    return {f.name: None if f.alias in absent or f.column in cleared.get(f.alias, frozenset()) else out[f.name]
            for f in view.fields}


def _accumulate(g: dict[str, Any], view: ViewDef, out: Row) -> None:
    g["n"] += 1
    for a in view.aggregates:
        if a.field is None:
            continue
        v = out[a.field]
        if v is None:
            continue
        cur = g.get(a.name)
        if a.fn == "sum":
            g[a.name] = v if cur is None else cur + v
        elif cur is None or (v < cur if a.fn == "min" else v > cur):
            g[a.name] = v


def _finish(g: dict[str, Any], view: ViewDef) -> Row:
    row = {c: g[c] for c in view.group_by}
    for a in view.aggregates:
        row[a.name] = g["n"] if a.fn == "count" else g.get(a.name)
    return row
