"""What a sweep produced and how it is written out: one row per trial, the best completed
trial, the results CSV, the lambda x decay heatmap and the summary printed at the end.

Nothing here talks to Ray or MLflow: the rows are built from Tune's ``ResultGrid``
and everything else reads the rows.
"""

from __future__ import annotations

import csv
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from rich.table import Column

from pipelines.orchestration.storage import StoredCheckpoint, filesystem
from pipelines.tables import render_table
from pipelines.training.state import HF_MODEL_DIR
from tune.config import plain

HEATMAP_X, HEATMAP_Y = "method.lam", "method.decay"
COMPLETED, STOPPED, ERROR = "COMPLETED", "STOPPED", "ERROR"


@dataclass
class SweepResult:
    """Everything a finished sweep reports: its trials' rows, the champion and where things went."""

    sweep_id: str
    sweep_dir: str
    parent_run_id: str
    experiment_id: str
    tracking_uri: str
    metric: str
    mode: str
    keys: list[str]
    rows: list[dict[str, Any]]
    best: dict[str, Any] | None
    registered_model_name: str | None = None
    champion_version: str | None = None
    champion_uri: str | None = None
    csv_path: str | None = None
    heatmap_path: str | None = None
    released_placement_groups: list[tuple[str, str]] = field(default_factory=list)
    max_concurrent_trials: int = 1
    wall_s: float = 0.0


def trial_run_name(sweep_id: str, trial_id: str) -> str:
    """The run name (MLflow run, checkpoint folder) of a trial."""
    return f"{sweep_id}-{trial_id}"


def collect_rows(grid: Any, sweep_id: str, keys: list[str], metric: str, sweep_dir: str) -> list[dict[str, Any]]:
    """One row per trial of Tune's ``ResultGrid``, sorted by trial id.

    A trial that ended without error is COMPLETED when its last checkpoint holds the
    exported model, else STOPPED (early, by the scheduler).  Tune reports a checkpoint's
    path without its scheme; it is looked up in the filesystem of ``sweep_dir`` (a local
    folder or a URI such as ``s3://bucket/sweeps/<id>``), and the row keeps the full URI.
    """

    fs = filesystem(sweep_dir)[0]
    rows = []
    for res in grid:
        last = dict(res.metrics or {})
        trial_id = last.get("trial_id") or os.path.basename(str(res.path).rstrip("/"))
        df = res.metrics_dataframe
        history = []
        if df is not None and metric in getattr(df, "columns", []):
            history = [float(v) for v in df[metric].dropna().tolist()]
        stored = StoredCheckpoint.of(fs, last["checkpoint_path"], sweep_dir) if last.get("checkpoint_path") else None
        ckpt = stored.uri if stored is not None else None
        hf = f"{ckpt}/{HF_MODEL_DIR}" if stored is not None and stored.has(HF_MODEL_DIR) else None
        if res.error is not None:
            status = ERROR
        else:
            status = COMPLETED if hf else STOPPED
        err = ""
        if res.error is not None:
            lines = [ln.strip() for ln in str(res.error).strip().splitlines() if ln.strip()]
            err = lines[-1][:500] if lines else type(res.error).__name__
        row = {
            "trial_id": trial_id,
            "run_name": trial_run_name(sweep_id, trial_id),
            "status": status,
            **{k: plain(res.config.get(k)) for k in keys},
            "steps": last.get("step"),
            metric: float(last[metric]) if metric in last else None,
            f"best_{metric}": (min(history) if history else None),
            "evaluations": len(history),
            "checkpoint_path": ckpt,
            "hf_model_path": hf,
            "error": err,
            "champion": False,
        }
        rows.append(row)
    rows.sort(key=lambda r: r["trial_id"])
    return rows


def mark_best(rows: list[dict[str, Any]], metric: str, mode: str) -> dict[str, Any] | None:
    """The best *completed* trial's row, flagged ``champion`` (stopped trials have no final model)."""
    completed = [r for r in rows if r["status"] == COMPLETED and r.get(metric) is not None]
    if not completed:
        return None
    best = (min if mode == "min" else max)(completed, key=lambda r: r[metric])
    best["champion"] = True
    return best


def results_columns(keys: list[str], metric: str) -> list[str]:
    """The columns of ``results.csv``."""
    return [
        "trial_id",
        "status",
        *keys,
        "steps",
        metric,
        f"best_{metric}",
        "evaluations",
        "champion",
        "run_name",
        "mlflow_run_id",
        "error",
    ]


def write_results_csv(rows: list[dict], keys: list[str], metric: str, path: str | os.PathLike) -> Path:
    """``results.csv``: one line per trial, missing values empty."""
    cols = results_columns(keys, metric)
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({c: ("" if r.get(c) is None else r.get(c)) for c in cols})
    return Path(path)


def plot_heatmap(
    rows: list[dict], keys: list[str], metric: str, mode: str, out_path: str | os.PathLike, title: str = ""
) -> Path | None:
    """The metric over method.lam x method.decay (else the first two numeric keys).

    A full grid is drawn as cells; sampled points as coloured markers.  Each
    point shows its value; trials stopped by ASHA are hatched/marked with the
    step they stopped at, failed trials are crossed out, the champion starred.
    """
    import matplotlib  # its headless backend must be chosen before pyplot loads

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    numeric = [
        k
        for k in keys
        if all(
            isinstance(r.get(k), (int, float)) and not isinstance(r.get(k), bool) for r in rows if r.get(k) is not None
        )
    ]
    if HEATMAP_X in numeric and HEATMAP_Y in numeric:
        x_key, y_key = HEATMAP_X, HEATMAP_Y
    elif len(numeric) >= 2:
        x_key, y_key = numeric[:2]
    else:
        return None
    pts = [r for r in rows if r.get(x_key) is not None and r.get(y_key) is not None]
    if not pts:
        return None
    xs = sorted({float(r[x_key]) for r in pts})
    ys = sorted({float(r[y_key]) for r in pts})
    vals = [r.get(metric) for r in pts if r.get(metric) is not None]
    vmin, vmax = (min(vals), max(vals)) if vals else (0.0, 1.0)
    if vmin == vmax:
        vmin, vmax = vmin - 1e-6, vmax + 1e-6
    cmap = plt.get_cmap("viridis_r" if mode == "min" else "viridis")
    norm = matplotlib.colors.Normalize(vmin=vmin, vmax=vmax)
    fig, ax = plt.subplots(figsize=(6.4, 5.0))
    grid_like = len(xs) * len(ys) == len({(float(r[x_key]), float(r[y_key])) for r in pts}) and len(xs) * len(ys) <= 400

    def label(r: dict) -> str:
        v = r.get(metric)
        txt = "-" if v is None else f"{v:.3f}"
        if r["status"] == STOPPED:
            txt += f"\nstopped@{r.get('steps')}"
        elif r["status"] == ERROR:
            txt = "failed"
        return txt + (" ★" if r.get("champion") else "")

    if grid_like:
        mat = np.full((len(ys), len(xs)), np.nan)
        cells: dict[tuple[int, int], dict] = {}
        for r in pts:
            i, j = ys.index(float(r[y_key])), xs.index(float(r[x_key]))
            cells[(i, j)] = r
            if r.get(metric) is not None:
                mat[i, j] = r[metric]
        im = ax.imshow(np.ma.masked_invalid(mat), origin="lower", cmap=cmap, norm=norm, aspect="auto")
        for (i, j), r in cells.items():
            if r["status"] == STOPPED:
                ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, hatch="//", lw=0, edgecolor="0.6"))
            v = r.get(metric)
            red, green, blue, _ = cmap(norm(v)) if v is not None else (1, 1, 1, 1)
            dark = 0.299 * red + 0.587 * green + 0.114 * blue < 0.5
            ax.text(
                j,
                i,
                label(r),
                ha="center",
                va="center",
                fontsize=9,
                color="white" if dark else "black",
                bbox={"facecolor": "none", "edgecolor": "none"},
            )
        ax.set_xticks(range(len(xs)), [f"{x:g}" for x in xs])
        ax.set_yticks(range(len(ys)), [f"{y:g}" for y in ys])
    else:
        im = None
        for r in pts:
            x, y, v = float(r[x_key]), float(r[y_key]), r.get(metric)
            marker = {COMPLETED: "o", STOPPED: "s", ERROR: "X"}[r["status"]]
            color = "red" if v is None or r["status"] == ERROR else cmap(norm(v))
            ax.scatter(
                [x],
                [y],
                s=180 if r.get("champion") else 90,
                c=[color],
                marker=marker,
                edgecolors="black",
                linewidths=1.5 if r.get("champion") else 0.5,
            )
            ax.annotate(label(r), (x, y), textcoords="offset points", xytext=(6, 6), fontsize=8)
        im = matplotlib.cm.ScalarMappable(norm=norm, cmap=cmap)
        ax.margins(0.15)
        ax.legend(
            handles=[
                Line2D([], [], marker=m, ls="", color="0.5", label=lab)
                for m, lab in (("o", "completed"), ("s", "stopped early"), ("X", "failed"))
            ],
            fontsize=8,
            loc="best",
        )
    fig.colorbar(im, ax=ax, label=f"{metric} at the trial's last evaluation")
    ax.set_xlabel(x_key + (" (λ)" if x_key == HEATMAP_X else ""))
    ax.set_ylabel(y_key + (" (γ)" if y_key == HEATMAP_Y else ""))
    ax.set_title(f"{metric} by trial{' — ' + title if title else ''}", fontsize=10)
    fig.tight_layout()
    out = Path(out_path)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def write_outputs(result: SweepResult, out_dir: Path) -> None:
    """Write ``results.csv`` and (when two numeric keys were searched) ``heatmap.png`` into
    ``out_dir``, and record their paths on ``result``."""
    result.csv_path = str(out_dir / "results.csv")
    write_results_csv(result.rows, result.keys, result.metric, result.csv_path)
    heat = plot_heatmap(
        result.rows, result.keys, result.metric, result.mode, out_dir / "heatmap.png", title=result.sweep_id
    )
    if heat is not None:
        result.heatmap_path = str(heat)


def summary(result: SweepResult) -> str:
    """The table and pointers printed when ``ift sweep`` ends."""
    m = result.metric
    cols = ["trial", "status", *result.keys, "steps", m]
    order = sorted(
        result.rows,
        key=lambda r: (
            {COMPLETED: 0, STOPPED: 1, ERROR: 2}[r["status"]],
            (r[m] if result.mode == "min" else -r[m]) if r.get(m) is not None else math.inf,
        ),
    )
    table = [
        [
            r["trial_id"] + (" *" if r.get("champion") else ""),
            r["status"],
            *[fmt(r.get(k)) for k in result.keys],
            fmt(r.get("steps")),
            fmt(r.get(m)),
        ]
        for r in order
    ]
    columns = [c if i < 2 else Column(c, justify="right") for i, c in enumerate(cols)]  # numbers to the right
    lines = [
        "",
        f"Sweep '{result.sweep_id}' finished in {result.wall_s:.0f} s "
        f"({len(result.rows)} trials, up to {result.max_concurrent_trials} at a time).",
        "",
    ]
    lines += ["  " + line for line in render_table(columns, table).splitlines()]
    lines.append("")
    for r in result.rows:
        if r["status"] == ERROR:
            lines.append(f"  trial {r['trial_id']} failed: {r['error']}")
    if result.best is not None:
        b = result.best
        lines.append(
            f"  best completed trial {b['trial_id']}: {m} {b[m]:.4f} with "
            + ", ".join(f"{k}={fmt(b[k])}" for k in result.keys)
            + " (trials stopped early have no final model and are not candidates)"
        )
    else:
        lines.append("  no trial completed: nothing registered")
    if result.champion_uri:
        lines.append(f"  champion          {result.champion_uri} (version {result.champion_version})")
    lines.append(f"  MLflow parent run {result.parent_run_id} in {result.tracking_uri}")
    if result.csv_path:
        lines.append(f"  results table     {result.csv_path} (and runs:/{result.parent_run_id}/results.csv)")
    if result.heatmap_path:
        lines.append(f"  heatmap           {result.heatmap_path} (and runs:/{result.parent_run_id}/heatmap.png)")
    lines.append(f"  trial checkpoints {result.sweep_dir}/trials")
    if result.released_placement_groups:
        lines.append(f"  released {len(result.released_placement_groups)} placement group(s) left by stopped trials")
    return "\n".join(lines)


def say(msg: str) -> None:
    """A sweep's console line (flushed: Tune's own output interleaves with it)."""
    print(msg, flush=True)


def fmt(v: Any) -> str:
    """A value for the console: ``-`` for missing, 4 significant digits for floats."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)
