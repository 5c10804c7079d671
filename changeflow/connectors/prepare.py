"""What a PostgreSQL source needs before Debezium can capture a pipeline, for exactly the pipeline's tables.

- the publication (``publication.autocreate.mode=disabled``: created here, so the replication role owns
  no table): created, or set to exactly the pipeline's tables plus its signal and heartbeat tables;
- the signal table (incremental snapshots) and the heartbeat table (keeps the slot moving);
- CONNECT on the database, USAGE on the schemas, SELECT on the captured tables and writes on the signal
  and heartbeat tables, for the replication role.

Replica identity is left as it is (``pipeline check`` says when a table needs one). The replication slot is
created by Debezium itself on first start (it needs the REPLICATION attribute only).

``apply`` runs it in one transaction on a connection that may (the stack's superuser, or the tables'
owner); ``script`` is the same as SQL text for a DBA (``changeflow connectors prepare --print``).
Identifiers are quoted with ``psycopg.sql.Identifier`` and values bound, so any table name works.
"""

from __future__ import annotations

from dataclasses import dataclass

import psycopg
from psycopg import sql

from changeflow.pipelines import outbox
from changeflow.pipelines.spec import Pipeline, split_table
from changeflow.waiting import wait_until

_DOLLAR_TAG = "$changeflow_prepare$"


class PrepareError(RuntimeError):
    pass


@dataclass(frozen=True)
class SourceObjects:
    database: str
    role: str
    publication: str
    tables: tuple[tuple[str, str], ...]  # the entities' and the outboxes' tables
    signal: tuple[str, str]
    heartbeat: tuple[str, str]
    outboxes: tuple[outbox.OutboxSpec, ...] = ()

    @property
    def published(self) -> tuple[tuple[str, str], ...]:
        return tuple(dict.fromkeys([*self.tables, self.signal, self.heartbeat]))

    @property
    def schemas(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(s for s, _ in self.published))


def objects(pipeline: Pipeline) -> SourceObjects:
    pg = pipeline.file.sources.postgres
    if pg is None:
        raise PrepareError(f"pipeline {pipeline.name} has no postgres source: nothing to prepare")
    tables = tuple(dict.fromkeys([*((e.source_schema, e.source_table) for e in pipeline.entities.values()
                                    if e.source == "postgres"),
                                  *((o.source_schema, o.source_table) for o in outbox.specs(pipeline))]))
    return SourceObjects(database=pg.database, role=pg.user, publication=pipeline.publication, tables=tables,
                         signal=split_table(pipeline.signal_table), heartbeat=split_table(pipeline.heartbeat_table),
                         outboxes=tuple(outbox.specs(pipeline)))


def _ident(qualified: tuple[str, str]) -> sql.Identifier:
    return sql.Identifier(*qualified)


def _table_list(tables: tuple[tuple[str, str], ...]) -> sql.Composable:
    return sql.SQL(", ").join(_ident(t) for t in tables)


def grants_and_tables(o: SourceObjects) -> list[sql.Composed]:
    """Idempotent statements: own tables, then the grants (tables exist before they are granted)."""
    role = sql.Identifier(o.role)
    out: list[sql.Composed] = [
        sql.SQL("CREATE TABLE IF NOT EXISTS {} (id varchar(64) PRIMARY KEY, type varchar(32) NOT NULL, "
                "data varchar(4096))").format(_ident(o.signal)),
        sql.SQL("CREATE TABLE IF NOT EXISTS {} (id integer PRIMARY KEY, ts timestamptz NOT NULL)").format(
            _ident(o.heartbeat)),
        sql.SQL("GRANT CONNECT ON DATABASE {} TO {}").format(sql.Identifier(o.database), role),
        sql.SQL("GRANT USAGE ON SCHEMA {} TO {}").format(sql.SQL(", ").join(map(sql.Identifier, o.schemas)), role),
    ]
    if o.tables:
        out.append(sql.SQL("GRANT SELECT ON TABLE {} TO {}").format(_table_list(o.tables), role))
    out.append(sql.SQL("GRANT SELECT, INSERT, UPDATE, DELETE ON TABLE {}, {} TO {}").format(
        _ident(o.signal), _ident(o.heartbeat), role))
    for spec in o.outboxes:
        out += outbox_statements(spec)
    return out


def outbox_statements(spec: outbox.OutboxSpec) -> list[sql.Composed]:
    """What an outbox table gets (idempotent):

    - a payload bigger than one Kafka message fails the connector's task (every table stops), so it is
      refused in the writer's own transaction instead (``NOT VALID``: rows already there are not scanned);
    - Debezium's router drops an UPDATE of an outbox row with a warning, so a trigger emits a transactional
      logical decoding message (``pg_logical_emit_message``, prefix ``changeflow.outbox.<name>``) naming the
      row, which the connector moves to the outbox DLQ with its reason (``connectors.render``)."""
    table = sql.Identifier(spec.source_schema, spec.source_table)
    out: list[sql.Composed] = []
    if spec.config.max_payload_bytes:
        name = sql.Identifier(spec.payload_constraint)
        out.append(sql.SQL("ALTER TABLE {} DROP CONSTRAINT IF EXISTS {}").format(table, name))
        out.append(sql.SQL("ALTER TABLE {} ADD CONSTRAINT {} CHECK (octet_length({}::text) <= {}) NOT VALID").format(
            table, name, sql.Identifier(spec.config.columns.payload), sql.Literal(spec.config.max_payload_bytes)))
    function = sql.Identifier(spec.source_schema, spec.update_trigger)
    trigger = sql.Identifier(spec.update_trigger)
    body = sql.SQL(
        "BEGIN\n"
        "    PERFORM pg_catalog.pg_logical_emit_message(true, {prefix}, pg_catalog.json_build_object("
        "'outbox', {name}, 'id', NEW.{id}::text, 'reason', {reason})::text);\n"
        "    RETURN NEW;\n"
        "END").format(prefix=sql.Literal(spec.message_prefix), name=sql.Literal(spec.name),
                      id=sql.Identifier(spec.config.columns.id), reason=sql.Literal(outbox.UPDATE_REASON))
    text = body.as_string(None)
    if _DOLLAR_TAG in text:
        raise PrepareError(f"an outbox column name holds {_DOLLAR_TAG}; rename it")
    out.append(sql.SQL("CREATE OR REPLACE FUNCTION {}() RETURNS trigger LANGUAGE plpgsql AS {tag}\n{body}\n{tag}")
               .format(function, tag=sql.SQL(_DOLLAR_TAG), body=sql.SQL(text)))
    out.append(sql.SQL("DROP TRIGGER IF EXISTS {} ON {}").format(trigger, table))
    out.append(sql.SQL("CREATE TRIGGER {} AFTER UPDATE ON {} FOR EACH ROW EXECUTE FUNCTION {}()").format(
        trigger, table, function))
    return out


def publication_block(o: SourceObjects) -> sql.Composed:
    """Create the publication, or set it to exactly these tables: one idempotent DO block."""
    pub = sql.Identifier(o.publication)
    tables = _table_list(o.published)
    body = sql.SQL(
        "BEGIN\n"
        "    IF NOT EXISTS (SELECT FROM pg_catalog.pg_publication WHERE pubname = {name}) THEN\n"
        "        CREATE PUBLICATION {pub} FOR TABLE {tables} WITH (publish_via_partition_root = true);\n"
        "    ELSE\n"
        "        ALTER PUBLICATION {pub} SET TABLE {tables};\n"
        "        ALTER PUBLICATION {pub} SET (publish_via_partition_root = true);\n"
        "    END IF;\n"
        "END"
    ).format(name=sql.Literal(o.publication), pub=pub, tables=tables)
    text = body.as_string(None)
    if _DOLLAR_TAG in text:
        raise PrepareError(f"a table name holds {_DOLLAR_TAG}; create the publication by hand")
    return sql.SQL("DO {tag}\n{body}\n{tag}").format(tag=sql.SQL(_DOLLAR_TAG), body=sql.SQL(text))


def script(pipeline: Pipeline) -> str:
    """The SQL a DBA runs (as the tables' owner or a superuser), in database ``objects(p).database``."""
    o = objects(pipeline)
    lines = [
        f"-- changeflow pipeline {pipeline.name}: what Debezium needs in database {o.database}.",
        f"-- Run as a superuser or the owner of the tables, connected to {o.database}. Idempotent.",
        f"-- The role {o.role} must exist with LOGIN REPLICATION (CREATE ROLE ... WITH LOGIN REPLICATION",
        "-- PASSWORD '...'); replica identity is left as it is; Debezium creates the slot "
        f"{pipeline.slot} itself.",
        "BEGIN;",
    ]
    lines += [s.as_string(None) + ";" for s in grants_and_tables(o)]
    lines.append(publication_block(o).as_string(None) + ";")
    lines.append("COMMIT;")
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class _Publication:
    tables: set[tuple[str, str]]
    via_root: bool


def _current_publication(cur: psycopg.Cursor, name: str) -> _Publication | None:
    row = cur.execute("SELECT puballtables, pubviaroot FROM pg_catalog.pg_publication WHERE pubname = %s",
                      (name,)).fetchone()
    if row is None:
        return None
    if row[0]:
        raise PrepareError(f"publication {name} is FOR ALL TABLES; give the pipeline its own `publication`")
    # pg_publication_rel, not pg_publication_tables: the view lists a partitioned table's leaves (not the
    # table itself) when the publication does not publish through the root.
    rows = cur.execute("SELECT n.nspname, c.relname FROM pg_catalog.pg_publication_rel pr "
                       "JOIN pg_catalog.pg_publication p ON p.oid = pr.prpubid "
                       "JOIN pg_catalog.pg_class c ON c.oid = pr.prrelid "
                       "JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace WHERE p.pubname = %s",
                       (name,)).fetchall()
    return _Publication({(str(s), str(t)) for s, t in rows}, bool(row[1]))


def apply(conn: psycopg.Connection, pipeline: Pipeline) -> list[str]:
    """Run everything in one transaction; returns what was done, one line each. Raises
    ``psycopg.errors.InsufficientPrivilege`` when the connection may not (then a DBA runs ``script``)."""
    o = objects(pipeline)
    done: list[str] = []
    with conn.transaction(), conn.cursor() as cur:
        if cur.execute("SELECT current_database()").fetchone() != (o.database,):
            raise PrepareError(f"connected to the wrong database; the pipeline's is {o.database}")
        if cur.execute("SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = %s", (o.role,)).fetchone() is None:
            raise PrepareError(f"role {o.role!r} does not exist; create it: CREATE ROLE {o.role} WITH LOGIN "
                               "REPLICATION PASSWORD '...' (the password the connector's reference resolves to)")
        existed = {table: cur.execute("SELECT to_regclass(%s) IS NOT NULL",
                                      (sql.Identifier(*table).as_string(conn),)).fetchone() == (True,)
                   for table in (o.signal, o.heartbeat)}
        for statement in grants_and_tables(o):
            cur.execute(statement)
        done += [f"{what} table {'.'.join(table)}: {'present' if existed[table] else 'created'}"
                 for what, table in (("signal", o.signal), ("heartbeat", o.heartbeat))]
        done.append(f"role {o.role}: SELECT on {len(o.tables)} table(s), writes on the signal and heartbeat tables")
        for spec in o.outboxes:
            limit = spec.config.max_payload_bytes
            done.append(f"outbox table {spec.qualified_table}: "
                        + (f"{spec.config.columns.payload} limited to {limit} bytes, " if limit else "")
                        + "an UPDATE of a row reported to the outbox DLQ")
        current = _current_publication(cur, o.publication)
        wanted = set(o.published)
        pub, tables = sql.Identifier(o.publication), _table_list(o.published)
        # publish_via_partition_root: a partitioned table's changes are published under its own name (the one
        # the connector's include list holds), not under each partition's, which Debezium would drop.
        if current is None:
            cur.execute(sql.SQL("CREATE PUBLICATION {} FOR TABLE {} WITH (publish_via_partition_root = true)")
                        .format(pub, tables))
            done.append(f"publication {o.publication}: created for {len(wanted)} table(s), publishing partitions "
                        "through their root")
            return done
        if current.tables != wanted:
            cur.execute(sql.SQL("ALTER PUBLICATION {} SET TABLE {}").format(pub, tables))
            added, removed = sorted(wanted - current.tables), sorted(current.tables - wanted)
            change = ", ".join([*(f"+{s}.{t}" for s, t in added), *(f"-{s}.{t}" for s, t in removed)])
            done.append(f"publication {o.publication}: set to exactly the pipeline's tables ({change})")
        if not current.via_root:
            cur.execute(sql.SQL("ALTER PUBLICATION {} SET (publish_via_partition_root = true)").format(pub))
            done.append(f"publication {o.publication}: publish_via_partition_root turned on (a partitioned "
                        "table's changes now arrive under its own name; before, they were published under each "
                        "partition's name and dropped)")
        if current.tables == wanted and current.via_root:
            done.append(f"publication {o.publication}: unchanged")
    return done


def drop_slot(conn: psycopg.Connection, slot: str, timeout: float = 30.0) -> str:
    """Drop a replication slot once its connector lets go of it (an active slot cannot be dropped); what was
    done. Raises ``PrepareError`` when it is still in use after ``timeout`` s."""
    def released() -> str | None:
        row = conn.execute("SELECT active FROM pg_catalog.pg_replication_slots WHERE slot_name = %s",
                           (slot,)).fetchone()
        conn.commit()
        if row is None:
            return f"replication slot {slot}: absent"
        if not row[0]:
            conn.execute("SELECT pg_catalog.pg_drop_replication_slot(%s)", (slot,))
            conn.commit()
            return f"replication slot {slot}: dropped"
        return None

    return wait_until(released, timeout, what=f"replication slot {slot} released", error=lambda _: PrepareError(
        f"replication slot {slot} is still in use after {timeout:.0f}s; is the connector still running?"))


def drop(conn: psycopg.Connection, pipeline: Pipeline, timeout: float = 30.0) -> list[str]:
    """Drop the pipeline's replication slot (waiting for its connector to let go), its publication, and what
    ``outbox_statements`` added to outbox tables. The signal and heartbeat tables stay (they are tables in the
    user's database)."""
    o = objects(pipeline)
    done: list[str] = []
    done.append(drop_slot(conn, pipeline.slot, timeout))
    with conn.cursor() as cur:
        existed = _current_publication(cur, o.publication) is not None
        cur.execute(sql.SQL("DROP PUBLICATION IF EXISTS {}").format(sql.Identifier(o.publication)))
        conn.commit()
        done.append(f"publication {o.publication}: {'dropped' if existed else 'absent'}")
        for spec in o.outboxes:  # what `outbox_statements` added to the outbox table
            table = sql.Identifier(spec.source_schema, spec.source_table)
            cur.execute(sql.SQL("DROP TRIGGER IF EXISTS {} ON {}").format(sql.Identifier(spec.update_trigger), table))
            cur.execute(sql.SQL("DROP FUNCTION IF EXISTS {}()").format(
                sql.Identifier(spec.source_schema, spec.update_trigger)))
            cur.execute(sql.SQL("ALTER TABLE {} DROP CONSTRAINT IF EXISTS {}").format(
                table, sql.Identifier(spec.payload_constraint)))
            conn.commit()
            done.append(f"outbox table {spec.qualified_table}: changeflow's trigger and payload limit removed")
    return done
