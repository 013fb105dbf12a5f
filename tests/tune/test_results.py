"""The results table, the heatmap and the summary of a sweep."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from tune.results import (
    COMPLETED,
    ERROR,
    STOPPED,
    SweepResult,
    mark_best,
    plot_heatmap,
    results_columns,
    summary,
    write_outputs,
)

# The package-scoped sweep is built inside the first test's setup: about 4 minutes on an
# idle 2-core box, but up to 10 when the box is shared; give it room.
pytestmark = pytest.mark.timeout(1800)


@pytest.mark.slow
def test_results_table_and_heatmap(sweep4):
    with open(sweep4.csv_path) as fh:
        table = list(csv.DictReader(fh))
    assert [r["trial_id"] for r in table] == [r["trial_id"] for r in sweep4.rows]
    assert {"trial_id", "status", "method.lam", "method.decay", "steps", "val_nll"} <= set(table[0])
    assert sum(r["champion"] == "True" for r in table) == 1
    png = Path(sweep4.heatmap_path)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    text = summary(sweep4)
    assert "champion" in text and sweep4.parent_run_id in text and sweep4.csv_path in text


def _rows() -> list[dict]:
    """A 2 x 2 grid as the sweep would record it: two completed trials, one stopped, one failed."""

    def row(tid, lam, decay, status, steps, nll):
        return {
            "trial_id": tid,
            "run_name": f"s-{tid}",
            "status": status,
            "method.lam": lam,
            "method.decay": decay,
            "steps": steps,
            "val_nll": nll,
            "best_val_nll": nll,
            "evaluations": 1,
            "champion": False,
            "error": "boom" if status == ERROR else "",
            "hf_model_path": None,
            "checkpoint_path": None,
        }

    return [
        row("00000", 0.0, 0.8, COMPLETED, 15, 4.5),
        row("00001", 0.0, 1.0, COMPLETED, 15, 4.4),
        row("00002", 0.5, 0.8, STOPPED, 5, 6.8),
        row("00003", 0.5, 1.0, ERROR, 0, None),
    ]


def test_the_best_is_the_best_completed_trial():
    rows = _rows()
    rows[2]["val_nll"] = 1.0  # a stopped trial is never the champion, however good
    best = mark_best(rows, "val_nll", "min")
    assert best is rows[1] and best["champion"] and sum(r["champion"] for r in rows) == 1
    assert mark_best(_rows(), "val_nll", "max")["trial_id"] == "00000"
    assert mark_best([r for r in _rows() if r["status"] != COMPLETED], "val_nll", "min") is None


def test_outputs_and_summary_without_ray(tmp_path):
    rows = _rows()
    keys = ["method.lam", "method.decay"]
    result = SweepResult(
        sweep_id="s",
        sweep_dir=str(tmp_path),
        parent_run_id="p",
        experiment_id="0",
        tracking_uri="sqlite:///x.db",
        metric="val_nll",
        mode="min",
        keys=keys,
        rows=rows,
        best=mark_best(rows, "val_nll", "min"),
    )
    write_outputs(result, tmp_path)
    with open(result.csv_path) as fh:
        table = list(csv.DictReader(fh))
    assert list(table[0]) == results_columns(keys, "val_nll")
    assert [r["status"] for r in table] == [COMPLETED, COMPLETED, STOPPED, ERROR] and table[3]["val_nll"] == ""
    assert Path(result.heatmap_path).read_bytes()[:4] == b"\x89PNG"
    text = summary(result)
    assert "best completed trial 00001" in text and "trial 00003 failed: boom" in text
    # sampled (not grid-like) points are drawn as markers
    assert plot_heatmap(rows[:3], keys, "val_nll", "min", tmp_path / "points.png") is not None
    # fewer than two numeric keys: no heatmap
    assert plot_heatmap(rows, ["method.lam"], "val_nll", "min", tmp_path / "none.png") is None
