"""Local secrets of the native stack: generated once, kept under the state directory, never committed.

A value set through the settings (``CHANGEFLOW_PG_REPLICATION_PASSWORD``) wins; otherwise the first
``stack up`` generates a random password into ``<state>/secrets/`` (mode 0600), which PostgreSQL's role
and the Kafka Connect worker's environment both take from there.
"""

from __future__ import annotations

import os
import secrets

from changeflow.settings import Settings


def replication_password(settings: Settings) -> str:
    if settings.pg_replication_password is not None:
        return settings.pg_replication_password.get_secret_value()
    folder = settings.state / "secrets"
    path = folder / "pg_replication_password"
    if not path.exists():
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_urlsafe(24))
    return path.read_text().strip()
