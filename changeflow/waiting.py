"""One way to wait: call a check until it says yes or the time is up (tenacity), for every poll loop.

``wait_until(check, timeout, what=...)`` calls ``check()`` every ``interval`` seconds until it returns a truthy
value, and returns that value. A check may raise to stop the wait at once (a service that exited, a connector
that FAILED): its error propagates. An error listed in ``retry_on`` is a "not yet" (a server not listening).
When ``timeout`` seconds have passed, :class:`WaitTimeout` is raised naming what was waited for, or the
caller's own error (``error(last value)``), so every message still says what did not happen.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar, cast

from tenacity import RetryError, Retrying, retry_if_exception_type, retry_if_result, stop_after_delay, wait_fixed

T = TypeVar("T")


class WaitTimeout(TimeoutError):
    """What was waited for did not happen in time."""

    def __init__(self, what: str, timeout: float) -> None:
        self.what, self.timeout = what, timeout
        super().__init__(f"{what}: not after {timeout:g}s")


def wait_until(check: Callable[[], T | None], timeout: float, *, what: str, interval: float = 0.5,
               retry_on: tuple[type[BaseException], ...] = (),
               error: Callable[[T | None], BaseException] | None = None,
               sleep: Callable[[float], None] = time.sleep) -> T:
    """``check()``'s first truthy value, polled every ``interval`` s for up to ``timeout`` s (module docstring)."""
    last: list[T | None] = [None]

    def attempt() -> T | None:
        last[0] = None
        value = check()
        last[0] = value
        return value

    retrying = Retrying(stop=stop_after_delay(timeout), wait=wait_fixed(interval), sleep=sleep,
                        retry=retry_if_result(lambda value: not value) | retry_if_exception_type(retry_on))
    try:
        return cast(T, retrying(attempt))  # a falsy value is retried, so what returns is the check's yes
    except RetryError:
        raise (error(last[0]) if error is not None else WaitTimeout(what, timeout)) from None
