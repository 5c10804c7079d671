"""The Debezium envelope is checked once for every source (#19 §4, ``streams.envelope``): the same message gets
the same verdict from the PostgreSQL and the MongoDB decoder."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from changeflow.streams.debezium import SPECIAL_OPS, decode_postgres
from changeflow.streams.envelope import NOT_A_CHANGE, Envelope, is_heartbeat_key, open_envelope
from changeflow.streams.mongodb import decode_mongodb
from changeflow.streams.records import DeadLetter, Skip

SOURCE = {"table": "t", "collection": "c", "db": "d", "lsn": 1}
HEARTBEAT_KEY = b'{"serverName": "shop"}'


@pytest.mark.parametrize(("message", "key", "verdict"), [
    ([1, 2], None, "not a JSON object"),
    ("text", None, "not a JSON object"),
    ({"schema": {}, "payload": [1]}, None, "payload is not an object"),
    ({"schema": "x", "payload": {"op": "c", "source": SOURCE}}, None, "schema is not an object"),
    ({"status": "BEGIN", "id": "571:53195829"}, None, Skip("transaction metadata")),
    ({"status": "END", "op": "c", "source": SOURCE}, None, Envelope({"status": "END", "op": "c", "source": SOURCE},
                                                                     "c", SOURCE, {})),
    ({"schema": {"name": "io.debezium.connector.common.Heartbeat"}, "payload": {"ts_ms": 1}}, None, Skip("heartbeat")),
    ({"ts_ms": 1}, HEARTBEAT_KEY, Skip("heartbeat")),  # schemas.enable=false: the key names a heartbeat
    ({"ts_ms": 1}, b'{"schema": {}, "payload": {"serverName": "shop"}}', Skip("heartbeat")),
    ({"ts_ms": 1}, b'{"id": 7}', NOT_A_CHANGE),
    ({"ts_ms": 1}, b"not json", NOT_A_CHANGE),
    ({"ts_ms": 1}, None, NOT_A_CHANGE),
    ({"schema": {}, "payload": {"ts_ms": 1}}, HEARTBEAT_KEY, NOT_A_CHANGE),  # with schemas, a heartbeat says so
    ({"op": "z", "source": SOURCE}, None, "unknown op 'z'"),
    ({"op": ["c"], "source": SOURCE}, None, "unknown op ['c']"),
    ({"source": SOURCE}, None, "unknown op None"),
    ({"op": "c"}, None, "source block missing"),
    ({"op": "c", "source": "t"}, None, "source block missing"),
    ({"schema": {"name": "x"}, "payload": {"op": "u", "source": SOURCE, "after": {"id": 1}}}, None,
     Envelope({"op": "u", "source": SOURCE, "after": {"id": 1}}, "u", SOURCE, {"name": "x"})),
])
def test_one_verdict_per_message(message: Any, key: bytes | None, verdict: Any) -> None:
    assert open_envelope(message, key) == verdict


def test_a_sources_own_ops_are_its_to_judge() -> None:
    assert open_envelope({"op": "m", "source": SOURCE}, None, SPECIAL_OPS) == Skip("logical decoding message")
    assert open_envelope({"op": "t", "source": SOURCE}, None, SPECIAL_OPS) == "truncate is not supported"
    assert open_envelope({"op": "t", "source": SOURCE}, None) == "unknown op 't'"


def test_is_heartbeat_key_only_for_the_server_name_alone() -> None:
    assert is_heartbeat_key(HEARTBEAT_KEY)
    assert not is_heartbeat_key(b'{"serverName": "shop", "id": 1}')
    assert not is_heartbeat_key(b'["serverName"]')
    assert not is_heartbeat_key(None)


def _verdict(result: Any) -> Any:
    return result.reason if isinstance(result, DeadLetter) else result


@pytest.mark.parametrize(("message", "key"), [
    ({"status": "BEGIN", "id": "1"}, None),
    ({"schema": {"name": "shop.Heartbeat"}, "payload": {"ts_ms": 1}}, None),
    ({"ts_ms": 1}, HEARTBEAT_KEY),
    ({"ts_ms": 1}, None),
    ({"schema": "x", "payload": {}}, None),
    ({"schema": {}, "payload": 3}, None),
    ({"op": "z", "source": SOURCE}, None),
    ({"op": "c"}, None),
    ([], None),
])
def test_both_decoders_give_the_same_verdict_on_the_envelope(message: Any, key: bytes | None) -> None:
    raw = orjson.dumps(message)
    pg = decode_postgres(raw, topic="t", partition=0, offset=1, raw_key=key)
    mongo = decode_mongodb(raw, topic="t", partition=0, offset=1, raw_key=key)
    assert _verdict(pg) == _verdict(mongo) == _verdict(open_envelope(message, key))
