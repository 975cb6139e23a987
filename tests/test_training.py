"""The trainer end to end (real Megatron-Core, real checkpoints, the tiny recipe at 256 tokens):
resume exactness after a SIGTERM-triggered save (the interrupted run is a subprocess of
scripts/pretrain.py, everything else runs `train(cfg)` in this process), keep-last-K, init_from,
non-finite skipping."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from moba_train.checkpointing import complete_checkpoints, latest_checkpoint
from moba_train.config import load_config
from moba_train.training import TrainingAborted, train

ROOT = Path(__file__).resolve().parents[1]
STEPS = 12
SMALL = [
    f"train.steps={STEPS}", "train.warmup_steps=2", "train.log_interval=1", "train.seq_length=256",
    "train.micro_batch_size=1", "train.global_batch_size=2",  # 2 accumulation steps on one process
    "checkpoint.interval=5", "checkpoint.keep_last=2", "logging.progress_bar=off",
    "data.kind=synthetic",  # self-contained: no corpus build needed
]


def _command(output_dir: Path, *overrides: str) -> list[str]:
    return [sys.executable, str(ROOT / "scripts" / "pretrain.py"), "--config", str(ROOT / "configs" / "tiny_moba.yaml"),
            f"run.output_dir={output_dir}", *SMALL, *overrides]


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}


def _train(output_dir: Path, *overrides: str) -> None:
    train(load_config(ROOT / "configs" / "tiny_moba.yaml", [f"run.output_dir={output_dir}", *SMALL, *overrides]))


def _metrics(output_dir: Path) -> list[dict]:
    path = output_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """An uninterrupted run of STEPS steps."""
    out = tmp_path_factory.mktemp("reference")
    _train(out)
    return out


def test_sigterm_saves_and_relaunch_resumes_with_identical_losses(reference, tmp_path, capsys):
    proc = subprocess.Popen(_command(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    deadline = time.monotonic() + 300
    while len(_metrics(tmp_path)) < 3 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    stopped_at = len(_metrics(tmp_path))
    assert 3 <= stopped_at < STEPS, "the signal should arrive mid-run"
    assert f"stopped by signal after step {stopped_at}" in stdout
    assert latest_checkpoint(tmp_path / "checkpoints").name == f"step_{stopped_at:08d}"

    _train(tmp_path)
    assert f"at step {stopped_at}" in capsys.readouterr().out
    got, want = _metrics(tmp_path), _metrics(reference)
    assert [m["step"] for m in got] == list(range(1, STEPS + 1))
    for key in ("train/loss", "train/lr", "train/grad_norm"):
        assert [m[key] for m in got] == [m[key] for m in want], key  # full-precision floats, exactly


def test_reference_run_keeps_the_last_two_checkpoints_with_config(reference):
    names = [p.name for p in complete_checkpoints(reference / "checkpoints")]
    assert names == [f"step_{10:08d}", f"step_{STEPS:08d}"]
    assert "seq_length: 256" in (reference / "checkpoints" / names[-1] / "config.yaml").read_text()


def test_init_from_starts_at_step_one_from_the_trained_weights(reference, tmp_path, capsys):
    _train(tmp_path, f"checkpoint.init_from={reference / 'checkpoints'}", "train.steps=3")
    source = reference / "checkpoints" / f"step_{STEPS:08d}"
    assert f"initialised model weights from {source}" in capsys.readouterr().out
    got, trained = _metrics(tmp_path), _metrics(reference)
    assert [m["step"] for m in got] == [1, 2, 3]
    # Step 1 is evaluated before any update: the trained model's loss level, far below a fresh model's.
    assert abs(got[0]["train/loss"] - trained[-1]["train/loss"]) < 0.5
    assert got[0]["train/loss"] < trained[0]["train/loss"] - 1.0


def test_nonfinite_steps_are_skipped_counted_and_abort_after_the_limit(tmp_path):
    with pytest.raises(TrainingAborted, match="^2 consecutive steps had a non-finite loss or gradient norm"):
        _train(tmp_path, "train.lr=1e12", "train.min_lr=0", "train.clip_grad=0", "train.warmup_steps=0",
               "train.max_nonfinite_steps=2")
    metrics = _metrics(tmp_path)
    assert [m["train/skipped"] for m in metrics][-2:] == [1, 1]
    assert not any(m["train/skipped"] for m in metrics[:-2])
