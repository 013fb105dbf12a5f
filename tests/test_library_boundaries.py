"""Boundaries: `ift/` is a library anyone can use in their own loop (no Ray, DeepSpeed or MLflow), and
the training core `pipelines.training` runs without Ray."""

import ast
import subprocess
import sys
from pathlib import Path


def test_ift_imports_without_ray_deepspeed_or_mlflow():
    code = (
        "import sys, pkgutil, importlib, ift\n"
        "for m in pkgutil.walk_packages(ift.__path__, 'ift.'):\n"
        "    importlib.import_module(m.name)\n"
        "bad = sorted(n for n in sys.modules if n.split('.')[0] in ('ray', 'deepspeed', 'mlflow'))\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"ift pulled in: {out.stdout.strip()}"


def _imported_by(packages: str, roots: tuple[str, ...]) -> list[str]:
    """The top-level modules among ``roots`` loaded by importing every module of ``packages``."""
    code = (
        "import sys, pkgutil, importlib\n"
        f"for name in {packages!r}.split(','):\n"
        "    mod = importlib.import_module(name)\n"
        "    for m in pkgutil.walk_packages(getattr(mod, '__path__', []), name + '.'):\n"
        "        importlib.import_module(m.name)\n"
        f"print(','.join(sorted(n for n in sys.modules if n.split('.')[0] in {roots!r})))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return [n for n in out.stdout.strip().split(",") if n]


def test_the_training_core_imports_no_ray():
    """The recipe and everything it stands on run under any launcher (torchrun, a notebook, Ray Train);
    `ift data check` reads and tokenizes a corpus in its own process."""
    pulled = _imported_by("pipelines.training,pipelines.data.batching,pipelines.config,pipelines.data.check", ("ray",))
    assert pulled == [], f"the Ray-free training core pulled in: {pulled}"


def test_ray_datas_tokenizing_processes_load_no_model_classes():
    """Every Ray Data process that reads or tokenizes rows (and each split's coordinator, which unpickles
    the plan) imports the streaming module; the model classes would cost each one about two seconds."""
    code = (
        "import sys, pipelines.data.streaming\n"
        "print(','.join(n for n in sys.modules if n in ('ift.models', 'transformers.models.llama')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"the data path pulled in: {out.stdout.strip()}"


def test_the_algorithm_library_does_not_need_gymnasium():
    """The Frozen Lake experiment's dependency stays with the experiment (the `frozenlake` extra)."""
    assert _imported_by("ift", ("gymnasium",)) == []


def _project_imports(root: Path, packages: tuple[str, ...]) -> dict[str, set[str]]:
    """Module -> the project modules it imports, at module level or inside a function (a local import
    must not be a way round a cycle)."""
    graph: dict[str, set[str]] = {}
    for package in packages:
        for path in (root / package).rglob("*.py"):
            module = ".".join(path.relative_to(root).with_suffix("").parts).removesuffix(".__init__")
            deps = set()
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    deps.add(node.module)
                    deps.update(f"{node.module}.{alias.name}" for alias in node.names)
                elif isinstance(node, ast.Import):
                    deps.update(alias.name for alias in node.names)
            graph[module] = deps
    return {m: {d for d in deps if d in graph and d != m} for m, deps in graph.items()}


def test_no_import_cycles_among_the_projects_modules():
    graph = _project_imports(Path(__file__).resolve().parents[1], ("ift", "pipelines", "tune", "experiments"))
    visiting, done, cycles = [], set(), []

    def visit(module: str) -> None:
        if module in done:
            return
        if module in visiting:
            cycles.append(visiting[visiting.index(module) :] + [module])
            return
        visiting.append(module)
        for dep in sorted(graph[module]):
            visit(dep)
        visiting.pop()
        done.add(module)

    for module in sorted(graph):
        visit(module)
    assert cycles == [], "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)
