"""The schema book of a pipeline: its canonical schema versions, read from (and published to) its schema topic.

Every part that reads or writes canonical records opens one: the decode stage as the writer, the sinks,
reconcile, rebuild and the DLQ tools as readers. It lives with the schemas, below the stream and the stores,
so that none of them reaches into another for it.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from changeflow import schemas
from changeflow.pipelines.catalog import read_dsn
from changeflow.pipelines.spec import Pipeline
from changeflow.schemas.topic import Publisher, ensure_topic, read_versions

if TYPE_CHECKING:
    from changeflow.settings import Settings

log = logging.getLogger("changeflow.schemas")


def schema_book(settings: Settings, pipeline: Pipeline, *, writer: bool) -> schemas.SchemaBook:
    """The process's schema versions, read from the pipeline's schema topic (the writer also publishes)."""
    ensure_topic(settings.kafka_bootstrap, pipeline.schema_topic)
    return schemas.SchemaBook(
        fetch=lambda: read_versions(settings.kafka_bootstrap, pipeline.schema_topic),
        publish=Publisher(settings.kafka_bootstrap, pipeline.schema_topic) if writer else None,
    )


def seed_versions(settings: Settings, pipeline: Pipeline) -> list[schemas.SchemaVersion]:
    """Publish a first schema version, read from the catalog, for each PostgreSQL entity that has none yet.

    Without it an entity's ClickHouse table (and every report over it) appears only with its first change,
    so a quiet table is "unknown" to a user's query. The worker calls this before its sinks start, so their
    setup creates every table. Best effort: an unreachable catalog leaves the tables to the first change.
    """
    book = schema_book(settings, pipeline, writer=True)
    missing = [s for s in pipeline.entities.values() if s.source == "postgres" and s.name not in book.latest]
    if not missing:
        return []
    try:
        catalog = read_dsn(pipeline.source_dsn(settings), sorted({s.source_schema for s in missing}))
    except Exception as exc:  # psycopg errors of every kind: the first change still makes the version
        log.warning("event=seed_versions_skipped reason=%r", str(exc)[:300])
        return []
    published = []
    for spec in missing:
        table = catalog.table(spec.source_schema, spec.source_table)
        planned = schemas.catalog_columns(spec, table) if table is not None else None
        if planned is None:
            continue
        sv = book.for_columns(spec.name, *planned)
        published.append(sv)
        log.info("event=schema_seeded entity=%s version=%d columns=%d", spec.name, sv.version, len(sv.columns))
    return published
