"""Apache Kafka 4.3.1 in KRaft mode: one process that is both broker and controller.

Why this shape:
- No ZooKeeper: Kafka 4 has none, and one combined node is the smallest cluster that behaves like a
  real one for the pipeline (consumer groups, transactions, compaction, auto-created topics).
- The jars come from Maven Central (``changeflow/deploy/jvm/kafka/pom.xml``): this project's machines can reach
  no Kafka tarball download. 4.3.1 is the newest Kafka whose whole dependency tree Maven Central
  serves here (4.4.0 misses some), so Connect (``changeflow/deploy/connect.py``) uses 4.3.1 too.
- Clients checked against this broker: faust-streaming 0.11 / aiokafka 0.14.0 produce, consume in a
  consumer group and commit offsets; confluent-kafka (librdkafka) answers ``healthy()``. So the 4.x
  line is kept (Kafka 4 removed protocol versions older clients used; aiokafka 0.14 does not use them).
- Every replication factor is 1 (one broker), and internal topics have few partitions so that a
  fresh start on a 2-core machine stays quick.

Layout under ``<state>/kafka/``: ``lib/`` (jars), ``config/`` (server.properties, log4j2.properties),
``data/`` (the log dirs, formatted once by StorageTool), ``cluster-id``; ``<state>/kafka/`` and ``data/`` are 0700.
"""

from __future__ import annotations

import base64
import contextlib
import shutil
import subprocess
import uuid
from pathlib import Path

from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient

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
from changeflow.deploy.service import Service, ServiceError, port_open, private_dir

KAFKA_VERSION = "4.3.1"
POM = JVM_DIR / "kafka" / "pom.xml"
LOG4J2 = JVM_DIR / "log4j2.properties"

# Heap of the broker: plenty for a development broker with a few thousand partitions' worth of
# metadata, and small beside Connect, the search node, PostgreSQL and ClickHouse on a 24 GiB machine.
KAFKA_HEAP = "512m"
# Partitions of an auto-created topic (Debezium's topics, Faust's): enough to show keyed ordering
# across partitions, few enough to keep the broker light.
DEFAULT_PARTITIONS = 3
# __consumer_offsets defaults to 50 partitions; creating them is the slowest part of a first
# consumer-group join on a small machine, and one developer needs nowhere near 50.
OFFSETS_TOPIC_PARTITIONS = 10
NODE_ID = 1


def new_cluster_id() -> str:
    """A Kafka ``Uuid`` as StorageTool expects: 16 random bytes, URL-safe base64 without padding.

    Kafka's own generator never hands out an id starting with '-' (it reads like a CLI flag).
    """
    while True:
        text = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not text.startswith("-"):
            return text


class KafkaService(Service):
    name = "kafka"

    # -- locations ---------------------------------------------------------------------------------
    @property
    def lib_dir(self) -> Path:
        return self.home / "lib"

    @property
    def config_dir(self) -> Path:
        return self.home / "config"

    @property
    def data_dir(self) -> Path:
        return self.home / "data"

    @property
    def marker(self) -> Path:
        return self.home / "installed"

    @property
    def url(self) -> str:
        return f"kafka://{self.settings.kafka_bootstrap}"

    def private_dirs(self) -> list[Path]:
        return [self.home, self.data_dir]

    def ports(self) -> list[int]:
        return [self.settings.kafka_port, self.settings.kafka_controller_port]

    # -- install -----------------------------------------------------------------------------------
    def _stamp(self) -> str:
        return fingerprint([POM])

    def install(self) -> None:
        stamp = self._stamp()
        if installed(self.marker, stamp) and any(self.lib_dir.glob("kafka_2.13-*.jar")):
            return
        check_java()
        say(f"installing Kafka {KAFKA_VERSION} (KRaft) into {self.lib_dir}")
        maven_copy_dependencies(POM, self.lib_dir, label=f"Kafka {KAFKA_VERSION}")
        self.marker.write_text(stamp + "\n")

    # -- configuration -----------------------------------------------------------------------------
    def server_properties(self) -> dict[str, object]:
        s = self.settings
        controller = f"{s.kafka_host}:{s.kafka_controller_port}"
        return {
            "process.roles": "broker,controller",
            "node.id": NODE_ID,
            # A static voter set: nothing about the quorum is stored at format time, so the ports
            # can change between starts without reformatting.
            "controller.quorum.voters": f"{NODE_ID}@{controller}",
            "listeners": f"PLAINTEXT://{s.kafka_bootstrap},CONTROLLER://{controller}",
            "advertised.listeners": f"PLAINTEXT://{s.kafka_bootstrap}",
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            "log.dirs": self.data_dir,
            "num.partitions": DEFAULT_PARTITIONS,
            "default.replication.factor": 1,
            "min.insync.replicas": 1,
            "auto.create.topics.enable": "true",
            "delete.topic.enable": "true",
            "offsets.topic.replication.factor": 1,
            "offsets.topic.num.partitions": OFFSETS_TOPIC_PARTITIONS,
            "transaction.state.log.replication.factor": 1,
            "transaction.state.log.min.isr": 1,
            "share.coordinator.state.topic.replication.factor": 1,
            "share.coordinator.state.topic.min.isr": 1,
            # A consumer group that is alone should not wait 3 s for company on every join.
            "group.initial.rebalance.delay.ms": 0,
            "log.retention.hours": 168,
            "num.network.threads": 2,
            "num.io.threads": 4,
        }

    def _cluster_id(self) -> str:
        path = self.home / "cluster-id"
        with contextlib.suppress(OSError):
            text = path.read_text().strip()
            if text:
                return text
        cluster_id = new_cluster_id()
        path.write_text(cluster_id + "\n")
        return cluster_id

    def prepare(self) -> None:
        """Write the configuration (every start: ports may have changed) and format storage once."""
        write_if_changed(self.config_dir / "server.properties", properties(self.server_properties()))
        write_if_changed(self.config_dir / "log4j2.properties", LOG4J2.read_text())
        if (self.data_dir / "meta.properties").exists():
            return
        private_dir(self.data_dir)
        cmd = [
            *self._java_prefix("256m"),
            "kafka.tools.StorageTool",
            "format",
            "--cluster-id",
            self._cluster_id(),
            "--config",
            str(self.config_dir / "server.properties"),
            "--ignore-formatted",
        ]
        result = subprocess.run(cmd, capture_output=True, text=True, cwd=self.home)
        if result.returncode != 0:
            shutil.rmtree(self.data_dir, ignore_errors=True)
            raise ServiceError(
                f"kafka: formatting {self.data_dir} failed:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}"
            )

    def _java_prefix(self, heap: str) -> list[str]:
        return [
            java_bin(),
            f"-Xms{heap}",
            f"-Xmx{heap}",
            *BASE_JVM_OPTS,
            f"-Dlog4j2.configurationFile={self.config_dir / 'log4j2.properties'}",
            f"-Dkafka.logs.dir={self.home / 'logs'}",
            "-cp",
            str(self.lib_dir / "*"),
        ]

    def command(self) -> list[str]:
        return [*self._java_prefix(KAFKA_HEAP), "kafka.Kafka", str(self.config_dir / "server.properties")]

    # -- health ------------------------------------------------------------------------------------
    def healthy(self) -> bool:
        """A metadata answer that names a broker: the controller has elected itself and the broker
        is registered (a listening port alone is not enough, it opens before either)."""
        s = self.settings
        if not port_open(s.kafka_host, s.kafka_port):
            return False
        admin = AdminClient({"bootstrap.servers": s.kafka_bootstrap, "socket.timeout.ms": 2000, "log_level": 0})
        try:
            metadata = admin.list_topics(timeout=3)
        except KafkaException:
            return False
        return bool(metadata.brokers)
