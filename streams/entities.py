"""Per-entity declarations: the one place where an entity's shape and its mapping to each store live.

Each entity has a transform (source row → canonical row: derived fields computed, internal or secret
fields dropped so they never reach a store or the changelog) and its mapping to every sink.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

CENTS = Decimal("0.01")

Row = dict[str, Any]


@dataclass(frozen=True)
class EntitySpec:
    """An entity's canonical shape and where it lands; a store it has no mapping for is left alone."""

    name: str
    source: str
    source_table: str
    transform: Callable[[Row], Row]
    # Fields that never leave the stream (secrets, internal notes): the one declared filtering policy.
    dropped_fields: frozenset[str]
    # Redis key prefix (`<prefix>:<key>`), or None when the entity is not cached.
    redis_prefix: str | None
    # Search index name, or None when the entity is not searchable.
    search_index: str | None
    search_mappings: dict[str, Any]
    # ClickHouse columns of `changeflow.<entity>` (name → type), in order; the key column first.
    clickhouse_columns: dict[str, str] = field(default_factory=dict)
    clickhouse_order_by: str = "id"

    def redis_key(self, key: str) -> str:
        return f"{self.redis_prefix}:{key}"

    @property
    def key_column(self) -> str:
        return next(iter(self.clickhouse_columns))


def drop_fields(dropped: frozenset[str]) -> Callable[[Row], Row]:
    def transform(row: Row) -> Row:
        return {k: v for k, v in row.items() if k not in dropped}

    return transform


PRODUCT_DROPPED = frozenset({"internal_notes"})


def product(row: Row) -> Row:
    """price_cents → exact dollars; internal_notes dropped."""
    out = {k: v for k, v in row.items() if k not in PRODUCT_DROPPED}
    if "price_cents" not in out:  # a partial image (TOAST): price unknown here, keep the stored one
        return out
    cents = out.pop("price_cents")
    out["price"] = None if cents is None else (Decimal(int(cents)) * CENTS).quantize(CENTS)
    return out


PRODUCTS = EntitySpec(
    name="products",
    source="postgres",
    source_table="products",
    transform=product,
    dropped_fields=PRODUCT_DROPPED,
    redis_prefix="product",
    search_index="products",
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

ORDERS = EntitySpec(
    name="orders",
    source="postgres",
    source_table="orders",
    transform=drop_fields(frozenset()),
    dropped_fields=frozenset(),
    redis_prefix="order",
    search_index="orders",
    search_mappings={
        "properties": {
            "id": {"type": "keyword"},
            "user_id": {"type": "keyword"},
            "status": {"type": "keyword"},
            "total_amount": {"type": "scaled_float", "scaling_factor": 100},
            "items": {"type": "object", "enabled": False},
            "created_at": {"type": "date"},
            "updated_at": {"type": "date"},
        }
    },
    clickhouse_columns={
        "id": "String",
        "user_id": "Nullable(String)",
        "status": "Nullable(String)",
        "total_amount": "Nullable(Decimal(12, 2))",
        "items": "Nullable(String)",
        "created_at": "Nullable(DateTime64(6, 'UTC'))",
        "updated_at": "Nullable(DateTime64(6, 'UTC'))",
    },
)

PAYMENTS = EntitySpec(
    name="payments",
    source="postgres",
    source_table="payments",
    transform=drop_fields(frozenset()),
    dropped_fields=frozenset(),
    redis_prefix=None,
    search_index=None,
    search_mappings={},
    clickhouse_columns={
        "id": "String",
        "order_id": "Nullable(String)",
        "amount": "Nullable(Decimal(12, 2))",
        "status": "Nullable(String)",
        "provider_ref": "Nullable(String)",
        "created_at": "Nullable(DateTime64(6, 'UTC'))",
    },
)

REFUNDS = EntitySpec(
    name="refunds",
    source="postgres",
    source_table="refunds",
    transform=drop_fields(frozenset()),
    dropped_fields=frozenset(),
    redis_prefix=None,
    search_index=None,
    search_mappings={},
    clickhouse_columns={
        "id": "String",
        "payment_id": "Nullable(String)",
        "order_id": "Nullable(String)",
        "amount": "Nullable(Decimal(12, 2))",
        "reason": "Nullable(String)",
        "created_at": "Nullable(DateTime64(6, 'UTC'))",
    },
)

USERS_DROPPED = frozenset({"hashed_password"})

USERS = EntitySpec(
    name="users",
    source="mongodb",
    source_table="users",
    transform=drop_fields(USERS_DROPPED),
    dropped_fields=USERS_DROPPED,
    redis_prefix="user",
    search_index="users",
    search_mappings={
        "properties": {
            "id": {"type": "keyword"},
            "email": {"type": "keyword", "fields": {"text": {"type": "text"}}},
            "name": {"type": "text", "fields": {"raw": {"type": "keyword"}}},
            "status": {"type": "keyword"},
            "profile": {"type": "object", "enabled": False},
        }
    },
    clickhouse_columns={
        "id": "String",
        "email": "Nullable(String)",
        "name": "Nullable(String)",
        "status": "Nullable(String)",
        "profile": "Nullable(String)",
    },
)

ENTITIES: dict[str, EntitySpec] = {spec.name: spec for spec in (PRODUCTS, ORDERS, PAYMENTS, REFUNDS, USERS)}
POSTGRES_ENTITIES = {spec.source_table: spec.transform for spec in ENTITIES.values() if spec.source == "postgres"}
MONGODB_ENTITIES = {spec.source_table: spec.transform for spec in ENTITIES.values() if spec.source == "mongodb"}
