"""The bench worker: `changeflow worker` (Faust decode agent + one runner thread per sink, in one process), isolated.

Run as ``python -m bench.worker`` with the ``CHANGEFLOW_*`` environment built by ``Isolation.env``. It is the
production worker's code path, ``changeflow.worker.run``, with only the names changed so it cannot meet the
live worker: the Faust app id (its consumer group) and data directory, the sink consumer groups, the Redis
database, the search index names and the ClickHouse database. Those names are hard-coded in streams/ and sinks/
today, so they are swapped here at construction time (see the notes on each).

With ``CHANGEFLOW_BENCH_DECODE=batch`` the Faust agent is replaced by ``batch_decode``: the same decoder, transform,
Avro encoding, canonical topics and keys, in a confluent-kafka batch loop (consume a batch, produce its records,
flush, commit). It is not the production path; the benchmark reports it beside the Faust figure to show what
the decode stage costs under Faust.

With ``CHANGEFLOW_BENCH_PROFILE=<dir>`` every thread (Faust's event loop and each sink runner) runs under its own
pyinstrument profiler and writes ``<dir>/<thread>.txt`` when the worker stops.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import sys
import tempfile
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any
from unittest import mock

from bench.common import BenchSettings, Isolation
from sinks import runner as runner_mod
from sinks.base import Sink
from sinks.clickhouse import ClickHouseSink
from sinks.redis import RedisSink
from sinks.search import SearchSink
from streams.entities import ENTITIES
from streams.records import ChangeRecord

log = logging.getLogger("changeflow.bench.worker")


class BenchSearchSink(SearchSink):
    """SearchSink writing to `<prefix><index>`: the production actions and documents, only the index renamed."""

    def __init__(self, settings: BenchSettings) -> None:
        super().__init__(settings)
        self.prefix = settings.bench_search_prefix

    def setup(self) -> None:
        for spec in ENTITIES.values():
            if spec.search_index is not None:
                self._create_index(dataclasses.replace(spec, search_index=self.prefix + spec.search_index))

    def _actions(self, records: Sequence[ChangeRecord]) -> Iterator[dict[str, Any]]:
        for action in super()._actions(records):
            action["_index"] = self.prefix + action["_index"]
            yield action


def make_sinks(settings: BenchSettings) -> list[Sink]:
    # RedisSink reads settings.redis_url (the bench database); ClickHouseSink settings.clickhouse_database.
    return [RedisSink(settings), BenchSearchSink(settings), ClickHouseSink(settings)]


def _profiled(target: Callable[[], None], name: str, out: Path | None) -> Callable[[], None]:
    if out is None:
        return target

    def run() -> None:
        from pyinstrument import Profiler

        profiler = Profiler(interval=0.001, async_mode="disabled")
        profiler.start()
        try:
            target()
        finally:
            profiler.stop()
            (out / f"{name}.txt").write_text(profiler.output_text(unicode=False, color=False, show_all=True))
            (out / f"{name}.html").write_text(profiler.output_html())

    return run


def batch_decode(settings: BenchSettings, group: str, stop: threading.Event) -> None:
    """Raw topics → canonical topics with the production pure functions, in batches; offsets after delivery."""
    from confluent_kafka import Consumer, Producer

    from streams.app import canonical_topic_name, dead_letter_headers, raw_topics, to_avro
    from streams.debezium import decode_postgres
    from streams.entities import MONGODB_ENTITIES, POSTGRES_ENTITIES
    from streams.mongodb import decode_mongodb
    from streams.records import DeadLetter

    flavours = raw_topics(settings)
    canonical = {entity: canonical_topic_name(settings, entity) for entity in ENTITIES}
    consumer = Consumer({"bootstrap.servers": settings.kafka_bootstrap, "group.id": group,
                         "enable.auto.commit": False, "auto.offset.reset": "earliest"})
    producer = Producer({"bootstrap.servers": settings.kafka_bootstrap, "acks": "all", "linger.ms": 5,
                         "batch.size": 1_000_000})
    consumer.subscribe(list(flavours))
    try:
        while not stop.is_set():
            msgs = consumer.consume(5000, 0.2)
            if not msgs:
                continue
            for msg in msgs:
                if msg.error() is not None:
                    continue
                topic, partition, offset = msg.topic() or "", msg.partition() or 0, msg.offset() or 0
                if flavours.get(topic) == "mongodb":
                    result = decode_mongodb(msg.value(), topic=topic, partition=partition, offset=offset,
                                            raw_key=msg.key(), entities=MONGODB_ENTITIES)
                else:
                    result = decode_postgres(msg.value(), topic=topic, partition=partition, offset=offset,
                                             raw_key=msg.key(), entities=POSTGRES_ENTITIES)
                while True:
                    try:
                        if isinstance(result, ChangeRecord):
                            producer.produce(canonical[result.entity], key=result.kafka_key.encode(),
                                             value=to_avro(result))
                        elif isinstance(result, DeadLetter):
                            headers: dict[str, str | bytes | None] = dict(dead_letter_headers(result))
                            producer.produce(settings.dlq_topic, key=result.raw_key, value=result.raw_value,
                                             headers=headers)
                        break
                    except BufferError:
                        producer.poll(0.05)
            if producer.flush(60) != 0:
                raise RuntimeError("canonical records not delivered")
            consumer.commit(asynchronous=False)
    finally:
        consumer.close()


def main() -> None:
    from faust.worker import Worker

    from changeflow.worker import ensure_topics
    from streams.app import create_app

    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s %(message)s")
    settings = BenchSettings()
    iso = Isolation(settings.bench_run_id, os.environ["CHANGEFLOW_BENCH_STAGE"])  # names only: raw_stage unused
    profile_dir = Path(os.environ["CHANGEFLOW_BENCH_PROFILE"]) if os.environ.get("CHANGEFLOW_BENCH_PROFILE") else None
    ensure_topics(settings)
    # clickhouse-connect imports pandas (about 4 s of CPU holding the GIL, stalling every thread) on the first
    # insert of a process; a long-running worker paid it long ago, so the benchmark pays it before timing starts.
    from clickhouse_connect.driver import options

    _ = options.pd
    stop = threading.Event()
    # sinks.runner.group_id is `changeflow-sink-<name>` for every worker: swapped while the runners are built.
    with mock.patch.object(runner_mod, "group_id", iso.sink_group):
        runners = [runner_mod.SinkRunner(sink, settings, stop) for sink in make_sinks(settings)]
    threads = [
        threading.Thread(target=_profiled(r.run, f"sink-{r.sink.name}", profile_dir), name=f"sink-{r.sink.name}",
                         daemon=True)
        for r in runners
    ]
    for thread in threads:
        thread.start()
    if os.environ.get("CHANGEFLOW_BENCH_DECODE") == "batch":
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        try:
            _profiled(lambda: batch_decode(settings, iso.decode_group, stop), "batch-decode", profile_dir)()
        finally:
            stop.set()
            for thread in threads:
                thread.join(timeout=30)
        return
    app = create_app(settings)
    # streams.app.create_app names the Faust app (and so its consumer group) "changeflow": renamed before start.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        app.conf.id = iso.decode_group
        datadir = tempfile.mkdtemp(prefix=f"{iso.tag}-faust-")
        app.conf.datadir = Path(datadir)
        # Experiment only (`changeflow bench --faust-linger-ms`): the production worker does not set it.
        if os.environ.get("CHANGEFLOW_BENCH_FAUST_LINGER_MS"):
            app.conf.producer_linger_ms = int(os.environ["CHANGEFLOW_BENCH_FAUST_LINGER_MS"])
    worker = Worker(app, loglevel="info", quiet=True)  # as changeflow.worker.run (see notes on loglevel)
    sys.argv = sys.argv[:1]
    try:
        _profiled(worker.execute_from_commandline, "faust-decode", profile_dir)()
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=30)
        import shutil

        shutil.rmtree(datadir, ignore_errors=True)


if __name__ == "__main__":
    main()
