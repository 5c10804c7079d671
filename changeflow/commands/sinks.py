"""`changeflow sinks ...`: operate the sinks' consumer groups."""

from __future__ import annotations

import sys
from typing import Annotated

import typer
from rich.console import Console

from changeflow import context

app = typer.Typer(help="Operate the sinks (each is its own consumer group).", no_args_is_help=True)
# Piped output (CI logs, scripts) must not be cut at 80 columns.
console = Console(width=None if sys.stdout.isatty() else 200)
err = Console(stderr=True, soft_wrap=True)


@app.command("reset")
def reset(
    sink: Annotated[str, typer.Argument(help="A registered store (redis, search, clickhouse, ...) or all")],
    to_earliest: Annotated[bool, typer.Option("--to-earliest", help="Replay every canonical record.")] = False,
) -> None:
    """Move a sink's committed offsets (worker stopped); the next worker start replays from there.

    Replays are safe: every sink applies a record only if it is newer than what it holds.
    """
    from sinks.base import registry
    from sinks.offsets import GroupActiveError, reset_to_earliest

    if not to_earliest:
        err.print("[red]error:[/] say where to: --to-earliest")
        raise typer.Exit(2)
    names = list(registry()) if sink == "all" else [sink]
    unknown = [n for n in names if n not in registry()]
    if unknown:
        err.print(f"[red]error:[/] unknown sink {unknown[0]!r}; known: {', '.join(registry())}, all")
        raise typer.Exit(2)
    settings, pipeline = context.settings(), context.pipeline()
    for name in names:
        try:
            replay = reset_to_earliest(settings, pipeline, name)
        except GroupActiveError as exc:
            err.print(f"[red]error:[/] {exc}")
            raise typer.Exit(1) from None
        total = sum(replay.values())
        console.print(f"sink {name}: reset to earliest; {total} records will be replayed on the next worker start")
