"""`ift sweep`: the command line.  Parses the arguments, loads and checks the sweep
(:mod:`tune.config`), runs it (:mod:`tune.trials`) and prints the summary
(:mod:`tune.results`).  Exit code 0 when a trial completed, 1 when none did, 2 for
config errors.
"""

from __future__ import annotations

import argparse
import sys

from pipelines.config import ConfigError
from pipelines.config_loading import split_config_argument
from tune.config import load_sweep, packaged_sweep_names, packaged_sweep_path


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ift sweep",
        description="Ray Tune search over the training config (default: IFT's method.lam and method.decay). "
        "Each trial is an `ift train` run; ASHA stops trials with a poor validation metric early.",
        epilog="Examples:\n"
        "  ift sweep\n"
        "  ift sweep tune/configs/tiny-sweep.yaml sweep.algorithm=random --num-samples 6\n"
        "  ift sweep pipelines/configs/tiny.yaml optimization.max_steps=40 \\\n"
        "      --space optimization.lr=loguniform(1e-4,1e-2)\n"
        "See docs/sweeps.md.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "items",
        nargs="*",
        help="an optional sweep file or training config (path or packaged name), then key=value "
        "overrides: training keys, or sweep.* keys for sweep settings",
    )
    parser.add_argument("--algorithm", choices=["grid", "random", "optuna"], help="search algorithm")
    parser.add_argument("--num-samples", type=int, help="trials to sample (grid: repeats of the grid)")
    parser.add_argument("--max-concurrent", type=int, help="trials running at once")
    parser.add_argument(
        "--space",
        action="append",
        default=[],
        metavar="KEY=SPEC",
        help="add/replace a search dimension: uniform(lo,hi[,n]), loguniform(lo,hi[,n]), "
        "randint(lo,hi[,n]), choice(a,b,..), grid(a,b,..), or none to drop one",
    )
    parser.add_argument("--quiet", action="store_true", help="no Tune status tables (trial lines only)")
    parser.add_argument("--list", action="store_true", help="list the packaged sweep files")
    return parser


def main(argv: list[str] | None = None) -> int:
    """``ift sweep [SWEEP.yaml | TRAIN.yaml] [key=value ...] [options]``; returns the exit code."""
    args = _parser().parse_args(argv)
    if args.list:
        for name in packaged_sweep_names():
            print(f"{name:24s} {packaged_sweep_path(name)}")
        return 0
    path, items = split_config_argument(args.items)
    try:
        sweep, base = load_sweep(
            path,
            items,
            algorithm=args.algorithm,
            num_samples=args.num_samples,
            max_concurrent=args.max_concurrent,
            space=args.space,
        )
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    # Imported here: Ray, Tune and MLflow are not needed to list sweeps or report a config error.
    # Ray, Tune and MLflow load once the sweep is validated and runs.
    from tune.results import summary
    from tune.trials import run_sweep

    result = run_sweep(sweep, base, verbose=0 if args.quiet else 1)
    print(summary(result))
    return 0 if result.best is not None else 1


if __name__ == "__main__":
    sys.exit(main())
