"""The reports' home store: where reconcile's history, the finance views and the changelog ``watch`` shows
live. It is the ClickHouse store (ARCHITECTURE.md, "Reports"): reports, and the commands that show them,
reach it through this module only, so no other module of theirs names a store.

The store module is imported on first use, not with this module: it pulls in its client library (about
130 ms, measured with ``python -X importtime``), which every CLI command would pay at start-up.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from changeflow.pipelines.spec import EntitySpec, Pipeline

if TYPE_CHECKING:
    from changeflow.settings import Settings


def _store() -> Any:
    from changeflow.sinks import clickhouse  # measured start-up cost: module docstring

    return clickhouse


def name() -> str:
    """The home store's registry name."""
    return str(_store().ClickHouseStore.name)


def database(pipeline: Pipeline) -> str:
    """The pipeline's own database in the home store."""
    return str(_store().home_database(pipeline))


def client(settings: Settings) -> Any:
    """A client of the home store (clickhouse-connect's): the caller closes it."""
    return _store().client_for(settings)


def where(settings: Settings) -> str:
    """``host:port`` of the home store's server (for messages; no credentials)."""
    own = _store().ClickHouseSettings.load(settings)
    return f"{own.host}:{own.port}"


def errors() -> tuple[type[Exception], type[Exception]]:
    """The client's exceptions for (the server cannot be reached, the server refused the query)."""
    from clickhouse_connect.driver.exceptions import DatabaseError, OperationalError  # start-up cost: module docstring

    return OperationalError, DatabaseError


def quote(identifier: str) -> str:
    return str(_store().q(identifier))


def table_of(spec: EntitySpec) -> tuple[str, str] | None:
    """(database, table) of an entity in the home store; None when it does not land there."""
    store = _store()
    return store.table_of(spec) if store.config(spec) is not None else None


def reconciliation_ddl(database: str) -> tuple[str, str]:
    """``CREATE TABLE`` of reconcile's runs and of their differing keys, in ``database``."""
    store = _store()
    return store.reconciliation_runs_ddl(database), store.reconciliation_diffs_ddl(database)
