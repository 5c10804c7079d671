"""The C codec of the canonical record (schemas/_codec.c)."""

from collections.abc import Callable
from decimal import Decimal
from typing import Any

def plan(names: tuple[str, ...], fields: tuple[str, ...], codes: tuple[int, ...], scales: tuple[int, ...],
         precisions: tuple[int, ...], decimal_from: Callable[[int, int, int], Decimal],
         decimal_to: Callable[[Any, int, int], bytes]) -> object: ...
def decode(data: bytes, start: int, plan: object) -> dict[str, Any]: ...
def encode(prefix: bytes, record: dict[str, Any], plan: object) -> bytes: ...
