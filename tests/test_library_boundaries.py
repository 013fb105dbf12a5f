"""Boundaries: `ift/` is a library anyone can use in their own loop (no Ray, DeepSpeed or MLflow), and
the training core `pipelines.training` runs without Ray."""

import subprocess
import sys


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
    """The recipe and everything it stands on run under any launcher (torchrun, a notebook, Ray Train)."""
    pulled = _imported_by("pipelines.training,pipelines.data.batching,pipelines.config", ("ray",))
    assert pulled == [], f"the Ray-free training core pulled in: {pulled}"


def test_the_algorithm_library_does_not_need_gymnasium():
    """The Frozen Lake experiment's dependency stays with the experiment (the `frozenlake` extra)."""
    assert _imported_by("ift", ("gymnasium",)) == []
