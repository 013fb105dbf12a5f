"""Where scores go: MLflow metrics and model-version tags, and the ``ift compare`` table.

Scores are named ``<task>/<metric>``.  They are logged as metrics
``eval/<task>/<metric>`` on the training run that produced the model (for
``models:/`` URIs the version's run) or, for models that have no run, on a new
run in the ``ift-eval`` experiment; and as tags ``eval.<task>`` on the
registered model version.  :func:`comparison_table` lays several models'
scores out like the paper's Table 3, written as CSV and Markdown by
:func:`write_comparison`.
"""

from __future__ import annotations

import csv
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, RunTag
from rich.table import Column

from pipelines.config import DEFAULT_TRACKING_URI
from pipelines.evaluation.models import registered_version_of, run_id_of, store_client
from pipelines.tables import render_table
from pipelines.tracking.runs import experiment_id

EVAL_EXPERIMENT = "ift-eval"
METRIC_PREFIX = "eval/"
TAG_PREFIX = "eval."

# Column headers of the comparison table (paper Table 3 names where they exist).
DISPLAY_NAMES = {
    "ift_arith": "Arithmetic (EM)",
    "ift_capitals_mc": "Capitals (MC)",
    "arc_challenge": "ARC-Challenge",
    "mmlu": "MMLU",
    "truthfulqa_mc2": "TruthfulQA",
    "winogrande": "WinoGrande",
    "gsm8k": "GSM8K",
}


def task_of(score_name: str) -> str:
    """The task of a score: ``ift_arith/exact_match`` -> ``ift_arith``."""
    return score_name.split("/")[0]


# --------------------------------------------------------------------------- MLflow


def metric_key(score_name: str) -> str:
    """MLflow metric name of a score: ``ift_arith/exact_match`` -> ``eval/ift_arith/exact_match``."""
    return METRIC_PREFIX + score_name


def _tag_key(score_name: str) -> str:
    return TAG_PREFIX + task_of(score_name)


def log_scores(
    scores: dict[str, float],
    *,
    tracking_uri: str = DEFAULT_TRACKING_URI,
    model_uri: str | None = None,
    run_id: str | None = None,
    registered_model_name: str | None = None,
    version: str | int | None = None,
    limit: int | None = None,
    step: int | None = None,
) -> dict[str, Any]:
    """Log ``scores`` to MLflow; return where they went.

    The returned dict has ``run_id``, ``created_run``, ``registered_model_name``, ``version`` and ``tracking_uri``.

    - Metrics ``eval/<task>/<metric>`` go on ``run_id``; if it is not given
      they go on the run that produced ``model_uri`` (for ``models:/`` URIs
      the version's run, for ``runs:/`` URIs that run); if there is none
      (local path, preset, Hub id), on a new run in the ``ift-eval``
      experiment, tagged with the model reference.
    - Tags ``eval.<task>`` (the score, 4 decimals) plus ``eval.limit`` go on
      the registered model version (given, or resolved from a ``models:/`` URI).
    """

    refers_to_store = (
        run_id is not None
        or registered_model_name is not None
        or (model_uri is not None and model_uri.startswith(("models:/", "runs:/")))
    )
    # The run/version must already be there; a model without one may start a new store.
    client = store_client(tracking_uri, must_exist=refers_to_store)

    if model_uri and model_uri.startswith("models:/") and (registered_model_name is None or version is None):
        mv = registered_version_of(client, model_uri, tracking_uri)
        registered_model_name, version = mv.name, mv.version
        run_id = run_id or mv.run_id
    elif model_uri and model_uri.startswith("runs:/") and run_id is None:
        run_id = run_id_of(model_uri)
    if run_id is None and registered_model_name is not None and version is not None:
        run_id = client.get_model_version(registered_model_name, str(version)).run_id or None

    created = False
    if run_id is None:
        exp_id = experiment_id(client, EVAL_EXPERIMENT, tracking_uri)
        ref = model_uri or "<in-memory model>"
        run = client.create_run(exp_id, run_name=f"eval {ref}"[:250], tags={"ift.model_ref": ref})
        run_id, created = run.info.run_id, True

    ts = int(time.time() * 1000)
    metrics = [Metric(metric_key(k), float(v), ts, step or 0) for k, v in scores.items()]
    tags = [RunTag("eval.tasks", ",".join(task_of(k) for k in scores)), RunTag("eval.limit", str(limit))]
    if model_uri:
        tags.append(RunTag("eval.model_uri", model_uri))
    client.log_batch(run_id, metrics=metrics, tags=tags)
    if created:
        client.set_terminated(run_id)
    if registered_model_name is not None and version is not None:
        for k, v in scores.items():
            client.set_model_version_tag(registered_model_name, str(version), _tag_key(k), f"{float(v):.4f}")
        client.set_model_version_tag(registered_model_name, str(version), "eval.limit", str(limit))
    return {
        "run_id": run_id,
        "created_run": created,
        "registered_model_name": registered_model_name,
        "version": None if version is None else str(version),
        "tracking_uri": tracking_uri,
    }


# --------------------------------------------------------------------------- tables


def comparison_table(rows: Sequence[tuple[str, str, dict[str, float]]]) -> tuple[list[str], list[list[str]]]:
    """``(label, ref, scores)`` rows -> ``(header, cells)`` in the paper's Table 3 layout.

    One row per model, one column per task (scores in percent, 2 decimals),
    then the average over the tasks.  Labels that repeat (two models trained
    with the same method) get their reference appended.
    """
    tasks: list[str] = []
    for _, _, scores in rows:
        for k in scores:
            if k not in tasks:
                tasks.append(k)
    labels = [label for label, _, _ in rows]
    header = ["method", "model", *tasks, "average"]
    cells = []
    for label, ref, scores in rows:
        if labels.count(label) > 1 and label != ref:
            label = f"{label} ({ref})"
        vals = [scores.get(t) for t in tasks]
        present = [v for v in vals if v is not None]
        avg = sum(present) / len(present) if present else None
        cells.append([label, ref, *(_pct(v) for v in vals), _pct(avg)])
    return header, cells


def _pct(v: float | None) -> str:
    return "" if v is None else f"{100 * v:.2f}"


def _display(col: str) -> str:
    if col in ("method", "model"):
        return col.capitalize()
    if col == "average":
        return "Average"
    return DISPLAY_NAMES.get(task_of(col), col)


def markdown_table(header: list[str], cells: list[list[str]]) -> str:
    """The table in Markdown, columns under their display names (ARC-Challenge, MMLU, ...)."""
    head = "| " + " | ".join(_display(h) for h in header) + " |"
    sep = "|" + "|".join("---" if i < 2 else "---:" for i in range(len(header))) + "|"
    return "\n".join([head, sep, *("| " + " | ".join(c) + " |" for c in cells)])


def plain_table(header: list[str], cells: list[list[str]]) -> str:
    """The table as aligned plain text for the terminal."""
    columns = [_display(h) if i < 2 else Column(_display(h), justify="right") for i, h in enumerate(header)]
    return render_table(columns, cells)


def write_comparison(out_dir: str | Path, header: list[str], cells: list[list[str]], limit: int | None) -> list[Path]:
    """Write ``comparison.csv`` (score names as columns) and ``comparison.md`` into ``out_dir``; return their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with (out / "comparison.csv").open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(cells)
    limited = f", at most {limit} examples per task" if limit else ""
    md = (
        "# Model comparison\n\n"
        f"Scores in percent (lm-evaluation-harness, chat template applied{limited}); "
        "Average is the mean over the task columns.\n\n" + markdown_table(header, cells) + "\n"
    )
    (out / "comparison.md").write_text(md, encoding="utf-8")
    return [out / "comparison.csv", out / "comparison.md"]
