"""What the stores' write paths build by hand instead of through a client helper, checked value for value."""

from __future__ import annotations

from decimal import Decimal

import orjson

from changeflow.sinks.search import bulk_body


def test_each_action_is_one_line_and_a_delete_carries_no_document() -> None:
    body = bulk_body([
        {"_op_type": "index", "_index": "p", "_id": 'a"b\\c\nd', "version": 7, "version_type": "external",
         "_source": {"price": Decimal("12345678901234567890.120"), "name": "x\ny"}},
        {"_op_type": "delete", "_index": "p", "_id": "2", "version": 9, "version_type": "external"},
    ])
    assert body.endswith(b"\n")
    lines = body.split(b"\n")[:-1]
    assert [orjson.loads(line) for line in lines] == [
        {"index": {"_index": "p", "_id": 'a"b\\c\nd', "version": 7, "version_type": "external"}},
        {"price": "12345678901234567890.120", "name": "x\ny"},
        {"delete": {"_index": "p", "_id": "2", "version": 9, "version_type": "external"}},
    ]


def test_clickhouse_millisecond_ticks_are_the_drivers_own() -> None:
    """``ticks_ms`` spares the driver a conversion per row; it must give the value the driver would."""
    from datetime import UTC, datetime

    from clickhouse_connect.datatypes.registry import get_from_name

    from changeflow.sinks.clickhouse import ticks_ms

    column = get_from_name("DateTime64(3, 'UTC')")
    for moment in (datetime(2026, 12, 2, 0, 1, 2, 345678, tzinfo=UTC), datetime(1970, 1, 1, tzinfo=UTC),
                   datetime(1969, 12, 31, 23, 59, 59, 999999, tzinfo=UTC), datetime.now(UTC)):
        assert ticks_ms(moment) == column._datetime64_ticks(moment)


def test_a_search_document_id_is_the_key_or_its_hash_when_the_key_is_too_long() -> None:
    import hashlib

    from changeflow.sinks.search import KEY_FIELD, MAX_ID_BYTES, doc_id, key_of

    assert doc_id("42") == "42"
    fits = "é" * (MAX_ID_BYTES // 2)  # 512 bytes exactly
    assert doc_id(fits) == fits
    long = fits + "x"
    assert doc_id(long) == "sha256:" + hashlib.sha256(long.encode()).hexdigest()
    assert doc_id(long) == doc_id(long) and doc_id(long) != doc_id(long + "y")
    assert key_of(doc_id(long), {"id": 1, KEY_FIELD: long}) == (long, {"id": 1})
    assert key_of("42", {"id": 42}) == ("42", {"id": 42})
