"""A record one store refuses is quarantined for that store only (issue 13): the pure parts, no network.

Bisection of an all-or-nothing insert, the search bulk per-item classification, ClickHouse's and Redis's
"this row" vs "the store" errors, the runner's quarantine (headers, policy), the DLQ entries it leaves.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import pytest
import redis
from clickhouse_connect.driver.exceptions import DatabaseError, DataError, OperationalError, ProgrammingError

from changeflow.pipelines.load import load
from changeflow.pipelines.model import PipelineFile
from changeflow.pipelines.spec import Pipeline, build
from changeflow.settings import Settings
from changeflow.sinks import runner as runner_mod
from changeflow.sinks.base import FatalSinkError, RefusedBatch, Rejected, RetriableSinkError
from changeflow.sinks.clickhouse import refuses_every_row, row_rejection
from changeflow.sinks.redis import script_rejections
from changeflow.sinks.runner import write_bisecting
from changeflow.sinks.search import SearchStore, classify_item
from changeflow.streams.dlq import (
    ReplayRecord,
    dedupe,
    entry_from_message,
    for_store,
    plan_replay,
    quarantined_counts,
)
from changeflow.streams.records import ChangeRecord


def rec(key: str, version: int = 10, entity: str = "products", offset: int = 0) -> ChangeRecord:
    return ChangeRecord("postgres", entity, key, "u", version, 1_000, None, {"id": key},  # type: ignore[arg-type]
                        origin=(f"changeflow.{entity}", 0, offset))


# --- bisection: the runner's, for a store that refuses a whole call ---------------------------------------
class Refusing:
    """A store whose write is all-or-nothing: refuses any call holding a bad key (``RefusedBatch``); records
    what it wrote and every call."""

    name = "fake"

    def __init__(self, bad: set[str], error: Exception | None = None, every: bool = False) -> None:
        self.bad, self.error, self.every = bad, error, every
        self.calls: list[list[str]] = []
        self.written: list[str] = []

    def write_batch(self, records: Sequence[ChangeRecord]) -> list[Rejected]:
        keys = [r.key for r in records]
        self.calls.append(keys)
        if any(k in self.bad for k in keys):
            if self.error is not None:
                raise self.error
            raise RefusedBatch(f"bad value in {len(keys)} rows", every=self.every)
        self.written.extend(keys)
        return []


def batch(n: int) -> list[ChangeRecord]:
    return [rec(str(i), offset=i) for i in range(n)]


def test_bisection_writes_a_clean_batch_once() -> None:
    store = Refusing(set())
    assert write_bisecting(store, batch(100)) == []  # type: ignore[arg-type]
    assert len(store.calls) == 1 and store.written == [str(i) for i in range(100)]


@pytest.mark.parametrize("bad", [{0}, {63}, {99}, {3, 4}, {0, 50, 99}])
def test_bisection_finds_exactly_the_refused_rows_and_writes_every_other_row_once(bad: set[int]) -> None:
    store = Refusing({str(i) for i in bad})
    records = batch(100)
    refused = write_bisecting(store, records)  # type: ignore[arg-type]
    assert [r.record for r in refused] == [records[i] for i in sorted(bad)]  # the very records, in batch order
    assert all(r.reason == "bad value in 1 rows" for r in refused)
    assert sorted(store.written, key=int) == [str(i) for i in range(100) if i not in bad]
    assert len(store.written) == len(set(store.written))  # nothing written twice
    if len(bad) == 1:
        assert len(store.calls) <= 2 * 7 + 1  # about 2·log2(n) calls for one bad row among n


def test_the_runner_bisects_a_refused_batch_down_to_the_refused_records() -> None:
    """8 records, keys 2 and 5 refused: [0..7] refused, [0..3] refused, [0,1] written, [2,3] refused, [2] refused,
    [3] written, [4..7] refused, [4,5] refused, [4] written, [5] refused, [6,7] written: 11 calls."""
    store = Refusing({"2", "5"})
    records = batch(8)
    refused = write_bisecting(store, records)  # type: ignore[arg-type]
    assert [(r.record.key, r.reason) for r in refused] == [("2", "bad value in 1 rows"), ("5", "bad value in 1 rows")]
    assert refused[0].record is records[2] and refused[1].record is records[5]
    assert store.calls == [[str(i) for i in range(8)], ["0", "1", "2", "3"], ["0", "1"], ["2", "3"], ["2"], ["3"],
                           ["4", "5", "6", "7"], ["4", "5"], ["4"], ["5"], ["6", "7"]]
    assert store.written == ["0", "1", "3", "4", "6", "7"]


def test_records_a_store_returns_itself_come_back_beside_the_bisected_ones_in_batch_order() -> None:
    class Mixed(Refusing):
        def write_batch(self, records: Sequence[ChangeRecord]) -> list[Rejected]:
            own = [r for r in records if r.key == "0"]
            super().write_batch([r for r in records if r.key != "0"])
            return [Rejected(r, "per item") for r in own]

    store = Mixed({"6"})
    assert [(r.record.key, r.reason) for r in write_bisecting(store, batch(8))] == [  # type: ignore[arg-type]
        ("0", "per item"), ("6", "bad value in 1 rows")]


def test_bisection_lets_a_failure_of_the_store_itself_through() -> None:
    store = Refusing({"5"}, error=RetriableSinkError("server gone"))
    with pytest.raises(RetriableSinkError):
        write_bisecting(store, batch(10))  # type: ignore[arg-type]
    assert len(store.calls) == 1


def test_a_refusal_of_every_row_is_not_split() -> None:
    store = Refusing({str(i) for i in range(64)}, every=True)
    refused = write_bisecting(store, batch(64))  # type: ignore[arg-type]
    assert len(refused) == 64 and len(store.calls) == 1


# --- search: per-item errors of a bulk response --------------------------------------------------------
MAPPING_CONFLICT = {"type": "mapper_parsing_exception",
                    "reason": "object mapping for [attrs] tried to parse field [attrs] as object, but found a "
                              "concrete value"}


@pytest.mark.parametrize(("op", "status", "error", "outcome"), [
    ("index", 201, None, "ok"),
    ("index", 200, None, "ok"),
    ("index", 409, {"type": "version_conflict_engine_exception", "reason": "current version [9] is higher"}, "ok"),
    ("delete", 404, None, "ok"),
    ("index", 400, MAPPING_CONFLICT, "rejected"),
    ("index", 400, {"type": "document_parsing_exception", "reason": "[1:9] failed to parse field [n]"}, "rejected"),
    ("index", 400, {"type": "illegal_argument_exception", "reason": "Limit of total fields [1000] exceeded"},
     "rejected"),
    ("index", 400, {"type": "strict_dynamic_mapping_exception", "reason": "mapping set to strict"}, "rejected"),
    ("index", 429, {"type": "es_rejected_execution_exception", "reason": "queue full"}, "retry"),
    ("index", 503, {"type": "unavailable_shards_exception", "reason": "primary shard is not active"}, "retry"),
    ("index", 404, {"type": "index_not_found_exception", "reason": "no such index [x]"}, "fatal"),
    ("index", 403, {"type": "cluster_block_exception", "reason": "index [x] blocked by: [FORBIDDEN/8/read-only]"},
     "fatal"),
    ("index", 400, {"type": "index_closed_exception", "reason": "closed"}, "fatal"),
    ("index", 401, {"type": "security_exception", "reason": "missing authentication credentials"}, "fatal"),
])
def test_bulk_items_are_told_apart(op: str, status: int, error: Any, outcome: str) -> None:
    got, why = classify_item(op, status, error)
    assert got == outcome
    if outcome != "ok":
        assert why and error["type"] in why


def test_the_engines_reason_and_its_cause_travel_with_a_rejection_without_the_value() -> None:
    """Issue 23 §6: a rejection reason reaches dead-letter headers and logs: the field and the cause's type
    travel, the value the engine quotes does not."""
    _, why = classify_item("index", 400, {**MAPPING_CONFLICT, "caused_by": {"type": "illegal_argument_exception",
                                                                           "reason": "For input string: \"x\""}})
    assert why is not None
    assert why.startswith("mapper_parsing_exception: object mapping for [attrs]")
    assert why.endswith("(caused by illegal_argument_exception)")
    assert "For input string" not in why
    _, why = classify_item("index", 400, {
        "type": "mapper_parsing_exception",
        "reason": "failed to parse field [email] of type [date] in document with id '3'. Preview of field's value: "
                  "'alice@example.com'",
        "caused_by": {"type": "illegal_argument_exception", "reason": "failed to parse date 'alice@example.com'"}})
    assert why == ("mapper_parsing_exception: failed to parse field [email] of type [date] in document with id '3'. "
                   "Preview of field's value: (not shown) (caused by illegal_argument_exception)")


@pytest.fixture
def pipeline() -> Pipeline:
    return load()


def fake_search(pipeline: Pipeline, monkeypatch: pytest.MonkeyPatch, answers: list[tuple[int, Any]]) -> SearchStore:
    """A search store whose bulk requests answer each action in turn (the applied-through marker first)."""
    store = SearchStore(Settings(), pipeline)
    store._targets_read_at = time.monotonic() + 3600  # no rebuild lookups

    def bulk(actions: list[dict[str, Any]]) -> list[tuple[str, int | None, Any]]:
        return [("index", 201, None)] + [(a["_op_type"], st, err)
                                         for a, (st, err) in zip(actions[1:], answers, strict=True)]

    monkeypatch.setattr(store, "_bulk", bulk)
    return store


def test_search_returns_the_refused_documents_after_writing_the_rest(
    pipeline: Pipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = fake_search(pipeline, monkeypatch, [(201, None), (400, MAPPING_CONFLICT), (409, None)])
    batch = [rec("1", offset=1), rec("2", offset=2), rec("3", offset=3)]
    rejected = store.write_batch(batch)
    assert [r.record.key for r in rejected] == ["2"]
    assert rejected[0].record.origin == ("changeflow.products", 0, 2)
    assert "mapper_parsing_exception" in rejected[0].reason and "products" in rejected[0].reason


def test_search_throttling_retries_and_a_broken_index_stops(
    pipeline: Pipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = fake_search(pipeline, monkeypatch, [(201, None), (429, {"type": "es_rejected_execution_exception"})])
    with pytest.raises(RetriableSinkError):
        store.write_batch([rec("1"), rec("2")])
    store = fake_search(pipeline, monkeypatch, [(400, MAPPING_CONFLICT),
                                                (404, {"type": "index_not_found_exception", "reason": "gone"})])
    with pytest.raises(FatalSinkError, match="index_not_found"):
        store.write_batch([rec("1"), rec("2")])


# --- ClickHouse: this row, or the server ---------------------------------------------------------------
def test_clickhouse_rows_the_server_or_the_driver_refuses_are_bisected() -> None:
    assert row_rejection(DatabaseError("Code: 469. DB::Exception: Constraint `c` is violated (VIOLATED_CONSTRAINT)"))
    assert row_rejection(DataError("Unable to create native array for column `q`: error"))
    assert row_rejection(ValueError("invalid literal for int() with base 10: 'x'"))
    wrapped = DataError("Unable to create native array for column `q`")
    wrapped.__cause__ = OverflowError("short format requires -32768 <= number <= 32767")
    why = row_rejection(wrapped)
    assert why is not None and "short format requires" in why


@pytest.mark.parametrize("exc", [
    OperationalError("connection refused"),
    DatabaseError("Code: 516. DB::Exception: default: Authentication failed (AUTHENTICATION_FAILED)"),
    DatabaseError("Code: 60. DB::Exception: Table x.y does not exist (UNKNOWN_TABLE)"),
    DatabaseError("Code: 81. DB::Exception: Database x does not exist (UNKNOWN_DATABASE)"),
    DatabaseError("Code: 252. DB::Exception: Too many parts (TOO_MANY_PARTS)"),
    DatabaseError("Code: 210. DB::Exception: Server is shutting down (NETWORK_ERROR)"),
])
def test_clickhouse_failures_of_the_server_are_never_rows(exc: Exception) -> None:
    assert row_rejection(exc) is None


def test_an_unknown_column_refuses_every_row_at_once() -> None:
    exc = ProgrammingError("Unrecognized column 'odd name' in table shop.orders")
    assert row_rejection(exc) is not None and refuses_every_row(exc)
    assert not refuses_every_row(DataError("Unable to create native array"))


# --- Redis: per-key errors of the script -----------------------------------------------------------------
def test_redis_per_key_script_errors_name_their_records() -> None:
    group = [rec("1"), rec("2"), rec("3")]
    assert script_rejections(group, [3, []]) == []
    rejected = script_rejections(group, [2, [2, b"ERR string exceeds maximum allowed size"]])
    assert [r.record.key for r in rejected] == ["2"]
    assert "string exceeds maximum allowed size" in rejected[0].reason


def test_redis_server_errors_are_not_rejections() -> None:
    group = [rec("1")]
    with pytest.raises(RetriableSinkError):
        script_rejections(group, [0, [1, b"OOM command not allowed when used memory > 'maxmemory'."]])
    with pytest.raises(RetriableSinkError):
        script_rejections(group, redis.ResponseError("READONLY You can't write against a read only replica."))
    with pytest.raises(FatalSinkError):
        script_rejections(group, redis.ResponseError("NOPERM this user has no permissions"))
    with pytest.raises(FatalSinkError):
        script_rejections(group, redis.ResponseError("WRONGTYPE Operation against a key holding the wrong kind"))


# --- the runner: quarantine for that store only, or stop -------------------------------------------------
class FakeMessage:
    def __init__(self, r: ChangeRecord) -> None:
        assert r.origin is not None
        self._t, self._p, self._o = r.origin
        self.r = r

    def topic(self) -> str:
        return self._t

    def partition(self) -> int:
        return self._p

    def offset(self) -> int:
        return self._o

    def key(self) -> bytes:
        return f"{self.r.entity}:{self.r.key}".encode()

    def value(self) -> bytes:
        return b"\xc3\x01canonical-bytes-" + self.r.key.encode()


class FakeProducer:
    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []

    def produce(self, topic: str, key: bytes, value: bytes, headers: list[tuple[str, bytes]],
                on_delivery: Any) -> None:
        self.sent.append({"topic": topic, "key": key, "value": value, "headers": headers})

    def poll(self, _t: float) -> int:
        return 0

    def flush(self, _t: float) -> int:
        return 0


def make_runner(pipeline: Pipeline, store: str) -> runner_mod.SinkRunner:
    r = runner_mod.SinkRunner.__new__(runner_mod.SinkRunner)
    r.sink = type("Fake", (), {"name": store})()  # type: ignore[assignment]
    r.pipeline, r.dlq, r.quarantined = pipeline, FakeProducer(), 0  # type: ignore[assignment]
    r._judged = {}  # nothing the suppression list changed
    return r


def with_policy(pipeline: Pipeline, entity: str, store: str, policy: str) -> Pipeline:
    data = pipeline.file.model_dump(by_alias=True)
    data["entities"][entity]["stores"][store]["on_reject"] = policy
    return build(PipelineFile.model_validate(data), pipeline.path)


def test_quarantine_parks_the_exact_bytes_with_store_origin_and_reason(pipeline: Pipeline) -> None:
    from changeflow import metrics

    runner = make_runner(pipeline, "search")
    bad = rec("42", version=777, offset=9)
    before = metrics.quarantined_counts().get(("search", "products"), 0)
    runner._quarantine([Rejected(bad, "mapper_parsing_exception: object mapping for [attrs]")],
                       {bad.origin: FakeMessage(bad)})  # type: ignore[dict-item]
    (sent,) = runner.dlq.sent  # type: ignore[attr-defined]
    assert sent["topic"] == pipeline.dlq_topic
    assert sent["value"] == b"\xc3\x01canonical-bytes-42" and sent["key"] == b"products:42"
    headers = dict(sent["headers"])
    assert headers["changeflow.store"] == b"search"
    assert headers["changeflow.entity"] == b"products" and headers["changeflow.key"] == b"42"
    assert headers["changeflow.version"] == b"777"
    assert (headers["changeflow.source_topic"], headers["changeflow.partition"], headers["changeflow.offset"]) == (
        b"changeflow.products", b"0", b"9")
    assert headers["changeflow.error"].startswith(b"mapper_parsing_exception")
    assert metrics.quarantined_counts()[("search", "products")] == before + 1
    assert runner.quarantined == 1

    # Read back as `dlq list` does: an entry of that store, replayable into it only.
    entry = entry_from_message(key=sent["key"], value=sent["value"], headers=sent["headers"], timestamp_ms=1,
                               dlq_topic=pipeline.dlq_topic, dlq_partition=0, dlq_offset=5)
    assert (entry.id, entry.store, entry.entity, entry.record_key, entry.version) == (
        "changeflow.products:0:9", "search", "products", "42", 777)
    assert entry.replay_key == "changeflow.products:0:9@search"


def test_on_reject_stop_stops_instead_and_parks_nothing(pipeline: Pipeline) -> None:
    assert runner_mod.on_reject(pipeline, "clickhouse", "products") == "quarantine"  # the default
    strict = with_policy(pipeline, "products", "clickhouse", "stop")
    assert runner_mod.on_reject(strict, "clickhouse", "products") == "stop"
    assert runner_mod.on_reject(strict, "search", "products") == "quarantine"  # per store
    runner = make_runner(strict, "clickhouse")
    bad = rec("1", offset=3)
    with pytest.raises(FatalSinkError, match=r"on_reject: stop.*Int16"):
        runner._quarantine([Rejected(bad, "value out of range for Int16")], {bad.origin: FakeMessage(bad)})  # type: ignore[dict-item]
    assert runner.dlq.sent == []  # type: ignore[attr-defined]


def test_on_reject_is_validated_in_the_pipeline_file(pipeline: Pipeline) -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="on_reject"):
        with_policy(pipeline, "products", "search", "ignore")


# --- the DLQ: one entry per store, counts, replay planning ----------------------------------------------
def quarantined_entry(store: str, key: str = "42", offset: int = 9, dlq_offset: int = 0) -> Any:
    r = rec(key, offset=offset)
    headers = runner_mod.quarantine_headers(store, Rejected(r, f"{store} says no"))
    return entry_from_message(key=b"k", value=b"v", headers=headers, timestamp_ms=dlq_offset,
                              dlq_topic="changeflow.dlq", dlq_partition=0, dlq_offset=dlq_offset)


def test_one_record_refused_by_two_stores_is_two_entries_with_one_id() -> None:
    entries = dedupe([quarantined_entry("search"), quarantined_entry("clickhouse", dlq_offset=1),
                      quarantined_entry("search", dlq_offset=2)])  # a redelivered batch parks it again
    assert [(e.id, e.store, e.copies) for e in entries] == [
        ("changeflow.products:0:9", "search", 2), ("changeflow.products:0:9", "clickhouse", 1)]
    assert [e.store for e in for_store(entries, "clickhouse")] == ["clickhouse"]
    assert len(for_store(entries, None)) == 2

    plan = plan_replay(for_store(entries, "search"), {}, ids=["changeflow.products:0:9"])
    assert [e.store for e in plan.send] == ["search"]
    plan = plan_replay(entries, {}, ids=["changeflow.products:0:9"])
    assert sorted(e.store or "" for e in plan.send) == ["clickhouse", "search"]

    done = {"changeflow.products:0:9@search": ReplayRecord("changeflow.products:0:9@search", 1, "store:search", -1, -1)}
    plan = plan_replay(entries, done, all_=True)
    assert [e.store for e in plan.send] == ["clickhouse"]
    assert [s.entry.store for s in plan.skip] == ["search"]
    assert quarantined_counts(entries) == {("search", "products"): 1, ("clickhouse", "products"): 1}
    assert quarantined_counts(entries, done) == {("clickhouse", "products"): 1}


@pytest.mark.parametrize("exc", [
    DatabaseError("HTTP driver received HTTP status 503"),  # a proxy in front, no server code
    DatabaseError("Code: 243. DB::Exception: Cannot reserve 1.00 MiB, not enough space (NOT_ENOUGH_SPACE)"),
    DatabaseError("Code: 425. DB::Exception: System error (SYSTEM_ERROR)"),
    DatabaseError("Code: 236. DB::Exception: Aborted (ABORTED)"),
])
def test_an_outage_is_never_mistaken_for_rows_and_quarantined(exc: Exception) -> None:
    """Only codes known to be about the data bisect a batch: anything else is the store's failure."""
    assert row_rejection(exc) is None


def test_an_illegal_argument_about_the_index_is_the_stores_failure_not_the_documents() -> None:
    from changeflow.sinks.search import classify_item

    alias = {"type": "illegal_argument_exception", "reason": "no write index is defined for alias [orders]. The "
             "write index may be explicitly disabled using is_write_index=false or the alias points to multiple "
             "indices without one being designated as a write index"}
    assert classify_item("index", 400, alias)[0] == "fatal"
    field = {"type": "illegal_argument_exception", "reason": "mapper [price] cannot be changed from type [long] "
             "to [float]"}
    assert classify_item("index", 400, field)[0] == "rejected"
