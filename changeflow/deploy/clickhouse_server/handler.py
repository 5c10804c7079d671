"""ClickHouse's HTTP interface: one request from its URL, headers and body to the engine and back."""

from __future__ import annotations

import base64
import contextlib
import hmac
import json
import select
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, unquote_to_bytes, urlsplit

from changeflow.deploy.clickhouse_server.bodies import (
    _CONTROL,
    _FORMAT_RE,
    DEFAULT_MAX_BODY,
    StreamCompressor,
    compress_body,
    content_type,
    decompress_body,
    external_tables,
    parse_multipart,
    too_large,
)
from changeflow.deploy.clickhouse_server.engine import Engine, Outcome
from changeflow.deploy.clickhouse_server.errors import ClickHouseError, ch_error
from changeflow.deploy.clickhouse_server.guard import (
    MAX_QUERY_SIZE,
    RESULT_KINDS,
    Policy,
    ast_violation,
    check_settings_policy,
    guard,
    query_too_large,
)
from changeflow.deploy.clickhouse_server.lexer import Statement, analyze, quote_identifier, quote_literal
from changeflow.deploy.clickhouse_server.sessions import Session, Sessions

DISPLAY_NAME = socket.gethostname() or "changeflow-chdb"

# URL parameters the HTTP layer consumes itself; they never reach the engine as settings.
TRANSPORT_PARAMS = frozenset(
    {
        "query",
        "database",
        "default_format",
        "session_id",
        "session_timeout",
        "session_check",
        "query_id",
        "user",
        "password",
        "quota_key",
        "role",
        "compress",
        "decompress",
        "buffer_size",
        "wait_end_of_query",
        "client_protocol_version",
        "send_progress_in_http_headers",
        "enable_http_compression",
        "cancel_http_readonly_queries_on_client_close",
        "add_http_cors_header",
    }
)


def valid_query_id(value: str) -> str:
    """A client's ``query_id`` comes back as a response header: printable ASCII, bounded, or refused."""
    if len(value) > 128 or not all(0x21 <= ord(c) <= 0x7E for c in value):
        raise ch_error(36, "BAD_ARGUMENTS", "Invalid query_id: at most 128 printable ASCII characters without spaces")
    return value


def read_statement(sql: bytes) -> Statement:
    """The request's statement, read before anything else: refused when its SQL is over the fixed size limit
    (an INSERT's inline data after ``FORMAT``/``VALUES`` is not SQL the parser reads) or cannot be tokenized."""
    if len(sql) <= MAX_QUERY_SIZE:
        return analyze(sql)
    try:
        stmt = analyze(sql[: MAX_QUERY_SIZE + 1])
    except ClickHouseError:
        raise query_too_large(len(sql)) from None
    if stmt.insert_head is None or stmt.data_offset > MAX_QUERY_SIZE:
        raise query_too_large(len(sql))
    return analyze(sql)


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes")


def exception_block(tag: str, message: bytes) -> bytes:
    """ClickHouse's mid-stream error (server 25.11+), announced by ``X-ClickHouse-Exception-Tag``."""
    text = message if message.endswith(b"\n") else message + b"\n"
    return b"__exception__\r\n%s\r\n%s%d %s\r\n__exception__\r\n" % (tag.encode(), text, len(text), tag.encode())


class ClientWatch:
    """Notices a client that closes its connection while its statement runs, and cancels the statement.

    One thread selects over the sockets of running statements; a socket that turns readable with nothing
    to read (EOF) is a client gone: the statement, marked with its ``log_comment``, gets ``KILL QUERY``.
    A socket with bytes to read (a pipelined request) cannot be watched and is left alone.
    """

    def __init__(self, kill: Any, interval: float = 0.2) -> None:
        self._kill = kill
        self._interval = interval
        self._lock = threading.Lock()
        self._watched: dict[socket.socket, str] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="client-watch", daemon=True)
        self._thread.start()

    @contextlib.contextmanager
    def watching(self, sock: socket.socket, tag: str | None) -> Iterator[None]:
        if tag is None:
            yield
            return
        with self._lock:
            self._watched[sock] = tag
        try:
            yield
        finally:
            with self._lock:
                self._watched.pop(sock, None)

    def _run(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                socks = list(self._watched)
            if not socks:
                self._stop.wait(self._interval)
                continue
            try:
                readable, _, _ = select.select(socks, [], [], self._interval)
            except (OSError, ValueError):
                readable = []
                with self._lock:
                    for sock in socks:
                        if sock.fileno() < 0:
                            self._watched.pop(sock, None)
            for sock in readable:
                try:
                    gone = sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
                except BlockingIOError:
                    continue
                except OSError:
                    gone = True
                with self._lock:
                    tag = self._watched.pop(sock, None)
                if gone and tag is not None:
                    self._kill(tag)

    def stop(self) -> None:
        self._stop.set()


class ClickHouseHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(
        self,
        address: tuple[str, int],
        engine: Engine,
        user: str,
        password: str,
        limits: Limits | None = None,
    ) -> None:
        super().__init__(address, Handler)
        self.engine = engine
        self.user = user
        self.password = password
        self.limits = limits or Limits()
        self.sessions = Sessions(on_expire=engine.drop, max_sessions=self.limits.max_sessions)
        self.watch = ClientWatch(engine.kill)
        self.policy = Policy(
            user=user, denied_functions=engine.denied_functions, max_execution_time=self.limits.max_execution_time
        )
        engine.check_ast = lambda ast: ast_violation(ast, self.policy)
        self._slots = threading.BoundedSemaphore(self.limits.max_connections)

    def process_request(self, request: Any, client_address: Any) -> None:
        """A bounded pool: past ``max_connections`` open connections, answer 202 and close at once."""
        if not self._slots.acquire(blocking=False):
            text = f"Too many simultaneous queries. Maximum: {self.limits.max_connections}"
            err = ch_error(202, "TOO_MANY_SIMULTANEOUS_QUERIES", text)
            body = err.body(self.engine.version)
            head = (
                f"HTTP/1.1 {err.http_status} Service Unavailable\r\nContent-Type: text/plain; charset=UTF-8\r\n"
                f"X-ClickHouse-Exception-Code: {err.code}\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            )
            with contextlib.suppress(OSError):
                request.settimeout(2)
                request.sendall(head.encode() + body)
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


@dataclass(frozen=True)
class Limits:
    max_body_size: int = DEFAULT_MAX_BODY  # bytes on the wire
    max_decompressed_size: int = DEFAULT_MAX_BODY  # bytes after Content-Encoding
    max_connections: int = 128
    max_execution_time: float = 300.0  # seconds; clients may ask for less, never more
    max_concurrent_queries: int = 16  # statements running at once in the engine; the next ones wait
    max_sessions: int = 256  # sessions kept; past it the least recently used idle one is evicted


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: clickhouse-connect pools its connections
    timeout = 300  # an idle keep-alive connection is closed after this (urllib3 notices and reconnects)
    server: ClickHouseHTTPServer
    wbufsize = 1 << 16  # headers and a small body leave in one segment
    server_version = "ClickHouse"
    sys_version = ""

    def setup(self) -> None:
        super().setup()
        # Without it, Nagle's algorithm meets the client's delayed ACK: +40 ms on every small response.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, format: str, *args: Any) -> None:
        """Our own one-line request log replaces http.server's."""

    def handle_expect_100(self) -> bool:
        """curl sends ``Expect: 100-continue`` for big uploads; our buffered writer must flush it."""
        ok = super().handle_expect_100()
        self.wfile.flush()
        return ok

    def do_GET(self) -> None:
        self._handle()

    def do_POST(self) -> None:
        self._handle()

    def do_HEAD(self) -> None:
        self._send(200, b"", {"Content-Type": "text/html; charset=UTF-8"}, head_only=True)

    # -- plumbing --------------------------------------------------------------------------------
    def _read_body(self) -> bytes:
        limit = self.server.limits.max_body_size
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            parts, total = [], 0
            while True:
                size_line = self.rfile.readline(65537)
                size = int(size_line.split(b";")[0].strip() or b"0", 16)
                total += size
                if total > limit:
                    self.close_connection = True  # the rest of the upload is never read
                    raise too_large("Request body", limit)
                if size == 0:
                    while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    break
                parts.append(self.rfile.read(size))
                self.rfile.readline(3)
            return b"".join(parts)
        length = int(self.headers.get("Content-Length") or 0)
        if length > limit:
            self.close_connection = True
            raise too_large("Request body", limit)
        return self.rfile.read(length) if length > 0 else b""

    def _send(self, status: int, body: bytes, headers: dict[str, str], head_only: bool = False) -> None:
        self.send_response(status)
        for key, value in headers.items():
            # Nothing a client sent may split a header: control characters never leave in one.
            self.send_header(key, _CONTROL.sub("?", value))
        self.send_header("X-ClickHouse-Server-Display-Name", DISPLAY_NAME)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Keep-Alive", f"timeout={self.timeout}")
        self.end_headers()
        if body and not head_only:
            self.wfile.write(body)
        self.wfile.flush()

    def _log(self, status: int, started: float, query: bytes, outcome: Outcome | None, err: str = "") -> None:
        try:
            stmt = analyze(query[:4096])
        except ClickHouseError:  # a refused statement, or one cut at 4096 bytes: logged as text
            stmt = Statement()
        if stmt.insert_head is not None:  # never the inline data, which may be binary
            tail = "VALUES ..." if stmt.insert_format == "Values" else f"FORMAT {stmt.insert_format}"
            query = stmt.insert_head + tail.encode()
        text = query[:160].decode("utf-8", "replace")
        text = " ".join(text.split()).replace('"', "'")
        rows = (outcome.written_rows or outcome.result_rows) if outcome else 0
        line = (
            f"ts={time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())} method={self.command} "
            f"path={urlsplit(self.path).path} status={status} rows={rows} "
            f'ms={(time.perf_counter() - started) * 1000:.1f} query="{text}"'
        )
        if err:
            line += f' error="{err}"'
        print(line, flush=True)

    # -- one request -----------------------------------------------------------------------------
    def _cross_origin(self) -> bool:
        """A browser marks what a web page sends (Origin, Sec-Fetch-Site): no page may reach this server."""
        site = self.headers.get("Sec-Fetch-Site", "").strip().lower()
        return self.headers.get("Origin") is not None or site not in ("", "none", "same-origin")

    def _refuse(self, exc: ClickHouseError, started: float, close: bool = False) -> None:
        headers = {"Content-Type": "text/plain; charset=UTF-8", "X-ClickHouse-Exception-Code": str(exc.code)}
        if close:
            self.close_connection = True
            headers["Connection"] = "close"
        with contextlib.suppress(OSError):
            self._send(exc.http_status, exc.body(self.server.engine.version), headers)
        self._log(exc.http_status, started, b"", None, exc.name)

    def _handle(self) -> None:
        started = time.perf_counter()
        url = urlsplit(self.path)
        if self._cross_origin():
            # The body is never read: the connection closes after the answer.
            text = "Cross-origin requests are not allowed: this server does not serve web pages (CORS)"
            err = ch_error(497, "ACCESS_DENIED", text)
            self._refuse(err, started, close=True)
            return
        if url.path in ("/ping", "/replicas_status"):
            self._read_body()
            self._send(200, b"Ok.\n", {"Content-Type": "text/html; charset=UTF-8"})
            return
        if url.path != "/":
            self._read_body()
            self._send(404, f"There is no handle {url.path}\n".encode(), {"Content-Type": "text/plain"})
            return
        params = dict(parse_qsl(url.query, keep_blank_values=True))
        try:
            query_id = valid_query_id(params["query_id"]) if params.get("query_id") else str(uuid.uuid4())
        except ClickHouseError as bad_id:
            self._refuse(bad_id, started, close=True)
            return
        base_headers = {"X-ClickHouse-Query-Id": query_id, "X-ClickHouse-Timezone": self.server.engine.timezone}
        sql = b""
        # What the request holds (its session, its engine connection, its external tables): released
        # before the last byte of the answer leaves, so the client's next request finds them free.
        cleanup = contextlib.ExitStack()
        try:
            try:
                body = self._read_body()
                if self.command == "GET" and "query" not in params and not body:
                    self._send(200, b"Ok.\n", {"Content-Type": "text/html; charset=UTF-8"})
                    return
                self._authenticate(params)
                if _truthy(params.get("decompress")):
                    raise ch_error(48, "NOT_IMPLEMENTED", "ClickHouse-compressed request bodies (decompress=1)")
                body = decompress_body(
                    body, self.headers.get("Content-Encoding", ""), self.server.limits.max_decompressed_size
                )
                head = _raw_param(url.query, "query") or b""
                files: dict[str, tuple[str, bytes]] = {}
                content = self.headers.get("Content-Type", "")
                if content.lower().startswith("multipart/form-data"):
                    # The query and bound parameters travel as form fields, uploaded files are external data.
                    fields, files = parse_multipart(body, content)
                    for name, value in fields.items():
                        if name == "query":
                            head = value
                        elif name not in ("user", "password"):
                            params[name] = value.decode("utf-8", "replace")
                    body = b""
                sql = head + b"\n" + body if head and body else head or body
                if session_id := params.get("session_id"):
                    session = self.server.sessions.acquire(
                        session_id, float(params.get("session_timeout") or 60), _truthy(params.get("session_check"))
                    )
                    cleanup.callback(Sessions.release, session)
                else:
                    session = None
                outcome, headers = self._execute(sql, params, session, files, cleanup)
            except (ClickHouseError, ValueError, OSError) as caught:
                # ValueError/OSError: a malformed request body (bad chunk size, truncated upload...).
                cleanup.close()
                exc = caught if isinstance(caught, ClickHouseError) else ClickHouseError.from_engine(caught)
                status = exc.http_status
                headers = {
                    **base_headers,
                    "Content-Type": "text/plain; charset=UTF-8",
                    "X-ClickHouse-Exception-Code": str(exc.code),
                }
                if not isinstance(caught, ClickHouseError) or self.close_connection:
                    self.close_connection = True  # the request stream is out of step: do not reuse it
                    headers["Connection"] = "close"
                with contextlib.suppress(OSError):
                    self._send(status, exc.body(self.server.engine.version), headers)
                self._log(status, started, sql, None, exc.name)
                return
            summary = {
                "read_rows": str(outcome.read_rows),
                "read_bytes": str(outcome.read_bytes),
                "written_rows": str(outcome.written_rows),
                "written_bytes": str(outcome.written_bytes),
                "total_rows_to_read": str(outcome.read_rows),
                "result_rows": str(outcome.result_rows),
                "result_bytes": str(outcome.result_bytes),
                "elapsed_ns": str(outcome.elapsed_ns),
            }
            headers.update(base_headers)
            headers["X-ClickHouse-Summary"] = json.dumps(summary, separators=(",", ":"))
            # enable_http_compression defaults to 1 in this engine version, as on a current server.
            compress = _truthy(params.get("enable_http_compression", "1"))
            if outcome.rest is not None:
                self._send_stream(outcome, headers, compress, cleanup, started, sql)
                return
            cleanup.close()
            data = outcome.data
            if data and compress:
                data, encoding = compress_body(data, self.headers.get("Accept-Encoding", ""))
                if encoding:
                    headers["Content-Encoding"] = encoding
            self._send(200, data, headers)
            self._log(200, started, sql, outcome)
        finally:
            cleanup.close()

    def _send_stream(
        self, outcome: Outcome, headers: dict[str, str], compress: bool, cleanup: Any, started: float, sql: bytes
    ) -> None:
        """A result block by block (chunked); an error after the first block as ClickHouse frames it."""
        tag = uuid.uuid4().hex[:16]
        encoding = StreamCompressor.pick(self.headers.get("Accept-Encoding", "")) if compress else None
        compressor = StreamCompressor(encoding) if encoding else None
        if encoding:
            headers["Content-Encoding"] = encoding
        headers["X-ClickHouse-Exception-Tag"] = tag
        error: ClickHouseError | None = None

        def write(data: bytes) -> None:
            if compressor is not None:
                data = compressor.compress(data)
            if data:
                self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                self.wfile.flush()

        try:
            self.send_response(200)
            for key, value in headers.items():
                self.send_header(key, _CONTROL.sub("?", value))
            self.send_header("X-ClickHouse-Server-Display-Name", DISPLAY_NAME)
            self.send_header("Transfer-Encoding", "chunked")
            self.send_header("Keep-Alive", f"timeout={self.timeout}")
            self.end_headers()
            write(outcome.data)
            assert outcome.rest is not None
            try:
                for block in outcome.rest:
                    write(block)
            except ClickHouseError as exc:
                error = exc
                # The chunked body still ends properly below, so the connection stays usable: closing it
                # raced with a client reusing it from its pool ("Server disconnected" on the next request).
                write(exception_block(tag, exc.body(self.server.engine.version)))
            tail = compressor.finish() if compressor is not None else b""
            cleanup.close()
            if tail:
                self.wfile.write(b"%x\r\n%s\r\n" % (len(tail), tail))
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
        except OSError:
            # The client went away mid-answer: stop the statement, and never reuse this connection.
            if outcome.cancel is not None:
                outcome.cancel()
            cleanup.close()
            self.close_connection = True
            self._log(499, started, sql, outcome, "CLIENT_CLOSED_REQUEST")
            return
        self._log(200, started, sql, outcome, error.name if error else "")

    def _authenticate(self, params: dict[str, str]) -> None:
        user = params.get("user") or self.headers.get("X-ClickHouse-User")
        password = params.get("password") or self.headers.get("X-ClickHouse-Key") or ""
        auth = self.headers.get("Authorization", "")
        if auth.lower().startswith("basic "):
            with contextlib.suppress(ValueError):
                decoded = base64.b64decode(auth[6:].strip()).decode()
                basic_user, _, basic_password = decoded.partition(":")
                user, password = user or basic_user, password or basic_password
        user = user or "default"
        # Compared as bytes: compare_digest refuses str with non-ASCII characters (a TypeError that dropped
        # the connection instead of answering 516).
        given, expected = password.encode("utf-8", "surrogateescape"), self.server.password.encode("utf-8")
        if user != self.server.user or not hmac.compare_digest(given, expected):
            raise ch_error(
                516,
                "AUTHENTICATION_FAILED",
                f"{user}: Authentication failed: password is incorrect, or there is no user with such name",
            )

    def _execute(
        self,
        sql: bytes,
        params: dict[str, str],
        session: Session | None,
        files: dict[str, tuple[str, bytes]],
        cleanup: contextlib.ExitStack,
    ) -> tuple[Outcome, dict]:
        engine = self.server.engine
        stmt = read_statement(sql)
        if not stmt.kind:
            raise ch_error(62, "SYNTAX_ERROR", "Empty query")
        database = (
            params.get("database")
            or self.headers.get("X-ClickHouse-Database")
            or (session.database if session else None)
            or "default"
        )
        external = external_tables(files, params) if files else []
        external_params = {f"{t}_{what}" for t in files for what in ("structure", "types", "format")}
        url_settings = {
            k: v
            for k, v in params.items()
            if k not in TRANSPORT_PARAMS and k not in external_params and not k.startswith(("param_", "http_"))
        }
        readonly = self.command == "GET"
        check_settings_policy(list(url_settings.items()), readonly, self.server.policy)
        engine.check_settings(list(url_settings))
        # The statement as the engine will parse it: an INSERT's inline data is data, except Values rows,
        # which are SQL expressions (the Values parser evaluates them): those are read in full, always.
        checked = sql
        if stmt.insert_head is not None and (stmt.insert_format or "").lower() != "values":
            checked = sql[: stmt.data_offset]
        guard(checked, stmt, readonly, self.server.policy)
        for table in external:  # our own DDL from the client's column list: the same guard
            ddl = f"CREATE TEMPORARY TABLE {quote_identifier(table.name)} ({table.structure}) ENGINE = Memory".encode()
            guard(ddl, analyze(ddl), False, self.server.policy)
        settings = dict(session.settings) if session else {}
        settings.update({k: quote_literal(v) for k, v in url_settings.items()})
        # The server's time limit applies unless the client asked for less (checked above).
        settings.setdefault("max_execution_time", f"{self.server.limits.max_execution_time:g}")
        # A statement whose client goes away is cancelled (KILL QUERY by this mark), unless asked not to.
        tag = None
        if "log_comment" not in settings and params.get("cancel_http_readonly_queries_on_client_close") != "0":
            tag = f"changeflow-http:{uuid.uuid4().hex}"
            settings["log_comment"] = quote_literal(tag)
        headers: dict[str, str] = {}

        conn = engine.lease(session)
        cleanup.callback(engine.give_back, conn, session)
        cleanup.enter_context(self.server.watch.watching(self.connection, tag))
        if stmt.kind == "USE" and stmt.use_database is not None:
            chosen = engine.use(conn, database, sql)
            if session is not None:
                session.database = chosen
            return Outcome(data=b""), headers
        if stmt.kind == "SET" and stmt.assignments:
            engine.set(conn, stmt.assignments, database, settings)
            if session is not None:
                session.settings.update(stmt.assignments)
            return Outcome(data=b""), headers
        if external:
            engine._prepare(conn, database, settings)
            made = engine.external_tables(conn, external)
            cleanup.callback(engine.drop_tables, conn, made)
        query_params = {k[6:]: v for k, v in params.items() if k.startswith("param_")}
        # VALUES with {name:Type} placeholders needs the parameters: only query() takes them.
        inline_values_with_params = stmt.insert_format == "Values" and bool(query_params)
        if stmt.insert_head is not None and stmt.insert_format is not None and not inline_values_with_params:
            outcome = engine.insert(
                conn, stmt.insert_head, stmt.insert_format, sql[stmt.data_offset :], database, settings
            )
            return outcome, headers

        fmt = stmt.output_format or params.get("default_format") or self.headers.get("X-ClickHouse-Format")
        fmt = fmt or "TabSeparated"
        if not _FORMAT_RE.match(fmt):
            raise ch_error(73, "UNKNOWN_FORMAT", "Unknown output format")
        # Results leave block by block, unless the client asked for the whole result first.
        stream = (
            stmt.kind in ("SELECT", "WITH")
            and not _truthy(params.get("wait_end_of_query"))
            and not any("array_of_rows" in name for name in settings)
        )
        outcome = engine.query(conn, sql, fmt, database, settings, query_params, stream=stream)
        if stmt.kind in RESULT_KINDS:
            headers["X-ClickHouse-Format"] = fmt
            headers["Content-Type"] = content_type(fmt)
        else:
            headers["Content-Type"] = "text/plain; charset=UTF-8"
        return outcome, headers


def _raw_param(query_string: str, name: str) -> bytes | None:
    """A URL parameter's bytes as sent (SQL may hold any bytes, not only UTF-8)."""
    found = None
    for part in query_string.split("&"):
        key, _, value = part.partition("=")
        if unquote_to_bytes(key.replace("+", " ")) == name.encode():
            found = unquote_to_bytes(value.replace("+", " "))
    return found
