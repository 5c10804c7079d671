"""`changeflow erase SUBJECT ID` and `changeflow erasure status|confirm`: a person erased from every projection,
tracked until each one confirms (README "Erasure")."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Annotated, Any

import orjson
import typer
from confluent_kafka import KafkaException
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from changeflow import context
from changeflow.reports import home

if TYPE_CHECKING:
    from changeflow.erasure.tracking import Request


def _run() -> Any:
    # changeflow.erasure.run costs ~180 ms to import (psycopg, the stores' clients; python -X importtime,
    # 3 runs: 177-204 ms), which every CLI command would pay at start-up: only the erasure commands do.
    from changeflow.erasure import run

    return run

app = typer.Typer(help="Erasure requests: their status, and confirmations from other services.",
                  no_args_is_help=True)
console = Console(width=None if sys.stdout.isatty() else 200)
err = Console(stderr=True, soft_wrap=True)


def _fail(exc: Exception) -> None:
    err.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False)
    raise typer.Exit(1)


def _failures() -> tuple[type[Exception], ...]:
    """What stops an erasure command with a message (the request stays open; running it again resumes it):
    its own errors, and the home store, Kafka or the source failing."""
    # Kept here for start-up cost (changeflow/commands/__init__.py): psycopg ~70-180 ms.
    import psycopg

    return (_run().ErasureError, *home.errors(), KafkaException, psycopg.Error, TimeoutError)


def erase(
    subject: Annotated[str, typer.Argument(help="A subject of the pipeline's `erasure:` section (e.g. user).")],
    subject_id: Annotated[str, typer.Argument(metavar="ID", help="The person's key in the subject's entity.")],
    wait_source: Annotated[float, typer.Option("--wait-source", metavar="SECONDS",
                                               help="Wait this long for the source to delete the person.")] = 0.0,
    source_deleted: Annotated[bool, typer.Option(
        "--source-deleted", help="The source cannot be read from here (MongoDB): its owner has deleted the person; "
                                 "recorded in the request.")] = False,
    timeout: Annotated[float, typer.Option(help="How long to wait for the stores and views to apply it.")] = 120.0,
    force: Annotated[bool, typer.Option("--force", help="Erase even though no store holds or held this id (a "
                                                        "copy only other services hold).")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="The request as JSON.")] = False,
) -> None:
    """Erase a person from every store, entity, view and topic of the pipeline, and track it to confirmation.
    Run it again to resume a request that stopped: it is idempotent."""
    run = _run()
    pipeline = context.pipeline()
    settings = context.settings()
    say = (lambda _line: None) if as_json else (lambda line: console.print(escape(line), highlight=False))
    try:
        request = run.erase(settings, pipeline, subject, subject_id, wait_source_s=wait_source,
                            source_deleted=source_deleted, apply_timeout_s=timeout, force=force, say=say)
    except _failures() as exc:
        _fail(exc)
        return
    if as_json:
        sys.stdout.write(orjson.dumps(run.as_json(request), option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        _show(request)


def _show(request: Request) -> None:
    table = Table(title=f"erasure request {request.id} ({request.subject}): {request.state}", title_justify="left")
    for column in ("projection", "state", "purge due (UTC)", "detail"):
        table.add_column(column, overflow="fold")
    for p in request.projections:
        table.add_row(escape(p.name), p.state, f"{p.purge_due:%Y-%m-%d %H:%M}" if p.purge_due else "",
                      escape(p.detail))
    console.print(table)
    waiting = [p.name for p in request.projections if not p.confirmed]
    if waiting:
        console.print(f"open: waiting for {escape(', '.join(waiting))}", highlight=False)
    else:
        console.print(f"closed: {escape(request.detail)}", highlight=False)


@app.command("status")
def status(
    request_id: Annotated[str | None, typer.Argument(metavar="[REQUEST]", help="One request; default: all.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="As JSON.")] = False,
) -> None:
    """Each request's projections: pending, erased (read back: nothing) or purged (physically gone), with when."""
    run = _run()
    try:
        found = run.status(context.settings(), context.pipeline(), request_id)
    except _failures() as exc:
        _fail(exc)
        return
    if as_json:
        sys.stdout.write(orjson.dumps([run.as_json(r) for r in found], option=orjson.OPT_INDENT_2).decode() + "\n")
        return
    if not found:
        console.print("no erasure requests")
    for request in found:
        _show(request)


@app.command("confirm")
def confirm(
    request_id: Annotated[str, typer.Argument(metavar="REQUEST")],
    projection: Annotated[str, typer.Option("--projection", help="The external projection (another service) "
                                                                 "that has deleted its copy.")],
) -> None:
    """Record that another service holding a copy of the person has deleted it."""
    run = _run()
    try:
        request = run.confirm(context.settings(), context.pipeline(), request_id, projection, by="cli")
    except _failures() as exc:
        _fail(exc)
        return
    console.print(f"{escape(projection)}: confirmed; request {request.id} is {request.state}", highlight=False)
