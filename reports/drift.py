"""Drift report: per entity, the row count in the source against every derived store.

Counts are what a user checks first after an incident; key-level reconciliation builds on this.
ClickHouse is read with FINAL (current state, deletes applied), the search index after a refresh.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import httpx
import psycopg
import redis
from psycopg import sql

from sinks.clickhouse import client_for
from streams.entities import ENTITIES

if TYPE_CHECKING:
    from changeflow.settings import Settings

STORES = ("clickhouse", "redis", "search")
NOT_MAPPED = -1  # the entity has no mapping to that store


@dataclass(frozen=True)
class DriftRow:
    entity: str
    source: int | None
    clickhouse: int | None
    redis: int | None
    search: int | None

    @property
    def drift(self) -> int | None:
        """The largest count difference between the source and a store; None if one is unreachable."""
        counts = [c for c in (self.clickhouse, self.redis, self.search) if c != NOT_MAPPED]
        if self.source is None or any(c is None for c in counts):
            return None
        return max((abs(c - self.source) for c in counts if c is not None), default=0)

    def as_dict(self) -> dict[str, int | str | None]:
        def shown(count: int | None) -> int | str | None:
            return "n/a" if count == NOT_MAPPED else count

        return {
            "entity": self.entity, "source": self.source, "clickhouse": shown(self.clickhouse),
            "redis": shown(self.redis), "search": shown(self.search), "drift": self.drift,
        }


def source_count(settings: Settings, table: str) -> int:
    with psycopg.connect(settings.pg_dsn, connect_timeout=5) as conn:
        row = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier("public", table))).fetchone()
    return int(row[0]) if row else 0


def clickhouse_count(settings: Settings, entity: str) -> int | None:
    try:
        client = client_for(settings)
        try:
            return int(client.command(
                f"SELECT count() FROM {settings.clickhouse_database}.{entity} FINAL WHERE _is_deleted = 0"
            ))
        finally:
            client.close()
    except Exception:
        return None


def redis_count(settings: Settings, prefix: str) -> int | None:
    try:
        client = redis.Redis.from_url(settings.redis_url, socket_timeout=5)
        return sum(1 for _ in client.scan_iter(match=f"{prefix}:*", count=1000))
    except redis.RedisError:
        return None


def search_count(settings: Settings, index: str) -> int | None:
    try:
        with httpx.Client(base_url=settings.search_url, timeout=10) as http:
            http.post(f"/{index}/_refresh")
            response = http.get(f"/{index}/_count")
            if response.status_code == 404:
                return 0
            response.raise_for_status()
            return int(response.json()["count"])
    except (httpx.HTTPError, KeyError, ValueError):
        return None


def drift(settings: Settings, entities: list[str] | None = None) -> list[DriftRow]:
    """Entities whose source runs here (PostgreSQL; MongoDB only where configured)."""
    rows = []
    for name, spec in ENTITIES.items():
        if entities and name not in entities:
            continue
        if spec.source != "postgres" and not entities:
            continue
        rows.append(
            DriftRow(
                entity=name,
                source=source_count(settings, spec.source_table) if spec.source == "postgres" else None,
                clickhouse=clickhouse_count(settings, name),
                redis=NOT_MAPPED if spec.redis_prefix is None else redis_count(settings, spec.redis_prefix),
                search=NOT_MAPPED if spec.search_index is None else search_count(settings, spec.search_index),
            )
        )
    return rows
