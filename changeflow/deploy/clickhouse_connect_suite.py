"""Run clickhouse-connect's own integration suite against our ClickHouse HTTP front
(the changeflow/deploy/clickhouse_server/ package).

    S="-m changeflow.deploy.clickhouse_connect_suite --mirror CHECKOUT"
    .venv/bin/python $S                                        # own server instance, temporary data dir
    .venv/bin/python $S --stack                                # the stack's server (127.0.0.1:8123)
    .venv/bin/python $S --port 18123 --password-file FILE      # any running server

What it does, all under one temporary directory that it removes afterwards (``--keep`` keeps it):

1. copies ``tests/`` of the upstream repository out of a local git checkout or mirror of it (``--mirror``,
   required unless ``$CLICKHOUSE_CONNECT_MIRROR`` names one; ``--ref``, default HEAD) -- only the tests: the
   upstream package source is never imported, nothing upstream is committed;
2. makes its own venv with the clickhouse-connect release our venv has (``--client-version``) and the
   suite's test dependencies, from the package index through pip;
3. unless pointed at a running server, starts ``deploy.clickhouse_server`` on a free port with a fresh
   data directory and a random password, and stops it at the end;
4. runs ``tests/integration_tests`` serially (the upstream ``-n 4`` is dropped: two cores), with a
   per-test timeout, and prints the pass/fail/skip counts and the failures grouped by test file;
5. against a shared server (``--stack`` or ``--port``), drops the suite's ``ch_connect__*`` databases.

Not part of ``make test`` (several minutes); README "ClickHouse server: known differences" lists the
failure classes that remain and why.
"""

from __future__ import annotations

import argparse
import collections
import importlib.metadata
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import xml.etree.ElementTree as ET
from base64 import b64encode
from pathlib import Path

from changeflow.deploy.clickhouse import ClickHouseServerSettings
from changeflow.deploy.secrets import clickhouse_password
from changeflow.settings import Settings
from changeflow.waiting import wait_until

ROOT = Path(__file__).resolve().parents[2]
TEST_DEPS = [
    "pytest", "pytest-asyncio", "pytest-mock", "pytest-dotenv", "pytest-timeout", "numpy", "pandas", "pyarrow",
    "polars", "sqlalchemy>=2.0,<3.0", "alembic", "aiohttp", "pyjwt[crypto]", "lz4", "backports.zstd",
]  # fmt: skip


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def run(cmd: list[str], **kwargs: object) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, **kwargs)  # type: ignore[call-overload]


def copy_tests(mirror: str, ref: str, dest: Path) -> None:
    """The upstream ``tests/`` tree at ``ref``, from the local mirror (a bare or work-tree git directory)."""
    dest.mkdir(parents=True)
    archive = subprocess.run(
        ["git", f"--git-dir={mirror}", "archive", "--format=tar", ref, "tests", "pyproject.toml"],
        check=True,
        capture_output=True,
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    # The upstream pytest options (``-n 4``, env files) are replaced by ours on the command line.
    (dest / "pyproject.toml").unlink(missing_ok=True)


def make_venv(venv: Path, client_version: str) -> Path:
    run([sys.executable, "-m", "venv", str(venv)])
    py = venv / "bin" / "python"
    run([str(py), "-m", "pip", "install", "-q", f"clickhouse-connect=={client_version}", *TEST_DEPS])
    return py


def query(host: str, port: int, password: str, sql: str) -> str:
    req = urllib.request.Request(f"http://{host}:{port}/", data=sql.encode(), method="POST")
    req.add_header("Authorization", "Basic " + b64encode(f"default:{password}".encode()).decode())
    with urllib.request.urlopen(req, timeout=60) as resp:
        return str(resp.read().decode())


class OwnServer:
    """``deploy.clickhouse_server`` on a free port, over a data directory of its own."""

    def __init__(self, base: Path) -> None:
        self.port = free_port()
        self.password = secrets.token_urlsafe(18)
        self.data = base / "data"
        self.log = base / "server.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = {**os.environ, "PYTHONPATH": str(ROOT), "CLICKHOUSE_PASSWORD": self.password}
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "changeflow.deploy.clickhouse_server", "--port", str(self.port), "--data-dir",
                 str(self.data)],
                cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )  # fmt: skip
        def answers() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise SystemExit(f"server exited: {self.log.read_text()[-2000:]}")
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/ping", timeout=1) as resp:
                return bool(resp.read() == b"Ok.\n")

        wait_until(answers, 90, what="the ClickHouse server answering /ping", interval=0.3, retry_on=(OSError,),
                   error=lambda _: SystemExit("server did not start in 90 s"))

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def summarise(junit: Path) -> tuple[collections.Counter[str], dict[str, list[str]]]:
    counts: collections.Counter[str] = collections.Counter()
    failures: dict[str, list[str]] = collections.defaultdict(list)
    for case in ET.parse(junit).getroot().iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        outcome = "passed"
        for child in case:
            if child.tag in ("failure", "error"):
                outcome = "failed"
                first = (child.get("message") or "").strip().splitlines()
                failures[case.get("classname", "").rsplit(".", 1)[-1]].append(
                    f"{name}: {(first[0] if first else child.tag)[:200]}"
                )
                break
            if child.tag == "skipped":
                outcome = "skipped"
        counts[outcome] += 1
    return counts, failures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--mirror", default=os.environ.get("CLICKHOUSE_CONNECT_MIRROR"),
                        help="a git checkout (or bare mirror) of clickhouse-connect; default "
                             "$CLICKHOUSE_CONNECT_MIRROR")
    parser.add_argument("--ref", default="HEAD")
    parser.add_argument("--client-version", default=importlib.metadata.version("clickhouse-connect"))
    parser.add_argument("--stack", action="store_true", help="the stack's server (settings' port, its password file)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, help="a running server (with --password-file)")
    parser.add_argument("--password-file", type=Path)
    parser.add_argument("--timeout", type=int, default=120, help="seconds per test")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument("--report", type=Path, help="write the summary here too")
    parser.add_argument("pytest_args", nargs="*", help="extra pytest arguments (after --)")
    args = parser.parse_args(argv)
    if not args.mirror:
        raise SystemExit("name a git checkout of clickhouse-connect: --mirror PATH (or CLICKHOUSE_CONNECT_MIRROR)")
    if not Path(args.mirror).exists():
        raise SystemExit(f"no clickhouse-connect mirror at {args.mirror} (set --mirror or CLICKHOUSE_CONNECT_MIRROR)")

    work = Path(tempfile.mkdtemp(prefix="cc-suite-"))
    server: OwnServer | None = None
    host, port, password = args.host, args.port, ""
    try:
        if args.stack:

            port = ClickHouseServerSettings().port
            password = clickhouse_password(Settings())
        elif port:
            password = args.password_file.read_text().strip() if args.password_file else ""
        else:
            server = OwnServer(work)
            server.start()
            host, port, password = "127.0.0.1", server.port, server.password
        copy_tests(args.mirror, args.ref, work / "src")
        py = make_venv(work / "venv", args.client_version)
        junit = work / "junit.xml"
        env = {
            **os.environ,
            "CLICKHOUSE_CONNECT_TEST_HOST": host,
            "CLICKHOUSE_CONNECT_TEST_PORT": str(port),
            "CLICKHOUSE_CONNECT_TEST_PASSWORD": password,
            "PYTHONPATH": str(work / "src"),
        }
        cmd = [str(py), "-m", "pytest", "-p", "no:cacheprovider", "-o", "addopts=", "-o", "log_cli=false",
               "-o", "asyncio_default_fixture_loop_scope=session", f"--timeout={args.timeout}", "-q",
               f"--junitxml={junit}", "tests/integration_tests", *args.pytest_args]  # fmt: skip
        print("+", " ".join(cmd), flush=True)
        started = time.monotonic()
        subprocess.run(cmd, cwd=work / "src", env=env, check=False)
        took = time.monotonic() - started
        counts, failures = summarise(junit)
        lines = [
            f"clickhouse-connect {args.client_version} integration suite against {host}:{port} "
            f"({'own server' if server else 'running server'}), {took:.0f} s",
            f"{counts['passed']} passed, {counts['failed']} failed, {counts['skipped']} skipped",
        ]
        for module, items in sorted(failures.items()):
            lines.append(f"\n{module}: {len(items)} failed")
            lines.extend(f"  {item}" for item in items)
        text = "\n".join(lines)
        print("\n" + text)
        if args.report:
            args.report.write_text(text + "\n")
        if server is None:
            dbs = query(host, port, password, "SELECT name FROM system.databases WHERE name LIKE 'ch\\_connect\\_\\_%'")
            for name in dbs.split():
                query(host, port, password, f"DROP DATABASE IF EXISTS `{name}`")
        return 0
    finally:
        if server is not None:
            server.stop()
        if args.keep:
            print(f"work directory kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
