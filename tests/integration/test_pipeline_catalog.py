"""Catalog, init, check and prepare against the live PostgreSQL, on a throwaway schema with odd identifiers
(spaces, quotes, backslashes, upper case), a composite-key table, a key not called `id`, an enum, and a table
without a primary key. Everything the test creates is dropped at the end."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
import yaml
from psycopg import sql
from typer.testing import CliRunner

from changeflow import context
from changeflow.commands import init as init_commands
from changeflow.commands import pipeline as pipeline_commands
from changeflow.connectors import prepare
from changeflow.pipelines.catalog import read_dsn
from changeflow.pipelines.load import load
from changeflow.settings import Settings

pytestmark = pytest.mark.integration


@pytest.fixture
def odd_schema() -> Iterator[tuple[str, str, Settings]]:
    settings = Settings()
    tag = uuid.uuid4().hex[:8]
    schema = f'cf it "Odd" \\{tag}'
    name = f"it_{tag}"
    with psycopg.connect(settings.pg_dsn, autocommit=True) as conn:
        s = sql.Identifier(schema)
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(s))
        conn.execute(sql.SQL("CREATE TYPE {}.{} AS ENUM ('new', 'vip')").format(s, sql.Identifier("Mood")))
        conn.execute(sql.SQL(
            'CREATE TABLE {}."Order Lines" (order_id uuid, "line no" integer, "weird""col\\" numeric(10,3), '
            "at timestamptz, PRIMARY KEY (order_id, \"line no\"))").format(s))
        conn.execute(sql.SQL('CREATE TABLE {}.customers (code text PRIMARY KEY, mood {}."Mood", tags text[], '
                             "payload jsonb)").format(s, s))
        conn.execute(sql.SQL('CREATE TABLE {}."audit log" (at timestamptz, what text)').format(s))
    try:
        yield schema, name, settings
    finally:
        with psycopg.connect(settings.pg_dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP PUBLICATION IF EXISTS {}").format(sql.Identifier(f"{name}_pub")))
            conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(schema)))
            for suffix in ("signal", "heartbeat"):
                conn.execute(sql.SQL("DROP TABLE IF EXISTS public.{}").format(sql.Identifier(f"{name}_{suffix}")))
        context.use_pipeline(None)


def test_catalog_reads_odd_identifiers_composite_keys_and_enums(odd_schema: tuple[str, str, Settings]) -> None:
    schema, _, settings = odd_schema
    catalog = read_dsn(settings.pg_dsn, [schema])
    lines = catalog.table(schema, "Order Lines")
    assert lines is not None
    assert lines.primary_key == ("order_id", "line no")
    assert [(c.name, c.format_type) for c in lines.columns] == [
        ("order_id", "uuid"), ("line no", "integer"), ('weird"col\\', "numeric(10,3)"),
        ("at", "timestamp with time zone")]
    customers = catalog.table(schema, "customers")
    assert customers is not None and customers.primary_key == ("code",)
    mood = customers.column("mood")
    assert mood is not None and mood.is_enum and not customers.columns[0].nullable
    assert [t.name for t in catalog.without_primary_key()] == ["audit log"]


def test_init_check_and_prepare_on_a_new_pipeline(odd_schema: tuple[str, str, Settings], tmp_path: Path) -> None:
    schema, name, settings = odd_schema
    runner = CliRunner()
    file = tmp_path / "pipeline.yml"
    result = runner.invoke(init_commands.app, ["postgres", settings.pg_dsn, "--schema", schema, "--name", name,
                                               "-o", str(file)])
    assert result.exit_code == 0, result.output
    text = file.read_text()
    assert f"#   {schema}.audit log: no primary key" in text
    pipeline = load(file)
    assert set(pipeline.entities) == {"order_lines", "customers"}
    lines = pipeline.entity("order_lines")
    assert (lines.source_schema, lines.source_table, lines.key_columns) == (schema, "Order Lines", None)
    assert str(lines.declared_types['weird"col\\']) == "decimal(10,3)"
    assert str(pipeline.entity("customers").declared_types["mood"]) == "enum"
    pg = pipeline.file.sources.postgres
    assert pg is not None and (pg.user, pg.database, pg.host) == ("debezium", "commerce", "127.0.0.1")

    context.use_pipeline(file)
    result = runner.invoke(pipeline_commands.app, ["check"])
    assert result.exit_code == 0, result.output
    assert "file and catalog ok" in result.output

    # The no-PK table listed without a key is refused, with the reason and the fix.
    data = yaml.safe_load(text)
    data["entities"]["audit"] = {"table": f"{schema}.audit log"}
    data["entities"]["customers"]["key"] = ["kode"]
    file.write_text(yaml.safe_dump(data, sort_keys=False))
    context.use_pipeline(file)
    result = runner.invoke(pipeline_commands.app, ["check"])
    assert result.exit_code == 1, result.output
    assert (f"entities.customers.key: key column 'kode' is not in {schema}.customers; did you mean 'code'?"
            in result.output)
    assert f"entities.audit.key: {schema}.audit log has no primary key; declare `key:" in result.output
    assert f"entities.audit.table: {schema}.audit log has no replica identity" in result.output

    file.write_text("name: x\nentities: {}\n")
    context.use_pipeline(file)
    result = runner.invoke(pipeline_commands.app, ["check"])
    assert result.exit_code == 2, result.output

    # prepare: exactly the pipeline's tables in its own publication, the grants, idempotent; then dropped.
    with psycopg.connect(settings.pg_dsn) as conn:
        done = prepare.apply(conn, pipeline)
        assert done[-1] == f"publication {name}_pub: created for 4 table(s), publishing partitions through their root"
        assert done[:2] == [f"signal table public.{name}_signal: created",
                            f"heartbeat table public.{name}_heartbeat: created"]
        again = prepare.apply(conn, pipeline)
        assert again[:2] == [f"signal table public.{name}_signal: present",
                             f"heartbeat table public.{name}_heartbeat: present"]
        assert again[-1] == f"publication {name}_pub: unchanged"
        published = conn.execute("SELECT schemaname, tablename FROM pg_publication_tables WHERE pubname = %s",
                                 (f"{name}_pub",)).fetchall()
        assert sorted(published) == sorted([(schema, "Order Lines"), (schema, "customers"),
                                            ("public", f"{name}_signal"), ("public", f"{name}_heartbeat")])
        granted = conn.execute(
            "SELECT has_table_privilege('debezium', format('%%I.%%I', %s::text, 'Order Lines'), 'SELECT')",
            (schema,)).fetchone()
        assert granted == (True,)
        assert any("dropped" in line for line in prepare.drop(conn, pipeline))
        assert conn.execute("SELECT 1 FROM pg_publication WHERE pubname = %s", (f"{name}_pub",)).fetchone() is None


def test_apply_and_delete_a_second_pipeline_beside_commerce(odd_schema: tuple[str, str, Settings],
                                                           pipeline: Settings, tmp_path: Path) -> None:
    """init → connectors apply (prepare, validate, RUNNING, own slot) → connectors delete (slot and
    publication gone); the commerce connector and slot (running: the ``pipeline`` fixture) are untouched."""
    from confluent_kafka.admin import AdminClient

    from changeflow.commands import connectors as connector_commands
    from changeflow.connectors.client import KafkaConnectClient

    schema, name, settings = odd_schema
    runner = CliRunner()
    file = tmp_path / "pipeline.yml"
    assert runner.invoke(init_commands.app, ["postgres", settings.pg_dsn, "--schema", schema, "--name", name,
                                             "-o", str(file)]).exit_code == 0
    context.use_pipeline(file)
    client = KafkaConnectClient(settings.connect_url)
    admin = AdminClient({"bootstrap.servers": settings.kafka_bootstrap})
    try:
        result = runner.invoke(connector_commands.app, ["apply", "--timeout", "120"])
        assert result.exit_code == 0, result.output
        assert f"connector {name}-postgres: created" in result.output
        assert "RUNNING" in result.output
        with psycopg.connect(settings.pg_dsn) as conn:
            slots: dict[str, bool] = dict(conn.execute("SELECT slot_name, active FROM pg_replication_slots").fetchall())
        assert f"{name}_commerce" in slots and slots.get("changeflow_commerce") is True
        result = runner.invoke(connector_commands.app, ["delete", "--yes"])
        assert result.exit_code == 0, result.output
        assert f"replication slot {name}_commerce: dropped" in result.output
        assert f"{name}-postgres" not in client.list()
    finally:
        if f"{name}-postgres" in client.list():
            client.delete(f"{name}-postgres")
        client.close()
        topics = [t for t in admin.list_topics(timeout=10).topics if t.startswith(f"{name}.")]
        for future in (admin.delete_topics(topics).values() if topics else []):
            future.result()
        with psycopg.connect(settings.pg_dsn, autocommit=True) as conn:
            slot = (f"{name}_commerce",)
            if conn.execute("SELECT 1 FROM pg_replication_slots WHERE slot_name = %s", slot).fetchone():
                conn.execute("SELECT pg_drop_replication_slot(%s)", slot)
