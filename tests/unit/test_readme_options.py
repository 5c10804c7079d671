"""README's "Commands, flags and exit codes" table is the CLI: every command, each with exactly its options.

The CLI side is read from the command tree typer builds (what `--help` prints); the README side from the
table's rows. A command or an option added, renamed or removed on one side fails here until the other says
the same."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import typer.main
from typer.testing import CliRunner

from changeflow.cli import app
from changeflow.worker import EXIT_CRASH_LOOP, EXIT_FAILED, EXIT_OK, EXIT_SINK_FATAL

README = Path(__file__).resolve().parents[2] / "README.md"
HEADING = "### Commands, flags and exit codes"
GLOBAL_SKIPPED = {"--install-completion", "--show-completion", "--help"}


def operating_it() -> str:
    text = README.read_text()
    start = text.index("## Operating it\n")
    return text[start:text.index("\n## ", start + 1)]


def readme_table() -> dict[str, tuple[set[str], str]]:
    """command (its words, without arguments) → (options named in its row, its exit codes cell)."""
    section = operating_it()
    table = section[section.index(HEADING):]
    rows: dict[str, tuple[set[str], str]] = {}
    for line in table.splitlines()[1:]:
        if line.startswith("###"):
            break
        if not line.startswith("| `"):
            continue
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip().strip("|"))]
        command = cells[0].strip("`").split()
        words = [w for w in command if re.fullmatch(r"[a-z][a-z-]*", w)]
        name = " ".join(words)
        assert name not in rows, f"{name} listed twice in README"
        rows[name] = (set(re.findall(r"`(--?[a-z][a-z-]*)`", cells[1])), cells[2])
    return rows


def cli_commands() -> Iterator[tuple[str, Any]]:
    def walk(cmd: Any, path: list[str]) -> Iterator[tuple[str, Any]]:
        sub = getattr(cmd, "commands", None)
        if sub:
            for name, child in sub.items():
                yield from walk(child, [*path, name])
        else:
            yield " ".join(path), cmd

    yield from walk(typer.main.get_command(app), [])


def long_options(cmd: Any) -> set[str]:
    return {opt for p in cmd.params if p.param_type_name == "option" for opt in p.opts
            if opt.startswith("--") and opt not in GLOBAL_SKIPPED}


def test_readme_lists_every_command_and_no_other() -> None:
    assert set(readme_table()) == {name for name, _ in cli_commands()}


@pytest.mark.parametrize("name", sorted(name for name, _ in cli_commands()))
def test_readme_lists_exactly_the_options_of(name: str) -> None:
    cmd = dict(cli_commands())[name]
    listed, codes = readme_table()[name]
    assert listed == long_options(cmd), f"README row of `{name}` vs `changeflow {name} --help`"
    assert codes.startswith("0"), f"README row of `{name}`: exit codes start with 0"


@pytest.mark.parametrize("name", ["reconcile", "dlq list", "worker"])
def test_the_options_the_issue_found_undocumented_are_in_help_and_readme(name: str) -> None:
    cmd = dict(cli_commands())[name]
    result = CliRunner().invoke(app, [*name.split(), "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    for option in long_options(cmd):
        assert option in result.output
        assert option in readme_table()[name][0]


def test_the_global_option_and_the_worker_exit_codes_are_documented() -> None:
    root = typer.main.get_command(app)
    section = operating_it()
    for option in long_options(root):
        assert f"`{option} FILE`" in section
    codes = readme_table()["worker"][1]
    for code in (EXIT_OK, EXIT_FAILED, EXIT_SINK_FATAL, EXIT_CRASH_LOOP):
        assert f"{code} " in codes
        assert f"| {code} |" in section  # the worker's own table
    assert "| 2 | usage" in section


def test_bench_quick_takes_as_long_in_readme_as_in_help() -> None:
    cmd = dict(cli_commands())["bench"]
    quick = next(p for p in cmd.params if "--quick" in p.opts)
    assert "about a minute" in (quick.help or "")
    assert "`--quick` (20k changes, 20k-row snapshot, 5 s per\nload) takes about a minute here" in README.read_text()
