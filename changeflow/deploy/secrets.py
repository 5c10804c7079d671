"""Local secrets of the native stack: generated once, kept under the state directory, never committed.

A value set through the environment wins (``CHANGEFLOW_PG_REPLICATION_PASSWORD``,
``CHANGEFLOW_CLICKHOUSE_PASSWORD``, ``CHANGEFLOW_REDIS_PASSWORD``); otherwise the first ``stack up`` generates a
random password into ``<state>/secrets/`` (folder 0700, file 0600). PostgreSQL's replication role and the Kafka
Connect worker's environment take theirs from there; every client of a local server (a store's connection
settings, ``Settings.pg_dsn``) reads it back from there (``Settings.stored_secret``).
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from pydantic import SecretStr
from pydantic_settings import BaseSettings

from changeflow.settings import Settings, env_config


class Configured(BaseSettings):
    """The servers' passwords set through the environment (or ``.env``): they win over generated ones."""

    model_config = env_config("CHANGEFLOW_")

    clickhouse_password: SecretStr | None = None
    redis_password: SecretStr | None = None


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
    """The local ClickHouse server's password; generated on first use (its clients read it from the file)."""
    configured = Configured().clickhouse_password
    if configured is not None and configured.get_secret_value():
        return configured.get_secret_value()
    return _generated(settings, "clickhouse_password")


def pg_superuser_password(settings: Settings) -> str:
    """The stack's PostgreSQL superuser password (scram on TCP); generated on first use, recorded in ``settings``."""
    if settings.pg_superuser_password is not None:
        return settings.pg_superuser_password.get_secret_value()
    value = _generated(settings, "pg_superuser_password")
    settings.pg_superuser_password = SecretStr(value)
    return value


def redis_password(settings: Settings) -> str:
    """The stack's Redis password (``requirepass``); generated on first use (its clients read it from the file)."""
    configured = Configured().redis_password
    if configured is not None:
        return configured.get_secret_value()
    return _generated(settings, "redis_password")


def erasure_key(settings: Settings) -> bytes:
    """The key of erasure marks (``pipelines.erasure.mark``): set, or generated once into the state directory."""
    if settings.erasure_key is not None and settings.erasure_key.get_secret_value():
        return settings.erasure_key.get_secret_value().encode()
    return _generated(settings, "erasure_key").encode()


def erasure_token(settings: Settings) -> str:
    """The bearer token of the worker's erasure endpoint: set, or generated once into the state directory."""
    if settings.erasure_token is not None and settings.erasure_token.get_secret_value():
        return settings.erasure_token.get_secret_value()
    return _generated(settings, "erasure_token")
