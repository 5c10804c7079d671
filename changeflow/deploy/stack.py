"""The native local stack: install, start, check and stop every server changeflow needs.

Services start in dependency order (Kafka before Kafka Connect); the independent ones start
together and are then waited for, because a cold start is dominated by JVM warm-up.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict

from changeflow.deploy import secrets
from changeflow.deploy.clickhouse import ClickHouseService
from changeflow.deploy.connect import ConnectService
from changeflow.deploy.kafka import KafkaService
from changeflow.deploy.postgres import PostgresService
from changeflow.deploy.redis import RedisService
from changeflow.deploy.search_engine import SearchEngineService
from changeflow.deploy.service import Service, ServiceError, ServiceStatus, tail
from changeflow.deploy.worker import WorkerService
from changeflow.settings import Settings


def all_services(settings: Settings) -> list[Service]:
    """In start order; `down` stops them in reverse."""

    return [
        PostgresService(settings),
        RedisService(settings),
        ClickHouseService(settings),
        SearchEngineService(settings),
        KafkaService(settings),
        ConnectService(settings),
    ]


# Services that must be healthy before these names may start.
DEPENDS_ON: dict[str, set[str]] = {"connect": {"kafka"}}


def select(settings: Settings, names: list[str] | None) -> list[Service]:
    services = all_services(settings)
    if not names:
        return services
    unknown = set(names) - {s.name for s in services}
    if unknown:
        raise ServiceError(f"unknown service(s): {', '.join(sorted(unknown))}")
    return [s for s in services if s.name in names]


def up(settings: Settings, names: list[str] | None = None, say: Callable[[str], None] = print) -> list[Service]:
    services = select(settings, names)
    # The erasure key and token (README "Erasure"), generated before any process of the pipeline reads them.
    secrets.erasure_key(settings)
    secrets.erasure_token(settings)
    for service in services:
        started = time.monotonic()
        service.install()
        took = time.monotonic() - started
        if took > 1:
            say(f"installed {service.name} in {took:.0f}s")
    names_selected = {s.name for s in services}
    first = [s for s in services if not DEPENDS_ON.get(s.name, set()) & names_selected]
    waves = [first, [s for s in services if s not in first]]
    for wave in waves:
        fresh: list[Service] = []
        for service in wave:
            if service.running() and service.healthy():
                continue
            say(f"starting {service.name} (log {service.log_file})")
            service.start()
            fresh.append(service)
        for service in wave:
            started = time.monotonic()
            try:
                service.wait_healthy(settings.start_timeout_s)
                service.after_start()
            except ServiceError:
                raise
            except Exception as exc:
                raise ServiceError(
                    f"{service.name} failed: {exc}\n--- last lines of {service.log_file} ---\n"
                    f"{tail(service.log_file)}"
                ) from exc
            if service in fresh:
                say(f"{service.name} healthy in {time.monotonic() - started:.1f}s at {service.url}")
    return services


def down(settings: Settings, names: list[str] | None = None, say: Callable[[str], None] = print) -> None:
    for service in reversed(select(settings, names)):
        if service.stop():
            say(f"stopped {service.name}")


def status(settings: Settings) -> list[ServiceStatus]:
    """Every service, then the worker: any worker answering on the web port, whoever started it."""

    return [*(s.status() for s in all_services(settings)), WorkerService(settings).status()]


def status_dicts(settings: Settings) -> list[dict[str, object]]:
    return [asdict(s) for s in status(settings)]
