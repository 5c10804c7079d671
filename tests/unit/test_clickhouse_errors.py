"""Which ClickHouse server errors hold the stream (retry) and which stop the worker (the batch is at fault)."""

from __future__ import annotations

import pytest
from clickhouse_connect.driver.exceptions import DatabaseError

from changeflow.sinks.clickhouse import is_retriable


def server_error(code: int, name: str, text: str) -> DatabaseError:
    # The shape clickhouse-connect gives a server's error response (copied from a real one).
    return DatabaseError(
        f"Received ClickHouse exception, code: {code}, server response: Code: {code}. DB::Exception: {text}. "
        f"({name}) (version 26.9.2.1) (for url http://127.0.0.1:8123)"
    )


@pytest.mark.parametrize(("code", "name", "text"), [
    (210, "NETWORK_ERROR", "Server is shutting down"),
    (252, "TOO_MANY_PARTS", "Too many parts (3001). Merges are processing significantly slower than inserts"),
    (159, "TIMEOUT_EXCEEDED", "Timeout exceeded: elapsed 30.0 seconds"),
    (241, "MEMORY_LIMIT_EXCEEDED", "Memory limit (total) exceeded"),
    (242, "TABLE_IS_READ_ONLY", "Table is in readonly mode"),
])
def test_a_store_that_is_busy_or_going_away_is_retried(code: int, name: str, text: str) -> None:
    assert is_retriable(server_error(code, name, text))


@pytest.mark.parametrize(("code", "name", "text"), [
    (16, "NO_SUCH_COLUMN_IN_TABLE", "No such column colour in table changeflow.products"),
    (53, "TYPE_MISMATCH", "Type mismatch in VALUES section"),
    (60, "UNKNOWN_TABLE", "Table changeflow.products does not exist"),
])
def test_a_batch_the_store_can_never_take_is_fatal(code: int, name: str, text: str) -> None:
    assert not is_retriable(server_error(code, name, text))


def test_an_error_without_a_server_code_is_not_retried_blindly() -> None:
    assert not is_retriable(DatabaseError("something unexpected"))
