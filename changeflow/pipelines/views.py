"""Read models declared in the pipeline file (``views:``): N:1 lookups from one root entity, fields picked
from the joined rows (nested document paths too), a filter, and optionally incremental aggregates.

Pure data and checks: the typed model a user writes, its resolution into a ``ViewDef`` that the view stage
(``streams.views``) and reconcile read, and the problems ``pipeline check`` reports, each naming the path
in the file and the fix. README "Read models" is the reference for the shape::

    views:
      ny_orders:
        from: orders                       # the root: one view row per root row (or per group)
        join:
          user: {entity: users, on: user_id}            # orders.user_id -> users' key
          # chained: category: {entity: categories, from: product, on: category_id}
        fields:
          total: total                                  # a root column
          city: user.profile.address.city               # alias, column, then nested document keys
        filter: "city == 'New York'"
      order_stats:
        from: orders
        fields: {user_id: user_id, status: status, total: total}
        group_by: [user_id, status]
        aggregates: {orders: count, revenue: {sum: total}, largest: {max: total}}
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from changeflow.pipelines.types import ColumnType, UnknownTypeError, parse_type

IDENTIFIER = r"^[a-z][a-z0-9_]*$"
AGGREGATES = ("count", "sum", "min", "max")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class Lookup(_Strict):
    """An N:1 lookup: the row of ``entity`` whose key equals the ``on`` columns of the left side's row."""

    entity: str = Field(description="The entity looked up (its key is matched).")
    on: list[str] = Field(description="Column(s) of the left side holding the looked-up row's key, in key order.")
    left: str | None = Field(None, alias="from",
                             description="The alias the `on` columns belong to; default: the view's root.")

    @field_validator("on", mode="before")
    @classmethod
    def _one_or_many(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v


class FieldDecl(_Strict):
    path: str = Field(description="`column`, `alias.column` or `alias.column.nested.key`.")
    type: str | None = Field(None, description="The column type; default: the source column's (string for a "
                                               "nested document value).")

    @field_validator("type")
    @classmethod
    def _type(cls, v: str | None) -> str | None:
        if v is None:
            return v
        try:
            return str(parse_type(v))
        except UnknownTypeError as exc:
            raise ValueError(str(exc)) from None


class AggregateDecl(_Strict):
    sum: str | None = None
    min: str | None = None
    max: str | None = None

    @model_validator(mode="after")
    def _one(self) -> AggregateDecl:
        named = [k for k in ("sum", "min", "max") if getattr(self, k) is not None]
        if len(named) != 1:
            raise ValueError("an aggregate is `count`, or one of {sum: field}, {min: field}, {max: field}")
        return self


class View(_Strict):
    """One read model, kept fresh incrementally from the entities' canonical topics."""

    root: str = Field(alias="from", description="The root entity: one view row per root row (or per group).")
    join: dict[str, Lookup] = Field(default_factory=dict, description="Lookups by alias, chained through `from`.")
    fields: dict[str, str | FieldDecl] = Field(description="Output column -> path into the joined row.")
    filter: str | None = Field(None, description="Rows for which this expression over `fields` is not true "
                                                 "are not in the view.")
    group_by: list[str] = Field(default_factory=list, description="Fields grouping the aggregates.")
    aggregates: dict[str, Literal["count"] | AggregateDecl] = Field(default_factory=dict)
    stores: dict[str, Any] = Field(default_factory=dict, description="Where the view lands, as for an entity.")

    @model_validator(mode="after")
    def _shape(self) -> View:
        for name in [*self.join, *self.fields, *self.aggregates]:
            if not re.match(IDENTIFIER, name):
                raise ValueError(f"{name!r} is not a lower-case identifier (letters, digits, _)")
        if bool(self.group_by) != bool(self.aggregates):
            raise ValueError("`group_by` and `aggregates` go together: an aggregate view names both")
        return self


# --- resolved ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LookupDef:
    alias: str
    entity: str
    left: str  # "" is the root
    on: tuple[str, ...]


@dataclass(frozen=True)
class FieldDef:
    name: str
    alias: str  # "" is the root
    column: str
    nested: tuple[str, ...]
    declared: ColumnType | None


@dataclass(frozen=True)
class AggregateDef:
    name: str
    fn: str  # count | sum | min | max
    field: str | None


@dataclass(frozen=True)
class ViewDef:
    name: str
    root: str
    lookups: tuple[LookupDef, ...]  # each one's left side comes before it
    fields: tuple[FieldDef, ...]
    filter: str | None
    group_by: tuple[str, ...]
    aggregates: tuple[AggregateDef, ...]

    @property
    def aggregated(self) -> bool:
        return bool(self.group_by)

    def entity_of(self, alias: str) -> str:
        if alias == "":
            return self.root
        return next(lk.entity for lk in self.lookups if lk.alias == alias)

    @property
    def entities(self) -> frozenset[str]:
        return frozenset([self.root, *(lk.entity for lk in self.lookups)])

    def columns_read(self) -> dict[str, set[str]]:
        """Per alias, the columns the view reads (fields and join columns): all a row keeps in view state."""
        out: dict[str, set[str]] = {"": set()}
        for lk in self.lookups:
            out.setdefault(lk.alias, set())
            out.setdefault(lk.left, set()).update(lk.on)
        for f in self.fields:
            out.setdefault(f.alias, set()).add(f.column)
        return out


class ViewError(ValueError):
    """A view that cannot be resolved; ``location`` is its path in the file."""

    def __init__(self, location: str, message: str) -> None:
        super().__init__(f"{location}: {message}")
        self.location = location
        self.message = message


def resolve(name: str, view: View, entity_names: Mapping[str, Any]) -> ViewDef:
    """The view as the stage runs it; raises ViewError for an unknown entity or alias, or a cycle."""
    at = f"views.{name}"
    if view.root not in entity_names:
        raise ViewError(f"{at}.from", f"unknown entity {view.root!r}; the pipeline's entities are: "
                                      f"{', '.join(entity_names)}")
    lookups: list[LookupDef] = []
    placed = {""}
    pending = dict(view.join)
    while pending:
        ready = [a for a, lk in pending.items() if (lk.left or "") in placed]
        if not ready:
            alias, lk = next(iter(pending.items()))
            left = lk.left or ""
            if left not in view.join:
                raise ViewError(f"{at}.join.{alias}.from", f"unknown alias {left!r}; name the root (leave `from` "
                                                           f"out) or one of: {', '.join(view.join)}")
            raise ViewError(f"{at}.join", f"the lookups {', '.join(sorted(pending))} form a cycle through `from`; "
                                          "each lookup's `from` must lead back to the root")
        for alias in ready:
            lk = pending.pop(alias)
            if lk.entity not in entity_names:
                raise ViewError(f"{at}.join.{alias}.entity", f"unknown entity {lk.entity!r}; the pipeline's "
                                                             f"entities are: {', '.join(entity_names)}")
            if not lk.on:
                raise ViewError(f"{at}.join.{alias}.on", "name the column(s) holding the looked-up key")
            lookups.append(LookupDef(alias, lk.entity, lk.left or "", tuple(lk.on)))
            placed.add(alias)
    fields: list[FieldDef] = []
    for out, decl in view.fields.items():
        path, declared = (decl, None) if isinstance(decl, str) else (decl.path, decl.type)
        parts = path.split(".")
        alias = parts[0] if len(parts) > 1 and parts[0] in view.join else ""
        rest = parts[1:] if alias else parts
        if not rest or not all(rest):
            raise ViewError(f"{at}.fields.{out}", f"{path!r} names no column; write `column` or `alias.column`")
        fields.append(FieldDef(out, alias, rest[0], tuple(rest[1:]), parse_type(declared) if declared else None))
    names = {f.name for f in fields}
    for col in view.group_by:
        if col not in names:
            raise ViewError(f"{at}.group_by", f"{col!r} is not one of the view's fields ({', '.join(names)}); "
                                              "group by a field declared under `fields`")
    aggregates: list[AggregateDef] = []
    for agg, spec in view.aggregates.items():
        if agg in names:
            raise ViewError(f"{at}.aggregates.{agg}", "an aggregate's name is also a field's; rename one")
        if spec == "count":
            aggregates.append(AggregateDef(agg, "count", None))
            continue
        assert isinstance(spec, AggregateDecl)
        fn = next(k for k in ("sum", "min", "max") if getattr(spec, k) is not None)
        target = getattr(spec, fn)
        if target not in names:
            raise ViewError(f"{at}.aggregates.{agg}.{fn}", f"{target!r} is not one of the view's fields "
                                                           f"({', '.join(names)})")
        aggregates.append(AggregateDef(agg, fn, target))
    return ViewDef(name, view.root, tuple(lookups), tuple(fields), view.filter, tuple(view.group_by),
                   tuple(aggregates))


def output_type(view: ViewDef, name: str, column_type: Any) -> ColumnType:
    """The type of output column ``name``; ``column_type(alias, column)`` is the source column's type (None:
    not known yet)."""
    field = next((f for f in view.fields if f.name == name), None)
    if field is not None:
        if field.declared is not None:
            return field.declared
        if field.nested:
            return ColumnType("string")
        return column_type(field.alias, field.column) or ColumnType("string")
    agg = next(a for a in view.aggregates if a.name == name)
    if agg.fn == "count":
        return ColumnType("int64")
    assert agg.field is not None
    src = output_type(view, agg.field, column_type)
    if agg.fn == "sum":
        if src.kind == "decimal":
            return ColumnType("decimal", 38, src.scale) if src.precision is not None else src
        if src.kind in ("int16", "int32", "int64"):
            return ColumnType("int64")
        return ColumnType("float64")
    return src
