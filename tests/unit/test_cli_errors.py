"""Usage errors through the real CLI: one line on standard error, exit code 2, nothing reached.

Each case is refused before a server is asked (none needs the stack). Most run through typer's runner;
the ones that depend on the program itself (click's own errors as one line, the process exit code) run
``python -m changeflow`` in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from changeflow.cli import app
from changeflow.sinks.process import EXIT_CRASH_LOOP, EXIT_SINK_FATAL, FatalStop, read_fatal, record_fatal

REPO = Path(__file__).resolve().parents[2]
STORES = "clickhouse, postgres, redis, search"  # the registry, sorted


def run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.stderr


def one_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1, text
    return lines[0]


@pytest.mark.parametrize(("argv", "message"), [
    (["report", "drift", "--entity", "bogus"],
     "error: unknown entity 'bogus'; this pipeline (commerce) has: products, orders, payments, refunds, users, "
     "ny_orders, order_stats"),
    (["reconcile", "--entity", "bogus"],
     "error: unknown entity 'bogus'; this pipeline (commerce) has: products, orders, payments, refunds, users, "
     "ny_orders, order_stats"),
    (["reconcile", "--entity", "payments", "--store", "redis"],
     "error: payments is not stored in redis; it is stored in clickhouse"),
    (["reconcile", "--entity", "payments", "--store", "redis", "--store", "search"],
     "error: payments is not stored in redis or search; it is stored in clickhouse"),
    (["reconcile", "--store", "bogus"], f"error: unknown store 'bogus'; registered: {STORES}"),
    (["reconcile", "--sample", "5", "--full"], "error: --sample, --full and --key exclude each other"),
    (["worker", "--sinks", "foo"], f"error: unknown sink 'foo'; registered: {STORES}"),
    (["worker", "--sinks", "redis,foo"], f"error: unknown sink 'foo'; registered: {STORES}"),
    (["worker", "--sinks", ""],
     f"error: --sinks is empty; give one or more of {STORES}, comma-separated (leave it out for all)"),
    (["worker", "--sinks", " , "],
     f"error: --sinks is empty; give one or more of {STORES}, comma-separated (leave it out for all)"),
    (["worker", "--sinks", "redis,,search"],
     f"error: --sinks 'redis,,search' has an empty name; give one or more of {STORES}, comma-separated"),
    (["connectors", "apply", "/tmp/nope-changeflow.json"],
     "error: connector file /tmp/nope-changeflow.json: no such file"),
    (["connectors", "apply", "--source", "oracle"], "error: unknown source 'oracle'; use postgres or mongodb"),
    (["rebuild", "bogus"], f"error: unknown store 'bogus'; registered: {STORES}"),
    (["rebuild", "redis", "--entity", "payments"],
     "error: payments is not stored in redis; it is stored in clickhouse"),
    (["rebuild", "clickhouse", "--entity", "bogus"],
     "error: unknown entity 'bogus'; this pipeline (commerce) has: products, orders, payments, refunds, users, "
     "ny_orders, order_stats"),
    (["sinks", "reset", "bogus", "--to-earliest"], f"error: unknown sink 'bogus'; registered: {STORES}, all"),
    (["sinks", "reset", "all"], "error: say where to: --to-earliest"),
    (["--pipeline", "/tmp/nope-changeflow.yml", "status"],
     "error: pipeline file /tmp/nope-changeflow.yml: no such file"),
    (["bench", "--quick", "--full"], "error: choose --quick or --full"),
    (["bench", "--rates", "fast"],
     "error: --rates 'fast': give changes/s as whole numbers, comma-separated (e.g. 1000,5000)"),
    (["bench", "--stages", "backlog,warp"],
     "error: unknown stages warp; known: backlog, snapshot, freshness, views, views-live"),
    (["stack", "up", "nope"],
     "error: unknown service 'nope'; the stack has: postgres, redis, clickhouse, search, kafka, connect"),
    (["stack", "down", "nope"],
     "error: unknown service 'nope'; the stack has: postgres, redis, clickhouse, search, kafka, connect, worker"),
])
def test_a_usage_error_is_one_line_and_exit_code_2(argv: list[str], message: str) -> None:
    code, stderr = run(*argv)
    assert (code, one_line(stderr)) == (2, message)


def test_a_file_that_is_no_connector_definition_is_a_usage_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    code, stderr = run("connectors", "apply", str(bad))
    assert code == 2
    assert one_line(stderr).startswith(f"error: {bad}: not valid JSON:")
    bad.write_text(json.dumps({"name": "x"}))
    code, stderr = run("connectors", "apply", str(bad))
    assert (code, one_line(stderr)) == (2, f'error: {bad}: expected Kafka Connect\'s form {{"name": ..., '
                                           '"config": {...}}')
    code, stderr = run("connectors", "apply", str(tmp_path))
    assert (code, one_line(stderr)) == (2, f"error: connector file {tmp_path}: is a directory, not a file")


def test_an_invalid_pipeline_file_is_one_line_and_exit_code_2(tmp_path: Path) -> None:
    file = tmp_path / "pipeline.yml"
    file.write_text("name: Not An Identifier\n")
    code, stderr = run("--pipeline", str(file), "report", "drift")
    assert code == 2
    assert one_line(stderr).startswith("error: invalid pipeline file: ")


def cli(*args: str, cwd: Path = REPO, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "changeflow", *args], capture_output=True, text=True, timeout=120,
                          cwd=cwd, env={**os.environ, **(env or {})})


@pytest.mark.parametrize(("argv", "message"), [
    (["stack", "status", "--bogus"], "error: No such option: --bogus (see changeflow stack status --help)"),
    (["report", "drift", "--format", "xml"],
     "error: Invalid value for '--format': Value error, 'xml' is not one of 'table', 'json'. "
     "(see changeflow report drift --help)"),
    (["sinks", "reset"], "error: Missing argument 'sink'. (see changeflow sinks reset --help)"),
    (["worker", "--sinks", "foo"], f"error: unknown sink 'foo'; registered: {STORES}"),
])
def test_the_program_prints_clicks_usage_errors_as_one_line_too(argv: list[str], message: str) -> None:
    done = cli(*argv)
    assert (done.returncode, one_line(done.stderr), done.stdout) == (2, message, "")


def test_the_state_dir_does_not_depend_on_the_current_folder(tmp_path: Path) -> None:
    """From any folder, the project root's .changeflow (or CHANGEFLOW_STATE_DIR, made absolute)."""
    from changeflow.settings import PROJECT_ROOT, Settings

    env = {k: v for k, v in os.environ.items() if k != "CHANGEFLOW_STATE_DIR"}
    probe = "from changeflow.settings import Settings; print(Settings().state)"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=tmp_path, env=env,
                          timeout=60)
    assert done.stdout.strip() == str(PROJECT_ROOT / ".changeflow"), done.stderr
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=tmp_path,
                          env={**env, "CHANGEFLOW_STATE_DIR": "state"}, timeout=60)
    assert done.stdout.strip() == str(tmp_path.resolve() / "state"), done.stderr
    assert Settings(state_dir=Path("x")).state.is_absolute()


# --- the fatal-stop record behind `status` and the worker's exit codes ------------------------------
class FakePipeline:
    name = "unit_fatal"


def stop(**kw: object) -> FatalStop:
    base: dict[str, object] = {"store": "clickhouse", "group": "g", "error": "clickhouse rejected the batch: boom",
                               "at": 1.0, "topic": "t", "partition": 2, "offset": 7, "batch": {"t:2": 7, "t:0": 3},
                               "committed": {"t:0": 3, "t:1": None, "t:2": 7}}
    return FatalStop(**{**base, **kw})  # type: ignore[arg-type]


def test_a_second_stop_on_the_same_batch_is_a_crash_loop(tmp_path: Path) -> None:
    pipeline = FakePipeline()
    first = record_fatal(tmp_path, pipeline, stop())  # type: ignore[arg-type]
    assert (first.stops, first.exit_code, first.crash_loop) == (1, EXIT_SINK_FATAL, False)
    # Restarted: the store fails before its first batch (no batch), the group has not moved.
    again = record_fatal(tmp_path, pipeline, stop(batch={}, topic="t", partition=0, offset=3))  # type: ignore[arg-type]
    assert (again.stops, again.exit_code, again.crash_loop) == (2, EXIT_CRASH_LOOP, True)
    assert read_fatal(tmp_path, pipeline)["clickhouse"] == again  # type: ignore[arg-type]
    # It moved on (partition 2 committed past 7) and stopped elsewhere: a new first stop.
    moved = record_fatal(tmp_path, pipeline, stop(batch={"t:2": 9}, offset=9,  # type: ignore[arg-type]
                                                  committed={"t:0": 3, "t:1": None, "t:2": 9}))
    assert (moved.stops, moved.exit_code) == (1, EXIT_SINK_FATAL)


def test_a_stop_is_resolved_once_the_group_commits_past_its_batch() -> None:
    s = stop()
    assert not s.resolved({"t:0": 3, "t:1": None, "t:2": 7})
    assert not s.resolved({"t:0": 5, "t:1": None, "t:2": 7})  # other partitions moving do not fix partition 2
    assert s.resolved({"t:0": 3, "t:1": None, "t:2": 8})
    before_any_batch = stop(batch={}, topic=None, partition=None, offset=None)
    assert not before_any_batch.resolved({"t:0": 3, "t:1": None, "t:2": 7})
    assert before_any_batch.resolved({"t:0": 3, "t:1": 0, "t:2": 7})
    assert s.position == "topic t partition 2 offset 7"
