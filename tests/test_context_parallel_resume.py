"""Checkpoints across context-parallel sizes: a run saved at CP 2 resumes at CP 1 and the reverse, and
continues as an uninterrupted CP 1 run does, in training and validation losses (fp32 on CPU; summation
orders differ across CP sizes, so within a tolerance rather than bit for bit). Real torchrun processes
and real checkpoints."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RECIPE = [
    "data.kind=synthetic", "train.seq_length=256", "train.micro_batch_size=1", "train.global_batch_size=2",
    "train.lr_schedule=constant", "train.warmup_steps=1", "train.log_interval=1", "checkpoint.interval=2",
    "attention.block_size=32", "logging.progress_bar=off", "train.eval_interval=2", "train.eval_steps=1",
]


def _run(output_dir: Path, cp: int, steps: int) -> None:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={cp}"] \
        if cp > 1 else [sys.executable]
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    result = subprocess.run(
        [*launcher, str(ROOT / "scripts" / "pretrain.py"), "--config", str(ROOT / "configs" / "tiny_moba.yaml"),
         f"run.output_dir={output_dir}", f"parallel.context={cp}", f"train.steps={steps}", *RECIPE],
        capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]


def _losses(output_dir: Path) -> dict[int, tuple[float, float | None]]:
    """step -> (training loss, validation loss or None)."""
    records = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: (r["train/loss"], r.get("val/loss")) for r in records}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict[int, float]:
    out = tmp_path_factory.mktemp("cp1")
    _run(out, cp=1, steps=4)
    return _losses(out)


@pytest.mark.parametrize("first, second", [(2, 1), (1, 2)], ids=["cp2-then-cp1", "cp1-then-cp2"])
def test_a_checkpoint_resumes_at_another_context_parallel_size(uninterrupted, tmp_path, first, second):
    _run(tmp_path, cp=first, steps=2)
    _run(tmp_path, cp=second, steps=4)
    got = _losses(tmp_path)
    assert sorted(got) == [1, 2, 3, 4]
    for step in range(1, 5):  # validation at steps 2 and 4 runs at the CP size of that attempt too
        assert got[step][0] == pytest.approx(uninterrupted[step][0], rel=1e-4), step
        assert (got[step][1] is None) == (uninterrupted[step][1] is None) == (step % 2 == 1), step
        if got[step][1] is not None:
            assert got[step][1] == pytest.approx(uninterrupted[step][1], rel=1e-4), step
