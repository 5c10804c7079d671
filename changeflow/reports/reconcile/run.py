"""One reconciliation run: the source against every registered store that holds each entity."""

from __future__ import annotations

import logging
import multiprocessing
import time
import uuid
from collections.abc import Callable, Mapping
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from changeflow.pipelines.spec import EntitySpec, Pipeline
from changeflow.pipelines.types import ColumnType
from changeflow.reports.reconcile.digest import KeyDiff, classify_content, diff_keys, sort_key
from changeflow.reports.reconcile.normalise import Row, comparable_row, fold_empty, row_digest
from changeflow.reports.reconcile.result import Diff, Run, StoreResult
from changeflow.reports.reconcile.source import Source
from changeflow.reports.reconcile.views import unsupported
from changeflow.schemas.book import schema_book
from changeflow.sinks.base import Store, create, names, registry, used_by

if TYPE_CHECKING:
    from changeflow.settings import Settings

log = logging.getLogger("changeflow.reconcile")

# key → (comparable row, version)
Held = dict[str, tuple[Row, int | None]]
Changelog = Callable[[EntitySpec, list[str]], dict[str, dict[int, Row]]]


def select_entities(pipeline: Pipeline, entities: list[str] | None) -> tuple[list[EntitySpec], dict[str, str]]:
    """Entities whose source can be read here (PostgreSQL); the others are listed as skipped."""
    for e in entities or []:
        try:
            pipeline.entity(e)
        except KeyError as exc:
            raise ValueError(exc.args[0]) from None
    chosen, skipped = [], {}
    for name, spec in pipeline.entities.items():
        if entities and name not in entities:
            continue
        if spec.source == "view":
            why = unsupported(pipeline, pipeline.views[name])
            if why is not None:
                skipped[name] = f"view not computed at the source: {why}"
                continue
        elif spec.source != "postgres":
            skipped[name] = f"source {spec.source} is not read by reconcile"
            continue
        chosen.append(spec)
    return chosen, skipped


def canonical_types(settings: Settings, pipeline: Pipeline) -> tuple[dict[str, dict[str, ColumnType]],
                                                                    dict[str, tuple[str, ...]]]:
    """entity → the newest canonical column types and key columns, from the schema topic (empty when
    Kafka cannot be read: the source's catalog stands in)."""
    try:
        book = schema_book(settings, pipeline, writer=False)
    except Exception as exc:
        log.warning("event=schema_book_unavailable error=%s", exc)
        return {}, {}
    types = {e: {**sv.columns, **pipeline.entities[e].declared_types}
             for e, sv in book.latest.items() if e in pipeline.entities}
    keys = {e: tuple(sv.key_columns) for e, sv in book.latest.items() if sv.key_columns}
    return types, keys


def open_stores(settings: Settings, pipeline: Pipeline, wanted: Any = None) -> dict[str, Store]:
    return {n: create(n, settings, pipeline) for n in (wanted if wanted is not None else used_by(pipeline))}


def null_is_empty(store: Any) -> frozenset[str]:
    """The column kinds whose NULL ``store`` holds as the empty value (sinks.base.Store.null_is_empty)."""
    return frozenset(getattr(store, "null_is_empty", ()))


def comparable(store: Store, spec: EntitySpec, source: Source, keys: list[str]) -> Held:
    types, kinds = source.types(spec), null_is_empty(store)
    return {k: (fold_empty(comparable_row(v.row, types), types, kinds), v.version)
            for k, v in store.fetch(spec, keys).items()}


def _source_digests(rows: Any, types: Mapping[str, ColumnType], folds: set[frozenset[str]]
                    ) -> dict[frozenset[str], dict[str, int]]:
    """key → digest of each source row, once per way the stores fold NULL into empty (usually one)."""
    out: dict[frozenset[str], dict[str, int]] = {fold: {} for fold in folds}
    for key, row in rows:
        digest = row_digest(row)
        for fold, digests in out.items():
            folded = fold_empty(row, types, fold)
            digests[key] = digest if folded is row else row_digest(folded)
    return out


@dataclass
class _Side:
    """One store's view of one entity during a run."""

    digests: dict[str, int] = field(default_factory=dict)
    count: int = 0


def _settle(spec: EntitySpec, source: Source, stores: Mapping[str, Store], pending: Mapping[str, list[str]],
            settle_s: float) -> tuple[dict[str, Row], dict[str, Held]]:
    """Read the differing keys again on both sides after a pause: changes in flight land meanwhile."""
    keys = sorted({k for ks in pending.values() for k in ks})
    if settle_s > 0 and keys:
        time.sleep(settle_s)
    src = source.fetch(spec, keys)
    by_store = {name: comparable(store, spec, source, keys) for name, store in stores.items()}
    return src, by_store


def _scan_digests(settings: Settings, pipeline: Pipeline, types: Mapping[str, Mapping[str, ColumnType]],
                  keys: Mapping[str, tuple[str, ...]], side: str, entity: str,
                  folds: set[frozenset[str]]) -> dict[frozenset[str], dict[str, int]]:
    """fold → key → row digest of one side (in a worker process: it opens its own connections). The source
    is digested once per fold its stores need; a store once, with its own."""
    spec = pipeline.entity(entity)
    source = Source(settings, pipeline, types, keys)
    t = source.types(spec)
    if side == "source":
        return _source_digests(source.scan(spec), t, folds)
    store = create(side, settings, pipeline)
    try:
        kinds = null_is_empty(store)
        return {kinds: {key: row_digest(fold_empty(comparable_row(row, t), t, kinds))
                        for key, row, _ in store.scan(spec)}}
    finally:
        store.close()


def run_mode(sample: int | None, only_keys: list[str] | None) -> str:
    return f"keys:{len(only_keys)}" if only_keys else (f"sample:{sample}" if sample else "full")


def reconcile_entity(
    spec: EntitySpec,
    source: Source,
    stores: Mapping[str, Store],
    sample: int | None,
    settle_s: float,
    changelog: Changelog | None,
    only_keys: list[str] | None = None,
) -> list[StoreResult]:
    numeric = source.key_is_numeric(spec)
    mode = run_mode(sample, only_keys)
    mapped = {n: s for n, s in stores.items() if spec.stored_in(n)}
    fold_of = {n: null_is_empty(s) for n, s in mapped.items()}
    folds: set[frozenset[str]] = {*fold_of.values(), frozenset()}
    types_now = source.types(spec)
    sides: dict[str, _Side] = {}
    errors: dict[str, str] = {}
    kd: dict[str, KeyDiff] = {}
    if sample or only_keys:
        keys = list(only_keys) if only_keys else source.sample_keys(spec, sample or 0)
        src_digests = _source_digests(source.fetch(spec, keys).items(), types_now, folds)
        source_count = source.count(spec)
        for name, store in mapped.items():
            try:
                rows = comparable(store, spec, source, keys)
                sides[name] = _Side({k: row_digest(r) for k, (r, _) in rows.items()}, store.count(spec))
            except Exception as exc:  # one unreachable store must not hide the others' drift
                errors[name] = f"{type(exc).__name__}: {exc}"
    else:
        # Each side is read once, all at the same time, each in its own process (decoding and normalising
        # tens of thousands of rows is CPU work); only digests come back.
        types = {spec.name: source.types(spec)}
        keys_of = {spec.name: source.key_columns(spec)}
        args = (source.settings, source.pipeline, types, keys_of)
        with ProcessPoolExecutor(max_workers=1 + len(mapped), mp_context=multiprocessing.get_context("fork")) as pool:
            src_future = pool.submit(_scan_digests, *args, "source", spec.name, folds)
            futures = {name: pool.submit(_scan_digests, *args, name, spec.name, folds) for name in mapped}
            src_digests = src_future.result()
            for name, future in futures.items():
                try:
                    digests = future.result()[fold_of[name]]
                    sides[name] = _Side(digests, len(digests))
                except Exception as exc:  # one unreachable store must not hide the others' drift
                    errors[name] = f"{type(exc).__name__}: {exc}"
        source_count = len(src_digests[frozenset()])
    for name, side in sides.items():
        kd[name] = diff_keys(src_digests[fold_of[name]], side.digests, numeric)

    pending = {n: d.missing_in_store + d.missing_in_source + d.content_differs for n, d in kd.items()}
    pending = {n: ks for n, ks in pending.items() if ks}
    reachable = {n: st for n, st in mapped.items() if n in sides}
    src_now, stores_now = _settle(spec, source, reachable, pending, settle_s) if pending else ({}, {})
    content_keys = sorted({k for n, ks in pending.items() for k in ks if k in src_now and k in stores_now[n]})
    images: dict[str, dict[int, Row]] = {}
    if changelog and content_keys:
        entity_types = source.types(spec)
        images = {k: {v: comparable_row(r, entity_types) for v, r in by_v.items()}
                  for k, by_v in changelog(spec, content_keys).items()}
    def source_as(name: str, key: str) -> Row:
        """The source's row as store ``name`` can hold it (fold_empty)."""
        return fold_empty(src_now[key], types_now, fold_of[name])

    # Per key: versions of stores whose content equals the source right now (for "behind another store").
    current: dict[str, dict[str, int]] = {}
    for name, rows in stores_now.items():
        for key, (row, version) in rows.items():
            if key in src_now and row == source_as(name, key) and version is not None:
                current.setdefault(key, {})[name] = version
    # Stores that keep a version entry beside the value (a tombstone after a delete) say so.
    tombstones: dict[str, dict[str, int]] = {}
    for name, keys_pending in pending.items():
        entries = getattr(mapped[name], "version_entries", None)
        if callable(entries):
            tombstones[name] = entries(spec, [k for k in keys_pending if k in src_now])

    results = []
    for name in mapped:
        if name in errors:
            results.append(StoreResult(spec.name, name, source_count, 0, mode, error=errors[name]))
            continue
        side, d = sides[name], kd[name]
        result = StoreResult(spec.name, name, source_count, side.count, mode, d.buckets, d.differing_buckets)
        for key in sorted(pending.get(name, []), key=lambda k: sort_key(k, numeric)):
            in_src, held = key in src_now, stores_now[name].get(key)
            if in_src and held is None:
                tomb = tombstones.get(name, {}).get(key)
                detail = "in source, not in store"
                if tomb is not None:
                    detail += f" (its version entry {tomb} says applied: value removed behind the pipeline)"
                result.diffs.append(Diff(key, "missing", detail, tomb))
            elif not in_src and held is not None:
                result.diffs.append(Diff(key, "extra", "in store, not in source", held[1]))
            elif in_src and held is not None and held[0] != source_as(name, key):
                others = [v for n, v in current.get(key, {}).items() if n != name]
                seen = {v: fold_empty(r, types_now, fold_of[name]) for v, r in images.get(key, {}).items()}
                kind, detail = classify_content(source_as(name, key), held[0], held[1], seen, others)
                result.diffs.append(Diff(key, kind, detail, held[1]))
        results.append(result)
    return results


def changelog_reader(settings: Settings, pipeline: Pipeline) -> tuple[Changelog | None, Store | None]:
    """The pipeline's own images by version, from the first registered store that keeps a changelog."""
    for name, factory in registry().items():
        if callable(getattr(factory, "changelog", None)):
            try:
                store = create(name, settings, pipeline)
                return store.changelog, store  # type: ignore[attr-defined]
            except Exception as exc:  # classification falls back to cross-store versions
                log.warning("event=changelog_unavailable store=%s error=%s", name, exc)
    return None, None


def reconcile(
    settings: Settings,
    pipeline: Pipeline,
    entities: list[str] | None = None,
    stores: list[str] | None = None,
    sample: int | None = None,
    settle_s: float = 2.0,
    repair_of: str = "",
    only_keys: list[str] | None = None,
) -> Run:
    """One reconciliation run: every key (full), ``sample`` random source keys, or exactly ``only_keys``
    (which may include keys the source does not have: strays are found that way too)."""
    started = time.monotonic()
    known = names()
    unknown = [s for s in stores or [] if s not in known]
    if unknown:
        raise ValueError(f"unknown store {unknown[0]!r}; known: {', '.join(known)}")
    specs, skipped = select_entities(pipeline, entities)
    types, keys = canonical_types(settings, pipeline)
    source = Source(settings, pipeline, types, keys)
    opened = open_stores(settings, pipeline, stores or known)
    changelog, changelog_store = changelog_reader(settings, pipeline)
    results: list[StoreResult] = []
    try:
        for spec in specs:
            results += reconcile_entity(spec, source, opened, sample, settle_s, changelog, only_keys)
    finally:
        for store in [*opened.values(), *([changelog_store] if changelog_store else [])]:
            store.close()
    run = Run(str(uuid.uuid4()), datetime.now(UTC), run_mode(sample, only_keys), results, skipped,
              repair_of=repair_of)
    run.duration_s = time.monotonic() - started
    return run
