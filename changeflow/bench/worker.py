"""The bench worker: `changeflow worker` (decode stage + one process per sink), isolated.

Run as ``python -m changeflow.bench.worker`` with the ``CHANGEFLOW_*`` environment built by ``Isolation.env``. It is the
production worker's code path, ``changeflow.worker.run``, on the live pipeline under another name
(``Isolation.pipeline``) so it cannot meet the live worker: its raw, canonical, DLQ and schema topics, the decode
stage's and the sinks' consumer groups, the Faust app id and data directory, and what it writes in each store
(keys, indexes, tables: each store's ``isolate``) are the run's own.

With ``CHANGEFLOW_BENCH_PROFILE=<dir>`` the decode process's main thread (Faust's event loop and the decode agent)
runs under pyinstrument and writes ``<dir>/faust-decode.txt`` when the worker stops.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from faust.worker import Worker

from changeflow.bench.common import BenchSettings, Isolation
from changeflow.pipelines.load import load
from changeflow.sinks.base import used_by
from changeflow.sinks.process import SinkProcesses, default_jobs
from changeflow.streams.app import create_app
from changeflow.worker import ensure_topics

log = logging.getLogger("changeflow.bench.worker")

def _profiled(target: Callable[[], None], name: str, out: Path | None) -> Callable[[], None]:
    if out is None:
        return target

    def run() -> None:
        # Only with CHANGEFLOW_BENCH_PROFILE: pyinstrument costs ~130 ms to import (python -X importtime).
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
    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s %(message)s")
    settings = BenchSettings()
    iso = Isolation(settings.bench_run_id, os.environ["CHANGEFLOW_BENCH_STAGE"])  # names only
    # The pipeline the live worker runs, under this stage's names (its production stores, groups and topics).
    pipeline = iso.pipeline(load(settings.pipeline))
    profile_dir = Path(os.environ["CHANGEFLOW_BENCH_PROFILE"]) if os.environ.get("CHANGEFLOW_BENCH_PROFILE") else None
    ensure_topics(settings, pipeline)
    sinks = SinkProcesses(settings, default_jobs(pipeline, used_by(pipeline)))
    sinks.start()
    app = create_app(settings, pipeline, decode_group=iso.decode_group)

    @app.page("/changeflow/sinks/")
    async def sink_states(web: Any, request: Any) -> Any:  # as changeflow.worker.run: the bench reads the pids
        return web.json(sinks.states())
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

        shutil.rmtree(datadir, ignore_errors=True)


if __name__ == "__main__":
    main()
