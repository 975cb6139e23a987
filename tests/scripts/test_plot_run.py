"""scripts/plot_run.py on real run directories: a MoBA run (with validation and routing diagnostics) and a
full-attention run overlaid into non-empty PNGs; a directory that is not a run is one line and exit 2."""

import os
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import pytest

from moba_train.config import load_config
from moba_train.metrics import read_jsonl
from moba_train.training import train

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "plot_run.py"
SHORT = ["train.steps=4", "train.warmup_steps=1", "train.seq_length=256", "train.micro_batch_size=1",
         "train.global_batch_size=1", "train.eval_interval=2", "train.eval_steps=1", "checkpoint.interval=4",
         "data.kind=synthetic", "data.split=90,10,0", "attention.block_size=32", "logging.progress_bar=off",
         "logging.moba_diag_interval=2"]


def _plot(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=300)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("runs")
    for name, mode in (("moba", "moba"), ("full", "full")):
        train(load_config(ROOT / "configs" / "tiny_moba.yaml",
                          [f"run.output_dir={root / name}", f"attention.mode={mode}", *SHORT]))
    return root / "moba", root / "full"


def test_plots_of_a_moba_and_a_full_attention_run_are_non_empty_pngs(runs, tmp_path):
    moba, full = runs
    assert "moba/gate_recall" in read_jsonl(moba / "metrics.jsonl")[1]
    assert not any(k.startswith("moba/") for r in read_jsonl(full / "metrics.jsonl") for k in r)
    result = _plot(str(moba), str(full), "--out", str(tmp_path / "plots"))
    assert result.returncode == 0, result.stderr[-3000:]
    names = ["loss.png", "validation.png", "throughput.png", "routing.png"]
    assert result.stdout.split() == [str(tmp_path / "plots" / name) for name in names]
    for name in names:
        pixels = matplotlib.image.imread(tmp_path / "plots" / name)
        assert pixels.shape[0] > 200 and pixels.shape[1] > 400
        assert pixels[..., :3].std() > 0.05, f"{name} is blank"


def test_default_output_is_the_first_runs_plots_folder(runs):
    moba, _ = runs
    result = _plot(str(moba))
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in (moba / "plots").iterdir()) == ["loss.png", "routing.png", "throughput.png",
                                                                   "validation.png"]


def test_a_directory_without_metrics_is_one_line_and_exit_2(tmp_path):
    result = _plot(str(tmp_path))
    assert result.returncode == 2
    assert result.stderr == f"error: '{tmp_path}' has no metrics.jsonl; pass the output_dir of a training run\n"


def test_a_run_that_logged_no_step_yet_is_one_line_and_leaves_no_folder(tmp_path):
    """A run killed in its first step leaves an empty (or cut-off) metrics.jsonl: nothing to draw is an error,
    not an empty plots folder and exit 0."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1, "train/lo')  # cut off mid-line
    result = _plot(str(run), "--out", str(tmp_path / "plots"))
    assert result.returncode == 2
    assert result.stderr == f"error: '{run}' has logged no training step yet; plot it once it has\n"
    assert not (tmp_path / "plots").exists()
