"""The JVM services of the native stack install, start, answer their protocols and stop.

Runs on free ports and a temporary state directory, so it neither needs nor disturbs a running
`changeflow stack`. Needs Java 17+ and Maven (jars come from Maven Central or ~/.m2).
"""

from __future__ import annotations

import asyncio
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from changeflow.deploy.connect import REQUIRED_PLUGINS, ConnectService
from changeflow.deploy.kafka import KafkaService
from changeflow.deploy.search_engine import SearchEngineService
from changeflow.deploy.service import Service
from changeflow.settings import Settings
from tests.integration.conftest import search_url

pytestmark = pytest.mark.integration


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def settings(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    state: Path = tmp_path_factory.mktemp("jvm-state")
    # The search engine's ports are its own settings (CHANGEFLOW_SEARCH_*: deploy/search_engine.py), read by the
    # service and by the search store alike.
    with pytest.MonkeyPatch.context() as env:
        env.setenv("CHANGEFLOW_SEARCH_PORT", str(free_port()))
        env.setenv("CHANGEFLOW_SEARCH_TRANSPORT_PORT", str(free_port()))
        yield Settings(
            state_dir=state,
            kafka_port=free_port(),
            kafka_controller_port=free_port(),
            connect_port=free_port(),
        )


@pytest.fixture(scope="module")
def services(settings: Settings) -> Iterator[dict[str, Service]]:
    kafka: Service = KafkaService(settings)
    connect: Service = ConnectService(settings)
    search: Service = SearchEngineService(settings)
    started: list[Service] = []
    try:
        for service in (kafka, connect, search):
            service.install()
        for service in (kafka, search):  # independent: start together, wait after
            service.start()
            started.append(service)
        for service in (kafka, search):
            service.wait_healthy(180)
            service.after_start()
        connect.start()
        started.append(connect)
        connect.wait_healthy(180)
        yield {"kafka": kafka, "connect": connect, "search": search}
    finally:
        for running in reversed(started):
            running.stop()


def test_install_is_a_fast_no_op_the_second_time(services: dict, capsys: pytest.CaptureFixture[str]) -> None:
    for service in services.values():
        service.install()
    assert "installing" not in capsys.readouterr().out


def test_kafka_serves_aiokafka_producers_and_consumer_groups(services: dict, settings: Settings) -> None:
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

    topic = f"smoke-{uuid.uuid4().hex[:8]}"

    async def roundtrip() -> int:
        producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all")
        await producer.start()
        try:
            for i in range(10):
                await producer.send_and_wait(topic, key=f"k{i}".encode(), value=b"v")
        finally:
            await producer.stop()
        consumer = AIOKafkaConsumer(
            topic,
            bootstrap_servers=settings.kafka_bootstrap,
            group_id="smoke",
            auto_offset_reset="earliest",
            enable_auto_commit=False,
        )
        await consumer.start()
        seen = 0
        try:
            async with asyncio.timeout(60):
                while seen < 10:
                    batches = await consumer.getmany(timeout_ms=1000)
                    seen += sum(len(records) for records in batches.values())
            await consumer.commit()
        finally:
            await consumer.stop()
        return seen

    assert asyncio.run(roundtrip()) == 10


def test_connect_lists_both_debezium_connectors(services: dict, settings: Settings) -> None:
    plugins = httpx.get(f"{settings.connect_url}/connector-plugins", timeout=10).json()
    assert set(REQUIRED_PLUGINS) <= {p["class"] for p in plugins}
    from changeflow.deploy.secrets import replication_password

    password = replication_password(settings)
    assert len(password) >= 24
    assert services["connect"].env()["CHANGEFLOW_PG_REPLICATION_PASSWORD"] == password


def test_search_external_versions_bulk_and_aliases(services: dict, settings: Settings) -> None:
    url = search_url(settings)
    with httpx.Client(base_url=url, timeout=30) as client:
        assert client.put("/smoke_v1", json={"aliases": {"smoke": {}}}).status_code == 200
        lines = [
            '{"index":{"_index":"smoke","_id":"1","version":5,"version_type":"external"}}',
            '{"name":"new"}',
            '{"index":{"_index":"smoke","_id":"1","version":3,"version_type":"external"}}',
            '{"name":"late and older"}',
        ]
        response = client.post(
            "/_bulk",
            params={"refresh": "true"},
            content="\n".join(lines) + "\n",
            headers={"Content-Type": "application/x-ndjson"},
        ).json()
        assert [item["index"]["status"] for item in response["items"]] == [201, 409]
        hits = client.post("/smoke/_search", json={"query": {"match_all": {}}}).json()["hits"]["hits"]
        assert [(h["_id"], h["_source"]["name"]) for h in hits] == [("1", "new")]
        assert client.get("/_cluster/health").json()["status"] == "green"
