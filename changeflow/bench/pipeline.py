"""The isolated bench worker as a child process, and how far each of its stages has got."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
from confluent_kafka.admin import AdminClient

from changeflow.bench.common import BenchSettings, GroupProgress, Isolation, free_port, partitions
from changeflow.pipelines.spec import Pipeline
from changeflow.sinks.base import used_by
from changeflow.sinks.runner import canonical_topics
from changeflow.waiting import WaitTimeout, wait_until


class BenchWorkerError(RuntimeError):
    pass


class BenchWorker:
    """``python -m changeflow.bench.worker`` for one stage: started, waited for, watched, stopped."""

    def __init__(self, base: BenchSettings, pipeline: Pipeline, iso: Isolation, log_dir: Path,
                 profile_dir: Path | None = None) -> None:
        """``pipeline``: the stage's own (``iso.pipeline(live)``), which the child rebuilds from its environment."""
        self.settings = base
        self.pipeline = pipeline
        self.iso = iso
        self.port = free_port()
        self.log_path = log_dir / f"{iso.tag}-worker.log"
        self.profile_dir = profile_dir
        self.proc: subprocess.Popen[bytes] | None = None
        self._progress: dict[str, GroupProgress] = {}
        # The stores a worker of this pipeline runs a sink for (every registered one it uses).
        self.sinks = used_by(pipeline)

    def start(self) -> None:
        env = self.iso.env(self.settings, self.port)
        if self.profile_dir is not None:
            self.profile_dir.mkdir(parents=True, exist_ok=True)
            env["CHANGEFLOW_BENCH_PROFILE"] = str(self.profile_dir.resolve())
        log = self.log_path.open("wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "changeflow.bench.worker"], env=env, stdout=log,
                                     stderr=subprocess.STDOUT, start_new_session=True)

    def _alive(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            tail = self.log_path.read_text(errors="replace")[-2000:] if self.log_path.exists() else ""
            raise BenchWorkerError(f"bench worker exited (log {self.log_path}):\n{tail}")

    def wait_ready(self, timeout: float = 90.0) -> float:
        """Until Faust serves its web port and every consumer group is Stable; seconds taken."""
        started = time.monotonic()
        groups = [self.iso.decode_group, *(self.iso.sink_group(s) for s in self.sinks)]
        admin = AdminClient({"bootstrap.servers": self.settings.kafka_bootstrap})

        def ready() -> bool:
            self._alive()
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/", timeout=2).status_code >= 500:
                    return False
            except httpx.HTTPError:
                return False
            states = []
            for future in admin.describe_consumer_groups(groups, request_timeout=10).values():
                try:
                    states.append(str(future.result().state).rsplit(".", 1)[-1].upper())
                except Exception:
                    states.append("UNKNOWN")
            return all(s == "STABLE" for s in states)

        wait_until(ready, timeout, what="bench worker ready", error=lambda _: BenchWorkerError(
            f"bench worker not ready after {timeout:.0f}s (log {self.log_path})"))
        return time.monotonic() - started

    def pids(self) -> dict[str, int]:
        """``decode`` (the worker process) and ``sink:<name>`` (each sink process, from the worker's web page)."""
        assert self.proc is not None
        out = {"decode": self.proc.pid}
        try:
            states = httpx.get(f"http://127.0.0.1:{self.port}/changeflow/sinks/", timeout=5).json()
        except (httpx.HTTPError, ValueError):
            states = {}
        out.update({f"sink:{name}": int(st["pid"]) for name, st in states.items() if st.get("pid")})
        return out

    def applied(self) -> dict[str, int]:
        """Records each sink has written and committed (its group's committed offsets on the canonical topics)."""
        if not self._progress:
            tps = partitions(self.settings, canonical_topics(self.pipeline))
            self._progress = {s: GroupProgress(self.settings, self.iso.sink_group(s), tps) for s in self.sinks}
        return {s: p.committed() for s, p in self._progress.items()}

    def wait_applied(self, expected: int, timeout: float, poll: float = 0.05) -> dict[str, float | None]:
        """Wall-clock time (epoch s) at which each sink had applied ``expected`` records; None if it did not."""
        done: dict[str, float | None] = dict.fromkeys(self.sinks)

        def all_applied() -> bool:
            self._alive()
            now = time.time()
            for sink, count in self.applied().items():
                if done[sink] is None and count >= expected:
                    done[sink] = now
            return all(v is not None for v in done.values())

        with contextlib.suppress(WaitTimeout):  # the sinks that did not get there stay None
            wait_until(all_applied, timeout, what=f"every sink applied {expected} records", interval=poll)
        return done

    def stop(self) -> None:
        for progress in self._progress.values():
            with contextlib.suppress(Exception):
                progress.close()
        self._progress = {}
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(45)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
