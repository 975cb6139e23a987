"""The Triton package installs as `moba_train.kernels` (the folder stays `kernels/`) and imports only torch
and triton: a top-level `kernels` would collide with Hugging Face's hub `kernels` package."""

import ast
import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

import moba_train.kernels
import pytest

ROOT = Path(__file__).resolve().parents[2]


def _installed() -> bool:
    try:
        importlib.metadata.distribution("moba-train")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


@pytest.mark.skipif(not _installed(), reason="the package is not installed here (make install); nothing to check")
def test_installed_package_provides_moba_train_kernels_and_no_top_level_kernels(tmp_path):
    assert Path(moba_train.kernels.__file__).resolve() == ROOT / "kernels" / "__init__.py"
    # Outside the checkout (whose root would put the folder itself on sys.path), as a user imports it.
    probe = ("import importlib.util, moba_train.kernels; spec = importlib.util.find_spec('kernels'); "
             "print(moba_train.kernels.__file__); print(spec.origin if spec else None)")
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True,
                         check=True)
    ours, top_level = out.stdout.split()
    assert Path(ours).resolve() == ROOT / "kernels" / "__init__.py"
    assert top_level == "None" or Path(top_level).resolve().parent != ROOT / "kernels"


def test_kernels_import_only_torch_triton_numpy_and_themselves():
    allowed = {"torch", "triton", "numpy", "__future__", "typing", "os", "math", "weakref"}
    for path in sorted((ROOT / "kernels").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [] if node.level else [node.module]
            else:
                continue
            for name in names:
                assert name.split(".")[0] in allowed, f"{path.name} imports {name}"


def test_the_checkout_does_not_shadow_a_top_level_kernels_package():
    # `python -m pytest` (make test) puts the checkout's root first on sys.path, where the kernels/ folder would
    # be found as a top-level `kernels` ahead of Hugging Face's hub package of that name, which transformers
    # >= 5.25 requires and imports: `from transformers import LlamaConfig` then fails. tests/conftest.py takes
    # the root off sys.path.
    import importlib.util

    spec = importlib.util.find_spec("kernels")
    assert spec is None or spec.origin is None or Path(spec.origin).resolve() != ROOT / "kernels" / "__init__.py"
