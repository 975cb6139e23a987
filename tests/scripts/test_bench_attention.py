"""scripts/bench_attention.py --tiny runs on CPU, checks every backend against the naive definition,
and writes a JSON whose FLOP rates agree with moba_train.flops and the measured times."""

import json
import runpy
import sys
from pathlib import Path

from moba_train import flops

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench_attention.py"


def test_bench_attention_tiny_smoke_run_writes_consistent_json(tmp_path, monkeypatch, capsys):
    out = tmp_path / "bench.json"
    monkeypatch.setattr(sys, "argv", [str(SCRIPT), "--tiny", "--shapes", "tiny-b32", "--out", str(out)])
    bench = runpy.run_path(str(SCRIPT), run_name="bench")
    assert bench["main"]() == 0
    result = json.loads(out.read_text())
    assert {"commit", "gpu", "torch", "triton"} <= result["meta"].keys()
    rows = result["results"]
    assert {(r["backend"], r["passes"]) for r in rows} == {
        (b, p) for b in ("sdpa", "moba-torch") for p in ("fwd", "fwdbwd")
    }
    for r in rows:
        assert r["status"] == "ok" and r["ms"] > 0 and r["reps"] >= 3
        moba = r["backend"].startswith("moba")
        fwd = flops.attention_forward_flops([256, 256], 4, 32, 32 if moba else None, 3 if moba else None)
        total = fwd * (3.5 if r["passes"] == "fwdbwd" else 1)
        assert abs(r["tflops"] - total / (r["ms"] * 1e-3) / 1e12) <= 1e-9 * r["tflops"]
        if moba:
            assert r["max_rel_err"] < 1e-5
    assert "moba-torch" in capsys.readouterr().out


def test_unknown_passes_are_one_clear_error_and_nothing_is_written(tmp_path, monkeypatch, capsys):
    import pytest

    out = tmp_path / "bench.json"
    monkeypatch.setattr(sys, "argv", [str(SCRIPT), "--tiny", "--passes", "nope,fwd", "--out", str(out)])
    bench = runpy.run_path(str(SCRIPT), run_name="bench")
    with pytest.raises(SystemExit) as exit_info:
        bench["main"]()
    assert exit_info.value.code == 2
    assert "unknown pass(es) nope; choose from fwd, fwdbwd" in capsys.readouterr().err
    assert not out.exists()


def test_a_baseline_directory_without_a_kernels_package_is_one_clear_error(tmp_path, monkeypatch, capsys):
    """Python would import this checkout's `kernels` from such a directory and time it against itself."""
    import pytest

    out = tmp_path / "bench.json"
    for baseline in (tmp_path / "missing", tmp_path):
        monkeypatch.setattr(sys, "argv", [str(SCRIPT), "--tiny", "--baseline", str(baseline), "--out", str(out)])
        bench = runpy.run_path(str(SCRIPT), run_name="bench")
        with pytest.raises(SystemExit) as exit_info:
            bench["main"]()
        assert exit_info.value.code == 2
        assert f"--baseline {baseline} holds no kernels package" in capsys.readouterr().err
        assert not out.exists()
