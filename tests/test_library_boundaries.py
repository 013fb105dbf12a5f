"""`ift/` is a library anyone can use in their own loop: no Ray, DeepSpeed or MLflow."""

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
