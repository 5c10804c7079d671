"""A corpus of ways around the local ClickHouse server's guard (#20 §1), each refused with ClickHouse's own code.

One server of this module's own (a free port, a password, its own data directory). Every attempt goes over
HTTP as curl or clickhouse-connect would send it, must come back with the exact ``X-ClickHouse-Exception-Code``
and ``Code: N. DB::Exception: ... (NAME)`` body of its class, and must have had no effect at all: the canary
table still holds its three rows and no other table or dictionary appeared, no file was created on the host,
and no host file's content came back. Then the legitimate traffic (clickhouse-connect's inserts and queries)
still works on the same server.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

pytest.importorskip("chdb")
clickhouse_connect = pytest.importorskip("clickhouse_connect")
from clickhouse_connect.driver.exceptions import DatabaseError  # noqa: E402

from tests.integration.test_clickhouse_http import ServerProcess  # noqa: E402

pytestmark = pytest.mark.integration

HOST_FILE = "/etc/os-release"  # world-readable: only the guard stands between it and a client
HOST_TEXT = Path(HOST_FILE).read_text().splitlines()[0]
OUT = f"/tmp/changeflow-corpus-{uuid.uuid4().hex}"  # world-writable: only the guard stops a write there
PAD = "x" * (300 << 10)  # past the fixed 256 KiB max_query_size
DEEP = 5000


@dataclass(frozen=True)
class Attempt:
    label: str
    sql: str
    code: int
    name: str
    params: dict[str, str] = field(default_factory=dict)
    method: str = "POST"
    body: str | None = None  # when set, ``sql`` travels in the ``query`` URL parameter and this in the body


def a(label: str, sql: str, code: int, name: str, **kw: object) -> Attempt:
    return Attempt(label, sql, code, name, **kw)  # type: ignore[arg-type]


SYNTAX, DENIED, READONLY, CONSTRAINT = (62, "SYNTAX_ERROR"), (497, "ACCESS_DENIED"), (164, "READONLY"), (
    452, "SETTING_CONSTRAINT_VIOLATION")  # fmt: skip
FILE_FN = f"file('{HOST_FILE}', 'LineAsString')"
DICT = "CREATE DICTIONARY changeflow.d (k UInt64, v String) PRIMARY KEY k SOURCE({source}) LAYOUT(FLAT()) LIFETIME(0)"

CORPUS = [
    # $$...$$ and $tag$...$tag$ strings: a quote inside one must not open a string for the guard.
    a("heredoc hides a quote", f"SELECT $$'$$ AS x, * FROM {FILE_FN} -- '", *DENIED),
    a("heredoc + max_query_size just above", f"SELECT $$'$$ AS x, * FROM {FILE_FN} -- '", *CONSTRAINT,
      params={"max_query_size": "200"}),
    a("tagged heredoc hides a quote", f"SELECT $t$'$t$ AS x, * FROM {FILE_FN} -- '", *DENIED),
    a("heredoc hides a semicolon's quote", "SELECT $$'$$; DROP TABLE changeflow.canary --'", *SYNTAX),
    a("heredoc never closed", "SELECT $$'; DROP TABLE changeflow.canary --'", *SYNTAX),
    a("dollar tag with a space", f"SELECT $a b$ 1 $a b$, * FROM {FILE_FN}", *SYNTAX),
    # Nested comments.
    a("nested comment closes later", f"SELECT /* /* */ 1 */ * FROM {FILE_FN}", *DENIED),
    a("nested comment then a second statement", "SELECT 1 /* /* */ */ ; DROP TABLE changeflow.canary", *SYNTAX),
    a("a // comment hides a quote", f"SELECT 1 // '\n, * FROM {FILE_FN} -- '", *DENIED),
    a("nested comment never closed", "SELECT 1 /* /* */ ; DROP TABLE changeflow.canary", *SYNTAX),
    # Padding past the size limit.
    a("padding before file()", f"SELECT '{PAD}' AS pad, * FROM {FILE_FN}", *SYNTAX),
    a("padding before INSERT INTO FUNCTION", f"INSERT INTO FUNCTION file('{OUT}', 'CSV', 'a String') "
      f"SELECT '{PAD}'", *SYNTAX),
    a("padding in a comment before INTO OUTFILE", f"SELECT 1 /* {PAD} */ INTO OUTFILE '{OUT}'", *SYNTAX),
    # Parser limits and access settings: in the URL, SET, SETTINGS (any depth, any quoting, name only).
    a("max_query_size in the URL", "SELECT 1", *CONSTRAINT, params={"max_query_size": "100000000"}),
    a("max_query_size in SETTINGS", "SELECT 1 SETTINGS max_query_size = 100000000", *CONSTRAINT),
    a("quoted max_query_size in a subquery", "SELECT * FROM (SELECT 1 SETTINGS `max_query_size` = 1)", *CONSTRAINT),
    a("max_parser_depth in the URL", "SELECT 1", *CONSTRAINT, params={"max_parser_depth": "100000"}),
    a("max_parser_backtracks name only", "SELECT 1 SETTINGS max_threads = 1, max_parser_backtracks", *CONSTRAINT),
    a("max_ast_elements by SET", "SET max_ast_elements = 100000000", *CONSTRAINT),
    a("max_expanded_ast_elements double-quoted", 'SELECT 1 SETTINGS "max_expanded_ast_elements" = 1', *CONSTRAINT),
    a("readonly by GET", "SELECT 1", *READONLY, params={"readonly": "0"}, method="GET"),
    a("allow_ddl in SETTINGS", "SELECT 1 SETTINGS allow_ddl = 1", *CONSTRAINT),
    # A second statement after a semicolon, anywhere.
    a("second statement", "SELECT 1; DROP TABLE changeflow.canary", *SYNTAX),
    a("second statement inside EXPLAIN", "EXPLAIN AST SELECT 1; DROP TABLE changeflow.canary", *SYNTAX),
    a("second statement inside EXPLAIN behind a heredoc", "EXPLAIN SYNTAX SELECT $$;$$; TRUNCATE TABLE "
      "changeflow.canary", *SYNTAX),
    a("semicolon inside brackets", "SELECT (1; DROP TABLE changeflow.canary)", *SYNTAX),
    a("query parameter ends, body continues", "SELECT 1;", *SYNTAX, body="DROP TABLE changeflow.canary"),
    a("PARALLEL WITH", "SELECT 1 PARALLEL WITH DROP TABLE changeflow.canary", *SYNTAX),
    a("GET that writes", "INSERT INTO changeflow.canary VALUES (9)", *READONLY, method="GET"),
    # Files, programs, other servers.
    a("INSERT INTO FUNCTION file", f"INSERT INTO FUNCTION file('{OUT}', 'CSV', 'a String') SELECT 'x'", *DENIED),
    a("INSERT INTO TABLE FUNCTION url", "INSERT INTO TABLE FUNCTION url('http://127.0.0.1:1/', 'CSV', 'a String') "
      "SELECT 'x'", *DENIED),
    a("INTO OUTFILE", f"SELECT 1 INTO OUTFILE '{OUT}'", 358, "INTO_OUTFILE_NOT_ALLOWED"),
    a("INTO OUTFILE behind a comment", f"SELECT 1 INTO/**/OUTFILE '{OUT}'", 358, "INTO_OUTFILE_NOT_ALLOWED"),
    a("FROM INFILE", f"INSERT INTO changeflow.canary FROM INFILE '{HOST_FILE}' FORMAT LineAsString", 78,
      "UNKNOWN_TYPE_OF_QUERY"),
    a("file() table function", f"SELECT * FROM {FILE_FN}", *DENIED),
    a("file() in mixed case and backquotes", f"SELECT * FROM `FiLe`('{HOST_FILE}', 'LineAsString')", *DENIED),
    a("file() double-quoted", f"SELECT * FROM \"file\"('{HOST_FILE}', 'LineAsString')", *DENIED),
    a("file() as a scalar", f"SELECT file('{HOST_FILE}')", *DENIED),
    a("file() behind a comment", f"SELECT * FROM file/**/('{HOST_FILE}', 'LineAsString')", *DENIED),
    a("file() behind a line comment", f"SELECT * FROM file -- c\n('{HOST_FILE}', 'LineAsString')", *DENIED),
    a("file() in DESCRIBE", f"DESCRIBE TABLE {FILE_FN}", *DENIED),
    a("url()", "SELECT * FROM url('http://127.0.0.1:1/', 'CSV', 'a String')", *DENIED),
    a("executable()", "SELECT * FROM executable('id', 'TSV', 'a String')", *DENIED),
    a("s3()", "SELECT * FROM s3('http://127.0.0.1:1/x.csv')", *DENIED),
    a("remote()", "SELECT * FROM remote('127.0.0.1:1', system.one)", *DENIED),
    a("input()", "INSERT INTO changeflow.canary SELECT * FROM input('k UInt32')", *DENIED),
    a("File engine", f"CREATE TABLE changeflow.f (a String) ENGINE = File(LineAsString, '{HOST_FILE}')", *DENIED),
    a("Values row calls file()", f"INSERT INTO changeflow.canary VALUES (length({FILE_FN}))", *DENIED),
    a("Values rows then a statement", "INSERT INTO changeflow.canary VALUES ($$x$$); DROP TABLE changeflow.canary",
      *SYNTAX),
    # Dictionary sources, however their keys are quoted.
    a("dictionary FILE source", DICT.format(source=f"FILE(path '{HOST_FILE}' format 'TSV')"), *DENIED),
    a("dictionary `FILE` source", DICT.format(source=f"`FILE`(path '{HOST_FILE}' format 'TSV')"), *DENIED),
    a("dictionary `QUERY` key", DICT.format(source=f"CLICKHOUSE(`QUERY` 'SELECT 1, line FROM {FILE_FN}')"),
      *DENIED),
    a('dictionary "query" key', DICT.format(source=f"CLICKHOUSE(\"query\" 'SELECT 1, line FROM {FILE_FN}')"),
      *DENIED),
    a("dictionary EXECUTABLE source", DICT.format(source="EXECUTABLE(command 'id' format 'TSV')"), *DENIED),
    # SYSTEM, however it is introduced.
    a("SYSTEM", "SYSTEM SHUTDOWN", *DENIED),
    a("SYSTEM behind a block comment", "/* x */ SYSTEM RELOAD CONFIG", *DENIED),
    a("SYSTEM behind line comments", "-- c\n# d\nsystem drop dns cache", *DENIED),
    a("shebang comment, then file()", f"#!/bin/sh\nSELECT * FROM {FILE_FN}", *DENIED),
    # Odd unicode and whitespace: read as the engine reads them (some Unicode spaces are spaces), or refused.
    a("no-break spaces", f"SELECT\u00a0*\u00a0FROM\u00a0{FILE_FN}", *DENIED),
    a("no-break space before OUTFILE", f"SELECT 1 INTO\u00a0OUTFILE '{OUT}'", 358, "INTO_OUTFILE_NOT_ALLOWED"),
    a("byte-order mark before SYSTEM", "\ufeffSYSTEM SHUTDOWN", *DENIED),
    a("ogham space (no space to the engine)", f"SELECT\u1680*\u1680FROM {FILE_FN}", *SYNTAX),
    a("ideographic space before a statement", "SELECT 1\u3000; DROP TABLE changeflow.canary", *SYNTAX),
    a("zero-width space in a name", f"SELECT * FROM fi\u200ble('{HOST_FILE}')", *SYNTAX),
    a("fullwidth SYSTEM", "\uff33\uff39\uff33\uff34\uff25\uff2d SHUTDOWN", *SYNTAX),
    a("NUL byte", "SELECT 1\x00; DROP TABLE changeflow.canary", *SYNTAX),
    a("a '#' that starts no comment", f"SELECT 1 #x\nSELECT * FROM {FILE_FN}", *SYNTAX),
    a("Values row with a no-break space", f"INSERT INTO changeflow.canary VALUES (length(file\u00a0('{HOST_FILE}')))",
      *DENIED),
    a("a parameter named like a heredoc's tag, the tag again later", "SELECT {$x$:String}, * FROM " + FILE_FN +
      " -- $x$", *SYNTAX, params={"param_$x$": "a"}),  # a heredoc to the engine as to the scanner: no call
    # Unknown constructs and what the parser cannot bound.
    a("unknown statement", "PREPARE x AS SELECT 1", *SYNTAX),
    a("very deep nesting", "SELECT " + "(" * DEEP + "1" + ")" * DEEP, 306, "TOO_DEEP_RECURSION"),
    a("very deep nesting around file()", "SELECT " + "(" * DEEP + f"length({FILE_FN})" + ")" * DEEP, *DENIED),
    a("a parse error", "SELECT * FROM numbers(1) WHERE ((1) AND", *SYNTAX),
]  # fmt: skip


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    base = tmp_path_factory.mktemp("clickhouse-corpus")
    with ServerProcess(base / "data", base / "server.log").running() as srv:
        admin = srv.client()
        admin.command("CREATE DATABASE IF NOT EXISTS changeflow")
        admin.command("CREATE TABLE changeflow.canary (k UInt32) ENGINE = MergeTree ORDER BY k")
        admin.insert("changeflow.canary", [[1], [2], [3]], column_names=["k"])
        admin.close()
        yield srv


def engine_state(server: ServerProcess) -> tuple[str, str, str]:
    post = server.http.post
    return (
        post(f"{server.url}/", content="SELECT groupArray(k) FROM (SELECT k FROM changeflow.canary ORDER BY k)").text,
        post(f"{server.url}/", content="SELECT groupArray(name) FROM (SELECT name FROM system.tables "
             "WHERE database NOT IN ('system', 'INFORMATION_SCHEMA', 'information_schema') ORDER BY name)").text,
        post(f"{server.url}/", content="SELECT count() FROM system.dictionaries").text,
    )  # fmt: skip


def send(server: ServerProcess, attempt: Attempt) -> httpx.Response:
    params = dict(attempt.params)
    if attempt.method == "GET":
        return server.http.get(f"{server.url}/", params={**params, "query": attempt.sql})
    if attempt.body is not None:
        return server.http.post(f"{server.url}/", params={**params, "query": attempt.sql}, content=attempt.body)
    return server.http.post(f"{server.url}/", params=params, content=attempt.sql.encode())


def test_the_corpus_covers_every_class_with_forty_attempts_or_more() -> None:
    assert len(CORPUS) >= 40
    assert len({x.label for x in CORPUS}) == len(CORPUS)


@pytest.mark.parametrize("attempt", CORPUS, ids=[x.label for x in CORPUS])
def test_each_bypass_attempt_is_refused_with_clickhouses_code_and_changes_nothing(
    server: ServerProcess, attempt: Attempt
) -> None:
    before = engine_state(server)
    assert before == ("[1,2,3]\n", "['canary']\n", "0\n")
    r = send(server, attempt)
    assert r.headers.get("X-ClickHouse-Exception-Code") == str(attempt.code), r.text[:500]
    assert r.text.startswith(f"Code: {attempt.code}. DB::Exception: "), r.text[:500]
    assert f"({attempt.name}) (version " in r.text, r.text[:500]
    assert r.status_code >= 400
    assert HOST_TEXT not in r.text  # no host file's content came back
    assert engine_state(server) == before  # the canary holds its rows, nothing was created or dropped
    assert not Path(OUT).exists()  # no file was written on the host


@pytest.mark.parametrize("attempt", [x for x in CORPUS if x.method == "POST" and x.body is None and not x.params][:12],
                         ids=lambda x: x.label)  # fmt: skip
def test_clickhouse_connect_sees_an_ordinary_clickhouse_error(server: ServerProcess, attempt: Attempt) -> None:
    client = server.client()
    try:
        with pytest.raises(DatabaseError) as info:
            client.command(attempt.sql)
    finally:
        client.close()
    assert f"Code: {attempt.code}." in str(info.value) and attempt.name in str(info.value)
    assert engine_state(server)[0] == "[1,2,3]\n"


def test_legitimate_traffic_still_works_beside_the_corpus(server: ServerProcess) -> None:
    client = server.client(database="changeflow")
    try:
        client.command(
            "CREATE TABLE IF NOT EXISTS orders (key String, _version UInt64, _is_deleted UInt8, note String, "
            "amount Decimal(12, 2)) ENGINE = ReplacingMergeTree(_version, _is_deleted) ORDER BY key"
        )
        rows = [[f"k{i}", i, 0, f"it's; a /* note */ $$ {i} -- #", i / 4] for i in range(2000)]
        client.insert("orders", rows, column_names=["key", "_version", "_is_deleted", "note", "amount"])
        assert client.command("SELECT count() FROM orders FINAL") == 2000
        got = client.query("SELECT note FROM orders FINAL WHERE key = {k:String}", parameters={"k": "k7"})
        assert got.result_rows == [("it's; a /* note */ $$ 7 -- #",)]
        assert client.command("SELECT $$a;b$$ || 'c' /* nested /* comment */ */ -- tail") == "a;bc"
        assert client.command("SELECT {$x:Int32} + 1;\u00a0", parameters={"$x": 41}) == 42
        assert client.command("SELECT length('a\x1cb\u0085c\u2028d') // a comment") == 10  # raw breaks
        assert client.command("SELECT count() FROM numbers(10) SETTINGS max_threads = 1, max_execution_time = 5") == 10
        in_list = ", ".join(f"'k{i}'" for i in range(5000))  # a reconcile's long IN list, under the size limit
        assert client.command(f"SELECT count() FROM orders FINAL WHERE key IN ({in_list})") == 2000
        client.command("DROP TABLE orders")
    finally:
        client.close()
