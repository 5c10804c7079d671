"""Search index projection, for Elasticsearch (docker-compose) and OpenSearch (the native stack).

Both engines speak the same REST API for what we use (indexes, aliases, mappings, ``_bulk``, ``_mget``,
``_search``), so the store talks to either through one httpx client (:meth:`SearchStore._call`); each
official client refuses or mistreats the other engine (elasticsearch-py's product check), and neither is
needed. Bodies are changeflow's JSON (exact decimals), answers read back with exact numbers.

Writes use external versioning with the canonical ``version``: the engine itself rejects a record that
is not newer (409, counted as already applied). Deletes are versioned too and kept for
``index.gc_deletes``, so a late, older update cannot resurrect a deleted document.

The bulk response says per document what happened (:func:`classify_item`): a document the engine refuses
for its content (a mapping conflict: an object in one document and a string in the next, a value that
does not parse as its field's type) is a *rejected record*, returned to the runner to quarantine while the
rest of the batch is written; throttling (429, 502-504) retries the batch; anything else (a missing or
closed index, a refused request) is a failure of the store and stops the sink, as before.
"""

from __future__ import annotations

import hashlib
import re
import time
import urllib.parse
from collections.abc import Iterator, Mapping, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, cast

import orjson
from pydantic import Field, field_validator
from pydantic_settings import BaseSettings
from tenacity import Retrying, retry_if_exception_type, stop_after_attempt, wait_exponential

from changeflow.lazy import lazy_import
from changeflow.pipelines.model import ON_REJECT_DOC, OnReject, Strict
from changeflow.pipelines.problems import Problem
from changeflow.pipelines.spec import EntitySpec, Pipeline
from changeflow.pipelines.types import ColumnType
from changeflow.schemas import json
from changeflow.settings import env_config
from changeflow.sinks.base import (
    FatalSinkError,
    Rejected,
    RetriableSinkError,
    Versioned,
    applied_through,
    source_name,
    source_row,
    stored_name,
    stored_row,
)
from changeflow.streams.records import ChangeRecord

if TYPE_CHECKING:
    import httpx

    from changeflow.settings import Settings
else:  # the client library is imported on first use, since loading a pipeline imports this module; measured
    # (python -X importtime, `load(examples/commerce/pipeline.yml)`, median of 7 cold runs on the 2-core dev box):
    # 620 ms with redis, httpx and psycopg imported at the tops of the store modules and pipelines.catalog, 373 ms
    # with them lazy (clickhouse_connect, ~95 ms, is lazy too: measured in sinks/clickhouse.py)
    httpx = lazy_import("httpx")


class SearchSettings(BaseSettings):
    """Where the search store connects: ``CHANGEFLOW_SEARCH_*``, the native stack's engine by default."""

    model_config = env_config("CHANGEFLOW_SEARCH_")

    host: str = "127.0.0.1"
    port: int = 9200
    # How soon an indexed change becomes searchable. Visibility waits for the next refresh, so this bounds
    # the search index's freshness; a longer interval costs the engine less under heavy write load.
    refresh_interval: str = "100ms"

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"


class SearchConfig(Strict):
    """``entities.<e>.stores.search``: on by default."""

    enabled: bool = True
    index: str | None = Field(None,
                              description="Index (an alias over a rebuildable index); default: <namespace>-<entity>.")
    mappings: dict[str, Any] = Field(default_factory=dict, description="Field mappings merged over the derived ones.")
    on_reject: OnReject = Field("quarantine", description=ON_REJECT_DOC)

    @field_validator("index")
    @classmethod
    def _index_name(cls, v: str | None) -> str | None:
        if v is not None and not re.match(r"^[a-z0-9][a-z0-9_.-]*$", v):
            raise ValueError(f"{v!r} is not a valid index name; use lower-case letters, digits, '-', '_' or '.'")
        return v


def config(spec: EntitySpec) -> SearchConfig | None:
    """The entity's search configuration, or None when it does not land in the index."""
    return cast("SearchConfig | None", spec.store(SearchStore.name))


def index_name(spec: EntitySpec) -> str:
    """The entity's index: an alias over a rebuildable physical index (default ``<namespace>-<entity>``)."""
    cfg = spec.config.stores.get(SearchStore.name)
    return (cfg.index if cfg is not None else None) or f"{spec.namespace}-{spec.name}"


def check_indexes(pipeline: Pipeline) -> list[Problem]:
    out: list[Problem] = []
    seen: dict[str, str] = {}
    for spec in pipeline.stored_in(SearchStore.name):
        index = index_name(spec)
        if index in seen:
            out.append(Problem(f"entities.{spec.name}.stores.search.index",
                               f"{index!r} is also entity {seen[index]!r}'s index; give each entity its own "
                               f"(default: {spec.namespace}-{spec.name})"))
        seen.setdefault(index, spec.name)
    return out

GC_DELETES = "7d"
# How long a rebuild waits after registering its new index: the sinks re-read the registry every second.
REBUILD_REGISTRY_WAIT_S = 2.5
# Tries of one REST call (not a bulk write, which the runner retries whole) while the engine is busy or away.
CALL_ATTEMPTS = 4
RETRIABLE_STATUS = {429, 502, 503, 504}
BATCH = 1000
# How often a shard's history retention lease moves on (its background sync): what a merge must wait for before
# it can drop soft-deleted documents (``expunge``).
RETENTION_SYNC_S = 30.0
# Actions per _bulk request: a sink batch (5,000 records by default) in one or two requests.
BULK_ACTIONS = 5000
# The only parts of a bulk answer the sink reads.
BULK_FILTER = "items.*.status,items.*.error"

# Per-document errors (HTTP 400 in a bulk item) that are the document's own fault: its content does not fit
# the index's mapping. Elasticsearch 8+ says document_parsing_exception where OpenSearch and ES 7 say
# mapper_parsing_exception.
REJECTED_TYPES = frozenset({
    "mapper_parsing_exception", "document_parsing_exception", "illegal_argument_exception",
    "strict_dynamic_mapping_exception", "mapper_exception", "parse_exception", "x_content_parse_exception",
    "json_parse_exception", "number_format_exception", "date_time_parse_exception",
    "version_conflict_engine_exception",  # only with a status other than 409 (409 is "already newer")
})


def classify_item(op_type: str, status: int | None, error: Any) -> tuple[str, str | None]:
    """One bulk item → ("ok" | "rejected" | "retry" | "fatal", the engine's reason).

    ok: written, or already newer (409 under external versions), or a delete of what was never indexed
    (the versioned tombstone is written anyway). rejected: the engine refuses this document's content.
    retry: throttled or unavailable. fatal: the index itself is wrong (missing, closed, read-only by a
    cluster block, a security refusal): a failure of the store, never quarantined record by record.
    """
    if status is not None and 200 <= status < 300:
        return "ok", None
    if status == 409:
        return "ok", None
    if status == 404 and op_type == "delete":
        return "ok", None
    kind = error.get("type") if isinstance(error, dict) else None
    reason = error.get("reason") if isinstance(error, dict) else (str(error) if error else None)
    reason = without_values(reason)
    text = f"{kind}: {reason}" if kind else (reason or f"status {status}")
    if isinstance(error, dict) and isinstance(error.get("caused_by"), dict):
        # The cause's type only: its reason quotes the value ("Numeric value (…) out of range of long").
        text += f" (caused by {error['caused_by'].get('type')})"
    if status in RETRIABLE_STATUS or kind in ("es_rejected_execution_exception", "unavailable_shards_exception"):
        return "retry", text
    if status == 400 and kind == "illegal_argument_exception" and not _about_the_document(text):
        # Also what the engine says of the index itself ("no write index is defined for alias [x]"): a
        # store misconfiguration, never a batch of documents quarantined and committed.
        return "fatal", text
    if status == 400 and kind is not None and (kind in REJECTED_TYPES or kind.endswith("_parsing_exception")):
        return "rejected", text
    return "fatal", text


_PREVIEW = re.compile(r"(Preview of field's value: ).*$", re.S)


def without_values(reason: str | None) -> str | None:
    """The engine's reason without the value it quotes: a rejection reason reaches dead-letter headers and logs,
    which carry keys and reasons, never row values. The field and its type stay named."""
    return None if reason is None else _PREVIEW.sub(r"\1(not shown)", reason)


def _about_the_document(text: str) -> bool:
    """Whether an illegal_argument_exception names the document's content (a field, a value, a mapping)."""
    lowered = text.lower()
    return any(w in lowered for w in ("field", "mapper", "mapping", "value", "document", "parse", "limit of total"))


def field_mapping(t: ColumnType) -> dict[str, Any]:
    """The search mapping of a column type; a pipeline's `mappings` override it per field."""
    k = t.kind
    if k == "array":
        assert t.item is not None
        return field_mapping(t.item)  # the engine's arrays are implicit
    # `long` and `double` whatever the source width: an index's field type cannot change, and a widening at
    # the source (int16 → int32 → int64, real → double) must not make later values unindexable.
    simple = {
        "int16": "long", "int32": "long", "int64": "long", "float32": "double", "float64": "double",
        "bool": "boolean", "uuid": "keyword", "enum": "keyword", "bytes": "binary", "interval": "long",
        "time": "keyword", "timetz": "keyword", "date": "date", "timestamp": "date", "timestamptz": "date",
    }
    if k in simple:
        return {"type": simple[k]}
    if k == "decimal":
        # The document keeps every digit (exact text in _source); the indexed value is for ranges and sorts.
        if t.precision is not None and (t.scale or 0) <= 6:
            return {"type": "scaled_float", "scaling_factor": 10 ** (t.scale or 0)}
        return {"type": "keyword"}
    if k == "json":
        return {"type": "object", "enabled": False}
    return {"type": "text", "fields": {"keyword": {"type": "keyword", "ignore_above": 256}}}


def mappings_for(spec: EntitySpec, types: Mapping[str, ColumnType]) -> dict[str, Any]:
    cfg = config(spec)
    overrides = cfg.mappings if cfg is not None else {}
    props = {stored_name(name, RESERVED): overrides.get(name) or field_mapping(t) for name, t in types.items()}
    props.update({stored_name(name, RESERVED): m for name, m in overrides.items() if name not in types})
    return {"properties": props}


# The engine refuses an `_id` longer than 512 bytes. Such a key's document gets a deterministic id, its
# SHA-256, and carries the full key in this field (reads map it back), so a long composite key is written,
# never quarantined for its length.
MAX_ID_BYTES = 512
KEY_FIELD = "_changeflow_key"


# The engine's metadata fields, which no document may carry (mapper_parsing_exception, measured on
# OpenSearch 2.19), and the store's own long-key field: a source column of one of these names is stored with
# one more `_` (sinks.base.stored_name) and given back under its own name.
RESERVED = frozenset({"_id", "_index", "_source", "_routing", "_version", "_seq_no", "_primary_term", "_ignored",
                      "_field_names", "_data_stream_timestamp", "_doc_count", "_tier", "_nested_path", "_type",
                      "_uid", "_parent", "_all", KEY_FIELD})


def doc_id(key: str) -> str:
    """The document id of a canonical key: the key itself, or ``sha256:<hex>`` for one too long for an id."""
    raw = key.encode("utf-8", "surrogatepass")
    return key if len(raw) <= MAX_ID_BYTES else "sha256:" + hashlib.sha256(raw).hexdigest()


def key_of(hit_id: str, source: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """(canonical key, row) of a stored document: the long-key field is the key, not a column, and source
    columns named like the engine's own fields get their names back."""
    row = source_row({k: v for k, v in source.items() if k != KEY_FIELD}, RESERVED)
    return (str(source[KEY_FIELD]) if KEY_FIELD in source else hit_id), row


def doc_path(index: str, doc_id: str) -> str:
    """``/<index>/_doc/<id>`` with both URL-encoded: an id such as ``../../_all`` stays one document's id."""
    return f"/{urllib.parse.quote(index, safe='')}/_doc/{urllib.parse.quote(doc_id, safe='')}"


def bulk_body(actions: Sequence[dict[str, Any]]) -> bytes:
    """The NDJSON body of a ``_bulk`` request: each action's metadata line, then its document (not for a delete)."""
    lines: list[bytes] = []
    for a in actions:
        op = a["_op_type"]
        lines.append(orjson.dumps({op: {"_index": a["_index"], "_id": a["_id"], "version": a["version"],
                                        "version_type": a["version_type"]}}))
        if op != "delete":
            lines.append(json.dumps(a["_source"]))
    lines.append(b"")
    return b"\n".join(lines)


def isolate(spec: EntitySpec, cfg: SearchConfig, tag: str, namespace: str) -> SearchConfig:
    """The configuration of an isolated copy of the entity (the bench's stages): its index under ``<tag>-``."""
    return cfg.model_copy(update={"index": f"{tag}-{index_name(spec)}"})


class SearchStore:
    name = "search"
    config_model = SearchConfig
    check_pipeline = staticmethod(check_indexes)
    isolate = staticmethod(isolate)

    def __init__(self, settings: Settings, pipeline: Pipeline) -> None:
        own = SearchSettings()
        self.url = own.url
        self.pipeline = pipeline
        # One document per entity holding the highest version applied, written with that version as its
        # external version, so the marker itself only ever moves forward.
        self.applied_index = f"{pipeline.namespace}-applied"
        # entity → target index of a rebuild in progress; while a document is here every write of that
        # entity also goes to the target, under the same external version.
        self.rebuilds_index = f"{pipeline.namespace}-rebuilds"
        self.refresh_interval = own.refresh_interval
        self._targets: dict[str, str] = {}
        self._targets_read_at = 0.0
        self._mapped: dict[str, set[str]] = {}
        self._http: httpx.Client | None = None
        self._owners: list[int | None] = []

    # --- the one HTTP client: the REST API both engines (OpenSearch, Elasticsearch) answer alike -------
    @property
    def http(self) -> httpx.Client:
        if self._http is None:
            self._http = httpx.Client(base_url=self.url, timeout=60)
        return self._http

    def _call(self, method: str, path: str, body: Any = None, ok: tuple[int, ...] = ()) -> Any:
        """One REST call; its answer parsed with changeflow's JSON (exact numbers), or None for a status in
        ``ok``. The engine unreachable or throttling (429, 502-504) is tried again a few times, as the official
        clients did, then retriable for the caller; any other refusal is the store's failure."""
        for attempt in Retrying(stop=stop_after_attempt(CALL_ATTEMPTS), wait=wait_exponential(multiplier=0.2, max=2),
                                retry=retry_if_exception_type(RetriableSinkError), reraise=True):
            with attempt:
                return self._call_once(method, path, body, ok)
        raise AssertionError("unreachable: Retrying re-raises the last error")

    def _call_once(self, method: str, path: str, body: Any, ok: tuple[int, ...]) -> Any:
        try:
            response = self.http.request(method, path, content=None if body is None else json.dumps(body),
                                         headers={"Content-Type": "application/json"})
        except httpx.HTTPError as exc:
            raise RetriableSinkError(f"search {method} {path}: {exc}") from exc
        if response.status_code in ok:
            return None
        if response.status_code in RETRIABLE_STATUS:
            raise RetriableSinkError(f"search {method} {path}: {response.status_code} {response.text[:300]}")
        if response.status_code >= 400:
            raise SearchRefused(response.status_code, f"search {method} {path}: {response.status_code} "
                                                      f"{response.text[:300]}")
        return json.loads(response.content) if response.content else None

    def create_index(self, spec: EntitySpec, name: str, alias: str | None = None,
                     types: Mapping[str, ColumnType] | None = None) -> None:
        settings = {"index": {"gc_deletes": GC_DELETES, "number_of_replicas": 0,
                              "refresh_interval": self.refresh_interval}}
        aliases = {alias: {"is_write_index": True}} if alias else {}
        mappings = mappings_for(spec, types or {})
        self._call("PUT", _path(name), {"settings": settings, "mappings": mappings, "aliases": aliases})

    def _ensure_mapped(self, spec: EntitySpec, types: Mapping[str, ColumnType]) -> None:
        """Fields of a new schema version get their derived mapping before the first document carries them
        (the engine would otherwise guess from the first value it sees)."""
        if spec.name not in self._mapped:
            self._mapped[spec.name] = self._fields_mapped(spec)
        known = self._mapped[spec.name]
        new = {n: t for n, t in types.items() if n not in known}
        if not new:
            return
        body = {"properties": {k: v for k, v in mappings_for(spec, new)["properties"].items()
                               if source_name(k, RESERVED) in new}}
        self._call("PUT", f"{self._index_path(spec)}/_mapping", body)
        known.update(new)

    def _fields_mapped(self, spec: EntitySpec) -> set[str]:
        """The source names of the fields the index already maps: a field's type cannot change in place, so
        those are never put again (an index made by an earlier version keeps its narrower integer types)."""
        response = self.http.get(f"{self._index_path(spec)}/_mapping")
        if response.status_code == 404:
            return set()
        response.raise_for_status()
        fields: set[str] = set()
        for index in response.json().values():
            fields.update(source_name(k, RESERVED) for k in (index.get("mappings", {}).get("properties") or {}))
        return fields

    def _create_index(self, spec: EntitySpec) -> None:
        """Stores write to the alias ``<index>``; the physical index behind it can be rebuilt and swapped."""
        if self._exists(spec):  # true for an alias too
            # A changed `search_refresh_interval` applies to indexes made before it, too.
            self._call("PUT", f"{self._index_path(spec)}/_settings",
                       {"index": {"refresh_interval": self.refresh_interval}})
            return
        self.create_index(spec, f"{index_name(spec)}-000001", alias=index_name(spec))

    def rebuild_targets(self) -> dict[str, str]:
        """entity → the new physical index a running rebuild fills (`changeflow rebuild search`)."""
        now = time.monotonic()
        if now - self._targets_read_at > 1.0:
            self._targets_read_at = now
            try:
                found = self._call("POST", f"{_path(self.rebuilds_index)}/_search", {"size": 100}, ok=(404,))
            except SearchRefused as exc:
                raise FatalSinkError(str(exc)) from exc
            hits = found["hits"]["hits"] if found is not None else []
            self._targets = {h["_id"]: h["_source"]["target"] for h in hits}
        return self._targets

    def setup(self, known: Mapping[str, Any] | None = None) -> None:
        try:
            for spec in self.pipeline.stored_in(self.name):
                self._create_index(spec)
        except SearchRefused as exc:
            if exc.status == 400 and "resource_already_exists" in str(exc):
                return
            raise FatalSinkError(str(exc)) from exc

    def _actions(self, records: Sequence[ChangeRecord]) -> Iterator[dict[str, Any]]:
        """The bulk actions; ``self._owners`` gets, per action, the index of its record in ``records``
        (None for the applied-through markers), so each bulk item is traced back to its record."""
        self._owners = []
        searchable = [(i, r) for i, r in enumerate(records) if config(self.pipeline.entities[r.entity]) is not None]
        for entity, (version, ts_ms) in applied_through([r for _, r in searchable]).items():
            self._owners.append(None)
            yield {
                "_op_type": "index", "_index": self.applied_index, "_id": entity, "version": version,
                "version_type": "external", "_source": {"entity": entity, "version": version, "ts_ms": ts_ms},
            }
        targets = self.rebuild_targets()
        for i, record in searchable:
            spec = self.pipeline.entities[record.entity]
            if record.entity in targets:
                self._owners.append(i)
                yield from self._record_actions(record, targets[record.entity])
            self._owners.append(i)
            yield from self._record_actions(record, index_name(spec))

    def _record_actions(self, record: ChangeRecord, index: str) -> Iterator[dict[str, Any]]:
        identifier = doc_id(record.key)
        action: dict[str, Any] = {"_index": index, "_id": identifier, "version": record.version,
                                  "version_type": "external"}
        if record.after is None:
            action["_op_type"] = "delete"
        else:
            action["_op_type"] = "index"
            # Serialised by ``bulk_body`` with changeflow's JSON rules (exact decimals), for either engine.
            document = stored_row(record.after, RESERVED)
            action["_source"] = document if identifier == record.key else {**document, KEY_FIELD: record.key}
        yield action

    def _bulk(self, actions: Sequence[dict[str, Any]]) -> list[tuple[str, int | None, Any]]:
        """Each action's (op type, status, error), in order, from ``_bulk`` requests of ``BULK_ACTIONS``.

        Written by hand rather than with the clients' bulk helpers, measured (py-spy on the search sink
        process of a 300k-change backlog): the helper serialised every action separately and the client
        parsed the whole response, ids and versions of every item, with the exact JSON parser: 40 % of
        the sink's CPU. Here the NDJSON body is joined once, the engine returns only each item's status
        and error (``filter_path``, which also spares its own serialisation) and orjson parses that
        (the items carry no values of the data). The same request suits both engines.
        """
        results: list[tuple[str, int | None, Any]] = []
        for start in range(0, len(actions), BULK_ACTIONS):
            chunk = actions[start : start + BULK_ACTIONS]
            try:
                response = self.http.post("/_bulk", content=bulk_body(chunk), params={"filter_path": BULK_FILTER},
                                          headers={"Content-Type": "application/x-ndjson"})
            except httpx.HTTPError as exc:
                raise RetriableSinkError(f"search: bulk request failed: {exc}") from exc
            if response.status_code in RETRIABLE_STATUS:
                raise RetriableSinkError(f"search: bulk answered {response.status_code}: {response.text[:500]}")
            if response.status_code >= 400:
                raise FatalSinkError(f"search: bulk refused ({response.status_code}): {response.text[:500]}")
            try:
                items = orjson.loads(response.content).get("items") or []
                for item in items:
                    op_type, result = next(iter(item.items()))
                    results.append((op_type, result.get("status"), result.get("error")))
            except (ValueError, AttributeError, StopIteration) as exc:
                raise RetriableSinkError(f"search: unreadable bulk answer: {response.text[:300]!r}") from exc
        return results

    def fetch_current(self, entity: str, keys: list[str]) -> dict[str, dict[str, Any]]:
        spec = self.pipeline.entities[entity]
        if config(spec) is None or not keys:
            return {}
        ids = [doc_id(k) for k in keys]
        try:
            found = self._call("POST", f"{self._index_path(spec)}/_mget", {"ids": ids}, ok=(404,))
        except SearchRefused as exc:
            raise FatalSinkError(str(exc)) from exc
        if found is None:
            return {}
        return dict(key_of(d["_id"], d["_source"]) for d in found["docs"] if d.get("found"))

    def write_batch(self, records: Sequence[ChangeRecord]) -> list[Rejected]:
        if not records:
            return []
        newest: dict[str, Any] = {}
        for r in records:
            if r.schema is not None and (r.entity not in newest or r.schema.version > newest[r.entity].version):
                newest[r.entity] = r.schema
        try:
            for entity, sv in newest.items():
                spec = self.pipeline.entities[entity]
                if config(spec) is not None:
                    self._ensure_mapped(spec, sv.columns)
        except SearchRefused as exc:
            raise FatalSinkError(str(exc)) from exc
        actions = list(self._actions(records))
        owners = self._owners
        results = self._bulk(actions)
        if len(results) != len(actions):
            raise RetriableSinkError(f"search: bulk answered {len(results)} of {len(actions)} actions")
        failures: list[tuple[int | None, str | None, str | None]] = []
        throttled = 0
        rejected: dict[int, Rejected] = {}
        for (op_type, status, error), action, owner in zip(results, actions, owners, strict=True):
            outcome, reason = classify_item(op_type, status, error)
            if outcome == "ok":
                continue
            if outcome == "retry":
                throttled += 1
            elif outcome == "rejected" and owner is not None:
                rejected.setdefault(owner, Rejected(records[owner], f"search index {action['_index']}: {reason}"))
                continue
            failures.append((status, action.get("_id"), reason))
        if failures:
            if throttled == len(failures):
                raise RetriableSinkError(f"search: {len(failures)} documents throttled: {failures[:3]}")
            raise FatalSinkError(f"search rejected {len(failures)} documents: {failures[:3]}")
        return [rejected[i] for i in sorted(rejected)]

    # --- the tools ----------------------------------------------------------------------------------
    def _index_path(self, spec: EntitySpec) -> str:
        return _path(index_name(spec))

    def scan(self, spec: EntitySpec) -> Iterator[tuple[str, dict[str, Any], int | None]]:
        yield from self._scroll(spec, {"match_all": {}})

    def _scroll(self, spec: EntitySpec, query: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any], int | None]]:
        index = self._index_path(spec)
        self.http.post(f"{index}/_refresh")
        response = self.http.post(
            f"{index}/_search", params={"scroll": "2m"},
            json={"size": BATCH, "version": True, "sort": ["_doc"], "query": query},
        )
        if response.status_code == 404:
            return
        response.raise_for_status()
        body = response.json()
        scroll_id = body.get("_scroll_id")
        try:
            while body["hits"]["hits"]:
                for hit in body["hits"]["hits"]:
                    key, row = key_of(hit["_id"], hit.get("_source") or {})
                    yield key, row, hit.get("_version")
                response = self.http.post("/_search/scroll", json={"scroll": "2m", "scroll_id": scroll_id})
                response.raise_for_status()
                body = response.json()
                scroll_id = body.get("_scroll_id", scroll_id)
        finally:
            if scroll_id:
                self.http.request("DELETE", "/_search/scroll", json={"scroll_id": [scroll_id]})

    def fetch(self, spec: EntitySpec, keys: list[str]) -> dict[str, Versioned]:
        out: dict[str, Versioned] = {}
        for i in range(0, len(keys), BATCH):
            ids = [doc_id(k) for k in keys[i : i + BATCH]]
            response = self.http.post(f"{self._index_path(spec)}/_mget", json={"ids": ids})
            if response.status_code == 404:
                return out
            response.raise_for_status()
            for doc in response.json()["docs"]:
                if doc.get("found"):
                    key, row = key_of(doc["_id"], doc["_source"])
                    out[key] = Versioned(row, doc.get("_version"))
        return out

    def count(self, spec: EntitySpec) -> int:
        index = self._index_path(spec)
        self.http.post(f"{index}/_refresh")
        response = self.http.get(f"{index}/_count")
        if response.status_code == 404:
            return 0
        response.raise_for_status()
        return int(response.json()["count"])

    def delete(self, spec: EntitySpec, keys: list[str]) -> None:
        for key in keys:
            response = self.http.delete(doc_path(index_name(spec), doc_id(key)))
            if response.status_code not in (200, 404):
                response.raise_for_status()
        self.http.post(f"{self._index_path(spec)}/_refresh")

    def versions(self, spec: EntitySpec, keys: list[str]) -> dict[str, int]:
        return {k: v.version for k, v in self.fetch(spec, keys).items() if v.version is not None}

    def drop_versions_above(self, spec: EntitySpec, keys: list[str], position: int) -> list[str]:
        """A document versioned beyond the source position would outrank every future change; the engine
        keeps a deleted document's version for ``gc_deletes``, so it cannot be lowered from here."""
        ahead = [k for k, v in self.versions(spec, keys).items() if v > position]
        if ahead:
            raise UnrepairableError(
                f"search {index_name(spec)}: documents {ahead[:5]} carry versions beyond the source position "
                f"{position}; the index keeps that version for gc_deletes, reindex them to repair"
            )
        return []

    # --- erasure (changeflow.erasure) ---------------------------------------------------------------
    def indexes(self, spec: EntitySpec) -> list[str]:
        """Every physical index the entity's name leads to: each one behind its alias (a rebuild swaps in a new
        one; an alias may span several), the concrete index of that name from before aliases, and the target
        of a rebuild in progress."""
        alias = index_name(spec)
        behind = self._call("GET", f"/_alias/{urllib.parse.quote(alias, safe='')}", ok=(404,))
        names = set(behind or {})
        if not names and self._exists(spec):
            names.add(alias)
        target = self.rebuild_targets().get(spec.name)
        if target is not None and self.http.head(_path(target)).status_code == 200:
            names.add(target)
        return sorted(names)

    def keys_where(self, spec: EntitySpec, column: str, values: Sequence[str]) -> list[str]:
        """A lenient ``match`` per value (a text field matches its words, a number field ignores what is no
        number), then each hit's source value compared as text: exactly the documents whose value it is."""
        wanted = set(values)
        field = stored_name(column, RESERVED)
        found: set[str] = set()
        ordered = sorted(wanted)
        for i in range(0, len(ordered), 500):
            query = {"bool": {"minimum_should_match": 1, "should": [
                {"match": {field: {"query": v, "lenient": True, "operator": "and"}}} for v in ordered[i : i + 500]]}}
            for key, row, _version in self._scroll(spec, query):
                if row.get(column) is not None and str(row[column]) in wanted:
                    found.add(key)
        return sorted(found)

    def _held(self, index: str, keys: list[str], keep: Mapping[str, int] | None
              ) -> list[tuple[str, dict[str, Any]]]:
        """(key, the document's metadata) of each of ``keys`` the index holds that ``forget`` removes: read by
        ``_mget``, which is real-time (no refresh needed); a kept key's document only while it is older."""
        out: list[tuple[str, dict[str, Any]]] = []
        for i in range(0, len(keys), BATCH):
            chunk = keys[i : i + BATCH]
            found = self._call("POST", f"{_path(index)}/_mget", {"ids": [doc_id(k) for k in chunk]}, ok=(404,))
            for key, doc in zip(chunk, (found or {}).get("docs") or [], strict=False):
                if not doc.get("found"):
                    continue
                if keep and key in keep and int(doc.get("_version") or 0) >= keep[key]:
                    continue
                out.append((key, doc))
        return out

    def traces(self, spec: EntitySpec, keys: list[str], keep: Mapping[str, int] | None = None) -> int:
        """Documents of the keys in every index behind the alias. The engine's own memory of a delete (the
        document's id and version, no field of it, for ``index.gc_deletes``) has no API to read it by id:
        not counted, and not removed by ``forget`` (it expires by itself)."""
        return sum(len(self._held(index, keys, keep)) for index in self.indexes(spec)) if keys else 0

    def forget(self, spec: EntitySpec, keys: list[str], keep: Mapping[str, int] | None = None) -> list[str]:
        """Deletes by id in each index behind the alias (not through the alias, which writes to one index),
        then a refresh, so a search finds nothing of them when this returns. A kept key's older document is
        deleted only while it is still the one held (``if_seq_no``): a newer write in between stays."""
        done: list[str] = []
        for index in self.indexes(spec):
            held = self._held(index, keys, keep)
            if not held:
                continue
            lines: list[bytes] = []
            for key, doc in held:
                meta: dict[str, Any] = {"_index": index, "_id": doc_id(key)}
                if keep and key in keep:
                    meta |= {"if_seq_no": doc["_seq_no"], "if_primary_term": doc["_primary_term"]}
                lines.append(orjson.dumps({"delete": meta}))
            for start in range(0, len(lines), BULK_ACTIONS):
                response = self.http.post("/_bulk", content=b"\n".join([*lines[start : start + BULK_ACTIONS], b""]),
                                          params={"filter_path": BULK_FILTER},
                                          headers={"Content-Type": "application/x-ndjson"})
                if response.status_code >= 400:
                    raise SearchRefused(response.status_code, f"search: delete in {index} refused "
                                                              f"({response.status_code})")
                for item in orjson.loads(response.content).get("items") or []:
                    status = next(iter(item.values())).get("status")
                    if status not in (200, 404, 409):  # 409: a kept key written anew meanwhile
                        raise SearchRefused(int(status or 0), f"search: a delete in {index} answered {status}")
            self._call("POST", f"{_path(index)}/_refresh")
            done.append(f"search {index}: {len(held)} documents deleted")
        return done

    def expunge(self, spec: EntitySpec) -> tuple[str, float | None]:
        """``_forcemerge?only_expunge_deletes=true`` on every index behind the alias, waited for. The merge policy
        skips a segment whose deleted share is under ``expunge_deletes_allowed`` (10 % by default): it is set to
        0 for the merge, then given back."""
        indexes = self.indexes(spec)
        setting = "index.merge.policy.expunge_deletes_allowed"
        retained = 0
        for index in indexes:
            self._call("PUT", f"{_path(index)}/_settings", {setting: 0})
            try:
                self._call("POST", f"{_path(index)}/_forcemerge?only_expunge_deletes=true")
            finally:
                self._call("PUT", f"{_path(index)}/_settings", {setting: None})
            stats = self._call("GET", f"{_path(index)}/_stats/docs")
            retained += int(stats["_all"]["primaries"]["docs"]["deleted"])
        done = f"search: forcemerge only_expunge_deletes on {', '.join(indexes) or 'no index'}"
        if not retained:
            return done, None
        # Soft-deleted documents the shard's history retention lease still covers survive a merge (measured on
        # OpenSearch 2.19: the lease moves on at its next background sync, about 30 s later).
        return (f"{done}; {retained} deleted documents (of any key) still retained by the shard's history retention "
                f"lease: expunge again in {RETENTION_SYNC_S:.0f} s", RETENTION_SYNC_S)

    def applied_through(self) -> dict[str, int]:
        response = self.http.post(f"/{self.applied_index}/_search", json={"size": 1000})
        if response.status_code == 404:
            return {}
        response.raise_for_status()
        return {h["_id"]: int(h["_source"]["version"]) for h in response.json()["hits"]["hits"]}

    def drop_entity(self, spec: EntitySpec) -> list[str]:
        """The entity's alias (or index) and every physical index behind it (rebuilds make new ones)."""
        done: list[str] = []
        response = self.http.get(f"/_alias/{urllib.parse.quote(index_name(spec), safe='')}")
        names = sorted(response.json()) if response.status_code == 200 else []
        if not names and self.http.head(self._index_path(spec)).status_code == 200:
            names = [index_name(spec)]
        for name in names:
            if self.http.delete("/" + urllib.parse.quote(name, safe="")).status_code == 200:
                done.append(f"search: index {name} deleted")
        return done

    def purge(self) -> list[str]:
        done: list[str] = []
        for spec in self.pipeline.stored_in(self.name):
            done += self.drop_entity(spec)
        if self.http.delete("/" + urllib.parse.quote(self.applied_index, safe="")).status_code == 200:
            done.append(f"search: index {self.applied_index} deleted")
        return done

    # --- what a reader sees now (the bench's freshness and snapshot figures) -----------------------------
    visibility_poll_s = 0.05
    visibility_batch = 10_000

    def visible(self, spec: EntitySpec, keys: list[str]) -> set[str]:
        """The keys a search finds: a ``_search`` (what users query, so after the index refresh), not a GET."""
        ids = {doc_id(k): k for k in keys}
        found = self._call("POST", f"{self._index_path(spec)}/_search",
                           {"size": len(ids), "_source": False, "query": {"ids": {"values": list(ids)}}}, ok=(404,))
        return {ids[h["_id"]] for h in (found["hits"]["hits"] if found else []) if h["_id"] in ids}

    def visible_count(self, spec: EntitySpec) -> int:
        """Documents a search counts now (``_count`` without a refresh of its own)."""
        found = self._call("GET", f"{self._index_path(spec)}/_count", ok=(404,))
        return int(found["count"]) if found else 0

    # --- rebuild (sinks.rebuild): a new physical index beside the live one, then an atomic alias swap ---
    def begin_rebuild(self, spec: EntitySpec, types: Mapping[str, ColumnType]) -> str:
        """Create the new index and register it, so every write of the entity goes to both from now on;
        returns its name."""
        self.setup()
        target = f"{index_name(spec)}-{datetime.now(UTC):%Y%m%d%H%M%S%f}"
        self.create_index(spec, target, types=types)
        self._call("PUT", f"{doc_path(self.rebuilds_index, spec.name)}?refresh=true", {"target": target})
        # The sink re-reads the rebuild registry every second: wait before the snapshot starts so that no
        # change between now and the snapshot reaches only the old index.
        time.sleep(REBUILD_REGISTRY_WAIT_S)
        return target

    def finish_rebuild(self, spec: EntitySpec, target: str) -> None:
        """Point the alias at ``target`` in one request, then drop the index (or indexes) it replaced."""
        alias = index_name(spec)
        current = self._call("GET", f"/_alias/{urllib.parse.quote(alias, safe='')}", ok=(404,))
        actions: list[dict[str, Any]] = [{"add": {"index": target, "alias": alias, "is_write_index": True}}]
        # No alias of that name: `alias` is still a concrete index from before aliases.
        old_indices = list(current or {}) or ([alias] if self._exists(spec) else [])
        if alias in old_indices:  # a concrete index from before aliases: replaced by the alias atomically
            actions.append({"remove_index": {"index": alias}})
        else:
            actions += [{"remove": {"index": old, "alias": alias}} for old in old_indices]
        self._call("POST", "/_aliases", {"actions": actions})
        self._call("DELETE", f"{doc_path(self.rebuilds_index, spec.name)}?refresh=true")
        for old in old_indices:
            if old != alias:
                self._call("DELETE", _path(old))

    def abandon_rebuild(self, spec: EntitySpec, target: str) -> None:
        self._call("DELETE", f"{doc_path(self.rebuilds_index, spec.name)}?refresh=true", ok=(404,))
        self._call("DELETE", _path(target), ok=(404,))

    def _exists(self, spec: EntitySpec) -> bool:
        """The entity's index or alias exists."""
        try:
            status = self.http.head(self._index_path(spec)).status_code
        except httpx.HTTPError as exc:
            raise RetriableSinkError(f"search HEAD {self._index_path(spec)}: {exc}") from exc
        if status in RETRIABLE_STATUS:
            raise RetriableSinkError(f"search HEAD {self._index_path(spec)}: {status}")
        return status == 200

    def close(self) -> None:
        if self._http is not None:
            self._http.close()


class UnrepairableError(RuntimeError):
    """Drift that a snapshot cannot fix and that this tool will not fix behind the store's back."""


class SearchRefused(RuntimeError):
    """The engine refused a request (a status of 400 or more, not a throttling one)."""

    def __init__(self, status: int, message: str) -> None:
        self.status = status
        super().__init__(message)


def _path(index: str) -> str:
    return "/" + urllib.parse.quote(index, safe="")
