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

import resource
import shutil
import tempfile
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

from changeflow.pipelines.views import View, resolve
from changeflow.streams.join import ViewEngine, tk
from changeflow.streams.records import ChangeRecord
from changeflow.streams.viewstate import Prefixed, RocksState

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
