"""One validation for the arguments every command shares: entities, stores, files, the pipeline itself.

Each check ends the command with one line on standard error, ``error: <what is wrong>; <the choices>``, and
exit code 2 (a usage error, as click gives for a malformed option), before anything is read or written.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import NoReturn

import typer
from rich.console import Console
from rich.markup import escape

from changeflow import context
from changeflow.pipelines.load import PipelineError
from changeflow.pipelines.spec import Pipeline
from changeflow.sinks.base import names as store_names

EXIT_USAGE = 2
err = Console(stderr=True, soft_wrap=True)


def say_error(message: str) -> None:
    """The one-line error every command prints (markup in ``message`` is shown as it is)."""
    err.print(f"[bold red]error:[/] {escape(message)}", highlight=False)


def fail(message: str, code: int = 1) -> typer.Exit:
    say_error(message)
    return typer.Exit(code)


def usage(message: str) -> NoReturn:
    raise fail(message, EXIT_USAGE)


def pipeline() -> Pipeline:
    """The pipeline of this invocation; a file that does not load ends the command with its one-line error."""
    try:
        return context.pipeline()
    except PipelineError as exc:
        raise fail(f"invalid pipeline file: {exc}", EXIT_USAGE) from None


def registered_stores() -> list[str]:
    return store_names()


def _choices(names: Iterable[str]) -> str:
    return ", ".join(names)


def store(name: str, option: str = "store", allow_all: bool = False) -> str:
    """A registered store's name (``all`` too when ``allow_all``)."""
    known = registered_stores()
    if name in known or (allow_all and name == "all"):
        return name
    choices = _choices([*known, *(["all"] if allow_all else [])])
    usage(f"unknown {option} {name!r}; registered: {choices}" if name.strip() else f"empty {option} name; "
          f"choose from {choices}")


def stores(names: Sequence[str] | None, option: str = "store") -> list[str] | None:
    return None if names is None else [store(n, option) for n in names]


def store_list(text: str, option: str = "--sinks", what: str = "sink") -> list[str]:
    """A comma-separated list of stores (``worker --sinks redis,search``); empty or unknown names refused."""
    chosen = [n.strip() for n in text.split(",")]
    known = _choices(registered_stores())
    if not any(chosen):
        usage(f"{option} is empty; give one or more of {known}, comma-separated (leave it out for all)")
    if "" in chosen:
        usage(f"{option} {text!r} has an empty name; give one or more of {known}, comma-separated")
    for name in chosen:
        store(name, what)
    return list(dict.fromkeys(chosen))


def entity(p: Pipeline, name: str) -> str:
    if name not in p.entities:
        usage(f"unknown entity {name!r}; this pipeline ({p.name}) has: {_choices(p.entities)}")
    return name


def entities(p: Pipeline, names: Sequence[str] | None) -> list[str] | None:
    return None if names is None else [entity(p, n) for n in names]


def stored(p: Pipeline, names: Sequence[str] | None, in_stores: Sequence[str] | None) -> None:
    """Every named entity is held by at least one of the named stores (all registered ones when None)."""
    if not names:
        return
    chosen = list(in_stores) if in_stores else registered_stores()
    for name in names:
        spec = p.entities[entity(p, name)]
        if not any(spec.stored_in(s) for s in chosen):
            held = [s for s in registered_stores() if spec.stored_in(s)]
            where = f"it is stored in {_choices(held)}" if held else "no store holds it"
            usage(f"{name} is not stored in {' or '.join(chosen)}; {where}")


def existing_file(path: Path, what: str = "file") -> Path:
    if not path.exists():
        usage(f"{what} {path}: no such file")
    if path.is_dir():
        usage(f"{what} {path}: is a directory, not a file")
    try:
        with path.open("rb"):
            pass
    except OSError as exc:
        usage(f"{what} {path}: {exc.strerror or exc}")
    return path
