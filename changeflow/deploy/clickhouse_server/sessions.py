"""Sessions (``session_id``): a database, settings and an engine connection kept between requests."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from changeflow.deploy.clickhouse_server.errors import ch_error

# The engine's connection (engine.Conn): a type parameter, so this module needs nothing from the engine's.
C = TypeVar("C")

# -- sessions ---------------------------------------------------------------------------------------


@dataclass
class Session(Generic[C]):
    database: str | None = None
    settings: dict[str, str] = field(default_factory=dict)
    timeout: float = 60.0
    last_used: float = field(default_factory=time.monotonic)
    lock: threading.Lock = field(default_factory=threading.Lock)
    conn: C | None = None  # its own engine connection: temporary tables are the session's


class Sessions(Generic[C]):
    """``session_id`` state: the database chosen by USE, settings chosen by SET, and an engine connection
    of its own, whose temporary tables live as long as the session (closed when it expires).

    At most ``max_sessions`` are kept (memory stays bounded). When the table is full, a new session evicts the
    least recently used idle one, as a client that stopped using its session would have let it expire; a
    session in use (its lock held by a request) is never evicted, and only when every session is in use is a
    new one refused (202). A session is marked in use under the table's lock, so eviction cannot race it.
    """

    def __init__(self, on_expire: Callable[[C], None] | None = None, max_sessions: int = 256) -> None:
        self._lock = threading.Lock()
        self._items: dict[str, Session[C]] = {}
        self._on_expire = on_expire
        self.max_sessions = max(1, max_sessions)

    def __len__(self) -> int:
        return len(self._items)

    def acquire(self, session_id: str, timeout: float, check: bool) -> Session[C]:
        now = time.monotonic()
        gone: list[Session[C]] = []
        try:
            with self._lock:
                for key in [k for k, s in self._items.items() if now - s.last_used > s.timeout]:
                    if not self._items[key].lock.locked():
                        gone.append(self._items.pop(key))
                session = self._items.get(session_id)
                if session is None:
                    if check:
                        raise ch_error(372, "SESSION_NOT_FOUND", f"Session {session_id} not found")
                    if len(self._items) >= self.max_sessions:
                        gone.append(self._evict_idle())
                    session = self._items[session_id] = Session(timeout=timeout)
                if not session.lock.acquire(blocking=False):
                    raise ch_error(373, "SESSION_IS_LOCKED", f"Session {session_id} is locked by a concurrent client")
                session.timeout, session.last_used = timeout, now
        finally:
            for old in gone:  # outside the table's lock: closing a connection may take a moment
                if old.conn is not None and self._on_expire is not None:
                    self._on_expire(old.conn)
        return session

    def _evict_idle(self) -> Session[C]:
        """The least recently used session that no request holds (the table's lock is held)."""
        idle = [(s.last_used, key) for key, s in self._items.items() if not s.lock.locked()]
        if not idle:
            raise ch_error(202, "TOO_MANY_SIMULTANEOUS_QUERIES", f"Too many sessions in use ({self.max_sessions})")
        return self._items.pop(min(idle)[1])

    @staticmethod
    def release(session: Session) -> None:
        session.last_used = time.monotonic()
        session.lock.release()
