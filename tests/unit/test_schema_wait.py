"""Issue 20 §7: a schema version the runner cannot have yet is waited for, never a dead letter committed past."""

from __future__ import annotations

import threading
from collections.abc import Callable

import pytest

from changeflow import schemas
from changeflow.sinks.runner import decode_waiting


class Clock:
    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def failing(errors: list[Exception], then: str = "decoded") -> Callable[[], str]:
    def decode() -> str:
        if errors:
            raise errors.pop(0)
        return then

    return decode


def test_an_unreadable_schema_topic_is_waited_for_with_backoff_for_as_long_as_it_takes() -> None:
    clock = Clock()
    errors: list[Exception] = [schemas.SchemaFetchError("broker down")] * 40
    assert decode_waiting(failing(errors), threading.Event(), sleep=clock.sleep, clock=lambda: clock.now) == "decoded"
    assert clock.sleeps[:4] == [0.2, 0.4, 0.8, 1.6] and max(clock.sleeps) == 10.0
    assert clock.now > 300  # far past the bound for unknown fingerprints: a broker down is never a bad record


def test_a_fingerprint_that_appears_on_the_topic_later_is_decoded() -> None:
    clock = Clock()
    errors: list[Exception] = [schemas.UnknownSchemaError("unknown schema fingerprint 00ff")] * 3
    assert decode_waiting(failing(errors), threading.Event(), sleep=clock.sleep, clock=lambda: clock.now) == "decoded"
    assert clock.sleeps == [0.2, 0.4, 0.8]


def test_a_fingerprint_still_unknown_after_the_bound_is_a_dead_letter_with_its_reason() -> None:
    clock = Clock()
    errors: list[Exception] = [schemas.UnknownSchemaError("unknown schema fingerprint 00ff")] * 1000
    with pytest.raises(schemas.UnknownSchemaError) as caught:
        decode_waiting(failing(errors), threading.Event(), wait_s=60, sleep=clock.sleep, clock=lambda: clock.now)
    assert str(caught.value) == ("unknown schema fingerprint 00ff, still after 60 s of re-reading the schema topic: "
                                 "no version of this pipeline")
    assert 60 <= clock.now < 75


def test_bytes_that_are_no_canonical_record_are_a_dead_letter_at_once() -> None:
    error = schemas.UnknownSchemaError("not Avro single-object encoding (missing C3 01 marker)")
    with pytest.raises(schemas.UnknownSchemaError, match="missing C3 01 marker"):
        decode_waiting(failing([error]), threading.Event(), sleep=lambda s: pytest.fail("no wait"))


def test_a_stop_while_waiting_leaves_the_batch_uncommitted() -> None:
    stop = threading.Event()
    stop.set()
    with pytest.raises(InterruptedError, match="stopping while waiting for a schema version"):
        decode_waiting(failing([schemas.SchemaFetchError("broker down")]), stop, sleep=lambda s: None)


def test_the_book_says_a_failed_fetch_apart_from_an_unknown_version() -> None:
    calls = {"n": 0}

    def fetch() -> list[schemas.SchemaVersion]:
        calls["n"] += 1
        if calls["n"] > 1:
            raise RuntimeError("KafkaError{code=_TRANSPORT}")
        return []

    book = schemas.SchemaBook(fetch=fetch)
    with pytest.raises(schemas.SchemaFetchError, match="the schema topic could not be read: KafkaError"):
        book.lookup(b"\x00" * 8)
