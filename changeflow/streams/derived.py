"""Derived events: facts other services subscribe to, computed from canonical records (pure)."""

from __future__ import annotations

from typing import Any

from changeflow.streams.records import ChangeRecord

PRICE_CHANGED = "product.price_changed"


def price_changed(record: ChangeRecord) -> dict[str, Any] | None:
    """`product.price_changed` when an update moves a product's price (needs the full before-image)."""
    if record.entity != "products" or record.op != "u" or record.before is None or record.after is None:
        return None
    if "price" not in record.before or "price" not in record.after:
        return None
    old, new = record.before["price"], record.after["price"]
    if old == new:
        return None
    return {
        "type": PRICE_CHANGED,
        "id": record.key,
        "old_price": None if old is None else str(old),
        "new_price": None if new is None else str(new),
        "version": record.version,
        "ts_ms": record.ts_ms,
    }
