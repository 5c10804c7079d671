"""``changeflow pipeline check``: a loaded pipeline judged against the source's catalog, before anything runs.

Pure: the pipeline and a ``pipelines.catalog.Catalog`` (read by the caller) in, a list of problems out,
each one line ``entities.orders.stores.search.index: what is wrong; what would be right``. A file that
does not load never gets here (``pipelines.load`` refuses it with the same kind of message).

What is checked: tables and columns named anywhere in an entity (key, fields, columns, ClickHouse
order_by and types, the names read by derived fields and the filter) exist; a table without a primary
key declares a key (and can be published: REPLICA IDENTITY); two entities never land on one store object
or read one table; a hash has a salt; expressions compile and hooks import; sections that are planned
but not implemented (views, erasure) are empty; outboxes are judged by ``pipelines.outbox.check``. An
entity with a hook may add any field, so names it could add are not judged.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from changeflow.pipelines import outbox
from changeflow.pipelines.catalog import Catalog, Table
from changeflow.pipelines.model import DerivedEvent
from changeflow.pipelines.spec import EntitySpec, Pipeline, split_table
from changeflow.pipelines.transform import ExpressionError, compile_expression, load_hook

# The pipeline's own ClickHouse tables (pipelines.spec: P.changelog), which no entity may take.
RESERVED_CLICKHOUSE_TABLES = frozenset({"changelog"})


@dataclass(frozen=True)
class Problem:
    location: str
    message: str

    def __str__(self) -> str:
        return f"{self.location}: {self.message}"


def _suggest(name: str, choices: Iterable[str]) -> str:
    choices = list(choices)
    close = difflib.get_close_matches(name, choices, n=1, cutoff=0.6)
    if close:
        return f"did you mean {close[0]!r}?"
    shown = ", ".join(choices[:12]) + (", ..." if len(choices) > 12 else "")
    return f"its columns are: {shown}" if shown else "it has no columns"


def _unknown_column(where: str, column: str, table: Table, what: str = "column") -> Problem:
    return Problem(where, f"{what} {column!r} is not in {table.qualified}; {_suggest(column, table.column_names)}")


def check(pipeline: Pipeline, catalog: Catalog | None = None, *, import_hooks: bool = True,
          hook_loader: Callable[..., object] = load_hook) -> list[Problem]:
    """Every problem found; empty means the pipeline may be registered."""
    problems: list[Problem] = []
    for section in ("views", "erasure"):
        if getattr(pipeline.file, section):
            problems.append(Problem(section, "planned, not yet supported; remove this section (changeflow would "
                                             "silently do less than the file says)"))
    base = pipeline.path.parent if pipeline.path is not None else None
    for spec in pipeline.entities.values():
        problems.extend(_entity_own(spec, base, import_hooks, hook_loader))
        if catalog is not None and spec.source == "postgres":
            problems.extend(_entity_against_catalog(spec, catalog, pipeline.publication))
    problems.extend(_collisions(pipeline))
    problems.extend(Problem(at, message) for at, message in outbox.check(pipeline, catalog))
    return problems


def uncaptured(pipeline: Pipeline, catalog: Catalog) -> list[Table]:
    """Tables of the schemas read that no entity captures (a table created after ``init`` is one): their
    changes never reach Kafka, because the connector's include list names the pipeline's tables only, so
    nothing else would ever say they are missing. Partitions are not tables of their own (their root is),
    and the pipeline's signal and heartbeat tables are its own."""
    captured = {(e.source_schema, e.source_table) for e in pipeline.entities.values() if e.source == "postgres"}
    captured |= {(o.source_schema, o.source_table) for o in outbox.specs(pipeline)}
    own = {split_table(pipeline.signal_table), split_table(pipeline.heartbeat_table)}
    return [t for key, t in sorted(catalog.tables.items()) if key not in captured and key not in own]


def _entity_own(spec: EntitySpec, base: object, import_hooks: bool,
                hook_loader: Callable[..., object]) -> list[Problem]:
    """What the entity says about itself: salts, expressions, hooks."""
    at = f"entities.{spec.name}"
    cfg = spec.config
    out: list[Problem] = []
    if cfg.fields.hash and not cfg.fields.salt:
        out.append(Problem(f"{at}.fields.salt", "`hash` needs a `salt` (a reference such as "
                                                "${env:CHANGEFLOW_HASH_SALT})"))
    for name, derived in cfg.derive.items():
        try:
            compile_expression(derived.expr)
        except ExpressionError as exc:
            out.append(Problem(f"{at}.derive.{name}.expr", f"{exc}; write an expression such as "
                                                           "`decimal(price_cents) / 100`"))
    if cfg.filter is not None:
        try:
            compile_expression(cfg.filter)
        except ExpressionError as exc:
            out.append(Problem(f"{at}.filter", f"{exc}; write an expression such as `status != 'draft'`"))
    for event_name, declared in cfg.events.items():
        if declared.when is not None:
            try:
                compile_expression(declared.when)
            except ExpressionError as exc:
                out.append(Problem(f"{at}.events.{event_name}.when", f"{exc}; write an expression over old and "
                                                                     "new such as `old.price != new.price`"))
    if cfg.hook is not None and import_hooks:
        try:
            hook_loader(cfg.hook, base)
        except Exception as exc:  # the user's module: any failure to import is the problem reported
            out.append(Problem(f"{at}.hook", f"{cfg.hook!r} does not import ({type(exc).__name__}: {exc}); "
                                             "write `module:function` with module.py beside the pipeline file "
                                             "or on the import path"))
    return out


def _names_read(text: str) -> frozenset[str]:
    try:
        return compile_expression(text).names
    except ExpressionError:
        return frozenset()  # reported by _entity_own


def _event_rule(at: str, declared: DerivedEvent, known: set[str], dropped: list[str], table: Table,
                hooked: bool) -> list[Problem]:
    """A derived event's `when` (an expression over `old` and `new`), its carried `fields`, and the
    before-image that reading `old` needs."""
    import ast

    out: list[Problem] = []
    reads_old = bool(declared.when_changed)
    if declared.when is not None:
        try:
            expression = compile_expression(declared.when)
        except ExpressionError:
            pass  # reported by _entity_own
        else:
            for name in sorted(expression.names - {"old", "new"}):
                out.append(Problem(f"{at}.when", f"reads {name!r}; a `when` reads `old.<column>` and "
                                                 "`new.<column>` only"))
            reads_old = reads_old or "old" in expression.names
            for node in ast.walk(expression._parsed):
                if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                        and node.value.id in ("old", "new") and node.attr not in known and not hooked):
                    out.append(_unknown_column(f"{at}.when", node.attr, table))
    for col in declared.fields:
        if col not in known and not hooked:
            out.append(_unknown_column(f"{at}.fields", col, table))
        elif col in dropped:
            out.append(Problem(f"{at}.fields", f"{col!r} is dropped, so an event cannot carry it"))
    if reads_old and table.replica_identity != "f":
        # The old values come from the before-image: without all of it no event is ever emitted.
        out.append(Problem(at, f"reads the old values, which {table.qualified} does not publish (its replica "
                               "identity is not FULL), so no event would ever be emitted; run ALTER TABLE "
                               f"{table.qualified} REPLICA IDENTITY FULL"))
    return out


def _entity_against_catalog(spec: EntitySpec, catalog: Catalog, publication: str) -> list[Problem]:
    at = f"entities.{spec.name}"
    cfg = spec.config
    table = catalog.table(spec.source_schema, spec.source_table)
    root = catalog.root_of(spec.source_schema, spec.source_table)
    if root is not None:
        whole = ".".join(root)
        return [Problem(f"{at}.table", f"{spec.qualified_table} is a partition of {whole}: its changes are "
                                       f"published under {whole}'s name, so this entity would get none after "
                                       f"the snapshot; capture the partitioned table itself: `table: {whole}`")]
    if table is None:
        same_schema = [n for (s, n) in catalog.tables if s == spec.source_schema]
        close = difflib.get_close_matches(spec.source_table, same_schema, n=1, cutoff=0.6)
        if spec.source_schema not in catalog.schemas:
            hint = f"schema {spec.source_schema!r} was not read"
        elif close:
            hint = f"did you mean {spec.source_schema}.{close[0]}?"
        elif same_schema:
            hint = f"tables in {spec.source_schema}: {', '.join(sorted(same_schema)[:12])}"
        else:
            hint = f"schema {spec.source_schema!r} has no tables (or does not exist)"
        return [Problem(f"{at}.table", f"{spec.qualified_table} is not a table of database {catalog.database}; {hint}")]

    out: list[Problem] = []
    if table.partitioned and catalog.publication_via_root is False:
        out.append(Problem(f"{at}.table", f"{table.qualified} is partitioned and publication {publication} "
                                          "publishes its partitions' changes under their own names, which the "
                                          "connector drops (every change after the snapshot lost); run "
                                          "`changeflow connectors apply` (it sets publish_via_partition_root = "
                                          f"true), or ALTER PUBLICATION {publication} SET "
                                          "(publish_via_partition_root = true)"))
    columns = set(table.column_names)
    hooked = cfg.hook is not None  # a hook may add fields: names it could add are not judged
    derived_names = set(cfg.derive)

    # key
    if cfg.key:
        for col in cfg.key:
            if col not in columns:
                out.append(_unknown_column(f"{at}.key", col, table, "key column"))
            elif col in cfg.fields.drop:
                out.append(Problem(f"{at}.fields.drop", f"{col!r} is a key column and cannot be dropped"))
    elif not table.primary_key:
        out.append(Problem(f"{at}.key", f"{table.qualified} has no primary key; declare `key: [columns that "
                                        "identify a row]` (or add a primary key to the table)"))
    # d (default) means the primary key: nothing when there is none; n is nothing.
    if table.replica_identity == "n" or (table.replica_identity == "d" and not table.primary_key):
        out.append(Problem(f"{at}.table", f"{table.qualified} has no replica identity, so UPDATE and DELETE "
                                          "on it fail once it is published; run `ALTER TABLE ... REPLICA "
                                          "IDENTITY FULL` (or USING INDEX of a unique index on the key)"))
    for col in table.primary_key if not cfg.key else ():
        if col in cfg.fields.drop:
            out.append(Problem(f"{at}.fields.drop", f"{col!r} is a key column and cannot be dropped"))
    for col in cfg.key or table.primary_key:
        if col in cfg.fields.hash:
            out.append(Problem(f"{at}.fields.hash", f"{col!r} is a key column: the row's key (every store's key, "
                                                    "the Kafka key, the changelog, the dead letters) would still "
                                                    "carry its clear value; key the entity by another column "
                                                    "(`key: [...]`) or leave this one unhashed"))

    # field policy
    for col in cfg.fields.drop:
        if col not in columns:
            out.append(_unknown_column(f"{at}.fields.drop", col, table))
    for col in cfg.fields.hash:
        if col not in columns and not hooked and col not in derived_names:
            out.append(_unknown_column(f"{at}.fields.hash", col, table))
    for col in cfg.fields.allow or ():
        if col not in columns and not hooked and col not in derived_names:
            out.append(_unknown_column(f"{at}.fields.allow", col, table))

    # declared types
    for col in cfg.columns:
        if col not in columns and col not in derived_names and not hooked:
            out.append(_unknown_column(f"{at}.columns.{col}", col, table))

    # derived fields: each reads source columns or the fields derived before it
    known = set(columns)
    for name, derived in cfg.derive.items():
        for ref in sorted(_names_read(derived.expr) - known):
            if not hooked:
                out.append(Problem(f"{at}.derive.{name}.expr", f"reads {ref!r}, which is not a column of "
                                   f"{table.qualified} nor a field derived before it; "
                                   f"{_suggest(ref, sorted(known))}"))
        known.add(name)
    if cfg.filter is not None and not hooked:
        for ref in sorted(_names_read(cfg.filter) - known):
            out.append(Problem(f"{at}.filter", f"reads {ref!r}, which is not a column of {table.qualified} nor a "
                                               f"derived field; {_suggest(ref, sorted(known))}"))

    # derived events: the columns whose change emits them reach the stream
    for event_name, declared in cfg.events.items():
        for col in declared.when_changed:
            if col not in known and not hooked:
                out.append(_unknown_column(f"{at}.events.{event_name}.when_changed", col, table))
            elif col in cfg.fields.drop:
                out.append(Problem(f"{at}.events.{event_name}.when_changed",
                                   f"{col!r} is dropped, so no change of it reaches the stream; keep it or "
                                   "name another column"))
        out.extend(_event_rule(f"{at}.events.{event_name}", declared, known, cfg.fields.drop, table, hooked))

    # ClickHouse columns: what reaches the store (kept columns and derived fields)
    kept = (set(cfg.fields.allow) | set(cfg.key or table.primary_key)) if cfg.fields.allow is not None else columns
    stored = (kept - set(cfg.fields.drop)) | derived_names | set(cfg.columns)
    ch = cfg.stores.clickhouse
    if ch.enabled:
        for col in ch.order_by or ():
            if col in cfg.fields.drop:
                out.append(Problem(f"{at}.stores.clickhouse.order_by", f"{col!r} is dropped; order by kept columns"))
            elif col not in stored and not hooked:
                out.append(_unknown_column(f"{at}.stores.clickhouse.order_by", col, table))
        for col in ch.types:
            if col not in stored and not hooked:
                out.append(_unknown_column(f"{at}.stores.clickhouse.types.{col}", col, table))
    return out


def _collisions(pipeline: Pipeline) -> list[Problem]:
    out: list[Problem] = []
    redis: dict[str, str] = {}
    search: dict[str, str] = {}
    clickhouse: dict[tuple[str, str], str] = {}
    tables: dict[tuple[str, str, str], str] = {}
    for spec in pipeline.entities.values():
        at = f"entities.{spec.name}"
        where = (spec.source, spec.source_schema, spec.source_table)
        if where in tables:
            field = "collection" if spec.source == "mongodb" else "table"
            out.append(Problem(f"{at}.{field}", f"{spec.qualified_table} is already read by entity "
                                                f"{tables[where]!r}; one table maps to one entity"))
        else:
            tables[where] = spec.name
        if spec.stored_in("redis"):
            prefix = spec.redis_prefix
            for other_prefix, other in redis.items():
                if prefix == other_prefix:
                    out.append(Problem(f"{at}.stores.redis.prefix", f"{prefix!r} is also entity {other!r}'s prefix; "
                                                                    f"give each entity its own (default: "
                                                                    f"{spec.namespace}:{spec.name})"))
                elif prefix.startswith(other_prefix + ":") or other_prefix.startswith(prefix + ":"):
                    out.append(Problem(f"{at}.stores.redis.prefix", f"{prefix!r} and entity {other!r}'s "
                                                                    f"{other_prefix!r} share keys; use prefixes "
                                                                    "where neither starts with the other and ':'"))
            redis.setdefault(prefix, spec.name)
        if spec.stored_in("search"):
            index = spec.search_index
            if index in search:
                out.append(Problem(f"{at}.stores.search.index", f"{index!r} is also entity {search[index]!r}'s "
                                                                f"index; give each entity its own (default: "
                                                                f"{spec.namespace}-{spec.name})"))
            search.setdefault(index, spec.name)
        if spec.stored_in("clickhouse"):
            target = (spec.clickhouse_database, spec.clickhouse_table)
            if target in clickhouse:
                out.append(Problem(f"{at}.stores.clickhouse.table", f"{'.'.join(target)} is also entity "
                                                                    f"{clickhouse[target]!r}'s table; give each "
                                                                    f"entity its own (default: "
                                                                    f"{spec.namespace}.{spec.name})"))
            elif target[0] == pipeline.clickhouse_database and target[1] in RESERVED_CLICKHOUSE_TABLES:
                out.append(Problem(f"{at}.stores.clickhouse.table", f"{'.'.join(target)} is the pipeline's own "
                                                                    "table; choose another `table`"))
            clickhouse.setdefault(target, spec.name)
    return out
