"""scripts/bench_diagnostics.py --tiny: the CPU smoke run of the diagnostics-overhead benchmark writes its
JSON, with the overhead computed from the trainer's own timings as documented."""

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_tiny_run_writes_the_overhead_json(tmp_path):
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "GIT_COMMIT": "abc1234"}
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_diagnostics.py"), "--tiny", "--steps", "4",
                             "--every", "2", "--skip", "1", "--out", str(tmp_path)],
                            capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads((tmp_path / "diagnostics-tiny-abc1234.json").read_text())
    assert len(data["step_times_s_without"]) == len(data["step_times_s_with"]) == 4
    assert len(data["diagnostics_time_s"]) == 2 and len(data["gate_recall"]) == 2  # steps 2 and 4
    median = statistics.median(data["step_times_s_without"][1:])
    assert data["step_time_s_median_without"] == median
    assert data["overhead_at_default_interval"] == pytest.approx(
        statistics.mean(data["diagnostics_time_s"]) / (data["default_interval"] * median))
    assert f"-> {tmp_path / 'diagnostics-tiny-abc1234.json'}" in result.stdout
