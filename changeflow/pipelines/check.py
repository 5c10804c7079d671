"""``changeflow pipeline check``: a loaded pipeline judged against the source's catalog, before anything runs.

Pure: the pipeline and a ``pipelines.catalog.Catalog`` (read by the caller) in, a list of problems out,
each one line ``entities.orders.stores.search.index: what is wrong; what would be right``. A file that
does not load never gets here (``pipelines.load`` refuses it with the same kind of message).

What is checked: tables and columns named anywhere in an entity (key, fields, columns, the names read by
derived fields and the filter, and those a store's configuration names: each registered store's
``check_entity`` hook) exist; a table without a primary key declares a key (and can be published: REPLICA
IDENTITY); two entities never read one table nor land on one store object (each store's ``check_pipeline``
hook); a hash has a salt; expressions compile and hooks import; outboxes are judged by
``pipelines.outbox.check``, erasure subjects by ``pipelines.erasure.check``. Views: every
entity, alias, column and group named exists, join columns are of a type the looked-up key can equal,
lookups lead back to the root (no cycle).
An entity with a hook may add any field, so names it could add are not judged.
"""

from __future__ import annotations

import ast
import difflib
from collections.abc import Callable

from changeflow.pipelines import erasure, outbox
from changeflow.pipelines.catalog import Catalog, Table
from changeflow.pipelines.model import DerivedEvent, store_classes
from changeflow.pipelines.problems import Problem, StoredColumns, suggest, unknown_column
from changeflow.pipelines.spec import EntitySpec, Pipeline, split_table
from changeflow.pipelines.transform import ExpressionError, compile_expression, load_hook
from changeflow.pipelines.types import from_postgres
from changeflow.pipelines.views import ViewDef


def check(pipeline: Pipeline, catalog: Catalog | None = None, *, import_hooks: bool = True,
          hook_loader: Callable[..., object] = load_hook) -> list[Problem]:
    """Every problem found; empty means the pipeline may be registered."""
    problems: list[Problem] = []
    base = pipeline.path.parent if pipeline.path is not None else None
    problems.extend(_views(pipeline, catalog))
    for spec in pipeline.captured():
        problems.extend(_entity_own(spec, base, import_hooks, hook_loader))
        if catalog is not None and spec.source == "postgres":
            problems.extend(_entity_against_catalog(spec, catalog, pipeline.publication))
    problems.extend(_collisions(pipeline))
    problems.extend(Problem(at, message) for at, message in outbox.check(pipeline, catalog))
    problems.extend(Problem(at, message) for at, message in erasure.check(pipeline, catalog))
    return problems


def uncaptured(pipeline: Pipeline, catalog: Catalog) -> list[Table]:
    """Tables of the schemas read that no entity captures (a table created after ``init`` is one): their
    changes never reach Kafka, because the connector's include list names the pipeline's tables only, so
    nothing else would ever say they are missing. Partitions are not tables of their own (their root is),
    and the pipeline's signal and heartbeat tables are its own."""
    captured = {(e.source_schema, e.source_table) for e in pipeline.captured() if e.source == "postgres"}
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
                    out.append(unknown_column(f"{at}.when", node.attr, table))
    for col in declared.fields:
        if col not in known and not hooked:
            out.append(unknown_column(f"{at}.fields", col, table))
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
                out.append(unknown_column(f"{at}.key", col, table, "key column"))
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
            out.append(unknown_column(f"{at}.fields.drop", col, table))
    for col in cfg.fields.hash:
        if col not in columns and not hooked and col not in derived_names:
            out.append(unknown_column(f"{at}.fields.hash", col, table))
    for col in cfg.fields.allow or ():
        if col not in columns and not hooked and col not in derived_names:
            out.append(unknown_column(f"{at}.fields.allow", col, table))

    # declared types
    for col in cfg.columns:
        if col not in columns and col not in derived_names and not hooked:
            out.append(unknown_column(f"{at}.columns.{col}", col, table))

    # derived fields: each reads source columns or the fields derived before it
    known = set(columns)
    for name, derived in cfg.derive.items():
        for ref in sorted(_names_read(derived.expr) - known):
            if not hooked:
                out.append(Problem(f"{at}.derive.{name}.expr", f"reads {ref!r}, which is not a column of "
                                   f"{table.qualified} nor a field derived before it; "
                                   f"{suggest(ref, sorted(known))}"))
        known.add(name)
    if cfg.filter is not None and not hooked:
        for ref in sorted(_names_read(cfg.filter) - known):
            out.append(Problem(f"{at}.filter", f"reads {ref!r}, which is not a column of {table.qualified} nor a "
                                               f"derived field; {suggest(ref, sorted(known))}"))

    # derived events: the columns whose change emits them reach the stream
    for event_name, declared in cfg.events.items():
        for col in declared.when_changed:
            if col not in known and not hooked:
                out.append(unknown_column(f"{at}.events.{event_name}.when_changed", col, table))
            elif col in cfg.fields.drop:
                out.append(Problem(f"{at}.events.{event_name}.when_changed",
                                   f"{col!r} is dropped, so no change of it reaches the stream; keep it or "
                                   "name another column"))
        out.extend(_event_rule(f"{at}.events.{event_name}", declared, known, cfg.fields.drop, table, hooked))

    # what reaches the stores (kept columns and derived fields), against what each store's configuration names
    kept = (set(cfg.fields.allow) | set(cfg.key or table.primary_key)) if cfg.fields.allow is not None else columns
    stored = (kept - set(cfg.fields.drop)) | derived_names | set(cfg.columns)
    reaching = StoredColumns(stored=frozenset(stored), hooked=hooked, table=table)
    for name, store in store_classes().items():
        entity_check = getattr(store, "check_entity", None)
        if entity_check is not None and spec.stored_in(name):
            out.extend(entity_check(spec, reaching))
    return out


def _collisions(pipeline: Pipeline) -> list[Problem]:
    out: list[Problem] = []
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
    # Two entities on one store object (a key prefix, an index, a table): each store says what collides.
    for store in store_classes().values():
        pipeline_check = getattr(store, "check_pipeline", None)
        if pipeline_check is not None:
            out.extend(pipeline_check(pipeline))
    # Entity by entity, in the file's order (a stable sort: each entity's own problems keep theirs).
    order = {f"entities.{name}": i for i, name in enumerate(pipeline.entities)}
    return sorted(out, key=lambda p: order.get(".".join(p.location.split(".")[:2]), len(order)))


# Join columns and keys compare by their key text (streams.keys): these kinds give equal texts for equal values.
_KEY_FAMILIES = {"int16": "integer", "int32": "integer", "int64": "integer", "string": "text", "enum": "text",
                 "uuid": "text"}


def _family(format_type: str) -> str:
    try:
        kind = from_postgres(format_type).kind
    except ValueError:
        return format_type
    return _KEY_FAMILIES.get(kind, kind)


def _views(pipeline: Pipeline, catalog: Catalog | None) -> list[Problem]:
    """Each view against its entities: what resolving it found (unknown entity or alias, a cycle), then, for
    PostgreSQL entities, its columns and join types against the catalog."""
    out = [Problem(e.location, e.message) for e in pipeline.view_errors]
    for name, view in pipeline.views.items():
        at = f"views.{name}"
        if view.filter is not None:
            try:
                unknown = sorted(compile_expression(view.filter).names - {f.name for f in view.fields})
            except ExpressionError as exc:
                out.append(Problem(f"{at}.filter", f"{exc}; write an expression over the view's fields, such as "
                                                   "`city == 'New York'`"))
            else:
                if unknown:
                    names = ", ".join(f.name for f in view.fields)
                    out.append(Problem(f"{at}.filter", f"{unknown[0]!r} is not one of the view's fields; a filter "
                                                       f"reads the names under `fields` ({names})"))
        if catalog is None:
            continue

        def table_of(alias: str, view: ViewDef = view) -> Table | None:
            spec = pipeline.entities[view.entity_of(alias)]
            return catalog.table(spec.source_schema, spec.source_table) if spec.source == "postgres" else None

        for f in view.fields:
            table = table_of(f.alias)
            if table is None:
                continue
            column = table.column(f.column)
            where = f"{at}.fields.{f.name}"
            if column is None:
                out.append(unknown_column(where, f.column, table))
            elif f.nested and not column.format_type.startswith("json"):
                out.append(Problem(where, f"{f.column!r} is {column.format_type}, not a document: a nested path "
                                          "reads a json or jsonb column; name the column alone"))
        for lk in view.lookups:
            left, right = table_of(lk.left), table_of(lk.alias)
            where = f"{at}.join.{lk.alias}.on"
            right_spec = pipeline.entities[lk.entity]
            right_key = right_spec.key_columns or (right.primary_key if right is not None else None)
            if right_key is not None and len(right_key) != len(lk.on):
                out.append(Problem(where, f"{lk.entity}'s key has {len(right_key)} column(s) ({', '.join(right_key)}); "
                                          f"name as many columns of the left side, in key order"))
                continue
            for i, col in enumerate(lk.on):
                lcol = left.column(col) if left is not None else None
                if left is not None and lcol is None:
                    out.append(unknown_column(where, col, left))
                    continue
                if lcol is None or right is None or right_key is None:
                    continue
                rcol = right.column(right_key[i])
                if rcol is not None and _family(lcol.format_type) != _family(rcol.format_type):
                    out.append(Problem(where, f"{col!r} is {lcol.format_type} but {lk.entity}.{right_key[i]} is "
                                              f"{rcol.format_type}: equal values would not match; join columns of "
                                              "one kind (integers with integers, text with text)"))
    return out
