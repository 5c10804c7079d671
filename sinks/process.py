"""Each sink runner in a process of its own, supervised by the worker.

Why processes: the decode stage and three sink runners in one interpreter share one GIL, and on this
machine that made the worker's throughput the throughput of one core. Measured on a 50k-change backlog
(2 shared cores), moving the runners out of the decode process raised the end-to-end rate by a quarter.

The worker stays one command and one place to look: a child sends its runner's state and its metric
families to the worker every ``REPORT_INTERVAL_S`` (``/changeflow/sinks/`` and ``/metrics`` on the
worker's web port show them), a fatal store error in a child stops the whole worker loudly, and a child
dies with the worker even when the worker is SIGKILLed (``PR_SET_PDEATHSIG``). Offsets stay per sink:
a runner commits only after its store has the batch, whichever process it lives in.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import multiprocessing
import os
import queue
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from changeflow import metrics

if TYPE_CHECKING:
    from multiprocessing.context import SpawnProcess

    from changeflow.settings import Settings
    from pipelines.spec import Pipeline
    from sinks.base import Store

log = logging.getLogger("changeflow.sinks")

REPORT_INTERVAL_S = 0.5
_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class SinkJob:
    """What a child builds: ``factory(settings, pipeline)`` is the store, ``group`` its consumer group.
    ``factory`` must be importable by name (a class or a module-level function): children are spawned."""

    name: str
    factory: Callable[[Settings, Pipeline], Store]
    group: str
    pipeline: Pipeline


def _die_with_parent() -> None:
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _child_main(job: SinkJob, settings: Settings, reports: Any, loglevel: str, parent: int) -> None:
    from sinks.runner import SinkRunner

    _die_with_parent()
    if os.getppid() != parent:  # the worker died before the line above could take effect
        return
    # Reports go to a pipe the worker drains; a dead worker drains nothing, and a process waiting at exit
    # for its reports to be written would never exit.
    reports.cancel_join_thread()
    logging.basicConfig(level=loglevel.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s")
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    metrics.use_pipeline(job.pipeline)
    runner = SinkRunner(job.factory(settings, job.pipeline), settings, job.pipeline, stop, group=job.group)

    def report() -> None:
        reports.put(("report", job.name, runner.state(), list(metrics.REGISTRY.collect())))

    def reporter() -> None:
        while not stop.wait(REPORT_INTERVAL_S):
            if os.getppid() != parent:  # the worker is gone (where PR_SET_PDEATHSIG is not available)
                stop.set()
                return
            report()

    threading.Thread(target=reporter, name=f"report-{job.name}", daemon=True).start()
    try:
        runner.run()
    except BaseException:
        reports.put(("fatal", job.name, traceback.format_exc(limit=20), None))
        raise
    finally:
        stop.set()
        if os.getppid() == parent:
            report()


def _stop_this_process(_sink: str, _detail: str) -> None:
    """A fatal sink error stops the whole worker loudly (Faust's SIGTERM handling; the other sinks finish
    their batch), its offsets uncommitted, instead of one store silently falling behind."""
    os.kill(os.getpid(), signal.SIGTERM)


class SinkProcesses:
    """The worker's side: start the children, keep their latest state and metrics, stop them."""

    def __init__(self, settings: Settings, jobs: list[SinkJob], loglevel: str = "info",
                 on_fatal: Callable[[str, str], None] | None = None) -> None:
        self.settings = settings
        self.jobs = jobs
        self.loglevel = loglevel
        self.on_fatal = on_fatal or _stop_this_process
        self._ctx = multiprocessing.get_context("spawn")
        self._reports: Any = self._ctx.Queue()
        self._procs: dict[str, SpawnProcess] = {}
        self._states: dict[str, dict[str, Any]] = {}
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._listener: threading.Thread | None = None

    def start(self) -> None:
        for job in self.jobs:
            proc = self._ctx.Process(target=_child_main,
                                     args=(job, self.settings, self._reports, self.loglevel, os.getpid()),
                                     name=f"sink-{job.name}", daemon=False)
            proc.start()
            self._procs[job.name] = proc
            self._states[job.name] = {"sink": job.name, "group": job.group, "healthy": True, "applied": 0,
                                      "last_error": None, "failing_since": None, "last_batch_at": None}
            log.info("sink=%s event=process_started pid=%s group=%s", job.name, proc.pid, job.group)
        self._listener = threading.Thread(target=self._listen, name="sink-reports", daemon=True)
        self._listener.start()

    def states(self) -> dict[str, dict[str, Any]]:
        with self._lock:
            return {name: {**state, "pid": self._procs[name].pid} for name, state in self._states.items()}

    def _fatal(self, name: str, detail: str) -> None:
        log.critical("sink=%s event=fatal stopping the worker\n%s", name, detail)
        self.on_fatal(name, detail)

    def _listen(self) -> None:
        while True:
            try:
                kind, name, payload, families = self._reports.get(timeout=1.0)
            except queue.Empty:
                if self._stopping.is_set():
                    return
                for name, proc in self._procs.items():
                    if not proc.is_alive() and not self._stopping.is_set():
                        self._stopping.set()
                        self._fatal(name, f"sink process exited unexpectedly (exit code {proc.exitcode})")
                continue
            except (EOFError, OSError):
                return
            if kind == "report":
                with self._lock:
                    self._states[name] = payload
                metrics.absorb(f"sink-{name}", families)
            elif kind == "fatal" and not self._stopping.is_set():
                self._stopping.set()
                self._fatal(name, payload)

    def stop(self, timeout: float = 45.0) -> None:
        """Ask every child to finish its batch and stop (SIGTERM), then wait; kill what does not stop."""
        self._stopping.set()
        for proc in self._procs.values():
            if proc.is_alive():
                proc.terminate()
        deadline = time.monotonic() + timeout
        for name, proc in self._procs.items():
            proc.join(max(0.1, deadline - time.monotonic()))
            if proc.is_alive():
                log.warning("sink=%s event=kill pid=%s did not stop in %.0fs", name, proc.pid, timeout)
                proc.kill()
                proc.join(5)
        if self._listener is not None:
            self._listener.join(5)


def default_jobs(pipeline: Pipeline, names: list[str]) -> list[SinkJob]:
    from sinks import base

    factories = base.registry()
    unknown = [n for n in names if n not in factories]
    if unknown:
        raise KeyError(f"unknown sink(s) {', '.join(unknown)}; known: {', '.join(sorted(factories))}")
    return [SinkJob(name, factories[name], pipeline.sink_group(name), pipeline) for name in names]
