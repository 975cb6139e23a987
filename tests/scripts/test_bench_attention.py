"""scripts/bench_attention.py --tiny runs on CPU, checks every backend against the naive definition,
and writes a JSON whose FLOP rates agree with moba_train.flops and the measured times."""

import json
import runpy
import sys
from pathlib import Path

import pytest

from moba_train import flops

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench_attention.py"


def _refusal(monkeypatch, capsys, *args: str) -> str:
    """Run the script with `args`; it must exit with code 2 (argparse's error). Returns its stderr."""
    monkeypatch.setattr(sys, "argv", [str(SCRIPT), *args])
    bench = runpy.run_path(str(SCRIPT), run_name="bench")
    with pytest.raises(SystemExit) as exit_info:
        bench["main"]()
    assert exit_info.value.code == 2
    return capsys.readouterr().err


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
    out = tmp_path / "bench.json"
    err = _refusal(monkeypatch, capsys, "--tiny", "--passes", "nope,fwd", "--out", str(out))
    assert "unknown pass(es) nope; choose from fwd, fwdbwd" in err
    assert not out.exists()


def test_a_baseline_directory_without_a_kernels_package_is_one_clear_error(tmp_path, monkeypatch, capsys):
    """Python would import this checkout's `kernels` from such a directory and time it against itself."""
    out = tmp_path / "bench.json"
    for baseline in (tmp_path / "missing", tmp_path):
        err = _refusal(monkeypatch, capsys, "--tiny", "--baseline", str(baseline), "--out", str(out))
        assert f"--baseline {baseline} holds no kernels package" in err
        assert not out.exists()


def test_a_baseline_where_triton_cannot_run_is_one_clear_error_before_anything_is_imported(
        tmp_path, monkeypatch, capsys):
    """--tiny runs fp32 on CPU, which the Triton kernels refuse: without this check the run imported the baseline
    and then dropped both Triton backends and timed the rest, or (with --backends naming the baseline) raised."""
    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / "__init__.py").write_text("raise RuntimeError('the baseline was imported')\n")
    out = tmp_path / "bench.json"
    err = _refusal(monkeypatch, capsys, "--tiny", "--baseline", str(tmp_path), "--out", str(out))
    assert "--baseline times Triton kernels, which do not run on cpu in torch.float32" in err
    assert not out.exists() and str(tmp_path) not in sys.path


def test_requested_backends_that_cannot_run_are_named_not_silently_dropped(tmp_path, monkeypatch, capsys):
    out = tmp_path / "bench.json"
    argv = ["--tiny", "--shapes", "tiny-b16", "--out", str(out)]
    err = _refusal(monkeypatch, capsys, *argv, "--backends", "moba-triton-direct")
    assert "none of the backends moba-triton-direct runs on cpu in torch.float32" in err
    assert not out.exists()

    monkeypatch.setattr(sys, "argv", [str(SCRIPT), *argv, "--backends", "sdpa,moba-triton-direct"])
    bench = runpy.run_path(str(SCRIPT), run_name="bench")
    assert bench["main"]() == 0
    assert "skipping moba-triton-direct: not available on cpu" in capsys.readouterr().err
    assert [r["backend"] for r in json.loads(out.read_text())["results"]] == ["sdpa"]


def test_baseline_changes_compare_the_kernels_own_entry_first_and_only_timed_pairs():
    bench = runpy.run_path(str(SCRIPT), run_name="bench")

    def row(shape, passes, backend, ms, status="ok"):
        return dict(shape=shape, passes=passes, backend=backend, ms=ms, status=status)

    rows = [
        row("a", "fwd", "moba-triton", 5.0), row("a", "fwd", "moba-triton-direct", 4.4),
        row("a", "fwd", "moba-triton-baseline", 4.0),
        row("a", "fwdbwd", "moba-triton", 9.0), row("a", "fwdbwd", "moba-triton-baseline", 10.0),
        row("b", "fwd", "moba-triton-direct", 1.0),  # no baseline row
        row("c", "fwd", "moba-triton-direct", None, "error"), row("c", "fwd", "moba-triton-baseline", 2.0),
    ]
    changes = bench["baseline_changes"](rows)
    assert [(c["shape"], c["passes"], c["backend"]) for c in changes] == [
        ("a", "fwd", "moba-triton-direct"), ("a", "fwdbwd", "moba-triton")]
    assert abs(changes[0]["change"] - 0.1) < 1e-12 and abs(changes[1]["change"] + 0.1) < 1e-12
    assert (changes[0]["baseline_ms"], changes[0]["ms"]) == (4.0, 4.4)
