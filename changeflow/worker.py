"""`changeflow worker`: the Faust app (decode/route) plus one process per sink (``sinks.process``).

Topics are created up front with the partition counts we rely on (ordering per key needs the canonical
topics to exist before the first record), then the sink processes start, then Faust takes the main thread
(it owns signal handling); when Faust stops, the sink processes finish their current batch and stop.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

from confluent_kafka.admin import AdminClient, NewTopic

from changeflow import metrics
from changeflow.settings import Settings
from pipelines.spec import Pipeline
from sinks import base as sink_base
from sinks.process import SinkProcesses, default_jobs
from streams.app import CANONICAL_PARTITIONS, create_app, price_changed_topic_name

log = logging.getLogger("changeflow.worker")


def ensure_topics(settings: Settings, pipeline: Pipeline) -> None:
    admin = AdminClient({"bootstrap.servers": settings.kafka_bootstrap})
    wanted = {name: CANONICAL_PARTITIONS for name in pipeline.raw_topics()}
    wanted.update({topic: CANONICAL_PARTITIONS for topic in pipeline.canonical_topics()})
    wanted[price_changed_topic_name(pipeline)] = CANONICAL_PARTITIONS
    wanted[pipeline.dlq_topic] = 1
    existing = set(admin.list_topics(timeout=15).topics)
    missing = [NewTopic(n, num_partitions=p, replication_factor=1) for n, p in wanted.items() if n not in existing]
    if not missing:
        return
    for name, future in admin.create_topics(missing, operation_timeout=15).items():
        try:
            future.result()
        except Exception as exc:  # TOPIC_ALREADY_EXISTS from a concurrent worker is fine
            if "TOPIC_ALREADY_EXISTS" not in str(exc):
                raise
        log.info("event=topic_created topic=%s", name)


def run(settings: Settings, pipeline: Pipeline, sink_names: list[str] | None = None, loglevel: str = "info") -> None:
    from faust.worker import Worker

    logging.basicConfig(level=loglevel.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s")
    ensure_topics(settings, pipeline)
    metrics.use_pipeline(pipeline)
    names = sink_names if sink_names is not None else list(sink_base.registry())
    sinks = SinkProcesses(settings, default_jobs(pipeline, names), loglevel=loglevel)
    sinks.start()
    try:
        app = create_app(settings, pipeline)

        @app.page("/changeflow/sinks/")
        async def sink_states(web: Any, request: Any) -> Any:
            return web.json(sinks.states())

        @app.page("/metrics")
        async def prometheus_metrics(web: Any, request: Any) -> Any:
            return web.bytes(metrics.exposition(), headers={"Content-Type": metrics.CONTENT_TYPE})

        worker = Worker(app, loglevel=loglevel, quiet=True)
        sys.argv = sys.argv[:1]
        worker.execute_from_commandline()
    finally:
        sinks.stop()
