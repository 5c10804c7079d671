"""The bench worker: `changeflow worker` (decode stage + one process per sink), isolated.

Run as ``python -m bench.worker`` with the ``CHANGEFLOW_*`` environment built by ``Isolation.env``. It is the
production worker's code path, ``changeflow.worker.run``, with only the names changed so it cannot meet the
live worker: the decode stage's consumer group (``create_app(decode_group=...)``), the Faust app id and data
directory, the sink consumer groups, the Redis database, the search index names and the ClickHouse database.

With ``CHANGEFLOW_BENCH_PROFILE=<dir>`` the decode process's main thread (Faust's event loop and the decode agent)
runs under pyinstrument and writes ``<dir>/faust-decode.txt`` when the worker stops.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from bench.common import BenchSettings, Isolation
from sinks.clickhouse import ClickHouseSink
from sinks.process import SinkJob, SinkProcesses
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


def sink_jobs(iso: Isolation) -> list[SinkJob]:
    """The production sinks under the bench's names: RedisSink reads settings.redis_url (the bench database),
    ClickHouseSink settings.clickhouse_database, and the search sink writes prefixed indexes."""
    # Imported by module name so a spawned sink process can find the class (this file runs as __main__).
    from bench.worker import BenchSearchSink as search_factory

    return [
        SinkJob("redis", RedisSink, iso.sink_group("redis")),
        SinkJob("search", search_factory, iso.sink_group("search")),  # type: ignore[arg-type]
        SinkJob("clickhouse", ClickHouseSink, iso.sink_group("clickhouse")),
    ]


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


def main() -> None:
    from faust.worker import Worker

    from changeflow.worker import ensure_topics
    from streams.app import create_app

    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s %(message)s")
    settings = BenchSettings()
    iso = Isolation(settings.bench_run_id, os.environ["CHANGEFLOW_BENCH_STAGE"])  # names only
    profile_dir = Path(os.environ["CHANGEFLOW_BENCH_PROFILE"]) if os.environ.get("CHANGEFLOW_BENCH_PROFILE") else None
    ensure_topics(settings)
    sinks = SinkProcesses(settings, sink_jobs(iso))
    sinks.start()
    app = create_app(settings, decode_group=iso.decode_group)
    # The Faust app id follows the decode group; its data directory is made private to this run too.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        datadir = tempfile.mkdtemp(prefix=f"{iso.tag}-faust-")
        app.conf.datadir = Path(datadir)
    worker = Worker(app, loglevel="info", quiet=True)  # as changeflow.worker.run (see notes on loglevel)
    sys.argv = sys.argv[:1]
    try:
        _profiled(worker.execute_from_commandline, "faust-decode", profile_dir)()
    finally:
        sinks.stop()
        import shutil

        shutil.rmtree(datadir, ignore_errors=True)


if __name__ == "__main__":
    main()
