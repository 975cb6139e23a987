"""Resuming with real checkpoints (the tiny recipe at 256 tokens, one process, `train(cfg)` in this
process): damaged newest checkpoints are passed over, saying which and why, and the resume from the
newest intact one equals the uninterrupted run; the checkpoint just written is never pruned for damaged
newer ones; a recipe that changes the model or the optimizer layout is one line, other changes are
listed and trained on; a finished run says so; checkpoint.init_from of another shape is one line."""

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from moba_train.checkpointing import complete_checkpoints
from moba_train.cli import SharedConfigError
from moba_train.config import load_config
from moba_train.training import train

ROOT = Path(__file__).resolve().parents[1]
STEPS = 8
SMALL = [
    f"train.steps={STEPS}", "train.warmup_steps=2", "train.seq_length=256", "train.micro_batch_size=1",
    "train.global_batch_size=2", "checkpoint.interval=2", "checkpoint.keep_last=4", "logging.progress_bar=off",
    "data.kind=synthetic",
]


def _train(output_dir: Path, *overrides: str) -> None:
    train(load_config(ROOT / "configs" / "tiny_moba.yaml", [f"run.output_dir={output_dir}", *SMALL, *overrides]))


def _metrics(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """An uninterrupted run of STEPS steps with checkpoints at steps 2, 4, 6 and 8."""
    out = tmp_path_factory.mktemp("finished")
    _train(out)
    assert [p.name for p in complete_checkpoints(out / "checkpoints")] == [f"step_{s:08d}" for s in (2, 4, 6, 8)]
    return out


@pytest.fixture
def run(finished, tmp_path) -> Path:
    """A copy of the finished run to damage or relaunch."""
    return Path(shutil.copytree(finished, tmp_path / "run"))


def _checkpoint(run: Path, step: int) -> Path:
    return run / "checkpoints" / f"step_{step:08d}"


def _largest_shard(checkpoint: Path) -> Path:
    return max(checkpoint.glob("*.distcp"), key=lambda p: p.stat().st_size)


def _flip_a_bit(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def test_damaged_checkpoints_are_passed_over_and_resuming_the_newest_intact_one_is_exact(finished, run, capsys):
    shard = _largest_shard(_checkpoint(run, 8))
    _flip_a_bit(shard)  # bit rot inside a shard: same size, NaN-free but different weights
    os.truncate(_checkpoint(run, 6) / "common.pt", 0)
    (_checkpoint(run, 6) / ".metadata").unlink()
    capsys.readouterr()

    _train(run)
    out = capsys.readouterr().out
    assert (f"passing over checkpoint {_checkpoint(run, 8)}: it is damaged: '{shard.name}' does not match its "
            "checksum (its contents changed)") in out
    assert f"passing over checkpoint {_checkpoint(run, 6)}: it is damaged: '.metadata' is missing" in out
    assert f"resumed from {_checkpoint(run, 4)} at step 4" in out
    got, want = _metrics(run), _metrics(finished)
    assert [m["step"] for m in got] == list(range(1, STEPS + 1))
    # Exactly on CPU; CUDA attention kernels are not bitwise deterministic (an H200 run: losses 2e-5 apart
    # by step 8).
    exact = not torch.cuda.is_available()
    for key in ("train/loss", "train/lr", "train/grad_norm"):
        assert [m[key] for m in got] == ([m[key] for m in want] if exact else pytest.approx([m[key] for m in want],
                                                                                          rel=1e-3)), key


def test_the_checkpoint_just_written_is_kept_when_damaged_newer_ones_exist(run, capsys):
    for step in (6, 8):
        os.truncate(_largest_shard(_checkpoint(run, step)), 100)
    _train(run, "train.steps=5", "checkpoint.keep_last=1")  # resumes from step 4, saves step 5
    assert [p.name for p in complete_checkpoints(run / "checkpoints")] == [
        "step_00000005", "step_00000006", "step_00000008"]  # 4 pruned; the damaged newer ones left alone
    capsys.readouterr()
    _train(run, "train.steps=7", "checkpoint.keep_last=1")
    assert f"resumed from {_checkpoint(run, 5)} at step 5" in capsys.readouterr().out


def test_every_checkpoint_damaged_is_one_line(run):
    for step in (2, 4, 6, 8):
        (_checkpoint(run, step) / "config.yaml").write_text("tampered\n")
    with pytest.raises(SharedConfigError, match=(
            f"^every checkpoint in '{run / 'checkpoints'}' is damaged \\(the newest, step_00000008: 'config.yaml' "
            "has 9 bytes instead of \\d+\\); move them elsewhere to start over, or set checkpoint.resume=false$")):
        _train(run)


@pytest.mark.parametrize("overrides, changed", [
    (["model.hidden_size=256"], "model.hidden_size 128 -> 256"),
    (["model.num_layers=4"], "model.num_layers 3 -> 4"),
    (["model.vocab_size=1024"], "model.vocab_size 512 -> 1024"),
    (["model.num_query_groups=4"], "model.num_query_groups 2 -> 4"),
    (["model.kv_channels=64"], "model.kv_channels None -> 64"),
    (["model.tie_embeddings=true"], "model.tie_embeddings False -> True"),
], ids=["hidden", "layers", "vocab", "query-groups", "kv-channels", "tie"])
def test_a_model_structure_change_on_resume_is_one_line_pointing_to_init_from(run, overrides, changed):
    with pytest.raises(SharedConfigError) as refused:
        _train(run, *overrides)
    assert str(refused.value) == (
        f"the recipe changes the model of the checkpoint it resumes, '{_checkpoint(run, 8)}' ({changed}); a resumed "
        f"run keeps its model: restore the value, or start a new run from these weights with another run.output_dir "
        f"and checkpoint.init_from={_checkpoint(run, 8)}")


def test_an_optimizer_layout_change_on_resume_is_one_line(run):
    # The run saved the device's defaults: fp32 and a plain optimizer on CPU, bf16 and the distributed one on CUDA.
    if torch.cuda.is_available():
        flip, saved, this = "fp32", "bf16 training with the distributed", "fp32 training with the distributed"
        fix = "train.precision=bf16 and parallel.distributed_optimizer=true"
    else:
        flip, saved, this = "bf16", "fp32 training with a non-distributed", "bf16 training with a non-distributed"
        fix = "train.precision=fp32 and parallel.distributed_optimizer=false"
    with pytest.raises(SharedConfigError, match=(
            f"holds the optimizer state of {saved} optimizer, but this run is {this} optimizer; set {fix} to "
            "resume it$")):
        _train(run, f"train.precision={flip}")


def test_continued_training_changes_are_listed_and_trained_on(run, capsys):
    capsys.readouterr()
    _train(run, "train.steps=10", "attention.topk=4", "train.lr=5e-4", "train.seq_length=320",
           "model.kv_channels=32")  # the head dimension it had: no change of structure
    prefix = "recipe changes since step_00000008 (allowed when continuing): "
    [listed] = [line.removeprefix(prefix) for line in capsys.readouterr().out.splitlines() if line.startswith(prefix)]
    assert [change for change in listed.split(", ") if not change.startswith("run.output_dir ")] == [
        "attention.topk 3 -> 4", "model.kv_channels None -> 32", "train.lr 0.001 -> 0.0005",
        "train.seq_length 256 -> 320", "train.steps 8 -> 10"]
    assert [m["step"] for m in _metrics(run)][-2:] == [9, 10]


def test_a_finished_run_says_training_is_complete_and_at_which_step(run, capsys):
    capsys.readouterr()
    _train(run)
    assert capsys.readouterr().out.splitlines()[-1] == (
        f"training is complete: checkpoint {_checkpoint(run, 8)} is at step 8 of train.steps=8; raise train.steps "
        "to train further")
    assert len(_metrics(run)) == STEPS


def test_init_from_a_checkpoint_of_another_shape_is_one_line_naming_the_key(finished, tmp_path):
    with pytest.raises(SharedConfigError) as refused:
        _train(tmp_path / "new", f"checkpoint.init_from={finished / 'checkpoints'}", "model.ffn_hidden_size=512")
    assert str(refused.value) == (
        f"recipe model.ffn_hidden_size is 512 but the checkpoint.init_from checkpoint '{_checkpoint(finished, 8)}' "
        "has 384; set model.ffn_hidden_size=384 to match it")
