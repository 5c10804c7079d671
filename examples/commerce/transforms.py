"""The commerce pipeline's Python hook: what its expressions would not say as plainly."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

CENTS = Decimal("0.01")


def product(row: dict[str, Any]) -> dict[str, Any]:
    """price_cents → exact dollars in ``price``. A partial image (an unchanged TOASTed column left out)
    may lack price_cents: then the stored price stays."""
    out = dict(row)
    if "price_cents" not in out:
        return out
    cents = out.pop("price_cents")
    out["price"] = None if cents is None else (Decimal(int(cents)) * CENTS).quantize(CENTS)
    return out
