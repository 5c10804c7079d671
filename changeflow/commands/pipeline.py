"""`changeflow pipeline`: the pipeline file's JSON Schema, and the file checked against the live source."""

from __future__ import annotations

import json
import sys
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from changeflow import context
from changeflow.pipelines import catalog as catalog_mod
from changeflow.pipelines.load import PipelineError
from changeflow.pipelines.model import PipelineFile
from changeflow.pipelines.spec import Pipeline

app = typer.Typer(help="The pipeline file: its JSON Schema, and a check against the live source.",
                  no_args_is_help=True)
err = Console(stderr=True, soft_wrap=True)

EXIT_PROBLEMS = 1
EXIT_INVALID = 2


def load_pipeline() -> Pipeline:
    """The pipeline of this invocation; an invalid file ends the command with exit code 2."""
    try:
        return context.pipeline()
    except PipelineError as exc:
        err.print(f"[bold red]invalid pipeline file:[/] {escape(str(exc))}", highlight=False)
        raise typer.Exit(EXIT_INVALID) from None


def catalog_dsn(pipeline: Pipeline, dsn: str | None = None) -> str:
    """Where to read the source's catalog (or run `connectors prepare`): ``dsn``, else the stack's
    superuser on the pipeline's database (its host and port, else the stack's)."""
    # Kept here for start-up cost (changeflow/commands/__init__.py): psycopg.conninfo, all of psycopg, ~70-120 ms.
    from psycopg.conninfo import make_conninfo

    if dsn:
        return dsn
    s = context.settings()
    pg = pipeline.file.sources.postgres
    assert pg is not None
    return make_conninfo(s.pg_dsn, dbname=pg.database, host=pg.host or s.pg_host, port=pg.port or s.pg_port)


@app.command("schema")
def schema() -> None:
    """Print the pipeline file's JSON Schema (point your editor's YAML support at it)."""
    print(json.dumps(PipelineFile.model_json_schema(), indent=2))


@app.command("check")
def check(
    dsn: Annotated[str | None, typer.Option(help="Read the catalog here (default: the stack's superuser on the "
                                                 "pipeline's database).")] = None,
    offline: Annotated[bool, typer.Option("--offline", help="Check the file alone, without the catalog.")] = False,
) -> None:
    """Check the pipeline file, and against the live catalog: tables, columns, keys, store names, hooks.

    Exit code 0: ready to apply; 1: problems found (one line each); 2: the file does not load."""
    # Kept here for start-up cost (changeflow/commands/__init__.py): psycopg ~120 ms, changeflow.pipelines.check ~11 ms.
    import psycopg

    from changeflow.pipelines.check import check as check_pipeline
    from changeflow.pipelines.check import uncaptured

    pipeline = load_pipeline()
    catalog = None
    pg = pipeline.file.sources.postgres
    if pg is not None and not offline and any(e.source == "postgres" for e in pipeline.entities.values()):
        schemas = [*pg.schemas, *(e.source_schema for e in pipeline.entities.values() if e.source == "postgres")]
        target = catalog_dsn(pipeline, dsn)
        try:
            catalog = catalog_mod.read_dsn(target, schemas, pipeline.publication)
        except psycopg.Error as exc:
            err.print(f"[bold red]error:[/] cannot read the catalog of {escape(pg.database)}: "
                      f"{escape(str(exc).strip())}\n(pass --dsn for a role that may connect, or --offline)",
                      highlight=False)
            raise typer.Exit(EXIT_PROBLEMS) from None
    problems = check_pipeline(pipeline, catalog)
    where = str(pipeline.path) if pipeline.path else pipeline.name
    for problem in problems:
        print(f"{where}: {problem}")
    if catalog is not None:
        left = uncaptured(pipeline, catalog)
        if left:
            # Not a problem (a pipeline may capture part of a database), but never a silence: changes to
            # these tables do not reach Kafka at all, so no counter or dead letter would show them.
            err.print(f"{len(left)} table(s) not captured by any entity (their changes are not read; add an "
                      "entity to capture one):", highlight=False)
            for table in left:
                err.print(f"  not captured: {escape(table.qualified)}", highlight=False)
    if problems:
        err.print(f"{len(problems)} problem(s) in pipeline {pipeline.name}", highlight=False)
        raise typer.Exit(EXIT_PROBLEMS)
    checked = "file and catalog" if catalog is not None else "file"
    views = f", {len(pipeline.views)} views" if pipeline.views else ""
    print(f"pipeline {pipeline.name}: {len(pipeline.captured())} entities{views}, {checked} ok", file=sys.stdout)
