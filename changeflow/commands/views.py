"""`changeflow views`: the pipeline's read models. `views drop NAME` removes what a view created: its rows in
every store (and the store's object for it, where the store can drop one entity's), and its topic."""

from __future__ import annotations

import sys
from typing import Annotated

import typer
from confluent_kafka.admin import AdminClient
from rich.console import Console
from rich.markup import escape

from changeflow import context
from changeflow.commands import args
from changeflow.commands.sinks import active_groups
from changeflow.sinks.base import create, names, used_by

app = typer.Typer(help="Read models (views).", no_args_is_help=True)
console = Console(width=None if sys.stdout.isatty() else 200)
err = Console(stderr=True, soft_wrap=True)

CHUNK = 1000


@app.command("drop")
def drop(
    name: Annotated[str, typer.Argument(help="A view of the pipeline (still declared in its file).")],
    yes: Annotated[bool, typer.Option("--yes", help="Do not ask.")] = False,
) -> None:
    """Remove a view's rows from every store, the stores' objects for it and its topic (refused while a worker of
    the pipeline runs); then remove it from the pipeline file: the next worker rebuilds the other views."""
    pipeline = context.pipeline()
    if name not in pipeline.views:
        known = ", ".join(pipeline.views) or "none"
        args.usage(f"unknown view {name!r}; this pipeline's views: {known}")
    settings = context.settings()
    groups = [pipeline.decode_group, pipeline.views_group, *(pipeline.sink_group(n) for n in names())]
    busy = active_groups(groups)
    if busy:
        err.print(f"[bold red]error:[/] a worker of pipeline {escape(pipeline.name)} is running "
                  f"({escape(', '.join(busy))}): stop it first; nothing was removed", highlight=False)
        raise typer.Exit(1)
    spec = pipeline.entity(name)
    if not yes and not typer.confirm(f"remove view {name}'s rows, objects and topic {spec.canonical_topic}?"):
        raise typer.Exit(1)
    for store_name in used_by(pipeline):
        if not spec.stored_in(store_name):
            continue
        store = create(store_name, settings, pipeline)
        try:
            keys = [key for key, _row, _version in store.scan(spec)]
            for i in range(0, len(keys), CHUNK):
                store.delete(spec, keys[i : i + CHUNK])
            console.print(f"{store_name}: {len(keys)} rows of view {escape(name)} deleted", highlight=False)
            drop_entity = getattr(store, "drop_entity", None)
            for line in (drop_entity(spec) if callable(drop_entity) else []):
                console.print(escape(line), highlight=False)
        finally:
            store.close()
    admin = AdminClient({"bootstrap.servers": settings.kafka_bootstrap, "log_level": 3})
    if spec.canonical_topic in admin.list_topics(timeout=15).topics:
        for future in admin.delete_topics([spec.canonical_topic], operation_timeout=30).values():
            future.result()
        console.print(f"kafka: topic {escape(spec.canonical_topic)} deleted", highlight=False)
    console.print(f"now remove views.{escape(name)} from {escape(str(pipeline.path))}: the next worker rebuilds the "
                  "other views from the entities' topics", highlight=False)
