"""The search sink's own ``_bulk`` body: one NDJSON line per action and per document, exact values."""

from __future__ import annotations

from decimal import Decimal

import orjson

from sinks.search import bulk_body


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
