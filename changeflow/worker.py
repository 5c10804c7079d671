"""`changeflow worker`: the Faust app (decode/route) plus one process per sink (``sinks.process``).

Topics are created up front with the partition counts we rely on (ordering per key needs the canonical
topics to exist before the first record), then the sink processes start, then Faust takes the main thread
(it owns signal handling); when Faust stops, the sink processes finish their current batch and stop.

Exit codes (README "Operating it"): 0 stopped by a signal (Ctrl-C, SIGTERM); 1 the worker itself failed;
2 a usage error (the CLI); 3 a sink stopped on a fatal store error or its process died (``EXIT_SINK_FATAL``;
kept for `changeflow status` in ``<state_dir>/fatal/<pipeline>.json``); 4 the same again on the same batch,
a crash loop (``EXIT_CRASH_LOOP``). Faust's own data directory is kept under the state directory too.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import errno
import hmac
import logging
import os
import signal
import socket
import sys
import threading
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
from confluent_kafka.admin import (
    AdminClient,
    AlterConfigOpType,
    ConfigEntry,
    ConfigResource,
    NewTopic,
    ResourceType,
)
from faust.web import View

from changeflow import metrics
from changeflow.deploy.secrets import erasure_token
from changeflow.pipelines.spec import Pipeline
from changeflow.schemas.book import seed_versions
from changeflow.settings import Settings
from changeflow.sinks import base as sink_base
from changeflow.sinks.process import EXIT_CRASH_LOOP, EXIT_SINK_FATAL, SinkProcesses, default_jobs
from changeflow.sinks.runner import AfterSetup
from changeflow.streams.app import CANONICAL_PARTITIONS, create_app
from changeflow.streams.views import ViewProcess

log = logging.getLogger("changeflow.worker")

EXIT_OK = 0
EXIT_FAILED = 1
__all__ = ["EXIT_CRASH_LOOP", "EXIT_FAILED", "EXIT_OK", "EXIT_SINK_FATAL", "ensure_topics", "run"]


# Dead letters are kept until replayed or dropped on purpose (`changeflow dlq`), never expired by the broker's
# 7-day default: a quarantined record is a change no store holds yet.
DLQ_CONFIG = {"retention.ms": "-1", "retention.bytes": "-1"}
# A canonical topic keeps every row's latest change for good (a view added later is filled from it, not from
# a new snapshot of the sources: streams.views), and every change for a week, as before, for sinks behind.
CANONICAL_CONFIG = {"cleanup.policy": "compact", "min.compaction.lag.ms": str(7 * 24 * 3600 * 1000)}
# Every erased row's mark, kept for good (streams.suppression); marks only, never a clear key.
SUPPRESSION_CONFIG = {"cleanup.policy": "compact"}


def keep_dlq(admin: AdminClient, topic: str, *, created: bool, config: dict[str, str] = DLQ_CONFIG) -> None:
    """An existing topic made by an earlier version (the DLQ with the broker's retention, a canonical topic
    without compaction) gets the configuration it is created with now."""
    if created:
        return  # made below with it
    resource = ConfigResource(ResourceType.TOPIC, topic, incremental_configs=[
        ConfigEntry(name, value, incremental_operation=AlterConfigOpType.SET) for name, value in config.items()])
    for future in admin.incremental_alter_configs([resource]).values():
        future.result()


def ensure_topics(settings: Settings, pipeline: Pipeline) -> None:
    admin = AdminClient({"bootstrap.servers": settings.kafka_bootstrap})
    wanted = {name: CANONICAL_PARTITIONS for name in pipeline.raw_topics()}
    wanted.update({topic: CANONICAL_PARTITIONS for topic in pipeline.canonical_topics()})
    wanted.update({topic: CANONICAL_PARTITIONS for topic in pipeline.event_topics()})  # declared events only
    wanted[pipeline.dlq_topic] = 1
    configs = {pipeline.dlq_topic: DLQ_CONFIG, **{t: CANONICAL_CONFIG for t in pipeline.canonical_topics()}}
    if pipeline.views:
        wanted[pipeline.views_lease_topic] = 1
    if pipeline.file.erasure.subjects:
        wanted[pipeline.suppression_topic] = 1
        wanted[pipeline.erasure_topic] = 1
        configs[pipeline.suppression_topic] = SUPPRESSION_CONFIG
    existing = set(admin.list_topics(timeout=15).topics)
    keep_dlq(admin, pipeline.dlq_topic, created=pipeline.dlq_topic not in existing)
    for topic in pipeline.canonical_topics():
        keep_dlq(admin, topic, created=topic not in existing, config=CANONICAL_CONFIG)
    if pipeline.file.erasure.subjects:  # one the broker created (delete retention) would lose entries in a week
        keep_dlq(admin, pipeline.suppression_topic, created=pipeline.suppression_topic not in existing,
                 config=SUPPRESSION_CONFIG)
    missing = [NewTopic(n, num_partitions=p, replication_factor=1, config=configs.get(n, {}))
               for n, p in wanted.items() if n not in existing]
    if not missing:
        return
    for name, future in admin.create_topics(missing, operation_timeout=15).items():
        try:
            future.result()
        except Exception as exc:  # TOPIC_ALREADY_EXISTS from a concurrent worker is fine
            if "TOPIC_ALREADY_EXISTS" not in str(exc):
                raise
        log.info("event=topic_created topic=%s", name)


def web_port_taken(settings: Settings) -> str | None:
    """Why the worker's web port cannot be bound (None: it can). Bound and released at once, with the same
    address reuse as the web server, so a port in TIME_WAIT after a restart counts as free."""
    host, port = settings.worker_web_host, settings.worker_web_port
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            reason = "already in use (another worker?)" if exc.errno == errno.EADDRINUSE else exc.strerror
            return (f"changeflow worker: web port {host}:{port} cannot be bound: {reason}. Stop the process that "
                    f"holds it, or give this worker another port: CHANGEFLOW_WORKER_WEB_PORT=<port> (and "
                    f"CHANGEFLOW_WORKER_WEB_HOST for the address)")
    return None


# The erasure endpoint's body limit: a call is a few hundred bytes; anything far larger is refused unread.
ERASURE_BODY_LIMIT = 65_536
# What the endpoint runs once the caller is authenticated: (status, JSON) for the body (changeflow.erasure.api,
# given by the CLI: the worker does not import the layer above it).
ErasureHandler = Callable[[Any], tuple[int, dict[str, Any]]]


def erasure_view(settings: Settings, handle: ErasureHandler) -> type:
    """``POST /changeflow/erasure/``: deletes data, so it requires the stack's erasure token
    (``Authorization: Bearer <token>``); without it, 401 and nothing changes. Fails closed: a body it cannot
    read whole as one JSON object is refused before anything runs."""
    expected = f"Bearer {erasure_token(settings)}".encode()
    # Erasures run one at a time, on a thread of their own: never on the loop's default pool, which the decode
    # stage's deliveries use, and never two requests for one person at once.
    erasures = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="erasure")

    class ErasureEndpoint(View):
        async def post(self, request: Any) -> Any:
            given = str(request.headers.get("Authorization", "")).encode()
            if not hmac.compare_digest(given, expected):
                return self.json({"error": "unauthorized: send Authorization: Bearer <the stack's erasure token>"},
                                 status=401, headers={"WWW-Authenticate": 'Bearer realm="changeflow"'})
            length = request.headers.get("Content-Length")
            if length is None or not length.isdigit() or int(length) > ERASURE_BODY_LIMIT:
                return self.json({"error": f"a JSON body of at most {ERASURE_BODY_LIMIT} bytes, with its "
                                           "Content-Length"}, status=413 if length and length.isdigit() else 411)
            raw = await self.read_request_content(request)
            try:
                body = orjson.loads(raw)
            except orjson.JSONDecodeError:
                return self.json({"error": "the body is not JSON"}, status=400)
            if not isinstance(body, dict):
                return self.json({"error": "the body is not a JSON object"}, status=400)
            loop = asyncio.get_running_loop()
            try:
                status, out = await loop.run_in_executor(erasures, handle, body)
            except Exception as exc:  # the type only: a message may quote the id the caller sent
                log.error("event=erasure_failed error=%s", type(exc).__name__)
                return self.json({"error": f"{type(exc).__name__}; the request stays open, call again"}, status=500)
            return self.json(out, status=status)

    return ErasureEndpoint


def run(settings: Settings, pipeline: Pipeline, sink_names: list[str] | None = None, loglevel: str = "info",
        after_setup: AfterSetup | None = None, erasure: ErasureHandler | None = None) -> int:
    """Run until stopped; the exit code (module docstring): a sink's fatal stop wins over Faust's clean exit."""
    # faust.worker costs ~1 s to import (python -X importtime): paid by running a worker only, not by the users of
    # this module's helpers (ensure_topics, web_port_taken, the exit codes: the bench, the tests).
    from faust.worker import Worker

    # Before anything starts (topics, sinks, Faust): a second worker whose web port is taken stops here.
    taken = web_port_taken(settings)
    if taken is not None:
        print(taken, file=sys.stderr, flush=True)
        return EXIT_FAILED
    # Faust's data folders go under <state>/worker-data (below), which only we may enter.
    (settings.state / "worker-data").mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(settings.state / "worker-data", 0o700)
    logging.basicConfig(level=loglevel.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s")
    ensure_topics(settings, pipeline)
    seed_versions(settings, pipeline)  # before the sinks start: their setup creates every entity's table
    metrics.use_pipeline(pipeline)
    names = sink_names if sink_names is not None else sink_base.used_by(pipeline)
    # Until Faust installs its own handlers (when its worker has started), a stop request (a sink's fatal
    # error, a supervisor's SIGTERM) is only noted, then honoured as soon as Faust runs: never the default
    # action, which would end the process without stopping the sinks or saying why.
    stop_requested = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop_requested.set())
    sinks = SinkProcesses(settings, default_jobs(pipeline, names, after_setup=after_setup),
                          loglevel=loglevel, keep_fatal=True)
    sinks.start()
    views: ViewProcess | None = None
    view_failure = threading.Event()
    if pipeline.views:
        def views_exited(_code: int | None) -> None:
            view_failure.set()
            os.kill(os.getpid(), signal.SIGTERM)

        views = ViewProcess(settings, pipeline, loglevel, views_exited)
        views.start()
    code: int | str | None = EXIT_OK
    try:
        app = create_app(settings, pipeline)

        @app.task
        async def honour_early_stop() -> None:
            if stop_requested.is_set():
                os.kill(os.getpid(), signal.SIGTERM)  # now Faust's handler: a clean stop
        # Not `<app id>-data/` in whatever folder the worker was started from: under the state directory,
        # one per web port (two workers on one host never share it).
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            app.conf.datadir = settings.state / "worker-data" / f"{app.conf.id}-{settings.worker_web_port}"
        Path(app.conf.datadir).mkdir(parents=True, exist_ok=True)  # Faust does not create its parents

        @app.page("/changeflow/sinks/")
        async def sink_states(web: Any, request: Any) -> Any:
            return web.json(sinks.states())

        if erasure is not None and pipeline.file.erasure.subjects:
            app.page("/changeflow/erasure/")(erasure_view(settings, erasure))

        @app.page("/metrics")
        async def prometheus_metrics(web: Any, request: Any) -> Any:
            return web.bytes(metrics.exposition(), headers={"Content-Type": metrics.CONTENT_TYPE})

        worker = Worker(app, loglevel=loglevel, quiet=True)
        sys.argv = sys.argv[:1]
        if not stop_requested.is_set():
            try:
                worker.execute_from_commandline()
            except SystemExit as exc:  # Faust always ends this way: 0 after a signal, 1 when it failed
                code = exc.code
    finally:
        if views is not None:
            views.stop()
        sinks.stop()
    if view_failure.is_set():
        log.critical("event=worker_stopped stage=views exit_code=%d", EXIT_FAILED)
        return EXIT_FAILED
    if sinks.fatal is not None:
        log.critical("event=worker_stopped sink=%s exit_code=%d error=%r", sinks.fatal.store, sinks.fatal.exit_code,
                     sinks.fatal.error)
        return sinks.fatal.exit_code
    failure = getattr(app, "changeflow_decode_failure", None) if "app" in locals() else None
    if failure is not None and failure.is_set():
        # A batch the decode stage could not deliver: Faust stopped cleanly (exit 0) on our SIGTERM.
        log.critical("event=worker_stopped stage=decode exit_code=%d", EXIT_FAILED)
        return EXIT_FAILED
    return code if isinstance(code, int) else EXIT_FAILED
