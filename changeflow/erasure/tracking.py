"""Erasure requests and their projections, kept in the reports' home store (``erasure_requests``).

One row per (request, projection), replaced as the projection moves ``pending`` → ``erased`` → ``purged``
(the column is ``projection_name``: PROJECTION is a ClickHouse keyword);
the row whose projection is empty is the request itself (``open`` → ``closed``). A request names its subject
by mark (an HMAC), never by the clear id. Reads use ``FINAL``: the newest state of each row.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

from changeflow.reports import home

TABLE = "erasure_requests"
COLUMNS = ["request", "subject", "mark", "projection_name", "kind", "state", "detail", "purge_due", "requested_at",
           "source_position", "updated_at"]
# The order a projection's state moves in; a request closes once every projection is at least erased.
STATES = ("pending", "erased", "purged")


def ddl(database: str) -> str:
    return (
        f"CREATE TABLE IF NOT EXISTS {home.quote(database)}.{TABLE} (\n"
        "  request String, subject LowCardinality(String), mark String, projection_name String,\n"
        "  kind LowCardinality(String), state LowCardinality(String), detail String,\n"
        "  purge_due Nullable(DateTime64(3, 'UTC')), requested_at DateTime64(3, 'UTC'),\n"
        "  source_position String, updated_at DateTime64(3, 'UTC')\n"
        ")\nENGINE = ReplacingMergeTree(updated_at)\nORDER BY (request, projection_name)"
    )


@dataclass(frozen=True)
class Projection:
    """One place that holds (or held) the person: a store's entity or view, a topic, the source, or another
    service (``external``)."""

    name: str
    kind: str  # "source" | "store" | "topic" | "external"
    state: str = "pending"
    detail: str = ""
    purge_due: datetime | None = None

    @property
    def confirmed(self) -> bool:
        return self.state in ("erased", "purged")


@dataclass(frozen=True)
class Request:
    id: str
    subject: str
    mark: str
    requested_at: datetime
    source_position: str = ""
    state: str = "open"
    detail: str = ""
    projections: tuple[Projection, ...] = field(default_factory=tuple)

    @property
    def at_ms(self) -> int:
        return int(self.requested_at.timestamp() * 1000)

    def with_projection(self, projection: Projection) -> Request:
        kept = [p for p in self.projections if p.name != projection.name]
        return replace(self, projections=tuple(sorted([*kept, projection], key=lambda p: (p.kind, p.name))))

    def projection(self, name: str) -> Projection | None:
        return next((p for p in self.projections if p.name == name), None)

    @property
    def complete(self) -> bool:
        return bool(self.projections) and all(p.confirmed for p in self.projections)


class Tracker:
    """The ``erasure_requests`` table of one pipeline's home database."""

    def __init__(self, client: Any, database: str) -> None:
        self.client = client
        self.database = database
        self.table = f"{home.quote(database)}.{TABLE}"

    def ensure(self) -> None:
        self.client.command(f"CREATE DATABASE IF NOT EXISTS {home.quote(self.database)}")
        self.client.command(ddl(self.database))

    def save(self, request: Request, projections: list[Projection] | None = None, *, whole: bool = False) -> None:
        """Write the request's own row and ``projections`` (all of the request's with ``whole``)."""
        now = datetime.now(UTC)
        rows: list[list[Any]] = [[request.id, request.subject, request.mark, "", "request", request.state,
                                  request.detail, None, request.requested_at, request.source_position, now]]
        for p in (request.projections if whole else projections or []):
            rows.append([request.id, request.subject, request.mark, p.name, p.kind, p.state, p.detail[:2000],
                         p.purge_due, request.requested_at, request.source_position, now])
        self.client.insert(f"{self.database}.{TABLE}", rows, column_names=COLUMNS)

    def _rows(self, where: str, parameters: dict[str, Any]) -> list[tuple[Any, ...]]:
        return list(self.client.query(
            f"SELECT {', '.join(COLUMNS)} FROM {self.table} FINAL WHERE {where} "
            "ORDER BY request, kind, projection_name",
            parameters=parameters).result_rows)

    @staticmethod
    def _build(rows: list[tuple[Any, ...]]) -> list[Request]:
        out: dict[str, Request] = {}
        for r in rows:
            values = dict(zip(COLUMNS, r, strict=True))
            rid = values["request"]
            at = values["requested_at"]
            at = at.replace(tzinfo=UTC) if at.tzinfo is None else at
            req = out.get(rid) or Request(rid, values["subject"], values["mark"], at, values["source_position"])
            if values["projection_name"] == "":
                req = replace(req, state=values["state"], detail=values["detail"])
            else:
                due = values["purge_due"]
                if due is not None and due.tzinfo is None:
                    due = due.replace(tzinfo=UTC)
                req = replace(req, projections=(*req.projections, Projection(
                    values["projection_name"], values["kind"], values["state"], values["detail"], due)))
            out[rid] = req
        return list(out.values())

    def load(self, request_id: str) -> Request | None:
        found = self._build(self._rows("request = {r:String}", {"r": request_id}))
        return found[0] if found else None

    def open_for(self, mark: str) -> Request | None:
        """The open request for this subject, if one is under way (a retry resumes it)."""
        found = [r for r in self._build(self._rows("mark = {m:String}", {"m": mark})) if r.state == "open"]
        return found[0] if found else None

    def all(self) -> list[Request]:
        return self._build(self._rows("1", {}))
