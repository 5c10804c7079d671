"""How a pipeline's configuration names turn into the source's: a qualified table split, Debezium's topic part.

Pure and at the bottom of ``pipelines``, so the model's sections (``outbox``) and the resolved spec share them
without importing each other.
"""

from __future__ import annotations

import re


def split_table(qualified: str, default_schema: str = "public") -> tuple[str, str]:
    """``schema.table`` → (schema, table), split at the last dot (a schema name may hold dots, a table name
    may not); a bare table is in ``default_schema``."""
    schema, _, table = qualified.rpartition(".")
    return (schema or default_schema), table


def topic_part(name: str) -> str:
    """Debezium's topic naming: a character outside ``[A-Za-z0-9._-]`` becomes ``_`` (measured: table
    ``"cf Manual"."Order Lines"`` is written to ``<prefix>.cf_Manual.Order_Lines``)."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", name)
