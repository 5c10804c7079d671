"""`changeflow dlq`: see what the pipeline could not decode, and send it back once the cause is fixed."""

from __future__ import annotations

import json
import sys
from enum import StrEnum
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from changeflow import context

app = typer.Typer(help="Dead letters: list them, replay them once the cause is fixed.", no_args_is_help=True)

# Piped output (CI logs, tests) must not be cut at 80 columns.
console = Console(width=None if sys.stdout.isatty() else 200)
err = Console(stderr=True, soft_wrap=True)


class Format(StrEnum):
    table = "table"
    json = "json"


def _fail(message: str, code: int = 1) -> typer.Exit:
    err.print(f"[bold red]error:[/] {escape(message)}", highlight=False)
    return typer.Exit(code)


def _size(data: bytes | None) -> str:
    return "null" if data is None else f"{len(data)} B"


@app.command("list")
def list_(
    format: Annotated[Format, typer.Option("--format", help="table or json")] = Format.table,
    limit: Annotated[int | None, typer.Option("--limit", min=1, help="Only the newest N dead letters.")] = None,
) -> None:
    """Every dead letter on the DLQ topic (read from the beginning, nothing committed), oldest first."""
    from confluent_kafka import KafkaException

    from streams.dlq import iso_ms, read_dead_letters, read_replays

    settings, pipeline = context.settings(), context.pipeline()
    try:
        entries = read_dead_letters(settings, pipeline)
        replays = read_replays(settings, pipeline)
    except (KafkaException, TimeoutError) as exc:
        raise _fail(f"reading {pipeline.dlq_topic}: {exc}") from None
    total = len(entries)
    if limit is not None:
        entries = entries[-limit:]
    if format is Format.json:
        rows: list[dict[str, Any]] = []
        for e in entries:
            done = replays.get(e.id)
            rows.append({
                **e.as_dict(),
                "replayed": done is not None,
                "replayed_at": iso_ms(done.replayed_at_ms) if done else None,
                "replayed_to": f"{done.topic}:{done.partition}:{done.offset}" if done else None,
            })
        print(json.dumps(rows, indent=2))
        return
    if not entries:
        console.print(f"no dead letters on {pipeline.dlq_topic}")
        return
    table = Table(title=f"dead letters on {pipeline.dlq_topic}: {len(entries)} of {total}")
    table.add_column("id", no_wrap=True)  # ids are copied into `dlq replay --id`: never split them
    for col in ("error", "dead at", "key", "value", "copies", "replayed"):
        table.add_column(col, overflow="fold")
    for e in entries:
        done = replays.get(e.id)
        table.add_row(
            escape(e.id), escape(e.error), iso_ms(e.dead_at_ms) or "-",
            escape(f"{_size(e.key)} {e.as_dict()['key_preview']}"),
            escape(f"{_size(e.value)} {e.as_dict()['value_preview']}"),
            str(e.copies),
            f"[green]{iso_ms(done.replayed_at_ms)}[/]" if done else ("-" if e.replayable else "[red]not replayable[/]"),
        )
    console.print(table)


@app.command("replay")
def replay_(
    ids: Annotated[list[str] | None, typer.Option("--id", help="Dead-letter id (repeatable), from `dlq list`.")] = None,
    all_: Annotated[bool, typer.Option("--all", help="Every dead letter not replayed yet.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Replay even ids already replayed.")] = False,
    format: Annotated[Format, typer.Option("--format", help="table or json")] = Format.table,
) -> None:
    """Send the original bytes back to their source topic and partition so the normal decode path
    handles them; each replay is recorded, so running it again skips what is done."""
    from confluent_kafka import KafkaException

    from streams.dlq import UnknownDeadLetterError, iso_ms, plan_replay, read_dead_letters, read_replays, replay

    if not ids and not all_:
        raise _fail("say which dead letters to replay: --id ID (repeatable) or --all", code=2)
    if ids and all_:
        raise _fail("--id and --all exclude each other", code=2)
    settings, pipeline = context.settings(), context.pipeline()
    try:
        entries = read_dead_letters(settings, pipeline)
        replays = read_replays(settings, pipeline)
        plan = plan_replay(entries, replays, ids=ids or (), all_=all_, force=force)
        done = replay(settings, pipeline, plan.send)
    except UnknownDeadLetterError as exc:
        raise _fail(f"{exc} (not on {pipeline.dlq_topic}; see `changeflow dlq list`)") from None
    except (KafkaException, TimeoutError) as exc:
        raise _fail(f"replay: {exc}") from None

    if format is Format.json:
        print(json.dumps({
            "replayed": [
                {"id": r.id, "replayed_at": iso_ms(r.replayed_at_ms), "topic": r.topic, "partition": r.partition,
                 "offset": r.offset}
                for r in done
            ],
            "skipped": [{"id": s.entry.id, "reason": s.reason} for s in plan.skip],
        }, indent=2))
        return
    table = Table(title=f"replay: {len(done)} replayed, {len(plan.skip)} skipped")
    for col in ("id", "outcome", "detail"):
        table.add_column(col, overflow="fold")
    for r in done:
        table.add_row(escape(r.id), "[green]replayed[/]", escape(f"sent to {r.topic}:{r.partition}:{r.offset}"))
    for s in plan.skip:
        table.add_row(escape(s.entry.id), "[yellow]skipped[/]", escape(s.reason))
    console.print(table)
