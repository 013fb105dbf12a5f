"""`ift train` submitted to a real Ray cluster with the Ray Jobs CLI, tracked by a
real MLflow tracking server -- the "Run on a cluster" path of cluster/README.md.

1. a Ray head on loopback (`ray start --head --block`), token authentication on
   (RAY_AUTH_MODE=token, a fresh RAY_AUTH_TOKEN), dashboard/Jobs API on a free port;
2. an `mlflow server` on 127.0.0.1 (sqlite backend, proxied artifact store);
3. the Jobs API refuses a request without the token (`ray job submit` with
   authentication off in the client: "Missing authentication token") and one with a
   wrong token (403), then
   `ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml -- ift train ...`
   runs to SUCCEEDED;
4. the registered model version is found (and downloaded) through the server.

Everything started here runs in its own session with its own ports and a private
``--temp-dir``, and is stopped by process group / process tree at the end -- never
with a bare `ray stop`, which would take down other Ray instances on the machine.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
import zipfile
from pathlib import Path

import psutil
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
RUNTIME_ENV = REPO / "cluster" / "runtime_env.yaml"
BIN = Path(sys.executable).parent  # the venv's bin: ray, mlflow and ift live here
MODEL_NAME = "cluster-it"
JOB_TIMEOUT_S = 420  # the job took 3-5 min on a heavily loaded 2-core machine

# Variables from the caller's shell that would point the subprocesses elsewhere.
_SCRUB = (
    "RAY_ADDRESS",
    "RAY_API_SERVER_ADDRESS",
    "RAY_AUTH_MODE",
    "RAY_AUTH_TOKEN",
    "RAY_AUTH_TOKEN_PATH",
    "MLFLOW_TRACKING_URI",
    "MLFLOW_REGISTRY_URI",
    "MLFLOW_EXPERIMENT_NAME",
)


# --------------------------------------------------------------------------- helpers


def _free_ports(n: int) -> list[int]:
    """n distinct free TCP ports on 127.0.0.1 (all held open until all are picked)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _base_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _SCRUB}
    env.update(
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",  # job drivers must find the venv's `ift`
        RAY_USAGE_STATS_ENABLED="0",
        MLFLOW_ENABLE_TELEMETRY="false",
        DO_NOT_TRACK="1",
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        PYTHONUNBUFFERED="1",
    )
    return env


def _terminate_tree(proc: subprocess.Popen, grace_s: float = 3.0) -> None:
    """Stop ``proc`` (started with start_new_session=True), its process group and every
    descendant (Ray workers and job drivers run in process groups of their own)."""
    procs: list[psutil.Process] = []
    try:
        root = psutil.Process(proc.pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        pass
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
        for p in procs:
            try:
                p.send_signal(sig)
            except psutil.NoSuchProcess:
                pass
        _, procs = psutil.wait_procs(procs, timeout=grace_s if sig == signal.SIGTERM else 5)
        if not procs:
            break
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass


class _StartupFailed(Exception):
    pass


def _wait_http(
    url: str, proc: subprocess.Popen, log: Path, timeout_s: float, headers: dict[str, str] | None = None
) -> None:
    """Wait for ``url`` to answer 200; _StartupFailed if ``proc`` exits or time runs out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise _StartupFailed(
                f"{Path(proc.args[0]).name} exited with {proc.returncode} while starting ({log}):\n{_tail(log)}"
            )
        try:
            with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=5) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(1)
    raise _StartupFailed(f"{url} not up after {timeout_s}s ({log}):\n{_tail(log)}")


def _tail(path: Path, n: int = 60) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "<no log>"


def _http_status(url: str, headers: dict[str, str] | None = None) -> int:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def _submit_when_agent_ready(
    cmd: list[str], env: dict[str, str], patience_s: float = 120
) -> subprocess.CompletedProcess:
    """Run ``ray job submit``, again while the head answers "No available agent".

    The Jobs API answers as soon as the dashboard is up, but the head node's dashboard
    agent registers with it some seconds later; until then a submission is refused
    with that message and "please try again later" (seen on a loaded CI machine).
    """
    deadline = time.monotonic() + patience_s
    while True:
        r = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=180)
        if r.returncode == 0 or "No available agent" not in r.stdout + r.stderr or time.monotonic() > deadline:
            return r
        time.sleep(3)


# --------------------------------------------------------------------------- fixtures


def _start_ray_head(tmp_path: Path, env: dict[str, str], token: str, attempt: int):
    """`ray start --head --block` on free ports and a private temp dir; returns
    (process, dashboard url, temp dir) once the Jobs API answers the token."""
    from ray._private.services import get_node_ip_address

    gcs, dash, agent_http, agent_grpc, rt_env, metrics, client = _free_ports(7)
    # Several Ray instances may run on this machine (other test sessions).  Processes of
    # this cluster that look the cluster up with address="auto" (Ray Train's
    # PlacementGroupCleaner does, through the State API) must find this one, not refuse
    # to choose: pin it.  `ray start` itself ignores RAY_ADDRESS.
    head_env = dict(env, RAY_ADDRESS=f"{get_node_ip_address()}:{gcs}")
    # Unix socket paths must stay < 108 chars: a short private temp dir under /tmp.
    temp_dir = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    log = tmp_path / f"ray_head.{attempt}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [
                str(BIN / "ray"),
                "start",
                "--head",
                "--block",
                "--disable-usage-stats",
                f"--port={gcs}",
                "--include-dashboard=true",
                "--dashboard-host=127.0.0.1",
                f"--dashboard-port={dash}",
                f"--dashboard-agent-listen-port={agent_http}",
                f"--dashboard-agent-grpc-port={agent_grpc}",
                f"--runtime-env-agent-port={rt_env}",
                f"--metrics-export-port={metrics}",
                f"--ray-client-server-port={client}",
                "--num-cpus=2",
                "--num-gpus=0",
                "--object-store-memory=300000000",
                f"--temp-dir={temp_dir}",
            ],
            env=head_env,
            cwd=tmp_path,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{dash}"
    try:
        _wait_http(f"{url}/api/jobs/", proc, log, 150, headers={"Authorization": f"Bearer {token}"})
    except BaseException:
        _terminate_tree(proc)
        shutil.rmtree(temp_dir, ignore_errors=True)
        raise
    return proc, url, temp_dir


@pytest.fixture
def servers(tmp_path):
    """A token-authenticated Ray head and an MLflow tracking server, both on loopback.
    Yields a dict: dashboard url, token, env (with the token), MLflow uri and the
    server's artifact directory.  Stops both (process trees) afterwards."""
    if not (BIN / "ift").exists():
        pytest.fail(f"{BIN / 'ift'} missing: install the project first (pip install -e '.[test,eval]')")
    token = secrets.token_hex(32)
    env = _base_env()
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)
    (mlflow_port,) = _free_ports(1)
    mlflow_root = tmp_path / "mlflow"
    mlflow_root.mkdir()
    artifacts = mlflow_root / "artifacts"
    mlflow_log = tmp_path / "mlflow_server.log"
    procs: list[subprocess.Popen] = []
    temp_dir = None
    try:
        with open(mlflow_log, "wb") as out:  # starts while the Ray head starts
            procs.append(
                subprocess.Popen(
                    [
                        str(BIN / "mlflow"),
                        "server",
                        "--host",
                        "127.0.0.1",
                        "--port",
                        str(mlflow_port),
                        "--workers",
                        "1",
                        "--backend-store-uri",
                        f"sqlite:///{mlflow_root / 'mlflow.db'}",
                        "--artifacts-destination",
                        str(artifacts),
                    ],
                    env=_base_env(),
                    cwd=mlflow_root,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
        # On an overloaded machine a head can die in start-up (Ray waits a fixed 30 s
        # for its raylet to register): one more try, on fresh ports.
        failures = []
        for attempt in (1, 2):
            try:
                head, url, temp_dir = _start_ray_head(tmp_path, env, token, attempt)
                break
            except _StartupFailed as exc:
                failures.append(str(exc))
        else:
            pytest.fail("the Ray head did not start:\n" + "\n---\n".join(failures))
        procs.append(head)
        uri = f"http://127.0.0.1:{mlflow_port}"
        try:
            _wait_http(f"{uri}/health", procs[0], mlflow_log, 120)
        except _StartupFailed as exc:
            pytest.fail(f"the MLflow server did not start: {exc}")
        yield {"url": url, "token": token, "env": env, "tracking_uri": uri, "artifacts": artifacts}
    finally:
        for proc in reversed(procs):
            _terminate_tree(proc)
        if temp_dir:
            shutil.rmtree(temp_dir, ignore_errors=True)


# --------------------------------------------------------------------------- tests


def test_runtime_env_ships_the_code_not_the_venv(tmp_path):
    """The excludes of cluster/runtime_env.yaml alone (even with .gitignore ignored)
    keep .venv, stores and outputs out of the upload, and the code is in it."""
    from ray._private.runtime_env.packaging import create_package

    spec = yaml.safe_load(RUNTIME_ENV.read_text())
    assert "working_dir" not in spec  # given on the command line (--working-dir .)
    assert spec["env_vars"]["TOKENIZERS_PARALLELISM"] == "false"
    target = tmp_path / "pkg.zip"
    create_package(str(REPO), target, include_gitignore=False, excludes=spec["excludes"])
    names = zipfile.ZipFile(target).namelist()
    for top in (".venv/", ".git/", "ift_runs/", "ift_cache/", "mlruns/", "mlartifacts/", "outputs/"):
        assert not any(n.startswith(top) for n in names), top
    assert "mlflow.db" not in names and not any("__pycache__" in n for n in names)
    for needed in (
        "pipelines/cli.py",
        "pipelines/configs/tiny.yaml",
        "pipelines/demo_data/demo_chat.jsonl",
        "pyproject.toml",
    ):
        assert needed in names, needed
    assert target.stat().st_size < 50 * 2**20


@pytest.mark.slow
@pytest.mark.timeout(720)
def test_ift_train_as_ray_job_registers_model_in_mlflow_server(tmp_path, servers, monkeypatch):
    from mlflow import MlflowClient
    from mlflow.artifacts import download_artifacts
    from ray.job_submission import JobStatus, JobSubmissionClient

    for var in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):  # both override the SDK's address argument
        monkeypatch.delenv(var, raising=False)
    url, token, env = servers["url"], servers["token"], servers["env"]
    tracking_uri, artifact_dir = servers["tracking_uri"], servers["artifacts"]
    bearer = {"Authorization": f"Bearer {token}"}

    # -- authentication is on: the Jobs API refuses a client without the token (the
    # README's command, minus the token) and one with a wrong token; nothing runs.
    assert _http_status(f"{url}/api/jobs/") == 401
    assert _http_status(f"{url}/api/jobs/", {"Authorization": f"Bearer {secrets.token_hex(32)}"}) == 403
    no_token = {k: v for k, v in env.items() if not k.startswith("RAY_AUTH_")}
    no_token["RAY_AUTH_MODE"] = "disabled"  # this client sends no token, whatever ~/.ray/auth_token holds
    r = subprocess.run(
        [str(BIN / "ray"), "job", "submit", "--address", url, "--no-wait", "--", "echo", "must-not-run"],
        env=no_token,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode != 0 and "Missing authentication token" in r.stdout + r.stderr, r.stdout + r.stderr

    jobs = JobSubmissionClient(url, headers=bearer)
    assert jobs.list_jobs() == []

    # -- the README's command, from the repository root.
    runs = tmp_path / "runs"
    submission_id = f"cluster-it-{uuid.uuid4().hex[:8]}"
    entrypoint = [
        "ift",
        "train",
        "--no-progress",
        "tiny",
        "optimization.max_steps=6",
        "optimization.eval_every_n_steps=3",
        "optimization.log_every_n_steps=1",
        "checkpointing.every_n_steps=3",
        "scaling.num_workers=1",
        "scaling.use_gpu=false",
        f"mlflow.tracking_uri={tracking_uri}",
        "mlflow.experiment=cluster-it",
        f"mlflow.registered_model_name={MODEL_NAME}",
        "run_name=cluster-it",
        f"checkpointing.storage_path={runs}",
    ]
    started = time.monotonic()
    r = _submit_when_agent_ready(
        [
            str(BIN / "ray"),
            "job",
            "submit",
            "--address",
            url,
            "--working-dir",
            ".",
            "--runtime-env",
            str(RUNTIME_ENV.relative_to(REPO)),
            "--submission-id",
            submission_id,
            "--no-wait",
            "--",
            *entrypoint,
        ],
        env=env,
    )
    assert r.returncode == 0, r.stdout + r.stderr

    status = None
    try:
        while time.monotonic() - started < JOB_TIMEOUT_S:
            status = jobs.get_job_status(submission_id)
            if status.is_terminal():
                break
            time.sleep(3)
    finally:
        if status is None or not status.is_terminal():
            try:
                jobs.stop_job(submission_id)
            except Exception:
                pass
    if status != JobStatus.SUCCEEDED:
        logs = "\n".join(jobs.get_job_logs(submission_id).splitlines()[-120:])
        info = jobs.get_job_info(submission_id)
        pytest.fail(
            f"job {submission_id} ended {status} after {time.monotonic() - started:.0f}s "
            f"({info.message}); last log lines:\n{logs}"
        )
    print(f"job {submission_id} SUCCEEDED in {time.monotonic() - started:.0f}s")

    # -- the model version is in the registry of the tracking server.
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    versions = client.search_model_versions(f"name = '{MODEL_NAME}'")
    assert [v.version for v in versions] == ["1"]
    version = versions[0]
    run = client.get_run(version.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["ift.run_name"] == "cluster-it"
    assert version.tags["run_name"] == "cluster-it"
    assert max(m.step for m in client.get_metric_history(run.info.run_id, "loss")) == 6
    assert client.get_metric_history(run.info.run_id, "val_nll")

    # Artifacts went through the server (--artifacts-destination), not to a local path
    # the job happened to share with this test.
    assert any(artifact_dir.rglob("model.safetensors")), "no model weights under the server's artifact store"
    local = Path(
        download_artifacts(
            artifact_uri=client.get_model_version_download_uri(MODEL_NAME, "1"),
            dst_path=str(tmp_path / "dl"),
            tracking_uri=tracking_uri,
        )
    )
    assert list(local.rglob("config.json")) and list(local.rglob("model.safetensors"))

    # Checkpoints are on the storage path the job was given (shared storage on a real cluster).
    assert list((runs / "cluster-it").rglob("checkpoint_*")), list(runs.rglob("*"))[:20]
