"""Search index projection, for Elasticsearch (docker-compose) and OpenSearch (the native stack).

Both engines speak the same REST API for what we use, but each official client refuses or mistreats
the other engine (elasticsearch-py's product check), so the engine is detected once from ``GET /`` and
the matching official client and its bulk helper are used.

Writes use external versioning with the canonical ``version``: the engine itself rejects a record that
is not newer (409, counted as already applied). Deletes are versioned too and kept for
``index.gc_deletes``, so a late, older update cannot resurrect a deleted document.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import httpx

from sinks.base import FatalSinkError, RetriableSinkError, applied_through, fill_partials
from streams import json
from streams.entities import ENTITIES, EntitySpec
from streams.records import ChangeRecord

if TYPE_CHECKING:
    from changeflow.settings import Settings

GC_DELETES = "7d"
# One document per entity holding the highest version applied, written with that version as its
# external version, so the marker itself only ever moves forward.
APPLIED_INDEX = "changeflow-applied"
# entity → target index of a rebuild in progress; while a document is here every write of that entity
# also goes to the target, under the same external version.
REBUILDS_INDEX = "changeflow-rebuilds"
RETRIABLE_STATUS = {429, 502, 503, 504}


def detect_engine(url: str) -> str:
    """'opensearch' or 'elasticsearch', from the root endpoint's version block."""
    try:
        info = httpx.get(url, timeout=5).json()
    except (httpx.HTTPError, ValueError) as exc:
        raise RetriableSinkError(f"search engine at {url} unavailable: {exc}") from exc
    return "opensearch" if info.get("version", {}).get("distribution") == "opensearch" else "elasticsearch"


def make_client(url: str, engine: str) -> Any:
    if engine == "opensearch":
        from opensearchpy import OpenSearch
        from opensearchpy.serializer import JSONSerializer

        class OrjsonSerializer(JSONSerializer):
            """changeflow's JSON (orjson; exact decimals as strings, ISO-8601 UTC times) for every request:
            the bulk helper serialises each action and document, and the standard ``json`` module was
            the largest part of the search sink's time."""

            def dumps(self, data: Any) -> Any:
                return data if isinstance(data, str) else json.dumps(data).decode()

            def loads(self, s: str) -> Any:
                return json.loads(s)

        return OpenSearch(hosts=[url], timeout=30, serializer=OrjsonSerializer())
    from elasticsearch import Elasticsearch

    return Elasticsearch(url, request_timeout=30)


def document(record: ChangeRecord) -> dict[str, Any]:
    """The row as JSON-native values (decimals as strings, times as ISO-8601), whatever the client's serialiser."""
    return json.loads(json.dumps(record.after))  # type: ignore[no-any-return,unused-ignore]


class SearchSink:
    name = "search"

    def __init__(self, settings: Settings) -> None:
        self.url = settings.search_url
        self.refresh_interval = settings.search_refresh_interval
        self._engine: str | None = None
        self._client: Any = None
        self._targets: dict[str, str] = {}
        self._targets_read_at = 0.0

    @property
    def client(self) -> Any:
        if self._client is None:
            self._engine = detect_engine(self.url)
            self._client = make_client(self.url, self._engine)
        return self._client

    def create_index(self, spec: EntitySpec, name: str, alias: str | None = None) -> None:
        settings = {"index": {"gc_deletes": GC_DELETES, "number_of_replicas": 0,
                              "refresh_interval": self.refresh_interval}}
        aliases = {alias: {"is_write_index": True}} if alias else {}
        if self._engine == "opensearch":
            body = {"settings": settings, "mappings": spec.search_mappings, "aliases": aliases}
            self.client.indices.create(index=name, body=body)
        else:
            self.client.indices.create(index=name, settings=settings, mappings=spec.search_mappings, aliases=aliases)

    def _create_index(self, spec: EntitySpec) -> None:
        """Stores write to the alias ``<index>``; the physical index behind it can be rebuilt and swapped."""
        assert spec.search_index is not None
        if self.client.indices.exists(index=spec.search_index):  # true for an alias too
            # A changed `search_refresh_interval` applies to indexes made before it, too.
            wanted = {"index": {"refresh_interval": self.refresh_interval}}
            if self._engine == "opensearch":
                self.client.indices.put_settings(index=spec.search_index, body=wanted)
            else:
                self.client.indices.put_settings(index=spec.search_index, settings=wanted)
            return
        self.create_index(spec, f"{spec.search_index}-000001", alias=spec.search_index)

    def rebuild_targets(self) -> dict[str, str]:
        """entity → the new physical index a running rebuild fills (`changeflow rebuild search`)."""
        now = time.monotonic()
        if now - self._targets_read_at > 1.0:
            self._targets_read_at = now
            try:
                if self._engine == "opensearch":
                    found = self.client.search(index=REBUILDS_INDEX, body={"size": 100})
                else:
                    found = self.client.search(index=REBUILDS_INDEX, size=100)
                self._targets = {h["_id"]: h["_source"]["target"] for h in found["hits"]["hits"]}
            except Exception as exc:
                if _status(exc) != 404:
                    raise _classify(exc) from exc
                self._targets = {}
        return self._targets

    def setup(self) -> None:
        try:
            for spec in ENTITIES.values():
                if spec.search_index is not None:
                    self._create_index(spec)
        except Exception as exc:
            if _status(exc) == 400 and "resource_already_exists" in str(exc):
                return
            raise _classify(exc) from exc

    def _actions(self, records: Sequence[ChangeRecord]) -> Iterator[dict[str, Any]]:
        searchable = [r for r in records if ENTITIES[r.entity].search_index is not None]
        for entity, (version, ts_ms) in applied_through(searchable).items():
            yield {
                "_op_type": "index", "_index": APPLIED_INDEX, "_id": entity, "version": version,
                "version_type": "external", "_source": {"entity": entity, "version": version, "ts_ms": ts_ms},
            }
        targets = self.rebuild_targets()
        for record in records:
            spec = ENTITIES[record.entity]
            if spec.search_index is None:
                continue
            if record.entity in targets:
                yield from self._record_actions(record, targets[record.entity])
            yield from self._record_actions(record, spec.search_index)

    def _record_actions(self, record: ChangeRecord, index: str) -> Iterator[dict[str, Any]]:
        action: dict[str, Any] = {"_index": index, "_id": record.key, "version": record.version,
                                  "version_type": "external"}
        if record.after is None:
            action["_op_type"] = "delete"
        else:
            action["_op_type"] = "index"
            # The OpenSearch client serialises with changeflow's JSON rules already; elasticsearch-py's own
            # serialiser would write decimals as floats, so its documents are converted first.
            action["_source"] = record.after if self._engine == "opensearch" else document(record)
        yield action

    def fetch_current(self, entity: str, keys: list[str]) -> dict[str, dict[str, Any]]:
        spec = ENTITIES[entity]
        if spec.search_index is None or not keys:
            return {}
        try:
            if self._engine == "opensearch":
                found = self.client.mget(index=spec.search_index, body={"ids": keys})
            else:
                found = self.client.mget(index=spec.search_index, ids=keys)
        except Exception as exc:
            if _status(exc) == 404:
                return {}
            raise _classify(exc) from exc
        return {d["_id"]: d["_source"] for d in found["docs"] if d.get("found")}

    def write_batch(self, records: Sequence[ChangeRecord]) -> None:
        if not records:
            return
        client = self.client
        records = fill_partials(records, self.fetch_current)
        if self._engine == "opensearch":
            from opensearchpy import helpers
        else:
            from elasticsearch import helpers  # type: ignore[no-redef]
        try:
            _, errors = helpers.bulk(
                client, self._actions(records), raise_on_error=False, raise_on_exception=True, chunk_size=2000
            )
        except Exception as exc:
            raise _classify(exc) from exc
        failures = []
        for item in errors:
            result = next(iter(item.values()))
            status = result.get("status")
            if status == 409:
                continue  # the index already holds this or a newer version: idempotent no-op
            if status == 404 and next(iter(item)) == "delete":
                continue  # deleting what was never indexed: the versioned tombstone is still written
            failures.append((status, result.get("_id"), result.get("error")))
        if failures:
            if all(status in RETRIABLE_STATUS for status, _, _ in failures):
                raise RetriableSinkError(f"search: {len(failures)} documents throttled: {failures[:3]}")
            raise FatalSinkError(f"search rejected {len(failures)} documents: {failures[:3]}")

    def close(self) -> None:
        if self._client is not None:
            self._client.close()


def _status(exc: Exception) -> int | None:
    status = getattr(exc, "status_code", None) or getattr(exc, "status", None)
    meta = getattr(exc, "meta", None)
    if status is None and meta is not None:
        status = getattr(meta, "status", None)
    return status if isinstance(status, int) else None


def _classify(exc: Exception) -> Exception:
    status = _status(exc)
    if status is None or status in RETRIABLE_STATUS:
        return RetriableSinkError(f"search: {exc}")
    return FatalSinkError(f"search: {exc}")
