"""Each sink runner in a process of its own, supervised by the worker.

Why processes: the decode stage and three sink runners in one interpreter share one GIL, and on this
machine that made the worker's throughput the throughput of one core. Measured on a 50k-change backlog
(2 shared cores), moving the runners out of the decode process raised the end-to-end rate by a quarter.

The worker stays one command and one place to look: a child sends its runner's state and its metric
families to the worker every ``REPORT_INTERVAL_S`` (``/changeflow/sinks/`` and ``/metrics`` on the
worker's web port show them), a fatal store error in a child stops the whole worker loudly, and a child
dies with the worker even when the worker is SIGKILLed (``PR_SET_PDEATHSIG``). Offsets stay per sink:
a runner commits only after its store has the batch, whichever process it lives in.

A fatal stop is kept in ``<state_dir>/fatal/<pipeline>.json`` (``FatalStop``, one per store: the error, the
batch it stopped on, the group's committed offsets then), so `changeflow status` can say why the worker died
after it is gone; a sink that stops again without its group having moved is crash-looping (``stops`` > 1).
"""

from __future__ import annotations

import contextlib
import json
import logging
import multiprocessing
import os
import queue
import re
import signal
import threading
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from confluent_kafka import Consumer, TopicPartition

from changeflow import metrics
from changeflow.runtime import die_with_parent, tune_gc
from changeflow.sinks import base
from changeflow.sinks.base import FatalSinkError
from changeflow.sinks.offsets import topic_partitions
from changeflow.sinks.runner import SinkRunner, canonical_topics
from changeflow.waiting import WaitTimeout, wait_until

if TYPE_CHECKING:
    from multiprocessing.context import SpawnProcess

    from changeflow.pipelines.spec import Pipeline
    from changeflow.settings import Settings
    from changeflow.sinks.base import Store

log = logging.getLogger("changeflow.sinks")

REPORT_INTERVAL_S = 0.5

# `changeflow worker`'s exit codes when a sink stops it (README "Operating it", exit codes).
EXIT_SINK_FATAL = 3  # a sink stopped on a fatal store error, or its process died
EXIT_CRASH_LOOP = 4  # the same, again on the same batch as the previous stop: restarting will not help


@dataclass(frozen=True)
class FatalStop:
    """Why a sink stopped its worker: kept in the state directory for `changeflow status`.

    ``topic``/``partition``/``offset``: the first record of the batch the store refused, or (a store that
    failed before its first batch) the first record the sink would read next; None when it had nothing to
    read. ``batch``: first offset per ``topic:partition`` of that batch; ``committed``: the sink group's
    committed offsets per ``topic:partition`` at the stop (None: nothing committed yet). ``stops``: how many
    times in a row it stopped without its group moving on (2 or more: a crash loop)."""

    store: str
    group: str
    error: str
    at: float
    topic: str | None = None
    partition: int | None = None
    offset: int | None = None
    batch: dict[str, int] = field(default_factory=dict)
    committed: dict[str, int | None] = field(default_factory=dict)
    stops: int = 1
    exit_code: int = EXIT_SINK_FATAL
    pid: int | None = None
    detail: str = ""

    @property
    def crash_loop(self) -> bool:
        return self.stops > 1

    @property
    def position(self) -> str:
        if self.topic is None:
            return "before its first batch (nothing to read)"
        return f"topic {self.topic} partition {self.partition} offset {self.offset}"

    def same_batch(self, earlier: FatalStop) -> bool:
        """Stopped again where ``earlier`` stopped: a batch starting at the same record, or no offset of the
        group moved in between."""
        if self.store != earlier.store:
            return False
        if set(self.batch.items()) & set(earlier.batch.items()):
            return True
        return bool(self.committed) and self.committed == earlier.committed

    def resolved(self, committed: Mapping[str, int | None]) -> bool:
        """The group has moved on since: committed past the refused batch (or, without one, anywhere)."""
        def moved(key: str, then: int | None) -> bool:
            now = committed.get(key)
            return now is not None and (then is None or now > then)

        if self.topic is not None and self.batch:
            return moved(f"{self.topic}:{self.partition}", self.offset)
        return any(moved(k, v) for k, v in self.committed.items())

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "crash_loop": self.crash_loop}


def fatal_file(state: Path, pipeline: Pipeline) -> Path:
    return state / "fatal" / f"{pipeline.name}.json"


def read_fatal(state: Path, pipeline: Pipeline) -> dict[str, FatalStop]:
    """store → its last fatal stop (an unreadable file reads as none)."""
    try:
        data = json.loads(fatal_file(state, pipeline).read_text())
        return {name: FatalStop(**entry) for name, entry in data.items()}
    except (OSError, ValueError, TypeError):
        return {}


def record_fatal(state: Path, pipeline: Pipeline, stop: FatalStop) -> FatalStop:
    """Keep ``stop`` as its store's last fatal stop, counting it as a repeat of the previous one when it stopped
    on the same batch; returns what was kept (with ``stops`` and ``exit_code`` set)."""
    path = fatal_file(state, pipeline)
    known = read_fatal(state, pipeline)
    earlier = known.get(stop.store)
    stops = earlier.stops + 1 if earlier is not None and stop.same_batch(earlier) else 1
    stop = replace(stop, stops=stops, exit_code=EXIT_CRASH_LOOP if stops > 1 else EXIT_SINK_FATAL)
    known[stop.store] = stop
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps({n: asdict(s) for n, s in known.items()}, indent=2))
    tmp.replace(path)
    return stop


def committed_offsets(settings: Settings, group: str, topics: Sequence[str]) -> dict[str, int | None]:
    """``topic:partition`` → the group's committed offset (None: nothing committed) over ``topics``."""

    consumer = Consumer({"bootstrap.servers": settings.kafka_bootstrap, "group.id": group,
                         "enable.auto.commit": False})
    try:
        partitions = topic_partitions(consumer, topics)
        if not partitions:
            return {}
        return {f"{tp.topic}:{tp.partition}": (tp.offset if tp.offset >= 0 else None)
                for tp in consumer.committed(partitions, timeout=10)}
    finally:
        consumer.close()


def next_record(settings: Settings, committed: Mapping[str, int | None]) -> tuple[str, int, int] | None:
    """The first record a group with these committed offsets has still to read (None: it has read them all)."""

    consumer = Consumer({"bootstrap.servers": settings.kafka_bootstrap, "group.id": "changeflow-status"})
    try:
        for key, offset in committed.items():
            topic, _, partition = key.rpartition(":")
            low, high = consumer.get_watermark_offsets(TopicPartition(topic, int(partition)), timeout=10)
            position = low if offset is None else max(offset, low)
            if position < high:
                return topic, int(partition), position
        return None
    finally:
        consumer.close()


def one_line(exc: BaseException) -> str:
    """An exception as one line: a store's own message as it is, anything else with its type."""

    text = re.sub(r"\s+", " ", str(exc)).strip()[:600]
    return text if isinstance(exc, FatalSinkError) and text else f"{type(exc).__name__}: {text}".rstrip(": ")


class _BatchWatch:
    """The store as the runner sees it, noting where the batch being written starts (per partition), so a
    fatal error can name it; forgotten once the store has the batch."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self.batch: dict[str, int] = {}
        self.first: tuple[str, int, int] | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    def write_batch(self, records: Sequence[Any], *args: Any, **kwargs: Any) -> Any:
        starts: dict[str, int] = {}
        for r in records:
            origin = getattr(r, "origin", None)
            if origin:
                starts.setdefault(f"{origin[0]}:{origin[1]}", int(origin[2]))
        first = next((r.origin for r in records if getattr(r, "origin", None)), None)
        self.batch, self.first = starts, (str(first[0]), int(first[1]), int(first[2])) if first else None
        result = self._store.write_batch(records, *args, **kwargs)
        self.batch, self.first = {}, None
        return result


@dataclass(frozen=True)
class SinkJob:
    """What a child builds: ``factory(settings, pipeline)`` is the store, ``group`` its consumer group.
    ``factory`` must be importable by name (a class or a module-level function): children are spawned."""

    name: str
    factory: Callable[[Settings, Pipeline], Store]
    group: str
    pipeline: Pipeline
    # Run by the child once the store is set up (sinks.runner.AfterSetup); a module-level function.
    after_setup: Callable[[Store, Pipeline], None] | None = None


def _child_main(job: SinkJob, settings: Settings, reports: Any, loglevel: str, parent: int) -> None:
    die_with_parent()
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
    store = _BatchWatch(job.factory(settings, job.pipeline))
    runner = SinkRunner(store, settings, job.pipeline, stop, group=job.group, after_setup=job.after_setup)
    tune_gc()

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
    except BaseException as exc:
        reports.put(("fatal", job.name, {"error": one_line(exc), "detail": traceback.format_exc(limit=20),
                                         "batch": store.batch, "first": store.first}, None))
        _flush(reports)
        raise
    finally:
        stop.set()
        if os.getppid() == parent:
            report()


def _flush(reports: Any, timeout: float = 5.0) -> None:
    """Let the queue's feeder thread hand what was put to the pipe: with ``cancel_join_thread`` a process that
    exits at once would lose it (the worker would then only see the process gone, not the error)."""
    with contextlib.suppress(WaitTimeout):  # what is still buffered then is lost with the process, said or not
        wait_until(lambda: not getattr(reports, "_buffer", None) or os.getppid() == 1, timeout,
                   what="the sink's reports handed to the worker", interval=0.01)
    time.sleep(0.1)  # the item last taken from the buffer is being written


def _stop_this_process(_sink: str, _detail: str) -> None:
    """A fatal sink error stops the whole worker loudly (Faust's SIGTERM handling; the other sinks finish
    their batch), its offsets uncommitted, instead of one store silently falling behind."""
    os.kill(os.getpid(), signal.SIGTERM)


class SinkProcesses:
    """The worker's side: start the children, keep their latest state and metrics, stop them."""

    def __init__(self, settings: Settings, jobs: list[SinkJob], loglevel: str = "info",
                 on_fatal: Callable[[str, str], None] | None = None, keep_fatal: bool = False) -> None:
        """``keep_fatal``: record a fatal stop in the state directory (``record_fatal``), as `changeflow worker`
        does; ``fatal`` is then what was recorded."""
        self.settings = settings
        self.jobs = jobs
        self.loglevel = loglevel
        self.on_fatal = on_fatal or _stop_this_process
        self.keep_fatal = keep_fatal
        self.fatal: FatalStop | None = None
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

    def _fatal(self, name: str, report: dict[str, Any]) -> None:
        detail = str(report.get("detail") or report.get("error"))
        log.critical("sink=%s event=fatal stopping the worker\n%s", name, detail)
        try:
            self.fatal = self._describe(name, report)
            if self.keep_fatal:
                job = next(j for j in self.jobs if j.name == name)
                self.fatal = record_fatal(self.settings.state, job.pipeline, self.fatal)
                log.critical("sink=%s event=fatal_recorded position=%r stops=%d file=%s", name, self.fatal.position,
                             self.fatal.stops, fatal_file(self.settings.state, job.pipeline))
        except Exception as exc:  # Kafka or the disk failing here must not keep the worker running
            log.error("sink=%s event=fatal_not_recorded error=%r", name, str(exc))
            if self.fatal is None:
                self.fatal = FatalStop(name, "", str(report.get("error")), time.time(), pid=os.getpid())
        self.on_fatal(name, detail)

    def _describe(self, name: str, report: dict[str, Any]) -> FatalStop:
        job = next(j for j in self.jobs if j.name == name)
        committed = committed_offsets(self.settings, job.group, canonical_topics(job.pipeline, name))
        first = report.get("first") or next_record(self.settings, committed)
        topic, partition, offset = first if first else (None, None, None)
        return FatalStop(store=name, group=job.group, error=str(report.get("error")), at=time.time(),
                         topic=topic, partition=partition, offset=offset, batch=dict(report.get("batch") or {}),
                         committed=committed, pid=os.getpid(), detail=str(report.get("detail") or "")[-4000:])

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
                        self._fatal(name, {"error": f"sink process exited unexpectedly (exit code {proc.exitcode})"})
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


def default_jobs(pipeline: Pipeline, names: list[str],
                 after_setup: Callable[[Store, Pipeline], None] | None = None) -> list[SinkJob]:

    factories = base.registry()
    unknown = [n for n in names if n not in factories]
    if unknown:
        raise KeyError(f"unknown sink(s) {', '.join(unknown)}; known: {', '.join(sorted(factories))}")
    return [SinkJob(name, factories[name], pipeline.sink_group(name), pipeline, after_setup) for name in names]
