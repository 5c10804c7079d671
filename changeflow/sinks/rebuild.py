"""Rebuild a derived store from the source of truth while the stream keeps flowing.

The rows are re-read by a Debezium incremental snapshot (a signal row), so they travel the normal path
and pass the normal version guards: a snapshot read carries the stream position at the moment it was
read, so it beats what a store holds for that row and loses to any later change.

- Most stores (Redis, ClickHouse): keys and rows are rewritten in place.
- A store that builds indexes behind an alias (search: ``create_index`` and ``rebuilds_index``): a new
  physical index is built next to the live one (every write of the entity goes to both while the rebuild
  runs), then the alias is swapped atomically and the old index dropped. Searches never see a half-built
  index.

Completion comes from Debezium itself (its COMPLETED notification for our signal id), then the stream
and the sink must have drained; the progress bar counts the snapshot reads that reached the ClickHouse
changelog against the source's row count.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import httpx
import orjson
import psycopg
from psycopg import sql

from changeflow.connectors.signals import snapshot_state
from changeflow.pipelines.catalog import count_rows
from changeflow.pipelines.spec import EntitySpec, Pipeline
from changeflow.schemas.book import schema_book
from changeflow.sinks.base import Store, create, names
from changeflow.sinks.offsets import group_lag
from changeflow.sinks.runner import canonical_topics

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
    import uuid

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


def snapshot_reads_since(settings: Settings, pipeline: Pipeline, entity: str, since: datetime) -> int:
    """Snapshot reads of the entity that reached the pipeline's changelog (0 where none is kept)."""
    try:
        from changeflow.sinks.clickhouse import client_for, q

        client = client_for(settings)
    except Exception:
        return 0
    try:
        return int(client.command(
            f"SELECT uniqExact(key) FROM {q(pipeline.clickhouse_database)}.changelog "
            "WHERE entity = {e:String} AND op = 'r' AND ingested_at >= {t:DateTime64(3, 'UTC')}",
            parameters={"e": entity, "t": since},
        ))
    except Exception:
        return 0
    finally:
        client.close()


def _sink_idle(settings: Settings, pipeline: Pipeline, sink: str) -> bool:
    return (
        group_lag(settings, pipeline.decode_group, list(pipeline.raw_topics())) == 0
        and group_lag(settings, pipeline.sink_group(sink), canonical_topics(pipeline, sink)) == 0
    )


def _builds_indexes(store: Store) -> bool:
    return callable(getattr(store, "create_index", None)) and hasattr(store, "rebuilds_index")


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
        search = store if _builds_indexes(store) else None
        target = None
        if search is not None:
            target = _start_index_rebuild(search, spec, _types(settings, pipeline, spec, types))
        try:
            signal_id = request_snapshot(settings, pipeline, [spec.qualified_table])
            deadline = started + timeout
            done, idle_polls = 0, 0
            while True:
                done = snapshot_reads_since(settings, pipeline, spec.name, since)
                if progress:
                    progress(spec.name, min(done, total), total)
                state = snapshot_state(settings.kafka_bootstrap, pipeline.notifications_topic, signal_id)
                if state in ("ABORTED", "STOPPED"):
                    raise RebuildError(f"{spec.name}: Debezium reports the incremental snapshot {state}")
                # Debezium says every chunk was emitted; done when the stream and the sink have drained it.
                idle_polls = idle_polls + 1 if state == "COMPLETED" and _sink_idle(settings, pipeline, sink) else 0
                if idle_polls >= 2:
                    break
                if time.monotonic() > deadline:
                    raise RebuildError(f"{spec.name}: {done}/{total} rows re-read after {timeout:.0f}s")
                time.sleep(0.5)
            if progress:
                progress(spec.name, total, total)
            if search is not None and target is not None:
                _swap_alias(search, spec, target)
        except BaseException:
            if search is not None and target is not None:
                _abandon_search_rebuild(search, spec, target)
            raise
        finally:
            store.close()
        results.append(RebuildResult(spec.name, total, time.monotonic() - started, target))
    return results


def _types(settings: Settings, pipeline: Pipeline, spec: EntitySpec, given: dict[str, Any] | None) -> dict[str, Any]:
    if given is not None and spec.name in given:
        return dict(given[spec.name])
    latest = schema_book(settings, pipeline, writer=False).latest.get(spec.name)
    return {**(latest.columns if latest else {}), **spec.declared_types}


def _start_index_rebuild(search: Any, spec: EntitySpec, types: dict[str, Any]) -> str:
    search.setup()
    target = f"{spec.search_index}-{datetime.now(UTC):%Y%m%d%H%M%S%f}"
    search.create_index(spec, target, types=types)
    _http(search, "PUT", f"/{search.rebuilds_index}/_doc/{spec.name}?refresh=true", {"target": target})
    # The sink re-reads the rebuild registry every second: wait before the snapshot starts so that no
    # change between now and the snapshot reaches only the old index.
    time.sleep(2.5)
    return target


def _swap_alias(search: Any, spec: EntitySpec, target: str) -> None:
    alias = spec.search_index
    current = _http(search, "GET", f"/_alias/{alias}", None, ok=(404,))
    actions: list[dict[str, Any]] = [{"add": {"index": target, "alias": alias, "is_write_index": True}}]
    # A 404 means `alias` is still a concrete index from before aliases.
    concrete = isinstance(current, dict) and current.get("status") == 404
    old_indices = [alias] if concrete else list(current or {})
    if alias in old_indices:  # a concrete index from before aliases: replaced by the alias atomically
        actions.append({"remove_index": {"index": alias}})
    else:
        actions += [{"remove": {"index": old, "alias": alias}} for old in old_indices]
    _http(search, "POST", "/_aliases", {"actions": actions})
    _http(search, "DELETE", f"/{search.rebuilds_index}/_doc/{spec.name}?refresh=true", None)
    for old in old_indices:
        if old != alias:
            _http(search, "DELETE", f"/{old}", None)


def _abandon_search_rebuild(search: Any, spec: EntitySpec, target: str) -> None:
    _http(search, "DELETE", f"/{search.rebuilds_index}/_doc/{spec.name}?refresh=true", None, ok=(404,))
    _http(search, "DELETE", f"/{target}", None, ok=(404,))


def _http(search: Any, method: str, path: str, body: Any, ok: tuple[int, ...] = ()) -> Any:
    response = httpx.request(method, f"{search.url}{path}", json=body, timeout=30)
    if response.status_code >= 400 and response.status_code not in ok:
        raise RebuildError(f"search {method} {path}: {response.status_code} {response.text[:300]}")
    return response.json() if response.content else None
