"""Where clients depend on ClickHouse's HTTP interface beyond the basics (issue 14).
from changeflow.sinks.clickhouse import table_of

A server of its own (``deploy.clickhouse_server`` on a free port, temporary data directory), driven by
clickhouse-connect and raw HTTP: multipart bodies (clickhouse-connect switches to one once bound parameters
exceed 4,096 URL-encoded characters), external data, streamed results with ClickHouse's mid-stream error
framing, concurrent statements on one data directory, cancellation of a statement whose client went away,
per-session temporary tables, and SQL bytes that are not UTF-8. Run with ``-s`` to see the measured figures.
"""

from __future__ import annotations

import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
from pydantic import SecretStr

pytest.importorskip("chdb")
clickhouse_connect = pytest.importorskip("clickhouse_connect")
from clickhouse_connect.driver.exceptions import DatabaseError, StreamFailureError  # noqa: E402
from clickhouse_connect.driver.external import ExternalData  # noqa: E402

from tests.integration.test_clickhouse_http import ServerProcess  # noqa: E402

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    base = tmp_path_factory.mktemp("clickhouse-front")
    srv = ServerProcess(base / "data", base / "server.log")
    srv.start()
    try:
        yield srv
    finally:
        if srv.proc is not None:
            srv.stop()


def test_5000_uuid_keys_bound_in_a_multipart_body(server: ServerProcess) -> None:
    """Past 4,096 URL-encoded characters clickhouse-connect sends query and ``param_*`` as form fields."""
    client = server.client()
    client.command("CREATE TABLE IF NOT EXISTS front_keys (id UUID, name String) ENGINE = MergeTree ORDER BY id")
    ids = [uuid.uuid4() for _ in range(6000)]
    client.insert("front_keys", [[i, f"n{n}"] for n, i in enumerate(ids)], column_names=["id", "name"])
    wanted = ids[:5000]
    rows = client.query("SELECT id FROM front_keys WHERE id IN {keys:Array(UUID)}", parameters={"keys": wanted})
    assert {r[0] for r in rows.result_rows} == set(wanted)
    rows = client.query(
        "SELECT count() FROM front_keys WHERE toString(id) IN {keys:Array(String)}",
        parameters={"keys": [str(i) for i in wanted]},
    )
    assert rows.result_rows == [(5000,)]
    # The same by hand, as curl -F sends it.
    fields = {"query": (None, "SELECT {a:UInt32} + {b:UInt32}"), "param_a": (None, "40"), "param_b": (None, "2")}
    resp = server.http.post(server.url, files=fields)
    assert resp.status_code == 200 and resp.text == "42\n"
    client.close()


def test_fetch_current_of_the_clickhouse_store_with_5000_keys(server: ServerProcess) -> None:
    """The sink's fill path (TOAST partials) asks the store for a whole batch of keys at once."""
    from changeflow.pipelines.load import load
    from changeflow.pipelines.spec import build
    from changeflow.pipelines.types import ColumnType
    from changeflow.settings import Settings
    from changeflow.sinks.clickhouse import ClickHouseSettings, ClickHouseStore, table_of

    commerce = load()
    pipeline = build(commerce.file.model_copy(update={"namespace": f"front_{uuid.uuid4().hex[:8]}"}), commerce.path)
    settings = Settings()
    own = ClickHouseSettings(port=server.port, password=SecretStr(server.password))
    store = ClickHouseStore(settings, pipeline, own)
    version = SimpleNamespace(columns={"id": ColumnType("uuid"), "email": ColumnType("string")}, key_columns=["id"])
    store.setup({"users": version})
    spec = pipeline.entities["users"]
    keys = [str(uuid.uuid4()) for _ in range(5000)]
    client = server.client()
    client.insert(
        f"{table_of(spec)[0]}.{table_of(spec)[1]}",
        [[k, f"{k}@example.com", k, 1, 0, 0] for k in keys],
        column_names=["id", "email", "_key", "_version", "_is_deleted", "_ts_ms"],
    )
    found = store.fetch_current("users", keys)
    assert set(found) == set(keys)
    assert found[keys[0]]["email"] == f"{keys[0]}@example.com"
    client.command(f"DROP DATABASE IF EXISTS {table_of(spec)[0]}")
    client.close()
    store.close()


def test_external_data_from_clickhouse_connect_and_curl(server: ServerProcess, tmp_path: Path) -> None:
    client = server.client()
    csv = b"12 Angry Men,1957\nAlien,1979\n"
    data = ExternalData(file_name="movies.csv", data=csv, fmt="CSV", structure=["movie String", "year UInt16"])
    data.add_file(file_name="extra", data=b"1\n2\n", types="UInt8")
    rows = client.query("SELECT movie, year, (SELECT sum(_1) FROM extra) FROM movies ORDER BY year", external_data=data)
    assert rows.result_rows == [("12 Angry Men", 1957, 3), ("Alien", 1979, 3)]
    # curl -F 'x=@x.tsv' 'http://.../?query=...&x_structure=...'
    resp = server.http.post(
        server.url,
        params={"query": "SELECT n * 2 FROM x ORDER BY n", "x_structure": "n UInt8"},
        files={"x": ("x.tsv", b"1\n2\n")},
    )
    assert resp.status_code == 200 and resp.text == "2\n4\n"
    # Gone after the request; and a structure that tries to escape its brackets is refused.
    with pytest.raises(DatabaseError):
        client.query("SELECT * FROM x")
    resp = server.http.post(
        server.url,
        params={"query": "SELECT 1 FROM x", "x_structure": "n UInt8) ENGINE = File(TSV, '/etc/passwd') --"},
        files={"x": ("x.tsv", b"1\n")},
    )
    assert resp.status_code >= 400
    client.close()


def test_results_stream_and_a_mid_stream_error_is_framed(server: ServerProcess) -> None:
    client = server.client()
    query = "SELECT sleepEachRow(0.01), throwIf(number = 100) FROM numbers(200)"
    with pytest.raises(StreamFailureError, match="throwIf"):
        client.query(query, settings={"max_block_size": 1, "wait_end_of_query": 0}).result_set  # noqa: B018
    assert client.command("SELECT 1") == 1
    # The first rows arrive long before the last ones are computed.
    with server.http.stream(
        "POST", server.url, content=b"SELECT number, sleepEachRow(0.2) FROM numbers(10) SETTINGS max_block_size=1"
    ) as resp:
        started = time.monotonic()
        first = next(resp.iter_bytes())
        took_first = time.monotonic() - started
        assert resp.headers.get("transfer-encoding") == "chunked" and resp.headers.get("x-clickhouse-exception-tag")
    assert first.startswith(b"0\t0\n") and took_first < 1.0
    # wait_end_of_query=1: the whole result (or the error) first, as ClickHouse does.
    resp = server.http.post(server.url, params={"wait_end_of_query": "1"}, content=query.encode())
    assert resp.status_code == 500 and resp.headers["x-clickhouse-exception-code"] == "395"
    client.close()


def test_a_long_query_does_not_hold_up_an_insert(server: ServerProcess) -> None:
    """chdb runs statements of different connections in parallel: a report no longer blocks the sink."""
    client = server.client()
    client.command("CREATE TABLE IF NOT EXISTS front_ins (k UInt64) ENGINE = MergeTree ORDER BY k")
    client.insert("front_ins", [[0]], column_names=["k"])

    def insert_ms() -> float:
        started = time.perf_counter()
        client.insert("front_ins", [[i] for i in range(1000)], column_names=["k"])
        return (time.perf_counter() - started) * 1000

    idle = min(insert_ms() for _ in range(5))
    reporter = server.client()
    done = threading.Event()

    def report() -> None:
        reporter.command("SELECT sleepEachRow(1) FROM numbers(5) SETTINGS max_block_size = 1")
        done.set()

    thread = threading.Thread(target=report)
    thread.start()
    time.sleep(0.5)
    during = [insert_ms() for _ in range(5)]
    assert not done.is_set(), "the report ended before the inserts were measured"
    thread.join(30)
    reporter.close()
    client.close()
    print(f"\n[clickhouse-front] insert of 1000 rows: idle {idle:.1f} ms, during a 5 s query max {max(during):.1f} ms")
    assert max(during) < 1000


def test_a_query_whose_client_goes_away_is_cancelled(server: ServerProcess) -> None:
    sql = b"SELECT count() FROM numbers(100000000000) WHERE cityHash64(number) % 7 = 1 SETTINGS max_threads = 1"
    request = (
        f"POST / HTTP/1.1\r\nHost: x\r\nX-ClickHouse-User: default\r\nX-ClickHouse-Key: {server.password}\r\n"
        f"Content-Length: {len(sql)}\r\n\r\n"
    ).encode() + sql
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(request)
        time.sleep(1.0)
    client = server.client()

    def running() -> int:
        return int(
            client.command(
                "SELECT count() FROM system.processes WHERE query LIKE '%cityHash64(number) % 7%' "
                "AND query NOT LIKE '%system.processes%'"
            )
        )

    deadline = time.monotonic() + 10
    while running() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert running() == 0
    client.close()


def test_temporary_tables_belong_to_their_session(server: ServerProcess) -> None:
    one = server.client(session_id=f"front-{uuid.uuid4().hex}")
    two = server.client(session_id=f"front-{uuid.uuid4().hex}")
    one.command("CREATE TEMPORARY TABLE scratch (n UInt8)")
    one.command("INSERT INTO scratch VALUES (1)")
    assert one.command("SELECT count() FROM scratch") == 1
    with pytest.raises(DatabaseError, match=r"UNKNOWN_TABLE|Unknown table"):
        two.command("SELECT count() FROM scratch")
    two.command("CREATE TEMPORARY TABLE scratch (n UInt8)")  # no clash with the other session's
    assert two.command("SELECT count() FROM scratch") == 0
    one.close()
    two.close()


def test_sql_bytes_that_are_not_utf8(server: ServerProcess) -> None:
    resp = httpx.post(
        server.url, content=b"SELECT length('caf\xe9'), hex('\xff')", auth=("default", server.password), timeout=30
    )
    assert resp.status_code == 200 and resp.text == "4\tFF\n"


def _spooled_files(server: ServerProcess) -> list[Path]:
    """Files left in the server's insert spool directories (``Spool``: ``<base>/changeflow-chdb-insert-<pid>-*``)."""
    assert server.proc is not None
    found: list[Path] = []
    for base in {Path("/dev/shm"), Path(tempfile.gettempdir()), Path("/tmp")}:
        for directory in base.glob(f"changeflow-chdb-insert-{server.proc.pid}-*") if base.is_dir() else []:
            found += list(directory.iterdir())
    return found


def test_an_insert_the_engine_refuses_is_an_error_and_stores_nothing(server: ServerProcess) -> None:
    """chdb's streaming insert swallowed errors raised after parsing (here a CHECK constraint): HTTP 200, 0 rows."""
    client = server.client()
    client.command(
        "CREATE TABLE IF NOT EXISTS front_checked (x Int32, s String, CONSTRAINT positive CHECK x > 0) "
        "ENGINE = MergeTree ORDER BY x"
    )
    with pytest.raises(DatabaseError, match="VIOLATED_CONSTRAINT") as caught:
        client.insert("front_checked", [[1, "a"], [-5, "b"], [2, "c"]], column_names=["x", "s"])
    assert caught.value.code == 469
    assert client.command("SELECT count() FROM front_checked") == 0
    # The same as curl sends it: an HTTP error with the engine's code, nothing stored.
    params = {"query": "INSERT INTO front_checked FORMAT CSV"}
    resp = server.http.post(server.url, params=params, content=b"1,a\n-5,b\n")
    assert resp.status_code == 500, resp.text
    assert resp.headers["x-clickhouse-exception-code"] == "469"
    assert resp.text.startswith("Code: 469. DB::Exception: Constraint `positive`")
    assert "(VIOLATED_CONSTRAINT)" in resp.text
    resp = server.http.post(server.url, content=b"INSERT INTO front_checked VALUES (3, 'c'), (-1, 'd')")
    assert resp.status_code == 500 and resp.headers["x-clickhouse-exception-code"] == "469"
    assert client.command("SELECT count() FROM front_checked") == 0
    # What the engine accepts is stored and counted, as before.
    summary = client.insert("front_checked", [[1, "a"], [2, "b"]], column_names=["x", "s"])
    assert summary.written_rows == 2 and client.command("SELECT count() FROM front_checked") == 2
    assert _spooled_files(server) == []
    client.close()


def test_inserts_keep_the_insert_semantics(server: ServerProcess) -> None:
    """Column lists, DEFAULTs, input_format settings (URL and SETTINGS clause), binary data, a table named settings."""
    client = server.client()
    client.command(
        "CREATE TABLE IF NOT EXISTS front_sem (x Int32, s String, d String DEFAULT concat('d', s)) "
        "ENGINE = MergeTree ORDER BY x"
    )
    client.command("CREATE TABLE IF NOT EXISTS settings (x Int32) ENGINE = MergeTree ORDER BY x")
    # Native holding two consecutive newline bytes (2570 = 0x0A0A) and strings with blank lines.
    client.insert("front_sem", [[2570, "a\n\nb"], [10, "\n\n"]], column_names=["x", "s"])
    rows = client.query("SELECT x, s, d FROM front_sem ORDER BY x").result_rows
    assert rows == [(10, "\n\n", "d\n\n"), (2570, "a\n\nb", "da\n\nb")]
    post = server.http.post
    bad = b"3,c\nzz,y\n4,d\n"
    resp = post(server.url, params={"query": "INSERT INTO front_sem (x, s) FORMAT CSV"}, content=bad)
    assert resp.status_code == 400 and resp.headers["x-clickhouse-exception-code"] == "27"
    assert resp.text.startswith("Code: 27. DB::Exception: Cannot parse input")
    params = {"query": "INSERT INTO front_sem (x, s) FORMAT CSV", "input_format_allow_errors_num": "1"}
    assert post(server.url, params=params, content=bad).status_code == 200
    sql = b"INSERT INTO front_sem (x, s) SETTINGS input_format_allow_errors_num = 1 FORMAT CSV\n5,e\nzz,y\n6,f\n"
    resp = post(server.url, content=sql)
    assert resp.status_code == 200, resp.text
    assert '"written_rows":"2"' in resp.headers["x-clickhouse-summary"]
    resp = post(server.url, content=b"INSERT INTO front_sem (s, x) FORMAT CSVWithNames\ns,x\ng,7\n")
    assert resp.status_code == 200, resp.text
    stored = client.query("SELECT x FROM front_sem WHERE x < 100 ORDER BY x").result_rows
    assert [x for (x,) in stored] == [3, 4, 5, 6, 7, 10]
    assert client.command("SELECT d FROM front_sem WHERE x = 7") == "dg"
    assert post(server.url, content=b"INSERT INTO settings FORMAT TSV\n1\n").status_code == 200
    resp = post(server.url, content=b"INSERT INTO TABLE settings SETTINGS max_threads = 1 VALUES (2)")
    assert resp.status_code == 200, resp.text
    assert client.command("SELECT count() FROM settings") == 2
    # The client still may not read files itself, nor name a spool file.
    resp = post(server.url, content=b"INSERT INTO settings FROM INFILE '/etc/hostname' FORMAT TSV")
    assert resp.status_code == 404 and resp.headers["x-clickhouse-exception-code"] == "78"
    resp = post(server.url, content=b"SELECT * FROM file('/etc/hostname', 'LineAsString')")
    assert resp.headers["x-clickhouse-exception-code"] == "497"
    assert _spooled_files(server) == []
    client.command("DROP TABLE settings")
    client.close()
