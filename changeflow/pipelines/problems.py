"""A problem ``pipeline check`` reports, and what a store's own check of an entity is given: kept apart from
``pipelines.check`` (which reads the source's catalog through psycopg) so that a store module, imported when a
pipeline file is validated, does not pull that in (measured: ~135 ms of ``python -X importtime``)."""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from changeflow.pipelines.catalog import Table


@dataclass(frozen=True)
class Problem:
    location: str
    message: str

    def __str__(self) -> str:
        return f"{self.location}: {self.message}"


@dataclass(frozen=True)
class StoredColumns:
    """The columns of an entity that reach the stores (kept and derived ones), for a store's own
    ``check_entity(spec, columns)`` hook: a column a store's configuration names must be one of them."""

    stored: frozenset[str]
    hooked: bool  # an entity with a hook may add any field: names it could add are not judged
    table: Table

    def unknown(self, where: str, column: str) -> Problem | None:
        if column in self.stored or self.hooked:
            return None
        return unknown_column(where, column, self.table)


def suggest(name: str, choices: Iterable[str]) -> str:
    choices = list(choices)
    close = difflib.get_close_matches(name, choices, n=1, cutoff=0.6)
    if close:
        return f"did you mean {close[0]!r}?"
    shown = ", ".join(choices[:12]) + (", ..." if len(choices) > 12 else "")
    return f"its columns are: {shown}" if shown else "it has no columns"


def unknown_column(where: str, column: str, table: Table, what: str = "column") -> Problem:
    return Problem(where, f"{what} {column!r} is not in {table.qualified}; {suggest(column, table.column_names)}")
