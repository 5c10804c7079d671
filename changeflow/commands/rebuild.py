"""`changeflow rebuild <sink> [--entity E]`: rebuild a derived store from PostgreSQL while changes flow."""

from __future__ import annotations

import sys
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

from changeflow import context
from changeflow.commands import args

# Piped output (CI logs, scripts) must not be cut at 80 columns.
console = Console(width=None if sys.stdout.isatty() else 200)
err = Console(stderr=True, soft_wrap=True)


def rebuild(
    sink: Annotated[str, typer.Argument(help="A registered store (redis, search, clickhouse, ...)")],
    entity: Annotated[str | None, typer.Option(help="Only this entity (default: all it stores).")] = None,
    timeout: Annotated[float, typer.Option(min=0, help="Seconds to wait per entity.")] = 1800.0,
) -> None:
    """Re-read the source through a Debezium incremental snapshot; search builds a new index and swaps its alias.

    The snapshot's reads travel the normal path, so every sink receives them (the other stores are healed
    too, and their version guards keep what is newer); the progress bar counts the snapshot reads that
    reached the ClickHouse changelog. Exit codes: 0 rebuilt; 1 it failed or timed out; 2 usage."""
    # Kept here for start-up cost (changeflow/commands/__init__.py): changeflow.sinks.rebuild ~115 ms.
    from changeflow.sinks.rebuild import RebuildError
    from changeflow.sinks.rebuild import rebuild as run

    args.store(sink, "store")
    pipeline = args.pipeline()
    if entity is not None:
        args.stored(pipeline, [entity], [sink])
        if pipeline.entities[entity].source != "postgres":
            args.usage(f"{entity} comes from {pipeline.entities[entity].source}: only PostgreSQL entities can "
                       "be rebuilt (an incremental snapshot through the signal table)")

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console) as progress:
        tasks: dict[str, TaskID] = {}

        def show(name: str, done: int, total: int) -> None:
            if name not in tasks:
                tasks[name] = progress.add_task(f"rebuild {sink} {name}", total=total)
            progress.update(tasks[name], completed=done, total=total)

        try:
            results = run(context.settings(), pipeline, sink, entity, timeout=timeout, progress=show)
        except RebuildError as exc:
            raise args.fail(str(exc)) from None
    for r in results:
        where = f" into index {r.index} (alias swapped)" if r.index else ""
        console.print(f"rebuilt {sink} {r.entity}: {r.rows} rows{where} in {r.seconds:.1f}s")
