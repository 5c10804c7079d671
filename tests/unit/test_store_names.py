"""A store is one module (#19 §2): outside the store modules and the registry, no product code names a store.

The check reads the code's tokens, not its prose: an identifier with a store's name as one of its words
(``redis_url``, ``ClickHouseStore``, ``spec.search``) or a string that is exactly a store's name (``"redis"``)
is a hit; docstrings, comments and help texts that mention a store by name (docs) are not. ``postgres`` is
also the name of a *source* kind (``sources.postgres``, ``source: postgres``), so for it only the store's own
identifiers are looked for.
"""

from __future__ import annotations

import io
import re
import tokenize
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2] / "changeflow"
STORES = ("redis", "search", "clickhouse")
POSTGRES_STORE = re.compile(r"pgstore|postgres_?store", re.IGNORECASE)

ALLOWED = {
    # the store modules and the registry
    "sinks/redis.py", "sinks/search.py", "sinks/clickhouse.py", "sinks/postgres.py", "sinks/base.py",
    # the reports' home store: the one door through which reports (and the commands that show them) reach
    # the ClickHouse store's public API (ARCHITECTURE.md, "Reports")
    "reports/home.py",
    # a stand-in for the consumer a user would write by hand (a Redis SET per message), the bench's baseline
    "bench/naive.py",
}
# The local stack: one module per *server* it runs (Redis, OpenSearch, ClickHouse, PostgreSQL), not stores.
ALLOWED_DIRS = ("deploy/",)


def _words(name: str) -> set[str]:
    spaced = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", name).lower()
    return set(spaced.split("_"))


def _shown(path: Path) -> str:
    return path.relative_to(ROOT.parent).as_posix() if path.is_relative_to(ROOT.parent) else path.name


def hits(path: Path) -> list[str]:
    out: list[str] = []
    tokens = list(tokenize.generate_tokens(io.StringIO(path.read_text()).readline))
    for i, tok in enumerate(tokens):
        prev = tokens[i - 1].string if i else ""
        after = tokens[i + 1].string if i + 1 < len(tokens) else ""
        if tok.type == tokenize.NAME:
            words = _words(tok.string)
            named = [s for s in STORES if s in words]
            if named == ["search"] and tok.string == "search" and prev == "." and after == "(":
                continue  # a regular expression's `.search(...)`
            if named or POSTGRES_STORE.search(tok.string):
                out.append(f"{_shown(path)}:{tok.start[0]}: {tok.string}")
        elif tok.type == tokenize.STRING:
            body = re.sub(r"^[a-zA-Z]*('''|\"\"\"|'|\")", "", tok.string).rstrip("'\"")
            if body in STORES:
                out.append(f"{_shown(path)}:{tok.start[0]}: {tok.string}")
    return out


def test_no_product_module_names_a_store_outside_the_store_modules_and_the_registry() -> None:
    found = []
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if rel in ALLOWED or rel.startswith(ALLOWED_DIRS):
            continue
        found += hits(path)
    assert found == []


def test_the_check_finds_a_store_named_in_code_and_not_in_prose(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text('"""Lands in Redis, search and ClickHouse."""\n'
                      "import re\n"
                      "# the search index\n"
                      "url = settings.redis_url\n"
                      "cfg = spec.config.stores.get('clickhouse')\n"
                      "store = PostgresStore\n"
                      "found = re.search('x', 'y')\n"
                      "kind = 'postgres'  # a source\n")
    assert [h.split(": ", 1)[1] for h in hits(sample)] == ["redis_url", "'clickhouse'", "PostgresStore"]
