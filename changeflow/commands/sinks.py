"""`changeflow sinks ...`: operate the sinks' consumer groups."""

from __future__ import annotations

import sys
from typing import Annotated

import typer
from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient
from rich.console import Console

from changeflow import context
from changeflow.commands import args
from changeflow.deploy.worker import WorkerService

app = typer.Typer(help="Operate the sinks (each is its own consumer group).", no_args_is_help=True)
# Piped output (CI logs, scripts) must not be cut at 80 columns.
console = Console(width=None if sys.stdout.isatty() else 200)


def active_groups(groups: list[str]) -> dict[str, list[str]]:
    """group → its members (client id @ host), for the groups that have any."""
    # log_level 3: librdkafka's informational lines ("Purging 1 unserved events") are not the user's business.
    admin = AdminClient({"bootstrap.servers": context.settings().kafka_bootstrap, "log_level": 3})
    active: dict[str, list[str]] = {}
    for group, future in admin.describe_consumer_groups(groups, request_timeout=15).items():
        described = future.result()
        if described.members:
            active[group] = [f"{m.client_id}@{m.host}" for m in described.members]
    return active


@app.command("reset")
def reset(
    sink: Annotated[str, typer.Argument(help="A registered store (redis, search, clickhouse, ...) or all")],
    to_earliest: Annotated[bool, typer.Option("--to-earliest", help="Replay every canonical record.")] = False,
) -> None:
    """Move a sink's committed offsets (worker stopped); the next worker start replays from there.

    Replays are safe: every sink applies a record only if it is newer than what it holds. With `all`, every
    sink is checked first and none is reset while any of them has a running consumer.

    Exit codes: 0 reset; 1 a worker still consumes (nothing reset) or Kafka failed; 2 usage."""
    # Kept here for start-up cost (changeflow/commands/__init__.py): changeflow.sinks.offsets ~125 ms.

    from changeflow.sinks.offsets import GroupActiveError, reset_to_earliest

    args.store(sink, "sink", allow_all=True)
    if not to_earliest:
        args.usage("say where to: --to-earliest")
    names = args.registered_stores() if sink == "all" else [sink]
    settings, pipeline = context.settings(), args.pipeline()
    groups = {name: pipeline.sink_group(name) for name in names}
    try:
        active = active_groups(list(groups.values()))
    except KafkaException as exc:
        raise args.fail(f"kafka at {settings.kafka_bootstrap}: {exc.args[0] if exc.args else exc}") from None
    if active:
        busy = "; ".join(f"{g} ({len(m)} member(s): {', '.join(m)})" for g, m in active.items())
        raise args.fail(f"a worker is consuming, nothing was reset: {busy}. Stop the worker first: "
                        f"{WorkerService(settings).stop_hint()}")
    for name in names:
        if not pipeline.stored_in(name):
            console.print(f"sink {name}: holds no entity of pipeline {pipeline.name}; nothing to reset")
            continue
        try:
            replay = reset_to_earliest(settings, pipeline, name)
        except GroupActiveError as exc:  # a worker started between the check and the reset
            raise args.fail(f"{exc}; sinks reset before it: "
                            f"{', '.join(names[:names.index(name)]) or 'none'}") from None
        except KafkaException as exc:
            raise args.fail(f"sink {name}: {exc.args[0] if exc.args else exc}") from None
        total = sum(replay.values())
        console.print(f"sink {name}: reset to earliest; {total} records will be replayed on the next worker start")
