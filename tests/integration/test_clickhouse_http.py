"""The chdb-backed ClickHouse HTTP server, driven by the clients our code uses against real servers.

Starts ``deploy.clickhouse_server`` as a subprocess on a free port with a temporary data directory,
then checks that clickhouse-connect works unchanged (Native queries and inserts, lz4 bodies,
server-side parameter binding, errors) and that curl-style HTTP works, concurrently, and survives a
restart. Prints the measured insert and FINAL latencies (run with ``-s`` to see them). The server runs
with a password, as the stack's does; what it refuses is tested in test_clickhouse_security.py.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import gzip
import json
import os
import secrets
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import httpx
import pytest

pytest.importorskip("chdb")
clickhouse_connect = pytest.importorskip("clickhouse_connect")
from clickhouse_connect.driver.client import Client  # noqa: E402
from clickhouse_connect.driver.exceptions import DatabaseError  # noqa: E402

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
UTC = dt.UTC

ORDERS_DDL = """
CREATE TABLE IF NOT EXISTS changeflow.orders (
    key String,
    _version UInt64,
    _is_deleted UInt8,
    amount Decimal(12, 2),
    updated_at DateTime64(3, 'UTC'),
    note Nullable(String),
    status LowCardinality(String)
) ENGINE = ReplacingMergeTree(_version, _is_deleted) ORDER BY key
"""
ORDER_COLUMNS = ["key", "_version", "_is_deleted", "amount", "updated_at", "note", "status"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ServerProcess:
    """The real server as a child process; restartable on the same data directory."""

    def __init__(self, data_dir: Path, log: Path, extra_args: tuple[str, ...] = ()) -> None:
        self.data_dir = data_dir
        self.log = log
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.password = secrets.token_urlsafe(18)
        self.extra_args = extra_args
        # Authenticated like curl -u default:PASSWORD (HTTP Basic).
        self.http = httpx.Client(auth=("default", self.password), timeout=60)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60) -> None:
        env = {**os.environ, "PYTHONPATH": str(ROOT), "CLICKHOUSE_PASSWORD": self.password}
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "changeflow.deploy.clickhouse_server", "--host", "127.0.0.1",
                 "--port", str(self.port), "--data-dir", str(self.data_dir), *self.extra_args],
                cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )  # fmt: skip
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/ping", timeout=1).text == "Ok.\n":
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"server not up after {timeout}s: {self.log.read_text()[-3000:]}")

    def stop(self) -> int:
        assert self.proc is not None
        self.proc.terminate()  # SIGTERM: the clean shutdown path
        code = self.proc.wait(timeout=30)
        self.proc = None
        return code

    @contextlib.contextmanager
    def running(self) -> Iterator[ServerProcess]:
        """Started for the block, stopped (SIGTERM, the clean path) after it."""
        self.start()
        try:
            yield self
        finally:
            self.http.close()
            if self.proc is not None:
                self.stop()

    def client(self, **kwargs: object) -> Client:
        kwargs.setdefault("password", self.password)
        return clickhouse_connect.get_client(host="127.0.0.1", port=self.port, **kwargs)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    base = tmp_path_factory.mktemp("clickhouse")
    srv = ServerProcess(base / "data", base / "server.log")
    srv.start()
    admin = srv.client()
    admin.command("CREATE DATABASE IF NOT EXISTS changeflow")
    admin.command(ORDERS_DDL)
    admin.close()
    try:
        yield srv
    finally:
        if srv.proc is not None:
            srv.stop()


@pytest.fixture()
def ch(server: ServerProcess) -> Iterator[Client]:
    client = server.client(database="changeflow")
    yield client
    client.close()


def test_ping_and_curl_style_get(server: ServerProcess) -> None:
    assert server.http.get(f"{server.url}/ping").text == "Ok.\n"
    assert server.http.get(f"{server.url}/").text == "Ok.\n"
    r = server.http.get(f"{server.url}/", params={"query": "SELECT 1, 'a'"})
    assert r.status_code == 200
    assert r.text == "1\ta\n"
    assert r.headers["X-ClickHouse-Format"] == "TabSeparated"
    assert r.headers["X-ClickHouse-Timezone"] == "UTC"
    assert r.headers["X-ClickHouse-Query-Id"]
    assert r.headers["X-ClickHouse-Server-Display-Name"]
    assert json.loads(r.headers["X-ClickHouse-Summary"])["result_rows"] == "1"
    r = server.http.get(f"{server.url}/", params={"query": "SELECT number FROM numbers(3) FORMAT JSONEachRow"})
    assert [json.loads(line)["number"] for line in r.text.splitlines()] == [0, 1, 2]
    assert r.headers["X-ClickHouse-Format"] == "JSONEachRow"
    r = server.http.get(f"{server.url}/", params={"query": "SELECT 1", "default_format": "CSV", "query_id": "q-1"})
    assert r.headers["X-ClickHouse-Query-Id"] == "q-1"
    assert r.headers["X-ClickHouse-Format"] == "CSV"


def test_get_is_readonly_like_a_real_server(server: ServerProcess) -> None:
    r = server.http.get(f"{server.url}/", params={"query": "CREATE TABLE nope (a UInt8) ENGINE = Memory"})
    assert r.status_code == 500
    assert r.headers["X-ClickHouse-Exception-Code"] == "164"
    assert "(READONLY)" in r.text


def test_replacing_merge_tree_round_trip_with_final(ch: Client) -> None:
    t1 = dt.datetime(2024, 5, 1, 12, 30, 15, 123000, tzinfo=UTC)
    t2 = dt.datetime(2024, 5, 1, 12, 31, 0, 999000, tzinfo=UTC)
    rows = [
        ["o-1", 10, 0, Decimal("10.50"), t1, None, "new"],
        ["o-1", 12, 0, Decimal("11.25"), t2, "paid in full", "paid"],
        ["o-2", 5, 0, Decimal("9999999999.99"), t1, "tab\tquote'backslash\\", "new"],
        ["o-3", 7, 0, Decimal("-0.01"), t1, None, "new"],
        ["o-3", 8, 1, Decimal("-0.01"), t2, None, "deleted"],  # delete by version
    ]
    summary = ch.insert("orders", rows, column_names=ORDER_COLUMNS)
    assert summary.written_rows == len(rows)
    # A replayed, older update arrives later in a part of its own: FINAL must still pick version 12.
    late = [["o-1", 11, 0, Decimal("99.99"), t1, "late, older update", "new"]]
    ch.insert("orders", late, column_names=ORDER_COLUMNS)
    result = ch.query(
        "SELECT key, _version, amount, updated_at, note, status FROM orders FINAL WHERE key IN ('o-1', 'o-2', 'o-3') "
        "ORDER BY key"
    )
    assert result.column_names == ("key", "_version", "amount", "updated_at", "note", "status")
    got = [list(r) for r in result.result_rows]
    # clickhouse-connect returns naive UTC datetimes when the server's time zone is UTC.
    assert got == [
        ["o-1", 12, Decimal("11.25"), t2.replace(tzinfo=None), "paid in full", "paid"],
        ["o-2", 5, Decimal("9999999999.99"), t1.replace(tzinfo=None), "tab\tquote'backslash\\", "new"],
    ]


def test_command_and_server_side_parameters(ch: Client) -> None:
    assert ch.command("SELECT 1") == 1
    assert ch.command("SELECT 'a', 2") == ["a", "2"]
    assert ch.command("SELECT currentDatabase()") == "changeflow"
    ch.command("CREATE TABLE IF NOT EXISTS params_t (k String, v UInt32) ENGINE = MergeTree ORDER BY k")
    ch.command("TRUNCATE TABLE params_t")
    ch.command("INSERT INTO params_t VALUES ({k:String}, {v:UInt32})", parameters={"k": "it's\tx", "v": 7})
    res = ch.query(
        "SELECT k, v, {d:DateTime64(3)} AS d, {xs:Array(String)} AS xs FROM params_t WHERE k = {k:String}",
        parameters={"k": "it's\tx", "d": dt.datetime(2024, 1, 2, 3, 4, 5, 678000), "xs": ["a'b", "c"]},
    )
    assert res.result_rows == [("it's\tx", 7, dt.datetime(2024, 1, 2, 3, 4, 5, 678000), ["a'b", "c"])]
    # client-side binding still works too
    assert ch.query("SELECT v FROM params_t WHERE k = %(k)s", parameters={"k": "it's\tx"}).result_rows == [(7,)]
    assert ch.query("SELECT k FROM params_t LIMIT 0").column_names == ("k",)


def test_errors_raise_database_error_with_clickhouse_message(ch: Client) -> None:
    with pytest.raises(DatabaseError) as info:
        ch.query("SELECT * FROM no_such_table")
    assert "UNKNOWN_TABLE" in str(info.value)
    assert "no_such_table" in str(info.value)
    assert info.value.code == 60
    with pytest.raises(DatabaseError) as info:
        ch.command("SELEC 1")
    assert "Syntax error" in str(info.value)
    with pytest.raises(DatabaseError) as info:
        ch.insert("orders", [["x", 1, 0, Decimal("1"), dt.datetime.now(UTC), None, "s"]], column_names=["nope"] * 7)
    assert "nope" in str(info.value)


@pytest.mark.parametrize("password", ["wrong", "pässwörd", "密码", ""])
def test_wrong_password_is_rejected(server: ServerProcess, password: str) -> None:
    """Any wrong password, non-ASCII ones included (they dropped the connection), is answered 516, whichever
    way it is sent: URL parameter, X-ClickHouse-Key, Basic."""
    url = f"{server.url}/"
    basic = base64.b64encode(f"default:{password}".encode()).decode()
    for r in (httpx.post(url, content="SELECT 1", params={"user": "default", "password": password}, timeout=30),
              httpx.post(url, content="SELECT 1", headers={b"X-ClickHouse-User": b"default",
                                                           b"X-ClickHouse-Key": password.encode()}, timeout=30),
              httpx.post(url, content="SELECT 1", headers={"Authorization": f"Basic {basic}"}, timeout=30)):
        assert (r.status_code, r.headers["X-ClickHouse-Exception-Code"]) == (403, "516"), r.text


def test_curl_style_inserts_and_compressed_bodies(server: ServerProcess) -> None:
    url = f"{server.url}/"
    ddl = "CREATE TABLE IF NOT EXISTS changeflow.curl_t (id UInt64, s String) ENGINE = MergeTree ORDER BY id"
    assert server.http.post(url, content=ddl).status_code == 200
    assert server.http.post(url, params={"query": "TRUNCATE TABLE changeflow.curl_t"}).status_code == 200
    r = server.http.post(url, params={"query": "INSERT INTO changeflow.curl_t FORMAT JSONEachRow"},
                   content=b'{"id": 1, "s": "json"}\n{"id": 2, "s": "two"}\n')  # fmt: skip
    assert r.status_code == 200, r.text
    assert json.loads(r.headers["X-ClickHouse-Summary"])["written_rows"] == "2"
    r = server.http.post(
        url, params={"database": "changeflow"}, content=b'INSERT INTO curl_t FORMAT CSV\n3,csv\n4,"a,b"\n'
    )
    assert r.status_code == 200, r.text
    r = server.http.post(url, params={"database": "changeflow"}, content=b"INSERT INTO curl_t (id, s) VALUES (5, 'v')")
    assert r.status_code == 200, r.text
    gz = gzip.compress(b"INSERT INTO changeflow.curl_t FORMAT TSV\n6\tgzip\n")
    assert server.http.post(url, content=gz, headers={"Content-Encoding": "gzip"}).status_code == 200
    r = server.http.post(
        url,
        content=b"SELECT id, s FROM changeflow.curl_t ORDER BY id FORMAT CSV",
        headers={"Accept-Encoding": "gzip"},
    )
    assert r.headers["Content-Encoding"] == "gzip"
    assert r.text == '1,"json"\n2,"two"\n3,"csv"\n4,"a,b"\n5,"v"\n6,"gzip"\n'
    r = server.http.post(url, content=b"INSERT INTO changeflow.curl_t FORMAT CSV\nnot-a-number,x\n")
    assert r.status_code in (400, 500) and "Code: " in r.text and r.headers["X-ClickHouse-Exception-Code"]


def test_database_and_settings_do_not_leak_between_requests(server: ServerProcess) -> None:
    url = f"{server.url}/"
    assert (
        server.http.post(url, params={"database": "changeflow"}, content="SELECT currentDatabase()").text
        == "changeflow\n"
    )
    assert server.http.post(url, content="SELECT currentDatabase()").text == "default\n"
    q = "SELECT value FROM system.settings WHERE name = 'max_threads'"
    assert server.http.post(url, params={"max_threads": "1"}, content=q).text == "1\n"
    assert server.http.post(url, content=q).text != "1\n"
    r = server.http.post(url, params={"no_such_setting": "1"}, content="SELECT 1")
    assert r.status_code == 404 and "UNKNOWN_SETTING" in r.text
    # USE and SET last for a session, and only for it
    sid = {"session_id": "s-1"}
    assert server.http.post(url, params=sid, content="USE changeflow").status_code == 200
    assert server.http.post(url, params=sid, content="SET max_threads = 1").status_code == 200
    assert server.http.post(url, params=sid, content="SELECT currentDatabase()").text == "changeflow\n"
    assert server.http.post(url, params=sid, content=q).text == "1\n"
    assert server.http.post(url, content="SELECT currentDatabase()").text == "default\n"
    assert server.http.post(url, content=q).text != "1\n"


def test_two_concurrent_clients(server: ServerProcess) -> None:
    admin = server.client(database="changeflow")
    admin.command("CREATE TABLE IF NOT EXISTS conc (w UInt8, i UInt32) ENGINE = MergeTree ORDER BY (w, i)")
    admin.command("TRUNCATE TABLE conc")
    errors: list[BaseException] = []

    def work(worker: int) -> None:
        try:
            client = server.client(database="changeflow")
            for i in range(20):
                client.insert("conc", [[worker, i * 10 + j] for j in range(10)], column_names=["w", "i"])
                assert client.command(f"SELECT count() FROM conc WHERE w = {worker}") == (i + 1) * 10
            client.close()
        except BaseException as exc:  # surfaced in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(w,)) for w in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    assert admin.query("SELECT w, count() FROM conc GROUP BY w ORDER BY w").result_rows == [(1, 200), (2, 200)]
    admin.close()


def test_insert_throughput_and_final_latency(server: ServerProcess) -> None:
    client = server.client(database="changeflow")
    client.command(
        "CREATE TABLE IF NOT EXISTS bench (id UInt64, _version UInt64, amount Decimal(12, 2), name String, "
        "_is_deleted UInt8) ENGINE = ReplacingMergeTree(_version, _is_deleted) ORDER BY id"
    )
    client.command("TRUNCATE TABLE bench")
    cols = ["id", "_version", "amount", "name", "_is_deleted"]
    rows = [[i, 1, Decimal(i) / 100, f"name-{i}", 0] for i in range(100_000)]
    started = time.perf_counter()
    client.insert("bench", rows, column_names=cols)
    took_100k = time.perf_counter() - started
    small = [[i, 2, Decimal(i) / 100, f"name-{i}", 0] for i in range(5_000)]
    runs = []
    for _ in range(5):
        started = time.perf_counter()
        client.insert("bench", small, column_names=cols)
        runs.append(time.perf_counter() - started)
    finals = []
    for _ in range(5):
        started = time.perf_counter()
        assert client.command("SELECT count() FROM bench FINAL") == 100_000
        finals.append(time.perf_counter() - started)
    print(
        f"\n[clickhouse-http] insert 100k rows end-to-end {took_100k:.3f}s ({100_000 / took_100k:,.0f} rows/s); "
        f"5k rows median {sorted(runs)[2] * 1000:.1f} ms; SELECT count() FINAL median {sorted(finals)[2] * 1000:.1f} ms"
    )
    assert took_100k < 10 and sorted(runs)[2] < 2  # loose bounds: a slow CI box must not flake
    client.close()


def test_data_persists_across_restart(server: ServerProcess) -> None:
    client = server.client(database="changeflow")
    client.command("CREATE TABLE IF NOT EXISTS persist (k UInt32) ENGINE = MergeTree ORDER BY k")
    client.insert("persist", [[1], [2], [3]], column_names=["k"])
    before = client.command("SELECT sum(k) FROM persist")
    client.close()
    assert server.stop() == 0
    server.start()
    client = server.client(database="changeflow")
    assert client.command("SELECT sum(k) FROM persist") == before
    client.close()


@pytest.mark.parametrize(
    ("sql", "kind", "output_format", "insert_format", "data"),
    [
        (b"SELECT format FROM t", "SELECT", None, None, None),
        (b"SELECT 'x FORMAT JSON' AS a", "SELECT", None, None, None),
        (b"SELECT x FROM format FORMAT CSV;", "SELECT", "CSV", None, None),
        (b"-- c\n(SELECT 1) UNION ALL SELECT 2 FORMAT TSV SETTINGS max_threads = 1", "SELECT", "TSV", None, None),
        (b"INSERT INTO t (format, b) FORMAT CSV\n1,2", "INSERT", None, "CSV", b"1,2"),
        (b"/* c */ INSERT INTO `t` FORMAT Native\n\t\n", "INSERT", None, "Native", b"\t\n"),  # binary kept
        (b"INSERT INTO t VALUES (1)", "INSERT", None, "Values", b" (1)"),
        (b"INSERT INTO t SELECT * FROM VALUES('a UInt8', 1)", "INSERT", None, None, None),
    ],
)
def test_statement_analysis(
    sql: bytes, kind: str, output_format: str | None, insert_format: str | None, data: bytes | None
) -> None:
    """The server's small lexer must not be fooled by strings, comments, or binary INSERT data."""
    from changeflow.deploy.clickhouse_server.lexer import analyze

    stmt = analyze(sql)
    assert (stmt.kind, stmt.output_format, stmt.insert_format) == (kind, output_format, insert_format)
    if data is not None:
        assert sql[stmt.data_offset :] == data
