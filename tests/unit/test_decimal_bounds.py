"""Issue 20 §10: a decimal is bounded by its precision before any conversion, and never rounded on encode."""

from __future__ import annotations

import base64
import time
from decimal import Decimal

import pytest

from changeflow import schemas
from changeflow.pipelines.types import parse_type
from changeflow.schemas import make_version
from changeflow.streams.debezium import DecodeError, convert_value, decimal_bytes_bound

DECIMAL_12_2 = {"name": "org.apache.kafka.connect.data.Decimal", "type": "bytes",
                "parameters": {"scale": "2", "connect.decimal.precision": "12"}}


def b64(unscaled: int) -> str:
    return base64.b64encode(unscaled.to_bytes((unscaled.bit_length() + 8) // 8, "big", signed=True)).decode()


@pytest.mark.parametrize("precision", range(1, 80))
def test_the_byte_bound_holds_every_value_of_the_precision(precision: int) -> None:
    largest = 10**precision - 1
    assert (largest.bit_length() + 8) // 8 <= decimal_bytes_bound(precision)
    assert convert_value(b64(-largest), {**DECIMAL_12_2, "parameters": {
        "scale": "0", "connect.decimal.precision": str(precision)}}) == -largest


def test_an_oversized_decimal_is_a_dead_letter_in_microseconds() -> None:
    for size in (64, 4_000, 140_000):
        raw = base64.b64encode(b"\x01" * size).decode()
        started = time.perf_counter()
        with pytest.raises(DecodeError, match=r"longer than"):
            convert_value(raw, DECIMAL_12_2)
        assert time.perf_counter() - started < 0.05
    with pytest.raises(DecodeError, match=r"more digits than decimal\(12,2\)"):
        convert_value(b64(10**14), DECIMAL_12_2)  # within the byte bound, past the digits
    assert convert_value(b64(999_999_999_999), DECIMAL_12_2) == Decimal("9999999999.99")


@pytest.mark.parametrize(("value", "message"), [
    ("19.999", "products.price: 19.999 has more than 2 digits after the point; decimal(12,2) would round it"),
    ("10000000000.00", "products.price: 10000000000.00 does not fit decimal(12,2)"),
    ("NaN", "products.price: NaN is not a number decimal(12,2) can hold"),
    ("1E+963293", "products.price: 1E+963293 does not fit decimal(12,2)"),
])
def test_a_value_the_column_cannot_hold_exactly_is_refused_naming_the_column(value: str, message: str) -> None:
    sv = make_version("products", 1, {"id": parse_type("int64"), "price": parse_type("decimal(12,2)")}, ("id",))
    record = {"source": "postgres", "entity": "products", "key": "1", "op": "c", "version": 1, "ts_ms": 0,
              "before": None, "after": {"id": 1, "price": Decimal(value)}, "present": None, "carried": None}
    with pytest.raises(ValueError) as caught:
        schemas.encode(sv, record)
    assert str(caught.value) == message


@pytest.mark.parametrize(("value", "stored"), [("19.99", "19.99"), ("19.990", "19.99"), ("-0.5", "-0.50"),
                                              ("1E+2", "100.00"), ("9999999999.99", "9999999999.99")])
def test_values_that_fit_are_kept_exactly(value: str, stored: str) -> None:
    sv = make_version("products", 1, {"id": parse_type("int64"), "price": parse_type("decimal(12,2)")}, ("id",))
    record = {"source": "postgres", "entity": "products", "key": "1", "op": "c", "version": 1, "ts_ms": 0,
              "before": None, "after": {"id": 1, "price": Decimal(value)}, "present": None, "carried": None}
    _, decoded = schemas.decode(schemas.encode(sv, record), {sv.fingerprint: sv}.get)
    assert str(decoded["after"]["price"]) == stored
