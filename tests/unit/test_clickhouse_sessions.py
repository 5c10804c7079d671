"""The local ClickHouse server's session table (#20 §11): bounded, least recently used idle session evicted.

clickhouse-connect's own suite, run with two workers, opened more than 256 sessions within a session's 60 s
lifetime and was refused (202) 76 times. A full table now makes room by evicting the idle session used
longest ago; a session a request holds is never evicted, and the table never grows past its bound.
"""

from __future__ import annotations

import threading
import time

import pytest

from changeflow.deploy.clickhouse_server.errors import ClickHouseError
from changeflow.deploy.clickhouse_server.sessions import Sessions


class Closed(list[object]):
    def __call__(self, conn: object) -> None:
        self.append(conn)


def used(sessions: Sessions, session_id: str, conn: object | None = None) -> None:
    """One request in the session: acquired, given a connection the first time, released."""
    session = sessions.acquire(session_id, 60, check=False)
    if session.conn is None:
        session.conn = conn or f"conn-{session_id}"  # type: ignore[assignment]
    Sessions.release(session)
    time.sleep(0.002)  # distinct last-used times


def test_a_full_table_evicts_the_least_recently_used_idle_session() -> None:
    closed = Closed()
    sessions = Sessions(on_expire=closed, max_sessions=3)
    for name in ("a", "b", "c"):
        used(sessions, name)
    used(sessions, "a")  # a is now the most recent: b is the least recently used
    used(sessions, "d")
    assert closed == ["conn-b"]  # its engine connection is closed with it
    assert len(sessions) == 3
    with pytest.raises(ClickHouseError) as info:
        sessions.acquire("b", 60, check=True)  # gone: session_check finds no such session
    assert (info.value.code, info.value.name) == (372, "SESSION_NOT_FOUND")
    used(sessions, "e")
    assert closed == ["conn-b", "conn-c"]
    for name in ("a", "d", "e"):
        Sessions.release(sessions.acquire(name, 60, check=True))  # the survivors keep their state


def test_a_session_in_use_is_never_evicted() -> None:
    closed = Closed()
    sessions = Sessions(on_expire=closed, max_sessions=2)
    used(sessions, "old")
    held = sessions.acquire("busy", 60, check=False)  # a request is running in it
    held.conn = "conn-busy"  # type: ignore[assignment]
    time.sleep(0.002)
    used(sessions, "new")  # evicts "old", the only idle one
    assert closed == ["conn-old"]
    Sessions.release(sessions.acquire("new", 60, check=True))
    # Make "busy" the least recently used of all, still held: the next new session takes "new" instead.
    held.last_used = 0.0
    used(sessions, "newer")
    assert closed == ["conn-old", "conn-new"]
    assert len(sessions) == 2
    # Every session held: a new one is refused, nothing is evicted, the table stays at its bound.
    other = sessions.acquire("newer", 60, check=True)
    with pytest.raises(ClickHouseError) as info:
        sessions.acquire("one-too-many", 60, check=False)
    assert (info.value.code, info.value.name) == (202, "TOO_MANY_SIMULTANEOUS_QUERIES")
    assert closed == ["conn-old", "conn-new"] and len(sessions) == 2
    Sessions.release(other)
    Sessions.release(held)
    assert held.conn == "conn-busy"


def test_concurrent_new_sessions_stay_within_the_bound() -> None:
    closed = Closed()
    sessions = Sessions(on_expire=closed, max_sessions=8)
    errors: list[BaseException] = []

    def client(n: int) -> None:
        try:
            for i in range(50):
                used(sessions, f"{n}-{i}")
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert errors == []
    assert len(sessions) == 8
    assert len(closed) == 4 * 50 - 8  # every evicted session's connection was closed, once
