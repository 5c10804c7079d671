"""The values that flow between decode, transform and the sinks.

Bad data is a value, not an exception: decoding returns a ``ChangeRecord``, a ``DeadLetter`` (kept with
its original bytes and position, so nothing is lost) or a ``Skip`` (a message that is understood and
deliberately not forwarded: heartbeats, tombstones).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Literal

Op = Literal["c", "u", "d", "r"]


@dataclass(frozen=True, slots=True)
class ChangeRecord:
    """One row change in the canonical shape (ARCHITECTURE.md, "Contracts"), whatever the source."""

    source: str
    entity: str
    key: str
    op: Op
    version: int
    ts_ms: int
    before: dict[str, Any] | None
    after: dict[str, Any] | None
    # Kafka position of the raw message this record came from (for logs and dead letters).
    origin: tuple[str, int, int] | None = field(default=None, compare=False)
    # True when `after` holds only the fields this change touched (a MongoDB update that carries only
    # updateDescription, or an update whose TOASTed columns were left out); the stream fills the rest
    # from the last known state before any store sees it.
    partial: bool = False
    # The entity's key columns (their values are in the row images) and the column types of the images,
    # from the source (decode stage); the canonical schema version the record travels with (sinks).
    key_columns: tuple[str, ...] = field(default=(), compare=False)
    types: Any = field(default=None, compare=False)
    schema: Any = field(default=None, compare=False)

    @property
    def kafka_key(self) -> str:
        return f"{self.entity}:{self.key}"

    @property
    def is_delete(self) -> bool:
        return self.op == "d"


@dataclass(frozen=True, slots=True)
class DeadLetter:
    raw_key: bytes | None
    raw_value: bytes | None
    topic: str
    partition: int
    offset: int
    reason: str

    def __post_init__(self) -> None:
        # Every producer's reason is bounded here (headers, logs and `dlq list` carry it).
        if not isinstance(self.reason, str) or len(self.reason) > REASON_LIMIT:
            object.__setattr__(self, "reason", bounded(str(self.reason)))


@dataclass(frozen=True, slots=True)
class Skip:
    reason: str


Decoded = ChangeRecord | DeadLetter | Skip


def outcome(result: Decoded) -> str:
    """The decode counter's label for one result: record, dead_letter or skip."""
    if isinstance(result, ChangeRecord):
        return "record"
    return "dead_letter" if isinstance(result, DeadLetter) else "skip"


REASON_LIMIT = 300


_QUOTED = re.compile(r"'(?:[^'\\]|\\.)*'" + r'|"(?:[^"\\]|\\.)*"')


def without_values(reason: str) -> str:
    """A reason as a log line may carry it: every quoted part (a decoder quotes the value it refused) replaced by
    '…'. Logs carry keys and reasons, never row values; the dead letter's headers keep the whole reason, beside
    the record itself."""
    return _QUOTED.sub("'…'", reason)


def bounded(reason: str, limit: int = REASON_LIMIT) -> str:
    """A dead letter's reason, at most ``limit`` characters (a reason that quotes a 500 KB row is not one)."""
    return reason if len(reason) <= limit else reason[: limit - 1] + "…"
