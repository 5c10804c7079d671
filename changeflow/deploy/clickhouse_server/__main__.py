"""Run the server: ``python -m changeflow.deploy.clickhouse_server --data-dir DIR`` (password in the environment)."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from changeflow.deploy.clickhouse_server.bodies import DEFAULT_MAX_BODY
from changeflow.deploy.clickhouse_server.engine import Engine
from changeflow.deploy.clickhouse_server.handler import ClickHouseHTTPServer, Limits
from changeflow.deploy.clickhouse_server.privileges import drop_privileges

PASSWORD_ENV = "CLICKHOUSE_PASSWORD"


# -- entry point ------------------------------------------------------------------------------------


def serve(host: str, port: int, data_dir: Path, user: str, password: str, limits: Limits | None = None) -> None:
    """Run until SIGTERM/SIGINT, then close chdb so the next start can open the directory."""
    os.umask(0o077)  # every file and directory the engine creates is ours alone
    opened = drop_privileges(data_dir)  # started as root: from here on, the server's own user
    try:
        engine = Engine(opened.resolve(), (limits or Limits()).max_concurrent_queries)
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
        f"event=listening host={host} port={port} data_dir={data_dir} opened={opened} uid={os.getuid()} "
        f"engine={engine.version} "
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
    parser.add_argument(
        "--max-sessions", type=int, default=256, help="sessions kept; past it the least recently used idle one goes"
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
        max_sessions=args.max_sessions,
    )
    serve(args.host, args.port, args.data_dir, args.user, password, limits)
    return 0


if __name__ == "__main__":
    sys.exit(main())
