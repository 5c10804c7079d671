"""A partial row merged over the last known one: what a store does with a MongoDB update that carries only
the changed fields (its ``updateDescription``, as ``changeflow.streams.mongodb.partial_image`` shapes it).

Pure, and apart from the decoder: the sinks complete partial records with it (``sinks.base.fill_partials``),
so it sits beside the record contract rather than inside the MongoDB envelope code.
"""

from __future__ import annotations

import copy
from typing import Any

# The key at an array's path that says "shorten it to this size first" (MongoDB forbids $-prefixed field
# names, so no document field can be called this).
TRUNCATE = "$truncate"


def _strip(value: Any) -> Any:
    """A patch value written where nothing was known: drop merge instructions, keep the data."""
    if isinstance(value, dict):
        return {k: _strip(v) for k, v in value.items() if k != TRUNCATE}
    return value


def _merge_into(current: Any, patch: Any) -> Any:
    if not isinstance(patch, dict):
        return patch
    if isinstance(current, list):
        out_list = list(current)
        size = patch.get(TRUNCATE)
        if isinstance(size, int):
            del out_list[size:]
        numeric = {k: v for k, v in patch.items() if k != TRUNCATE}
        if all(k.isdigit() for k in numeric):
            for k, v in numeric.items():
                index = int(k)
                out_list.extend([None] * (index + 1 - len(out_list)))  # MongoDB pads with null too
                out_list[index] = _merge_into(out_list[index], v)
            return out_list
        return _strip(patch)
    if isinstance(current, dict):
        out = dict(current)
        for k, v in patch.items():
            if k != TRUNCATE:
                out[k] = _merge_into(out.get(k), v)
        return out
    if TRUNCATE in patch and all(k == TRUNCATE or k.isdigit() for k in patch):
        return _merge_into([], patch)
    return _strip(patch)


def merge_partial(previous: dict[str, Any] | None, partial_after: dict[str, Any]) -> dict[str, Any]:
    """The full row after a partial MongoDB update: ``partial_after`` deep-merged over ``previous``.

    Nested dicts merge (they came from dotted paths), ``None`` clears a removed field, a numeric key
    sets an array element, ``TRUNCATE`` shortens an array first; any other value replaces. Neither
    argument is modified. Without a previous row the result holds only what the change carried.
    """
    merged = _merge_into(copy.deepcopy(previous) if previous else {}, partial_after)
    assert isinstance(merged, dict)
    return merged
