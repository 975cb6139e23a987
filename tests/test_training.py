"""The trainer end to end (real Megatron-Core, real checkpoints, the tiny recipe at 256 tokens):
resume exactness after a SIGTERM-triggered save (the interrupted run is a subprocess of
scripts/pretrain.py, everything else runs `train(cfg)` in this process), keep-last-K, init_from,
non-finite skipping; and one accumulated step against the same step computed directly."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from moba_train.checkpointing import complete_checkpoints, latest_checkpoint
from moba_train.config import load_config
from moba_train.data import build_dataloader, build_datasets
from moba_train.distributed import destroy_distributed, init_distributed, set_seed
from moba_train.model import build_model, token_losses
from moba_train.optimizer import build_optimizer, build_scheduler
from moba_train.training import TrainingAborted, step_values, train, train_step, wrap_model

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


def test_a_relaunch_inside_a_run_of_nonfinite_steps_aborts_where_the_uninterrupted_run_does(tmp_path):
    # Steps 2, 3, 4 are non-finite (step 1's update at lr 1e12 blows the weights up): the run aborts at step 4,
    # after saving step 3 in the middle of the run of failures. Relaunched, it resumes there and must count
    # the two failures before the save, as the uninterrupted run did.
    recipe = ("train.lr=1e12", "train.min_lr=0", "train.clip_grad=0", "train.warmup_steps=0",
              "train.max_nonfinite_steps=3", "checkpoint.interval=3")
    for launch in ("first", "relaunch"):
        with pytest.raises(TrainingAborted, match=r"^3 consecutive steps .* \(last at step 4\)"):
            _train(tmp_path, *recipe)
        assert latest_checkpoint(tmp_path / "checkpoints").name == "step_00000003", launch


def test_an_accumulated_step_equals_one_step_computed_directly_on_the_concatenated_batch(tmp_path):
    """train_step over 3 micro-batches whose loss masks count 128, 7 and 43 tokens, against the definition:
    the mean token loss of the concatenated batch, its gradient's norm, and Adam's first update (bias
    corrected: m = g, v = g^2, so p - lr * g / (|g| + eps); no weight decay, no clipping)."""
    cfg = load_config(ROOT / "configs" / "tiny_moba.yaml", [
        f"run.output_dir={tmp_path}", "train.seq_length=128", "train.micro_batch_size=1", "train.global_batch_size=3",
        "train.lr_schedule=constant", "train.warmup_steps=0", "train.weight_decay=0", "train.clip_grad=0",
        "train.precision=fp32", "parallel.distributed_optimizer=false", "data.kind=synthetic"])
    env = init_distributed(cfg)
    try:
        set_seed(cfg.run.seed)
        model = build_model(cfg)
        set_seed(cfg.run.seed)
        direct = build_model(cfg)  # the same initial weights, outside DDP and the optimizer
        assert all(torch.equal(p, q) for p, q in zip(model.parameters(), direct.parameters()))
        direct.to(env.device)  # DDP moves `model` there (its parameters become views of its buffers)
        initial = {name: p.detach().clone() for name, p in direct.named_parameters()}
        wrapped = wrap_model(cfg, model, env)
        optimizer = build_optimizer(cfg, [wrapped], bf16=False, distributed=False)
        build_scheduler(cfg, optimizer).step(1)
        loader = build_dataloader(build_datasets(cfg, env)[0], cfg, env, consumed_samples=0)
        batches = [next(loader) for _ in range(3)]
        counted = (torch.ones(128), torch.arange(128) < 7, torch.arange(128) % 3 == 0)
        for batch, mask in zip(batches, counted):
            batch["loss_mask"] = batch["loss_mask"] * mask
        assert [int(b["loss_mask"].sum()) for b in batches] == [128, 7, 43]

        loss, grad_norm, updated = step_values(*train_step(wrapped, optimizer, batches, env))

        whole = {key: torch.cat([b[key] for b in batches]) for key in ("tokens", "labels", "position_ids", "loss_mask")}
        whole["cu_seqlens"] = torch.arange(0, 3 * 128 + 1, 128, dtype=torch.int32)
        mask = whole["loss_mask"].float()
        want_loss = (token_losses(direct, whole) * mask).sum() / mask.sum()
        want_loss.backward()
        grads = {name: p.grad for name, p in direct.named_parameters()}
        want_norm = torch.sqrt(sum(g.double().pow(2).sum() for g in grads.values()))
        lr, eps = optimizer.param_groups[0]["lr"], cfg.train.adam_eps
        assert updated and lr == cfg.train.lr
        assert loss == pytest.approx(want_loss.item(), rel=1e-5)
        assert grad_norm == pytest.approx(want_norm.item(), rel=1e-5)
        # The two gradients differ by fp32 rounding (~1e-11); where |g| is as small as eps that moves Adam's
        # update by up to ~0.1% of lr, while either mutation of the accumulation moves some by ~lr.
        for name, p in model.named_parameters():
            g = grads[name]
            torch.testing.assert_close(p.detach(), initial[name] - lr * g / (g.abs() + eps), rtol=0, atol=lr * 1e-2,
                                       msg=name)
    finally:
        destroy_distributed()
