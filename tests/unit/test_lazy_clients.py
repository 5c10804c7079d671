"""Loading a pipeline imports no store's client library (changeflow/lazy.py): each is imported on first use.
Measured in changeflow/sinks/clickhouse.py (clickhouse_connect, ~95 ms of every command's start-up)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CLIENTS = ("clickhouse_connect", "redis", "httpx", "psycopg")


def _imported(code: str, names: tuple[str, ...]) -> list[str]:
    probe = f"{code}; import sys; print(' '.join(m for m in {names!r} if m in sys.modules))"
    run = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert run.returncode == 0, run.stderr
    return run.stdout.split()


def test_loading_a_pipeline_imports_no_store_client() -> None:
    assert _imported("from pathlib import Path; from changeflow.pipelines.load import load; "
                     "load(Path('examples/commerce/pipeline.yml'))", CLIENTS) == []


def test_the_cli_does_not_import_clickhouse_connect() -> None:
    assert _imported("import changeflow.cli", ("clickhouse_connect",)) == []


def test_the_clickhouse_error_classes_are_the_drivers() -> None:
    """The lazy module's names are the driver's own classes, so except clauses and isinstance match as before."""
    from clickhouse_connect.driver import exceptions

    from changeflow.sinks import clickhouse

    assert clickhouse.driver_errors.OperationalError is exceptions.OperationalError
    assert clickhouse.driver_errors.DatabaseError is exceptions.DatabaseError
    assert clickhouse.q("a`b") == "`a\\`b`"
