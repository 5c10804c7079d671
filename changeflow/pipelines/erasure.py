"""``erasure:`` in the pipeline file, resolved and judged: who can be erased, which rows refer to them, which
views embed them. Pure: no I/O (the catalog is read by the caller).

A subject's *mark* is the HMAC-SHA256 of its entity and key under the stack's erasure key: what the erasure
requests and the suppression list keep, never the clear id (README "Erasure").
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from changeflow.pipelines.erasure_model import ErasureSection, External, Reference, Subject
from changeflow.pipelines.problems import suggest

__all__ = ["ErasureSection", "External", "Reference", "ReferenceSpec", "Subject", "SubjectSpec", "check", "mark",
           "subjects"]

if TYPE_CHECKING:
    from changeflow.pipelines.catalog import Catalog
    from changeflow.pipelines.spec import Pipeline


def mark(key: bytes, entity: str, row_key: str) -> str:
    """The HMAC of one row's identity (entity and canonical key text): the same everywhere a process holds the
    stack's erasure key, and reveals nothing of the key without it. The unit separator keeps ``("a", "b:c")``
    and ``("a:b", "c")`` apart."""
    return hmac.new(key, f"{entity}\x1f{row_key}".encode(), hashlib.sha256).hexdigest()


@dataclass(frozen=True)
class ReferenceSpec:
    entity: str
    column: str
    parent: str  # the entity whose key ``column`` holds: the subject's entity, or another referring entity
    action: str  # "delete" | "anonymise"
    clear: tuple[str, ...]

    @property
    def cleared(self) -> tuple[str, ...]:
        """The columns an anonymised row has set to null: the link first, then the personal fields."""
        return (self.column, *[c for c in self.clear if c != self.column])


@dataclass(frozen=True)
class SubjectSpec:
    name: str
    entity: str
    references: tuple[ReferenceSpec, ...]  # a parent's reference comes before its children's
    external: dict[str, str] = field(default_factory=dict)  # name -> description
    views: tuple[str, ...] = ()  # views reading the subject's entity or a referring one
    # Per view with a row per root row (not an aggregate): its root entity and the fields that hold the person
    # (read from the subject's entity, or a cleared column of an anonymised reference).
    view_fields: dict[str, tuple[str, tuple[str, ...]]] = field(default_factory=dict)

    @property
    def entities(self) -> tuple[str, ...]:
        return (self.entity, *(r.entity for r in self.references))

    def reference(self, entity: str) -> ReferenceSpec | None:
        return next((r for r in self.references if r.entity == entity), None)


def _ordered(subject: Subject) -> list[tuple[str, Reference]]:
    """References with each parent before its children; one in a cycle or under an unknown parent is left out
    (``check`` names it)."""
    done: list[tuple[str, Reference]] = []
    known: set[str] = set()
    pending = dict(subject.refers)
    while pending:
        ready = [(n, r) for n, r in pending.items() if (r.through is None or r.through in known)]
        if not ready:
            break
        for n, r in ready:
            done.append((n, r))
            known.add(n)
            del pending[n]
    return done


def subjects(pipeline: Pipeline) -> dict[str, SubjectSpec]:
    """Every subject of the pipeline, resolved (one that names an unknown entity is still resolved: ``check``
    refuses the file before anything erases)."""
    out: dict[str, SubjectSpec] = {}
    section: ErasureSection = pipeline.file.erasure
    for name, subject in section.subjects.items():
        refs = tuple(ReferenceSpec(entity, r.column, r.through or subject.entity, r.action, tuple(r.clear))
                     for entity, r in _ordered(subject))
        touched = {subject.entity, *(r.entity for r in refs)}
        views = tuple(v for v, d in pipeline.views.items() if d.entities & touched)
        by_entity = {r.entity: r for r in refs}
        view_fields: dict[str, tuple[str, tuple[str, ...]]] = {}
        for v in views:
            d = pipeline.views[v]
            if d.aggregated:
                continue
            personal = []
            for f in d.fields:
                entity = d.entity_of(f.alias)
                ref = by_entity.get(entity)
                if entity == subject.entity or (ref is not None and ref.action == "anonymise"
                                                and f.column in ref.cleared):
                    personal.append(f.name)
            view_fields[v] = (d.root, tuple(personal))
        out[name] = SubjectSpec(name, subject.entity, refs, {n: e.description for n, e in subject.external.items()},
                                views, view_fields)
    return out


def check(pipeline: Pipeline, catalog: Catalog | None = None) -> list[tuple[str, str]]:
    """(location, message) per problem of the ``erasure:`` section."""
    out: list[tuple[str, str]] = []
    section: ErasureSection = pipeline.file.erasure
    captured = {s.name: s for s in pipeline.captured()}
    claimed: dict[str, str] = {}
    referred: dict[str, str] = {}
    for name, subject in section.subjects.items():
        for entity in subject.refers:
            if entity in referred and referred[entity] != name:
                out.append((f"erasure.subjects.{name}.refers.{entity}",
                            f"{entity!r} is already under subject {referred[entity]!r}'s `refers`: an entity refers to "
                            "one subject (its anonymisation is that subject's); merge the two subjects' references"))
            referred.setdefault(entity, name)
    for name, subject in section.subjects.items():
        at = f"erasure.subjects.{name}"
        if subject.entity not in captured:
            out.append((f"{at}.entity", f"unknown entity {subject.entity!r}; {suggest(subject.entity, captured)}"
                        .replace("its columns are", "the entities are")))
            continue
        if subject.entity in claimed:
            out.append((f"{at}.entity", f"{subject.entity!r} is already the entity of subject "
                                        f"{claimed[subject.entity]!r}; one subject per entity"))
        claimed[subject.entity] = name
        ordered = {n for n, _ in _ordered(subject)}
        for entity, ref in subject.refers.items():
            where = f"{at}.refers.{entity}"
            if entity not in captured:
                out.append((where, f"unknown entity {entity!r}; {suggest(entity, captured)}"
                            .replace("its columns are", "the entities are")))
                continue
            if entity == subject.entity:
                out.append((where, "the subject's own entity is erased whole; list only the entities that refer "
                                   "to it"))
                continue
            if ref.through is not None and ref.through != subject.entity and ref.through not in subject.refers:
                choices = ", ".join([subject.entity, *subject.refers])
                out.append((f"{where}.through", f"{ref.through!r} is neither the subject's entity nor under "
                                                f"`refers`; name one of: {choices}"))
                continue
            if entity not in ordered:
                out.append((f"{where}.through", "the references go round in a circle; one of them must point at "
                                                "the subject's entity"))
                continue
            if ref.action == "delete" and ref.clear:
                out.append((f"{where}.clear", "a deleted row has no fields left to clear; remove `clear`, or use "
                                              "`action: anonymise`"))
            spec = captured[entity]
            keys = set(spec.key_columns or ())
            table = catalog.table(spec.source_schema, spec.source_table) \
                if catalog is not None and spec.source == "postgres" else None
            if table is not None and not spec.key_columns:
                keys = set(table.primary_key)
            for column, where_col in [(ref.column, f"{where}.column"),
                                      *[(c, f"{where}.clear") for c in ref.clear]]:
                if table is not None and table.column(column) is None:
                    out.append((where_col, f"column {column!r} is not in {table.qualified}; "
                                           f"{suggest(column, table.column_names)}"))
                elif ref.action == "anonymise" and column in keys:
                    out.append((where_col, f"{column!r} is part of {entity}'s key: an anonymised row keeps its key; "
                                           "use `action: delete` to remove the row"))
        touched = {subject.entity, *(e for e in subject.refers if e in captured)}
        for view_name, view in pipeline.views.items():
            if view.entities & touched and view.root not in touched:
                out.append((f"views.{view_name}",
                            f"embeds {', '.join(sorted(view.entities & touched))} (erasure subject {name!r}) from "
                            f"{view.root!r}, which `erasure.subjects.{name}.refers` does not name: declare "
                            f"{view.root} there (delete or anonymise), so an erasure can find the view's rows"))
    return out
