"""`changeflow bench views`: the view stage's engine on its real on-disk state (RocksDB), in this process.

What it measures, each printed with its method:
- how fast records go through a two-way join (orders -> users, "orders of users in New York"): records applied
  and recomputed per second, state committed every batch as the stage does;
- the memory and disk that state takes with ``orders`` orders in it (this process's RSS: the view stage is
  this same code in a process of its own);
- the time to fan out one change of a user with ``hot`` orders (their city moves to New York: every order
  enters the view), in the stage's steps, with the longest step: what another key waits at most.

The Kafka and store legs are the same as an entity's, measured by `changeflow bench`; this isolates what a
view adds.
"""

from __future__ import annotations

import contextlib
import resource
import shutil
import tempfile
import time
import uuid as uuid_mod
from decimal import Decimal
from pathlib import Path
from typing import Any

import psycopg

from changeflow.bench.common import percentile
from changeflow.deploy.workload import feed_users
from changeflow.pipelines.views import View, resolve
from changeflow.sinks.base import create, used_by
from changeflow.streams.join import ViewEngine, tk
from changeflow.streams.records import ChangeRecord
from changeflow.streams.viewstate import Prefixed, RocksState
from changeflow.waiting import WaitTimeout, wait_until

BATCH = 2000
FANOUT_STEP = 1000
NY = View.model_validate({
    "from": "orders", "join": {"user": {"entity": "users", "on": "user_id"}},
    "fields": {"total": "total", "status": "status", "user_name": "user.name", "city": "user.profile.address.city"},
    "filter": "city == 'New York'",
})


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _disk_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20


def _user(uid: int, version: int, city: str) -> ChangeRecord:
    return ChangeRecord("postgres", "users", str(uid), "u", version, version, None,
                        {"id": uid, "name": f"user {uid}", "profile": {"address": {"city": city}}},
                        key_columns=("id",))


def _order(oid: int, version: int, uid: int) -> ChangeRecord:
    return ChangeRecord("postgres", "orders", str(oid), "c", version, version, None,
                        {"id": oid, "user_id": uid, "total": Decimal(oid % 10_000) / 100, "status": "paid"},
                        key_columns=("id",))


def _drain(engine: ViewEngine, db: RocksState, state: Prefixed) -> tuple[int, float]:
    """Work until nothing is left, as the stage does (a step, a commit, the outputs taken); (outputs, longest
    step in seconds)."""
    outputs, longest = 0, 0.0
    while True:
        started = time.perf_counter()
        steps = engine.work(state, FANOUT_STEP)
        db.commit()
        pending = [p for p, *_ in ViewEngine.pending(state)]
        for p in pending:
            state.delete(p)
        db.commit()
        longest = max(longest, time.perf_counter() - started)
        outputs += len(pending)
        if not steps:
            return outputs, longest


def run_views(orders: int = 1_000_000, hot: int = 100_000, users: int = 10_000,
              workdir: Path | None = None) -> dict[str, Any]:
    base = Path(tempfile.mkdtemp(prefix="changeflow-bench-views-", dir=workdir))
    try:
        db = RocksState(base / "state")
        state = Prefixed(db, tk(b"V", "ny_orders"))
        version = iter(range(1, 10**12))
        engine = ViewEngine(resolve("ny_orders", NY, {"orders": None, "users": None}), lambda: next(version))
        rss_before = _rss_mb()
        started = time.perf_counter()
        for uid in range(users):
            engine.apply(state, _user(uid, next(version), "New York" if uid % 10 == 0 else "Boston"))
        _drain(engine, db, state)
        batch = 0
        hot_user = users  # the hot user's orders come first; every other order goes to the `users` users
        engine.apply(state, _user(hot_user, next(version), "Boston"))
        for oid in range(orders):
            uid = hot_user if oid < hot else oid % users
            engine.apply(state, _order(oid, next(version), uid))
            batch += 1
            if batch == BATCH:
                _drain(engine, db, state)
                batch = 0
        _drain(engine, db, state)
        load_s = time.perf_counter() - started
        rss_loaded = _rss_mb()
        disk = _disk_mb(base)
        started = time.perf_counter()
        engine.apply(state, _user(hot_user, next(version), "New York"))
        fanned, longest = _drain(engine, db, state)
        fanout_s = time.perf_counter() - started
        db.close()
        return {
            "orders": orders, "users": users + 1, "hot_user_orders": hot,
            "apply_records_per_s": round((orders + users + 1) / load_s),
            "load_seconds": round(load_s, 1),
            "rss_mb_before": round(rss_before), "rss_mb_with_state": round(rss_loaded), "state_disk_mb": round(disk),
            "hot_fanout_seconds": round(fanout_s, 2), "hot_fanout_rows": fanned,
            "hot_fanout_longest_step_ms": round(longest * 1000), "fanout_step": FANOUT_STEP,
        }
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _visible(stores: dict[str, Any], spec: Any, keys: list[str]) -> set[str]:
    """The keys every store holding ``spec`` shows (each store's ``visible`` hook, the bench's own)."""
    found: set[str] | None = None
    for name, store in stores.items():
        if not spec.stored_in(name) or not callable(getattr(store, "visible", None)):
            continue
        try:
            seen = set(store.visible(spec, keys))
        except Exception:  # the view's table or index is made with its first row
            seen = set()
        found = seen if found is None else found & seen
    return found or set()


def run_views_live(settings: Any, pipeline: Any, backlog: int = 20_000, rate: int = 1000, seconds: float = 10.0,
                   timeout: float = 300.0, say: Any = print) -> dict[str, Any]:
    """The commerce pipeline's view ``ny_orders`` against its entity ``orders``, on the live stack (connector
    and worker running), in one run: orders of New York users inserted at once (``backlog``), then at
    ``rate`` per second for ``seconds``; each order's first visibility in ClickHouse polled every 50 ms in the
    orders table and in the view, in every store that holds each (the stores' ``visible`` hook). Throughput:
    orders over the time until the last is visible, view over entity. Freshness: commit to visibility in every
    store, per order (a 50 ms poll interval of over-estimate each)."""
    users = pipeline.entity("users")
    fed = feed_users(settings.kafka_bootstrap, users.raw_topic)
    ny = [u for u, d in fed.users.items() if d["profile"]["address"]["city"] == "New York"]
    dsn = pipeline.source_dsn(settings)
    tag = f"bench-{uuid_mod.uuid4().hex[:8]}"
    out: dict[str, Any] = {"backlog_orders": backlog, "rate": rate, "seconds": seconds}

    def insert(n: int, status: str) -> list[str]:
        ids = [str(uuid_mod.uuid4()) for _ in range(n)]
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("INSERT INTO orders (id, user_id, status, total_amount) SELECT i::uuid, u, %s, 1.00 "
                         "FROM unnest(%s::text[], %s::text[]) AS t(i, u)",
                         (status, ids, [ny[k % len(ny)] for k in range(n)]))
        return ids

    stores = {n: create(n, settings, pipeline) for n in used_by(pipeline)}

    def wait(expected: set[str]) -> dict[str, dict[str, float]]:
        seen: dict[str, dict[str, float]] = {"orders": {}, "ny_orders": {}}

        def all_seen() -> bool:
            for table in seen:
                pending = sorted(expected - set(seen[table]))[:2000]
                now = time.time()
                for i in _visible(stores, pipeline.entity(table), pending):
                    seen[table].setdefault(i, now)
            return all(len(s) >= len(expected) for s in seen.values())

        if expected:
            with contextlib.suppress(WaitTimeout):  # what was seen in time is the figure
                wait_until(all_seen, timeout, what="the orders in the entity and the view", interval=0.05)
        return seen

    try:
        say(f"views: {backlog:,} orders of New York users at once")
        started = time.time()
        ids = set(insert(backlog, tag + "-b"))
        seen = wait(ids)
        for table in seen:
            last = max(seen[table].values(), default=None)
            out[f"backlog_{table}_changes_per_s"] = (round(len(seen[table]) / (last - started))
                                                     if last and len(seen[table]) == len(ids) else None)
        entity, view = out["backlog_orders_changes_per_s"], out["backlog_ny_orders_changes_per_s"]
        out["backlog_view_vs_entity"] = round(view / entity, 2) if entity and view else None
        say(f"views: {rate:,} orders/s for {seconds:.0f} s")
        committed: dict[str, float] = {}
        tick = 0.05
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            t0 = time.monotonic()
            for i in insert(max(1, int(rate * tick)), tag + "-f"):
                committed[i] = time.time()
            time.sleep(max(0.0, tick - (time.monotonic() - t0)))
        seen = wait(set(committed))
        for table in seen:
            lags = [(seen[table][i] - committed[i]) * 1000 for i in committed if i in seen[table]]
            out[f"freshness_{table}_ms"] = {"p50": percentile(lags, 50), "p99": percentile(lags, 99),
                                            "seen": len(lags), "sent": len(committed)}
    finally:
        for store in stores.values():
            store.close()
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("DELETE FROM orders WHERE status LIKE %s", (tag + "-%",))
    return out
