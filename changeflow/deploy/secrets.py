"""Local secrets of the native stack: generated once, kept under the state directory, never committed.

A value set through the settings wins (``CHANGEFLOW_PG_REPLICATION_PASSWORD``,
``CHANGEFLOW_CLICKHOUSE_PASSWORD``); otherwise the first ``stack up`` generates a random password into
``<state>/secrets/`` (folder 0700, file 0600). PostgreSQL's replication role and the Kafka Connect
worker's environment take theirs from there; the local ClickHouse server's password is read back by
``Settings`` itself, so every client (sinks, reports, tests) authenticates through the one settings object.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from pydantic import SecretStr

from changeflow.settings import Settings


def _generated(settings: Settings, name: str) -> str:
    folder = settings.state / "secrets"
    path: Path = folder / name
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(folder, 0o700)
    if not path.exists():
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another process generated it first: use theirs
            pass
        else:
            with os.fdopen(fd, "w") as fh:
                fh.write(secrets.token_urlsafe(24))
    return path.read_text().strip()


def replication_password(settings: Settings) -> str:
    if settings.pg_replication_password is not None:
        return settings.pg_replication_password.get_secret_value()
    return _generated(settings, "pg_replication_password")


def clickhouse_password(settings: Settings) -> str:
    """The local ClickHouse server's password; generated on first use and recorded in ``settings``.

    ``Settings`` fills ``clickhouse_password`` from the file when it exists; a settings object made before
    the first ``stack up`` created it gets the generated value here, so later clients in the same process
    authenticate too.
    """
    value = settings.clickhouse_password.get_secret_value()
    if value:
        return value
    value = _generated(settings, "clickhouse_password")
    settings.clickhouse_password = SecretStr(value)
    return value


def pg_superuser_password(settings: Settings) -> str:
    """The stack's PostgreSQL superuser password (scram on TCP); generated on first use, recorded in ``settings``."""
    if settings.pg_superuser_password is not None:
        return settings.pg_superuser_password.get_secret_value()
    value = _generated(settings, "pg_superuser_password")
    settings.pg_superuser_password = SecretStr(value)
    return value


def redis_password(settings: Settings) -> str:
    """The stack's Redis password (``requirepass``); generated on first use, recorded in ``settings``."""
    if settings.redis_password is not None:
        return settings.redis_password.get_secret_value()
    value = _generated(settings, "redis_password")
    settings.redis_password = SecretStr(value)
    return value
