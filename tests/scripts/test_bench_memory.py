"""scripts/bench_memory.py on CPU: what one layer keeps, for MoBA and full attention on one document per sample
and on packed documents, written as JSON beside the formula of moba_train/memory.py, which it must match."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_each_layout_is_measured_and_matches_the_formula(tmp_path):
    out = tmp_path / "memory.json"
    overrides = ["run.device=cpu", "data.kind=synthetic", "train.seq_length=256", "attention.backend=torch",
                 "model.fusions.rmsnorm=triton", "model.fusions.rope=triton", "model.fusions.swiglu=megatron"]
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench_memory.py"), "--config",
         str(ROOT / "configs" / "tiny_moba.yaml"), *overrides, "--out", str(out)],
        capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    run = json.loads(out.read_text())
    assert run["meta"]["element_bytes"] == 4 and run["meta"]["fusions"]["rope"] == "triton"
    records = {(r["attention"], r["packed"]): r for r in run["results"]}
    assert records.keys() == {("moba", False), ("moba", True), ("full", False), ("full", True)}
    for (attention, packed), r in records.items():
        assert r["tokens"] == 2 * 256 and r["bytes_per_token"] == sum(t["bytes"] for t in r["tensors"]) / 512
        # MoBA's reference backend also keeps its selection: int64, top-3 of 4 query heads per token
        extra = 8 * 4 * 3 if attention == "moba" else 0
        assert r["bytes_per_token"] == r["formula_bytes_per_token"] + extra, (attention, packed, r["tensors"])
    # packed documents run as one row, which keeps q, k, v and the output once (v copied off the QKV output): less
    # per token than two rows, whose layout copies keep the output twice
    assert records[("full", True)]["bytes_per_token"] < records[("full", False)]["bytes_per_token"]
    assert "B/token" in result.stdout
