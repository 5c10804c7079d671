"""The C codec (changeflow/schemas/_codec.c) against fastavro, the reference: the same bytes written, the same values
read, for every column type; hostile bytes raise instead of crashing, and decode falls back to fastavro."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import random
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, date, datetime, time, timedelta, timezone
from decimal import Decimal
from typing import Any

import fastavro
import pytest

from changeflow import schemas
from changeflow.pipelines.types import parse_type
from changeflow.schemas import MAGIC, SchemaVersion, _codec, make_version

COLUMNS = {
    "id": "int64", "small": "int16", "n": "int32", "f4": "float32", "f8": "float64", "ok": "bool",
    "name": "string", "uid": "uuid", "mood": "enum", "doc": "json", "blob": "bytes", "day": "date",
    "at": "time", "attz": "timetz", "ts": "timestamp", "tstz": "timestamptz", "span": "interval",
    "price": "decimal(12,2)", "wide": "decimal(38,10)", "whole": "decimal(5,0)", "free": "decimal",
    "tags": "array<string>", "nums": "array<int32>", "amounts": "array<decimal(10,3)>", "days": "array<date>",
    'od"d \\name': "string",
}


@pytest.fixture(scope="module")
def version() -> SchemaVersion:
    return make_version("every_type", 1, {n: parse_type(t) for n, t in COLUMNS.items()}, ("id",))


def test_the_extension_is_built_and_takes_this_releases_record() -> None:
    assert _codec is not None, "changeflow.schemas._codec is not built: run `make bootstrap` (pip install -e .)"
    sv = make_version("every_type", 1, {n: parse_type(t) for n, t in COLUMNS.items()}, ("id",))
    assert schemas._plan(sv).native is not None


@contextmanager
def fastavro_only(sv: SchemaVersion) -> Iterator[None]:
    plan = schemas._plan(sv)
    schemas._PLANS[id(sv)] = (sv, dataclasses.replace(plan, native=None))
    try:
        yield
    finally:
        schemas._PLANS[id(sv)] = (sv, plan)


def random_row(rng: random.Random) -> dict[str, Any]:
    def maybe(value: Any) -> Any:
        return None if rng.random() < 0.15 else value

    big = rng.choice([0, 1, -1, 2**31 - 1, -(2**31), 2**63 - 1, -(2**63), rng.randint(-(2**62), 2**62)])
    stamp = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=rng.randint(-(2**55), 2**55))
    return {
        "id": big, "small": maybe(rng.randint(-32768, 32767)), "n": maybe(rng.randint(-(2**31), 2**31 - 1)),
        "f4": maybe(rng.choice([0.0, -1.5, 3.4e38, 1e-45, rng.uniform(-1e6, 1e6)])),
        "f8": maybe(rng.choice([0.0, -0.0, 1.7976931348623157e308, 5e-324, rng.uniform(-1e300, 1e300)])),
        "ok": maybe(rng.random() < 0.5),
        "name": maybe(rng.choice(["", "plain", "é ü 中文 🙂", "quote \" back \\ nul \x00", "x" * 3000])),
        "uid": maybe("0b9c6f2e-35a4-4d4b-9f7e-3c1a2b4d5e6f"), "mood": maybe("happy"),
        "doc": maybe({"a": [1, 2.5, None, "s"], "deep": {"n": 12345678901234567890123}}),
        "blob": maybe(bytes(rng.randrange(256) for _ in range(rng.randrange(0, 40)))),
        "day": maybe(date(1, 1, 1) + timedelta(days=rng.randint(0, 3652058))),
        "at": maybe(time(rng.randrange(24), rng.randrange(60), rng.randrange(60), rng.randrange(1_000_000))),
        "attz": maybe("10:11:12.000013+02:00"),
        "ts": maybe(stamp), "tstz": maybe(stamp.astimezone(timezone(timedelta(hours=-7, minutes=-30)))),
        "span": maybe(rng.randint(-(2**50), 2**50)),
        "price": maybe(Decimal(rng.randint(-(10**10), 10**10)).scaleb(-2)),
        "wide": maybe(Decimal(rng.randint(-(10**38) + 1, 10**38 - 1)).scaleb(-10)),
        "whole": maybe(Decimal(rng.randint(-99999, 99999))),
        "free": maybe(Decimal("-0.000000000000000000000000000000000012345678901234567890")),
        "tags": maybe([rng.choice(["a", "", None, "ü"]) for _ in range(rng.randrange(0, 5))]),
        "nums": maybe([rng.choice([0, -1, 2**31 - 1, None]) for _ in range(rng.randrange(0, 5))]),
        "amounts": maybe([Decimal("1.250"), None, Decimal("-9999999.999")][: rng.randrange(0, 4)]),
        "days": maybe([date(2026, 12, 2), None, date(1969, 12, 31)][: rng.randrange(0, 4)]),
        'od"d \\name': maybe("odd"),
    }


def records(sv: SchemaVersion, n: int = 400) -> list[dict[str, Any]]:
    rng = random.Random(12)
    out = []
    for i in range(n):
        op = rng.choice("curd")
        before = random_row(rng) if op in "ud" else None
        after = None if op == "d" else random_row(rng)
        if after is not None and rng.random() < 0.2:
            after = {k: v for k, v in after.items() if rng.random() < 0.7}  # a partial row
        out.append({
            "source": "postgres", "entity": sv.entity, "key": f"k{i}", "op": op, "version": rng.randint(0, 2**63 - 1),
            "ts_ms": rng.randint(-(2**40), 2**41), "before": before, "after": after,
            "present": sorted(after) if after is not None and rng.random() < 0.2 else None,
            "carried": rng.choice([None, [], ["id", "name"]]),
        })
    return out


def test_the_same_bytes_as_fastavro_for_every_type(version: SchemaVersion) -> None:
    native = schemas._plan(version).native
    for record in records(version):
        wire = {**record, "before": schemas._row_out(record["before"], version),
                "after": schemas._row_out(record["after"], version)}
        direct = _codec.encode(MAGIC + version.fingerprint, wire, native)  # the C path itself, no fallback
        with fastavro_only(version):
            reference = schemas.encode(version, record)
        assert direct == reference, record
        assert schemas.encode(version, record) == reference


def test_the_same_values_as_fastavro_for_every_type(version: SchemaVersion) -> None:
    lookup = {version.fingerprint: version}.get
    native = schemas._plan(version).native
    for record in records(version):
        data = schemas.encode(version, record)
        _codec.decode(data, 10, native)  # the C path itself decodes it (raises otherwise)
        _, fast = schemas.decode(data, lookup)
        with fastavro_only(version):
            _, reference = schemas.decode(data, lookup)
        assert fast == reference
        # equal is not enough for decimals and datetimes: the exponent and the zone must be the same too
        assert repr(fast) == repr(reference)


def test_a_value_the_c_codec_does_not_take_gets_fastavros_answer(version: SchemaVersion) -> None:
    base = records(version, 1)[0]
    for column, value in [("n", 2**31), ("id", 2**64), ("price", Decimal("1.234")), ("ok", 1), ("day", "2026-12-02"),
                          ("f8", "1.5"), ("ts", datetime(2026, 1, 1))]:
        record = {**base, "op": "c", "after": {"id": 1, column: value}}
        with fastavro_only(version):
            try:
                reference: Any = schemas.encode(version, record)
            except Exception as exc:
                reference = (type(exc), str(exc))
        try:
            fast: Any = schemas.encode(version, record)
        except Exception as exc:
            fast = (type(exc), str(exc))
        assert fast == reference, column


def test_hostile_bytes_raise_and_decode_falls_back_to_fastavro(version: SchemaVersion) -> None:
    lookup = {version.fingerprint: version}.get
    native = schemas._plan(version).native
    rng = random.Random(5)
    for record in records(version, 60):
        data = schemas.encode(version, record)
        cuts = sorted({rng.randrange(10, len(data)) for _ in range(8)})
        flips = []
        for _ in range(8):
            mangled = bytearray(data)
            for _ in range(rng.randrange(1, 4)):
                mangled[rng.randrange(10, len(data))] = rng.randrange(256)
            flips.append(bytes(mangled))
        for bad in [data[:cut] for cut in cuts] + flips + [data + b"\x00", data[:10] + b"\xff" * 11]:
            with contextlib.suppress(ValueError, OverflowError, TypeError):  # UnicodeDecodeError is a ValueError
                _codec.decode(bad, 10, native)  # may decode (a flip can be valid Avro); must never crash
            with fastavro_only(version):
                try:
                    reference: Any = schemas.decode(bad, lookup)[1]
                except Exception as exc:
                    reference = type(exc)
            try:
                fast: Any = schemas.decode(bad, lookup)[1]
            except Exception as exc:
                fast = type(exc)
            if not isinstance(reference, type) and not isinstance(fast, type):
                assert repr(fast) == repr(reference)
            else:
                assert fast == reference, bad.hex()


def test_a_version_of_an_earlier_record_shape_is_read_by_fastavro() -> None:
    """A version published by an earlier release (here without `carried`) has no C plan."""
    sv = make_version("old", 1, {"id": parse_type("int64")}, ("id",))
    raw = {**sv.raw, "fields": [f for f in sv.raw["fields"] if f["name"] != "carried"]}
    parsed = fastavro.parse_schema(raw)
    fp = bytes.fromhex(fastavro.schema.fingerprint(fastavro.schema.to_parsing_canonical_form(parsed), "CRC-64-AVRO"))
    old = SchemaVersion("old", 1, sv.columns, ("id",), raw, parsed, fp)
    assert schemas._plan(old).native is None
    body = io.BytesIO()
    fastavro.schemaless_writer(body, parsed, {"source": "postgres", "entity": "old", "key": "1", "op": "c",
                                              "version": 3, "ts_ms": 4, "before": None, "after": {"c0": 1},
                                              "present": None})
    _, record = schemas.decode(MAGIC + fp + body.getvalue(), {fp: old}.get)
    assert record["after"] == {"id": 1} and record["version"] == 3
