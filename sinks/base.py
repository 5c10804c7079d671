"""The one sink protocol and the registry of sinks by name.

A sink receives a batch of canonical records in Kafka order and must apply each only if it is newer
than what the store holds (``version``), so replays and duplicates change nothing. The runner commits
Kafka offsets only after ``write_batch`` returns.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from streams.records import ChangeRecord

if TYPE_CHECKING:
    from changeflow.settings import Settings


log = logging.getLogger("changeflow.sinks")

# entity, keys → {key: the row the store holds now} (absent when the store has no such row)
FetchCurrent = Callable[[str, list[str]], dict[str, dict[str, Any]]]


def merge_image(record: ChangeRecord, base: dict[str, Any]) -> dict[str, Any]:
    """The full row after a partial change: the fields it carries over the last known row."""
    assert record.after is not None
    if record.source == "mongodb":
        from streams.mongodb import merge_partial

        return merge_partial(base, record.after)
    return {**base, **record.after}


def fill_partials(records: Sequence[ChangeRecord], fetch: FetchCurrent) -> list[ChangeRecord]:
    """Complete partial records (TOAST placeholders left out, MongoDB updateDescription) from the store.

    Earlier records of the same batch win over the store, so a batch holding an insert and then a
    partial update of one row needs no round trip for it. A partial record whose row the store has
    never seen is written with the fields it has; the placeholder itself never reaches a store.
    """
    if not any(r.partial for r in records):
        return list(records)
    wanted: dict[str, list[str]] = {}
    for r in records:
        if r.partial:
            wanted.setdefault(r.entity, []).append(r.key)
    known: dict[tuple[str, str], dict[str, Any] | None] = {}
    for entity, keys in wanted.items():
        for key, row in fetch(entity, sorted(set(keys))).items():
            known[(entity, key)] = row
    out: list[ChangeRecord] = []
    for r in records:
        k = (r.entity, r.key)
        if r.after is None:
            known[k] = None
        elif r.partial:
            base = known.get(k)
            if base is None:
                log.warning("event=partial_without_base entity=%s key=%s version=%s", r.entity, r.key, r.version)
                r = dataclasses.replace(r, partial=False)
            else:
                r = dataclasses.replace(r, after=merge_image(r, base), partial=False)
            known[k] = r.after
        else:
            known[k] = r.after
        out.append(r)
    return out


def applied_through(records: Sequence[ChangeRecord]) -> dict[str, tuple[int, int]]:
    """entity → (highest version, its source commit time) among the records of a batch."""
    out: dict[str, tuple[int, int]] = {}
    for r in records:
        if r.entity not in out or r.version > out[r.entity][0]:
            out[r.entity] = (r.version, r.ts_ms)
    return out


class RetriableSinkError(RuntimeError):
    """The store is unavailable or overloaded (connection lost, timeout, 429/503): retry the batch."""


class FatalSinkError(RuntimeError):
    """The store rejected the batch for a reason retrying cannot fix (bad mapping, bad config)."""


class Sink(Protocol):
    name: str

    def setup(self) -> None:
        """Create what the store needs (tables, indexes, scripts); idempotent."""

    def write_batch(self, records: Sequence[ChangeRecord]) -> None:
        """Apply the records, version-guarded; raise RetriableSinkError or FatalSinkError."""

    def close(self) -> None: ...


SinkFactory = Callable[["Settings"], Sink]


def registry() -> dict[str, SinkFactory]:
    from sinks.clickhouse import ClickHouseSink
    from sinks.redis import RedisSink
    from sinks.search import SearchSink

    return {"redis": RedisSink, "search": SearchSink, "clickhouse": ClickHouseSink}


def create(name: str, settings: Settings) -> Sink:
    factories = registry()
    if name not in factories:
        raise KeyError(f"unknown sink {name!r}; known: {', '.join(sorted(factories))}")
    return factories[name](settings)
