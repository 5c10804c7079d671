"""Rebuild a derived store from the source of truth while the stream keeps flowing.

The rows are re-read by a Debezium incremental snapshot (a signal row), so they travel the normal path
and pass the normal version guards: a snapshot read carries the stream position at the moment it was
read, so it beats what a store holds for that row and loses to any later change.

- Most stores: keys and rows are rewritten in place.
- A store with rebuild hooks (``begin_rebuild``, ``finish_rebuild``, ``abandon_rebuild``: the search store
  builds a new physical index next to the live one, every write of the entity going to both while the
  rebuild runs, then swaps its alias atomically and drops the old index) is told when the rebuild starts,
  ends and fails. Searches never see a half-built index.

Completion comes from Debezium itself (its COMPLETED notification for our signal id), then the stream
and the sink must have drained; the progress bar counts the snapshot reads that reached a store that keeps
a changelog (``snapshot_reads_since``) against the source's row count.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import orjson
import psycopg
from psycopg import sql

from changeflow.connectors.signals import snapshot_state
from changeflow.pipelines.catalog import count_rows
from changeflow.pipelines.spec import EntitySpec, Pipeline
from changeflow.schemas.book import schema_book
from changeflow.sinks.base import FatalSinkError, RetriableSinkError, Store, create, names, registry, used_by
from changeflow.sinks.offsets import group_lag
from changeflow.sinks.runner import canonical_topics
from changeflow.waiting import wait_until

if TYPE_CHECKING:
    from changeflow.settings import Settings

Progress = Callable[[str, int, int], None]  # entity, done, total


class RebuildError(RuntimeError):
    pass


@dataclass
class RebuildResult:
    entity: str
    rows: int
    seconds: float
    index: str | None = None


def entities_for(pipeline: Pipeline, sink: str, entity: str | None) -> list[EntitySpec]:
    if sink not in names():
        raise RebuildError(f"unknown sink {sink!r}; known: {', '.join(names())}")
    # An incremental snapshot goes through the PostgreSQL source's signal table.
    specs = [s for s in pipeline.stored_in(sink) if s.source == "postgres"]
    if entity is not None:
        specs = [s for s in specs if s.name == entity]
        if not specs:
            raise RebuildError(f"entity {entity!r} is not a PostgreSQL entity stored in {sink}")
    return specs


def request_snapshot(settings: Settings, pipeline: Pipeline, tables: list[str],
                     where: dict[str, str] | None = None) -> str:
    """An ``execute-snapshot`` signal in the pipeline's signal table for ``tables`` (``schema.table``),
    optionally only rows matching a SQL condition per table; returns the signal id."""

    data: dict[str, object] = {"data-collections": list(tables), "type": "incremental"}
    if where:
        data["additional-conditions"] = [{"data-collection": t, "filter": f} for t, f in where.items()]
    schema, _, table = pipeline.signal_table.rpartition(".")
    target = sql.Identifier(schema, table) if schema else sql.Identifier(table)
    signal_id = f"changeflow-{uuid.uuid4()}"
    with psycopg.connect(pipeline.source_dsn(settings), autocommit=True) as conn:
        conn.execute(sql.SQL("INSERT INTO {} (id, type, data) VALUES (%s, 'execute-snapshot', %s)").format(target),
                     (signal_id, orjson.dumps(data).decode()))
    return signal_id


def source_count(settings: Settings, pipeline: Pipeline, spec: EntitySpec) -> int:
    return count_rows(pipeline.source_dsn(settings), spec.source_schema, spec.source_table)


def _changelog_store(settings: Settings, pipeline: Pipeline) -> Store | None:
    """A store of the pipeline that counts snapshot reads (``snapshot_reads_since``), for the progress bar."""
    for name in used_by(pipeline):
        if callable(getattr(registry()[name], "snapshot_reads_since", None)):
            return create(name, settings, pipeline)
    return None


def _snapshot_reads(counter: Store | None, entity: str, since: datetime) -> int:
    if counter is None:
        return 0
    try:
        return int(counter.snapshot_reads_since(entity, since))  # type: ignore[attr-defined]
    except Exception:  # progress only: a store that is down shows no progress, the rebuild goes on
        return 0


def _sink_idle(settings: Settings, pipeline: Pipeline, sink: str) -> bool:
    return (
        group_lag(settings, pipeline.decode_group, list(pipeline.raw_topics())) == 0
        and group_lag(settings, pipeline.sink_group(sink), canonical_topics(pipeline, sink)) == 0
    )


def rebuild(
    settings: Settings, pipeline: Pipeline, sink: str, entity: str | None = None, timeout: float = 1800.0,
    progress: Progress | None = None, types: dict[str, Any] | None = None,
) -> list[RebuildResult]:
    """``types``: entity → canonical column types (for a new index's mapping); read from the schema topic
    when not given."""
    results = []
    for spec in entities_for(pipeline, sink, entity):
        started = time.monotonic()
        since = datetime.now(UTC)
        total = source_count(settings, pipeline, spec)
        store = create(sink, settings, pipeline)
        counter = _changelog_store(settings, pipeline)
        hooked = callable(getattr(store, "begin_rebuild", None))
        target = _hook(store, "begin_rebuild", spec, _types(settings, pipeline, spec, types)) if hooked else None
        try:
            signal_id = request_snapshot(settings, pipeline, [spec.qualified_table])
            _wait_drained(settings, pipeline, sink, spec, signal_id, counter, since, total, timeout,
                          started + timeout - time.monotonic(), progress)
            if progress:
                progress(spec.name, total, total)
            if hooked:
                _hook(store, "finish_rebuild", spec, target)
        except BaseException:
            if hooked:
                _hook(store, "abandon_rebuild", spec, target)
            raise
        finally:
            store.close()
            if counter is not None:
                counter.close()
        results.append(RebuildResult(spec.name, total, time.monotonic() - started, target))
    return results


def _wait_drained(settings: Settings, pipeline: Pipeline, sink: str, spec: EntitySpec, signal_id: str,
                  counter: Store | None, since: datetime, total: int, timeout: float, left: float,
                  progress: Progress | None) -> None:
    """Until Debezium says the snapshot is COMPLETED and the stream and the sink have drained it (twice in a row),
    showing the snapshot reads that reached the changelog; raises on an ABORTED or STOPPED snapshot, or after
    ``left`` seconds."""
    done, idle_polls = 0, 0

    def drained() -> bool:
        nonlocal done, idle_polls
        done = _snapshot_reads(counter, spec.name, since)
        if progress:
            progress(spec.name, min(done, total), total)
        state = snapshot_state(settings.kafka_bootstrap, pipeline.notifications_topic, signal_id)
        if state in ("ABORTED", "STOPPED"):
            raise RebuildError(f"{spec.name}: Debezium reports the incremental snapshot {state}")
        idle_polls = idle_polls + 1 if state == "COMPLETED" and _sink_idle(settings, pipeline, sink) else 0
        return idle_polls >= 2

    wait_until(drained, max(0.0, left), what=f"{spec.name} rebuilt", error=lambda _: RebuildError(
        f"{spec.name}: {done}/{total} rows re-read after {timeout:.0f}s"))


def _hook(store: Store, hook: str, *args: Any) -> Any:
    """A store's rebuild hook; the store's own failure is the rebuild's error, naming the store."""
    try:
        return getattr(store, hook)(*args)
    except (FatalSinkError, RetriableSinkError) as exc:
        raise RebuildError(f"{store.name} {hook.replace('_', ' ')}: {exc}") from exc


def _types(settings: Settings, pipeline: Pipeline, spec: EntitySpec, given: dict[str, Any] | None) -> dict[str, Any]:
    if given is not None and spec.name in given:
        return dict(given[spec.name])
    latest = schema_book(settings, pipeline, writer=False).latest.get(spec.name)
    return {**(latest.columns if latest else {}), **spec.declared_types}
