"""``ift frozenlake``: the paper's Frozen Lake validation (§5.3, B.2), reported and logged.

Runs :func:`experiments.frozenlake.env.run_experiment`, prints the table (mean ± std over
seeds), writes ``results.json`` / ``results.md`` / ``frozenlake.png`` under
``--out`` and logs params, metrics (aggregated, per seed, and seed 0's loss
curves) and those files to the MLflow experiment ``frozenlake``.

    python -m experiments.frozenlake.run --out outputs/frozenlake --seeds 5
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from experiments.frozenlake import env as fl
from pipelines.config import DEFAULT_TRACKING_URI

__all__ = ["main", "run", "markdown_table", "plot", "log_to_mlflow", "EXPERIMENT"]

EXPERIMENT = "frozenlake"
ROWS = ("start", "optimal", "sft", "ift", "dpo", "orpo")
LABELS = {
    "start": "start θ0",
    "optimal": "optimal θ*",
    "sft": "SFT",
    "ift": "IFT",
    "dpo": "DPO",
    "orpo": "ORPO",
}
COLUMNS = (
    ("mse", "MSE to θ*", "{:.4f}"),
    ("kl", "KL(π*‖π)", "{:.3f}"),
    ("success", "greedy success", "{:.2f}"),
    ("optimal_path", "optimal path", "{:.2f}"),
    ("grids_trained", "grids explored (trained)", "{:.1f}"),
    ("grids_reached", "grids reached (p≥0.05)", "{:.1f}"),
    ("p_optimal_traj", "P(optimal traj)", "{:.3f}"),
)


def _cell(stat: dict, fmt: str) -> str:
    return f"{fmt.format(stat['mean'])} ± {fmt.format(stat['std'])}"


def _order(names: list[str], sep: str = " < ") -> str:
    return sep.join(LABELS[n] for n in names)


def markdown_table(results: dict) -> str:
    """The results table (one row per policy, mean ± std over seeds) in Markdown."""
    agg = results["aggregate"]
    head = "| policy | " + " | ".join(c[1] for c in COLUMNS) + " |"
    sep = "|---|" + "---:|" * len(COLUMNS)
    lines = [head, sep]
    for row in ROWS:
        if row in agg:
            lines.append(f"| {LABELS[row]} | " + " | ".join(_cell(agg[row][k], f) for k, _, f in COLUMNS) + " |")
    return "\n".join(lines)


def results_markdown(results: dict) -> str:
    cfg = results["config"]
    return "\n".join(
        [
            "# Frozen Lake (paper §5.3): results",
            "",
            f"Mean ± sample std over {cfg['seeds']} seeds; {cfg['steps']} full-batch Adam steps "
            f"(lr {cfg['lr']}) for every method and for θ*; start point: {cfg['start']}; "
            f"λ={cfg['lam']}, decay={cfg['decay']}, β_DPO={cfg['beta_dpo']}, β_ORPO={cfg['beta_orpo']}.",
            "",
            markdown_table(results),
            "",
            f"- Paper's order (MSE to θ*, Figure 3): {_order(results['paper_order'])}",
            f"- Measured order (MSE to θ*): {_order(results['order_mse'])}",
            f"- Measured order (KL from π*): {_order(results['order_kl'])}",
            "",
            "Definitions are in `docs/frozenlake.md` and `experiments/frozenlake/env.py`.",
            "",
        ]
    )


def print_table(results: dict) -> None:
    agg = results["aggregate"]
    widths = [12] + [max(len(c[1]), 17) for c in COLUMNS]
    print("  ".join(h.ljust(w) for h, w in zip(["policy"] + [c[1] for c in COLUMNS], widths, strict=True)))
    for row in ROWS:
        if row in agg:
            cells = [LABELS[row]] + [_cell(agg[row][k], f) for k, _, f in COLUMNS]
            print("  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)))


# --------------------------------------------------------------------------- the picture


def plot(results: dict, path: Path, seed_index: int = 0) -> Path:
    """One panel per policy (seed ``seed_index``): the lake, the greedy path, and per
    cell one arrow per action whose length is that action's probability."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    desc = results["map"]
    nrow, ncol = len(desc), len(desc[0])
    kind = {"F": 0, "H": 1, "S": 2, "G": 3}
    grid = np.array([[kind[ch] for ch in line] for line in desc])
    cmap = ListedColormap(["#dceefc", "#1f3b73", "#b8e6b0", "#ffd54f"])
    rec = results["per_seed"][seed_index]
    names = [r for r in ROWS if r in rec["policies"]]
    cols = 3
    rows = int(np.ceil(len(names) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 4.7 * rows), squeeze=False)
    # arrow direction per action (dx, dy) in image coordinates (row grows downward)
    vec = {0: (-1, 0), 1: (0, 1), 2: (1, 0), 3: (0, -1)}
    for ax, name in zip(axes.flat, names, strict=False):
        pol = rec["policies"][name]
        probs = np.array(pol["probs"])
        ax.imshow(grid, cmap=cmap, vmin=-0.5, vmax=3.5)
        for r in range(nrow):
            for c in range(ncol):
                ch = desc[r][c]
                if ch in "SG":
                    ax.text(c - 0.42, r - 0.3, ch, fontsize=9, weight="bold", color="#333")
                if ch in "HG":
                    continue
                s = r * ncol + c
                for a, (dx, dy) in vec.items():
                    p = probs[s, a]
                    if p < 0.02:
                        continue
                    ax.arrow(
                        c,
                        r,
                        0.42 * p * dx,
                        0.42 * p * dy,
                        width=0.025,
                        head_width=0.1,
                        head_length=0.06,
                        length_includes_head=True,
                        color="#333",
                        zorder=3,
                    )
        ys, xs = zip(*[divmod(s, ncol) for s in pol["path"]], strict=True)
        ax.plot(xs, ys, "-o", color="#d62728", lw=4, ms=6, alpha=0.45, zorder=2)
        ax.set_xticks(range(ncol))
        ax.set_yticks(range(nrow))
        ax.set_xticks(np.arange(-0.5, ncol), minor=True)
        ax.set_yticks(np.arange(-0.5, nrow), minor=True)
        ax.grid(which="minor", color="white", lw=1.5)
        ax.tick_params(which="both", length=0, labelsize=7)
        ok = "reaches G" if pol["success"] else "fails"
        ax.set_title(f"{LABELS[name]}: MSE {pol['mse']:.4f}, KL {pol['kl']:.2f}\ngreedy path {ok}", fontsize=10)
    for ax in list(axes.flat)[len(names) :]:
        ax.axis("off")
    fig.suptitle(
        f"Frozen Lake, seed {rec['seed']}: greedy path (red), action probabilities (arrow length); holes dark blue",
        fontsize=10,
    )
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------- MLflow


def log_to_mlflow(results: dict, out_dir: Path, tracking_uri: str, wall_s: float) -> str:
    """Log params, metrics and artifacts; returns the run id."""
    from mlflow.entities import Metric, Param, RunTag
    from mlflow.tracking import MlflowClient

    from pipelines.tracking.runs import experiment_id

    client = MlflowClient(tracking_uri)
    exp_id = experiment_id(client, EXPERIMENT, tracking_uri)
    run = client.create_run(exp_id, run_name=f"frozenlake-{results['config']['seeds']}seeds")
    run_id = run.info.run_id
    status = "FAILED"
    try:
        now = int(time.time() * 1000)
        cfg = dict(results["config"])
        cfg["methods"] = ",".join(cfg["methods"])
        cfg["map"] = "/".join(results["map"])
        params = [Param(k, str(v)) for k, v in cfg.items()]
        tags = [
            RunTag("order_mse", " < ".join(results["order_mse"])),
            RunTag("order_kl", " < ".join(results["order_kl"])),
            RunTag("paper_order", " < ".join(results["paper_order"])),
        ]
        metrics = [Metric("wall_seconds", wall_s, now, 0)]
        for name, stats in results["aggregate"].items():
            for key, st in stats.items():
                metrics.append(Metric(f"{name}.{key}_mean", st["mean"], now, 0))
                metrics.append(Metric(f"{name}.{key}_std", st["std"], now, 0))
        for rec in results["per_seed"]:
            for name, pol in rec["policies"].items():
                for key in fl.SCALARS:
                    metrics.append(Metric(f"seed.{name}.{key}", float(pol[key]), now, int(rec["seed"])))
        for name, losses in results["per_seed"][0]["losses"].items():
            metrics.extend(Metric(f"loss_seed0.{name}", float(v), now, i) for i, v in enumerate(losses))
        client.log_batch(run_id, params=params, tags=tags)
        for i in range(0, len(metrics), 1000):
            client.log_batch(run_id, metrics=metrics[i : i + 1000])
        for fname in ("results.json", "results.md", "frozenlake.png"):
            client.log_artifact(run_id, str(out_dir / fname))
        status = "FINISHED"
    finally:
        client.set_terminated(run_id, status)
    return run_id


# --------------------------------------------------------------------------- entry points


def run(
    out_dir: str | Path = "outputs/frozenlake",
    seeds: int = 5,
    steps: int = 200,
    *,
    tracking_uri: str = DEFAULT_TRACKING_URI,
    use_mlflow: bool = True,
    progress: bool = True,
    **overrides,
) -> dict:
    """Run the experiment, write the files, log to MLflow; returns the results dict."""
    from tqdm.auto import tqdm

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = fl.Config(steps=steps, **overrides)
    t0 = time.perf_counter()
    with tqdm(total=seeds * len(cfg.methods), desc="frozenlake seeds×methods", disable=not progress) as bar:
        results = fl.run_experiment(seeds, steps, cfg=cfg, on_progress=lambda _m: bar.update(1))
    wall = time.perf_counter() - t0
    results["wall_seconds"] = wall

    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "results.md").write_text(results_markdown(results))
    plot(results, out / "frozenlake.png")
    print_table(results)
    print(f"paper order (MSE):    {_order(results['paper_order'])}")
    print(f"measured order (MSE): {_order(results['order_mse'])}")
    print(f"measured order (KL):  {_order(results['order_kl'])}")
    run_id = None
    if use_mlflow:
        run_id = log_to_mlflow(results, out, tracking_uri, wall)
        results["mlflow_run_id"] = run_id
    print(
        f"\nfrozenlake: {seeds} seeds × {len(cfg.methods)} methods in {wall:.1f}s; "
        f"results in {out}/results.json, {out}/results.md, picture {out}/frozenlake.png"
        + (f"; MLflow run {run_id} in experiment '{EXPERIMENT}' at {tracking_uri}" if run_id else "; MLflow off")
    )
    return results


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ift frozenlake",
        description="Paper §5.3: SFT/IFT/DPO/ORPO fine-tuning vs the optimal policy of a deterministic Frozen Lake.",
    )
    p.add_argument("--out", default="outputs/frozenlake", help="output directory (default: %(default)s)")
    p.add_argument("--seeds", type=int, default=5, help="number of seeds, 0..N-1 (default: %(default)s)")
    p.add_argument("--steps", type=int, default=200, help="Adam steps per method and for θ* (default: %(default)s)")
    p.add_argument("--lr", type=float, default=1e-2, help="Adam learning rate (default: %(default)s)")
    p.add_argument(
        "--start",
        choices=("suboptimal", "random"),
        default="suboptimal",
        help="start point: pre-trained toward the long route, or seeded random init",
    )
    p.add_argument("--tracking-uri", default=DEFAULT_TRACKING_URI, help="MLflow tracking URI (default: %(default)s)")
    p.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.seeds < 1 or args.steps < 1:
        print("error: --seeds and --steps must be >= 1", file=sys.stderr)
        return 2
    run(
        args.out,
        args.seeds,
        args.steps,
        lr=args.lr,
        start=args.start,
        tracking_uri=args.tracking_uri,
        use_mlflow=not args.no_mlflow,
        progress=not args.no_progress,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
