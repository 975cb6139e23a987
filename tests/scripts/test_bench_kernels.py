"""scripts/bench_kernels.py's variant table against the kernels it overrides and the device scripts that name it:
a mistyped override would set a new attribute that nothing reads, and the variant would time the shipped kernel."""

import importlib.util
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def bench_kernels():
    spec = importlib.util.spec_from_file_location("bench_kernels", ROOT / "scripts" / "bench_kernels.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_variant_overrides_an_attribute_its_module_has():
    bench = bench_kernels()
    for name, (overrides, _kinds) in bench.VARIANTS.items():
        for key, value in overrides.items():
            module, attr = key.split(".")
            assert hasattr(bench.MODULES[module], attr), f"variant {name}: {key} is not an attribute of the kernels"
            current = getattr(bench.MODULES[module], attr)
            assert current is None or value is None or isinstance(value, type(current)) or \
                isinstance(current, type(value)), f"variant {name}: {key} takes {type(current).__name__}"


def test_the_prepared_device_calls_name_only_variants_and_shapes_that_exist():
    """The scripts with calls still to run (marked "not yet run"; older ones record what ran, and may name
    variants removed since)."""
    bench = bench_kernels()
    named = 0
    for script in sorted((ROOT / "bench").glob("h200_session*.sh")):
        text = script.read_text()
        if "not yet run" not in text:
            continue
        for names in re.findall(r"--variant-names\s+(\S+)", text):
            for name in names.split(","):
                named += 1
                assert name in bench.VARIANTS, f"{script.name} names variant {name!r}, which VARIANTS lacks"
        for shapes in re.findall(r"--variant-shapes\s+(\S+)", text):
            for shape in shapes.split(","):
                assert shape in bench.VARIANT_SHAPES, f"{script.name} names shape {shape!r}"
    assert named >= 6  # bench/h200_session19.sh kernel alone names six


def test_the_gpu_only_scripts_say_so_in_one_line_on_a_machine_without_cuda(tmp_path):
    import os
    import subprocess
    import sys

    import pytest
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OUT": str(tmp_path)}
    for script in ("bench_kernels.py", "trace_gaps.py"):
        done = subprocess.run([sys.executable, str(root / "scripts" / script)], capture_output=True, text=True,
                              env=env, timeout=300)
        assert done.returncode == 2 and "Traceback" not in done.stderr, (script, done.stderr[-2000:])
        assert done.stderr.strip().splitlines()[-1].startswith(f"error: {script} ")
        assert "CUDA" in done.stderr.strip().splitlines()[-1]
