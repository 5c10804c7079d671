"""Dead letters read back from the DLQ, and which ones a replay sends: the pure half of changeflow/streams/dlq.py."""

from __future__ import annotations

import base64

import pytest
from typer.testing import CliRunner

from changeflow.cli import app as cli_app
from changeflow.streams.app import dead_letter_headers
from changeflow.streams.debezium import decode_postgres
from changeflow.streams.dlq import (
    DeadLetterEntry,
    ReplayRecord,
    UnknownDeadLetterError,
    dead_letter_id,
    dedupe,
    entry_from_message,
    iso_ms,
    latest_replays,
    plan_replay,
    preview,
    replay_headers,
    replayed_topic_name,
)
from changeflow.streams.records import DeadLetter
from tests.unit.commerce import POSTGRES_ENTITIES

DLQ = "changeflow.dlq"


def parked(
    key: bytes | None = b'{"id":7}',
    value: bytes | None = b"{not json",
    *,
    topic: str = "commerce.public.products",
    partition: int = 2,
    offset: int = 41,
    error: str = "not JSON: unexpected character",
    dlq_offset: int = 0,
    timestamp_ms: int | None = 1_795_000_000_123,
) -> DeadLetterEntry:
    """A dead letter as the decode agent parks it: headers built by the real `dead_letter_headers`."""
    headers = dead_letter_headers(DeadLetter(key, value, topic, partition, offset, error))
    return entry_from_message(
        key=key, value=value, headers=list(headers.items()), timestamp_ms=timestamp_ms,
        dlq_topic=DLQ, dlq_partition=0, dlq_offset=dlq_offset,
    )


# --- reading one DLQ message ------------------------------------------------------------------------
def test_decoder_dead_letter_reads_back_with_its_origin_reason_and_exact_bytes() -> None:
    raw = b"{not json"
    letter = decode_postgres(raw, topic="commerce.public.products", partition=1, offset=9, raw_key=b"k1",
                             entities=POSTGRES_ENTITIES)
    assert isinstance(letter, DeadLetter)
    entry = entry_from_message(
        key=letter.raw_key, value=letter.raw_value, headers=list(dead_letter_headers(letter).items()),
        timestamp_ms=1_795_000_000_123, dlq_topic=DLQ, dlq_partition=0, dlq_offset=17,
    )
    assert entry.id == "commerce.public.products:1:9"
    assert (entry.source_topic, entry.partition, entry.offset) == ("commerce.public.products", 1, 9)
    assert entry.error.startswith("not JSON: ")
    assert entry.error == letter.reason
    assert (entry.key, entry.value) == (b"k1", raw)
    assert entry.replayable
    d = entry.as_dict()
    assert d["dead_at"] == "2026-11-18T11:06:40.123Z"
    assert (d["key_size"], d["value_size"]) == (2, 9)
    assert (d["key_preview"], d["value_preview"]) == ("k1", "{not json")
    assert base64.b64decode(d["value_b64"]) == raw
    assert (d["dlq_partition"], d["dlq_offset"], d["copies"]) == (0, 17, 1)


def test_sink_runner_style_header_tuples_read_the_same() -> None:
    headers = [
        ("changeflow.source_topic", b"changeflow.products"),
        ("changeflow.partition", b"0"),
        ("changeflow.offset", b"1234"),
        ("changeflow.error", b"undecodable canonical record: unknown schema fingerprint"),
    ]
    entry = entry_from_message(key=b"products:1", value=b"\xc3\x01garbage", headers=headers, timestamp_ms=None,
                               dlq_topic=DLQ, dlq_partition=0, dlq_offset=3)
    assert entry.id == "changeflow.products:0:1234"
    assert entry.error == "undecodable canonical record: unknown schema fingerprint"
    assert entry.as_dict()["dead_at"] is None


def test_message_without_origin_headers_is_listed_under_its_dlq_position_and_not_replayable() -> None:
    entry = entry_from_message(key=None, value=b"x", headers=None, timestamp_ms=5, dlq_topic=DLQ,
                               dlq_partition=0, dlq_offset=88)
    assert entry.id == "changeflow.dlq:0:88"
    assert entry.source_topic is None
    assert entry.error == "(no error header)"
    assert not entry.replayable
    assert entry.as_dict()["key_size"] is None
    assert entry.as_dict()["key_b64"] is None


def test_unparsable_offset_header_counts_as_no_origin() -> None:
    headers = [("changeflow.source_topic", b"t"), ("changeflow.partition", b"0"), ("changeflow.offset", b"x")]
    entry = entry_from_message(key=None, value=b"v", headers=headers, timestamp_ms=None, dlq_topic=DLQ,
                               dlq_partition=0, dlq_offset=4)
    assert entry.id == "changeflow.dlq:0:4"
    assert not entry.replayable


def test_null_value_is_kept_as_null_not_empty() -> None:
    entry = parked(value=None)
    assert entry.value is None
    assert entry.as_dict()["value_size"] is None
    assert entry.as_dict()["value_preview"] == "<null>"
    assert parked(value=b"").as_dict()["value_size"] == 0


# --- previews ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (None, "<null>"),
        (b"", ""),
        (b'{"op":"z"}', '{"op":"z"}'),
        (b"a\nb\tc", "a\\nb\\tc"),
        (b"\x00\xff\xfe", "0x00fffe"),
        (b"x" * 61, "x" * 60 + "…"),
        ("é".encode() * 31, "é" * 30 + "…"),
        (b"x" * 59 + "é".encode(), "x" * 59 + "…"),
        (b"x" * 59 + b"\xff" + b"x", "0x" + "78" * 59 + "ff…"),
    ],
)
def test_preview_is_one_safe_line(data: bytes | None, expected: str) -> None:
    assert preview(data) == expected


# --- dedupe -----------------------------------------------------------------------------------------
def test_copies_of_one_origin_collapse_into_one_entry_first_seen_wins() -> None:
    first = parked(error="from redis sink", dlq_offset=1)
    other = parked(offset=42, dlq_offset=2)
    entries = dedupe([first, other, parked(error="from search sink", dlq_offset=3), parked(dlq_offset=4)])
    assert [e.id for e in entries] == ["commerce.public.products:2:41", "commerce.public.products:2:42"]
    assert entries[0].copies == 3
    assert entries[0].error == "from redis sink"
    assert entries[0].dlq_offset == 1
    assert entries[1].copies == 1


# --- replay log -------------------------------------------------------------------------------------
def test_replay_record_round_trips() -> None:
    record = ReplayRecord("commerce.public.products:2:41", 1_795_000_000_000, "commerce.public.products", 2, 77)
    assert ReplayRecord.decode(record.encode()) == record


def test_latest_replay_per_id_wins_tombstone_forgets_bad_record_ignored() -> None:
    a1 = ReplayRecord("a", 1, "t", 0, 10)
    a2 = ReplayRecord("a", 2, "t", 0, 11)
    b = ReplayRecord("b", 3, "t", 1, 5)
    replays = latest_replays([
        (b"a", a1.encode()), (b"b", b.encode()), (b"a", a2.encode()), (b"b", None), (b"c", b"{oops"), (None, b"x"),
    ])
    assert replays == {"a": a2}


def test_replayed_topic_sits_beside_the_dlq() -> None:
    assert replayed_topic_name("changeflow.dlq") == "changeflow.dlq.replayed"


# --- what a replay sends ----------------------------------------------------------------------------
def entries_abc() -> list[DeadLetterEntry]:
    return [parked(offset=1, dlq_offset=0), parked(offset=2, dlq_offset=1), parked(offset=3, dlq_offset=2)]


def test_replay_by_id_sends_only_those_in_the_order_asked_once_each() -> None:
    a, b, c = entries_abc()
    plan = plan_replay([a, b, c], {}, ids=[c.id, a.id, c.id])
    assert [e.id for e in plan.send] == [c.id, a.id]
    assert plan.skip == []


def test_already_replayed_is_skipped_with_when_unless_forced() -> None:
    a, b, _ = entries_abc()
    replays = {a.id: ReplayRecord(a.id, 1_795_000_000_000, a.source_topic or "", 2, 99)}
    plan = plan_replay([a, b], replays, ids=[a.id, b.id])
    assert [e.id for e in plan.send] == [b.id]
    assert [(s.entry.id, s.reason) for s in plan.skip] == [(a.id, "already replayed at 2026-11-18T11:06:40.000Z")]
    forced = plan_replay([a, b], replays, ids=[a.id, b.id], force=True)
    assert [e.id for e in forced.send] == [a.id, b.id]
    assert forced.skip == []


def test_all_sends_every_not_yet_replayed_and_skips_the_unreplayable() -> None:
    a, b, c = entries_abc()
    orphan = entry_from_message(key=None, value=b"v", headers=None, timestamp_ms=None, dlq_topic=DLQ,
                                dlq_partition=0, dlq_offset=9)
    plan = plan_replay([a, b, c, orphan], {b.id: ReplayRecord(b.id, 0, "t", 0, 1)}, all_=True)
    assert [e.id for e in plan.send] == [a.id, c.id]
    assert [(s.entry.id, s.reason) for s in plan.skip] == [
        (b.id, "already replayed at 1970-01-01T00:00:00.000Z"),
        (orphan.id, "no source topic in its headers: nowhere to send it back"),
    ]


def test_unknown_id_fails_the_whole_replay_before_anything_is_sent() -> None:
    a, _, _ = entries_abc()
    with pytest.raises(UnknownDeadLetterError) as info:
        plan_replay([a], {}, ids=[a.id, "commerce.public.products:0:999", "nope"])
    assert info.value.ids == ["commerce.public.products:0:999", "nope"]
    assert str(info.value) == "unknown dead-letter ids: commerce.public.products:0:999, nope"
    with pytest.raises(UnknownDeadLetterError, match=r"^unknown dead-letter id: x$"):
        plan_replay([], {}, ids=["x"])


def test_replay_headers_name_the_dead_letter() -> None:
    entry = parked()
    assert replay_headers(entry, 1_795_000_000_000) == [
        ("changeflow.replay_of", b"commerce.public.products:2:41"),
        ("changeflow.replayed_at", b"1795000000000"),
    ]


def test_ids_and_times_format() -> None:
    assert dead_letter_id("users.users.users", 0, 5) == "users.users.users:0:5"
    assert iso_ms(None) is None
    assert iso_ms(0) == "1970-01-01T00:00:00.000Z"


# --- CLI argument checks (no Kafka reached) ---------------------------------------------------------
def test_replay_without_id_or_all_is_a_usage_error() -> None:
    result = CliRunner().invoke(cli_app, ["dlq", "replay"])
    assert result.exit_code == 2
    assert "--id ID (repeatable) or --all" in result.output


def test_replay_with_both_id_and_all_is_a_usage_error() -> None:
    result = CliRunner().invoke(cli_app, ["dlq", "replay", "--id", "a:0:1", "--all"])
    assert result.exit_code == 2
    assert "--id and --all exclude each other" in result.output


def _raw_entry(value: bytes, topic: str = "commerce.public.products") -> DeadLetterEntry:
    return DeadLetterEntry(id="x", source_topic=topic, partition=0, offset=1, error="e", dead_at_ms=None,
                           key=None, value=value, dlq_partition=0, dlq_offset=0)


def test_dlq_list_masks_dropped_and_hashed_fields_in_debezium_and_mongodb_images() -> None:
    import orjson as _orjson

    from changeflow.streams.dlq import masked

    hidden = {"commerce.public.products": frozenset({"internal_notes", "email"}),
              "users.users.users": frozenset({"email"})}
    pg = _orjson.dumps({"schema": {}, "payload": {"op": "u", "before": {"id": 1, "email": "a@b.c"},
                                                    "after": {"id": 1, "email": "a@b.c", "internal_notes": "secret"}}})
    shown = _orjson.loads(masked(_raw_entry(pg), hidden).value or b"")["payload"]
    assert shown["before"] == {"id": 1, "email": "<masked>"}
    assert shown["after"] == {"id": 1, "email": "<masked>", "internal_notes": "<masked>"}
    mongo = _orjson.dumps({"payload": {"op": "u", "after": '{"_id": 1, "email": "x@y.z"}',
                                       "updateDescription": {"updatedFields": '{"email": "x@y.z"}'}}})
    shown = _orjson.loads(masked(_raw_entry(mongo, "users.users.users"), hidden).value or b"")["payload"]
    assert _orjson.loads(shown["after"]) == {"_id": 1, "email": "<masked>"}
    assert "x@y.z" not in str(shown)
    untouched = _raw_entry(b"not json at all")
    assert masked(untouched, hidden) is untouched


def test_replay_sends_only_to_the_pipelines_own_source_topics() -> None:
    from changeflow.streams.dlq import plan_replay

    ours, theirs = _raw_entry(b"{}"), _raw_entry(b"{}", topic="somebody.elses.topic")
    plan = plan_replay([ours, theirs], {}, all_=True, topics=frozenset({"commerce.public.products"}))
    assert [e.source_topic for e in plan.send] == ["commerce.public.products"]
    assert [s.reason for s in plan.skip] == [
        "'somebody.elses.topic' is not one of the pipeline's source topics: not sent"]
