"""Do the packaged training configs fit the packaged clusters?

Reads every cluster config under ``cluster/`` (each KubeRay RayCluster, each RayJob's
``rayClusterSpec``, the cluster launcher's ``available_node_types``) and every packaged training
config, and checks, without starting Ray, that what a config asks for can be placed on each
cluster it is meant for (``MEANT_FOR``) at the cluster's maximum size:

* Ray Train gives each worker one placement-group bundle, ``{CPU: scaling.cpus_per_worker,
  GPU: scaling.gpus_per_worker}`` (GPU only when ``scaling.use_gpu`` resolves true, as
  ``resolve_use_gpu`` resolves it on a cluster with GPUs), and a bundle never spans nodes.
  ``scaling.placement_strategy`` STRICT_PACK needs one node for all of them, STRICT_SPREAD a node each.
* Ray Train V2's controller and the job's driver reserve no CPU (``num_cpus=0``), nor do the
  driver's helper actors; the tokenizer actors (``tokenizer_resources``) take the CPUs the workers
  leave free, and a config fits only if each actor gets a whole CPU (with less, tokenization
  competes with training).
* A head started with ``num-cpus: 0`` takes no work.
* A node group counts at its ``maxReplicas`` (KubeRay with in-tree autoscaling, else ``replicas``),
  a launcher node type at its ``max_workers``, all worker types together at most the global
  ``max_workers``.

A second test checks what the GPU nodes hold: GPU memory against the dry run's per-GPU estimate
(``ift train --dry-run``, ``pipelines.training.estimate``) with headroom, host memory against any
offloaded state, and local disk against the final checkpoint a node stages before the upload.
A third checks the pod shape training needs (shared memory, shared storage for the HF cache).

``pytest -s tests/test_cluster_fit.py`` prints the fit table.
"""

from __future__ import annotations

import fnmatch
import math
import os
import re
import shlex
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import pytest
import yaml

from pipelines.config_loading import load_config, packaged_config_names
from pipelines.data.tokenize import tokenizer_resources
from pipelines.orchestration.train import resolve_use_gpu

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
MIB, GIB = 2**20, 2**30

# Which packaged training configs each cluster file is for (fnmatch patterns over
# `ift configs`).  Every cluster file must be listed, every packaged config must be meant for at
# least one cluster, and it must fit each cluster it is meant for.  A RayJob is also checked with
# its own entrypoint's config and overrides.
MEANT_FOR: dict[str, list[str]] = {
    "ray-cluster.yaml": ["*"],  # 8-GPU workers: every 7B config; tiny trains on 2 of their GPUs
    "kuberay/raycluster.yaml": ["*"],
    "kuberay/rayjob.yaml": ["*"],  # its entrypoint runs mistral-7b-ift; any other config fits the same shape
}
NOT_CLUSTER_CONFIGS = {"runtime_env.yaml"}

# The dry run's per-GPU total is a floor (no allocator fragmentation, CUDA context, NCCL buffers,
# DeepSpeed's communication buckets): a GPU must hold half as much again.
GPU_HEADROOM = 1.5
# What a node group whose YAML leaves the GPU model or the local disk open can be trusted with:
# the smallest data-center GPU (T4, 15 GiB usable), a few GiB of disk.
ANY_GPU, ANY_DISK = 15 * GIB, 10 * GIB


@dataclass(frozen=True)
class Instance:
    cpus: int
    gpus: int
    gpu_memory_mib: int  # per GPU, as nvidia-smi and GPU Feature Discovery's nvidia.com/gpu.memory report it
    memory_gib: int


# EC2 instance types the cluster files name (vCPUs, GPUs, GPU memory, host memory).
INSTANCE_TYPES = {
    "m6i.2xlarge": Instance(8, 0, 0, 32),
    "g5.12xlarge": Instance(48, 4, 23028, 192),  # 4 x A10G 24 GB
    "p4d.24xlarge": Instance(96, 8, 40960, 1152),  # 8 x A100 40 GB
    "p4de.24xlarge": Instance(96, 8, 81920, 1152),  # 8 x A100 80 GB
    "p5.48xlarge": Instance(192, 8, 81559, 2048),  # 8 x H100 80 GB
    "p5e.48xlarge": Instance(192, 8, 143771, 2048),  # 8 x H200 141 GB
    "p5en.48xlarge": Instance(192, 8, 143771, 2048),
}


@dataclass(frozen=True)
class Group:
    """One node group at the cluster's maximum size: ``count`` nodes of this shape."""

    name: str
    cpus: float
    gpus: float
    count: int
    head: bool = False
    memory: float | None = None  # bytes of host memory (the pod's limit, the instance's)
    gpu_memory: float | None = None  # bytes per GPU, where the YAML pins the GPU model
    disk: float | None = None  # bytes of local disk (ephemeral-storage request, EBS volume)


@dataclass
class Cluster:
    name: str  # path under cluster/
    groups: list[Group]
    max_workers: int | None = None  # the launcher's cap on worker nodes of all types together
    entrypoint: tuple[str, list[str]] | None = None  # a RayJob's `ift train CONFIG overrides...`
    raw: dict = field(default_factory=dict, repr=False)


# --------------------------------------------------------------------------- reading the cluster files

_UNITS = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 1e3, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}


def quantity(value: str | float) -> float:
    """A Kubernetes quantity ("88", "500m", "512Gi") as a number."""
    text = str(value).strip()
    if text.endswith("m"):
        return float(text[:-1]) / 1000
    for unit in sorted(_UNITS, key=len, reverse=True):
        if text.endswith(unit):
            return float(text[: -len(unit)]) * _UNITS[unit]
    return float(text)


def _expression_gpu_memory(expr: dict) -> float | None:
    """GPU memory (bytes) a node-affinity expression guarantees, if it says anything about it."""
    key, op, values = expr["key"], expr["operator"], expr.get("values", [])
    if key == "nvidia.com/gpu.memory" and op == "Gt":  # GPU Feature Discovery's label, MiB
        return int(values[0]) * MIB
    if key in ("node.kubernetes.io/instance-type", "beta.kubernetes.io/instance-type") and op == "In":
        unknown = [v for v in values if v not in INSTANCE_TYPES]
        assert not unknown, f"instance types {unknown} are not in INSTANCE_TYPES of {__file__}: add them"
        return min(INSTANCE_TYPES[v].gpu_memory_mib for v in values) * MIB
    return None


def pinned_gpu_memory(pod: dict) -> float | None:
    """The least GPU memory a pod's required node affinity and nodeSelector let it land on
    (None when some alternative leaves the GPU model open)."""
    required = pod.get("affinity", {}).get("nodeAffinity", {}).get("requiredDuringSchedulingIgnoredDuringExecution")
    terms = (required or {}).get("nodeSelectorTerms") or [{}]
    selector = [{"key": k, "operator": "In", "values": [v]} for k, v in (pod.get("nodeSelector") or {}).items()]
    alternatives = []
    for term in terms:  # terms are ORed, the expressions of a term ANDed
        found = [m for e in [*term.get("matchExpressions", []), *selector] if (m := _expression_gpu_memory(e))]
        if not found:
            return None
        alternatives.append(max(found))
    return min(alternatives)


def kuberay_group(group: dict, *, head: bool, autoscaling: bool) -> Group:
    pod = group["template"]["spec"]
    container = pod["containers"][0]  # KubeRay's Ray container
    resources = container.get("resources", {})
    limits, requests = resources.get("limits", {}), resources.get("requests", {})
    params = group.get("rayStartParams") or {}

    def amount(key: str, param: str | None = None) -> float:
        if param and param in params:
            return quantity(params[param])
        value = limits.get(key, requests.get(key))  # KubeRay reads the limit, else the request
        return 0.0 if value is None else quantity(value)

    if head:
        count = 1
    else:
        count = group.get("maxReplicas", 0) if autoscaling else group.get("replicas", 0)
        count *= group.get("numOfHosts", 1)
    disk = requests.get("ephemeral-storage")
    return Group(
        name="head" if head else group["groupName"],
        cpus=amount("cpu", "num-cpus"),
        gpus=amount("nvidia.com/gpu", "num-gpus"),
        count=count,
        head=head,
        memory=amount("memory") or None,
        gpu_memory=pinned_gpu_memory(pod),
        disk=None if disk is None else quantity(disk),
    )


def ift_train_args(entrypoint: str) -> tuple[str, list[str]]:
    """CONFIG and the overrides of an ``ift train`` entrypoint (plain, or in ``bash -c '...'``)."""
    words = shlex.split(entrypoint)
    if words[:2] == ["bash", "-c"]:
        words = shlex.split(words[2])
    start = words.index("ift") + 2
    assert words[start - 1] == "train", entrypoint
    args = [w for w in words[start:] if not w.startswith("--")]
    return args[0], args[1:]


def kuberay_clusters() -> list[Cluster]:
    clusters = []
    for path in sorted((CLUSTER / "kuberay").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if not doc or doc.get("kind") not in ("RayCluster", "RayJob"):
                continue
            spec = doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"].get("rayClusterSpec")
            if spec is None:  # a RayJob on an existing cluster (clusterSelector)
                continue
            autoscaling = bool(spec.get("enableInTreeAutoscaling"))
            groups = [kuberay_group(spec["headGroupSpec"], head=True, autoscaling=autoscaling)]
            groups += [kuberay_group(g, head=False, autoscaling=autoscaling) for g in spec.get("workerGroupSpecs", [])]
            entrypoint = ift_train_args(doc["spec"]["entrypoint"]) if doc["kind"] == "RayJob" else None
            name = str(path.relative_to(CLUSTER))
            clusters.append(Cluster(name, groups, entrypoint=entrypoint, raw=spec))
    return clusters


def ray_start_flags(commands: list[str]) -> dict[str, str]:
    """``--num-cpus=0`` and the like from a node type's ``ray start`` commands."""
    return dict(re.findall(r"--(num-cpus|num-gpus|object-store-memory)[= ](\S+)", " ".join(commands)))


def launcher_cluster(path: Path) -> Cluster:
    conf = yaml.safe_load(path.read_text())
    groups = []
    for name, node_type in conf["available_node_types"].items():
        config = node_type["node_config"]
        kind = config["InstanceType"]
        assert kind in INSTANCE_TYPES, f"{kind} is not in INSTANCE_TYPES of {__file__}: add it"
        instance, resources = INSTANCE_TYPES[kind], node_type.get("resources") or {}
        head = name == conf["head_node_type"]
        flags = ray_start_flags(conf["head_start_ray_commands" if head else "worker_start_ray_commands"])
        volumes = [m["Ebs"]["VolumeSize"] for m in config.get("BlockDeviceMappings", []) if "Ebs" in m]
        groups.append(
            Group(
                name=name,
                cpus=float(flags.get("num-cpus", resources.get("CPU", instance.cpus))),
                gpus=float(flags.get("num-gpus", resources.get("GPU", instance.gpus))),
                count=1 if head else min(node_type.get("max_workers", 0), conf.get("max_workers", 2)),
                head=head,
                memory=instance.memory_gib * GIB,
                gpu_memory=instance.gpu_memory_mib * MIB or None,
                disk=volumes[0] * 1e9 if volumes else None,
            )
        )
    return Cluster(str(path.relative_to(CLUSTER)), groups, max_workers=conf.get("max_workers", 2), raw=conf)


@cache
def clusters() -> tuple[Cluster, ...]:
    return (launcher_cluster(CLUSTER / "ray-cluster.yaml"), *kuberay_clusters())


@cache
def training_configs() -> dict[str, object]:
    return {name: load_config(name) for name in packaged_config_names()}


def checks() -> list[tuple[Cluster, str, object]]:
    """(cluster, label, config) for every config meant for every cluster, plus RayJob entrypoints."""
    out = []
    for cluster in clusters():
        patterns = MEANT_FOR[cluster.name]
        for name, cfg in training_configs().items():
            if any(fnmatch.fnmatch(name, p) for p in patterns):
                out.append((cluster, name, cfg))
        if cluster.entrypoint is not None:
            name, overrides = cluster.entrypoint
            out.append((cluster, f"{name} + its entrypoint's overrides", load_config(name, overrides)))
    return out


# --------------------------------------------------------------------------- placing a config


def bundles_per_node(group: Group, bundle: dict[str, float]) -> int:
    """How many of these bundles one node of the group holds (a bundle never spans nodes)."""
    have = {"CPU": group.cpus, "GPU": group.gpus}
    return min((math.floor(have[k] / v + 1e-9) for k, v in bundle.items() if v > 0), default=10**6)


def nodes_at_max_size(cluster: Cluster, bundle: dict[str, float]) -> list[Group]:
    """One entry per node of the cluster at its maximum size; under the launcher's global cap, the
    worker nodes that hold the most of these bundles."""
    nodes = [g for g in cluster.groups for _ in range(g.count)]
    heads = [g for g in nodes if g.head]
    workers = sorted(
        (g for g in nodes if not g.head), key=lambda g: (bundles_per_node(g, bundle), g.cpus), reverse=True
    )
    if cluster.max_workers is not None:
        workers = workers[: cluster.max_workers]
    return heads + workers


def worker_bundle(cfg, cluster: Cluster) -> dict[str, float]:
    gpus = sum(g.gpus * g.count for g in cluster.groups)
    use_gpu, _ = resolve_use_gpu(cfg, gpus_now=gpus, gpus_autoscalable=gpus)
    s = cfg.scaling
    return {"CPU": s.cpus_per_worker, **({"GPU": s.gpus_per_worker} if use_gpu else {})}


def _fmt(bundle: dict[str, float]) -> str:
    return "{" + ", ".join(f"{k} {v:g}" for k, v in bundle.items()) + "}"


def _room(cluster: Cluster, bundle: dict[str, float], nodes: list[Group]) -> str:
    parts = []
    for g in cluster.groups:
        n = sum(1 for node in nodes if node is g)
        parts.append(f"{g.name} {n}x{bundles_per_node(g, bundle) if n else 0}")
    return " + ".join(parts)


def _tokenizer_problem(cfg, nodes: list[Group], per_node: list[int], bundle: dict[str, float]) -> str | None:
    """The workers placed (filling the roomiest nodes first), can each tokenizer actor get its CPU?"""
    left, to_place = [], cfg.scaling.num_workers
    for node, k in zip(nodes, per_node, strict=True):
        placed = min(k, to_place)
        to_place -= placed
        left.append(node.cpus - placed * bundle["CPU"])
    actors, cpus = tokenizer_resources(cfg, sum(n.cpus for n in nodes))
    if cpus < 1:
        return (
            f"the workers leave {max(sum(left), 0):g} CPUs for {actors} tokenizer actors: each would get a "
            f"{cpus:g}-CPU share beside training"
        )
    slots = sum(math.floor(c / cpus + 1e-9) for c in left)
    if slots < actors:
        return f"room for {slots} of {actors} tokenizer actors of {cpus:g} CPU beside the workers"
    return None


def place(cluster: Cluster, cfg) -> tuple[str, str, str | None]:
    """(what the config asks, the room at maximum size, why it cannot be placed or None)."""
    s, bundle = cfg.scaling, worker_bundle(cfg, cluster)
    order = sorted(nodes_at_max_size(cluster, bundle), key=lambda g: -bundles_per_node(g, bundle))
    per_node = [bundles_per_node(g, bundle) for g in order]
    asks = f"{s.num_workers} x {_fmt(bundle)} {s.placement_strategy}"
    room = _room(cluster, bundle, order)
    if s.placement_strategy == "STRICT_PACK":
        capacity, how = max(per_node, default=0), "on one node (STRICT_PACK)"
    elif s.placement_strategy == "STRICT_SPREAD":
        capacity, how = sum(1 for k in per_node if k > 0), "one per node (STRICT_SPREAD)"
    else:
        capacity, how = sum(per_node), "(a bundle cannot span nodes)"
    if capacity < s.num_workers:
        shapes = ", ".join(f"{g.name} {g.count} x {_fmt({'CPU': g.cpus, 'GPU': g.gpus})}" for g in cluster.groups)
        return asks, room, f"room for {capacity} of {s.num_workers} workers {how}; nodes: {shapes}"
    return asks, room, _tokenizer_problem(cfg, order, per_node, bundle)


def _names(names: list[str]) -> str:
    """Config names, short: ``prefix*suffix (n)`` for all the packaged configs of that form,
    else ``prefix{a,b}suffix``."""
    if len(names) == 1:
        return names[0]
    prefix = os.path.commonprefix(names)
    suffix = os.path.commonprefix([n[::-1] for n in names])[::-1]
    if len(prefix) + len(suffix) > min(map(len, names)):
        suffix = ""
    alike = [n for n in packaged_config_names() if n.startswith(prefix) and n.endswith(suffix)]
    if len(names) > 2 and names == alike:
        return f"{prefix}*{suffix} ({len(names)})"
    return prefix + "{" + ",".join(n[len(prefix) : len(n) - len(suffix)] for n in names) + "}" + suffix


def _grouped(rows: list[tuple[str, ...]], col: int) -> list[tuple[str, ...]]:
    """Rows that differ only in column ``col`` (a packaged config's name) merged into one, in
    first-seen order; a RayJob's entrypoint keeps its own row."""
    merged: dict[tuple, list[str]] = {}
    packaged = set(packaged_config_names())
    for row in rows:
        own = row[col] not in packaged
        merged.setdefault((own and row[col], row[:col] + row[col + 1 :]), []).append(row[col])
    return [key[:col] + (_names(names),) + key[col:] for (_, key), names in merged.items()]


def _table(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


# --------------------------------------------------------------------------- tests


def test_every_cluster_file_and_training_config_is_accounted_for():
    files = {str(p.relative_to(CLUSTER)) for p in CLUSTER.rglob("*.yaml")} - NOT_CLUSTER_CONFIGS
    assert files == set(MEANT_FOR), (
        f"cluster files without an entry in MEANT_FOR (or entries without a file): {files ^ set(MEANT_FOR)}"
    )
    assert {c.name for c in clusters()} == set(MEANT_FOR)
    orphans = [
        n for n in packaged_config_names() if not any(fnmatch.fnmatch(n, p) for ps in MEANT_FOR.values() for p in ps)
    ]
    assert not orphans, f"packaged configs meant for no cluster: {orphans}"


def test_every_training_config_can_be_placed_on_its_clusters():
    rows = []
    for cluster, label, cfg in checks():
        asks, room, problem = place(cluster, cfg)
        rows.append((cluster.name, label, asks, room, "yes" if problem is None else f"NO: {problem}"))
    rows = _grouped(rows, 1)
    header = ("cluster", "training configs", "asks: workers x bundle", "room at max size: nodes x workers", "placed?")
    table = _table([header, *rows])
    print("\n" + table)
    failures = [f"{r[1]} cannot be placed on {r[0]}: {r[4][4:]}" for r in rows if r[4] != "yes"]
    assert not failures, "\n".join(failures) + "\n\n" + table


def staged_checkpoint_bytes(cfg, shape, ranks_on_node: int, bf16: bool) -> float:
    """Local disk the node holding rank 0 needs for the final checkpoint before the upload: its ranks'
    DeepSpeed files (16-bit weights, fp32 master weights and Adam's two moments: 2 + 12 bytes per
    parameter in bf16, partitioned under ZeRO-3 / from ZeRO-1 on) and rank 0's hf_model/ export."""
    share = ranks_on_node / cfg.scaling.num_workers
    stage, weight_bytes = cfg.deepspeed.zero_stage, 2 if bf16 else 4
    weights = weight_bytes * shape.parameters * (share if stage == 3 else 1)
    optimizer = (12 if bf16 else 8) * shape.trainable * (share if stage >= 1 else 1)
    return weights + optimizer + weight_bytes * shape.parameters


def _node_problems(cfg, shape, g: Group, ranks: int, est) -> list[str]:
    from pipelines.training.build import trains_in_bf16

    problems: list[str] = []
    need = est.gpu_total * GPU_HEADROOM
    if g.gpu_memory is None and need > ANY_GPU:
        problems.append(
            f"its GPU model is open: pin GPUs of >= {need / GIB:.0f} GiB (node affinity on nvidia.com/gpu.memory "
            "or node.kubernetes.io/instance-type; the launcher's InstanceType)"
        )
    elif g.gpu_memory is not None and need > g.gpu_memory:
        problems.append(
            f"needs {est.gpu_total / GIB:.1f} GiB per GPU (dry run) x {GPU_HEADROOM} = {need / GIB:.1f} GiB, "
            f"its GPUs have {g.gpu_memory / GIB:.1f} GiB"
        )
    host = sum(est.per_host.values()) * ranks
    if host and (g.memory is None or host > g.memory):
        has = "states none" if g.memory is None else f"has {g.memory / GIB:.0f} GiB"
        problems.append(f"{ranks} workers offload {host / GIB:.0f} GiB to host memory, the node {has}")
    disk = staged_checkpoint_bytes(cfg, shape, ranks, trains_in_bf16(cfg, True))
    if disk > (ANY_DISK if g.disk is None else g.disk):
        have = "no local disk request" if g.disk is None else f"{g.disk / GIB:.0f} GiB"
        problems.append(f"stages a {disk / GIB:.0f} GiB checkpoint on local disk, has {have}")
    return problems


def test_gpu_nodes_hold_each_config():
    from pipelines.training.build import trains_in_bf16
    from pipelines.training.estimate import estimate_memory, model_shape

    shapes, rows = {}, []
    for cluster, label, cfg in checks():
        bundle = worker_bundle(cfg, cluster)
        if "GPU" not in bundle:
            continue
        key = (cfg.model.name, cfg.model.revision, cfg.model.lora and cfg.model.lora.model_dump_json())
        if key not in shapes:
            shapes[key] = model_shape(cfg)
        shape, est = shapes[key], estimate_memory(cfg, shapes[key], use_gpu=True)
        for g in cluster.groups:
            if g.count == 0 or bundles_per_node(g, bundle) == 0:
                continue
            ranks = min(bundles_per_node(g, bundle), cfg.scaling.num_workers)
            problems = _node_problems(cfg, shape, g, ranks, est)
            disk = staged_checkpoint_bytes(cfg, shape, ranks, trains_in_bf16(cfg, True)) / GIB
            have_gpu = "?" if g.gpu_memory is None else f"{g.gpu_memory / GIB:.1f}"
            have_disk = "?" if g.disk is None else f"{g.disk / GIB:.0f}"
            gpu = f"{est.gpu_total / GIB:.1f} x {GPU_HEADROOM} = {est.gpu_total * GPU_HEADROOM / GIB:.1f} / {have_gpu}"
            verdict = "yes" if not problems else "NO: " + "; ".join(problems)
            rows.append((cluster.name, g.name, label, gpu, f"{disk:.0f} / {have_disk}", verdict))
    rows = _grouped(rows, 2)
    header = ("cluster", "node group", "training configs", "GiB per GPU: dry run x headroom / has",
              "GiB local disk: staged checkpoint / has", "holds?")  # fmt: skip
    table = _table([header, *rows])
    print("\n" + table)
    failures = [f"{r[2]} on {r[0]} group {r[1]}: {r[5][4:]}" for r in rows if r[5] != "yes"]
    assert not failures, "\n".join(failures) + "\n\n" + table


def _mounts(pod: dict, container: dict) -> dict[str, dict]:
    """mountPath -> the volume mounted there."""
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    return {m["mountPath"]: volumes[m["name"]] for m in container.get("volumeMounts", [])}


@pytest.mark.parametrize("name", [n for n in MEANT_FOR if n.startswith("kuberay/")])
def test_kuberay_pods_have_the_shape_training_needs(name):
    for cluster in (c for c in clusters() if c.name == name):
        spec = cluster.raw
        assert spec["headGroupSpec"]["rayStartParams"].get("num-gpus") == "0", "the head must be CPU only"
        for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
            pod = group["template"]["spec"]
            container = pod["containers"][0]
            mounts = _mounts(pod, container)
            shm = mounts.get("/dev/shm", {}).get("emptyDir", {})
            assert shm.get("medium") == "Memory", f"{name}: /dev/shm must be a memory-backed emptyDir"
            limit = quantity(container["resources"]["limits"]["memory"])
            assert quantity(shm["sizeLimit"]) < limit, f"{name}: /dev/shm counts against the pod's memory"
            store = (group.get("rayStartParams") or {}).get("object-store-memory")
            assert store is None or quantity(store) <= quantity(shm["sizeLimit"]), f"{name}: object store > /dev/shm"
            env = {e["name"]: e.get("value") for e in container.get("env", [])}
            shared = [p for p, v in mounts.items() if "persistentVolumeClaim" in v]
            assert any(env.get("HF_HOME", "").startswith(p) for p in shared), f"{name}: HF_HOME not on shared storage"


def test_launcher_nodes_have_the_shape_training_needs():
    conf = next(c for c in clusters() if c.name == "ray-cluster.yaml").raw
    docker = conf["docker"]
    run_options = " ".join(docker.get("run_options", []) + docker.get("worker_run_options", []))
    shm = re.search(r"--shm-size[= ](\d+)g", run_options)
    store = ray_start_flags(conf["worker_start_ray_commands"]).get("object-store-memory")
    assert shm and (store is None or int(store) <= int(shm.group(1)) * 2**30), "object store > /dev/shm"
    assert re.search(r"HF_HOME=/mnt/shared/", run_options), "HF_HOME must be on the shared mount"
    assert "/mnt/shared:/mnt/shared" in run_options, "the host's shared mount must reach the container"
    assert ray_start_flags(conf["head_start_ray_commands"]).get("num-gpus") == "0"
