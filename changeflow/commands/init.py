"""`changeflow init`: a starter pipeline file from a live database's catalog."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from changeflow import context
from changeflow.pipelines.catalog import read_dsn
from changeflow.pipelines.init import identifier, source_block, starter
from changeflow.pipelines.load import PipelineError, parse
from changeflow.pipelines.model import IDENTIFIER

app = typer.Typer(help="Write a starter pipeline file from a database.", no_args_is_help=True)
err = Console(stderr=True, soft_wrap=True)


@app.callback()
def _group() -> None:
    """Write a starter pipeline file from a database (one subcommand per kind of source)."""


def _fail(message: str, code: int = 1) -> typer.Exit:
    err.print(f"[bold red]error:[/] {escape(message)}", highlight=False)
    return typer.Exit(code)


@app.command("postgres")
def postgres(
    dsn: Annotated[str, typer.Argument(help="postgresql://user@host:port/database (read the catalog only).")],
    schema: Annotated[list[str] | None, typer.Option("--schema", help="Schemas to read (repeat; default public).")]
    = None,
    name: Annotated[str | None, typer.Option(help="Pipeline name (default: the database's name).")] = None,
    output: Annotated[Path | None, typer.Option("-o", "--output", help="Write here (default: standard output).")]
    = None,
    user: Annotated[str | None, typer.Option(help="Debezium's replication role written into the file (default: "
                                                  "the stack's, CHANGEFLOW_PG_REPLICATION_USER; the DSN's user only "
                                                  "reads the catalog).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing output file.")] = False,
) -> None:
    """Every table with a primary key becomes an entity in all three stores, with the catalog's types;
    tables without one are listed as comments. The DSN's password is never written."""
    # Kept here for start-up cost (changeflow/commands/__init__.py): psycopg ~65 ms.

    import psycopg
    from psycopg.conninfo import conninfo_to_dict

    schemas = schema or ["public"]
    try:
        info = conninfo_to_dict(dsn)
    except psycopg.ProgrammingError as exc:
        raise _fail(f"not a PostgreSQL DSN: {exc}") from None
    if output is not None and output.exists() and not force:
        raise _fail(f"{output} exists; pass --force to overwrite it")
    try:
        catalog = read_dsn(dsn, schemas)
    except psycopg.Error as exc:
        raise _fail(f"cannot read the catalog: {str(exc).strip()}") from None
    pipeline_name = name or identifier(catalog.database, "p")
    if not re.match(IDENTIFIER, pipeline_name):
        raise _fail(f"--name {pipeline_name!r} is not a lower-case identifier (a letter, then letters, digits or _)")
    try:
        source = source_block(info, schemas, user or context.settings().pg_replication_user)
        text = starter(catalog, name=pipeline_name, source=source)
        loaded = parse(text, output or "<init>")
    except (ValueError, PipelineError) as exc:
        raise _fail(str(exc)) from None
    if output is None:
        print(text, end="")
    else:
        output.write_text(text)
    left_out = len(catalog.without_primary_key())
    err.print(f"{escape(str(output or 'pipeline'))}: {len(loaded.entities)} entities"
              + (f", {left_out} table(s) without a primary key left out (listed at the end)" if left_out else "")
              + f". Next: changeflow --pipeline {escape(str(output or 'FILE'))} pipeline check; connectors apply; "
              "worker", highlight=False)
