"""The `ift` command: train, sweep, eval, compare, frozenlake."""

from __future__ import annotations

import argparse
import sys

USAGE = """ift <command> [args]

commands:
  train [CONFIG.yaml] [key=value ...]   train with Ray Train + DeepSpeed (default config: tiny)
  sweep [CONFIG.yaml] [key=value ...]   Ray Tune search over method.lam and method.decay
  eval MODEL [--tasks ...] [--limit N]  benchmark a model (models:/name@alias, runs:/..., path, hub id)
  compare MODEL MODEL ...               side-by-side benchmark table
  frozenlake [--out DIR] [--seeds N]    the paper's Frozen Lake experiment (section 5.3)
  configs                               list the packaged configs
"""


def _train(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="ift train", description="Train with IFT/SFT/DPO/ORPO.")
    parser.add_argument("items", nargs="*", help="an optional CONFIG.yaml (or packaged name), then key=value overrides")
    parser.add_argument("--help-config", action="store_true", help="list every config key with its default")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    from pipelines.config import ConfigError, describe_schema, load_config, split_config_argument

    if args.help_config:
        print(describe_schema())
        return 0
    config_path, overrides = split_config_argument(args.items)
    try:
        cfg = load_config(config_path, overrides)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from ift.data import DataError
    from pipelines.train import summary, train

    try:
        result = train(cfg, show_progress=not args.no_progress)
    except DataError as exc:
        print(f"error: bad training data: {exc}", file=sys.stderr)
        return 1
    print(summary(cfg, result))
    return 0


def _configs(argv: list[str]) -> int:
    from pipelines.config import packaged_config_names, packaged_config_path

    for name in packaged_config_names():
        print(f"{name:24s} {packaged_config_path(name)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "train":
        return _train(rest)
    if command == "configs":
        return _configs(rest)
    if command == "sweep":
        from tune.cli import main as sweep_main

        return sweep_main(rest)
    if command == "eval":
        from pipelines.evaluation.cli import main_eval

        return main_eval(rest)
    if command == "compare":
        from pipelines.evaluation.cli import main_compare

        return main_compare(rest)
    if command == "frozenlake":
        from pipelines.frozenlake import main as frozenlake_main

        return frozenlake_main(rest)
    print(f"unknown command '{command}'\n\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
