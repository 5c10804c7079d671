"""Drift reconciliation: every key of the source against every derived store, content included.

Counts alone (``reports/drift.py``) miss a row that is present but wrong. Here each side's row is
brought to one *comparable* form, hashed per key, and the hashes are summed per key range (bucket), so a
full compare reads each side once and only the buckets whose checksums differ are examined key by key.

The source row is computed with the stream's own transform (``streams/entities.py``) from the row read
with psycopg, its values typed the way the Debezium decoder types them (exact decimals, UTC datetimes,
uuids as strings, jsonb as values). Every store's representation (Redis JSON text, the search
``_source``, ClickHouse typed columns) and the source row then pass through the same type-driven
normalisation, driven by the entity's declared ClickHouse column types: decimals compare by exact value
(a ``Decimal(12, 2)`` column cannot keep ``12.5`` apart from ``12.50``), datetimes as UTC microseconds,
free-form JSON structurally, and a null field equals an absent one.

Kinds of drift, per (entity, store, key):

- ``missing``: the source has the key, the store does not;
- ``extra``: the store has the key, the source does not (a stray write, or a delete that never landed);
- ``stale``: the content differs and the store holds a genuine but *older* image: the ClickHouse
  changelog has exactly that content at the store's version, or another store that matches the source
  holds a newer version of the key. PostgreSQL keeps no per-row position, so "older" can only be judged
  through what the pipeline itself wrote;
- ``mismatched``: the content differs and the store's image is not one the pipeline ever wrote at that
  version (altered behind its back, a bogus version, a transform that disagrees).

Changes in flight are not drift: keys that differ are read again on both sides after a short settle
time and only keys that still differ are reported.
"""

from __future__ import annotations

import hashlib
import logging
import multiprocessing
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from decimal import Decimal, InvalidOperation
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Protocol

import httpx
import orjson
import psycopg
import redis
from psycopg import sql
from psycopg.rows import dict_row

from streams.entities import ENTITIES, EntitySpec

if TYPE_CHECKING:
    from changeflow.settings import Settings

log = logging.getLogger("changeflow.reconcile")

STORES = ("redis", "search", "clickhouse")
KINDS = ("missing", "extra", "stale", "mismatched")
NUMERIC_BUCKET_WIDTH = 1024  # numeric keys: ranges of this many ids
STRING_BUCKET_CHARS = 2  # string keys (uuids, ObjectIds): the first two characters, 256 ranges for hex
BATCH = 5000
CH_CHUNK = 2000  # keys per ClickHouse point query (literal IN lists)
MASK64 = (1 << 64) - 1
CH_META = ("_version", "_is_deleted", "_ts_ms", "_ingested_at")

Row = dict[str, Any]


# --- pure: normalisation ------------------------------------------------------------------------------
def _base_type(ch_type: str | None) -> str:
    if ch_type is None:
        return ""
    t = ch_type
    while t.startswith(("Nullable(", "LowCardinality(")):
        t = t[t.index("(") + 1 : -1]
    return t


def _decimal_text(value: Decimal) -> str:
    """The exact value, one spelling per number: 12.5 and 12.50 are the same amount."""
    if value == 0:
        return "0"
    text = format(value.normalize(), "f")
    return text


def _utc(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _json_text(value: Any) -> str:
    return orjson.dumps(value, default=_json_default, option=orjson.OPT_SORT_KEYS).decode()


def _json_default(value: Any) -> Any:
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, uuid.UUID):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _maybe_json(text: str) -> Any:
    if text[:1] in ("{", "[", '"'):
        try:
            return orjson.loads(text)
        except orjson.JSONDecodeError:
            return text
    return text


def _as_decimal(value: Any) -> str:
    return _decimal_text(value if isinstance(value, Decimal) else Decimal(str(value)))


def _as_datetime(value: Any) -> str:
    if isinstance(value, str):
        # The stores' own spelling of a UTC instant with microseconds is already the comparable one.
        if len(value) == 32 and value[19] == "." and value.endswith("+00:00"):
            return value
        value = datetime.fromisoformat(value)
    return str(_utc(value).isoformat(timespec="microseconds"))


def _as_date(value: Any) -> str:
    return str((date.fromisoformat(value) if isinstance(value, str) else value).isoformat())


def _as_string(value: Any) -> str:
    return value if isinstance(value, str) else str(value)


def _as_json(value: Any) -> str:
    return _json_text(_maybe_json(value) if isinstance(value, str) else value)


def _as_undeclared(value: Any) -> Any:
    """A field the mapping does not declare: one text form for ClickHouse's JSON text and native values."""
    if isinstance(value, str):
        value = _maybe_json(value)
        if isinstance(value, str):
            return value
    if isinstance(value, Decimal | datetime | date | uuid.UUID):
        return _json_default(value)
    return _json_text(value)


@lru_cache(maxsize=256)
def _normaliser(ch_type: str | None, is_json: bool) -> Callable[[Any], Any]:
    if is_json:
        return _as_json
    base = _base_type(ch_type)
    if base.startswith("Decimal"):
        return _as_decimal
    if base.startswith("DateTime"):
        return _as_datetime
    if base.startswith("Date"):
        return _as_date
    if base.startswith(("Int", "UInt")):
        return int
    if base.startswith("Float"):
        return float
    if base == "Bool":
        return bool
    if base.startswith("String"):
        return _as_string
    return _as_undeclared


def normalise_value(value: Any, ch_type: str | None, is_json: bool = False) -> Any:
    """One field in the comparable form, whichever store it came from; None means "no value".

    ``ch_type`` is the entity's declared ClickHouse type for the field (None for a field the mapping does
    not declare: such fields reach ClickHouse as JSON text of non-strings, so both sides become text).
    """
    if value is None:
        return None
    try:
        return _normaliser(ch_type, is_json)(value)
    except (InvalidOperation, ValueError, TypeError, orjson.JSONEncodeError):
        return f"<unparsable {value!r}>"


def comparable_row(row: Mapping[str, Any], spec: EntitySpec, json_fields: frozenset[str]) -> Row:
    """A row in the form every side is compared in; null fields are left out (null equals absent)."""
    columns = spec.clickhouse_columns
    out: Row = {}
    for name, value in row.items():
        if value is None or name in CH_META:
            continue
        try:
            out[name] = _normaliser(columns.get(name), name in json_fields)(value)
        except (InvalidOperation, ValueError, TypeError, orjson.JSONEncodeError):
            out[name] = f"<unparsable {value!r}>"
    return out


def debezium_typed(row: Mapping[str, Any]) -> Row:
    """A psycopg row typed the way the Debezium decoder types the same row (see streams/debezium.py)."""
    out: Row = {}
    for name, value in row.items():
        if isinstance(value, uuid.UUID):
            value = str(value)
        elif isinstance(value, datetime):
            value = _utc(value)
        elif isinstance(value, memoryview):
            value = bytes(value)
        out[name] = value
    return out


def source_row(raw: Mapping[str, Any], spec: EntitySpec) -> Row:
    """The canonical row the stream would emit for this source row: the entity's own transform."""
    return spec.transform(debezium_typed(raw))


def row_digest(row: Row) -> int:
    return int.from_bytes(
        hashlib.blake2b(orjson.dumps(row, option=orjson.OPT_SORT_KEYS), digest_size=8).digest(), "big"
    )


# --- pure: bucketing and diffing -------------------------------------------------------------------------
def bucket_of(key: str, numeric: bool) -> str:
    """The key range a key belongs to: id ranges for numeric keys, a prefix for string keys."""
    if numeric:
        try:
            lo = (int(key) // NUMERIC_BUCKET_WIDTH) * NUMERIC_BUCKET_WIDTH
        except ValueError:
            return "?"
        return f"{lo}..{lo + NUMERIC_BUCKET_WIDTH - 1}"
    return key[:STRING_BUCKET_CHARS].lower() + "*"


def _keyed(key: str, digest: int) -> int:
    # The key takes part in the bucket checksum so two rows swapping contents still change it.
    return row_digest({"k": key, "d": digest})


def bucket_checksums(digests: Mapping[str, int], numeric: bool) -> dict[str, tuple[int, int]]:
    """bucket → (rows, order-independent checksum of (key, row digest) pairs)."""
    out: dict[str, tuple[int, int]] = {}
    for key, digest in digests.items():
        b = bucket_of(key, numeric)
        count, total = out.get(b, (0, 0))
        out[b] = (count + 1, (total + _keyed(key, digest)) & MASK64)
    return out


@dataclass(frozen=True)
class KeyDiff:
    """The keys of one store that differ from the source, before classification."""

    buckets: int
    differing_buckets: list[str]
    missing_in_store: list[str]
    missing_in_source: list[str]
    content_differs: list[str]


def diff_keys(source: Mapping[str, int], store: Mapping[str, int], numeric: bool) -> KeyDiff:
    """Compare bucket checksums first, then keys only inside the buckets that differ."""
    src_buckets, store_buckets = bucket_checksums(source, numeric), bucket_checksums(store, numeric)
    all_buckets = set(src_buckets) | set(store_buckets)
    differing = sorted(b for b in all_buckets if src_buckets.get(b) != store_buckets.get(b))
    wanted = set(differing)
    missing, extra, content = [], [], []
    for key in sorted(set(source) | set(store), key=lambda k: sort_key(k, numeric)):
        if bucket_of(key, numeric) not in wanted:
            continue
        if key not in store:
            missing.append(key)
        elif key not in source:
            extra.append(key)
        elif source[key] != store[key]:
            content.append(key)
    return KeyDiff(len(all_buckets), differing, missing, extra, content)


def sort_key(key: str, numeric: bool) -> tuple[int, str]:
    if numeric:
        try:
            return (int(key), "")
        except ValueError:
            pass
    return (0, key)


def field_differences(source: Row, store: Row, limit: int = 3) -> str:
    """Which fields differ, with both values, short enough for a diff row."""
    names = sorted(n for n in set(source) | set(store) if source.get(n) != store.get(n))
    parts = [f"{n}: source={_short(source.get(n))} store={_short(store.get(n))}" for n in names[:limit]]
    if len(names) > limit:
        parts.append(f"(+{len(names) - limit} more)")
    return "; ".join(parts)


def _short(value: Any, width: int = 60) -> str:
    text = "null" if value is None else str(value)
    return text if len(text) <= width else text[: width - 1] + "…"


def classify_content(
    source: Row,
    store: Row,
    store_version: int | None,
    changelog: Mapping[int, Row],
    current_elsewhere: Iterable[int],
) -> tuple[str, str]:
    """``stale`` or ``mismatched`` for a key whose content differs, with a detail line.

    ``changelog``: the pipeline's images of this key by version (comparable form); ``current_elsewhere``:
    the versions other stores hold for this key where their content matches the source.
    """
    fields = field_differences(source, store)
    newest = max(current_elsewhere, default=None)
    known = max(changelog, default=None)
    if store_version is not None and changelog.get(store_version) == store:
        ahead = max(v for v in (newest, known, store_version) if v is not None)
        if ahead > store_version:
            return "stale", f"holds the pipeline's image at version {store_version}, {ahead} is newer; {fields}"
        return "stale", (f"holds the pipeline's newest image (version {store_version}): the source's latest change "
                         f"has not come through the pipeline yet; {fields}")
    if store_version is not None and newest is not None and store_version < newest:
        return "stale", f"version {store_version} behind {newest} in another store; {fields}"
    return "mismatched", f"version {store_version} but content the pipeline never wrote there; {fields}"


@dataclass(frozen=True)
class Diff:
    key: str
    kind: str
    detail: str
    store_version: int | None = None


@dataclass
class StoreResult:
    entity: str
    store: str
    source_count: int
    store_count: int
    mode: str
    buckets: int = 0
    differing_buckets: list[str] = field(default_factory=list)
    diffs: list[Diff] = field(default_factory=list)
    error: str | None = None

    def count(self, kind: str) -> int:
        return sum(1 for d in self.diffs if d.kind == kind)

    @property
    def drift(self) -> int:
        return len(self.diffs)

    def as_dict(self) -> dict[str, Any]:
        return {
            "entity": self.entity, "store": self.store, "mode": self.mode,
            "source_count": self.source_count, "store_count": self.store_count,
            "missing": self.count("missing") + self.count("extra"),
            "missing_in_store": self.count("missing"), "missing_in_source": self.count("extra"),
            "stale": self.count("stale"), "mismatched": self.count("mismatched"), "drift": self.drift,
            "buckets": self.buckets, "differing_buckets": len(self.differing_buckets), "error": self.error,
            "diffs": [
                {"key": d.key, "kind": d.kind, "detail": d.detail, "store_version": d.store_version}
                for d in self.diffs
            ],
        }


@dataclass
class Run:
    run_id: str
    run_at: datetime
    mode: str
    results: list[StoreResult]
    skipped: dict[str, str]
    duration_s: float = 0.0
    repair_of: str = ""

    def drift_exceeds(self, max_drift: int) -> bool:
        """Per store: any one (entity, store) over the limit, or one that could not be checked."""
        return any(r.error is not None or r.drift > max_drift for r in self.results)

    def as_dict(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id, "run_at": self.run_at.isoformat(), "mode": self.mode,
            "duration_s": round(self.duration_s, 3), "repair_of": self.repair_of or None,
            "skipped": self.skipped, "results": [r.as_dict() for r in self.results],
        }


# --- I/O: the source ---------------------------------------------------------------------------------
def key_is_numeric(spec: EntitySpec) -> bool:
    return _base_type(spec.clickhouse_columns[spec.key_column]).startswith(("Int", "UInt"))


def _json_fields(spec: EntitySpec) -> frozenset[str]:
    import schemas

    try:
        return schemas.latest(spec.name).json_fields
    except Exception:  # an entity without a schema file has no declared JSON fields
        return frozenset()


class Source:
    """PostgreSQL read with psycopg; every row goes through the stream's transform."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.dsn = settings.pg_dsn

    def _table(self, spec: EntitySpec) -> sql.Composable:
        return sql.Identifier("public", spec.source_table)

    def scan(self, spec: EntitySpec) -> Iterator[tuple[str, Row]]:
        json_fields = _json_fields(spec)
        with (
            psycopg.connect(self.dsn, connect_timeout=5) as conn,
            conn.transaction(),
            conn.cursor(name=f"reconcile_{uuid.uuid4().hex[:8]}", row_factory=dict_row) as cur,
        ):
            cur.itersize = BATCH
            cur.execute(sql.SQL("SELECT * FROM {}").format(self._table(spec)))
            for raw in cur:
                yield str(raw[spec.key_column]), comparable_row(source_row(raw, spec), spec, json_fields)

    def fetch(self, spec: EntitySpec, keys: list[str]) -> dict[str, Row]:
        if not keys:
            return {}
        json_fields = _json_fields(spec)
        col = sql.Identifier(spec.key_column)
        values: list[Any] = [int(k) for k in keys if k.lstrip("-").isdigit()] if key_is_numeric(spec) else keys
        cond = sql.SQL("{} = ANY(%s)") if key_is_numeric(spec) else sql.SQL("{}::text = ANY(%s)")
        query = sql.SQL("SELECT * FROM {} WHERE ").format(self._table(spec)) + cond.format(col)
        with psycopg.connect(self.dsn, connect_timeout=5) as conn, conn.cursor(row_factory=dict_row) as cur:
            cur.execute(query, (values,))
            return {str(r[spec.key_column]): comparable_row(source_row(r, spec), spec, json_fields) for r in cur}

    def sample_keys(self, spec: EntitySpec, n: int) -> list[str]:
        query = sql.SQL("SELECT {} FROM {} ORDER BY random() LIMIT %s").format(
            sql.Identifier(spec.key_column), self._table(spec)
        )
        with psycopg.connect(self.dsn, connect_timeout=5) as conn:
            return [str(r[0]) for r in conn.execute(query, (n,)).fetchall()]

    def count(self, spec: EntitySpec) -> int:
        with psycopg.connect(self.dsn, connect_timeout=5) as conn:
            row = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(self._table(spec))).fetchone()
        return int(row[0]) if row else 0

    def position(self) -> int:
        """The current WAL position: no version the pipeline wrote can be beyond it."""
        with psycopg.connect(self.dsn, connect_timeout=5) as conn:
            row = conn.execute("SELECT (pg_current_wal_lsn() - '0/0'::pg_lsn)::bigint").fetchone()
        return int(row[0]) if row else 0


# --- I/O: the stores ---------------------------------------------------------------------------------
Versioned = tuple[Row, int | None]


class Store(Protocol):
    name: str

    def maps(self, spec: EntitySpec) -> bool: ...
    def scan(self, spec: EntitySpec) -> Iterator[tuple[str, Row, int | None]]: ...
    def fetch(self, spec: EntitySpec, keys: list[str]) -> dict[str, Versioned]: ...
    def count(self, spec: EntitySpec) -> int: ...
    def delete(self, spec: EntitySpec, keys: list[str]) -> None: ...
    def drop_versions_above(self, spec: EntitySpec, keys: list[str], position: int) -> list[str]: ...


class RedisStore:
    """``<prefix>:<key>`` JSON values; versions (and tombstones) in the ``changeflow:versions`` hash."""

    name = "redis"

    def __init__(self, settings: Settings) -> None:
        from sinks.redis import VERSIONS_KEY

        self.versions_key = VERSIONS_KEY
        self.client = redis.Redis.from_url(settings.redis_url, socket_timeout=30, socket_connect_timeout=5)

    def maps(self, spec: EntitySpec) -> bool:
        return spec.redis_prefix is not None

    def _rows(self, spec: EntitySpec, keys: list[str]) -> Iterator[tuple[str, Row, int | None]]:
        json_fields = _json_fields(spec)
        for i in range(0, len(keys), BATCH):
            chunk = keys[i : i + BATCH]
            names = [spec.redis_key(k) for k in chunk]
            pipe = self.client.pipeline(transaction=False)
            pipe.mget(names)
            pipe.hmget(self.versions_key, names)
            values, versions = pipe.execute()
            for key, value, version in zip(chunk, values, versions, strict=True):
                if value is None:
                    continue
                try:
                    row = orjson.loads(value)
                except orjson.JSONDecodeError:
                    row = {"<value>": value.decode(errors="replace")}
                yield key, comparable_row(row, spec, json_fields), None if version is None else int(version)

    def scan(self, spec: EntitySpec) -> Iterator[tuple[str, Row, int | None]]:
        prefix = f"{spec.redis_prefix}:"
        keys = [n.decode()[len(prefix):] for n in self.client.scan_iter(match=f"{prefix}*", count=BATCH)]
        yield from self._rows(spec, keys)

    def fetch(self, spec: EntitySpec, keys: list[str]) -> dict[str, Versioned]:
        return {k: (row, v) for k, row, v in self._rows(spec, keys)}

    def count(self, spec: EntitySpec) -> int:
        return sum(1 for _ in self.client.scan_iter(match=f"{spec.redis_prefix}:*", count=BATCH))

    def version_entries(self, spec: EntitySpec, keys: list[str]) -> dict[str, int]:
        raw = self.client.hmget(self.versions_key, [spec.redis_key(k) for k in keys]) if keys else []
        return {k: int(v) for k, v in zip(keys, raw, strict=True) if v is not None}

    def delete(self, spec: EntitySpec, keys: list[str]) -> None:
        # The value only: the version entry stays as a tombstone, as after any delete.
        if keys:
            self.client.delete(*[spec.redis_key(k) for k in keys])

    def drop_versions_above(self, spec: EntitySpec, keys: list[str], position: int) -> list[str]:
        ahead = [k for k, v in self.version_entries(spec, keys).items() if v > position]
        if ahead:
            self.client.hdel(self.versions_key, *[spec.redis_key(k) for k in ahead])
        return ahead


class SearchStore:
    """Documents by key, with the external version the sink wrote them with; read through the REST API."""

    name = "search"

    def __init__(self, settings: Settings) -> None:
        self.http = httpx.Client(base_url=settings.search_url, timeout=60)

    def maps(self, spec: EntitySpec) -> bool:
        return spec.search_index is not None

    def scan(self, spec: EntitySpec) -> Iterator[tuple[str, Row, int | None]]:
        json_fields = _json_fields(spec)
        index = spec.search_index
        self.http.post(f"/{index}/_refresh")
        response = self.http.post(
            f"/{index}/_search", params={"scroll": "2m"},
            json={"size": BATCH, "version": True, "sort": ["_doc"], "query": {"match_all": {}}},
        )
        if response.status_code == 404:
            return
        response.raise_for_status()
        body = response.json()
        scroll_id = body.get("_scroll_id")
        try:
            while body["hits"]["hits"]:
                for hit in body["hits"]["hits"]:
                    yield hit["_id"], comparable_row(hit.get("_source") or {}, spec, json_fields), hit.get("_version")
                response = self.http.post("/_search/scroll", json={"scroll": "2m", "scroll_id": scroll_id})
                response.raise_for_status()
                body = response.json()
                scroll_id = body.get("_scroll_id", scroll_id)
        finally:
            if scroll_id:
                self.http.request("DELETE", "/_search/scroll", json={"scroll_id": [scroll_id]})

    def fetch(self, spec: EntitySpec, keys: list[str]) -> dict[str, Versioned]:
        json_fields = _json_fields(spec)
        out: dict[str, Versioned] = {}
        for i in range(0, len(keys), BATCH):
            response = self.http.post(f"/{spec.search_index}/_mget", json={"ids": keys[i : i + BATCH]})
            if response.status_code == 404:
                return out
            response.raise_for_status()
            for doc in response.json()["docs"]:
                if doc.get("found"):
                    out[doc["_id"]] = (comparable_row(doc["_source"], spec, json_fields), doc.get("_version"))
        return out

    def count(self, spec: EntitySpec) -> int:
        self.http.post(f"/{spec.search_index}/_refresh")
        response = self.http.get(f"/{spec.search_index}/_count")
        if response.status_code == 404:
            return 0
        response.raise_for_status()
        return int(response.json()["count"])

    def delete(self, spec: EntitySpec, keys: list[str]) -> None:
        for key in keys:
            response = self.http.delete(f"/{spec.search_index}/_doc/{key}")
            if response.status_code not in (200, 404):
                response.raise_for_status()
        self.http.post(f"/{spec.search_index}/_refresh")

    def drop_versions_above(self, spec: EntitySpec, keys: list[str], position: int) -> list[str]:
        """A document versioned beyond the source position would outrank every future change; the engine
        keeps a deleted document's version for ``gc_deletes``, so it cannot be lowered from here."""
        ahead = [k for k, (_, v) in self.fetch(spec, keys).items() if v is not None and v > position]
        if ahead:
            raise UnrepairableError(
                f"search {spec.search_index}: documents {ahead[:5]} carry versions beyond the source position "
                f"{position}; the index keeps that version for gc_deletes, reindex them to repair"
            )
        return []


class ClickHouseStore:
    """Current state in ``changeflow.<entity>`` read with FINAL; typed columns."""

    name = "clickhouse"

    def __init__(self, settings: Settings) -> None:
        from sinks.clickhouse import client_for

        self.client = client_for(settings)
        self.database = settings.clickhouse_database

    def maps(self, spec: EntitySpec) -> bool:
        return bool(spec.clickhouse_columns)

    def _select(self, spec: EntitySpec, where: str = "") -> Any:
        return self.client.query(
            f"SELECT * EXCEPT (_is_deleted, _ts_ms, _ingested_at), _version AS `__v` "
            f"FROM {self.database}.{spec.name} FINAL WHERE _is_deleted = 0 {where}"
        )

    def _rows(self, spec: EntitySpec, result: Any) -> Iterator[tuple[str, Row, int | None]]:
        json_fields = _json_fields(spec)
        names = list(result.column_names)
        for values in result.result_rows:
            row = dict(zip(names, values, strict=True))
            version = row.pop("__v")
            yield str(row[spec.key_column]), comparable_row(row, spec, json_fields), int(version)

    def scan(self, spec: EntitySpec) -> Iterator[tuple[str, Row, int | None]]:
        yield from self._rows(spec, self._select(spec))

    @staticmethod
    def _key_cond(spec: EntitySpec, keys: list[str], column: str | None = None) -> str:
        """``col IN (...)`` with literal values: a long bound array is too long for a URL parameter."""
        if column is None and key_is_numeric(spec):
            values = ", ".join(str(int(k)) for k in keys)
        else:
            values = ", ".join("'" + k.replace("\\", "\\\\").replace("'", "\\'") + "'" for k in keys)
        return f"`{column or spec.key_column}` IN ({values})"

    @staticmethod
    def _chunks(keys: list[str]) -> Iterator[list[str]]:
        for i in range(0, len(keys), CH_CHUNK):
            yield keys[i : i + CH_CHUNK]

    def fetch(self, spec: EntitySpec, keys: list[str]) -> dict[str, Versioned]:
        out: dict[str, Versioned] = {}
        for chunk in self._chunks(keys):
            for k, row, v in self._rows(spec, self._select(spec, f"AND {self._key_cond(spec, chunk)}")):
                out[k] = (row, v)
        return out

    def count(self, spec: EntitySpec) -> int:
        return int(self.client.command(f"SELECT count() FROM {self.database}.{spec.name} FINAL WHERE _is_deleted = 0"))

    def delete(self, spec: EntitySpec, keys: list[str]) -> None:
        for chunk in self._chunks(keys):
            self.client.command(
                f"ALTER TABLE {self.database}.{spec.name} DELETE WHERE {self._key_cond(spec, chunk)} "
                "SETTINGS mutations_sync = 2"
            )

    def drop_versions_above(self, spec: EntitySpec, keys: list[str], position: int) -> list[str]:
        ahead: list[str] = []
        for chunk in self._chunks(keys):
            where = f"{self._key_cond(spec, chunk)} AND _version > {int(position)}"
            found = [str(k) for (k,) in self.client.query(
                f"SELECT DISTINCT `{spec.key_column}` FROM {self.database}.{spec.name} WHERE {where}"
            ).result_rows]
            if found:
                self.client.command(
                    f"ALTER TABLE {self.database}.{spec.name} DELETE WHERE {where} SETTINGS mutations_sync = 2"
                )
            ahead += found
        return ahead

    def changelog(self, spec: EntitySpec, keys: list[str]) -> dict[str, dict[int, Row]]:
        """The pipeline's own images of these keys, by version (what each store should hold at it)."""
        json_fields = _json_fields(spec)
        out: dict[str, dict[int, Row]] = {}
        for chunk in self._chunks(keys):
            result = self.client.query(
                f"SELECT key, version, after FROM {self.database}.changelog "
                f"WHERE entity = {{e:String}} AND {self._key_cond(spec, chunk, 'key')} AND after IS NOT NULL",
                parameters={"e": spec.name},
            )
            for key, version, after in result.result_rows:
                out.setdefault(key, {})[int(version)] = comparable_row(orjson.loads(after), spec, json_fields)
        return out


class UnrepairableError(RuntimeError):
    """Drift that a snapshot cannot fix and that this tool will not fix behind the store's back."""


def open_stores(settings: Settings, names: Iterable[str]) -> dict[str, Store]:
    factories: dict[str, Callable[[Settings], Store]] = {
        "redis": RedisStore, "search": SearchStore, "clickhouse": ClickHouseStore,
    }
    return {n: factories[n](settings) for n in names}


# --- reconciliation ----------------------------------------------------------------------------------
def select_entities(entities: list[str] | None) -> tuple[list[EntitySpec], dict[str, str]]:
    """Entities whose source runs here; MongoDB has no connection setting, so its entities are skipped."""
    unknown = [e for e in entities or [] if e not in ENTITIES]
    if unknown:
        raise ValueError(f"unknown entity {unknown[0]!r}; known: {', '.join(ENTITIES)}")
    chosen, skipped = [], {}
    for name, spec in ENTITIES.items():
        if entities and name not in entities:
            continue
        if spec.source != "postgres":
            skipped[name] = f"source {spec.source} is not configured here"
            continue
        chosen.append(spec)
    return chosen, skipped


@dataclass
class _Side:
    """One store's view of one entity during a run."""

    digests: dict[str, int] = field(default_factory=dict)
    count: int = 0


def _settle(
    spec: EntitySpec, source: Source, stores: Mapping[str, Store], pending: Mapping[str, list[str]], settle_s: float,
) -> tuple[dict[str, Row], dict[str, dict[str, Versioned]]]:
    """Read the differing keys again on both sides after a pause: changes in flight land meanwhile."""
    keys = sorted({k for ks in pending.values() for k in ks})
    if settle_s > 0 and keys:
        time.sleep(settle_s)
    src = source.fetch(spec, keys)
    by_store = {name: store.fetch(spec, keys) for name, store in stores.items()}  # all: for cross-store versions
    return src, by_store


def _scan_digests(settings: Settings, side: str, entity: str) -> dict[str, int]:
    """key → row digest of one side (in a worker process: it opens its own connections)."""
    spec = ENTITIES[entity]
    if side == "source":
        return {key: row_digest(row) for key, row in Source(settings).scan(spec)}
    return {key: row_digest(row) for key, row, _ in open_stores(settings, [side])[side].scan(spec)}


def run_mode(sample: int | None, only_keys: list[str] | None) -> str:
    return f"keys:{len(only_keys)}" if only_keys else (f"sample:{sample}" if sample else "full")


def reconcile_entity(
    spec: EntitySpec,
    source: Source,
    stores: Mapping[str, Store],
    sample: int | None,
    settle_s: float,
    changelog: Callable[[EntitySpec, list[str]], dict[str, dict[int, Row]]] | None,
    only_keys: list[str] | None = None,
) -> list[StoreResult]:
    numeric = key_is_numeric(spec)
    mode = run_mode(sample, only_keys)
    mapped = {n: s for n, s in stores.items() if s.maps(spec)}
    sides: dict[str, _Side] = {}
    errors: dict[str, str] = {}
    kd: dict[str, KeyDiff] = {}
    if sample or only_keys:
        keys = list(only_keys) if only_keys else source.sample_keys(spec, sample or 0)
        src_rows = source.fetch(spec, keys)
        source_count = source.count(spec)
        src_digests = {k: row_digest(r) for k, r in src_rows.items()}
        for name, store in mapped.items():
            try:
                rows = store.fetch(spec, keys)
                sides[name] = _Side({k: row_digest(r) for k, (r, _) in rows.items()}, store.count(spec))
            except Exception as exc:  # one unreachable store must not hide the others' drift
                errors[name] = f"{type(exc).__name__}: {exc}"
    else:
        # Each side is read once, all at the same time, each in its own process (decoding and normalising
        # tens of thousands of rows is CPU work); only digests come back, the rows of differing keys are
        # read again below.
        with ProcessPoolExecutor(max_workers=1 + len(mapped), mp_context=multiprocessing.get_context("fork")) as pool:
            src_future = pool.submit(_scan_digests, source.settings, "source", spec.name)
            futures = {name: pool.submit(_scan_digests, source.settings, name, spec.name) for name in mapped}
            src_digests = src_future.result()
            for name, future in futures.items():
                try:
                    digests = future.result()
                    sides[name] = _Side(digests, len(digests))
                except Exception as exc:  # one unreachable store must not hide the others' drift
                    errors[name] = f"{type(exc).__name__}: {exc}"
        source_count = len(src_digests)
    for name, side in sides.items():
        kd[name] = diff_keys(src_digests, side.digests, numeric)

    pending = {n: d.missing_in_store + d.missing_in_source + d.content_differs for n, d in kd.items()}
    pending = {n: ks for n, ks in pending.items() if ks}
    reachable = {n: st for n, st in mapped.items() if n in sides}
    src_now, stores_now = _settle(spec, source, reachable, pending, settle_s) if pending else ({}, {})
    content_keys = sorted({k for n, ks in pending.items() for k in ks if k in src_now and k in stores_now[n]})
    images = changelog(spec, content_keys) if changelog and content_keys else {}
    # Per key: versions of stores whose content equals the source right now (for "behind another store").
    current: dict[str, dict[str, int]] = {}
    for name, rows in stores_now.items():
        for key, (row, version) in rows.items():
            if key in src_now and row == src_now[key] and version is not None:
                current.setdefault(key, {})[name] = version
    redis_versions: dict[str, int] = {}
    if "redis" in pending and isinstance(mapped.get("redis"), RedisStore):
        redis_store = mapped["redis"]
        assert isinstance(redis_store, RedisStore)
        redis_versions = redis_store.version_entries(spec, [k for k in pending["redis"] if k in src_now])

    results = []
    for name in mapped:
        if name in errors:
            results.append(StoreResult(spec.name, name, source_count, 0, mode, error=errors[name]))
            continue
        side, d = sides[name], kd[name]
        result = StoreResult(spec.name, name, source_count, side.count, mode, d.buckets, d.differing_buckets)
        for key in sorted(pending.get(name, []), key=lambda k: sort_key(k, numeric)):
            in_src, held = key in src_now, stores_now[name].get(key)
            if in_src and held is None:
                tomb = redis_versions.get(key) if name == "redis" else None
                detail = "in source, not in store"
                if tomb is not None:
                    detail += f" (its version entry {tomb} says applied: value removed behind the pipeline)"
                result.diffs.append(Diff(key, "missing", detail, tomb))
            elif not in_src and held is not None:
                result.diffs.append(Diff(key, "extra", "in store, not in source", held[1]))
            elif in_src and held is not None and held[0] != src_now[key]:
                others = [v for n, v in current.get(key, {}).items() if n != name]
                kind, detail = classify_content(src_now[key], held[0], held[1], images.get(key, {}), others)
                result.diffs.append(Diff(key, kind, detail, held[1]))
        results.append(result)
    return results


def reconcile(
    settings: Settings,
    entities: list[str] | None = None,
    stores: list[str] | None = None,
    sample: int | None = None,
    settle_s: float = 2.0,
    repair_of: str = "",
    only_keys: list[str] | None = None,
) -> Run:
    """One reconciliation run: every key (full), ``sample`` random source keys, or exactly ``only_keys``
    (which may include keys the source does not have: strays are found that way too)."""
    started = time.monotonic()
    unknown = [s for s in stores or [] if s not in STORES]
    if unknown:
        raise ValueError(f"unknown store {unknown[0]!r}; known: {', '.join(STORES)}")
    specs, skipped = select_entities(entities)
    opened = open_stores(settings, stores or STORES)
    source = Source(settings)
    changelog: Callable[[EntitySpec, list[str]], dict[str, dict[int, Row]]] | None = None
    try:
        changelog = ClickHouseStore(settings).changelog
    except Exception as exc:  # classification falls back to cross-store versions
        log.warning("event=changelog_unavailable error=%s", exc)
    results: list[StoreResult] = []
    for spec in specs:
        results += reconcile_entity(spec, source, opened, sample, settle_s, changelog, only_keys)
    run = Run(str(uuid.uuid4()), datetime.now(UTC), run_mode(sample, only_keys), results, skipped,
              repair_of=repair_of)
    run.duration_s = time.monotonic() - started
    return run


# --- history in ClickHouse ---------------------------------------------------------------------------
def runs_ddl(database: str) -> str:
    return (
        f"CREATE TABLE IF NOT EXISTS {database}.reconciliation_runs (\n"
        "  run_id String, run_at DateTime64(3, 'UTC'), mode LowCardinality(String),\n"
        "  entity LowCardinality(String), store LowCardinality(String),\n"
        "  source_count UInt64, store_count UInt64, missing UInt64, missing_in_store UInt64,\n"
        "  missing_in_source UInt64, stale UInt64, mismatched UInt64, drift UInt64,\n"
        "  buckets UInt32, differing_buckets UInt32, error Nullable(String), duration_ms UInt64,\n"
        "  repair_of String\n"
        ")\nENGINE = MergeTree\nORDER BY (entity, store, run_at)"
    )


def diffs_ddl(database: str) -> str:
    return (
        f"CREATE TABLE IF NOT EXISTS {database}.reconciliation_diffs (\n"
        "  run_id String, run_at DateTime64(3, 'UTC'), entity LowCardinality(String),\n"
        "  store LowCardinality(String), key String, kind LowCardinality(String), detail String,\n"
        "  store_version Nullable(UInt64)\n"
        ")\nENGINE = MergeTree\nORDER BY (run_id, entity, store, key)"
    )


def record_run(settings: Settings, run: Run) -> None:
    """Append the run and its differing keys, so drift history is a ClickHouse query away."""
    from sinks.clickhouse import client_for

    db = settings.clickhouse_database
    client = client_for(settings)
    try:
        client.command(runs_ddl(db))
        client.command(diffs_ddl(db))
        duration_ms = int(run.duration_s * 1000)
        rows = []
        for r in run.results:
            d = r.as_dict()
            rows.append([
                run.run_id, run.run_at, run.mode, r.entity, r.store, r.source_count, r.store_count, d["missing"],
                d["missing_in_store"], d["missing_in_source"], d["stale"], d["mismatched"], r.drift, r.buckets,
                len(r.differing_buckets), r.error, duration_ms, run.repair_of,
            ])
        if rows:
            client.insert(f"{db}.reconciliation_runs", rows, column_names=[
                "run_id", "run_at", "mode", "entity", "store", "source_count", "store_count", "missing",
                "missing_in_store", "missing_in_source", "stale", "mismatched", "drift", "buckets",
                "differing_buckets", "error", "duration_ms", "repair_of",
            ])
        diffs = [
            [run.run_id, run.run_at, r.entity, r.store, d.key, d.kind, d.detail, d.store_version]
            for r in run.results for d in r.diffs
        ]
        for i in range(0, len(diffs), 50_000):
            client.insert(f"{db}.reconciliation_diffs", diffs[i : i + 50_000], column_names=[
                "run_id", "run_at", "entity", "store", "key", "kind", "detail", "store_version",
            ])
    finally:
        client.close()


# --- repair ------------------------------------------------------------------------------------------
@dataclass
class RepairPlan:
    """What a repair does: per entity the keys to re-read from the source, per store the strays."""

    snapshot: dict[str, list[str]] = field(default_factory=dict)  # entity → keys
    strays: dict[tuple[str, str], list[str]] = field(default_factory=dict)  # (entity, store) → keys
    pairs: set[tuple[str, str, str]] = field(default_factory=set)  # (entity, store, key) to converge

    @property
    def empty(self) -> bool:
        return not self.snapshot and not self.strays


def plan_repair(run: Run) -> RepairPlan:
    plan = RepairPlan()
    for r in run.results:
        for d in r.diffs:
            if d.kind == "extra":
                plan.strays.setdefault((r.entity, r.store), []).append(d.key)
            else:
                keys = plan.snapshot.setdefault(r.entity, [])
                if d.key not in keys:
                    keys.append(d.key)
                plan.pairs.add((r.entity, r.store, d.key))
    return plan


@dataclass
class RepairReport:
    signals: list[str] = field(default_factory=list)
    snapshot_keys: dict[str, int] = field(default_factory=dict)
    deleted_strays: dict[str, list[str]] = field(default_factory=dict)  # "entity/store" → keys
    dropped_future_versions: list[str] = field(default_factory=list)
    converged: int = 0
    pending: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "signals": self.signals, "snapshot_keys": self.snapshot_keys, "deleted_strays": self.deleted_strays,
            "dropped_future_versions": self.dropped_future_versions, "converged": self.converged,
            "pending": self.pending, "errors": self.errors, "seconds": round(self.seconds, 2),
        }


def repair(
    settings: Settings,
    run: Run,
    timeout_s: float = 120.0,
    progress: Callable[[int, int], None] | None = None,
) -> RepairReport:
    """Re-sync only the drifted keys: strays deleted from their store (the source has nothing to send for
    them), everything else re-read from the source by an incremental snapshot limited to those keys.

    A snapshot read carries the stream position at read time as its version, newer than anything the
    stores hold for a key, so the version guards let it through even where a store's version entry
    claims to be current. A version *beyond* the source position (a bogus write) would outrank it: such
    versions are dropped first where the store allows it.
    """
    from connectors.signals import key_filter, request_incremental_snapshot

    started = time.monotonic()
    report = RepairReport()
    plan = plan_repair(run)
    source = Source(settings)
    stores = open_stores(settings, {s for (_, s, _) in plan.pairs} | {s for (_, s) in plan.strays})
    for (entity, store_name), keys in plan.strays.items():
        spec = ENTITIES[entity]
        still_absent = [k for k in keys if k not in source.fetch(spec, keys)]  # never delete what the source has
        stores[store_name].delete(spec, still_absent)
        report.deleted_strays[f"{entity}/{store_name}"] = still_absent
    position = source.position()
    for entity, keys in plan.snapshot.items():
        spec = ENTITIES[entity]
        for store_name in {s for (e, s, _) in plan.pairs if e == entity}:
            try:
                for key in stores[store_name].drop_versions_above(spec, keys, position):
                    report.dropped_future_versions.append(f"{entity}/{store_name}/{key}")
            except UnrepairableError as exc:
                report.errors.append(str(exc))
        for i in range(0, len(keys), 2000):
            chunk = keys[i : i + 2000]
            table = f"public.{spec.source_table}"
            where = {table: key_filter(spec.key_column, chunk, key_is_numeric(spec))}
            report.signals.append(request_incremental_snapshot(settings.pg_dsn, [table], where))
        report.snapshot_keys[entity] = len(keys)

    total = len(plan.pairs)
    remaining = set(plan.pairs)
    deadline = time.monotonic() + timeout_s
    while remaining:
        for entity in sorted({e for (e, _, _) in remaining}):
            spec = ENTITIES[entity]
            keys = sorted({k for (e, _, k) in remaining if e == entity})
            src = source.fetch(spec, keys)
            for store_name in sorted({s for (e, s, _) in remaining if e == entity}):
                held = stores[store_name].fetch(spec, keys)
                for key in keys:
                    pair = (entity, store_name, key)
                    if pair in remaining and key in src and key in held and held[key][0] == src[key]:
                        remaining.discard(pair)
                    elif pair in remaining and key not in src and key not in held:
                        remaining.discard(pair)  # deleted in the source meanwhile, and gone from the store
        if progress:
            progress(total - len(remaining), total)
        if not remaining or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    report.converged = total - len(remaining)
    report.pending = [f"{e}/{s}/{k}" for (e, s, k) in sorted(remaining)]
    report.seconds = time.monotonic() - started
    return report
