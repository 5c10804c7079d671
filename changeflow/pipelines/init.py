"""A starter pipeline file from a database's catalog: what ``changeflow init postgres DSN`` writes.

Pure (catalog in, YAML text out). Every table with a primary key becomes an entity named after the table
(made a unique lower-case identifier), landing in all three stores, with its column types read from the
catalog; its key is the primary key, so no ``key`` is written. Tables without a primary key are listed
as comments with the reason. The password is never taken from the DSN: the file refers to
``${env:CHANGEFLOW_PG_REPLICATION_PASSWORD}``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import yaml

from changeflow.pipelines.catalog import Catalog, Table
from changeflow.pipelines.model import store_classes
from changeflow.pipelines.types import from_postgres

PASSWORD_REF = "${env:CHANGEFLOW_PG_REPLICATION_PASSWORD}"
# Debezium's bookkeeping tables (the commerce demo's names, and the defaults of pipelines.spec).
_OWN_TABLES = re.compile(r"^(debezium|.+)_(signal|heartbeat)$")


def identifier(text: str, fallback: str = "t") -> str:
    """``Order Items`` → ``order_items``; a leading digit or nothing usable gets ``fallback`` in front."""
    name = re.sub(r"[^a-z0-9_]+", "_", text.lower()).strip("_")
    name = re.sub(r"_+", "_", name)
    if not name or not name[0].isalpha():
        name = f"{fallback}_{name}".rstrip("_")
    return name


def entity_names(tables: Sequence[Table]) -> dict[tuple[str, str], str]:
    """One unique identifier per table: the table name; on a clash the schema in front, then a number."""
    plain = [identifier(t.name) for t in tables]
    clashes = {n for n in plain if plain.count(n) > 1}
    out: dict[tuple[str, str], str] = {}
    taken: set[str] = set()
    for table, name in zip(tables, plain, strict=True):
        candidate = identifier(f"{table.schema}_{table.name}") if name in clashes else name
        unique, n = candidate, 2
        while unique in taken:
            unique, n = f"{candidate}_{n}", n + 1
        taken.add(unique)
        out[(table.schema, table.name)] = unique
    return out


def _is_own_table(table: Table, pipeline_name: str) -> bool:
    m = _OWN_TABLES.match(table.name)
    return m is not None and m.group(1) in ("debezium", pipeline_name) and table.schema == "public"


def source_block(conninfo: Mapping[str, Any], schemas: Sequence[str], user: str | None = None) -> dict[str, Any]:
    """``sources.postgres`` from a parsed DSN (``psycopg.conninfo.conninfo_to_dict``): never its password.
    ``user`` (Debezium's replication role) wins over the DSN's user, which only had to read the catalog."""
    block: dict[str, Any] = {}
    host = conninfo.get("host") or conninfo.get("hostaddr")
    if host and not str(host).startswith("/"):  # a Unix socket directory means nothing to Kafka Connect
        block["host"] = str(host)
    if conninfo.get("port"):
        block["port"] = int(conninfo["port"])
    block["database"] = str(conninfo.get("dbname") or conninfo.get("user") or "postgres")
    if user or conninfo.get("user"):
        block["user"] = str(user or conninfo["user"])
    block["password"] = PASSWORD_REF
    block["schemas"] = list(schemas)
    return block


def starter(catalog: Catalog, *, name: str, source: Mapping[str, Any]) -> str:
    """The pipeline file's text; it loads with ``pipelines.load.parse``."""
    skipped_own = [t for t in catalog.tables.values() if _is_own_table(t, name)]
    candidates = [t for t in catalog.tables.values() if t not in skipped_own]
    # `table: schema.table` splits at the last dot, so a table name holding one cannot be named yet.
    dotted = [t for t in candidates if "." in t.name]
    with_key = [t for t in candidates if t.primary_key and t not in dotted]
    without_key = [t for t in candidates if not t.primary_key and t not in dotted]
    names = entity_names(with_key)
    entities: dict[str, Any] = {}
    for table in with_key:
        entities[names[(table.schema, table.name)]] = {
            "table": f"{table.schema}.{table.name}",
            "columns": {c.name: str(from_postgres(c.format_type, is_enum=c.is_enum)) for c in table.columns},
            "stores": {store: True for store, cls in store_classes().items() if not getattr(cls, "opt_in", False)},
        }
    document = {"name": name, "sources": {"postgres": dict(source)}, "entities": entities}
    header = [
        f"# Pipeline {name}: written by `changeflow init postgres` from database {catalog.database}",
        f"# (schemas: {', '.join(catalog.schemas)}). Edit freely; check it with `changeflow pipeline check`,",
        "# then `changeflow connectors apply` and `changeflow worker`. Reference: README \"Pipeline file\";",
        "# JSON Schema: `changeflow pipeline schema`.",
        "# Every entity's key is its table's primary key; column types are the catalog's (they are also",
        "# read from each change, so a column added later gets its real type too).",
    ]
    text = "\n".join(header) + "\n" + yaml.safe_dump(document, sort_keys=False, allow_unicode=True, width=120)
    notes = []
    if without_key:
        notes.append("# Tables left out: no primary key, so a change cannot name its row. To capture one, add it")
        notes.append("# as an entity with `key: [columns that identify a row]` and give it REPLICA IDENTITY FULL.")
        notes.extend(f"#   {t.qualified}: no primary key" for t in without_key)
    if dotted:
        notes.append("# Tables left out: their name holds a '.', which `table: schema.table` cannot say yet:")
        notes.extend(f"#   {t.qualified}" for t in dotted)
    if skipped_own:
        notes.append("# Left out as Debezium's own bookkeeping tables:")
        notes.extend(f"#   {t.qualified}" for t in skipped_own)
    if notes:
        text += "\n" + "\n".join(notes) + "\n"
    if not entities:
        # `entities: {}` would not load; leave a placeholder the user must fill.
        raise ValueError(
            f"no table with a primary key in schemas {', '.join(catalog.schemas)} of {catalog.database}; "
            + ("tables without one: " + ", ".join(t.qualified for t in without_key) if without_key
               else "pass --schema for the schemas that hold the tables")
        )
    return text
