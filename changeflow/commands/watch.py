"""`changeflow watch`: the pipeline as it runs, refreshed every second in the terminal.

Figures come from where they are cheapest and still true:

- events/s, consumer lag, errors, dead letters and freshness come from the worker's own Prometheus
  metrics (``/metrics``), scraped once per frame; a rate is the counter's difference between two
  scrapes, so a view needs two frames (``--once`` takes both, ``--interval`` apart);
- freshness of the newest applied change per sink and entity is the worker's pair of gauges (source
  commit time of the newest record it wrote, and when it wrote it); p50/p95/p99 come from the freshness
  histogram's buckets over the last minute of scrapes, interpolated like PromQL's histogram_quantile;
- the newest changes are the tail of ClickHouse's changelog: what actually landed in a store, each with
  its own delay (``ingested_at`` against the source ``ts_ms``), rather than what was merely decoded.

Everything but the two fetches is a pure function of the scrapes, so the view is tested on fixtures.
"""

from __future__ import annotations

import math
import sys
import time
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Annotated, Any

import httpx
import typer
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from changeflow import context
from changeflow.metrics import stores
from changeflow.reports import home
from changeflow.sinks import base as sink_base

if TYPE_CHECKING:
    from changeflow.pipelines.spec import Pipeline
    from changeflow.settings import Settings

Labels = tuple[tuple[str, str], ...]
QUANTILES = (0.5, 0.95, 0.99)
WINDOW_S = 60.0


@dataclass(frozen=True)
class Scrape:
    """One read of ``/metrics``: every sample by (name, sorted labels), and when it was taken."""

    at: float
    samples: dict[tuple[str, Labels], float]

    def by(self, name: str, *keys: str, **match: str) -> dict[tuple[str, ...], float]:
        """Samples of ``name`` whose labels include ``match``, summed by the ``keys`` labels."""
        out: dict[tuple[str, ...], float] = {}
        for (sample, labels), value in self.samples.items():
            if sample != name:
                continue
            d = dict(labels)
            if any(d.get(k) != v for k, v in match.items()):
                continue
            group = tuple(d.get(k, "") for k in keys)
            out[group] = out.get(group, 0.0) + value
        return out

    def total(self, name: str, **match: str) -> float:
        return self.by(name, **match).get((), 0.0)

    def buckets(self, name: str, **match: str) -> dict[float, float]:
        """Cumulative counts by upper bound of a histogram, summed over the other labels."""
        return {float(le): v for (le,), v in self.by(f"{name}_bucket", "le", **match).items()}


def parse_scrape(text: str, at: float) -> Scrape:
    samples: dict[tuple[str, Labels], float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = float(s.value)
    return Scrape(at=at, samples=samples)


def merge(scrapes: Sequence[Scrape]) -> Scrape:
    """Several workers of the same consumer groups as one: counters, histograms and lag add up, and a
    "newest" timestamp is the newest of any worker."""
    samples: dict[tuple[str, Labels], float] = {}
    for sc in scrapes:
        for key, value in sc.samples.items():
            if key in samples:
                samples[key] = max(samples[key], value) if key[0].endswith("_timestamp_seconds") else (
                    samples[key] + value
                )
            else:
                samples[key] = value
    return Scrape(at=max(sc.at for sc in scrapes), samples=samples)


def increase(cur: float, prev: float | None) -> float:
    """A counter's increase between two scrapes; a restarted worker starts its counters at zero again."""
    if prev is None:
        return 0.0
    return cur if cur < prev else cur - prev


def rate(cur: Scrape | None, prev: Scrape | None, name: str, **match: str) -> float | None:
    if cur is None or prev is None or cur.at <= prev.at:
        return None
    return increase(cur.total(name, **match), prev.total(name, **match)) / (cur.at - prev.at)


def histogram_quantile(q: float, cumulative: dict[float, float]) -> float | None:
    """PromQL's estimate: linear interpolation inside the bucket where the q-th observation falls."""
    if not cumulative:
        return None
    bounds = sorted(cumulative)
    total = cumulative[bounds[-1]]
    if total <= 0:
        return None
    rank = q * total
    lower, below = 0.0, 0.0
    for upper in bounds:
        count = cumulative[upper]
        if count >= rank:
            if math.isinf(upper):
                return lower  # beyond the largest finite bucket: its bound is the best lower estimate
            if count == below:
                return upper
            return lower + (upper - lower) * (rank - below) / (count - below)
        lower, below = upper, count
    return bounds[-1]


def window_quantiles(cur: Scrape, base: Scrape | None, **match: str) -> dict[float, float | None]:
    """Freshness quantiles of the observations made between ``base`` and ``cur``."""
    if base is None:
        return {q: None for q in QUANTILES}
    now = cur.buckets("changeflow_freshness_seconds", **match)
    before = base.buckets("changeflow_freshness_seconds", **match)
    delta = {le: increase(v, before.get(le)) if before else v for le, v in now.items()}
    return {q: histogram_quantile(q, delta) for q in QUANTILES}


@dataclass(frozen=True)
class Change:
    entity: str
    key: str
    op: str
    version: int
    ts_ms: int
    ingested_ms: int


@dataclass
class Frame:
    """Everything one screen shows; built by the I/O edge, rendered by :func:`render`."""

    now: float
    urls: Sequence[str]
    entities: Sequence[str]
    sinks: Sequence[str]
    cur: Scrape | None
    prev: Scrape | None
    base: Scrape | None
    changes: list[Change] = field(default_factory=list)
    worker_error: str | None = None
    changes_error: str | None = None
    pipeline: Pipeline | None = None  # which entities each store holds (None: every pair is shown)


def fmt_seconds(s: float | None) -> str:
    if s is None:
        return "-"
    if s < 1:
        return f"{s * 1000:.0f} ms"
    if s < 60:
        return f"{s:.1f} s"
    if s < 3600:
        return f"{int(s // 60)}m {int(s % 60)}s"
    return f"{int(s // 3600)}h {int(s % 3600 // 60)}m"


def fmt_rate(r: float | None) -> str:
    return "-" if r is None else f"{r:,.1f}"


def fmt_count(v: float | None) -> str:
    return "-" if v is None else f"{v:,.0f}"


def render(frame: Frame) -> RenderableType:
    cur, prev = frame.cur, frame.prev
    clock = datetime.fromtimestamp(frame.now, UTC).strftime("%H:%M:%S UTC")
    header = Text.assemble(("changeflow watch", "bold"), f"  {clock}  worker {', '.join(frame.urls)} ")
    if frame.worker_error is None:
        header.append("up", style="green")
    else:
        header.append(f"unreachable ({frame.worker_error})", style="bold red")
    parts: list[RenderableType] = [header]

    entities = Table(title="per entity and sink", title_justify="left", expand=False)
    for col in ("entity", "sink", "events/s", "applied", "freshness (newest)", "p50 1m", "p95 1m", "p99 1m",
                "newest written", "quarantined"):
        entities.add_column(col, justify="left" if col in ("entity", "sink") else "right")
    for entity in frame.entities:
        first = True
        for sink in frame.sinks:
            if frame.pipeline is not None and not stores(sink, entity, frame.pipeline):
                continue
            labels = {"sink": sink, "entity": entity}
            row: list[str] = [entity if first else "", sink]
            first = False
            if cur is None:
                entities.add_row(*row, *["-"] * 8)
                continue
            applied = cur.by("changeflow_sink_events_out_total", **labels).get(())
            source_ts = cur.by("changeflow_sink_applied_source_timestamp_seconds", **labels).get(())
            applied_at = cur.by("changeflow_sink_applied_timestamp_seconds", **labels).get(())
            newest = None if source_ts is None or applied_at is None else max(0.0, applied_at - source_ts)
            qs = window_quantiles(cur, frame.base, **labels)
            quarantined = cur.total("changeflow_quarantined_total", store=sink, entity=entity)
            entities.add_row(
                *row,
                fmt_rate(rate(cur, prev, "changeflow_sink_events_out_total", **labels)),
                fmt_count(applied),
                fmt_seconds(newest),
                *(fmt_seconds(qs[q]) for q in QUANTILES),
                "-" if applied_at is None else f"{fmt_seconds(max(0.0, frame.now - applied_at))} ago",
                f"[yellow]{fmt_count(quarantined)}[/]" if quarantined else "0",
            )
    parts.append(entities)

    sinks = Table(title="per sink", title_justify="left")
    for col in ("sink", "in/s", "out/s", "lag (msgs)", "avg batch", "errors", "dead letters", "quarantined"):
        sinks.add_column(col, justify="left" if col in ("sink", "errors") else "right")
    for sink in frame.sinks:
        if cur is None:
            sinks.add_row(sink, *["-"] * 7)
            continue
        count = cur.total("changeflow_sink_batch_size_count", sink=sink)
        size = cur.total("changeflow_sink_batch_size_sum", sink=sink)
        errors = cur.by("changeflow_sink_errors_total", "kind", sink=sink)
        error_text = ", ".join(f"{k}={v:,.0f}" for (k,), v in sorted(errors.items()) if v) or "0"
        lag = cur.by("changeflow_sink_consumer_lag", sink=sink).get(())
        sinks.add_row(
            sink,
            fmt_rate(rate(cur, prev, "changeflow_sink_events_in_total", sink=sink)),
            fmt_rate(rate(cur, prev, "changeflow_sink_events_out_total", sink=sink)),
            fmt_count(lag),
            "-" if not count else f"{size / count:,.1f}",
            error_text if error_text == "0" else f"[red]{error_text}[/]",
            fmt_count(cur.total("changeflow_sink_dead_letters_total", sink=sink)),
            fmt_count(cur.total("changeflow_quarantined_total", store=sink)),
        )
    parts.append(sinks)

    if cur is not None:
        decode = Table(title="decode (per source topic)", title_justify="left")
        for col in ("topic", "records/s", "records", "skips", "dead letters"):
            decode.add_column(col, justify="left" if col == "topic" else "right")
        for (topic,) in sorted(cur.by("changeflow_decode_total", "topic")):
            decode.add_row(
                topic,
                fmt_rate(rate(cur, prev, "changeflow_decode_total", topic=topic, result="record")),
                fmt_count(cur.total("changeflow_decode_total", topic=topic, result="record")),
                fmt_count(cur.total("changeflow_decode_total", topic=topic, result="skip")),
                fmt_count(cur.total("changeflow_decode_total", topic=topic, result="dead_letter")),
            )
        parts.append(decode)

    changes = Table(title="newest changes applied (ClickHouse changelog)", title_justify="left")
    for col in ("applied at", "entity", "key", "op", "version", "freshness"):
        changes.add_column(col, justify="right" if col in ("version", "freshness") else "left")
    for c in frame.changes:
        changes.add_row(
            datetime.fromtimestamp(c.ingested_ms / 1000, UTC).strftime("%H:%M:%S.%f")[:-3],
            c.entity, c.key, c.op, str(c.version), fmt_seconds(max(0.0, (c.ingested_ms - c.ts_ms) / 1000)),
        )
    parts.append(changes)
    if frame.changes_error:
        parts.append(Text(f"changelog unavailable: {frame.changes_error}", style="red"))
    return Group(*parts)


# --- the I/O edge ------------------------------------------------------------------------------------


def metrics_url(settings: Settings) -> str:
    host = "127.0.0.1" if settings.worker_web_host in ("0.0.0.0", "") else settings.worker_web_host
    return f"http://{host}:{settings.worker_web_port}/metrics"


def scrape(client: httpx.Client, url: str) -> Scrape:
    response = client.get(url, timeout=3)
    response.raise_for_status()
    return parse_scrape(response.text, time.time())


def newest_changes(client: Any, database: str, limit: int) -> list[Change]:
    rows = client.query(
        "SELECT entity, key, op, version, ts_ms, toUnixTimestamp64Milli(ingested_at) AS at_ms "
        f"FROM {home.quote(database)}.changelog ORDER BY ingested_at DESC, version DESC LIMIT {int(limit)}"
    ).result_rows
    return [Change(str(e), str(k), str(o), int(v), int(t), int(a)) for e, k, o, v, t, a in rows]


class Watcher:
    """Holds the HTTP and ClickHouse clients and the last minute of scrapes between frames."""

    def __init__(
        self, settings: Settings, pipeline: Pipeline, changes: int, sinks: Iterable[str],
        urls: Sequence[str] | None = None,
    ) -> None:
        self.settings = settings
        self.pipeline = pipeline
        self.urls = list(urls or [metrics_url(settings)])
        self.limit = changes
        self.entities = list(pipeline.entities)
        self.sinks = list(sinks)
        self.http = httpx.Client()
        self.history: deque[Scrape] = deque()
        self._ch: Any = None

    def _changes(self) -> tuple[list[Change], str | None]:
        if self.limit <= 0:
            return [], None
        try:
            if self._ch is None:
                self._ch = home.client(self.settings)
            return newest_changes(self._ch, home.database(self.pipeline), self.limit), None
        except Exception as exc:  # a store that is down is shown, not fatal to the view
            self._ch = None
            return [], str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__

    def frame(self) -> Frame:
        scrapes, failures = [], []
        for url in self.urls:
            try:
                scrapes.append(scrape(self.http, url))
            except (httpx.HTTPError, ValueError) as exc:
                failures.append(f"{url}: {exc or type(exc).__name__}" if len(self.urls) > 1 else str(exc))
        cur = merge(scrapes) if scrapes else None
        worker_error = "; ".join(failures) or None
        prev = self.history[-1] if self.history else None
        if cur is not None:
            self.history.append(cur)
            while len(self.history) > 2 and cur.at - self.history[0].at > WINDOW_S:
                self.history.popleft()
        base = self.history[0] if cur is not None and len(self.history) > 1 else None
        changes, changes_error = self._changes()
        return Frame(now=time.time(), urls=[u.removesuffix("/metrics") for u in self.urls], entities=self.entities,
                     sinks=self.sinks, cur=cur, prev=prev, base=base, changes=changes,
                     worker_error=worker_error, changes_error=changes_error, pipeline=self.pipeline)

    def close(self) -> None:
        self.http.close()
        if self._ch is not None:
            self._ch.close()


def watch(
    once: Annotated[bool, typer.Option("--once", help="Print one frame (two scrapes, --interval apart) and exit.")]
    = False,
    interval: Annotated[float, typer.Option(help="Seconds between refreshes.", min=0.1)] = 1.0,
    changes: Annotated[int, typer.Option(help="Newest changes to show (0: none).", min=0)] = 8,
    url: Annotated[
        list[str] | None,
        typer.Option("--url", help="Worker metrics URL; repeat for scaled-out workers (default: this worker)."),
    ] = None,
) -> None:
    """Live view: events/s, freshness and the newest changes per entity and sink."""
    watcher = Watcher(context.settings(), context.pipeline(), changes, sink_base.used_by(context.pipeline()), url)
    console = Console(width=None if sys.stdout.isatty() else 200)
    try:
        if once:
            watcher.frame()
            time.sleep(interval)
            frame = watcher.frame()
            console.print(render(frame))
            if frame.cur is None:
                raise typer.Exit(1)
            return
        with Live(render(watcher.frame()), console=console, refresh_per_second=4, screen=False) as live:
            while True:
                time.sleep(interval)
                live.update(render(watcher.frame()))
    except KeyboardInterrupt:
        pass
    finally:
        watcher.close()
