"""Runs side by side: one table of their final and best metrics, privacy and times, and plots
of their history curves, precision against recall, and a metric against epsilon.

Everything is read from the run folders (config.json, history.jsonl): a run in progress or
interrupted compares as far as it got.
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import NamedTuple, Optional

from gankit.config import BEST_METRICS, Config, privacy_facts
from gankit.errors import UserError
from gankit.evaluate import markdown_table
from gankit.files import make_folder, save_figure, write_text
from gankit.runs import RunDir

COLUMNS = ["run", "mode", "private", "epsilon", "delta", "done", "train_time_s", "fid", "best_fid",
           "precision", "best_precision", "recall", "best_recall", "density", "coverage"]


class Run(NamedTuple):
    """A run folder as read once: its name, config, history and what a record counts."""
    name: str
    config: Config
    history: list[dict]
    unit: str  # "epoch", or "round" for a federated run


def read_runs(paths: list[Path]) -> list[Run]:
    if not paths:
        raise UserError("name at least one run folder")
    runs = []
    for path in map(Path, paths):
        run = RunDir.open(path)
        config = run.config()
        runs.append(Run(path.name, config, run.history(),
                        "round" if config.train.mode == "federated" else "epoch"))
    return runs


def summary(run: Run) -> dict:
    """One run's row: its last record's metrics, the best of each over its history (in the
    metric's direction), what it protects and the epsilon it has spent."""
    config, history, unit = run.config, run.history, run.unit
    total = config.federated.rounds if unit == "round" else config.train.epochs
    last = history[-1] if history else {}
    row = {"run": run.name, "mode": config.train.mode,
           "private": privacy_facts(config)["protects"],
           "done": f"{last.get(unit, 0)}/{total} {unit}s",
           "train_time_s": last.get("train_time_s", math.nan)}
    # The dp mode records epsilon; a federated run with client-level DP client_epsilon.
    epsilon = last.get("epsilon", last.get("client_epsilon"))
    row["epsilon"] = epsilon if isinstance(epsilon, (int, float)) else math.inf
    row["delta"] = last.get("delta", last.get("client_delta", ""))
    for metric, direction in BEST_METRICS.items():
        values = [r[metric] for r in history if isinstance(r.get(metric), (int, float))
                  and math.isfinite(r[metric])]
        last_value = next((r[metric] for r in reversed(history) if metric in r), math.nan)
        row[metric] = last_value
        row[f"best_{metric}"] = (min if direction == "min" else max)(values) if values else math.nan
    return row


def curve(run: Run, metric: str) -> list[tuple[int, float]]:
    """The run's (epoch or round, value) points of `metric`."""
    return [(r[run.unit], r[metric]) for r in run.history
            if isinstance(r.get(metric), (int, float)) and run.unit in r]


def plot(runs: list[Run], rows: list[dict], out: Path, metric: str = "fid", force: bool = False) -> None:
    import matplotlib.pyplot as plt

    fig = figure(runs, rows, metric)
    make_folder(out.parent)
    save_figure(fig, out, "replace" if force else "refuse", dpi=120)
    plt.close(fig)


def figure(runs: list[Run], rows: list[dict], metric: str = "fid"):
    """Three panels: `metric` per epoch (or round) for every run, final precision against
    recall, and final `metric` against epsilon (non-private runs at the right edge)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_curve, ax_pr, ax_eps) = plt.subplots(1, 3, figsize=(14, 4.2))
    for i, run in enumerate(runs):
        points = curve(run, metric)
        if points:
            ax_curve.plot(*zip(*points), "-o", ms=3, color=f"C{i}", label=run.name)
    from matplotlib.ticker import MaxNLocator, NullLocator

    ax_curve.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_curve.set_xlabel("epoch (round for federated runs)")
    ax_curve.set_ylabel(metric)
    if BEST_METRICS.get(metric) == "min" and any(r[metric] > 0 for r in rows if math.isfinite(r[metric])):
        ax_curve.set_yscale("log")
    ax_curve.grid(alpha=0.3, which="both")
    ax_curve.legend(fontsize=7)
    ax_curve.set_title(f"{metric} during training", fontsize=9)

    at_point: dict = {}  # runs drawn at the same place so far: their labels are stacked
    for i, r in enumerate(rows):
        if math.isfinite(r["precision"]) and math.isfinite(r["recall"]):
            ax_pr.scatter(r["recall"], r["precision"], color=f"C{i}", s=30)
            place = (round(r["recall"], 2), round(r["precision"], 2))
            stacked = at_point[place] = at_point.get(place, -1) + 1
            ax_pr.annotate(r["run"], (r["recall"], r["precision"]), fontsize=7,
                           xytext=(3, 3 + 9 * stacked), textcoords="offset points", color=f"C{i}")
    ax_pr.set_xlim(0, 1)
    ax_pr.set_ylim(0, 1)
    ax_pr.set_xlabel("recall (final)")
    ax_pr.set_ylabel("precision (final)")
    ax_pr.grid(alpha=0.3)
    ax_pr.set_title("precision against recall", fontsize=9)

    finite = [r["epsilon"] for r in rows if math.isfinite(r["epsilon"])]
    edge = max(finite) * 2 if finite else 1.0  # where a non-private run is drawn
    for i, r in enumerate(rows):
        if math.isfinite(r[metric]):
            x = r["epsilon"] if math.isfinite(r["epsilon"]) else edge
            ax_eps.scatter(x, r[metric], color=f"C{i}", s=30, marker="o" if math.isfinite(r["epsilon"]) else "s")
            ax_eps.annotate(r["run"], (x, r[metric]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    if finite:
        ax_eps.set_xscale("log")
        # Decades up to the largest epsilon, then one tick "not private" where those runs sit:
        # an unlabelled point at twice the largest epsilon would read as that epsilon.
        low = math.floor(math.log10(min(finite)))
        decades = [10.0 ** k for k in range(low, math.ceil(math.log10(max(finite))) + 1)
                   if 10.0 ** k < edge / 1.4]
        private_only = all(math.isfinite(r["epsilon"]) for r in rows)
        ax_eps.xaxis.set_minor_locator(NullLocator())
        ax_eps.set_xticks(decades + ([] if private_only else [edge]))
        ax_eps.set_xticklabels([f"{d:g}" for d in decades] + ([] if private_only else ["not\nprivate"]))
    ax_eps.set_xlabel("epsilon (squares: not private)")
    ax_eps.set_ylabel(f"{metric} (final)")
    ax_eps.grid(alpha=0.3, which="both")
    ax_eps.set_title(f"{metric} against privacy budget", fontsize=9)
    fig.tight_layout()
    return fig


def write_table(rows: list[dict], out: Optional[Path], fmt: str, force: bool = False) -> str:
    """The table as markdown or CSV text; also written to `out` when given."""
    if fmt == "csv":
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=COLUMNS, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        text = buffer.getvalue()
    elif fmt == "markdown":
        text = markdown_table(rows, COLUMNS)
    else:
        raise UserError(f"unknown --format '{fmt}' (choose from markdown, csv)")
    if out is not None:
        make_folder(out.parent)
        write_text(out, text, "replace" if force else "refuse")
    return text
