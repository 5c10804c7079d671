"""``changeflow erase``: a person removed from every projection, each one verified, and the request tracked.

The steps, each idempotent, so a request interrupted anywhere is resumed by running it again (the open
request for the same subject is found by its mark):

1. **The source first.** The owning service deletes the person; the request checks that the source no
   longer holds them, nor rows linking to them (or waits for it, ``wait_source_s``).
2. **Suppress.** An entry per row (the subject's, each referring row found in the stores) goes on the
   pipeline's compacted suppression topic; every write path reads it before its next batch
   (``streams.suppression``), and the request waits ``SETTLE_S`` so none misses it.
3. **Through the stream.** A delete (or, for an anonymised row, a partial update clearing its link and
   personal fields) is published on the entity's canonical topic with a version above every store's, so
   each store and each view applies it the way it applies any change, views recomputing the rows that
   embed the person.
4. **Forget.** Once every store has applied them, each store removes what a delete leaves behind (its
   tombstones, remembered versions, history: ``Store.forget``), and a Kafka tombstone follows on the
   canonical topic, which compaction turns into the key's history gone.
5. **Verify and track.** Each projection is read back (``Store.traces`` = 0) before it is ``erased``;
   ``Store.expunge`` and the topics' compaction or retention give when it is ``purged``.
"""

from __future__ import annotations

import base64
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import orjson
import psycopg
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, ConfigResource, ResourceType
from psycopg import sql
from psycopg.rows import dict_row

from changeflow.deploy.secrets import erasure_key
from changeflow.erasure.tracking import Projection, Request, Tracker
from changeflow.pipelines.erasure import SubjectSpec, mark, subjects
from changeflow.reports import home
from changeflow.reports.reconcile.normalise import debezium_typed
from changeflow.schemas.book import schema_book
from changeflow.sinks import base
from changeflow.streams.canonical import to_avro
from changeflow.streams.dlq_redact import RedactionError, redact_suppressed
from changeflow.streams.erasure import Entry
from changeflow.streams.keys import key_parts, key_text
from changeflow.streams.records import ChangeRecord
from changeflow.streams.suppression import SETTLE_S
from changeflow.streams.suppression import ensure_topic as ensure_suppression_topic
from changeflow.waiting import WaitTimeout, wait_until

if TYPE_CHECKING:
    from changeflow.pipelines.spec import EntitySpec, Pipeline
    from changeflow.settings import Settings

log = logging.getLogger("changeflow.erasure")

Say = Callable[[str], None]


class ErasureError(RuntimeError):
    """An erasure that cannot go on (an unknown subject, a source that still holds the person, a store that
    does not apply in time): the message says why and what to do. The request stays open; running the same
    erasure again resumes it."""


@dataclass
class Plan:
    """What one request removes: per entity, the keys to erase and the keys to anonymise."""

    erase: dict[str, set[str]]
    anonymise: dict[str, set[str]]

    def keys(self, entity: str) -> set[str]:
        return self.erase.get(entity, set()) | self.anonymise.get(entity, set())


def subject_of(pipeline: Pipeline, name: str) -> SubjectSpec:
    declared = subjects(pipeline)
    if name not in declared:
        known = ", ".join(declared) or "none (declare one under `erasure.subjects` in the pipeline file)"
        raise ErasureError(f"unknown erasure subject {name!r}; the pipeline declares: {known}")
    return declared[name]


def tracker(settings: Settings, pipeline: Pipeline) -> Tracker:
    t = Tracker(home.client(settings), home.database(pipeline))
    t.ensure()
    return t


# --- 1. the source --------------------------------------------------------------------------------------
PRIMARY_KEY = """
SELECT a.attname FROM pg_index i
JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey)
WHERE i.indrelid = %s::regclass AND i.indisprimary
ORDER BY array_position(i.indkey::int2[], a.attnum)
"""


def _key_columns(conn: psycopg.Connection[Any], spec: EntitySpec) -> tuple[str, ...]:
    """The entity's key columns: declared, else the table's primary key (the Debezium message key)."""
    if spec.key_columns:
        return spec.key_columns
    regclass = sql.Identifier(spec.source_schema, spec.source_table).as_string(conn)
    columns = tuple(str(r[0]) for r in conn.execute(PRIMARY_KEY, (regclass,)).fetchall())
    if not columns:
        raise ErasureError(f"{spec.qualified_table} has no primary key and {spec.name} declares no `key`")
    return columns


def source_holdings(settings: Settings, pipeline: Pipeline, subject: SubjectSpec, subject_id: str
                    ) -> tuple[bool, list[str], list[str]]:
    """(whether the source still holds the person's row, the referring rows it keeps, what could not be
    checked), the last two as lines. Referring rows a service keeps (an order for finance) do not hold the
    erasure up: every change of them is anonymised or dropped (``streams.erasure``)."""
    held = False
    kept: list[str] = []
    unchecked: list[str] = []
    direct = [r for r in subject.references if r.parent == subject.entity]
    for entity, column in [(subject.entity, None), *[(r.entity, r.column) for r in direct]]:
        e = pipeline.entities[entity]
        if e.source != "postgres":
            if column is None:
                unchecked.append(f"{e.name} ({e.source} {e.qualified_table}): changeflow reads it through "
                                 "Debezium only")
            continue
        table = sql.Identifier(e.source_schema, e.source_table)
        with psycopg.connect(pipeline.source_dsn(settings), connect_timeout=10) as conn:
            if column is None:
                columns = _key_columns(conn, e)
                parts = key_parts(subject_id, len(columns))
                cond = sql.SQL(" AND ").join(sql.SQL("{}::text = %s").format(sql.Identifier(c)) for c in columns)
                n = conn.execute(sql.SQL("SELECT count(*) FROM {} WHERE {}").format(table, cond), parts).fetchone()
                held = bool(n and n[0])
            else:
                n = conn.execute(sql.SQL("SELECT count(*) FROM {} WHERE {}::text = %s").format(
                    table, sql.Identifier(column)), [subject_id]).fetchone()
                if n and n[0]:
                    kept.append(f"{e.qualified_table} keeps {n[0]} rows linked by {column}")
    return held, kept, unchecked


def source_position(settings: Settings, pipeline: Pipeline) -> str:
    if pipeline.file.sources.postgres is None:
        return ""
    with psycopg.connect(pipeline.source_dsn(settings), connect_timeout=10) as conn:
        row = conn.execute("SELECT pg_current_wal_lsn()::text").fetchone()
    return str(row[0]) if row else ""


# --- 2. finding the rows ------------------------------------------------------------------------------
def _source_keys(settings: Settings, pipeline: Pipeline, spec: EntitySpec, column: str, values: list[str]
                 ) -> set[str]:
    """Keys of the source's rows whose ``column`` is one of ``values`` (a PostgreSQL entity; none otherwise): a
    referring row a service keeps at its source is found even when no store holds its link any more."""
    if spec.source != "postgres" or not values:
        return set()
    with psycopg.connect(pipeline.source_dsn(settings), connect_timeout=10) as conn:
        columns = _key_columns(conn, spec)
        rows = conn.cursor(row_factory=dict_row).execute(
            sql.SQL("SELECT {} FROM {} WHERE {}::text = ANY(%s)").format(
                sql.SQL(", ").join(sql.Identifier(c) for c in columns),
                sql.Identifier(spec.source_schema, spec.source_table), sql.Identifier(column)), (values,)).fetchall()
    return {key_text([debezium_typed(r)[c] for c in columns]) for r in rows}


def plan(stores: dict[str, base.Store], pipeline: Pipeline, subject: SubjectSpec, subject_id: str,
         settings: Settings | None = None) -> Plan:
    """The subject's row and every row referring to it, as found in the stores (a row any store holds, in its
    history too) and at a PostgreSQL source that keeps them."""
    erase: dict[str, set[str]] = {subject.entity: {subject_id}}
    anonymise: dict[str, set[str]] = {}
    for ref in subject.references:
        parents = sorted(erase.get(ref.parent, set()) | anonymise.get(ref.parent, set()))
        found: set[str] = set()
        spec = pipeline.entities[ref.entity]
        if settings is not None:
            found |= _source_keys(settings, pipeline, spec, ref.column, parents)
        for store in stores.values():
            if parents and spec.stored_in(store.name):
                found |= set(store.keys_where(spec, ref.column, parents))
        (erase if ref.action == "delete" else anonymise).setdefault(ref.entity, set()).update(found)
    return Plan(erase, anonymise)


# --- the projections --------------------------------------------------------------------------------------
def projections(pipeline: Pipeline, subject: SubjectSpec, stores: list[str]) -> list[Projection]:
    out = [Projection(f"source/{subject.entity}", "source")]
    for entity in (*subject.entities, *subject.views):
        spec = pipeline.entities[entity]
        out += [Projection(f"{store}/{entity}", "store") for store in stores if spec.stored_in(store)]
        out.append(Projection(f"topic/{spec.canonical_topic}", "topic"))
        if spec.source != "view":
            out.append(Projection(f"topic/{spec.raw_topic}", "topic"))
    # The derived events of the entities (`events:`), keyed like the canonical topic; judged from now on.
    out += [Projection(f"topic/{topic}", "topic") for topic, (spec, _name) in pipeline.event_topics().items()
            if spec.name in subject.entities]
    out.append(Projection(f"topic/{pipeline.dlq_topic}", "topic"))
    out += [Projection(f"external/{name}", "external", detail=desc) for name, desc in subject.external.items()]
    return out


def _retention_s(settings: Settings, topics: list[str]) -> dict[str, tuple[str, float | None, float]]:
    """Per topic: (cleanup policy, retention seconds or None for ever, min compaction lag seconds)."""
    admin = AdminClient({"bootstrap.servers": settings.kafka_bootstrap})
    out: dict[str, tuple[str, float | None, float]] = {}
    resources = [ConfigResource(ResourceType.TOPIC, t) for t in topics]
    for resource, future in admin.describe_configs(resources).items():
        try:
            cfg = {k: v.value for k, v in future.result(timeout=15).items()}
        except Exception:  # a topic not created yet holds nothing
            continue
        retention = float(cfg.get("retention.ms") or -1)
        # At the latest: the active segment is never compacted (it rolls after segment.ms), a record is kept
        # min.compaction.lag.ms, and the tombstone itself delete.retention.ms.
        out[resource.name] = (str(cfg.get("cleanup.policy", "delete")), None if retention < 0 else retention / 1000,
                              sum(float(cfg.get(k) or 0) for k in ("segment.ms", "min.compaction.lag.ms",
                                                                   "delete.retention.ms")) / 1000)
    return out


# --- the request ----------------------------------------------------------------------------------------
def canonical_id(settings: Settings, pipeline: Pipeline, subject: SubjectSpec, subject_id: str) -> str:
    """The id as the stream writes the subject's key (``streams.keys``): ``042`` of an integer key is ``42``, an
    upper-case UUID is lower-case. A mark of any other spelling would match no record."""
    sv = schema_book(settings, pipeline, writer=False).latest.get(subject.entity)
    if sv is None:
        return subject_id
    try:
        image = key_image(sv.columns, sv.key_columns, subject_id)
    except ValueError as exc:
        raise ErasureError(f"{subject_id!r} is not a key of {subject.entity} ({', '.join(sv.key_columns)}): {exc}"
                           ) from None
    for column in sv.key_columns:
        if getattr(sv.columns.get(column), "kind", "") == "uuid" and isinstance(image[column], str):
            image[column] = image[column].lower()
    return key_text([image[c] for c in sv.key_columns])


def erase(settings: Settings, pipeline: Pipeline, subject_name: str, subject_id: str, *,
          wait_source_s: float = 0.0, source_deleted: bool = False, apply_timeout_s: float = 120.0,
          force: bool = False, say: Say = lambda _line: None) -> Request:
    """Erase one person (module docstring); returns the request as tracked. Raises ErasureError."""
    subject = subject_of(pipeline, subject_name)
    subject_id = canonical_id(settings, pipeline, subject, subject_id)
    key = erasure_key(settings)
    subject_mark = mark(key, subject.entity, subject_id)
    track = tracker(settings, pipeline)
    stores = {name: base.create(name, settings, pipeline) for name in base.used_by(pipeline)}
    try:
        request = track.open_for(subject_mark)
        if request is None and not force and not _ever_held(stores, pipeline, subject, subject_id) \
                and not source_holdings(settings, pipeline, subject, subject_id)[0]:
            raise ErasureError(f"no store holds or held {subject.entity} {subject_id!r} (its row, a tombstone or "
                               "its history): check the id (the key as the source writes it); --force erases "
                               "it anyway, to cover a copy only other services hold")
        if request is None:
            now = datetime.now(UTC)
            request = Request(uuid.uuid4().hex[:16], subject.name, subject_mark,
                              now.replace(microsecond=now.microsecond // 1000 * 1000),
                              source_position(settings, pipeline),
                              projections=tuple(projections(pipeline, subject, list(stores))))
            track.save(request, whole=True)
            _announce(settings, pipeline, request, subject, subject_id)
            say(f"request {request.id}: erasing {subject.name} (mark {subject_mark[:12]}…), "
                f"{len(request.projections)} projections")
        else:
            say(f"request {request.id}: resuming the open request for this {subject.name}")
            _announce(settings, pipeline, request, subject, subject_id)  # again: keyed by request, harmless twice
        request = _check_source(settings, pipeline, track, request, subject, subject_id, wait_source_s,
                                source_deleted, say)
        found = plan(stores, pipeline, subject, subject_id, settings)
        say("found: " + ", ".join(f"{e} {len(found.keys(e))}" for e in subject.entities))
        _suppress(settings, pipeline, request, found, key)
        say(f"suppression list updated; waiting {SETTLE_S:g}s for every writer to read it")
        time.sleep(SETTLE_S)
        versions = _publish_changes(settings, pipeline, stores, subject, found)
        _wait_applied(pipeline, stores, subject, found, versions, apply_timeout_s, say)
        request = _forget_and_verify(settings, pipeline, track, request, stores, subject, found, versions, say)
        # Sealed: the entries move to now, past the erasure's own deletes, so that a replay of the canonical
        # topics (where they stay until compaction) leaves no tombstone, no trace of the key, behind.
        _suppress(settings, pipeline, request, found, key)
        request = _close_if_complete(track, request)
        return request
    finally:
        for store in stores.values():
            store.close()


def _announce(settings: Settings, pipeline: Pipeline, request: Request, subject: SubjectSpec, subject_id: str
              ) -> None:
    """``erasure.requested`` for the services that hold a copy (they know the person by id: the event carries
    it, keyed by the request; README "Erasure" says what that topic keeps)."""
    producer = Producer({"bootstrap.servers": settings.kafka_bootstrap, "acks": "all"})
    producer.produce(pipeline.erasure_topic, key=request.id.encode(), value=orjson.dumps({
        "type": "erasure.requested", "request": request.id, "subject": subject.name, "id": subject_id,
        "mark": request.mark, "requested_at": request.requested_at.isoformat(),
        "external": sorted(subject.external)}), headers=[("type", b"erasure.requested")])
    if producer.flush(30):
        raise ErasureError(f"the erasure.requested event was not delivered to {pipeline.erasure_topic}")


def _check_source(settings: Settings, pipeline: Pipeline, track: Tracker, request: Request, subject: SubjectSpec,
                  subject_id: str, wait_source_s: float, source_deleted: bool, say: Say) -> Request:
    name = f"source/{subject.entity}"
    current = request.projection(name)
    if current is not None and current.confirmed:
        return request

    def clean() -> bool:
        return not source_holdings(settings, pipeline, subject, subject_id)[0]

    held, kept, unchecked = source_holdings(settings, pipeline, subject, subject_id)
    entity = pipeline.entities[subject.entity].qualified_table
    if held and wait_source_s > 0:
        say(f"waiting up to {wait_source_s:g}s for the source to delete the person from {entity}")
        try:
            wait_until(clean, wait_source_s, what="the source to delete the person", interval=1.0)
            held = False
        except WaitTimeout:
            held = True
    if held:
        track.save(request, [Projection(name, "source", "pending", f"{entity} still holds the person's row")])
        raise ErasureError(f"the source still holds the person: {entity} has their row. The owning service deletes "
                           "it first; then run this again, or pass --wait-source SECONDS")
    if unchecked and not source_deleted:
        detail = "; ".join(unchecked)
        track.save(request, [Projection(name, "source", "pending", f"not checked: {detail}")])
        raise ErasureError(f"cannot check the source: {detail}. Once its owner has deleted the person, run this "
                           "again with --source-deleted (recorded in the request)")
    detail = "checked: the source no longer holds the person's row" if not unchecked else \
        "declared deleted by the operator (--source-deleted): " + "; ".join(unchecked)
    if kept:
        detail += "; " + "; ".join(kept) + " (anonymised or dropped on every change)"
    projection = Projection(name, "source", "erased", detail)
    track.save(request, [projection])
    say(f"source: {detail}")
    return request.with_projection(projection)


def _ever_held(stores: dict[str, base.Store], pipeline: Pipeline, subject: SubjectSpec, subject_id: str) -> bool:
    """Whether any store holds a trace of the person's row: the row, a tombstone, a remembered version, history."""
    spec = pipeline.entities[subject.entity]
    return any(spec.stored_in(s.name) and s.traces(spec, [subject_id]) for s in stores.values())


def _suppress(settings: Settings, pipeline: Pipeline, request: Request, found: Plan, key: bytes) -> None:
    """The entries, stamped now: the source was confirmed empty of the person just before, so a record written
    until now is theirs; one written later is new data (someone registering again under the same id)."""
    ensure_suppression_topic(settings, pipeline)
    at_ms = int(time.time() * 1000)
    entries = [Entry(mark(key, e, k), "erase", at_ms, request.id) for e, ks in found.erase.items() for k in ks]
    entries += [Entry(mark(key, e, k), "anonymise", at_ms, request.id)
                for e, ks in found.anonymise.items() for k in ks]
    producer = Producer({"bootstrap.servers": settings.kafka_bootstrap, "acks": "all", "enable.idempotence": True})
    for entry in entries:
        producer.produce(pipeline.suppression_topic, key=entry.mark.encode(), value=orjson.dumps(entry.to_json()))
    if producer.flush(30):
        raise ErasureError(f"the suppression entries were not delivered to {pipeline.suppression_topic}")


def _held_version(stores: dict[str, base.Store], spec: EntitySpec, keys: list[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for store in stores.values():
        if not spec.stored_in(store.name) or not keys:
            continue
        for k, held in store.fetch(spec, keys).items():
            if held.version is not None:
                out[k] = max(out.get(k, 0), held.version)
    return out


def key_image(types: dict[str, Any], key_columns: tuple[str, ...], key: str) -> dict[str, Any]:
    """The key columns' typed values of a canonical key text (``streams.keys.part_text`` undone): the image a
    delete travels with, which a store's tombstone holds."""
    out: dict[str, Any] = {}
    for column, part in zip(key_columns, key_parts(key, len(key_columns)), strict=True):
        kind = getattr(types.get(column), "kind", "string")
        try:
            if kind in ("int16", "int32", "int64"):
                out[column] = int(part)
            elif kind == "decimal":
                out[column] = Decimal(part)
            elif kind in ("float32", "float64"):
                out[column] = float(part)
            elif kind == "bool":
                out[column] = part == "true"
            elif kind == "date":
                out[column] = date.fromisoformat(part)
            elif kind in ("timestamp", "timestamptz"):
                out[column] = datetime.fromisoformat(part)
            elif kind == "bytes":
                out[column] = base64.b64decode(part)
            else:
                out[column] = part
        except (ValueError, ArithmeticError):
            out[column] = part
    return out


def _publish_changes(settings: Settings, pipeline: Pipeline, stores: dict[str, base.Store], subject: SubjectSpec,
                     found: Plan) -> dict[tuple[str, str], int]:
    """A delete per erased row, a partial update per anonymised row, each above the newest version any store
    holds; (entity, key) → the version published. A row no store holds needs nothing published."""
    book = schema_book(settings, pipeline, writer=False)
    producer = Producer({"bootstrap.servers": settings.kafka_bootstrap, "acks": "all", "enable.idempotence": True})
    now_ms = int(time.time() * 1000)
    published: dict[tuple[str, str], int] = {}
    for entity in subject.entities:
        spec = pipeline.entities[entity]
        sv = book.latest.get(entity)
        keys = sorted(found.keys(entity))
        held = _held_version(stores, spec, keys)
        ref = subject.reference(entity)
        for k in keys:
            if k not in held or sv is None:
                continue
            version = held[k] + 1
            anonymise = k in found.anonymise.get(entity, set())
            record = ChangeRecord(
                source=spec.source, entity=entity, key=k, op="u" if anonymise else "d", version=version,
                ts_ms=now_ms, before=None if anonymise else key_image(sv.columns, sv.key_columns, k),
                after={c: None for c in ref.cleared if c in sv.columns} if anonymise and ref is not None else None,
                partial=anonymise, key_columns=sv.key_columns, types=sv.columns)
            producer.produce(spec.canonical_topic, key=record.kafka_key.encode(), value=to_avro(book, record))
            published[(entity, k)] = version
    if producer.flush(30):
        raise ErasureError("the erasing changes were not delivered to the canonical topics")
    return published


def _wait_applied(pipeline: Pipeline, stores: dict[str, base.Store], subject: SubjectSpec, found: Plan,
                  versions: dict[tuple[str, str], int], timeout_s: float, say: Say) -> None:
    """Until every store has applied the published changes (the stream's own pace): an erased row is gone, an
    anonymised one is at its new version."""
    def behind() -> list[str]:
        lagging: list[str] = []
        for entity in subject.entities:
            spec = pipeline.entities[entity]
            for store in stores.values():
                if not spec.stored_in(store.name):
                    continue
                keys = sorted(k for (e, k) in versions if e == entity)
                if not keys:
                    continue
                held = store.fetch(spec, keys)
                cleared = ref.cleared if (ref := subject.reference(entity)) is not None else ()
                late = [k for k in keys if (k in found.erase.get(entity, set()) and k in held)
                        or (k in found.anonymise.get(entity, set())
                            and (held.get(k) is None or (held[k].version or 0) < versions[(entity, k)]
                                 or any(held[k].row.get(c) is not None for c in cleared)))]
                if late:
                    lagging.append(f"{store.name}/{entity}: {len(late)}")
        for view in subject.views:
            keys, _gone = _view_keys(pipeline, view, found)
            spec = pipeline.entities[view]
            personal = personal_fields(pipeline, view, subject)
            for store in stores.values():
                if not keys or not spec.stored_in(store.name):
                    continue
                held = store.fetch(spec, keys)
                late = [k for k, v in held.items() if k in found.erase.get(pipeline.views[view].root, set())
                        or any(v.row.get(f) is not None for f in personal)]
                if late:
                    lagging.append(f"{store.name}/{view}: {len(late)}")
        return lagging

    def done() -> bool:
        return not behind()

    if not versions and not subject.views:
        return
    say(f"waiting for the stores and views to apply {len(versions)} changes")
    try:
        wait_until(done, timeout_s, what="the stores to apply the erasure", interval=0.5)
    except WaitTimeout:
        raise ErasureError(f"not applied after {timeout_s:g}s: {', '.join(behind())} rows still held. Is the worker "
                           "running (`changeflow worker`)? The request stays open: run the same erasure again to "
                           "resume it") from None


def personal_fields(pipeline: Pipeline, view: str, subject: SubjectSpec) -> list[str]:
    """The view's fields that hold the person: read from the subject's entity, or a cleared column of an
    anonymised reference."""
    view_def = pipeline.views[view]
    out: list[str] = []
    for f in view_def.fields:
        entity = view_def.entity_of(f.alias)
        ref = subject.reference(entity)
        if entity == subject.entity or (ref is not None and ref.action == "anonymise" and f.column in ref.cleared):
            out.append(f.name)
    return out


def _view_keys(pipeline: Pipeline, view: str, found: Plan) -> tuple[list[str], bool]:
    """The view's rows that embedded the person: (keys, whether they are gone or only anonymised). An aggregate
    keeps no row per person (its groups are the result)."""
    view_def = pipeline.views[view]
    if view_def.aggregated:
        return [], True
    root = view_def.root
    return sorted(found.erase.get(root, set())) + sorted(found.anonymise.get(root, set())), \
        not found.anonymise.get(root)


def _forget_and_verify(settings: Settings, pipeline: Pipeline, track: Tracker, request: Request,
                       stores: dict[str, base.Store], subject: SubjectSpec, found: Plan,
                       versions: dict[tuple[str, str], int], say: Say) -> Request:
    now = datetime.now(UTC)
    tombstones: list[tuple[str, str]] = []
    changed: list[Projection] = []
    for entity in (*subject.entities, *subject.views):
        spec = pipeline.entities[entity]
        if spec.source == "view":
            keys, _gone = _view_keys(pipeline, entity, found)
            erased = set(keys) - found.anonymise.get(pipeline.views[entity].root, set())
            keep_keys = set(keys) - erased
        else:
            erased = found.erase.get(entity, set())
            keep_keys = found.anonymise.get(entity, set())
        for store in stores.values():
            if not spec.stored_in(store.name):
                continue
            keep = {k: h for k, h in _held_version({store.name: store}, spec, sorted(keep_keys)).items()}
            keys = sorted(erased | keep_keys)
            for _attempt in range(3):  # a batch in flight while the list settled: forgotten on the next pass
                if keys:
                    store.forget(spec, keys, keep or None)
                left = store.traces(spec, keys, keep or None) if keys else 0
                if not left:
                    break
                time.sleep(SETTLE_S)
            name = f"{store.name}/{entity}"
            if left:
                changed.append(Projection(name, "store", "pending", f"{left} traces still read back"))
                continue
            what, due_s = store.expunge(spec) if keys else ("nothing held", None)
            due = None if due_s is None else now + timedelta(seconds=due_s)
            changed.append(Projection(name, "store", "erased" if due else "purged",
                                      f"{len(erased)} rows erased, {len(keep_keys)} anonymised; read back: none; "
                                      f"{what}", due))
        tombstones += [(spec.canonical_topic, f"{entity}:{k}") for k in sorted(erased)]
    producer = Producer({"bootstrap.servers": settings.kafka_bootstrap, "acks": "all", "enable.idempotence": True})
    for topic, kafka_key in tombstones:
        producer.produce(topic, key=kafka_key.encode(), value=None)
    if producer.flush(30):
        raise ErasureError("the Kafka tombstones were not delivered")
    changed += _topic_projections(settings, pipeline, request, subject, now)
    changed = [p for p in changed if p.name != f"topic/{pipeline.dlq_topic}"]
    changed.append(_redact_dead_letters(settings, pipeline, request, now, say))
    for p in changed:
        request = request.with_projection(p)
    track.save(request, changed)
    for p in changed:
        say(f"  {p.name}: {p.state}" + (f" (purged by {p.purge_due:%Y-%m-%d %H:%M} UTC)" if p.purge_due else ""))
    return request


# Kafka deletes a segment below the log start offset at its next retention check
# (log.retention.check.interval.ms, 5 minutes by default): then the dead letters are physically gone.
RETENTION_CHECK_S = 300.0


def _redact_dead_letters(settings: Settings, pipeline: Pipeline, request: Request, now: datetime, say: Say
                         ) -> Projection:
    """The dead-letter topic rewritten without the erased rows' dead letters (``streams.dlq_redact``), read
    back before it counts as erased."""
    name = f"topic/{pipeline.dlq_topic}"
    try:
        done = redact_suppressed(settings, pipeline, say, request=request.id)
    except RedactionError as exc:
        return Projection(name, "topic", "pending", f"redaction not verified: {exc}")
    if done is None or not done.removed:
        return Projection(name, "topic", "purged", "no dead letter of the erased rows")
    if done.late:
        return Projection(name, "topic", "pending", f"{done.removed} dead letters removed, {done.late} arrived "
                                                    "meanwhile: run the erasure again")
    return Projection(name, "topic", "erased", f"{done.removed} dead letters removed ({done.kept} others kept, "
                                               "re-written in order); the old segments go at Kafka's next "
                                               "retention check", now + timedelta(seconds=RETENTION_CHECK_S))


def _topic_projections(settings: Settings, pipeline: Pipeline, request: Request, subject: SubjectSpec,
                       now: datetime) -> list[Projection]:
    """A topic is erased once no changeflow path reads the person back from it (the suppression list, and a
    tombstone as the last record of each erased key on a compacted topic); purged when compaction or retention
    has removed the older records, by the time the topic's configuration gives."""
    names = [p.name.removeprefix("topic/") for p in request.projections if p.kind == "topic"]
    configs = _retention_s(settings, names)
    out: list[Projection] = []
    for topic in names:
        policy, retention, lag = configs.get(topic, ("delete", None, 0.0))
        if "compact" in policy:
            due: datetime | None = now + timedelta(seconds=lag)
            how = (f"compacted: the tombstone or cleared row is the key's last record; compacted within "
                   f"{lag / 86400:.1f} days (segment roll, compaction lag, tombstone retention)")
        elif retention is not None:
            due = now + timedelta(seconds=retention)
            how = f"keyed otherwise: retention removes the person's records after {retention / 86400:.1f} days"
        else:
            due = None
            how = "kept for ever (retention -1): the suppression list keeps every replay from it out of the stores"
        out.append(Projection(f"topic/{topic}", "topic", "erased", how, due))
    return out


def _close_if_complete(track: Tracker, request: Request) -> Request:
    if request.state == "open" and request.complete:
        request = replace(request, state="closed", detail=f"closed {datetime.now(UTC):%Y-%m-%d %H:%M:%S} UTC: "
                                                          "every projection confirmed")
        track.save(request)
    return request


# --- status and confirmation ------------------------------------------------------------------------------
def advance(settings: Settings, pipeline: Pipeline, request: Request) -> Request:
    """Move projections whose purge time has passed to ``purged`` (by the time the store or the topic gave: a
    request keeps marks, not keys, so nothing can be read back by key afterwards), and close the request once
    every projection is confirmed."""
    track = tracker(settings, pipeline)
    now = datetime.now(UTC)
    changed: list[Projection] = []
    for p in request.projections:
        if p.state == "erased" and p.purge_due is not None and p.purge_due <= now:
            changed.append(replace(p, state="purged",
                                   detail=p.detail + f"; purged by {p.purge_due:%Y-%m-%d %H:%M} UTC"))
    for p in changed:
        request = request.with_projection(p)
    if changed:
        track.save(request, changed)
    return _close_if_complete(track, request)


def confirm(settings: Settings, pipeline: Pipeline, request_id: str, projection: str, by: str = "") -> Request:
    """An external projection confirms its deletion (``erasure confirm``, or the worker's endpoint)."""
    track = tracker(settings, pipeline)
    request = track.load(request_id)
    if request is None:
        raise ErasureError(f"no erasure request {request_id!r} (`changeflow erasure status` lists them)")
    name = projection if "/" in projection else f"external/{projection}"
    current = request.projection(name)
    externals = [p.name.removeprefix("external/") for p in request.projections if p.kind == "external"]
    if current is None or current.kind != "external":
        raise ErasureError(f"{projection!r} is not an external projection of request {request_id}; its external "
                           f"projections: {', '.join(externals) or 'none'}")
    confirmed = replace(current, state="erased",
                        detail=f"confirmed {datetime.now(UTC):%Y-%m-%d %H:%M:%S} UTC" + (f" by {by}" if by else ""))
    request = request.with_projection(confirmed)
    track.save(request, [confirmed])
    return _close_if_complete(track, request)


def status(settings: Settings, pipeline: Pipeline, request_id: str | None = None) -> list[Request]:
    track = tracker(settings, pipeline)
    if request_id is not None:
        found = track.load(request_id)
        if found is None:
            raise ErasureError(f"no erasure request {request_id!r} (`changeflow erasure status` lists them)")
        return [advance(settings, pipeline, found)]
    return [advance(settings, pipeline, r) for r in track.all()]


def as_json(request: Request) -> dict[str, Any]:
    return {"request": request.id, "subject": request.subject, "state": request.state, "detail": request.detail,
            "requested_at": request.requested_at.isoformat(), "source_position": request.source_position,
            "projections": [{"name": p.name, "kind": p.kind, "state": p.state, "detail": p.detail,
                             "purge_due": p.purge_due.isoformat() if p.purge_due else None}
                            for p in request.projections]}
