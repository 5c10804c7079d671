"""NUMERIC in every decimal.handling.mode ends as the exact Decimal the canonical schema declares."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest

from changeflow import schemas
from changeflow.pipelines.load import load
from changeflow.pipelines.spec import build
from changeflow.pipelines.transform import compile_pipeline
from changeflow.streams.app import to_avro
from changeflow.streams.debezium import convert_value, decode_postgres
from changeflow.streams.records import ChangeRecord, Skip
from tests.unit.commerce import POSTGRES_ENTITIES
from tests.unit.envelopes import decimal_bytes, encoded, envelope

UUID = "0b6f2c9e-3d1a-4c55-9a7e-2f1d0c3b4a59"


def _declared_amounts() -> dict[tuple[str, str], Any]:
    """Under decimal.handling.mode string/double the Connect schema no longer says "decimal": the pipeline
    declares the column's type (as `changeflow init` writes it from the catalog)."""
    model = load().file.model_copy(deep=True)
    model.entities["payments"].columns = {"amount": "decimal(12,2)"}
    return compile_pipeline(build(model, load().path), "postgres")


DECLARED = _declared_amounts()


def payment_fields(amount_schema: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        {"type": "string", "optional": False, "name": "io.debezium.data.Uuid", "version": 1, "field": "id"},
        {"type": "string", "optional": False, "name": "io.debezium.data.Uuid", "version": 1, "field": "order_id"},
        {**amount_schema, "field": "amount"},
        {"type": "string", "optional": False, "field": "status"},
        {"type": "string", "optional": True, "field": "provider_ref"},
        {"type": "int64", "optional": False, "name": "io.debezium.time.MicroTimestamp", "version": 1,
         "field": "created_at"},
    ]


MODES = {
    "precise": ({"type": "bytes", "name": "org.apache.kafka.connect.data.Decimal", "version": 1,
                 "parameters": {"scale": "2", "connect.decimal.precision": "12"}}, decimal_bytes(-123456)),
    "string": ({"type": "string", "optional": False}, "-1234.56"),
    "double": ({"type": "double", "optional": False}, -1234.56),
}


@pytest.mark.parametrize("mode", sorted(MODES))
def test_amount_is_exact_through_the_canonical_topic(mode: str) -> None:
    schema, raw = MODES[mode]
    row = {"id": UUID, "order_id": UUID, "amount": raw, "status": "captured", "provider_ref": None,
           "created_at": 1_700_000_000_000_000}
    result = decode_postgres(encoded(envelope("c", None, row, table="payments", fields=payment_fields(schema))),
                             topic="commerce.public.payments", partition=0, offset=1, entities=DECLARED)
    assert isinstance(result, ChangeRecord)
    book = schemas.SchemaBook()
    _, decoded = schemas.decode(to_avro(book, result), book.lookup)
    assert decoded["after"]["amount"] == Decimal("-1234.56")
    assert str(decoded["after"]["amount"]) == "-1234.56"


def test_an_amount_that_is_not_a_number_fails_validation_with_a_clear_reason() -> None:
    row = {"id": UUID, "order_id": UUID, "amount": "twelve", "status": "captured", "provider_ref": None,
           "created_at": 1_700_000_000_000_000}
    result = decode_postgres(encoded(envelope("c", None, row, table="payments",
                                              fields=payment_fields(MODES["string"][0]))),
                             topic="t", partition=0, offset=1, entities=DECLARED)
    assert isinstance(result, ChangeRecord)
    with pytest.raises(ValueError, match=r"payments.amount: 'twelve' is not a decimal number"):
        to_avro(schemas.SchemaBook(), result)


def test_text_arrays_and_enums_pass_as_python_values() -> None:
    assert convert_value(["a", "b"], {"type": "array", "items": {"type": "string"}}) == ["a", "b"]
    assert convert_value("shipped", {"type": "string", "name": "io.debezium.data.Enum",
                                     "parameters": {"allowed": "pending,shipped"}}) == "shipped"


def test_transaction_metadata_is_skipped() -> None:
    message = {"schema": {}, "payload": {"status": "BEGIN", "id": "571:53195829", "event_count": None,
                                         "data_collections": None, "ts_ms": 1_700_000_000_000}}
    assert decode_postgres(encoded(message), topic="commerce.transaction", partition=0, offset=0,
                           entities=POSTGRES_ENTITIES) == Skip("transaction metadata")


@pytest.mark.parametrize("text,scale", [("12345678901234567890.000000000001", 12),
                                        ("-0.000000000000000000000000000000001", 33),
                                        ("98765432109876543210987654321098765432", 0)])
def test_precise_decimals_keep_every_digit_beyond_28(text: str, scale: int) -> None:
    """Decimal arithmetic rounds to 28 digits by default; decoding and the Avro round trip must not."""
    import base64
    import json

    from changeflow import schemas
    from changeflow.pipelines.types import parse_type
    from changeflow.schemas.json import dumps
    from changeflow.streams.debezium import _decimal_from_bytes

    value = Decimal(text)
    unscaled = int(value.scaleb(scale, context=schemas.EXACT_CONTEXT))
    raw = base64.b64encode(unscaled.to_bytes(20, "big", signed=True)).decode()
    assert format(_decimal_from_bytes(raw, scale), "f") == text
    assert json.loads(dumps(_decimal_from_bytes(raw, scale))) == text
    for t in ("decimal", f"decimal(38,{min(scale, 38)})") if scale <= 38 else ("decimal",):
        sv = schemas.make_version("n", 1, {"id": parse_type("int64"), "v": parse_type(t)}, ["id"])
        record = {"source": "postgres", "entity": "n", "key": "1", "op": "c", "version": 1, "ts_ms": 0,
                  "before": None, "after": {"id": 1, "v": value}, "present": None}
        _, back = schemas.decode(schemas.encode(sv, record), {sv.fingerprint: sv}.get)
        assert format(back["after"]["v"], "f") == text
