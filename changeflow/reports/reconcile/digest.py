"""Pure: key ranges (buckets), order-independent checksums per bucket, the keys that differ, and which
kind of drift a differing key is."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from changeflow.reports.reconcile.normalise import Row, row_digest

NUMERIC_BUCKET_WIDTH = 1024  # numeric keys: ranges of this many ids
STRING_BUCKET_CHARS = 2  # string keys (uuids, ObjectIds, composite keys): the first characters
MASK64 = (1 << 64) - 1


def bucket_of(key: str, numeric: bool) -> str:
    """The key range a key belongs to: id ranges for numeric keys, a prefix for string keys."""
    if numeric:
        try:
            lo = (int(key) // NUMERIC_BUCKET_WIDTH) * NUMERIC_BUCKET_WIDTH
        except ValueError:
            return "?"
        return f"{lo}..{lo + NUMERIC_BUCKET_WIDTH - 1}"
    return key[:STRING_BUCKET_CHARS].lower() + "*"


def _keyed(key: str, digest: int) -> int:
    # The key takes part in the bucket checksum so two rows swapping contents still change it.
    return row_digest({"k": key, "d": digest})


def bucket_checksums(digests: Mapping[str, int], numeric: bool) -> dict[str, tuple[int, int]]:
    """bucket → (rows, order-independent checksum of (key, row digest) pairs)."""
    out: dict[str, tuple[int, int]] = {}
    for key, digest in digests.items():
        b = bucket_of(key, numeric)
        count, total = out.get(b, (0, 0))
        out[b] = (count + 1, (total + _keyed(key, digest)) & MASK64)
    return out


@dataclass(frozen=True)
class KeyDiff:
    """The keys of one store that differ from the source, before classification."""

    buckets: int
    differing_buckets: list[str]
    missing_in_store: list[str]
    missing_in_source: list[str]
    content_differs: list[str]


def sort_key(key: str, numeric: bool) -> tuple[int, str]:
    if numeric:
        try:
            return (int(key), "")
        except ValueError:
            pass
    return (0, key)


def diff_keys(source: Mapping[str, int], store: Mapping[str, int], numeric: bool) -> KeyDiff:
    """Compare bucket checksums first, then keys only inside the buckets that differ."""
    src_buckets, store_buckets = bucket_checksums(source, numeric), bucket_checksums(store, numeric)
    all_buckets = set(src_buckets) | set(store_buckets)
    differing = sorted(b for b in all_buckets if src_buckets.get(b) != store_buckets.get(b))
    wanted = set(differing)
    missing, extra, content = [], [], []
    for key in sorted(set(source) | set(store), key=lambda k: sort_key(k, numeric)):
        if bucket_of(key, numeric) not in wanted:
            continue
        if key not in store:
            missing.append(key)
        elif key not in source:
            extra.append(key)
        elif source[key] != store[key]:
            content.append(key)
    return KeyDiff(len(all_buckets), differing, missing, extra, content)


def _short(value: Any, width: int = 60) -> str:
    text = "null" if value is None else str(value)
    return text if len(text) <= width else text[: width - 1] + "…"


def field_differences(source: Row, store: Row, limit: int = 3) -> str:
    """Which fields differ, with both values, short enough for a diff row."""
    names = sorted(n for n in set(source) | set(store) if source.get(n) != store.get(n))
    parts = [f"{n}: source={_short(source.get(n))} store={_short(store.get(n))}" for n in names[:limit]]
    if len(names) > limit:
        parts.append(f"(+{len(names) - limit} more)")
    return "; ".join(parts)


def classify_content(
    source: Row,
    store: Row,
    store_version: int | None,
    changelog: Mapping[int, Row],
    current_elsewhere: Iterable[int],
) -> tuple[str, str]:
    """``stale`` or ``mismatched`` for a key whose content differs, with a detail line.

    ``changelog``: the pipeline's images of this key by version (comparable form); ``current_elsewhere``:
    the versions other stores hold for this key where their content matches the source.
    """
    fields = field_differences(source, store)
    newest = max(current_elsewhere, default=None)
    known = max(changelog, default=None)
    if store_version is not None and changelog.get(store_version) == store:
        ahead = max(v for v in (newest, known, store_version) if v is not None)
        if ahead > store_version:
            return "stale", f"holds the pipeline's image at version {store_version}, {ahead} is newer; {fields}"
        return "stale", (f"holds the pipeline's newest image (version {store_version}): the source's latest change "
                         f"has not come through the pipeline yet; {fields}")
    if store_version is not None and newest is not None and store_version < newest:
        return "stale", f"version {store_version} behind {newest} in another store; {fields}"
    return "mismatched", f"version {store_version} but content the pipeline never wrote there; {fields}"
