"""One live stack per test run, shared by every integration test.

The session fixture brings the native stack up (idempotent: the test command has usually done it
already), registers the connector and runs one background worker. Tests isolate themselves by their own
keys (a unique SKU prefix per test) and clean up their rows.
"""

from __future__ import annotations

import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import pytest

from changeflow.connectors.client import ConnectorDefinition, KafkaConnectClient, default_files
from changeflow.deploy import stack
from changeflow.deploy.worker import WorkerService
from changeflow.pipelines.load import load
from changeflow.pipelines.spec import Pipeline
from changeflow.settings import Settings
from changeflow.sinks.clickhouse import ClickHouseSettings
from changeflow.sinks.redis import connection_url
from changeflow.sinks.search import SearchSettings

T = TypeVar("T")


@pytest.fixture(scope="session")
def settings() -> Settings:
    return Settings()


@pytest.fixture(scope="session")
def commerce() -> Pipeline:
    """The commerce example pipeline (examples/commerce/pipeline.yml), as the worker under test runs it."""
    return load()


@pytest.fixture(scope="session")
def live_stack(settings: Settings) -> Settings:
    stack.up(settings)
    return settings


@pytest.fixture(scope="session")
def connect(live_stack: Settings) -> Iterator[KafkaConnectClient]:
    client = KafkaConnectClient(live_stack.connect_url)
    yield client
    client.close()


@pytest.fixture(scope="session")
def pipeline(live_stack: Settings, connect: KafkaConnectClient) -> Settings:
    """Connector registered and RUNNING, worker running: changes flow end to end."""
    for path in default_files():
        definition = ConnectorDefinition.load(path)
        connect.apply(definition)
        connect.wait_running(definition.name, timeout=180)
    worker = WorkerService(live_stack)
    if not worker.running():
        worker.start()
    worker.wait_healthy(120)
    return live_stack


@pytest.fixture
def sku_prefix() -> str:
    return f"T{uuid.uuid4().hex[:10].upper()}"


def eventually(check: Callable[[], T], timeout: float = 60.0, interval: float = 0.25, what: str = "") -> T:
    """Poll until ``check`` returns a truthy value or stops raising AssertionError; then return it."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            result = check()
            if result:
                return result
            last = result
        except AssertionError as exc:
            last = exc
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or check.__name__}: last={last!r}")
        time.sleep(interval)


def stop_process(process: subprocess.Popen[Any], timeout: float = 60.0) -> int:
    """SIGTERM (the clean shutdown path), then SIGKILL after ``timeout``; the exit code."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
    return process.wait()


# --- where the stores of the local stack answer (each store module's own connection settings) -------------
def redis_url(settings: Settings) -> str:
    """The Redis store's URL, with the stack's password."""
    return connection_url(settings)


def search_url(settings: Settings) -> str:
    return SearchSettings().url


def clickhouse_password(settings: Settings) -> str:
    secret = ClickHouseSettings.load(settings).password
    return secret.get_secret_value() if secret is not None else ""
