"""The one store protocol and the registry of stores by name.

A sink receives a batch of canonical records in Kafka order and must apply each only if it is newer
than what the store holds (``version``), so replays and duplicates change nothing. The runner commits
Kafka offsets only after ``write_batch`` returns.

Three outcomes of a write, kept apart by every store:

- **written**: ``write_batch`` returns; every record is applied (or was already, by the version guard).
- **rejected records**: the store refused *these records* and nothing retrying could change (a search
  document whose field conflicts with the mapping, a ClickHouse row the server refuses, a Redis key whose
  script call failed). ``write_batch`` writes every other record of the batch first, then *returns* the
  refused ones as :class:`Rejected` (record + the store's own error); a store whose write is accepted or
  refused as a whole raises :class:`RefusedBatch` instead, and the runner bisects the batch down to the
  refused records (``sinks.runner.write_bisecting``). The runner quarantines each for
  that store only (dead-letter topic, ``on_reject: quarantine``, the default) or stops (``on_reject:
  stop``). A rejected record leaves the store's version guard as it was, so a later, newer record of the
  same key still applies, and a replay of the rejected one applies only if it is still the newest.
- **a failure of the store itself** (unreachable, authentication, a missing table or index): raised as
  :class:`RetriableSinkError` (retry the whole batch; nothing is committed) or :class:`FatalSinkError`
  (stop loudly). A store never reports those as rejected records.

``write_batch`` returning ``None`` means "no rejections" (stores written before this contract).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from changeflow.pipelines.model import store_classes
from changeflow.pipelines.spec import EntitySpec, Pipeline
from changeflow.streams.partial import merge_partial
from changeflow.streams.records import ChangeRecord

if TYPE_CHECKING:
    from changeflow.settings import Settings


log = logging.getLogger("changeflow.sinks")

# entity, keys → {key: the row the store holds now} (absent when the store has no such row)
FetchCurrent = Callable[[str, list[str]], dict[str, dict[str, Any]]]


def merge_image(record: ChangeRecord, base: dict[str, Any]) -> dict[str, Any]:
    """The full row after a partial change: the fields it carries over the last known row."""
    assert record.after is not None
    if record.source == "mongodb":
        return merge_partial(base, record.after)
    return {**base, **record.after}


def fill_partials(records: Sequence[ChangeRecord], fetch: FetchCurrent) -> list[ChangeRecord]:
    """Complete partial records (TOAST placeholders left out, MongoDB updateDescription) from the store.

    Earlier records of the same batch win over the store, so a batch holding an insert and then a
    partial update of one row needs no round trip for it. A partial record whose row the store does not
    hold (never seen, expired, deleted) comes back still ``partial``: it must not be written as if complete
    (its missing columns would be left out, or NULL), and a later partial record of that key in the batch
    has no base either. The runner has those re-read from the source (``sinks.runner``).
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
                known[k] = None
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


def stored_name(name: str, reserved: Collection[str]) -> str:
    """A source column's name in a store whose own names are ``reserved``: the name itself, or, when it is one
    of them (or one of them followed by underscores), one more ``_`` at its end. Any source name works in every
    store, and the mapping is reversible (``source_name``): ``_version`` → ``_version_``, ``_version_`` →
    ``_version__``."""
    return name + "_" if name.rstrip("_") in reserved else name


def source_name(name: str, reserved: Collection[str]) -> str:
    """The inverse of ``stored_name`` for a data column's stored name."""
    return name[:-1] if name.endswith("_") and name.rstrip("_") in reserved else name


def stored_row(row: Mapping[str, Any], reserved: Collection[str]) -> dict[str, Any]:
    return {stored_name(k, reserved): v for k, v in row.items()}


def source_row(row: Mapping[str, Any], reserved: Collection[str]) -> dict[str, Any]:
    return {source_name(k, reserved): v for k, v in row.items()}


@dataclass(frozen=True)
class Rejected:
    """A record the store refused (not the store failing): quarantined for that store only."""

    record: ChangeRecord
    reason: str


class RefusedBatch(Exception):
    """Raised by ``write_batch`` when the store refused the *whole call* because of the data it carried (a
    ClickHouse insert or a PostgreSQL transaction is accepted or refused as a whole), not because the store
    failed. The runner (``sinks.runner.write_bisecting``) then splits the batch and writes each half again,
    down to the single records refused, which become :class:`Rejected`. ``every``: the reason holds for every
    record of the call, so splitting cannot help and all of them are rejected at once. A store that knows
    *which* records it refuses returns them as ``Rejected`` instead (search bulk items, Redis script keys).

    What the call wrote before the refusal may be written again by the halves: a store raising this keeps
    such writes idempotent (its version guard)."""

    def __init__(self, reason: str, every: bool = False) -> None:
        super().__init__(reason)
        self.reason, self.every = reason, every


class RetriableSinkError(RuntimeError):
    """The store is unavailable or overloaded (connection lost, timeout, 429/503): retry the batch."""


class FatalSinkError(RuntimeError):
    """The store rejected the batch for a reason retrying cannot fix (bad mapping, bad config)."""


@dataclass(frozen=True)
class Versioned:
    """A row as a store holds it, with the version it was written under (None where the store keeps none)."""

    row: dict[str, Any]
    version: int | None


class Store(Protocol):
    """One derived store: every operation on it, for the stream and for the tools.

    A store is found by name in the registry (``changeflow.stores`` entry points); drift, status, watch,
    metrics, rebuild and reconcile loop over the registered stores and never name one.
    """

    name: str
    # Column kinds (pipelines.types.ColumnType.kind) whose NULL the store can only hold as the empty value:
    # reconcile compares the two as equal for this store (README "Types"). Read with getattr, default none.
    null_is_empty: frozenset[str]

    # --- the stream ---------------------------------------------------------------------------------
    def setup(self, known: Mapping[str, Any] | None = None) -> None:
        """Create what the store needs for the pipeline's entities (tables, indexes, scripts); idempotent.
        ``known``: entity → the newest canonical schema version already published."""

    def write_batch(self, records: Sequence[ChangeRecord]) -> list[Rejected] | None:
        """Apply the records, version-guarded. Records the store refuses are returned as ``Rejected``
        after every other record is written, or the whole call is refused by ``RefusedBatch`` (the runner
        bisects); a failure of the store itself raises RetriableSinkError or FatalSinkError (module docstring)."""

    def fetch_current(self, entity: str, keys: list[str]) -> dict[str, dict[str, Any]]:
        """The rows the store holds now for ``keys`` (to complete partial records)."""

    # --- the tools (drift, reconcile, repair, status) -----------------------------------------------
    def count(self, spec: EntitySpec) -> int:
        """Live rows of the entity (deletes applied)."""

    def scan(self, spec: EntitySpec) -> Iterator[tuple[str, dict[str, Any], int | None]]:
        """Every live row: (key, row, version)."""

    def fetch(self, spec: EntitySpec, keys: list[str]) -> dict[str, Versioned]: ...

    def delete(self, spec: EntitySpec, keys: list[str]) -> None:
        """Remove rows outright (repair of strays, erasure)."""

    def drop_versions_above(self, spec: EntitySpec, keys: list[str], position: int) -> list[str]:
        """Forget version guards above a source position, so a re-read at that position applies."""

    def applied_through(self) -> dict[str, int]:
        """entity → the highest source version applied."""

    # --- erasure (changeflow.erasure; README "Erasure") -------------------------------------------------
    def keys_where(self, spec: EntitySpec, column: str, values: Sequence[str]) -> list[str]:
        """Keys of the rows whose source column ``column``, as text (``str(value)``), is one of ``values`` (live
        rows; a store that keeps history looks there too): how an erasure finds the rows that refer to a person
        (``orders.user_id``), a row whose link was already cut included."""

    def forget(self, spec: EntitySpec, keys: list[str], keep: Mapping[str, int] | None = None) -> list[str]:
        """Remove every trace the store holds of ``keys``: live rows, tombstones and the versions remembered
        for deletes, history (ClickHouse's changelog and reconcile's differing keys), in every table or index
        the entity's name leads to (every index behind a search alias). A key in ``keep`` keeps its row at
        that version or newer (an anonymised row stays; its older images go). Synchronous: when it returns,
        a read finds nothing of what it removed. Idempotent. A line per object it changed."""

    def traces(self, spec: EntitySpec, keys: list[str], keep: Mapping[str, int] | None = None) -> int:
        """How many traces of ``keys`` the store still holds, counting what ``forget`` removes (0: erased,
        verified by reading back)."""

    def expunge(self, spec: EntitySpec) -> tuple[str, float | None]:
        """Physically drop what ``forget`` left marked deleted (merged parts, expunged segments, a rewritten
        append-only file, vacuumed tuples): (what was done, seconds until it is certainly gone, or None when
        it already is)."""

    def purge(self) -> list[str]:
        """Remove everything the pipeline created in this store (``connectors delete --purge``); a line
        per object removed. Idempotent: nothing left, nothing said."""

    def close(self) -> None: ...


StoreFactory = Callable[["Settings", Pipeline], Store]


def registry() -> dict[str, StoreFactory]:
    """Store name → its class, from the ``changeflow.stores`` entry points (a new store is one module and
    one line in its package's entry points; ``pipelines.model.store_classes`` reads them, once)."""
    return store_classes()


def names() -> list[str]:
    return list(registry())


def used_by(pipeline: Pipeline) -> list[str]:
    """The stores a pipeline's worker runs and its tools look at: every registered store, except an opt-in
    one (``opt_in = True`` on its class: a store that needs a target the user names, such as PostgreSQL)
    that no entity of the pipeline lands in."""
    return [n for n, factory in registry().items()
            if not getattr(factory, "opt_in", False) or pipeline.stored_in(n)]


def create(name: str, settings: Settings, pipeline: Pipeline) -> Store:
    factories = registry()
    if name not in factories:
        raise KeyError(f"unknown store {name!r}; known: {', '.join(sorted(factories))}")
    return factories[name](settings, pipeline)
