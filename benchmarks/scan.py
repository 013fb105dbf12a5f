"""The discounted scan behind IFT's weights, against a float32 reverse loop and the authors' kernel.

``y_k = x_k + γ·y_{k+1}`` over (N, K) float32 inputs, on the CPU, for K in
{512, 2048, 8192}:

* ``scan``   ``ift.scan.discounted_cumsum(x, γ)`` (backend "torch", the chunked
             scan IFT trains with, a float γ as ``ift_weights`` passes it);
* ``loop``   the plain reverse loop in float32, one vectorised step per position
             (``running = x[:, k] + γ·running``);
* ``kernel`` ``torch_discounted_cumsum.discounted_cumsum_right(x, γ)`` with a 1-D
             γ of size N (its CPU kernel misreads a scalar γ), only where the
             optional package imports; otherwise recorded as skipped.

Each variant runs in interleaved rounds; the figure is the median over rounds.
The maximum absolute error against the float64 reference loop is recorded for
each, next to the time.  No Ray import.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from typing import Any

import torch

from benchmarks.common import load_average, summarize
from ift.scan import discounted_cumsum, discounted_cumsum_reference, kernel_available


def float32_loop(x: torch.Tensor, gamma: float) -> torch.Tensor:
    out = torch.empty_like(x)
    running = torch.zeros(x.shape[0], dtype=x.dtype)
    for k in range(x.shape[1] - 1, -1, -1):
        running = x[:, k] + gamma * running
        out[:, k] = running
    return out


def run(
    lengths: tuple[int, ...] = (512, 2048, 8192),
    rows: int = 64,
    gamma: float = 0.95,
    rounds: int = 15,
    threads: int | None = 1,
    seed: int = 0,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    if threads:
        torch.set_num_threads(threads)
    load_before = load_average()
    have_kernel = kernel_available()
    kernel_fn = None
    if have_kernel:
        from torch_discounted_cumsum import discounted_cumsum_right

        kernel_fn = discounted_cumsum_right
    else:
        log("[scan] torch-discounted-cumsum is not installed (optional extra 'kernels'): kernel column skipped")

    results: dict[str, Any] = {}
    g = torch.Generator().manual_seed(seed)
    for k in lengths:
        # Loss-like items: non-negative, mostly small, as ift_weights feeds the scan.
        x = torch.rand(rows, k, generator=g, dtype=torch.float32) / k
        gamma_1d = torch.full((rows,), gamma, dtype=torch.float32)
        # Default arguments bind this iteration's tensors to each closure.
        variants: dict[str, Callable[[], torch.Tensor]] = {
            "scan": lambda x=x: discounted_cumsum(x, gamma),
            "loop": lambda x=x: float32_loop(x, gamma),
        }
        if kernel_fn is not None:
            variants["kernel"] = lambda x=x, g1=gamma_1d: kernel_fn(x, g1)
        ref = discounted_cumsum_reference(x, gamma)
        scale = float(ref.abs().max())
        errors = {name: float((fn().double() - ref).abs().max()) for name, fn in variants.items()}  # + warm-up
        times: dict[str, list[float]] = {name: [] for name in variants}
        names = list(variants)
        for r in range(rounds):
            shift = r % len(names)
            for name in names[shift:] + names[:shift]:
                t = time.perf_counter()
                variants[name]()
                times[name].append(time.perf_counter() - t)
        entry: dict[str, Any] = {"shape": [rows, k]}
        for name in names:
            entry[name] = {**summarize(times[name]), "max_abs_err": errors[name], "max_rel_err": errors[name] / scale}
        scan_t = entry["scan"]["median_s"]
        entry["loop_over_scan"] = entry["loop"]["median_s"] / scan_t
        entry["kernel_over_scan"] = entry["kernel"]["median_s"] / scan_t if "kernel" in entry else None
        if "kernel" not in entry:
            entry["kernel"] = {"skipped": "torch-discounted-cumsum not installed"}
        results[str(k)] = entry
        kern = (
            f"kernel {entry['kernel']['median_s'] * 1e3:8.3f} ms"
            if entry["kernel_over_scan"] is not None
            else "kernel skipped"
        )
        log(
            f"[scan] K={k:5d}: scan {scan_t * 1e3:8.3f} ms | loop {entry['loop']['median_s'] * 1e3:8.3f} ms "
            f"({entry['loop_over_scan']:.1f}x the scan) | {kern}"
        )
    return {
        "rows": rows,
        "gamma": gamma,
        "dtype": "float32",
        "device": "cpu",
        "rounds": rounds,
        "torch_threads": torch.get_num_threads(),
        "kernel_available": have_kernel,
        "method": "median over interleaved rounds; errors are max |y - y_float64_loop|",
        "load_average_before": load_before,
        "load_average_after": load_average(),
        "lengths": results,
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", default="512,2048,8192")
    p.add_argument("--rows", type=int, default=64)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    out = run(tuple(int(k) for k in args.lengths.split(",")), rows=args.rows, rounds=args.rounds, threads=args.threads)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
