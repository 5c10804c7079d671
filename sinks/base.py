"""The one sink protocol and the registry of sinks by name.

A sink receives a batch of canonical records in Kafka order and must apply each only if it is newer
than what the store holds (``version``), so replays and duplicates change nothing. The runner commits
Kafka offsets only after ``write_batch`` returns.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Protocol

from streams.records import ChangeRecord

if TYPE_CHECKING:
    from changeflow.settings import Settings


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
