"""Sessions (``session_id``): a database, settings and an engine connection kept between requests."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from changeflow.deploy.clickhouse_server.errors import ch_error

if TYPE_CHECKING:
    from changeflow.deploy.clickhouse_server.engine import Conn

# -- sessions ---------------------------------------------------------------------------------------


@dataclass
class Session:
    database: str | None = None
    settings: dict[str, str] = field(default_factory=dict)
    timeout: float = 60.0
    last_used: float = field(default_factory=time.monotonic)
    lock: threading.Lock = field(default_factory=threading.Lock)
    conn: Conn | None = None  # its own engine connection: temporary tables are the session's


class Sessions:
    """``session_id`` state: the database chosen by USE, settings chosen by SET, and an engine connection
    of its own, whose temporary tables live as long as the session (closed when it expires)."""

    def __init__(self, on_expire: Any = None, max_sessions: int = 256) -> None:
        self._lock = threading.Lock()
        self._items: dict[str, Session] = {}
        self._on_expire = on_expire  # (Conn) -> None
        self.max_sessions = max_sessions

    def acquire(self, session_id: str, timeout: float, check: bool) -> Session:
        now = time.monotonic()
        expired: list[Session] = []
        with self._lock:
            for key in [k for k, s in self._items.items() if now - s.last_used > s.timeout]:
                if not self._items[key].lock.locked():
                    expired.append(self._items.pop(key))
            session = self._items.get(session_id)
            if session is None:
                if check:
                    raise ch_error(372, "SESSION_NOT_FOUND", f"Session {session_id} not found")
                if len(self._items) >= self.max_sessions:
                    raise ch_error(202, "TOO_MANY_SIMULTANEOUS_QUERIES", f"Too many sessions ({self.max_sessions})")
                session = self._items[session_id] = Session(timeout=timeout)
            session.timeout, session.last_used = timeout, now
        for old in expired:
            if old.conn is not None and self._on_expire is not None:
                self._on_expire(old.conn)
        if not session.lock.acquire(blocking=False):
            raise ch_error(373, "SESSION_IS_LOCKED", f"Session {session_id} is locked by a concurrent client")
        return session

    @staticmethod
    def release(session: Session) -> None:
        session.last_used = time.monotonic()
        session.lock.release()
