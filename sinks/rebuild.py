"""Rebuild a derived store from the source of truth while the stream keeps flowing.

The rows are re-read by a Debezium incremental snapshot (a signal row), so they travel the normal path
and pass the normal version guards: a snapshot read carries the stream position at the moment it was
read, so it beats what a store holds for that row and loses to any later change.

- Redis and ClickHouse: keys and rows are rewritten in place.
- Search: a new physical index is built next to the live one (every write of the entity goes to both
  while the rebuild runs), then the alias is swapped atomically and the old index dropped. Searches never
  see a half-built index.

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

from connectors.signals import request_incremental_snapshot, snapshot_state
from reports.drift import source_count
from sinks.clickhouse import client_for
from sinks.search import REBUILDS_INDEX, SearchSink
from streams.entities import ENTITIES, EntitySpec

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


def entities_for(sink: str, entity: str | None) -> list[EntitySpec]:
    specs = [s for s in ENTITIES.values() if s.source == "postgres"]
    if sink == "redis":
        specs = [s for s in specs if s.redis_prefix]
    elif sink == "search":
        specs = [s for s in specs if s.search_index]
    elif sink != "clickhouse":
        raise RebuildError(f"unknown sink {sink!r}; known: redis, search, clickhouse")
    if entity is not None:
        specs = [s for s in specs if s.name == entity]
        if not specs:
            raise RebuildError(f"entity {entity!r} is not a PostgreSQL entity stored in {sink}")
    return specs


def snapshot_reads_since(settings: Settings, entity: str, since: datetime) -> int:
    client = client_for(settings)
    try:
        return int(client.command(
            f"SELECT uniqExact(key) FROM {settings.clickhouse_database}.changelog "
            "WHERE entity = {e:String} AND op = 'r' AND ingested_at >= {t:DateTime64(3, 'UTC')}",
            parameters={"e": entity, "t": since},
        ))
    finally:
        client.close()


def _sink_idle(settings: Settings, sink: str) -> bool:
    from reports.status import group_lag
    from sinks.runner import canonical_topics, group_id
    from streams.app import DECODE_GROUP, raw_topic_names

    return (
        group_lag(settings, DECODE_GROUP, raw_topic_names(settings)) == 0
        and group_lag(settings, group_id(sink), canonical_topics(settings)) == 0
    )


def rebuild(
    settings: Settings, sink: str, entity: str | None = None, timeout: float = 1800.0,
    progress: Progress | None = None,
) -> list[RebuildResult]:
    results = []
    for spec in entities_for(sink, entity):
        started = time.monotonic()
        since = datetime.now(UTC)
        total = source_count(settings, spec.source_table)
        search = SearchSink(settings) if sink == "search" else None
        target = None
        if search is not None:
            target = _start_search_rebuild(search, spec)
        try:
            signal_id = request_incremental_snapshot(settings.pg_dsn, [f"public.{spec.source_table}"])
            deadline = started + timeout
            done, idle_polls = 0, 0
            while True:
                done = snapshot_reads_since(settings, spec.name, since)
                if progress:
                    progress(spec.name, min(done, total), total)
                state = snapshot_state(settings.kafka_bootstrap, signal_id)
                if state in ("ABORTED", "STOPPED"):
                    raise RebuildError(f"{spec.name}: Debezium reports the incremental snapshot {state}")
                # Debezium says every chunk was emitted; done when the stream and the sink have drained it.
                idle_polls = idle_polls + 1 if state == "COMPLETED" and _sink_idle(settings, sink) else 0
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
            if search is not None:
                search.close()
        results.append(RebuildResult(spec.name, total, time.monotonic() - started, target))
    return results


def _start_search_rebuild(search: SearchSink, spec: EntitySpec) -> str:
    assert spec.search_index is not None
    search.setup()
    target = f"{spec.search_index}-{datetime.now(UTC):%Y%m%d%H%M%S%f}"
    search.create_index(spec, target)
    _http(search, "PUT", f"/{REBUILDS_INDEX}/_doc/{spec.name}?refresh=true", {"target": target})
    # The sink re-reads the rebuild registry every second: wait before the snapshot starts so that no
    # change between now and the snapshot reaches only the old index.
    time.sleep(2.5)
    return target


def _swap_alias(search: SearchSink, spec: EntitySpec, target: str) -> None:
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
    _http(search, "DELETE", f"/{REBUILDS_INDEX}/_doc/{spec.name}?refresh=true", None)
    for old in old_indices:
        if old != alias:
            _http(search, "DELETE", f"/{old}", None)


def _abandon_search_rebuild(search: SearchSink, spec: EntitySpec, target: str) -> None:
    _http(search, "DELETE", f"/{REBUILDS_INDEX}/_doc/{spec.name}?refresh=true", None, ok=(404,))
    _http(search, "DELETE", f"/{target}", None, ok=(404,))


def _http(search: SearchSink, method: str, path: str, body: Any, ok: tuple[int, ...] = ()) -> Any:
    response = httpx.request(method, f"{search.url}{path}", json=body, timeout=30)
    if response.status_code >= 400 and response.status_code not in ok:
        raise RebuildError(f"search {method} {path}: {response.status_code} {response.text[:300]}")
    return response.json() if response.content else None
