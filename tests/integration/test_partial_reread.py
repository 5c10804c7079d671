"""#20 §9 end to end: a partial record whose row a store does not hold stays partial and is re-read from the source.

A table with a TOASTed column (REPLICA IDENTITY DEFAULT: an update that leaves the column alone sends Debezium's
"unavailable" placeholder for it) is captured by a pipeline and a worker of the test's own. The Redis key of a row
is removed, as a TTL would remove it, and the row is then updated without touching the TOASTed column. Redis
must never hold the row without that column (before #20 §9 it did: the partial record was written as if
complete); the runner re-reads the row from the source through an incremental snapshot of that key, and Redis
ends up with the whole row. ClickHouse, which still holds the row, completes the same record from it.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis
import yaml
from clickhouse_connect.driver.exceptions import DatabaseError
from psycopg import sql

from changeflow.pipelines.load import load
from changeflow.pipelines.spec import Pipeline
from changeflow.settings import Settings
from changeflow.sinks.clickhouse import table_of
from changeflow.sinks.redis import row_key
from tests.integration.conftest import eventually, redis_url, stop_process
from tests.integration.test_own_database import _answers, _drop_everything, changeflow, clickhouse_rows, redis_row

pytestmark = pytest.mark.integration

WEB_PORT = 6171
# 40,000 hex characters: about 20 KB after PostgreSQL's compression, far above the 2 KB at which a value is
# moved out of line (TOASTed), so an update that leaves it alone does not carry it.
BODY = secrets.token_hex(20_000)


@pytest.fixture
def toasted(live_stack: Settings, tmp_path: Path) -> Iterator[tuple[Pipeline, Settings, str, Path]]:
    settings = live_stack
    tag = uuid.uuid4().hex[:8]
    database, name = f"cf_partial_{tag}", f"partial_{tag}"
    with psycopg.connect(settings.pg_dsn, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(database)))
    dsn = psycopg.conninfo.make_conninfo(settings.pg_dsn, dbname=database)
    log_path = tmp_path / "worker.log"
    worker: subprocess.Popen[Any] | None = None
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("CREATE TABLE public.docs (id bigint PRIMARY KEY, n integer, body text)")
            conn.execute("INSERT INTO public.docs VALUES (1, 1, %s)", (BODY,))
        file = tmp_path / "pipeline.yml"
        file.write_text(yaml.safe_dump({"name": name, "sources": {"postgres": {"database": database}},
                                        "entities": {"docs": {"table": "public.docs"}}}))
        result = changeflow(file, "connectors", "apply", "--timeout", "150")
        assert result.returncode == 0, result.stdout + result.stderr
        env = {**os.environ, "CHANGEFLOW_WORKER_WEB_PORT": str(WEB_PORT), "PYTHONUNBUFFERED": "1"}
        with log_path.open("w") as log:
            worker = subprocess.Popen([sys.executable, "-m", "changeflow", "--pipeline", str(file), "worker"],
                                      cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
        eventually(lambda: worker.poll() is None and _answers(WEB_PORT), timeout=120, what="own worker up")
        yield load(file), settings, dsn, log_path
    finally:
        if worker is not None:
            stop_process(worker)
        _drop_everything(settings, database, name)


def test_a_partial_update_of_a_row_redis_lost_lands_whole_after_a_reread(
    toasted: tuple[Pipeline, Settings, str, Path]
) -> None:
    own, settings, dsn, log_path = toasted
    docs = own.entity("docs")
    key = row_key(docs, "1")
    whole = {"id": 1, "n": 1, "body": BODY}
    assert eventually(lambda: redis_row(settings, key), timeout=150, what="snapshot in redis") == whole

    # What a TTL does: the row goes, its version entry stays.
    rds = redis.Redis.from_url(redis_url(settings))
    assert rds.delete(key) == 1
    seen: list[Any] = []
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            value = redis_row(settings, key)
            if value is not None:
                seen.append(value)
            done.wait(0.02)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("UPDATE public.docs SET n = 2 WHERE id = 1")
        assert eventually(lambda: redis_row(settings, key), timeout=120,
                          what="the row re-read into redis") == {"id": 1, "n": 2, "body": BODY}
    finally:
        done.set()
        watcher.join(5)
    # Redis never held the row without its TOASTed column (nor with it NULL): not in anything the watcher saw
    # from the update on (every 20 ms), nor now.
    seen.append(redis_row(settings, key))
    assert all(v.get("body") == BODY for v in seen), [{k: v.get(k) for k in ("id", "n")} for v in seen]
    assert "sink=redis event=partial_reread entity=docs records=1" in log_path.read_text()

    # ClickHouse still held the row: the same partial record was completed from it there.
    database, table = table_of(docs)

    def clickhouse_row() -> list[dict[str, Any]]:
        try:
            rows = clickhouse_rows(settings, database, table, "id")
        except DatabaseError:  # its sink, behind on a busy machine, has not made the table yet
            return []
        return rows if rows and rows[0]["n"] == 2 else []

    assert eventually(clickhouse_row, timeout=90, what="clickhouse updated") == [{"id": 1, "n": 2, "body": BODY}]
