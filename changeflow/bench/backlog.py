"""Backlog throughput: N Debezium-shaped changes already in Kafka, through decode, transform and all three sinks.

One backlog topic per run; three readers of it, one after the other so none competes with another for the CPU:
the bare consume-and-decode ceiling, the naive consumer (time-boxed), then changeflow's own worker code
(``bench.worker``: the decode stage and the three sink runners in one process, like ``changeflow worker``).
changeflow's throughput is N over the time from its first decoded record to the moment the slowest sink had
committed all N (sinks commit only after writing, so committed means visible in the store).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from confluent_kafka import Producer

from changeflow.bench import naive as naive_mod
from changeflow.bench.common import BenchSettings, Isolation, message_time_span, partitions
from changeflow.bench.cpu import CpuMeter, per_change_us
from changeflow.bench.envelopes import backlog
from changeflow.bench.pipeline import BenchWorker
from changeflow.deploy import stack
from changeflow.pipelines.spec import Pipeline
from changeflow.sinks.runner import canonical_topics
from changeflow.worker import ensure_topics

Say = Callable[[str], None]


def produce_backlog(settings: BenchSettings, topic: str, n: int, id_base: int, prefix: str) -> int:
    """Write the backlog; returns the number of Kafka messages (changes plus delete tombstones)."""
    producer = Producer({"bootstrap.servers": settings.kafka_bootstrap, "linger.ms": 20, "batch.size": 1_000_000,
                         "queue.buffering.max.messages": 200_000, "acks": "all"})
    count = 0
    for key, value in backlog(prefix, n, id_base):
        while True:
            try:
                producer.produce(topic, key=key, value=value)
                break
            except BufferError:
                producer.poll(0.1)
        count += 1
        if count % 10_000 == 0:
            producer.poll(0)
    if producer.flush(120) != 0:
        raise RuntimeError("backlog not fully delivered to Kafka")
    return count


def run(base: BenchSettings, live: Pipeline, run_id: str, n: int, naive_budget_s: float, log_dir: Path,
        profile_dir: Path | None, say: Say, timeout: float = 900.0) -> dict[str, Any]:
    iso = Isolation(run_id, "backlog")
    settings = iso.settings(base)
    pipeline = iso.pipeline(live)
    topic = pipeline.entities["products"].raw_topic

    ensure_topics(settings, pipeline)
    say(f"backlog: producing {n:,} Debezium-shaped changes into {topic}")
    started = time.perf_counter()
    messages = produce_backlog(settings, topic, n, iso.id_base, iso.raw_prefix)
    produce_s = time.perf_counter() - started

    say("backlog: ceiling (bare confluent-kafka consume + decode)")
    before = os.times()
    ceiling = naive_mod.ceiling(settings, pipeline, topic, f"{iso.tag}-ceiling", messages)
    after = os.times()
    ceiling_cpu = (after.user - before.user) + (after.system - before.system)
    say(f"backlog: naive consumer (one at a time, {naive_budget_s:.0f}s budget)")
    naive, _keys = naive_mod.naive(settings, pipeline, topic, f"{iso.tag}-naive", f"{iso.tag}-naive:", naive_budget_s,
                                        messages)

    say("backlog: changeflow worker, production code path (decode stage + 3 sink processes)")
    worker = _worker_pass(base, pipeline, iso, n, log_dir, profile_dir, timeout)
    return {
        "changes": n,
        "kafka_messages": messages,
        "produce_s": round(produce_s, 2),
        **worker,
        "decode_stage": "Faust decode agent fed by a confluent-kafka batch consumer (streams.app)",
        "ceiling_changes_per_s": _r(ceiling.per_s),
        "ceiling_cpu_us_per_change": round(ceiling_cpu / ceiling.changes * 1e6, 1) if ceiling.changes else None,
        "ceiling_changes": ceiling.changes,
        "naive_changes_per_s": _r(naive.per_s),
        "naive_changes": naive.changes,
        "naive_seconds": round(naive.seconds, 2),
    }


def _worker_pass(base: BenchSettings, pipeline: Pipeline, iso: Isolation, n: int, log_dir: Path,
                 profile_dir: Path | None, timeout: float) -> dict[str, Any]:
    """One bench worker over the backlog: N over first decoded record → last sink committed."""
    settings = iso.settings(base)
    worker = BenchWorker(settings, pipeline, iso, log_dir, profile_dir)
    worker.start()
    try:
        ready_s = worker.wait_ready()
        # Measured from ready (startup excluded) to the last sink's commit: the backlog's own CPU.
        pids = {**worker.pids(), **{svc.name: svc.pid for svc in stack.status(settings)
                                    if svc.pid and not svc.name.startswith("worker")}}
        meter = CpuMeter(pids)
        meter.start()
        done = worker.wait_applied(n, timeout)
        cpu = meter.stop()
        applied = worker.applied()
    finally:
        worker.stop()
    span = message_time_span(settings, partitions(settings, canonical_topics(pipeline)))
    if span is None:
        raise RuntimeError(f"no canonical record was produced (see {worker.log_path})")
    first, last = span
    per_sink = {s: (n / (t - first) if t is not None and t > first else None) for s, t in done.items()}
    finished = [t for t in done.values() if t is not None]
    all_done = len(finished) == len(worker.sinks)
    total_s = (max(finished) - first) if all_done else None
    return {
        "throughput_changes_per_s": _r(n / total_s if total_s else None),
        "seconds": _r(total_s, 2),
        "decode_stage_changes_per_s": _r(n / (last - first) if last > first else None),
        "per_sink_changes_per_s": {s: _r(v) for s, v in per_sink.items()},
        "applied": applied,
        "complete": all_done,
        "worker_startup_s": round(ready_s, 2),
        "cpu_us_per_change": per_change_us(cpu, n, own=("decode", *(f"sink:{s}" for s in worker.sinks))),
        "worker_log": str(worker.log_path),
    }


def _r(value: float | None, digits: int = 0) -> float | None:
    if value is None:
        return None
    return round(value, digits) if digits else float(round(value))
