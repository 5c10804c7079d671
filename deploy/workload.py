"""The demo workload: products inserted, updated and deleted in PostgreSQL, as a service would."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

import psycopg

CATEGORIES = ("books", "garden", "kitchen", "toys", "tools", "music")
ADJECTIVES = ("red", "quiet", "solid", "tiny", "golden", "rapid", "gentle", "vivid")
NOUNS = ("lamp", "kettle", "rake", "drum", "novel", "chisel", "puzzle", "teapot")


@dataclass(frozen=True)
class WorkloadResult:
    inserted: int
    updated: int
    deleted: int


def run_products(
    dsn: str,
    inserts: int = 200,
    updates: int = 80,
    deletes: int = 25,
    seed: int = 7,
    sku_prefix: str = "DEMO",
    progress: Callable[[str, int], None] | None = None,
) -> WorkloadResult:
    """Insert, then update prices and stock, then delete; each step its own transaction batch."""
    rng = random.Random(seed)
    ids: list[int] = []
    with psycopg.connect(dsn, autocommit=False) as conn, conn.cursor() as cur:
        for i in range(inserts):
            name = f"{rng.choice(ADJECTIVES)} {rng.choice(NOUNS)}"
            cur.execute(
                "INSERT INTO products (sku, name, description, category, price_cents, stock, internal_notes)"
                " VALUES (%s, %s, %s, %s, %s, %s, %s)"
                " ON CONFLICT (sku) DO UPDATE SET name = EXCLUDED.name RETURNING id",
                (
                    f"{sku_prefix}-{i:05d}", name, f"A {name} for every home.", rng.choice(CATEGORIES),
                    rng.randint(99, 99_999), rng.randint(0, 500), "supplier margin 12%",
                ),
            )
            row = cur.fetchone()
            assert row is not None
            ids.append(int(row[0]))
            if progress:
                progress("insert", 1)
        conn.commit()
        for product_id in rng.sample(ids, min(updates, len(ids))):
            cur.execute(
                "UPDATE products SET price_cents = %s, stock = stock + 1, updated_at = now() WHERE id = %s",
                (rng.randint(99, 99_999), product_id),
            )
            if progress:
                progress("update", 1)
        conn.commit()
        for product_id in rng.sample(ids, min(deletes, len(ids))):
            cur.execute("DELETE FROM products WHERE id = %s", (product_id,))
            if progress:
                progress("delete", 1)
        conn.commit()
    return WorkloadResult(len(ids), min(updates, len(ids)), min(deletes, len(ids)))
