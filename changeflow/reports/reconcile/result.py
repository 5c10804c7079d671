"""The results of a run: per (entity, store) the counts and differing keys, and the run around them."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

KINDS = ("missing", "extra", "stale", "mismatched")


@dataclass(frozen=True)
class Diff:
    key: str
    kind: str
    detail: str
    store_version: int | None = None


@dataclass
class StoreResult:
    entity: str
    store: str
    source_count: int
    store_count: int
    mode: str
    buckets: int = 0
    differing_buckets: list[str] = field(default_factory=list)
    diffs: list[Diff] = field(default_factory=list)
    error: str | None = None

    def count(self, kind: str) -> int:
        return sum(1 for d in self.diffs if d.kind == kind)

    @property
    def drift(self) -> int:
        return len(self.diffs)

    def as_dict(self) -> dict[str, Any]:
        return {
            "entity": self.entity, "store": self.store, "mode": self.mode,
            "source_count": self.source_count, "store_count": self.store_count,
            "missing": self.count("missing") + self.count("extra"),
            "missing_in_store": self.count("missing"), "missing_in_source": self.count("extra"),
            "stale": self.count("stale"), "mismatched": self.count("mismatched"), "drift": self.drift,
            "buckets": self.buckets, "differing_buckets": len(self.differing_buckets), "error": self.error,
            "diffs": [
                {"key": d.key, "kind": d.kind, "detail": d.detail, "store_version": d.store_version}
                for d in self.diffs
            ],
        }


@dataclass
class Run:
    run_id: str
    run_at: datetime
    mode: str
    results: list[StoreResult]
    skipped: dict[str, str]
    duration_s: float = 0.0
    repair_of: str = ""

    def drift_exceeds(self, max_drift: int) -> bool:
        """Per store: any one (entity, store) over the limit, or one that could not be checked."""
        return any(r.error is not None or r.drift > max_drift for r in self.results)

    def as_dict(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id, "run_at": self.run_at.isoformat(), "mode": self.mode,
            "duration_s": round(self.duration_s, 3), "repair_of": self.repair_of or None,
            "skipped": self.skipped, "results": [r.as_dict() for r in self.results],
        }


