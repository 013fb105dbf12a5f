"""The command lines: ``ift eval``, ``ift compare`` and ``python -m pipelines.evaluation eval|compare|build-tasks``.

Argument parsing, the one-line error report (exit status 2, no stack trace)
and what is printed; the work is done by the other modules of the package.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipelines.config import DEFAULT_TRACKING_URI
from pipelines.evaluation.errors import EvalError
from pipelines.evaluation.harness import DEFAULT_BATCH_SIZE, EvalResult, run_evaluation
from pipelines.evaluation.models import ModelSource, resolve_model
from pipelines.evaluation.results import comparison_table, log_scores, plain_table, task_of, write_comparison
from pipelines.evaluation.tasks import (
    DEFAULT_PRESET,
    PRESETS,
    TASKS_DIR,
    build_offline_tasks,
    check_tasks,
    resolve_tasks,
)

DEFAULT_COMPARE_OUT = "outputs/compare"


def _common_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--tasks",
        nargs="+",
        default=None,
        metavar="TASK[:SHOTS]",
        help="lm-eval tasks (space or comma separated; ':N' sets the few-shot count); overrides --preset",
    )
    p.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default=DEFAULT_PRESET,
        help="offline: the shipped tasks (no download); paper: the paper's Table 3 suite (needs the Hub)",
    )
    p.add_argument("--limit", type=int, default=None, help="examples per task (default: all)")
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE)
    p.add_argument("--tracking-uri", default=DEFAULT_TRACKING_URI, help="MLflow store of models:/ and runs:/ URIs")
    p.add_argument("--seed", type=int, default=0, help="init seed for presets such as 'tiny'")
    p.add_argument("--no-log", action="store_true", help="do not log the scores to MLflow")


def _setup_logging() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for name in ("lm_eval", "mlflow", "transformers", "datasets"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _eval_one(ref: str, args: argparse.Namespace) -> tuple[ModelSource, EvalResult, dict[str, Any] | None]:
    specs = resolve_tasks(args.tasks, args.preset)
    check_tasks(specs)  # before loading anything
    model, tok, src = resolve_model(ref, tracking_uri=args.tracking_uri, seed=args.seed)
    try:
        res = run_evaluation(model, tok, specs, limit=args.limit, batch_size=args.batch_size, check=False)
    finally:
        del model
        gc.collect()
    logged = None
    if not args.no_log:
        logged = log_scores(
            res.scores,
            tracking_uri=args.tracking_uri,
            model_uri=src.model_uri if src.kind in ("registered", "run") else ref,
            run_id=src.run_id,
            registered_model_name=src.registered_model_name,
            version=src.version,
            limit=args.limit,
        )
    return src, res, logged


def _logged_line(logged: dict[str, Any] | None) -> str:
    if logged is None:
        return "not logged to MLflow (--no-log)"
    where = f"metrics eval/* on {'new eval ' if logged['created_run'] else ''}run {logged['run_id']}"
    if logged["version"] is not None:
        where += f", tags eval.* on registered model {logged['registered_model_name']!r} version {logged['version']}"
    return f"logged {where} in {logged['tracking_uri']}"


def _describe(src: ModelSource) -> str:
    bits = [src.ref]
    if src.version is not None and src.ref != src.model_uri:
        bits.append(f"= {src.model_uri}")
    extra = [f"method {src.method}"] if src.method else []
    if src.run_id:
        extra.append(f"run {src.run_id}")
    return " ".join(bits) + (f" ({', '.join(extra)})" if extra else "")


def _scores_table(res: EvalResult) -> str:
    """Each score with the examples it was computed on, then their average, indented under the model."""
    from rich.table import Column

    from pipelines.tables import render_table

    rows = [[k, f"{v:.4f}", res.n_samples.get(task_of(k), "")] for k, v in res.scores.items()]
    if res.scores:
        rows.append(["average", f"{sum(res.scores.values()) / len(res.scores):.4f}", ""])
    columns = ["score", Column("value", justify="right"), Column("examples", justify="right")]
    return "\n".join("  " + line for line in render_table(columns, rows).splitlines())


def main_eval(argv: Sequence[str] | None = None) -> int:
    """``ift eval MODEL [--tasks ...] [--preset ...] [--limit N]``: print the scores and log them to MLflow."""
    p = argparse.ArgumentParser(prog="ift eval", description="Benchmark a model with lm-evaluation-harness.")
    p.add_argument(
        "model", help="models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN_ID/model, a path, a preset or a Hub id"
    )
    _common_args(p)
    p.add_argument("--out", default=None, help="also write the scores to DIR/scores.json")
    args = p.parse_args(argv)
    _setup_logging()
    try:
        src, res, logged = _eval_one(args.model, args)
    except EvalError as e:
        print(f"ift eval: error: {e}", file=sys.stderr)
        return 2
    print(f"model: {_describe(src)}")
    print(_scores_table(res))
    print(f"({res.seconds:.1f} s)")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        payload = {
            "model": args.model,
            "source": src.__dict__,
            "scores": res.scores,
            "metrics": res.metrics,
            "n_samples": res.n_samples,
            "limit": args.limit,
        }
        (out / "scores.json").write_text(json.dumps(payload, indent=2, default=str) + "\n", encoding="utf-8")
        print(f"wrote {out / 'scores.json'}")
    print(_logged_line(logged))
    return 0


def main_compare(argv: Sequence[str] | None = None) -> int:
    """``ift compare MODEL MODEL ...``: the paper's Table 3 layout, printed and written as CSV + Markdown."""
    p = argparse.ArgumentParser(
        prog="ift compare", description="Evaluate several models and tabulate the scores side by side."
    )
    p.add_argument("models", nargs="+", metavar="MODEL", help="as for ift eval")
    _common_args(p)
    p.add_argument("--out", default=DEFAULT_COMPARE_OUT, help="writes comparison.csv and comparison.md here")
    args = p.parse_args(argv)
    _setup_logging()
    rows: list[tuple[str, str, dict[str, float]]] = []
    try:
        check_tasks(resolve_tasks(args.tasks, args.preset))
        for ref in args.models:
            src, res, logged = _eval_one(ref, args)
            rows.append((src.label, ref, res.scores))
            print(
                f"{_describe(src)}: "
                + ", ".join(f"{k} {v:.4f}" for k, v in res.scores.items())
                + f" ({res.seconds:.1f} s); {_logged_line(logged)}"
            )
    except EvalError as e:
        print(f"ift compare: error: {e}", file=sys.stderr)
        return 2
    header, cells = comparison_table(rows)
    csv_path, md_path = write_comparison(args.out, header, cells, args.limit)
    print()
    print(plain_table(header, cells))
    print()
    print(f"results written to {csv_path} and {md_path}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m pipelines.evaluation eval|compare|build-tasks ...``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"eval": main_eval, "compare": main_compare}
    if argv and argv[0] == "build-tasks":
        for path in build_offline_tasks(argv[1] if len(argv) > 1 else TASKS_DIR):
            print(path)
        return 0
    if not argv or argv[0] not in commands:
        print("usage: python -m pipelines.evaluation {eval,compare,build-tasks} ...", file=sys.stderr)
        return 2
    return commands[argv[0]](argv[1:])
