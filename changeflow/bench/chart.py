"""The run as one PNG: throughput side by side, freshness per store and load, snapshot per store."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

PALETTE = ("#d62728", "#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b")


def _colours(stores: Any) -> dict[str, str]:
    """A colour per store, in the registry's order (the order the run's figures list them)."""
    return {store: PALETTE[i % len(PALETTE)] for i, store in enumerate(stores)}


def _label(ax: Any, bars: Any, fmt: str = "{:,.0f}") -> None:
    for bar in bars:
        h = bar.get_height()
        if h:
            ax.annotate(fmt.format(h), (bar.get_x() + bar.get_width() / 2, h), ha="center", va="bottom", fontsize=8,
                        xytext=(0, 2), textcoords="offset points")


def _not_run(ax: Any) -> None:
    ax.text(0.5, 0.5, "not run (--stages)", transform=ax.transAxes, ha="center", va="center", fontsize=10,
            color="#777")


def write(result: dict[str, Any], path: Path) -> Path:
    fig, axes = plt.subplots(1, 4, figsize=(22, 5.8), gridspec_kw={"width_ratios": [1.25, 1.2, 0.9, 1.0]},
                             layout="constrained")
    m = result.get("machine", {})
    fig.suptitle(
        f"changeflow bench ({result.get('mode')}, run {result.get('run_id')}) · {m.get('date', '')} · "
        f"{m.get('cpus')} CPUs {m.get('cpu_model', '')} shared with the whole stack",
        fontsize=11,
    )

    ax = axes[0]
    b = result.get("backlog", {})
    names = ["changeflow\n(worker)", "naive\nconsumer", "ceiling\nconsume+decode"]
    values = [b.get("throughput_changes_per_s") or 0, b.get("naive_changes_per_s") or 0,
              b.get("ceiling_changes_per_s") or 0]
    bars = ax.bar(names, values, color=["#2ca02c", "#7f7f7f", "#c7c7c7"])
    _label(ax, bars)
    v, naive, ceiling = values
    if v and naive and ceiling:
        bar = bars[0]
        ax.annotate(f"{v / naive:.2f}x naive\n{v / ceiling:.2f}x ceiling", (bar.get_x() + bar.get_width() / 2, v),
                    ha="center", va="bottom", fontsize=8, xytext=(0, 14), textcoords="offset points")
    ax.axhline(20_000, color="black", linestyle="--", linewidth=1)
    ax.text(2.45, 20_000, "target 20k", va="bottom", ha="right", fontsize=8)
    ax.set_ylim(0, max([20_000, *values]) * 1.12)
    ax.set_ylabel("changes/s")
    ax.set_title(f"Backlog: {b.get('changes', 0):,} changes through decode + "
                 f"{len(b.get('per_sink_changes_per_s') or {})} sinks", fontsize=10)
    ax.tick_params(axis="x", labelsize=8)

    ax = axes[1]
    fresh = result.get("freshness_ms", {})
    unseen = {load: v for load, v in result.get("freshness", {}).items()}
    loads = list(fresh)
    colours = _colours(fresh[loads[0]] if loads else {})
    width = 0.8 / max(1, len(colours))
    for i, store in enumerate(colours):
        xs = [j + (i - (len(colours) - 1) / 2) * width for j in range(len(loads))]
        p99 = [fresh[load][store]["p99"] or 0 for load in loads]
        p50 = [fresh[load][store]["p50"] or 0 for load in loads]
        bars = ax.bar(xs, p99, width, color=colours[store], alpha=0.45, label=f"{store} p99")
        ax.bar(xs, p50, width, color=colours[store], label=f"{store} p50")
        for bar, load in zip(bars, loads, strict=True):
            censored = unseen.get(load, {}).get(store, {}).get("unseen", 0)
            prefix = "≥" if censored else ""
            ax.annotate(f"{prefix}{bar.get_height():,.0f}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        ha="center", va="bottom", fontsize=7, xytext=(0, 2), textcoords="offset points")
    ticks = [f"{load.replace('_per_s', '/s')} target\n{unseen.get(load, {}).get('achieved_per_s', 0):,}/s achieved"
             for load in loads]
    ax.set_xticks(range(len(loads)), ticks)
    for target, colour in ((250, "#444"), (1000, "#888")):
        ax.axhline(target, color=colour, linestyle="--", linewidth=1)
        ax.text(len(loads) - 0.55, target, f"{target} ms", va="bottom", ha="right", fontsize=8)
    ax.set_yscale("log")
    top = max([1000.0, *(fresh[load][s]["p99"] or 0 for load in loads for s in colours)])
    ax.set_ylim(10, top * 8)
    ax.set_ylabel("ms from PostgreSQL commit to visible (log)")
    ax.set_title("Freshness, live pipeline (p50 solid, p99 light; ≥ = rows still unseen)", fontsize=10)
    if loads:
        ax.legend(fontsize=7, ncol=3, loc="upper left")
    else:
        _not_run(ax)

    ax = axes[2]
    snap = result.get("snapshot", {})
    per = snap.get("per_store_rows_per_s") or {}
    bars = ax.bar(list(per), [v or 0 for v in per.values()], color=list(_colours(per).values()))
    _label(ax, bars)
    if snap.get("debezium_rows_per_s"):
        ax.axhline(snap["debezium_rows_per_s"], color="#9467bd", linestyle=":", linewidth=1.2)
        ax.text(2.45, snap["debezium_rows_per_s"], "Debezium into Kafka", va="bottom", ha="right", fontsize=8,
                color="#9467bd")
    ax.axhline(50_000, color="black", linestyle="--", linewidth=1)
    ax.text(2.45, 50_000, "target 50k (ClickHouse)", va="bottom", ha="right", fontsize=8)
    ax.set_yscale("log")
    ax.set_ylim(10, 50_000 * 3)
    ax.set_ylabel("rows/s (log)")
    ax.set_title(f"Initial snapshot of {snap.get('rows', 0):,} rows", fontsize=10)
    if not snap:
        ax.set_xticks([])
        _not_run(ax)

    ax = axes[3]
    cpu = {k: v for k, v in (b.get("cpu_us_per_change") or {}).items() if k != "changeflow"}
    if cpu:
        names = list(cpu)
        bars = ax.barh(names, list(cpu.values()),
                       color=["#2ca02c" if n == "decode" or n.startswith("sink:") else "#c7c7c7" for n in names])
        for bar in bars:
            ax.annotate(f"{bar.get_width():,.1f}", (bar.get_width(), bar.get_y() + bar.get_height() / 2),
                        va="center", fontsize=7, xytext=(3, 0), textcoords="offset points")
        if b.get("ceiling_cpu_us_per_change"):
            ax.axvline(b["ceiling_cpu_us_per_change"], color="black", linestyle="--", linewidth=1)
        ax.invert_yaxis()
        ax.set_xlabel("CPU µs per change (dashed: the ceiling's consume + decode)")
        total = (b.get("cpu_us_per_change") or {}).get("changeflow")
        ax.set_title(f"Backlog CPU per change, per process (changeflow's own: {total:,.0f} µs)", fontsize=10)
        ax.tick_params(axis="y", labelsize=8)
    else:
        _not_run(ax)

    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():  # a stage left out (--stages) leaves an empty panel the layout complains of
        warnings.simplefilter("ignore", UserWarning)
        fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
