"""Per-entity declarations: the one place where an entity's shape and its mapping to each store live.

Each entity has a transform (source row → canonical row: derived fields computed, internal or secret
fields dropped so they never reach a store or the changelog) and its mapping to every sink.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from streams.debezium import UNAVAILABLE

CENTS = Decimal("0.01")

Row = dict[str, Any]


@dataclass(frozen=True)
class EntitySpec:
    name: str
    source: str
    source_table: str
    transform: Callable[[Row], Row]
    # Fields that never leave the stream (secrets, internal notes).
    dropped_fields: frozenset[str]
    redis_prefix: str
    search_index: str
    search_text_fields: tuple[str, ...]
    search_mappings: dict[str, Any]
    # ClickHouse columns of `changeflow.<entity>` (name → type), in order; the key column first.
    clickhouse_columns: dict[str, str] = field(default_factory=dict)
    clickhouse_order_by: str = "id"

    def redis_key(self, key: str) -> str:
        return f"{self.redis_prefix}:{key}"


PRODUCT_DROPPED = frozenset({"internal_notes"})


def product(row: Row) -> Row:
    """price_cents → exact dollars; internal_notes dropped."""
    out = {k: v for k, v in row.items() if k not in PRODUCT_DROPPED}
    cents = out.pop("price_cents", None)
    if cents is None or cents == UNAVAILABLE:
        out["price"] = None
    else:
        out["price"] = (Decimal(int(cents)) * CENTS).quantize(CENTS)
    return out


PRODUCTS = EntitySpec(
    name="products",
    source="postgres",
    source_table="products",
    transform=product,
    dropped_fields=PRODUCT_DROPPED,
    redis_prefix="product",
    search_index="products",
    search_text_fields=("name", "description", "sku"),
    search_mappings={
        "properties": {
            "id": {"type": "long"},
            "sku": {"type": "keyword", "fields": {"text": {"type": "text"}}},
            "name": {"type": "text", "fields": {"raw": {"type": "keyword"}}},
            "description": {"type": "text"},
            "category": {"type": "keyword"},
            "price": {"type": "scaled_float", "scaling_factor": 100},
            "stock": {"type": "integer"},
            "updated_at": {"type": "date"},
        }
    },
    clickhouse_columns={
        "id": "Int64",
        "sku": "Nullable(String)",
        "name": "Nullable(String)",
        "description": "Nullable(String)",
        "category": "Nullable(String)",
        "price": "Nullable(Decimal(12, 2))",
        "stock": "Nullable(Int32)",
        "updated_at": "Nullable(DateTime64(6, 'UTC'))",
    },
)

ENTITIES: dict[str, EntitySpec] = {spec.name: spec for spec in (PRODUCTS,)}
POSTGRES_ENTITIES = {spec.source_table: spec.transform for spec in ENTITIES.values() if spec.source == "postgres"}
