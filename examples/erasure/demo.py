"""The erasure demo (the last step of `make demo`): one user who has orders erased from every store, view and
topic of the commerce pipeline, and the request tracked until every projection has confirmed.

It runs after `changeflow demo`, against its stack and running worker:

1. picks the user with the most orders;
2. the user service deletes the user: a MongoDB delete, written to the raw topic as Debezium's MongoDB connector
   writes it (the native stack has no MongoDB server, so the request is told so with ``--source-deleted``);
3. ``changeflow erase user <id>``: the user's row goes from Redis, search and ClickHouse, their orders stay
   for finance with the link to them cut, the "orders of users in New York" view drops theirs;
4. the billing service (an external projection) confirms over the worker's HTTP endpoint, with the stack's
   token; the request closes.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import httpx
import orjson
import psycopg
from confluent_kafka import Producer

from changeflow.deploy.secrets import erasure_token
from changeflow.pipelines.load import load
from changeflow.settings import Settings
from changeflow.sinks import base

PIPELINE = Path(__file__).resolve().parents[1] / "commerce" / "pipeline.yml"


def _changeflow(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "changeflow", "--pipeline", str(PIPELINE), *args], text=True,
                          capture_output=True, check=False)


def _delete_at_the_source(settings: Settings, topic: str, user: str) -> None:
    """The user service's delete, as Debezium's MongoDB connector writes it (a delete, then its tombstone)."""
    now = int(time.time() * 1000)
    source = {"version": "3.5.0.Final", "connector": "mongodb", "name": "users", "ts_ms": now, "snapshot": "false",
              "db": "users", "sequence": None, "collection": "users", "ord": 1, "lsid": None, "txnNumber": None,
              "wallTime": now}
    key = orjson.dumps({"id": orjson.dumps(user).decode()})
    producer = Producer({"bootstrap.servers": settings.kafka_bootstrap, "acks": "all"})
    producer.produce(topic, key=key, value=orjson.dumps({"before": None, "after": None, "updateDescription": None,
                                                         "source": source, "op": "d", "ts_ms": now,
                                                         "transaction": None}))
    producer.produce(topic, key=key, value=None)
    producer.flush(30)


def main() -> None:
    settings = Settings()
    pipeline = load(PIPELINE)
    with psycopg.connect(pipeline.source_dsn(settings)) as conn:
        row = conn.execute("SELECT user_id, count(*) FROM orders GROUP BY user_id ORDER BY 2 DESC, 1 LIMIT 1"
                           ).fetchone()
        if row is None:
            sys.exit("no orders: run `changeflow demo` first")
        user, orders = str(row[0]), int(row[1])
        order_ids = [str(r[0]) for r in conn.execute("SELECT id FROM orders WHERE user_id = %s", (user,))]
    users = pipeline.entity("users")
    print(f"erasure: {user} has {orders} orders; the user service deletes the user (a MongoDB delete on "
          f"{users.raw_topic})")
    _delete_at_the_source(settings, users.raw_topic, user)
    time.sleep(2)
    erased = _changeflow("erase", "user", user, "--source-deleted", "--json")
    if erased.returncode != 0:
        sys.exit(f"changeflow erase failed: {erased.stderr.strip()}")
    request = json.loads(erased.stdout)
    print(f"request {request['request']}: {len(request['projections'])} projections")
    for p in request["projections"]:
        due = f", purged by {p['purge_due'][:16]}" if p["purge_due"] and p["state"] == "erased" else ""
        print(f"  {p['name']:<44} {p['state']}{due}")

    # Read back, through the store registry: the user is gone, the orders are kept without the link.
    found = []
    for name in base.used_by(pipeline):
        store = base.create(name, settings, pipeline)
        try:
            if users.stored_in(name) and store.fetch(users, [user]):
                found.append(f"{name} still holds the user")
            held = store.traces(users, [user]) if users.stored_in(name) else 0
            if held:
                found.append(f"{name} still holds {held} traces of the user")
            spec = pipeline.entity("orders")
            kept = store.fetch(spec, order_ids) if spec.stored_in(name) else {}
            linked = [k for k, v in kept.items() if v.row.get("user_id") is not None]
            if spec.stored_in(name) and (len(kept) != len(order_ids) or linked):
                found.append(f"{name} holds {len(kept)} of the {len(order_ids)} orders, {len(linked)} still linked")
        finally:
            store.close()
    if found:
        sys.exit("erasure incomplete: " + "; ".join(found))
    print(f"read back: no store holds the user; their {len(order_ids)} orders stay in every store, with user_id "
          "cleared")

    url = f"http://{settings.worker_web_host}:{settings.worker_web_port}/changeflow/erasure/"
    body = {"action": "confirm", "request": request["request"], "projection": "billing"}
    refused = httpx.post(url, json=body, timeout=30)
    print(f"billing confirms without the token: HTTP {refused.status_code} (nothing changed)")
    confirmed = httpx.post(url, json=body, timeout=30,
                           headers={"Authorization": f"Bearer {erasure_token(settings)}"})
    if confirmed.status_code != 200:
        sys.exit(f"the confirmation was refused: HTTP {confirmed.status_code} {confirmed.text}")
    state = confirmed.json()["state"]
    print(f"billing confirms with the token: HTTP 200; request {request['request']} is {state}")
    if state != "closed":
        sys.exit("the request did not close: " + json.dumps(confirmed.json()["projections"]))


if __name__ == "__main__":
    main()
