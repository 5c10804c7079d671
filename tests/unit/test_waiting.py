"""The one wait helper (#19 §8): the first truthy value, the check's own error at once, a "not yet" error
retried, and on timeout an error naming what was waited for."""

from __future__ import annotations

import pytest

from changeflow.waiting import WaitTimeout, wait_until


def test_returns_the_first_truthy_value_and_polls_at_the_interval() -> None:
    answers, slept = iter([None, 0, "", {"state": "RUNNING"}, "never read"]), []
    assert wait_until(lambda: next(answers), 10, what="x", interval=0.25, sleep=slept.append) == {"state": "RUNNING"}
    assert slept == [0.25, 0.25, 0.25]


def test_the_checks_own_error_stops_the_wait_at_once() -> None:
    calls = []

    def check() -> bool:
        calls.append(1)
        raise RuntimeError("connector shop FAILED")

    with pytest.raises(RuntimeError, match="connector shop FAILED"):
        wait_until(check, 10, what="x", sleep=lambda s: None)
    assert calls == [1]


def test_a_not_yet_error_is_retried() -> None:
    answers = iter([ConnectionRefusedError("not listening"), ConnectionRefusedError("not yet"), "Ok."])

    def check() -> str:
        answer = next(answers)
        if isinstance(answer, Exception):
            raise answer
        return answer

    assert wait_until(check, 10, what="x", retry_on=(OSError,), sleep=lambda s: None) == "Ok."


def test_the_timeout_names_what_was_waited_for() -> None:
    with pytest.raises(WaitTimeout) as raised:
        wait_until(lambda: False, 0.05, what="replication slot shop_commerce released", interval=0.01)
    assert str(raised.value) == "replication slot shop_commerce released: not after 0.05s"
    assert isinstance(raised.value, TimeoutError)


def test_the_callers_own_error_gets_the_last_value() -> None:
    lag = iter(range(1000, 0, -1))
    with pytest.raises(LookupError) as raised:
        wait_until(lambda: next(lag) == 0, 0.05, what="x", interval=0.01,
                   error=lambda last: LookupError(f"sink not drained; last check {last}"))
    assert str(raised.value) == "sink not drained; last check False"


def test_a_not_yet_error_at_the_timeout_is_a_timeout_too() -> None:
    def check() -> bool:
        raise ConnectionRefusedError("not listening")

    with pytest.raises(WaitTimeout, match=r"^server on port 1 answering: not after 0\.05s$"):
        wait_until(check, 0.05, what="server on port 1 answering", interval=0.01, retry_on=(OSError,))
