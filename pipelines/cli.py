"""The `ift` command: train, sweep, eval, compare, frozenlake."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from importlib.metadata import version

from pipelines.config import ConfigError
from pipelines.config_loading import (
    DEFAULT_CONFIG,
    describe_config,
    load_config,
    packaged_config_names,
    packaged_config_path,
    split_config_argument,
)

# Each command imports what it runs when it runs: `ift --help` and `ift configs` answer at once,
# without loading torch, Ray, DeepSpeed or MLflow.

USAGE = """ift <command> [args]

commands:
  train [CONFIG.yaml] [key=value ...]   train with Ray Train + DeepSpeed (default config: tiny)
  sweep [CONFIG.yaml] [key=value ...]   Ray Tune search over method.lam and method.decay
  data prepare [CONFIG] [key=value ...] tokenize the config's sources once into data.cache_dir
  data check [CONFIG] [key=value ...]   validate every row of the config's sources, list the bad ones
  eval MODEL [--tasks ...] [--limit N]  benchmark a model (models:/name@alias, runs:/..., path, hub id)
  compare MODEL MODEL ...               side-by-side benchmark table
  frozenlake [--out DIR] [--seeds N]    the paper's Frozen Lake experiment (section 5.3)
  configs                               list the packaged configs

ift --version prints the version; ift COMMAND --help, a command's options.
"""


def _load_config(items: list[str]):
    """``[CONFIG] key=value ...`` -> the validated config, or None after printing what is wrong."""
    config_path, overrides = split_config_argument(items)
    try:
        return load_config(config_path, overrides)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return None


def _train(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="ift train", description="Train with IFT/SFT/DPO/ORPO.")
    parser.add_argument("items", nargs="*", help="an optional CONFIG.yaml (or packaged name), then key=value overrides")
    parser.add_argument(
        "--help-config",
        action="store_true",
        help="list every key of the config (after the overrides): the value it runs with, type, allowed values, help",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument(
        "--dry-run", action="store_true", help="validate, count rows and steps, estimate memory per GPU; train nothing"
    )
    parser.add_argument(
        "--resume-with-changes",
        action="store_true",
        help="continue an existing run (same run_name) from its last checkpoint under changed training settings "
        "(without it such a re-run is refused, naming the settings that differ)",
    )
    args = parser.parse_intermixed_args(argv)  # key=value overrides may follow a flag

    if args.help_config:
        return _help_config(args.items)
    cfg = _load_config(args.items)
    if cfg is None:
        return 2
    if args.dry_run:
        from pipelines.orchestration.dry_run import dry_run
        from pipelines.training.state import ResumeError

        try:
            dry_run(cfg, resume_with_changes=args.resume_with_changes)
        except ResumeError as exc:
            print(f"error: cannot resume run '{cfg.run_name}': {exc}", file=sys.stderr)
            return 2
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        return 0
    from ift.data import DataError
    from pipelines.orchestration.train import summary, train
    from pipelines.training.state import ResumeError

    try:
        result = train(cfg, show_progress=not args.no_progress, resume_with_changes=args.resume_with_changes)
    except DataError as exc:
        print(f"error: bad training data: {exc}", file=sys.stderr)
        return 1
    except ResumeError as exc:
        print(f"error: cannot resume run '{cfg.run_name}': {exc}", file=sys.stderr)
        return 2
    print(summary(cfg, result))
    return 0


def _help_config(items: list[str]) -> int:
    """``ift train [CONFIG] [key=value ...] --help-config``: the key table of that config."""
    cfg = _load_config(items)
    if cfg is None:
        return 2
    command = " ".join(["ift train", *items]) if items else f"ift train (the default config, {DEFAULT_CONFIG})"
    print(describe_config(cfg, title=f"{command}: every key with the value this run uses"))
    return 0


def _data(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="ift data", description="Prepare the tokenized cache of a training config, or check its data."
    )
    parser.add_argument("action", choices=["prepare", "check"])
    parser.add_argument("items", nargs="*", help="an optional CONFIG.yaml (or packaged name), then key=value overrides")
    parser.add_argument(
        "--max-errors", type=int, default=20, metavar="N", help="check: list at most N bad rows, count the rest"
    )
    parser.add_argument("--json", action="store_true", help="check: print the report as JSON")
    parser.add_argument(
        "--bad-rows",
        default="bad_rows.jsonl",
        metavar="FILE",
        help="check: write every bad row here, one JSON object per line (only when there is one)",
    )
    args = parser.parse_intermixed_args(argv)  # key=value overrides may follow a flag
    if args.max_errors < 0:
        parser.error("--max-errors must be 0 or more")
    cfg = _load_config(args.items)
    if cfg is None:
        return 2
    from ift.data import DataError

    try:
        if args.action == "check":
            return _data_check(cfg, max_errors=args.max_errors, as_json=args.json, bad_rows=args.bad_rows)
        return _data_prepare(cfg, args.items)
    except DataError as exc:
        print(f"error: bad data: {exc}", file=sys.stderr)
        return 1


def _data_check(cfg, *, max_errors: int, as_json: bool, bad_rows: str) -> int:
    """Every row read and tokenized in this process, without Ray: seconds for a local corpus."""
    import json

    from pipelines.data.check import check

    report = check(cfg, max_errors=max_errors, bad_rows_path=bad_rows)
    print(json.dumps(report.to_dict(), indent=1) if as_json else "\n".join(report.lines()))
    return 1 if report.bad_rows else 0


def _data_prepare(cfg, items: list[str]) -> int:
    from pipelines.data import cache
    from pipelines.orchestration.train import init_ray

    init_ray(log_to_driver=False)
    import ray

    ray.data.DataContext.get_current().enable_progress_bars = False
    for entry in cache.prepare(cfg):
        print(cache.describe(entry))
    print(f"train from it with: ift train {' '.join(items)} data.cache=true".replace("  ", " "))
    return 0


def _configs(argv: list[str]) -> int:
    argparse.ArgumentParser(prog="ift configs", description="List the packaged training configs.").parse_args(argv)
    from pipelines.tables import render_table

    print(render_table(["config", "file"], [[name, packaged_config_path(name)] for name in packaged_config_names()]))
    return 0


# The optional extra each command needs: (the module it imports, the extra that installs it).
EXTRAS = {"eval": ("lm_eval", "eval"), "compare": ("lm_eval", "eval"), "frozenlake": ("gymnasium", "frozenlake")}


def _missing_extra(command: str) -> str | None:
    """What to install when ``command``'s optional extra is missing, else None."""
    module, extra = EXTRAS[command]
    try:
        importlib.import_module(module)
    except ImportError:
        return (
            f"error: ift {command} needs the '{extra}' extra ({module} is not installed): pip install -e '.[{extra}]'"
        )
    return None


def main(argv: list[str] | None = None) -> int:
    try:
        code = _dispatch(list(sys.argv[1:] if argv is None else argv))
        sys.stdout.flush()  # here, so a closed pipe is met inside the try
        return code
    except BrokenPipeError:  # `ift configs | head -2`: the reader has all it wanted
        # Python would report the broken pipe again when it flushes stdout at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def _dispatch(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        print(f"ift {version('intuitive-fine-tuning')}")
        return 0
    command, rest = argv[0], argv[1:]
    if command == "train":
        return _train(rest)
    if command == "configs":
        return _configs(rest)
    if command == "data":
        return _data(rest)
    if command == "sweep":
        from tune.cli import main as sweep_main

        return sweep_main(rest)
    if command in ("eval", "compare", "frozenlake") and (missing := _missing_extra(command)):
        print(missing, file=sys.stderr)
        return 2
    if command == "eval":
        from pipelines.evaluation.cli import main_eval

        return main_eval(rest)
    if command == "compare":
        from pipelines.evaluation.cli import main_compare

        return main_compare(rest)
    if command == "frozenlake":
        from experiments.frozenlake.run import main as frozenlake_main

        return frozenlake_main(rest)
    print(f"unknown command '{command}'\n\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
