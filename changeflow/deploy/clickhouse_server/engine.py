"""The chdb engine over one data directory, served through a pool of its connections."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from changeflow.deploy.clickhouse_server.errors import ClickHouseError, ch_error
from changeflow.deploy.clickhouse_server.guard import (
    ALLOWED_ENGINES,
    ALLOWED_TABLE_FUNCTIONS,
    DENIED_FUNCTIONS,
    MAX_QUERY_SIZE,
    query_too_large,
)
from changeflow.deploy.clickhouse_server.lexer import _IDENT_RE, _is, _word, quote_identifier, quote_literal, tokens

if TYPE_CHECKING:
    from changeflow.deploy.clickhouse_server.sessions import Session

# The engine takes its time zone from the process; the warehouse keeps UTC whatever the host says.
os.environ["TZ"] = "UTC"
with contextlib.suppress(AttributeError):
    time.tzset()


@dataclass
class ExternalTable:
    """One uploaded file of a multipart request, queried as a temporary table named like its form field."""

    name: str
    structure: str
    fmt: str
    data: bytes


# -- the engine --------------------------------------------------------------------------------------


# Output formats whose per-block outputs concatenate into one valid result (no document prefix/suffix,
# no header per block), so a result can leave block by block. Any other format is built whole first:
# chdb's streaming gives every block its own JSON document, Parquet file or header line.
STREAMABLE_FORMATS = frozenset(
    {
        "native", "rowbinary", "tabseparated", "tsv", "tabseparatedraw", "tsvraw", "csv", "jsoneachrow",
        "jsonlines", "ndjson", "jsoncompacteachrow", "jsonstringseachrow", "jsoncompactstringseachrow",
        "lineasstring", "rawblob", "msgpack",
    }
)  # fmt: skip


@dataclass
class Outcome:
    data: bytes
    read_rows: int = 0
    read_bytes: int = 0
    written_rows: int = 0
    written_bytes: int = 0
    result_rows: int = 0
    result_bytes: int = 0
    elapsed_ns: int = 0
    # A streamed result: ``data`` is its first block, ``rest`` yields the others (and may raise midway).
    rest: Iterator[bytes] | None = None
    cancel: Any = None

    @classmethod
    def read(cls, res: Any, **extra: Any) -> Outcome:
        """A result of the engine's (its data, counters and time), with ``extra`` fields."""
        data = bytes(res.bytes()) if res.size() else b""
        return cls(
            data=data,
            read_rows=res.storage_rows_read(),
            read_bytes=res.storage_bytes_read(),
            result_rows=res.rows_read(),
            result_bytes=len(data),
            elapsed_ns=int(res.elapsed() * 1e9),
            **extra,
        )


# -- inserts through a spool file ----------------------------------------------------------------------

# A spool path goes into FROM INFILE, which expands globs: only characters that are never a pattern.
_SPOOL_PATH_RE = re.compile(r"^/[A-Za-z0-9_./-]+$")
_SPOOL_PREFIX = "changeflow-chdb-insert-"


class Spool:
    """Private files for INSERT data on their way into the engine (``Engine._insert``).

    One directory of this process's own (mode 0700, named with its pid) on tmpfs (``/dev/shm``) when there
    is one, else in the system's temporary directory; each insert writes a new file there (0600, O_EXCL,
    never a symlink) and removes it when the statement ends. When tmpfs is full (a container's 64 MiB
    ``/dev/shm``), the insert is spooled to the disk directory instead. Directories a killed server left
    behind are removed at start-up.
    """

    def __init__(self, bases: list[str] | None = None) -> None:

        candidates = bases if bases is not None else ["/dev/shm", tempfile.gettempdir(), "/tmp"]
        self.dirs: list[str] = []
        for base in dict.fromkeys(os.path.realpath(b) for b in candidates):
            if not os.path.isdir(base) or not os.access(base, os.W_OK | os.X_OK):
                continue
            self._sweep(base)
            try:
                made = os.path.realpath(tempfile.mkdtemp(prefix=f"{_SPOOL_PREFIX}{os.getpid()}-", dir=base))
            except OSError:
                continue
            if not _SPOOL_PATH_RE.match(made):
                os.rmdir(made)
                continue
            self.dirs.append(made)
            if len(self.dirs) == 2:  # tmpfs and a disk to fall back to are enough
                break
        if not self.dirs:
            raise RuntimeError(f"no private directory for insert data in {candidates}")

    @staticmethod
    def _sweep(base: str) -> None:
        """Spool directories of server processes that no longer run (killed before they cleaned up)."""

        with contextlib.suppress(OSError):
            for entry in os.scandir(base):
                if not entry.name.startswith(_SPOOL_PREFIX) or not entry.is_dir(follow_symlinks=False):
                    continue
                pid = entry.name[len(_SPOOL_PREFIX) :].partition("-")[0]
                if not pid.isdigit() or entry.stat(follow_symlinks=False).st_uid != os.getuid():
                    continue
                try:
                    os.kill(int(pid), 0)
                except ProcessLookupError:
                    shutil.rmtree(entry.path, ignore_errors=True)
                except OSError:
                    pass

    def write(self, data: bytes) -> str:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
        for i, directory in enumerate(self.dirs):
            path = os.path.join(directory, uuid.uuid4().hex)
            try:
                fd = os.open(path, flags, 0o600)
            except OSError:
                if i + 1 < len(self.dirs):
                    continue
                raise ch_error(1001, "STD_EXCEPTION", "Cannot create a spool file for the insert data") from None
            try:
                with os.fdopen(fd, "wb") as out:
                    out.write(data)
                return path
            except OSError as exc:
                self.remove(path)
                if i + 1 < len(self.dirs):
                    continue  # e.g. tmpfs full: the disk directory next
                raise ch_error(1001, "STD_EXCEPTION", f"Cannot spool the insert data: {exc.strerror or exc}") from None
        raise AssertionError("unreachable")  # pragma: no cover

    @staticmethod
    def remove(path: str) -> None:
        with contextlib.suppress(OSError):
            os.unlink(path)

    def close(self) -> None:

        for directory in self.dirs:
            shutil.rmtree(directory, ignore_errors=True)


def infile_statement(head: bytes, path: str, fmt: str) -> bytes:
    """``INSERT INTO t (c) [SETTINGS ...]`` -> ``INSERT INTO t (c) FROM INFILE 'path' ... [SETTINGS ...] FORMAT fmt``.

    FROM INFILE goes before a top-level ``SETTINGS a = ...`` clause, as the grammar wants it; a table named
    ``settings`` is no clause (no ``name =`` follows it). Our own statement: the client's head passed the guard.
    """
    toks = list(tokens(head))
    at = len(head)
    for i, tok in enumerate(toks[:-2]):
        clause = toks[i + 1].kind in ("word", "ident") and _is(head, toks[i + 2], b"=")
        if tok.depth == 0 and _word(head, tok) == "SETTINGS" and clause:
            at = tok.start
            break
    source = f"\nFROM INFILE {quote_literal(path)} COMPRESSION 'none'\n".encode()
    return head[:at] + source + head[at:] + f"\nFORMAT {fmt}".encode()


class Conn:
    """One chdb connection and the state (database, settings) the server last put it in."""

    def __init__(self, path: str) -> None:
        # chdb ~190-280 ms to import (perf_counter, median of 7): paid by the local server's first connection only.
        from chdb.state import sqlitelike

        self.wrapper: Any = sqlitelike.connect(path)
        self.raw: Any = self.wrapper._conn  # the engine's own binding: takes SQL as bytes, streams results
        self.applied: dict[str, str] = {}

    def text(self, sql: str | bytes) -> str:
        return bytes(self.raw.query(sql, "TabSeparated").bytes()).decode().strip()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.wrapper.close()


class Engine:
    """chdb over one data directory, served through a pool of its connections.

    chdb (4.4) opens one embedded engine per process and any number of connections to it; each connection
    has its own current database, settings and temporary tables, and statements on different connections
    run in parallel (measured: an insert during a 10 s report query takes as long as without it). So every
    request leases a connection of its own: a session's (``session_id``) own connection, kept for the
    session's life (its temporary tables die with it), or an idle one from the pool; at most
    ``max_concurrent`` statements run at once, the next ones wait for a slot. Per request, on its
    connection: ``USE`` the request's database and bring the settings to exactly the request's (setting
    what differs, resetting what the previous request changed to DEFAULT); clickhouse-connect sends the
    same few settings on every call, so in the steady state this costs one ``USE`` (~0.1 ms).
    """

    def __init__(self, data_dir: Path, max_concurrent: int = 16) -> None:
        data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(data_dir, 0o700)
        self._path = str(data_dir)
        first = Conn(self._path)
        self._lock = threading.Lock()  # the pool's lists, never held while the engine works
        self._idle: list[Conn] = [first]
        self._all: set[Conn] = {first}
        self.max_concurrent = max(1, max_concurrent)
        self._slots = threading.BoundedSemaphore(self.max_concurrent)
        self._control = Conn(self._path)  # KILL QUERY for requests whose client went away
        self._control_lock = threading.Lock()
        self.closed = False
        head = first.text("SELECT version(), timezone()").split("\t")
        self.version, self.timezone = head[0], head[1] if len(head) > 1 else "UTC"
        self.setting_names = set(first.text("SELECT name FROM system.settings").split("\n"))
        # Fail closed: every table function and engine this build has, unless known to stay inside it.
        functions = {n.lower() for n in first.text("SELECT name FROM system.table_functions").split("\n")}
        engines = {n.lower() for n in first.text("SELECT name FROM system.table_engines").split("\n")}
        self.denied_functions = frozenset(
            DENIED_FUNCTIONS | (functions - ALLOWED_TABLE_FUNCTIONS) | (engines - ALLOWED_ENGINES) - {""}
        )
        self.check_ast: Any = None  # set by the server: (ast text) -> ClickHouseError | None
        self.spool = Spool()  # insert data on its way into the engine (_insert)

    # -- connections -------------------------------------------------------------------------------
    def _new(self) -> Conn:
        conn = Conn(self._path)
        with self._lock:
            self._all.add(conn)
        return conn

    def lease(self, session: Session[Conn] | None = None, timeout: float = 300.0) -> Conn:
        """A connection for one request (``give_back`` it): the session's own, or an idle pooled one."""
        self._guard()
        if not self._slots.acquire(timeout=timeout):
            raise ch_error(202, "TOO_MANY_SIMULTANEOUS_QUERIES", f"Too many simultaneous queries ({timeout:g} s)")
        try:
            self._guard()
            if session is not None:
                if session.conn is None:
                    session.conn = self._new()
                return session.conn
            with self._lock:
                conn = self._idle.pop() if self._idle else None
            return conn or self._new()
        except BaseException:
            self._slots.release()
            raise

    def give_back(self, conn: Conn, session: Session[Conn] | None = None) -> None:
        if session is None:
            with self._lock:
                self._idle.append(conn)
        self._slots.release()

    def drop(self, conn: Conn) -> None:
        """A session's connection, when the session expires (never while a request holds it)."""
        with self._lock:
            self._all.discard(conn)
        if not self.closed:
            conn.close()

    def kill(self, tag: str) -> None:
        """Cancel the statement marked with ``log_comment = tag``, from the control connection."""
        with self._control_lock:
            if self.closed:
                return
            with contextlib.suppress(Exception):
                self._control.raw.query(f"KILL QUERY WHERE Settings['log_comment'] = {quote_literal(tag)} ASYNC", "TSV")

    def _guard(self) -> None:
        if self.closed:
            raise ch_error(210, "NETWORK_ERROR", "Server is shutting down")

    def _prepare(self, conn: Conn, database: str, settings: dict[str, str]) -> None:
        """The connection's state becomes this request's."""
        try:
            conn.raw.query(f"USE {quote_identifier(database)}", "TabSeparated")
        except Exception as exc:
            raise ClickHouseError.from_engine(exc) from None
        for name in [n for n in conn.applied if n not in settings]:
            with contextlib.suppress(Exception):
                conn.raw.query(f"SET {name} = DEFAULT", "TabSeparated")
            del conn.applied[name]
        for name, literal in settings.items():
            if conn.applied.get(name) == literal:
                continue
            conn.applied.pop(name, None)
            try:
                conn.raw.query(f"SET {name} = {literal}", "TabSeparated")
            except Exception as exc:
                raise ClickHouseError.from_engine(exc) from None
            conn.applied[name] = literal

    def check_settings(self, names: list[str]) -> None:
        for name in names:
            if not _IDENT_RE.match(name) or name not in self.setting_names:
                raise ch_error(115, "UNKNOWN_SETTING", f"Unknown setting '{name}'")

    def _check(self, conn: Conn, sql: bytes, params: dict[str, str] | None = None) -> None:
        """The engine parses the client's statement (without running it) for the guard's second layer.

        Only ever a statement the token guard has passed (one statement: chdb runs every ``;``-separated
        statement it is given, inside ``EXPLAIN AST`` too). Fails closed: a statement over the size limit, one
        the parser refuses (its own error, e.g. 62 or 306) or whose tree cannot be read in full is refused.
        """
        if self.check_ast is None:
            raise ch_error(1001, "STD_EXCEPTION", "The server has no statement check: nothing runs without one")
        if len(sql) > MAX_QUERY_SIZE:
            raise query_too_large(len(sql))
        try:
            ast = bytes(conn.raw.query(b"EXPLAIN AST " + sql, "TabSeparatedRaw", params=params or {}).bytes())
        except Exception as exc:
            raise ClickHouseError.from_engine(exc) from None  # what the parser refuses is refused
        violation = self.check_ast(ast.decode("utf-8", "replace"))
        if violation is not None:
            raise violation

    # -- statements --------------------------------------------------------------------------------
    def query(
        self,
        conn: Conn,
        sql: bytes,
        fmt: str,
        database: str,
        settings: dict[str, str],
        params: dict[str, str],
        stream: bool = False,
    ) -> Outcome:
        """Run one statement (SQL as bytes: the engine takes any bytes a real server takes).

        ``stream``: the result leaves block by block (``Outcome.rest``) when the format allows it.
        """
        self._guard()
        self._prepare(conn, database, settings)
        self._check(conn, sql, params)
        if stream and fmt.lower() in STREAMABLE_FORMATS:
            try:
                handle = conn.raw.send_query(sql, fmt, params=params)
            except Exception as exc:
                err = ClickHouseError.from_engine(exc)
                if not (err.code == 36 and "Streaming query is not supported" in err.message):
                    raise err from None
            else:
                return self._streamed(conn, handle)
        try:
            res = conn.raw.query(sql, fmt, params=params)
        except Exception as exc:
            raise ClickHouseError.from_engine(exc) from None
        return Outcome.read(res, written_rows=res.rows_written(), written_bytes=res.bytes_written())

    @staticmethod
    def _streamed(conn: Conn, handle: Any) -> Outcome:
        """The first block now (an error before any row is an ordinary error response), the rest lazily."""

        def fetch() -> Any:
            try:
                res = conn.raw.streaming_fetch_result(handle)
            except Exception as exc:
                raise ClickHouseError.from_engine(exc) from None
            return None if res is None or (res.rows_read() == 0 and not res.size()) else res

        def cancel() -> None:
            with contextlib.suppress(Exception):
                conn.raw.streaming_cancel_query(handle)

        try:
            first = fetch()
        except BaseException:
            cancel()
            raise
        if first is None:
            return Outcome(data=b"")

        def rest() -> Iterator[bytes]:
            while (res := fetch()) is not None:
                if res.size():
                    yield bytes(res.bytes())

        return Outcome.read(first, rest=rest(), cancel=cancel)

    def insert(
        self, conn: Conn, head: bytes, fmt: str, data: bytes, database: str, settings: dict[str, str]
    ) -> Outcome:
        """Inline INSERT data, parsed by the engine's own input format (``_insert``)."""
        self._guard()
        self._prepare(conn, database, settings)
        self._check(conn, head + f" FORMAT {fmt}".encode())
        return self._insert(conn, head, fmt, data)

    def _insert(self, conn: Conn, head: bytes, fmt: str, data: bytes) -> Outcome:
        """Run ``head FROM INFILE <spool file> FORMAT fmt``: the engine's own INSERT, which raises what it refuses.

        Not chdb's streaming insert (``send_insert``/``append``/``finish``): chdb 4.4 swallows every error the
        engine raises after parsing (a CHECK constraint, a materialized view's failure...), so ``finish()``
        reported the rows as written while the engine had dropped the block. Not ``query()`` with the data
        inline either: that path cuts the data at its first blank line (two consecutive ``\n`` bytes, common in
        Native). ``FROM INFILE`` is the INSERT's own parser and semantics (its column list, DEFAULTs,
        ``input_format_*`` settings, ``*WithNames`` headers) reading a private file, and its errors raise.

        Cost, measured on this 2-core machine while other suites ran (load 4-6), old and new servers interleaved:
        clickhouse-connect Native inserts into a 4-column MergeTree table (UUID, String, Int64, DateTime64),
        median of 20, send_insert -> FROM INFILE: 5,000 rows 18.6 -> 19.9 ms and 24.8 -> 26.8 ms (two runs),
        100 rows 13.3 -> 15.3 ms and 15.8 -> 15.5 ms. The engine alone (200 interleaved, no HTTP): 5,000 rows
        3.6 -> 5.3 ms, 100 rows 2.8 -> 3.6 ms. Writing and removing the tmpfs file: 0.02 ms for 4 KB, 0.11 ms
        for 200 KB, 10 ms for 16 MiB.
        """
        path = self.spool.write(data)
        try:
            res = conn.raw.query(infile_statement(head, path, fmt), "TabSeparated")
        except Exception as exc:
            raise ClickHouseError.from_engine(exc) from None
        finally:
            self.spool.remove(path)
        return Outcome(
            data=b"",
            written_rows=res.rows_written(),
            written_bytes=res.bytes_written(),
            result_rows=res.rows_written(),
            result_bytes=res.bytes_written(),
            elapsed_ns=int(res.elapsed() * 1e9),
        )

    def external_tables(self, conn: Conn, tables: list[ExternalTable]) -> list[str]:
        """Uploaded tables (``<name>_structure``/``_types``/``_format``) as temporary tables of the connection.

        Run after ``_prepare`` (the request's settings, e.g. ``input_format_allow_errors_num``, apply to
        the upload as on a real server); the caller drops them (``drop_tables``) when the request ends.
        """
        made: list[str] = []
        try:
            for table in tables:
                name = quote_identifier(table.name)
                conn.raw.query(f"DROP TEMPORARY TABLE IF EXISTS {name}", "TabSeparated")
                ddl = f"CREATE TEMPORARY TABLE {name} ({table.structure}) ENGINE = Memory".encode()
                self._check(conn, ddl)  # the client's column list is in it: parsed and checked first
                conn.raw.query(ddl, "TabSeparated")
                made.append(table.name)
                if table.data:
                    self._insert(conn, f"INSERT INTO {name}".encode(), table.fmt, table.data)
        except ClickHouseError:
            self.drop_tables(conn, made)
            raise
        except Exception as exc:
            self.drop_tables(conn, made)
            raise ClickHouseError.from_engine(exc) from None
        return made

    @staticmethod
    def drop_tables(conn: Conn, names: list[str]) -> None:
        for name in names:
            with contextlib.suppress(Exception):
                conn.raw.query(f"DROP TEMPORARY TABLE IF EXISTS {quote_identifier(name)}", "TabSeparated")

    def use(self, conn: Conn, database: str, statement: bytes) -> str:
        """Validate ``USE x`` and return the database it names, for the session to remember."""
        self._guard()
        try:
            conn.raw.query(statement, "TabSeparated")
            return conn.text("SELECT currentDatabase()")
        except Exception as exc:
            raise ClickHouseError.from_engine(exc) from None

    def set(self, conn: Conn, assignments: list[tuple[str, str]], database: str, settings: dict[str, str]) -> None:
        """Validate ``SET`` values by applying them (the state is reconciled on the next request)."""
        self.check_settings([name for name, _ in assignments])
        merged = dict(settings)
        merged.update(assignments)
        self._guard()
        self._prepare(conn, database, merged)

    def close(self, timeout: float = 30.0) -> None:
        """Wait for the running statements, then release the data directory for the next start."""
        self.closed = True
        deadline = time.monotonic() + timeout
        got = 0
        while got < self.max_concurrent and self._slots.acquire(timeout=max(0.0, deadline - time.monotonic())):
            got += 1
        with self._control_lock, self._lock:
            conns, self._all, self._idle = list(self._all), set(), []
            for conn in [*conns, self._control]:
                conn.close()
        self.spool.close()
