"""The search store's rebuild hooks against the real engine (``changeflow rebuild search``'s store half, which used
to be raw httpx calls in sinks/rebuild.py): a new physical index beside the live one, every write going to both
while the rebuild runs, then the alias swapped in one request and the old index dropped; or, on failure, the new
index and its registration removed and the live index untouched."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import yaml

from changeflow.pipelines.load import parse
from changeflow.pipelines.spec import Pipeline
from changeflow.pipelines.types import parse_type
from changeflow.schemas import SchemaVersion, make_version
from changeflow.settings import Settings
from changeflow.sinks.search import SearchStore, index_name
from changeflow.streams.records import ChangeRecord
from tests.integration.conftest import search_url

pytestmark = pytest.mark.integration


@pytest.fixture
def store(live_stack: Settings) -> Iterator[tuple[SearchStore, Pipeline, SchemaVersion]]:
    name = f"rebuild_{uuid.uuid4().hex[:8]}"
    pipeline = parse(yaml.safe_dump({"name": name, "sources": {"postgres": {"database": "x"}},
                                     "entities": {"things": {"table": "public.things"}}}), "rebuild.yml")
    sv = make_version("things", 1, {"id": parse_type("int64"), "name": parse_type("string")}, ("id",))
    store = SearchStore(live_stack, pipeline)
    store.setup({"things": sv})
    try:
        yield store, pipeline, sv
    finally:
        store.purge()
        httpx.delete(f"{search_url(live_stack)}/{name}-rebuilds", timeout=30)
        store.close()


def write(store: SearchStore, sv: SchemaVersion, key: int, version: int, name: str) -> None:
    record = ChangeRecord("postgres", "things", str(key), "u", version, 0, None, {"id": key, "name": name},
                          key_columns=("id",), schema=sv)
    store._targets_read_at = 0.0  # read the rebuild registry now, not within the second
    assert store.write_batch([record]) == []


def docs(settings: Settings, index: str) -> dict[str, Any]:
    httpx.post(f"{search_url(settings)}/{index}/_refresh", timeout=30)
    hits = httpx.post(f"{search_url(settings)}/{index}/_search", json={"size": 100}, timeout=30).json()["hits"]["hits"]
    return {h["_id"]: h["_source"]["name"] for h in hits}


def aliased(settings: Settings, alias: str) -> list[str]:
    return sorted(httpx.get(f"{search_url(settings)}/_alias/{alias}", timeout=30).json())


def test_a_rebuild_fills_a_new_index_beside_the_live_one_then_swaps_the_alias(
    store: tuple[SearchStore, Pipeline, SchemaVersion], live_stack: Settings
) -> None:
    search, pipeline, sv = store
    spec = pipeline.entity("things")
    alias = index_name(spec)
    write(search, sv, 1, 10, "before")
    assert aliased(live_stack, alias) == [f"{alias}-000001"]

    target = search.begin_rebuild(spec, {"id": parse_type("int64"), "name": parse_type("string")})
    assert target.startswith(f"{alias}-2") and target != f"{alias}-000001"
    write(search, sv, 2, 20, "during")  # goes to the live index and to the new one
    assert docs(live_stack, f"{alias}-000001") == {"1": "before", "2": "during"}
    assert docs(live_stack, target) == {"2": "during"}  # the snapshot's re-reads would bring the rest

    search.finish_rebuild(spec, target)
    assert aliased(live_stack, alias) == [target]
    assert httpx.head(f"{search_url(live_stack)}/{alias}-000001", timeout=30).status_code == 404
    assert httpx.get(f"{search_url(live_stack)}/{pipeline.namespace}-rebuilds/_doc/things",
                     timeout=30).json()["found"] is False
    write(search, sv, 3, 30, "after")
    assert docs(live_stack, alias) == {"2": "during", "3": "after"}


def test_an_abandoned_rebuild_leaves_the_live_index_as_it_was(
    store: tuple[SearchStore, Pipeline, SchemaVersion], live_stack: Settings
) -> None:
    search, pipeline, sv = store
    spec = pipeline.entity("things")
    alias = index_name(spec)
    write(search, sv, 1, 10, "kept")
    target = search.begin_rebuild(spec, {})
    search.abandon_rebuild(spec, target)
    assert httpx.head(f"{search_url(live_stack)}/{target}", timeout=30).status_code == 404
    assert aliased(live_stack, alias) == [f"{alias}-000001"]
    write(search, sv, 2, 20, "later")  # no longer written to the abandoned index
    assert docs(live_stack, alias) == {"1": "kept", "2": "later"}
    search.abandon_rebuild(spec, target)  # twice is harmless
