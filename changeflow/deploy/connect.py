"""Kafka Connect 4.3.1 in distributed mode, with the Debezium 3.5.0.Final PostgreSQL and MongoDB
source connectors as plugins.

Why this shape:
- Distributed mode (not standalone): connectors are created, changed and deleted through the REST API
  (``connectors/`` applies its files there), and their configs, offsets and statuses live in Kafka
  topics, so a restart resumes where it stopped. One worker; every internal topic has RF 1.
- Same Kafka version as the broker (``changeflow/deploy/kafka.py``); the worker's jars come from Maven Central
  (``changeflow/deploy/jvm/connect/pom.xml``).
- Debezium 3.5.0.Final: the newest 3.x release of which Maven Central serves BOTH connectors here
  (3.6.x and 3.7.x of ``debezium-connector-mongodb`` are not served; PostgreSQL 3.7.0 would be). One
  version for both keeps one set of config names and one envelope format. Each connector gets its own
  directory on ``plugin.path`` (``changeflow/deploy/jvm/debezium-*/pom.xml``) so Connect loads it in an isolated
  class loader; the jars the worker provides (``org.apache.kafka:*``, SLF4J, the compression codecs)
  are left out, as Debezium's own plugin archives do, and so is Jackson core (see PROVIDED_GROUP_IDS).
- Converters: JSON with schemas enabled for keys and values, Debezium's default envelope
  (``{"schema": ..., "payload": {"before", "after", "source", "op", "ts_ms"}}``). The schema part is
  what lets a decoder tell a ``Decimal`` (base64 bytes) or a ``MicroTimestamp`` from a plain number
  without a schema registry, which this project's registries do not offer (Confluent's is not served).
- Secrets by reference, and nothing else: ``config.providers`` ``env`` (EnvVarConfigProvider), ``file``
  (FileConfigProvider, a key of a properties file) and ``dir`` (DirectoryConfigProvider, a whole file).
  A connector file says ``${env:CHANGEFLOW_PG_REPLICATION_PASSWORD}``; the worker gets that variable from
  ``deploy.secrets.replication_password`` (``env()``). A pipeline's ``${file:/dir/name}`` is rendered as
  ``${dir:/dir:name}`` (``changeflow/connectors/render.py``). Whoever can create a connector could otherwise read any
  file or environment variable of the worker through a connector config (the validate endpoint echoes
  resolved values), so: ``env`` resolves only ``CHANGEFLOW_.*`` (``allowlist.pattern``), ``file`` and
  ``dir`` only paths inside ``<state>/secrets/`` (``allowed.paths``); a reference outside stays unresolved.
- ``connector.client.config.override.policy=None``: a connector config cannot override the worker's
  producer/consumer/admin client settings (bootstrap servers, security, interceptors).
- ``plugin.discovery=service_load``: Debezium 3 and Kafka's own plugins ship ServiceLoader manifests, so
  the worker skips scanning every class of every jar at start (seconds on 2 cores).

Layout under ``<state>/connect/``: ``lib/`` (worker jars), ``plugins/<connector>/`` (plugin jars),
``config/`` (connect-distributed.properties, log4j2.properties).
"""

from __future__ import annotations

import os
from pathlib import Path

import httpx

from changeflow.deploy.jvm import (
    BASE_JVM_OPTS,
    JVM_DIR,
    check_java,
    fingerprint,
    installed,
    java_bin,
    maven_copy_dependencies,
    properties,
    say,
    write_if_changed,
)
from changeflow.deploy.kafka import KAFKA_VERSION, LOG4J2
from changeflow.deploy.secrets import replication_password
from changeflow.deploy.service import Service, private_dir

DEBEZIUM_VERSION = "3.5.0.Final"
WORKER_POM = JVM_DIR / "connect" / "pom.xml"
# plugin directory name -> the POM whose runtime dependencies fill it
PLUGIN_POMS: dict[str, Path] = {
    "debezium-connector-postgres": JVM_DIR / "debezium-postgres" / "pom.xml",
    "debezium-connector-mongodb": JVM_DIR / "debezium-mongodb" / "pom.xml",
}
# Provided by the worker's class path; a second copy inside a plugin only invites conflicts. Jackson in
# particular: Debezium's converters call the worker's JsonConverter with Jackson types, which fails
# ("NoSuchMethodException ... convertToConnect(Schema, JsonNode)") when the plugin has its own copy.
PROVIDED_GROUP_IDS = (
    "org.apache.kafka",
    "org.slf4j",
    "org.lz4",
    "org.xerial.snappy",
    "com.github.luben",
    "com.fasterxml.jackson.core",
)

REQUIRED_PLUGINS = (
    "io.debezium.connector.postgresql.PostgresConnector",
    "io.debezium.connector.mongodb.MongoDbConnector",
)
# The environment variable a connector file names as ${env:...} for the replication password.
PG_PASSWORD_ENV = "CHANGEFLOW_PG_REPLICATION_PASSWORD"

# What the env provider may read: the variables changeflow sets (compose: the same pattern).
ENV_ALLOWLIST = "CHANGEFLOW_.*"
CONFIG_PROVIDER_CLASSES = {
    "env": "org.apache.kafka.common.config.provider.EnvVarConfigProvider",
    "file": "org.apache.kafka.common.config.provider.FileConfigProvider",
    "dir": "org.apache.kafka.common.config.provider.DirectoryConfigProvider",
}

CONNECT_HEAP = "768m"
GROUP_ID = "changeflow-connect"


class ConnectService(Service):
    name = "connect"

    # -- locations ---------------------------------------------------------------------------------
    @property
    def lib_dir(self) -> Path:
        return self.home / "lib"

    @property
    def plugin_dir(self) -> Path:
        return self.home / "plugins"

    @property
    def config_dir(self) -> Path:
        return self.home / "config"

    @property
    def marker(self) -> Path:
        return self.home / "installed"

    @property
    def secrets_dir(self) -> Path:
        """The one folder whose files ``${file:...}``/``${dir:...}`` references may read."""
        return self.settings.state / "secrets"

    @property
    def url(self) -> str:
        return self.settings.connect_url

    def ports(self) -> list[int]:
        return [self.settings.connect_port]

    # -- install -----------------------------------------------------------------------------------
    def _stamp(self) -> str:
        return fingerprint([WORKER_POM, *PLUGIN_POMS.values()], *PROVIDED_GROUP_IDS)

    def install(self) -> None:
        stamp = self._stamp()
        complete = any(self.lib_dir.glob("connect-runtime-*.jar")) and all(
            any((self.plugin_dir / name).glob("*.jar")) for name in PLUGIN_POMS
        )
        if installed(self.marker, stamp) and complete:
            return
        check_java()
        say(f"installing Kafka Connect {KAFKA_VERSION} with Debezium {DEBEZIUM_VERSION} into {self.home}")
        maven_copy_dependencies(WORKER_POM, self.lib_dir, label=f"Kafka Connect {KAFKA_VERSION}")
        for name, pom in PLUGIN_POMS.items():
            maven_copy_dependencies(
                pom, self.plugin_dir / name, exclude_group_ids=PROVIDED_GROUP_IDS, label=f"plugin {name}"
            )
        self.marker.write_text(stamp + "\n")

    # -- configuration -----------------------------------------------------------------------------
    def worker_properties(self) -> dict[str, object]:
        s = self.settings
        return {
            "bootstrap.servers": s.kafka_bootstrap,
            "group.id": GROUP_ID,
            "listeners": f"http://{s.connect_host}:{s.connect_port}",
            "rest.advertised.host.name": s.connect_host,
            "rest.advertised.port": s.connect_port,
            "key.converter": "org.apache.kafka.connect.json.JsonConverter",
            "value.converter": "org.apache.kafka.connect.json.JsonConverter",
            "key.converter.schemas.enable": "true",
            "value.converter.schemas.enable": "true",
            "config.storage.topic": f"{GROUP_ID}-configs",
            "offset.storage.topic": f"{GROUP_ID}-offsets",
            "status.storage.topic": f"{GROUP_ID}-status",
            "config.storage.replication.factor": 1,
            "offset.storage.replication.factor": 1,
            "status.storage.replication.factor": 1,
            "offset.storage.partitions": 5,
            "status.storage.partitions": 1,
            # Source offsets (the WAL position Debezium confirms) are flushed every 5 s instead of
            # 60 s: after a crash less is replayed, and slot lag shows up sooner.
            "offset.flush.interval.ms": 5000,
            # The producer Debezium writes with: Kafka's defaults (16 KiB batches, no linger) carried four
            # ~4 KB JSON-with-schema messages per batch; larger batches, 5 ms of linger and lz4 (the
            # schema repeats in every message) cost the broker and the decode stage's fetches far less.
            "producer.batch.size": 262144,
            "producer.linger.ms": 5,
            "producer.compression.type": "lz4",
            "plugin.path": self.plugin_dir,
            "plugin.discovery": "service_load",
            "config.providers": ",".join(CONFIG_PROVIDER_CLASSES),
            **{f"config.providers.{alias}.class": cls for alias, cls in CONFIG_PROVIDER_CLASSES.items()},
            "config.providers.env.param.allowlist.pattern": ENV_ALLOWLIST,
            "config.providers.file.param.allowed.paths": self.secrets_dir,
            "config.providers.dir.param.allowed.paths": self.secrets_dir,
            # Debezium creates its topics with its own settings (topic.creation.* in connector files).
            "topic.creation.enable": "true",
            # No connector may override the worker's client settings (producer.override.* and the like).
            "connector.client.config.override.policy": "None",
        }

    def prepare(self) -> None:
        private_dir(self.secrets_dir)  # an allowed path must exist
        write_if_changed(self.config_dir / "connect-distributed.properties", properties(self.worker_properties()))
        write_if_changed(self.config_dir / "log4j2.properties", LOG4J2.read_text())

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env[PG_PASSWORD_ENV] = replication_password(self.settings)
        # Where the connector files' ${env:...} references point on this stack.
        env["CHANGEFLOW_PG_HOST"] = self.settings.pg_host
        env["CHANGEFLOW_PG_PORT"] = str(self.settings.pg_port)
        return env

    def command(self) -> list[str]:
        return [
            java_bin(),
            "-Xms256m",
            f"-Xmx{CONNECT_HEAP}",
            *BASE_JVM_OPTS,
            f"-Dlog4j2.configurationFile={self.config_dir / 'log4j2.properties'}",
            f"-Dkafka.logs.dir={self.home / 'logs'}",
            "-cp",
            str(self.lib_dir / "*"),
            "org.apache.kafka.connect.cli.ConnectDistributed",
            str(self.config_dir / "connect-distributed.properties"),
        ]

    # -- health ------------------------------------------------------------------------------------
    def healthy(self) -> bool:
        """The REST API answers and both Debezium connectors are loaded.

        The REST port opens before the worker has joined its group and read the config topic; listing
        the plugins is answered only once the herder runs, so it is the better readiness signal.
        """
        try:
            with httpx.Client(base_url=self.url, timeout=3.0) as client:
                root = client.get("/")
                if root.status_code != 200 or "version" not in root.json():
                    return False
                plugins = client.get("/connector-plugins")
                if plugins.status_code != 200:
                    return False
                classes = {p.get("class") for p in plugins.json()}
        except (httpx.HTTPError, ValueError):
            return False
        return all(cls in classes for cls in REQUIRED_PLUGINS)
