"""scripts/bench_train.py on CPU: two arms of the tiny recipe in one process, the JSON's rates consistent
with its own step times and with moba_train.flops, the speed-up against the `full` arm."""

import json
import subprocess
import sys
from pathlib import Path

from moba_train.config import load_config
from moba_train.flops import training_step_flops
from moba_train.model import matrix_params

ROOT = Path(__file__).resolve().parents[2]
COMMON = ["data.kind=synthetic", "train.seq_length=256", "train.global_batch_size=2", "logging.progress_bar=off"]


def test_two_arms_write_consistent_records(tmp_path):
    out = tmp_path / "train.json"
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench_train.py"), "--config", str(ROOT / "configs" / "tiny_moba.yaml"),
         *COMMON, "--arm", "moba:", "--arm", "full:attention.mode=full", "--warmup", "1", "--steps", "2",
         "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    arms = {r["name"]: r for r in json.loads(out.read_text())["arms"]}
    assert arms.keys() == {"moba", "full"}
    for name, r in arms.items():
        assert len(r["step_times"]) == 2 and len(r["losses"]) == 3
        assert abs(r["tokens_per_s"] - 512 / r["median_step_s"]) < 1e-6 * r["tokens_per_s"]
        cfg = load_config(ROOT / "configs" / "tiny_moba.yaml", [*COMMON, *r["overrides"][len(COMMON):]])
        flops = training_step_flops(matrix_params(cfg), [256, 256], cfg.layer_kinds(), 4, 32, 64, 3)
        assert abs(r["tflops_per_gpu"] - flops / r["median_step_s"] / 1e12) < 1e-9
    assert arms["full"]["layer_kinds"] == ["full"] * 3 and arms["moba"]["layer_kinds"] == ["moba", "moba", "full"]
    assert abs(arms["moba"]["speedup_vs_full"] - arms["moba"]["tokens_per_s"] / arms["full"]["tokens_per_s"]) < 1e-9
    # The README's table from the same JSON: one row per arm with the recipe's block and top-k and the rates.
    table = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_train.py"), "--table", str(out)],
                           capture_output=True, text=True, timeout=120)
    assert table.returncode == 0, table.stderr[-2000:]
    rows = [line for line in table.stdout.splitlines() if line.startswith("| ") and "---" not in line][1:]
    moba_row = next(r for r in rows if "| moba |" in r)
    assert "MoBA b64 top-3, 1 full" in moba_row and f"{arms['moba']['tokens_per_s']:,.0f}" in moba_row
    assert f"{arms['moba']['speedup_vs_full']:.2f}x" in moba_row and len(rows) == 2


def test_a_bad_arm_is_one_line_and_exit_2():
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench_train.py"), "--config", str(ROOT / "configs" / "tiny_moba.yaml"),
         "--arm", "nocolon"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.strip().startswith("error: --arm 'nocolon' is not NAME:OVERRIDES")


def test_gpu_idle_is_the_unprofiled_step_minus_the_union_of_kernel_intervals():
    """The profiled step runs slower on the host than the timed ones; only the timed step's length counts
    (the 32K full-attention arm reported 0.17 s of host gaps that were the profiler's own overhead: its
    kernels covered 1.917 s of a 1.921 s step)."""
    from moba_train.benchmarking import gpu_idle

    kernels_us = [(0.0, 400_000.0), (300_000.0, 900_000.0), (1_000_000.0, 1_500_000.0)]  # overlap counted once
    assert abs(gpu_idle(kernels_us, 1.6) - 0.2) < 1e-12  # 1.6 s minus 1.4 s busy
    assert gpu_idle(kernels_us, 1.3) == 0.0  # never negative
    assert abs(gpu_idle([], 0.5) - 0.5) < 1e-12  # no kernels (CPU): the whole step
