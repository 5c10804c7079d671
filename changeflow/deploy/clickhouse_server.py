"""ClickHouse's HTTP interface in front of chdb, the ClickHouse engine embedded in a Python process.

No ClickHouse server installs on these machines, but PyPI's ``chdb`` is the real engine, and only
one process may open its data directory. This server owns that directory and speaks enough of
ClickHouse's HTTP protocol that ``clickhouse-connect`` (and curl) work unchanged, exactly as they do
against a real server, so the sinks and reports never know the difference:

* ``GET|POST /`` with the query in the ``query`` URL parameter and/or the body (joined by a newline,
  as ClickHouse does); ``GET`` is read-only, as on a real server. ``/ping`` answers ``Ok.``.
* ``database``, ``default_format``, ``session_id``, ``query_id``, credentials (URL, ``X-ClickHouse-*``
  headers or Basic auth), ``param_<name>`` bindings (chdb binds ``{name:Type}`` natively, with the
  same escaped-text parsing as the server) and any other URL parameter as a query setting.
* Inserts ``INSERT INTO t [(cols)] FORMAT <fmt>\\n<data>`` (Native from clickhouse-connect, any other
  input format from curl) and ``INSERT ... VALUES`` run as the engine's own ``INSERT ... FROM INFILE`` of
  a private spool file (tmpfs, 0600, removed afterwards; ``Spool``), parsed by the engine's input formats
  without re-encoding. Not chdb's streaming ``send_insert``: it reports success for a block the engine
  refused after parsing it (a CHECK constraint, a materialized view's error), so the rows were lost.
* Request bodies in lz4 (clickhouse-connect's default), zstd, gzip, deflate or br; responses
  compressed with the first ``Accept-Encoding`` we support unless ``enable_http_compression=0``
  (its default is 1 in this engine version, as on a current server).
* Errors as ``Code: N. DB::Exception: ... (NAME) (version ...)`` with the HTTP status ClickHouse uses
  and the ``X-ClickHouse-Exception-Code`` header, so clients raise their usual exceptions.
* ``multipart/form-data`` bodies (query and ``param_*`` as form fields, as clickhouse-connect sends them past
  4,096 URL-encoded characters of parameters) and external data (uploaded files with ``<name>_structure`` /
  ``<name>_types`` / ``<name>_format``, queried as temporary tables of the request's connection).
* ``SELECT`` results streamed block by block (chunked) in formats whose blocks concatenate; an error after
  the first block in ClickHouse's mid-stream framing (``X-ClickHouse-Exception-Tag``); ``wait_end_of_query=1``
  buffers the whole result first. SQL may hold any bytes (not only UTF-8).

chdb opens one engine per process and any number of connections to it, each with its own database,
settings and temporary tables, running in parallel (``Engine``): every request leases a connection of its
own (a ``session_id`` keeps one for the session's life), at most ``--max-concurrent-queries`` at once.
HTTP parsing, decompression and compression run in the request threads; chdb releases the GIL while it
executes. A statement whose client closes the connection is cancelled (``ClientWatch``, ``KILL QUERY``).

It behaves like a locked-down ClickHouse server, not like a root shell (ARCHITECTURE.md, "Known traps"):

* a password (``CLICKHOUSE_PASSWORD`` in its environment; it refuses to start without one), checked for
  URL, ``X-ClickHouse-User/Key`` and Basic credentials alike (516 AUTHENTICATION_FAILED);
* one statement per request (62 "Multi-statements are not allowed"), GET read-only (164 READONLY);
  access settings (``readonly``, ``allow_ddl``, ``profile``, file-path settings...) fixed (452, or 164
  on GET), ``max_execution_time`` capped (452 above the cap, 159 TIMEOUT_EXCEEDED when reached);
* nothing that reaches outside the engine: table functions and engines other than an allow-list, files,
  dictionary sources other than local tables, ``SYSTEM``, ``KILL``, ``BACKUP``/``RESTORE``, access
  management (497 ACCESS_DENIED), ``INTO OUTFILE`` (358), ``FROM INFILE`` (78), ``ATTACH ... FROM`` a
  path (481). The token guard (``guard``) reads every statement, then the engine's own ``EXPLAIN AST``
  (parsed, never executed) is checked again (``ast_violation``);
* no browser: a request with ``Origin`` or a cross-site ``Sec-Fetch-Site`` is refused (403);
* limits: request body and decompressed body (256 MiB each by default), open connections (a bounded
  pool, 202 TOO_MANY_SIMULTANEOUS_QUERIES), and values echoed as headers are validated.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import gzip
import hmac
import importlib
import json
import os
import re
import signal
import socket
import sys
import threading
import time
import uuid
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, unquote_to_bytes, urlsplit

# The engine takes its time zone from the process; the warehouse keeps UTC whatever the host says.
os.environ["TZ"] = "UTC"
with contextlib.suppress(AttributeError):
    time.tzset()


def _optional(module: str) -> Any:
    """Optional codecs: clickhouse-connect offers what it has installed, we accept what we have."""
    try:
        return importlib.import_module(module)
    except ImportError:  # pragma: no cover - depends on the environment
        return None


lz4_frame: Any = _optional("lz4.frame")
zstd: Any = _optional("compression.zstd" if sys.version_info >= (3, 14) else "backports.zstd")
brotli: Any = _optional("brotli")

DISPLAY_NAME = socket.gethostname() or "changeflow-chdb"
PASSWORD_ENV = "CLICKHOUSE_PASSWORD"

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

# Statements that produce a result set (ClickHouse sends X-ClickHouse-Format only for these).
RESULT_KINDS = frozenset({"SELECT", "WITH", "SHOW", "DESCRIBE", "DESC", "EXISTS", "EXPLAIN", "CHECK", "VALUES"})
# What a GET request may run: the server treats GET as readonly=2 (reads, SET and USE).
READONLY_KINDS = RESULT_KINDS | {"SET", "USE"}

# exceptionCodeToHTTPStatus in ClickHouse's src/Server/HTTP, by error name.
_STATUS_BY_ERROR = {
    401: {"REQUIRED_PASSWORD"},
    403: {"UNKNOWN_USER", "WRONG_PASSWORD", "AUTHENTICATION_FAILED", "SET_NON_GRANTED_ROLE", "ACCESS_DENIED"},
    400: {
        "BAD_ARGUMENTS",
        "CANNOT_COMPILE_REGEXP",
        "CANNOT_PARSE_TEXT",
        "CANNOT_PARSE_ESCAPE_SEQUENCE",
        "CANNOT_PARSE_QUOTED_STRING",
        "CANNOT_PARSE_DATE",
        "CANNOT_PARSE_DATETIME",
        "CANNOT_PARSE_NUMBER",
        "CANNOT_PARSE_DOMAIN_VALUE_FROM_STRING",
        "CANNOT_PARSE_IPV4",
        "CANNOT_PARSE_IPV6",
        "CANNOT_PARSE_INPUT_ASSERTION_FAILED",
        "CANNOT_PARSE_UUID",
        "DUPLICATE_COLUMN",
        "ILLEGAL_COLUMN",
        "UNKNOWN_ELEMENT_IN_AST",
        "UNKNOWN_TYPE_OF_AST_NODE",
        "THERE_IS_NO_COLUMN",
        "TOO_DEEP_AST",
        "TOO_BIG_AST",
        "UNEXPECTED_AST_STRUCTURE",
        "SYNTAX_ERROR",
        "INCORRECT_DATA",
        "TYPE_MISMATCH",
        "VALUE_IS_OUT_OF_RANGE_OF_DATA_TYPE",
    },
    404: {
        "UNKNOWN_TABLE",
        "UNKNOWN_FUNCTION",
        "UNKNOWN_IDENTIFIER",
        "UNKNOWN_TYPE",
        "UNKNOWN_STORAGE",
        "UNKNOWN_DATABASE",
        "UNKNOWN_SETTING",
        "UNKNOWN_DIRECTION_OF_SORTING",
        "UNKNOWN_AGGREGATE_FUNCTION",
        "UNKNOWN_FORMAT",
        "UNKNOWN_DATABASE_ENGINE",
        "UNKNOWN_TYPE_OF_QUERY",
        "UNKNOWN_ROLE",
    },
    413: {"QUERY_IS_TOO_LARGE"},
    501: {"NOT_IMPLEMENTED"},
    503: {"SOCKET_TIMEOUT", "CANNOT_OPEN_FILE", "CANNOT_SCHEDULE_TASK", "TOO_MANY_SIMULTANEOUS_QUERIES"},
    411: {"HTTP_LENGTH_REQUIRED"},
    408: {"TIMEOUT_EXCEEDED"},
    415: {"UNSUPPORTED_MEDIA_TYPE"},
}
HTTP_STATUS = {name: status for status, names in _STATUS_BY_ERROR.items() for name in names}

_CODE_RE = re.compile(r"Code: (\d+)\.")
_REPEATED_PREFIX = re.compile(r"^(Code: (\d+)\. DB::Exception: )(?:Code: \2\. DB::Exception: )+")
_NAME_RE = re.compile(r"\(([A-Z][A-Z0-9_]+)\)(?:\s*\(version [^)]*\))?\s*$")


class ClickHouseError(Exception):
    """An error reported to the client the way ClickHouse reports it (code, name, message)."""

    def __init__(self, code: int, name: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.name = name
        self.message = message

    @classmethod
    def from_engine(cls, exc: BaseException) -> ClickHouseError:
        """chdb's exceptions carry the server's own text; keep it from ``Code:`` on."""
        text = str(exc)
        at = text.find("Code: ")
        text = text[at:] if at >= 0 else text
        text = _REPEATED_PREFIX.sub(r"\1", text, count=1)  # "Code: 27. DB::Exception: Code: 27. DB::Exception: "
        code_match = _CODE_RE.match(text)
        name_match = _NAME_RE.search(text)
        code = int(code_match.group(1)) if code_match else 1001
        name = name_match.group(1) if name_match else "STD_EXCEPTION"
        if code_match:
            return cls(code, name, text.strip())
        return cls(code, name, f"Code: {code}. DB::Exception: {text.strip()}. ({name})")

    def body(self, version: str) -> bytes:
        text = self.message if "(version " in self.message else f"{self.message} (version {version})"
        return (text.rstrip() + "\n").encode()

    @property
    def http_status(self) -> int:
        return HTTP_STATUS.get(self.name, 500)


def ch_error(code: int, name: str, message: str) -> ClickHouseError:
    return ClickHouseError(code, name, f"Code: {code}. DB::Exception: {message}. ({name})")


# -- a small SQL scanner ---------------------------------------------------------------------------
# Only enough of the lexer to find statement kind, a trailing FORMAT clause, the point where an
# INSERT's inline data starts, and SET assignments, without being fooled by strings or comments.


@dataclass(frozen=True)
class Token:
    kind: str  # word, string, ident (quoted identifier), number, punct
    start: int
    end: int
    depth: int  # bracket depth at the token


_WORD = re.compile(rb"[A-Za-z_][A-Za-z0-9_$]*")
_NUMBER = re.compile(rb"[0-9][0-9A-Za-z_.]*")
_SPACE = b" \t\r\n\f\v"


def tokens(buf: bytes, start: int = 0) -> Iterator[Token]:
    """Lazily, so an INSERT's binary data after its FORMAT clause is never scanned."""
    i, n, depth = start, len(buf), 0
    while i < n:
        c = buf[i : i + 1]
        if c in (b" ", b"\t", b"\r", b"\n", b"\f", b"\v"):
            i += 1
        elif buf.startswith(b"--", i) or buf.startswith(b"# ", i) or buf.startswith(b"#!", i):
            j = buf.find(b"\n", i)
            i = n if j < 0 else j + 1
        elif buf.startswith(b"/*", i):
            j = buf.find(b"*/", i + 2)
            i = n if j < 0 else j + 2
        elif c in (b"'", b'"', b"`"):
            j = i + 1
            while j < n:
                d = buf[j : j + 1]
                if d == b"\\":
                    j += 2
                    continue
                if d == c:
                    if buf[j + 1 : j + 2] == c:  # doubled quote
                        j += 2
                        continue
                    break
                j += 1
            yield Token("string" if c == b"'" else "ident", i, min(j + 1, n), depth)
            i = j + 1
        elif c in (b"(", b"["):
            yield Token("punct", i, i + 1, depth)
            depth += 1
            i += 1
        elif c in (b")", b"]"):
            depth = max(0, depth - 1)
            yield Token("punct", i, i + 1, depth)
            i += 1
        elif (m := _WORD.match(buf, i)) is not None:
            yield Token("word", i, m.end(), depth)
            i = m.end()
        elif (m := _NUMBER.match(buf, i)) is not None:
            yield Token("number", i, m.end(), depth)
            i = m.end()
        else:
            yield Token("punct", i, i + 1, depth)
            i += 1


def _word(buf: bytes, tok: Token | None) -> str:
    return buf[tok.start : tok.end].decode("ascii").upper() if tok is not None and tok.kind == "word" else ""


@dataclass
class Statement:
    """What the HTTP layer needs to know about one statement before the engine sees it."""

    kind: str = ""
    output_format: str | None = None  # from a trailing FORMAT clause (non-INSERT)
    insert_head: bytes | None = None  # INSERT with inline data: the SQL before FORMAT/VALUES
    insert_format: str | None = None
    data_offset: int = 0
    assignments: list[tuple[str, str]] = field(default_factory=list)  # SET name = value
    use_database: str | None = None


def _data_start(buf: bytes, pos: int) -> int:
    """ClickHouse: data starts after the newline, if there is one, or after all whitespace otherwise."""
    n = len(buf)
    while pos < n and buf[pos] in _SPACE:
        if buf[pos] == 0x0A:
            return pos + 1
        pos += 1
    return pos


def analyze(buf: bytes) -> Statement:
    stream = tokens(buf)
    first = next(stream, None)
    if first is None:
        return Statement()
    # "(SELECT ...) UNION ALL ..." starts with a bracket
    opens_bracket = first.kind == "punct" and buf[first.start : first.end] == b"("
    stmt = Statement(kind="SELECT" if opens_bracket else _word(buf, first))
    kind = stmt.kind
    if kind == "INSERT":
        prev: Token | None = None
        for tok in stream:
            word = _word(buf, tok) if tok.depth == 0 else ""
            if word in ("SELECT", "WITH"):
                return stmt
            if word == "VALUES" and _word(buf, prev) != "FORMAT":
                stmt.insert_head, stmt.insert_format, stmt.data_offset = buf[: tok.start], "Values", tok.end
                return stmt
            if word == "FORMAT":
                name = next(stream, None)
                if name is not None and name.kind == "word":
                    stmt.insert_head = buf[: tok.start]
                    stmt.insert_format = buf[name.start : name.end].decode("ascii")
                    stmt.data_offset = _data_start(buf, name.end)
                    return stmt
            prev = tok
        return stmt
    rest = [t for t in stream if t.depth == 0]
    if kind == "SET":
        stmt.assignments = _assignments(buf, rest)
    elif kind == "USE" and rest:
        stmt.use_database = buf[rest[0].start : rest[-1].end].decode().rstrip(";").strip()
    for i, tok in enumerate(rest[:-1]):
        if _word(buf, tok) != "FORMAT" or rest[i + 1].kind != "word":
            continue
        after = rest[i + 2] if i + 2 < len(rest) else None
        if after is None or buf[after.start : after.end] == b";" or _word(buf, after) == "SETTINGS":
            stmt.output_format = buf[rest[i + 1].start : rest[i + 1].end].decode("ascii")
    return stmt


def _assignments(buf: bytes, toks: list[Token]) -> list[tuple[str, str]]:
    """``SET a = 1, b = 'x'`` -> [(a, "1"), (b, "'x'")], values kept as SQL literals."""
    out: list[tuple[str, str]] = []
    groups: list[list[Token]] = [[]]
    for tok in toks:
        text = buf[tok.start : tok.end]
        if tok.kind == "punct" and text == b",":
            groups.append([])
        elif not (tok.kind == "punct" and text == b";"):
            groups[-1].append(tok)
    for group in groups:
        if len(group) >= 3 and buf[group[1].start : group[1].end] == b"=":
            name = buf[group[0].start : group[0].end].decode()
            value = buf[group[2].start : group[-1].end].decode()
            out.append((name, value))
    return out


def quote_literal(value: str) -> str:
    """Setting values from URLs are text; quoting always is safe (ClickHouse converts them)."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


_IDENT_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def quote_identifier(name: str) -> str:
    return "`" + name.replace("\\", "\\\\").replace("`", "\\`") + "`"


# -- the statement guard -----------------------------------------------------------------------------
# This server is ours, so it refuses what a real server's default profile refuses a user without
# grants on outside sources: one statement per request, GET read-only, access settings fixed, nothing
# that reaches outside the engine (files, URLs, other servers, programs, the host's SYSTEM commands).
# Two layers: ``guard`` reads every token of the statement (strings and comments are tokens of their
# own, so they can neither hide nor fake a call), then ``ast_violation`` reads the engine's own parse
# tree (``EXPLAIN AST``, which parses without executing) for what spelling might still disguise.

# Table functions that only read the engine's own data or generate rows; every other one is refused.
ALLOWED_TABLE_FUNCTIONS = frozenset(
    {
        "numbers", "numbers_mt", "zeros", "zeros_mt", "generaterandom", "generateseries", "generate_series",
        "primes", "values", "sqlstandardvalues", "view", "viewexplain", "viewifpermitted", "merge", "null",
        "format", "loop", "dictionary", "mergetreeindex", "mergetreeprojection", "mergetreeanalyzeindexes",
        "mergetreeanalyzeindexesuuid", "mergetreecodecblockcounts", "mergetreetextindex", "fuzzjson", "fuzzquery",
    }
)  # fmt: skip
# Table and database engines that keep their data inside the engine's directory.
ALLOWED_ENGINES = frozenset(
    {
        "mergetree", "replacingmergetree", "summingmergetree", "aggregatingmergetree", "collapsingmergetree",
        "versionedcollapsingmergetree", "graphitemergetree", "coalescingmergetree", "memory", "log", "tinylog",
        "stripelog", "null", "set", "join", "buffer", "merge", "dictionary", "view", "materializedview",
        "generaterandom", "alias", "loop", "atomic", "ordinary", "lazy",
    }
)  # fmt: skip
# Refused as a call anywhere, whatever the engine's lists add at start-up (Engine.denied_functions):
# table functions and engines of outside sources, dictionary sources, and scalar functions that read
# files (``file``, ``catboostEvaluate``) or define disks at arbitrary paths (``disk``).
DENIED_FUNCTIONS = frozenset(
    {
        "file", "filecluster", "filesystem", "filelog", "url", "urlcluster", "http", "remote", "remotesecure",
        "cluster", "clusterallreplicas", "distributed", "s3", "s3cluster", "s3queue", "gcs", "oss", "cosn",
        "hdfs", "hdfscluster", "azureblobstorage", "azureblobstoragecluster", "azurequeue", "iceberg",
        "icebergs3", "icebergazure", "iceberghdfs", "iceberglocal", "icebergcluster", "icebergs3cluster",
        "icebergazurecluster", "iceberghdfscluster", "iceberglocalcluster", "deltalake", "deltalakes3",
        "deltalakeazure", "deltalakelocal", "deltalakecluster", "deltalakes3cluster", "deltalakeazurecluster",
        "hudi", "hudicluster", "paimon", "postgresql", "mysql", "sqlite", "jdbc", "odbc", "mongodb", "mongo",
        "redis", "cassandra", "executable", "executablepool", "executable_pool", "input", "python", "eval",
        "arrowstream", "arrowflight", "bigquery", "ytsaurus", "kafka", "rabbitmq", "nats", "hive", "queryrunner",
        "materializedpostgresql", "materializedmysql", "keepermap", "embeddedrocksdb", "yamlregexptree",
        "prometheusquery", "prometheusqueryrange", "disk", "catboostevaluate", "modelevaluate", "replicated",
    }
)  # fmt: skip
# Settings a client may not change (the server's profile fixes them, as constraints do on a real server).
ACCESS_SETTINGS = frozenset(
    {
        "readonly", "allow_ddl", "allow_introspection_functions", "dialect", "profile",
        "max_concurrent_queries_for_user", "max_concurrent_queries_for_all_users", "max_sessions_for_user",
        "input_format_record_errors_file_path",
        "format_schema", "format_schema_source", "format_template_resultset", "format_template_row",
        "output_format_schema", "format_avro_schema_registry_url", "into_outfile_create_parent_directories",
        "s3_allow_server_credentials_in_user_queries", "max_execution_time_leaf",
    }
)  # fmt: skip
ACCESS_KINDS = {  # statement kind -> the grant ClickHouse names when a user lacks it
    "SYSTEM": "SYSTEM",
    "KILL": "KILL QUERY",
    "BACKUP": "BACKUP",
    "RESTORE": "BACKUP",
    "GRANT": "ACCESS MANAGEMENT",
    "REVOKE": "ACCESS MANAGEMENT",
    "MOVE": "ACCESS MANAGEMENT",
}
ACCESS_ENTITIES = frozenset({"USER", "ROLE", "QUOTA", "POLICY", "ROW", "PROFILE", "SETTINGS", "NAMED", "MASKING"})
# Words after which ``name (`` is a table (with its column list), not a call.
_TABLE_NAME_BEFORE = frozenset({"INTO", "TABLE", "EXISTS", "VIEW", "DICTIONARY", "DATABASE"})
# A dictionary source ``CLICKHOUSE(...)`` may name local tables only: no host, no SQL of its own.
_LOCAL_DICTIONARY_KEYS = frozenset({"TABLE", "DB", "DATABASE", "UPDATE_FIELD", "UPDATE_LAG"})

_SOURCE_GRANT = {
    "file": "FILE", "filecluster": "FILE", "filesystem": "FILE", "filelog": "FILE", "disk": "FILE",
    "catboostevaluate": "FILE", "url": "URL", "urlcluster": "URL", "http": "URL", "remote": "REMOTE",
    "remotesecure": "REMOTE", "cluster": "REMOTE", "clusterallreplicas": "REMOTE", "distributed": "REMOTE",
    "mysql": "MYSQL", "postgresql": "POSTGRES", "sqlite": "SQLITE", "jdbc": "JDBC", "odbc": "ODBC",
    "mongodb": "MONGO", "redis": "REDIS", "hdfs": "HDFS", "hdfscluster": "HDFS", "kafka": "KAFKA",
}  # fmt: skip


@dataclass(frozen=True)
class Policy:
    """What the guard allows; ``denied_functions`` is completed from the engine's own lists at start-up."""

    user: str = "default"
    denied_functions: frozenset[str] = DENIED_FUNCTIONS
    allowed_table_functions: frozenset[str] = ALLOWED_TABLE_FUNCTIONS
    allowed_engines: frozenset[str] = ALLOWED_ENGINES
    max_execution_time: float = 300.0


def _grant_name(name: str) -> str:
    low = name.lower()
    if low in _SOURCE_GRANT:
        return _SOURCE_GRANT[low]
    for prefix, grant in (("s3", "S3"), ("azure", "AZURE"), ("hdfs", "HDFS"), ("iceberg", "S3"), ("deltalake", "S3")):
        if low.startswith(prefix):
            return grant
    return name.upper()


def access_denied(user: str, grant: str) -> ClickHouseError:
    text = f"{user}: Not enough privileges. To execute this query, it's necessary to have the grant {grant}"
    return ch_error(497, "ACCESS_DENIED", text)


def source_denied(user: str, name: str, write: bool = False) -> ClickHouseError:
    return access_denied(user, f"{'WRITE' if write else 'READ'} ON {_grant_name(name)}")


def engine_denied(user: str, name: str) -> ClickHouseError:
    return access_denied(user, f"TABLE ENGINE ON {name}")


def multi_statement_error(buf: bytes, at: int) -> ClickHouseError:
    snippet = buf[at : at + 64].decode("utf-8", "replace").replace("\n", " ")
    text = f"Syntax error (Multi-statements are not allowed): failed at position {at + 1} (end of query): {snippet}"
    return ch_error(62, "SYNTAX_ERROR", text)


def setting_error(name: str, readonly: bool) -> ClickHouseError:
    if readonly:
        return ch_error(164, "READONLY", f"Cannot modify '{name}' setting in readonly mode")
    return ch_error(452, "SETTING_CONSTRAINT_VIOLATION", f"Setting {name} should not be changed")


def _unquote(value: str) -> str:
    value = value.strip()
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"`":
        return value[1:-1]
    return value


def check_settings_policy(assignments: list[tuple[str, str]], readonly: bool, policy: Policy) -> None:
    """URL parameters, ``SET`` and ``SETTINGS`` clauses alike: access settings are fixed, time is capped."""
    for name, value in assignments:
        low = name.lower()
        if low in ACCESS_SETTINGS:
            raise setting_error(name, readonly)
        if low == "max_execution_time":
            try:
                seconds = float(_unquote(value))
            except ValueError:
                continue  # the engine reports a value it cannot parse
            if seconds <= 0 or seconds > policy.max_execution_time:
                limit = f"{policy.max_execution_time:g}"
                raise ch_error(
                    452, "SETTING_CONSTRAINT_VIOLATION", f"Setting max_execution_time shouldn't be greater than {limit}"
                )


def _text(buf: bytes, tok: Token) -> str:
    return buf[tok.start : tok.end].decode("utf-8", "replace")


def _name(buf: bytes, tok: Token | None) -> str:
    """A word, or a quoted identifier without its quotes (ClickHouse accepts both as function names)."""
    if tok is None:
        return ""
    if tok.kind == "word":
        return _text(buf, tok)
    if tok.kind == "ident":
        return _text(buf, tok)[1:-1].replace("\\", "")
    return ""


def _is(buf: bytes, tok: Token | None, text: bytes) -> bool:
    return tok is not None and tok.kind == "punct" and buf[tok.start : tok.end] == text


def settings_clauses(buf: bytes, toks: list[Token]) -> list[tuple[str, str]]:
    """Every ``SETTINGS a = 1, b = 'x'`` clause of a statement, at any depth, as (name, value)."""
    out: list[tuple[str, str]] = []
    for i, tok in enumerate(toks):
        if _word(buf, tok) != "SETTINGS":
            continue
        j, depth = i + 1, tok.depth
        while j + 1 < len(toks) and toks[j].depth == depth and toks[j].kind in ("word", "ident"):
            if not _is(buf, toks[j + 1], b"="):
                break
            name, k = _name(buf, toks[j]), j + 2
            while k < len(toks) and toks[k].depth >= depth and not (toks[k].depth == depth and _is(buf, toks[k], b",")):
                if toks[k].depth == depth and toks[k].kind == "word" and k > j + 2:
                    break  # the next clause (FORMAT, ...) starts
                if toks[k].depth == depth and _is(buf, toks[k], b";"):
                    break
                k += 1
            value = buf[toks[j + 2].start : toks[k - 1].end].decode("utf-8", "replace") if k > j + 2 else ""
            out.append((name, value))
            if k < len(toks) and _is(buf, toks[k], b","):
                j = k + 1
            else:
                break
    return out


def guard(
    buf: bytes, stmt: Statement, readonly: bool, policy: Policy, extra_settings: list[tuple[str, str]] | None = None
) -> None:
    """Refuse, with ClickHouse's own error, a statement this server must not run for a client.

    ``buf`` is the whole request SQL (for an INSERT with inline data, the part the engine parses as SQL:
    everything before the data, and the data too for ``Values``, whose rows are SQL expressions).
    """
    user, kind = policy.user, stmt.kind
    toks = list(tokens(buf))
    # One statement: nothing but a trailing semicolon after the first top-level one.
    for i, tok in enumerate(toks):
        if tok.depth == 0 and _is(buf, tok, b";") and any(not _is(buf, t, b";") for t in toks[i + 1 :]):
            raise multi_statement_error(buf, tok.start)
        if tok.depth == 0 and _word(buf, tok) == "PARALLEL" and i + 1 < len(toks) and _word(buf, toks[i + 1]) == "WITH":
            raise multi_statement_error(buf, tok.start)
    words = [_word(buf, t) if t.depth == 0 else "" for t in toks[:6]]
    if kind in ACCESS_KINDS:
        raise access_denied(user, f"{ACCESS_KINDS[kind]} ON *.*")
    if kind in ("CREATE", "ALTER", "DROP", "ATTACH", "DETACH", "SHOW", "REPLACE") or kind == "SET":
        rest = [w for w in words[1:] if w not in ("OR", "REPLACE", "TEMPORARY", "IF", "NOT", "EXISTS")]
        entity = rest[:1] and (rest[0] in ACCESS_ENTITIES - {"SETTINGS"} or rest[:2] == ["SETTINGS", "PROFILE"])
        if entity and kind not in ("SHOW", "SET"):
            raise access_denied(user, "ACCESS MANAGEMENT ON *.*")
        if kind == "SET" and rest[:1] in (["ROLE"], ["DEFAULT"]):
            raise access_denied(user, "ACCESS MANAGEMENT ON *.*")
    if readonly and kind not in READONLY_KINDS:
        raise ch_error(
            164,
            "READONLY",
            f"{user}: Cannot execute query in readonly mode. For queries over HTTP, "
            "method GET implies readonly. You should use method POST for modifying queries",
        )
    insert_function = kind == "INSERT" and any(_word(buf, t) == "FUNCTION" for t in toks[:4])
    for i, tok in enumerate(toks):
        word = _word(buf, tok)
        nxt = toks[i + 1] if i + 1 < len(toks) else None
        prev = toks[i - 1] if i > 0 else None
        if word == "INTO" and _word(buf, nxt) == "OUTFILE":
            raise ch_error(358, "INTO_OUTFILE_NOT_ALLOWED", "INTO OUTFILE is not allowed")
        if word == "FROM" and _word(buf, nxt) == "INFILE":
            raise ch_error(78, "UNKNOWN_TYPE_OF_QUERY", "Query has infile and was send directly to server")
        if kind == "ATTACH" and word == "FROM" and nxt is not None and nxt.kind == "string":
            raise ch_error(481, "PATH_ACCESS_DENIED", f"File {_text(buf, nxt)} is not inside the server's user files")
        if word == "ENGINE" and kind in ("CREATE", "ATTACH", "REPLACE", "ALTER"):
            # Only a storage definition names an engine; elsewhere `engine` is a column (system.tables).
            j = i + 2 if _is(buf, nxt, b"=") else i + 1
            engine = _name(buf, toks[j]) if j < len(toks) else ""
            if engine and engine.lower() not in policy.allowed_engines:
                raise engine_denied(user, engine)
        if word == "SOURCE" and _is(buf, nxt, b"(") and i + 2 < len(toks):
            source = _name(buf, toks[i + 2]).upper()
            if source not in ("CLICKHOUSE", "NULL"):
                raise source_denied(user, source.lower())
            end = next((k for k, t in enumerate(toks[i + 3 :]) if t.depth <= tok.depth), len(toks))
            inner = [t for t in toks[i + 3 : i + 3 + end] if t.depth == tok.depth + 2 and t.kind == "word"]
            for key in inner:
                if _word(buf, key) not in _LOCAL_DICTIONARY_KEYS:
                    raise source_denied(user, "remote")
        name = _name(buf, tok)
        if name and _is(buf, nxt, b"(") and name.lower() in policy.denied_functions:
            defines = kind in ("INSERT", "CREATE", "ATTACH", "REPLACE")
            if defines and (_word(buf, prev) in _TABLE_NAME_BEFORE or _is(buf, prev, b".")):
                continue  # ``INSERT INTO remote (a, b)``: a table called like a function
            raise source_denied(user, name, write=insert_function)
    assignments = list(stmt.assignments) + settings_clauses(buf, toks) + list(extra_settings or [])
    check_settings_policy(assignments, readonly, policy)


def ast_violation(ast: str, policy: Policy) -> ClickHouseError | None:
    """The second layer: the engine's own parse tree, which spelling cannot disguise.

    ``EXPLAIN AST`` prints one node a line, indented by depth: a table function is a ``Function`` under a
    ``TableExpression`` (or straight under ``InsertQuery`` for ``INSERT INTO FUNCTION``), an engine a
    ``Function`` under ``Storage definition``, a dictionary source ``FunctionWithKeyValueArguments``, and
    ``INTO OUTFILE`` / ``FROM INFILE`` a bare ``Literal`` child of the query node.
    """
    user = policy.user
    parents: list[list[Any]] = []  # [indent, line, children seen so far]
    for raw in ast.splitlines():
        if not raw.strip():
            continue
        indent = len(raw) - len(raw.lstrip(" "))
        line = raw.strip()
        while parents and parents[-1][0] >= indent:
            parents.pop()
        parent = parents[-1][1] if parents else ""
        first_child = not parents or parents[-1][2] == 0
        if parents:
            parents[-1][2] += 1
        node, _, rest = line.partition(" ")
        name = rest.split(" ")[0].strip() if rest else ""
        if indent == 0 and line.startswith(("SYSTEM", "KillQuery", "Backup", "Grant", "SetRole", "MoveAccess")):
            return access_denied(user, "SYSTEM ON *.*" if line.startswith("SYSTEM") else "ACCESS MANAGEMENT ON *.*")
        if node == "FunctionWithKeyValueArguments":
            name = rest.strip().split(" ")[0]
            if parent.startswith("Dictionary definition") and name.lower() not in ("clickhouse", "null"):
                return source_denied(user, name)
        elif node == "Function" and name:
            low = name.lower()
            if parent.startswith("Storage definition") and first_child:  # then ORDER BY, PARTITION BY...
                if low not in policy.allowed_engines:
                    return engine_denied(user, name)
            elif parent.startswith("InsertQuery"):
                if low not in policy.allowed_table_functions:
                    return source_denied(user, name, write=True)
            elif parent.startswith("TableExpression"):
                if low not in policy.allowed_table_functions:
                    return source_denied(user, name)
            elif low in policy.denied_functions:
                return source_denied(user, name)
        elif node == "Literal" and parents and indent == parents[0][0] + 1 and len(parents) == 1:
            root = parents[0][1]
            if root.startswith("InsertQuery"):
                return ch_error(78, "UNKNOWN_TYPE_OF_QUERY", "Query has infile and was send directly to server")
            if root.startswith("SelectWithUnionQuery"):
                return ch_error(358, "INTO_OUTFILE_NOT_ALLOWED", "INTO OUTFILE is not allowed")
        parents.append([indent, line, 0])
    return None


def valid_query_id(value: str) -> str:
    """A client's ``query_id`` comes back as a response header: printable ASCII, bounded, or refused."""
    if len(value) > 128 or not all(0x21 <= ord(c) <= 0x7E for c in value):
        raise ch_error(36, "BAD_ARGUMENTS", "Invalid query_id: at most 128 printable ASCII characters without spaces")
    return value


# -- the engine --------------------------------------------------------------------------------------

# Longer statements (a reconcile's long IN list) rely on the token guard alone: the parse tree of a huge
# literal list costs as much as the query, and the engine's own max_query_size is of this order.
AST_CHECK_MAX = 256 << 10

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
        import tempfile

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
        import shutil

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
        import shutil

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

    def lease(self, session: Session | None = None, timeout: float = 300.0) -> Conn:
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

    def give_back(self, conn: Conn, session: Session | None = None) -> None:
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
        """The engine parses the client's statement (without running it) for the guard.

        A statement EXPLAIN AST cannot parse fails the same way when run, after the token guard passed it.
        """
        if self.check_ast is None or len(sql) > AST_CHECK_MAX:
            return
        try:
            ast = bytes(conn.raw.query(b"EXPLAIN AST " + sql, "TabSeparatedRaw", params=params or {}).bytes())
        except Exception:
            return
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
        data = bytes(res.bytes()) if res.size() else b""
        return Outcome(
            data=data,
            read_rows=res.storage_rows_read(),
            read_bytes=res.storage_bytes_read(),
            written_rows=res.rows_written(),
            written_bytes=res.bytes_written(),
            result_rows=res.rows_read(),
            result_bytes=len(data),
            elapsed_ns=int(res.elapsed() * 1e9),
        )

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

        data = bytes(first.bytes()) if first.size() else b""
        return Outcome(
            data=data,
            read_rows=first.storage_rows_read(),
            read_bytes=first.storage_bytes_read(),
            result_rows=first.rows_read(),
            result_bytes=len(data),
            elapsed_ns=int(first.elapsed() * 1e9),
            rest=rest(),
            cancel=cancel,
        )

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
                conn.raw.query(f"CREATE TEMPORARY TABLE {name} ({table.structure}) ENGINE = Memory", "TabSeparated")
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


@dataclass
class ExternalTable:
    """One uploaded file of a multipart request, queried as a temporary table named like its form field."""

    name: str
    structure: str
    fmt: str
    data: bytes


# -- HTTP -------------------------------------------------------------------------------------------


DEFAULT_MAX_BODY = 256 << 20


def too_large(what: str, limit: int) -> ClickHouseError:
    return ch_error(229, "QUERY_IS_TOO_LARGE", f"{what} exceeds the server's limit of {limit} bytes")


def _bounded(step: Any, data: bytes, limit: int) -> bytes:
    """Run a streaming decompressor ``step(chunk, max_length)`` without ever holding more than ``limit``."""
    out = bytearray()
    while True:
        part, data, more = step(data, limit + 1 - len(out))
        out += part
        if len(out) > limit:
            raise too_large("Decompressed request body", limit)
        if not more:
            return bytes(out)


def decompress_body(data: bytes, encoding: str, limit: int = DEFAULT_MAX_BODY) -> bytes:
    """Request ``Content-Encoding``: clickhouse-connect sends one lz4/zstd frame per block.

    Decompression stops as soon as the output would exceed ``limit``: a small bomb cannot fill memory.
    """
    encoding = encoding.strip().lower()
    if not encoding or encoding == "identity" or not data:
        return data
    try:
        if encoding == "lz4" and lz4_frame is not None:
            frames: list[Any] = [None]

            def lz4_step(chunk: bytes, room: int) -> tuple[bytes, bytes, bool]:
                if frames[0] is None:
                    frames[0] = lz4_frame.LZ4FrameDecompressor()
                dec = frames[0]
                out = dec.decompress(chunk, max_length=room)
                if dec.eof:
                    frames[0] = None
                    rest = dec.unused_data or b""
                    return out, rest, bool(rest)
                return out, b"", bool(out) and not dec.needs_input

            return _bounded(lz4_step, data, limit)
        if encoding == "zstd" and zstd is not None:
            zdecs: list[Any] = [zstd.ZstdDecompressor()]

            def zstd_step(chunk: bytes, room: int) -> tuple[bytes, bytes, bool]:
                dec = zdecs[0]
                out = dec.decompress(chunk, max_length=room)
                if dec.eof:
                    rest = dec.unused_data
                    zdecs[0] = zstd.ZstdDecompressor()
                    return out, rest, bool(rest)
                return out, b"", not dec.needs_input

            return _bounded(zstd_step, data, limit)
        if encoding in ("gzip", "x-gzip", "deflate"):
            wbits = 31 if encoding != "deflate" else 15
            zdec = zlib.decompressobj(wbits)

            def zlib_step(chunk: bytes, room: int) -> tuple[bytes, bytes, bool]:
                out = zdec.decompress(chunk, room)
                rest = zdec.unconsumed_tail
                if zdec.eof:
                    if encoding != "deflate" and zdec.unused_data:  # concatenated gzip members
                        raise ValueError("concatenated gzip members are not supported")
                    return out, b"", False
                return out, rest, bool(rest) or bool(out)

            result = _bounded(zlib_step, data, limit)
            if not zdec.eof:
                raise ValueError("truncated body")
            return result
        if encoding == "br" and brotli is not None:
            out = bytes(brotli.decompress(data))  # no bounded API in every brotli release: check after
            if len(out) > limit:
                raise too_large("Decompressed request body", limit)
            return out
    except ClickHouseError:
        raise
    except Exception as exc:
        raise ch_error(432, "UNKNOWN_CODEC", f"Cannot decompress {encoding} request body: {exc}") from None
    raise ch_error(432, "UNKNOWN_CODEC", f"Unknown HTTP content encoding '{encoding}'")


def compress_body(data: bytes, accept: str) -> tuple[bytes, str | None]:
    """Pick the client's first offered encoding that we have, in its order of preference."""
    for raw in accept.split(","):
        enc = raw.split(";")[0].strip().lower()
        if enc == "lz4" and lz4_frame is not None:
            return lz4_frame.compress(data), enc
        if enc == "zstd" and zstd is not None:
            return bytes(zstd.compress(data)), enc
        if enc == "gzip":
            return gzip.compress(data, compresslevel=3), enc
        if enc == "deflate":
            return zlib.compress(data, 3), enc
        if enc == "br" and brotli is not None:
            return bytes(brotli.compress(data, quality=3)), enc
    return data, None


def content_type(fmt: str) -> str:
    upper = fmt.upper()
    if upper.startswith(("TABSEPARATED", "TSV")):
        return "text/tab-separated-values; charset=UTF-8"
    if upper.startswith("CSV"):
        return "text/csv; charset=UTF-8; header=absent"
    if upper.startswith("JSON"):
        return "application/json; charset=UTF-8"
    if upper.startswith(("NATIVE", "ROWBINARY", "PARQUET", "ARROW", "ORC", "AVRO", "MSGPACK", "PROTOBUF")):
        return "application/octet-stream"
    return "text/plain; charset=UTF-8"


_HIDES_SQL = re.compile(rb"[A-Za-z_`\"][A-Za-z0-9_`\"$]*\s*\(|;|/\*|--|#")


def _may_hide_sql(values: bytes) -> bool:
    """Cheap pre-check of Values rows: only a call, a comment or a semicolon needs the full token guard."""
    return _HIDES_SQL.search(values) is not None


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_FORMAT_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,63}$")


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes")


# -- multipart bodies and external data ---------------------------------------------------------------

_BOUNDARY_RE = re.compile(r'boundary=(?:"([^"]+)"|([^;\s]+))', re.IGNORECASE)
_DISPOSITION_PARAM_RE = re.compile(r';\s*([A-Za-z0-9_*-]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^;]*))')


def parse_multipart(body: bytes, content_type: str) -> tuple[dict[str, bytes], dict[str, tuple[str, bytes]]]:
    """``multipart/form-data``: plain fields (query, ``param_*``, settings) and uploaded files by field name.

    clickhouse-connect sends one once bound parameters exceed 4,096 URL-encoded characters, and for
    external data; curl ``-F`` too. A file part is one whose disposition names a ``filename``.
    """
    match = _BOUNDARY_RE.search(content_type)
    if match is None:
        raise ch_error(36, "BAD_ARGUMENTS", "multipart/form-data request without a boundary")
    delimiter = b"--" + (match.group(1) or match.group(2)).encode("latin-1")
    fields: dict[str, bytes] = {}
    files: dict[str, tuple[str, bytes]] = {}
    pos = body.find(delimiter)
    if pos < 0:
        raise ch_error(36, "BAD_ARGUMENTS", "Malformed multipart/form-data body: no boundary line")
    while True:
        pos += len(delimiter)
        if body.startswith(b"--", pos):
            return fields, files
        pos += 2 if body.startswith(b"\r\n", pos) else 1 if body.startswith(b"\n", pos) else 0
        head_end, sep = body.find(b"\r\n\r\n", pos), 4
        if head_end < 0:
            head_end, sep = body.find(b"\n\n", pos), 2
        end = body.find(b"\r\n" + delimiter, head_end + sep) if head_end >= 0 else -1
        if end < 0:
            raise ch_error(36, "BAD_ARGUMENTS", "Malformed multipart/form-data body: truncated part")
        name, filename = None, None
        for line in body[pos:head_end].decode("utf-8", "replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip().lower() != "content-disposition":
                continue
            for pname, quoted, bare in _DISPOSITION_PARAM_RE.findall(value):
                text = quoted.replace('\\"', '"').replace("%22", '"') if quoted else bare.strip()
                if pname.lower() == "name":
                    name = text
                elif pname.lower() == "filename":
                    filename = text
        content = body[head_end + sep : end]
        if name is not None:
            if filename is not None:
                files[name] = (filename, content)
            else:
                fields[name] = content
        pos = end + 2


def external_tables(files: dict[str, tuple[str, bytes]], params: dict[str, str]) -> list[ExternalTable]:
    """Each uploaded file as ClickHouse takes it: ``<name>_structure`` ("a UInt8, b String") or
    ``<name>_types`` ("UInt8,String": columns _1, _2...), ``<name>_format`` (TabSeparated by default)."""
    tables = []
    for name, (_filename, data) in files.items():
        if not _IDENT_RE.match(name):
            raise ch_error(36, "BAD_ARGUMENTS", f"Invalid external table name '{name}'")
        structure = params.get(f"{name}_structure")
        types = params.get(f"{name}_types")
        if not structure and types:
            structure = ", ".join(f"_{i} {t.strip()}" for i, t in enumerate(_split_top(types), 1))
        if not structure:
            raise ch_error(
                36,
                "BAD_ARGUMENTS",
                f"Neither structure nor types have not been provided for external table {name}. "
                f"Use fields {name}_structure or {name}_types to do so.",
            )
        fmt = params.get(f"{name}_format") or "TabSeparated"
        if not _FORMAT_RE.match(fmt):
            raise ch_error(73, "UNKNOWN_FORMAT", f"Unknown format {fmt}")
        _check_structure(structure)
        tables.append(ExternalTable(name, structure, fmt, data))
    return tables


def _split_top(text: str) -> list[str]:
    """``UInt8,Tuple(a UInt8, b String)`` -> the two types: commas inside brackets do not split."""
    out: list[str] = []
    cur: list[str] = []
    depth = 0
    for ch in text:
        if ch in "([":
            depth += 1
        elif ch in ")]":
            depth -= 1
        if ch == "," and depth == 0:
            out.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    out.append("".join(cur))
    return [t for t in out if t.strip()]


def _check_structure(structure: str) -> None:
    """A column list goes into our own DDL: it may not close the bracket or add a statement or clause."""
    buf = structure.encode()
    depth = 0
    for tok in tokens(buf):
        text = buf[tok.start : tok.end]
        if tok.kind == "punct" and text in (b"(", b"["):
            depth += 1
        elif tok.kind == "punct" and text in (b")", b"]"):
            depth -= 1
        if depth < 0 or (tok.kind == "punct" and text == b";"):
            raise ch_error(62, "SYNTAX_ERROR", f"Invalid external table structure: {structure[:200]}")
    if depth != 0 or buf.count(b"/*") or buf.count(b"--"):
        raise ch_error(62, "SYNTAX_ERROR", f"Invalid external table structure: {structure[:200]}")


# -- streamed responses ------------------------------------------------------------------------------


class StreamCompressor:
    """A response ``Content-Encoding`` applied block by block, each block flushed as it leaves."""

    def __init__(self, encoding: str) -> None:
        self.encoding = encoding
        self._head = b""
        if encoding == "lz4":
            self._c: Any = lz4_frame.LZ4FrameCompressor(auto_flush=True)
            self._head = self._c.begin()
        elif encoding == "zstd":
            self._c = zstd.ZstdCompressor()
        elif encoding in ("gzip", "deflate"):
            self._c = zlib.compressobj(3, zlib.DEFLATED, 31 if encoding == "gzip" else 15)
        elif encoding == "br":
            self._c = brotli.Compressor(quality=3)
        else:
            raise ValueError(encoding)

    @staticmethod
    def pick(accept: str) -> str | None:
        for raw in accept.split(","):
            enc = raw.split(";")[0].strip().lower()
            if (enc == "lz4" and lz4_frame is not None) or (enc == "zstd" and zstd is not None):
                return enc
            if enc in ("gzip", "deflate") or (enc == "br" and brotli is not None):
                return enc
        return None

    def compress(self, data: bytes) -> bytes:
        head, self._head = self._head, b""
        if self.encoding == "lz4":
            return head + self._c.compress(data)
        if self.encoding == "zstd":
            return bytes(self._c.compress(data, zstd.ZstdCompressor.FLUSH_BLOCK))
        if self.encoding == "br":
            return bytes(self._c.process(data)) + bytes(self._c.flush())
        return self._c.compress(data) + self._c.flush(zlib.Z_SYNC_FLUSH)

    def finish(self) -> bytes:
        head, self._head = self._head, b""
        if self.encoding == "lz4":
            return head + self._c.flush()
        if self.encoding == "zstd":
            return bytes(self._c.flush())
        if self.encoding == "br":
            return bytes(self._c.finish())
        return self._c.flush()


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
        import select

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
        self.sessions = Sessions(on_expire=engine.drop)
        self.limits = limits or Limits()
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
        stmt = analyze(query[:4096])
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
        stmt = analyze(sql)
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
        # which are SQL expressions (the Values parser evaluates them).
        checked = sql
        if stmt.insert_head is not None:
            is_values = (stmt.insert_format or "").lower() == "values"
            if not is_values or not _may_hide_sql(sql[stmt.data_offset :]):
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


# -- entry point ------------------------------------------------------------------------------------


def serve(host: str, port: int, data_dir: Path, user: str, password: str, limits: Limits | None = None) -> None:
    """Run until SIGTERM/SIGINT, then close chdb so the next start can open the directory."""
    os.umask(0o077)  # every file and directory the engine creates is ours alone
    try:
        engine = Engine(data_dir.resolve(), (limits or Limits()).max_concurrent_queries)
    except RuntimeError as exc:
        # chdb's only word for "another process has this directory open" is this generic error.
        print(
            f"event=failed data_dir={data_dir} error={str(exc)!r} hint='only one process may open a chdb "
            "data directory: is another clickhouse_server (or chdb user) running on it?'",
            flush=True,
        )
        raise SystemExit(1) from None
    try:
        server = ClickHouseHTTPServer((host, port), engine, user, password, limits)
    except OSError:
        engine.close()  # port taken: leave the data directory clean for the next attempt
        raise

    def stop(signum: int, _frame: Any) -> None:
        print(f"event=stopping signal={signal.Signals(signum).name}", flush=True)
        # shutdown() waits for serve_forever, which runs in this (main) thread: call it from another.
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print(
        f"event=listening host={host} port={port} data_dir={data_dir} engine={engine.version} "
        f"timezone={engine.timezone} pid={os.getpid()}",
        flush=True,
    )
    try:
        server.serve_forever(poll_interval=0.2)
    finally:
        server.watch.stop()
        server.server_close()
        engine.close()
        print("event=stopped", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8123)
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--user", default="default")
    parser.add_argument("--max-body-size", type=int, default=DEFAULT_MAX_BODY, help="request body bytes (wire)")
    parser.add_argument(
        "--max-decompressed-size", type=int, default=DEFAULT_MAX_BODY, help="request body bytes after Content-Encoding"
    )
    parser.add_argument("--max-connections", type=int, default=128, help="open connections; beyond: code 202")
    parser.add_argument("--max-execution-time", type=float, default=300.0, help="seconds per query; beyond: code 159")
    parser.add_argument(
        "--max-concurrent-queries", type=int, default=16, help="statements running at once; the next ones wait"
    )
    args = parser.parse_args(argv)
    # The password comes from the environment, never the command line (visible in ps).
    password = os.environ.get(PASSWORD_ENV, "")
    if not password:
        print(f"event=failed error='{PASSWORD_ENV} is empty: this server only runs with a password'", flush=True)
        return 2
    limits = Limits(
        max_body_size=args.max_body_size,
        max_decompressed_size=args.max_decompressed_size,
        max_connections=args.max_connections,
        max_execution_time=args.max_execution_time,
        max_concurrent_queries=args.max_concurrent_queries,
    )
    serve(args.host, args.port, args.data_dir, args.user, password, limits)
    return 0


if __name__ == "__main__":
    sys.exit(main())
