"""What the driver reads of a corpus before training, and the time to the first step, small corpus vs large.

For each corpus (2,000 and 2,000,000 generated chat rows, JSONL) on each storage (local disk, and an
S3-compatible server on 127.0.0.1 started here, ``moto_server``):

* **planning, cold and warm**: the driver's plan of the run (``plan_data`` with the cluster scanner,
  as ``ift train`` makes it) with an empty scan index, then again with the index the first plan wrote:
  seconds, the source bytes scanned, and the bytes the driver process read (``rchar`` of
  ``/proc/self/io``: every read system call, files and sockets alike, so Ray's and the S3 client's own
  traffic count against the goal too);
* **time to the first optimizer step** of a real ``ift train`` (tiny preset, 2 workers) on the
  warm index, from the call to ``train`` to the MLflow timestamp of step 1, and the driver's ``rchar``
  over the whole run; large ÷ small side by side.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import load_average

BUCKET = "ift-bench"


def driver_read_bytes() -> int:
    """Bytes this process has read through read system calls (``rchar``)."""
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("rchar:")).split()[1])


def _corpus(path: Path, rows: int, seed: int) -> Path:
    """``rows`` generated conversations, written in blocks (a 2M-row corpus is about 0.7 GB)."""
    from ift.toydata import make_conversations, write_jsonl

    block = 100_000
    parts = []
    for i, start in enumerate(range(0, rows, block)):
        part = path.with_suffix(f".part{i}")
        write_jsonl(make_conversations(min(block, rows - start), seed=seed * 1000 + i), part)
        parts.append(part)
    with path.open("wb") as out:
        for part in parts:
            out.write(part.read_bytes())
            part.unlink()
    return path


class S3Server:
    """moto_server on 127.0.0.1 with one bucket; the AWS variables point at it while it runs."""

    def __enter__(self) -> S3Server:
        import boto3

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.endpoint = f"http://127.0.0.1:{port}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION",
                                                      "AWS_ENDPOINT_URL")}  # fmt: skip
        os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1",
                          AWS_ENDPOINT_URL=self.endpoint)  # fmt: skip
        self.client = boto3.client("s3", endpoint_url=self.endpoint)
        for _ in range(100):
            try:
                self.client.create_bucket(Bucket=BUCKET)
                break
            except Exception:
                time.sleep(0.1)
        return self

    def upload(self, path: Path) -> str:
        self.client.upload_file(str(path), BUCKET, f"corpus/{path.name}")
        return f"s3://{BUCKET}/corpus/{path.name}"

    def __exit__(self, *exc: object) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)
        for k, v in self.saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def planning(root: Path, corpus: str, name: str) -> dict[str, Any]:
    """The driver's plan, cold (empty index) then warm: seconds, scanned bytes, driver rchar."""
    from benchmarks.streaming import _config
    from pipelines.data.parallel_scan import cluster_scanner
    from pipelines.data.streaming import plan_data

    cfg = _config(root, corpus, name, f"data.cache_dir={root / ('cache-' + name)}")
    out: dict[str, Any] = {}
    for phase in ("cold", "warm"):
        scanner = cluster_scanner(cfg)
        before, t = driver_read_bytes(), time.perf_counter()
        plan = plan_data(cfg, scanner)
        out[phase] = {
            "seconds": time.perf_counter() - t,
            "driver_read_bytes": driver_read_bytes() - before,
            "scanned_bytes": scanner.scanned_bytes,
            "rows": plan.train.rows,
        }
    return out


def first_step(root: Path, corpus: str, name: str) -> dict[str, Any]:
    """A real run's time to its first step on the warm index (the plan above wrote it), and the driver's rchar."""
    import mlflow

    from benchmarks.streaming import _config, _history
    from pipelines.orchestration.train import train

    cfg = _config(root, corpus, name, "optimization.max_steps=1", f"data.cache_dir={root / ('cache-' + name)}")
    mlflow.MlflowClient(tracking_uri=cfg.mlflow.tracking_uri).search_experiments()  # the store's migrations
    before, t0 = driver_read_bytes(), time.time()
    result = train(cfg, show_progress=False, register=False)
    first = _history(cfg, result.mlflow_run_id, "loss")[0]
    return {"seconds_to_first_step": first[2] / 1000 - t0, "driver_read_bytes_whole_run": driver_read_bytes() - before}


def run(*, small_rows: int = 2_000, large_rows: int = 2_000_000, log=print) -> dict[str, Any]:
    import ray

    from pipelines.orchestration.train import init_ray

    out: dict[str, Any] = {"load_average_before": load_average(), "small_rows": small_rows, "large_rows": large_rows}
    with tempfile.TemporaryDirectory(prefix="ift-bench-driver-") as tmp, S3Server() as s3:
        ray.shutdown()  # the workers must start with the S3 variables set above
        init_ray(log_to_driver=False)
        root = Path(tmp)
        t = time.perf_counter()
        files = {
            "small": _corpus(root / "small.jsonl", small_rows, 21),
            "large": _corpus(root / "large.jsonl", large_rows, 22),
        }
        out["corpus_bytes"] = {k: p.stat().st_size for k, p in files.items()}
        log(f"[driver] corpora written in {time.perf_counter() - t:.0f} s: {out['corpus_bytes']}")
        where = {("local", k): str(p) for k, p in files.items()}
        t = time.perf_counter()
        where.update({("s3", k): s3.upload(p) for k, p in files.items()})
        log(f"[driver] uploaded to the S3 server in {time.perf_counter() - t:.0f} s")
        for storage in ("local", "s3"):
            cells = {}
            for size in ("small", "large"):
                name = f"{storage}-{size}"
                cell = {"planning": planning(root, where[storage, size], name)}
                cell.update(first_step(root, where[storage, size], name))
                cold, warm = cell["planning"]["cold"], cell["planning"]["warm"]
                cell["warm_driver_read_fraction"] = warm["driver_read_bytes"] / out["corpus_bytes"][size]
                cells[size] = cell
                log(
                    f"[driver] {name}: plan cold {cold['seconds']:.1f} s (driver read "
                    f"{cold['driver_read_bytes'] / 2**20:.1f} MiB), warm {warm['seconds']:.2f} s "
                    f"({warm['driver_read_bytes'] / 2**20:.2f} MiB = {cell['warm_driver_read_fraction']:.4%} of the "
                    f"corpus); first step {cell['seconds_to_first_step']:.1f} s"
                )
            cells["first_step_ratio_large_to_small"] = (
                cells["large"]["seconds_to_first_step"] / cells["small"]["seconds_to_first_step"]
            )
            out[storage] = cells
        ray.shutdown()
    out["load_average_after"] = load_average()
    out["methods"] = {
        "ift": {
            "warm_driver_read_fraction_large": max(
                out[s]["large"]["warm_driver_read_fraction"] for s in ("local", "s3")
            ),
            "first_step_ratio_large_to_small": max(out[s]["first_step_ratio_large_to_small"] for s in ("local", "s3")),
        }
    }
    return out


def render(d: dict[str, Any]) -> list[str]:
    mib = 2**20
    lines = [
        "## Driver reads and time to the first step, small vs large corpus",
        "",
        f"Generated chat JSONL: {d['small_rows']:,} rows ({d['corpus_bytes']['small'] / mib:.1f} MiB) and "
        f"{d['large_rows']:,} rows ({d['corpus_bytes']['large'] / mib:,.0f} MiB), on local disk and on an S3 server "
        "on 127.0.0.1.  Planning: the driver's plan with an empty scan index (cold: new files scanned in Ray "
        "tasks, or on the driver when small) and again with the index it wrote (warm: what a second run, a "
        "resubmission or a sweep trial does).  Driver reads: `rchar` of `/proc/self/io` (all read calls, sockets "
        "included).  First step: `ift train` (tiny preset, 2 workers) on the warm index.",
        "",
        "| storage | corpus | plan cold | driver read, cold | plan warm | driver read, warm | of the corpus "
        "| first step |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for storage in ("local", "s3"):
        for size in ("small", "large"):
            c = d[storage][size]
            cold, warm = c["planning"]["cold"], c["planning"]["warm"]
            lines.append(
                f"| {storage} | {d[size + '_rows']:,} rows | {cold['seconds']:.1f} s "
                f"| {cold['driver_read_bytes'] / mib:,.1f} MiB | {warm['seconds']:.2f} s "
                f"| {warm['driver_read_bytes'] / mib:,.2f} MiB | {c['warm_driver_read_fraction']:.3%} "
                f"| {c['seconds_to_first_step']:.1f} s |"
            )
    lines += [
        "",
        f"Time to the first step, large ÷ small: local {d['local']['first_step_ratio_large_to_small']:.2f}x, "
        f"S3 {d['s3']['first_step_ratio_large_to_small']:.2f}x.",
        "",
    ]
    return lines
