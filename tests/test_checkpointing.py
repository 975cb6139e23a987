"""Checkpoints in one process with real Megatron-Core dist_checkpointing: a full checkpoint restores
model, optimizer, scheduler, RNG and trainer state exactly; keep-last-K; a crash between writing
and publishing leaves the newest complete checkpoint loadable and discovery ignores the debris;
model-only checkpoints load weights only."""

import errno
from pathlib import Path

import pytest
import torch

from moba_train import checkpointing
from moba_train.checkpointing import TrainState
from moba_train.config import ConfigError, load_config
from moba_train.data import build_dataloader, build_datasets
from moba_train.distributed import destroy_distributed, init_distributed, set_seed
from moba_train.model import build_model, compute_dtype, forward_step
from moba_train.optimizer import build_optimizer, build_scheduler, optimizer_step, use_distributed_optimizer
from moba_train.training import wrap_model

ROOT = Path(__file__).resolve().parents[1]


# fp32 + plain optimizer (the CPU default) and bf16 + distributed optimizer (the CUDA default).
GPU_RECIPE = ["train.precision=bf16", "parallel.distributed_optimizer=true"]


@pytest.fixture
def cfg(tmp_path, request):
    extra = getattr(request, "param", [])
    return load_config(ROOT / "configs" / "tiny_moba.yaml",
                       [f"run.output_dir={tmp_path}", "train.seq_length=128", "checkpoint.keep_last=2",
                        "data.kind=synthetic", *extra])


@pytest.fixture
def env(cfg):
    yield init_distributed(cfg)
    destroy_distributed()


def _build(cfg, env, seed: int):
    set_seed(seed)
    model = wrap_model(cfg, build_model(cfg), env)
    bf16 = compute_dtype(cfg, env.device) == torch.bfloat16
    optimizer = build_optimizer(cfg, [model], bf16=bf16, distributed=use_distributed_optimizer(cfg, env.device))
    return model, optimizer, build_scheduler(cfg, optimizer)


def _train_one_step(cfg, env, model, optimizer, scheduler):
    batch = next(build_dataloader(build_datasets(cfg, env)[0], cfg, env, 0))
    model.zero_grad_buffer()
    optimizer.zero_grad()
    loss_sum, tokens = forward_step(model, batch)
    (loss_sum / tokens).backward()
    model.finish_grad_sync()
    scheduler.step(1)
    assert optimizer_step(optimizer)[0]


def _params(model) -> dict[str, torch.Tensor]:
    state = checkpointing.unwrap_model(model).state_dict()
    return {k: v.detach().clone() for k, v in state.items() if "_extra_state" not in k}


def _assert_same(a: dict, b: dict):
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


@pytest.mark.parametrize("cfg", [[], GPU_RECIPE], ids=["fp32", "bf16-distributed-optimizer"], indirect=True)
def test_full_checkpoint_restores_model_optimizer_scheduler_rng_and_position(cfg, env):
    model, optimizer, scheduler = _build(cfg, env, seed=1)
    _train_one_step(cfg, env, model, optimizer, scheduler)
    state = TrainState(step=1, consumed_samples=4, skipped_steps=0)
    path = checkpointing.save_checkpoint(cfg, model, optimizer, scheduler, state)
    saved_params, saved_rng = _params(model), torch.get_rng_state()

    other, other_opt, other_sched = _build(cfg, env, seed=2)
    torch.manual_seed(99)
    assert checkpointing.load_checkpoint(path, other, other_opt, other_sched) == state
    _assert_same(_params(other), saved_params)
    assert other_sched.num_steps == 1 and other_opt.param_groups[0]["lr"] == optimizer.param_groups[0]["lr"]
    assert torch.equal(torch.get_rng_state(), saved_rng)
    # The next update from the restored state equals the next update from the original.
    _train_one_step(cfg, env, model, optimizer, scheduler)
    _train_one_step(cfg, env, other, other_opt, other_sched)
    _assert_same(_params(other), _params(model))


def test_keep_last_k_prunes_oldest_complete_checkpoints_with_their_config(cfg, env):
    model, optimizer, scheduler = _build(cfg, env, seed=1)
    _train_one_step(cfg, env, model, optimizer, scheduler)
    root = checkpointing.checkpoint_dir(cfg)
    for step in (1, 2, 3, 4):
        checkpointing.save_checkpoint(cfg, model, optimizer, scheduler, TrainState(step=step))
    assert [p.name for p in checkpointing.complete_checkpoints(root)] == ["step_00000003", "step_00000004"]
    assert sorted(p.name for p in root.iterdir()) == ["step_00000003", "step_00000004"]
    assert load_config(root / "step_00000004" / "config.yaml") == cfg


def test_a_run_stopped_while_pruning_leaves_no_half_deleted_checkpoint(cfg, env, monkeypatch):
    """Pruning deletes file by file. A run stopped midway (here: after the manifest went, before COMPLETE did) must
    not leave an old checkpoint that still reads COMPLETE with files missing and nothing left to check them against;
    the next start removes what is left of it."""
    import shutil

    model, optimizer, scheduler = _build(cfg, env, seed=1)
    _train_one_step(cfg, env, model, optimizer, scheduler)
    root = checkpointing.checkpoint_dir(cfg)
    for step in (1, 2):
        checkpointing.save_checkpoint(cfg, model, optimizer, scheduler, TrainState(step=step))

    rmtree = shutil.rmtree

    def stopped_midway(path, *args, **kwargs):
        if not Path(path).name.endswith("step_00000001"):  # the save's own clean-ups go on
            return rmtree(path, *args, **kwargs)
        (Path(path) / "checksums.json").unlink()
        raise KeyboardInterrupt("stopped while pruning")

    monkeypatch.setattr(shutil, "rmtree", stopped_midway)
    with pytest.raises(KeyboardInterrupt):
        checkpointing.save_checkpoint(cfg, model, optimizer, scheduler, TrainState(step=3))
    monkeypatch.undo()
    assert [p.name for p in checkpointing.complete_checkpoints(root)] == ["step_00000002", "step_00000003"]
    removed, restored = checkpointing.remove_unfinished_saves(root)
    assert [p.name for p in removed] == [".pruned_step_00000001"] and restored == []
    assert sorted(p.name for p in root.iterdir()) == ["step_00000002", "step_00000003"]


def test_crash_between_write_and_publish_keeps_the_previous_checkpoint(cfg, env, monkeypatch):
    model, optimizer, scheduler = _build(cfg, env, seed=1)
    _train_one_step(cfg, env, model, optimizer, scheduler)
    root = checkpointing.checkpoint_dir(cfg)
    checkpointing.save_checkpoint(cfg, model, optimizer, scheduler, TrainState(step=1))
    good = _params(model)
    _train_one_step(cfg, env, model, optimizer, scheduler)

    rename = checkpointing.os.rename

    def crash(src, dst):
        if Path(src).name == ".tmp_step_00000002":
            raise OSError("simulated crash while publishing")
        rename(src, dst)  # dist_checkpointing's own file renames

    monkeypatch.setattr(checkpointing.os, "rename", crash)
    with pytest.raises(OSError, match="simulated crash"):
        checkpointing.save_checkpoint(cfg, model, optimizer, scheduler, TrainState(step=2))
    monkeypatch.undo()
    (root / "step_00000003").mkdir()  # a directory without completion marker (e.g. copied by hand, half done)
    assert (root / ".tmp_step_00000002" / "metadata.json").exists()  # the fully written but unpublished save

    assert checkpointing.latest_checkpoint(root) == root / "step_00000001"
    fresh, fresh_opt, fresh_sched = _build(cfg, env, seed=3)
    assert checkpointing.load_checkpoint(checkpointing.latest_checkpoint(root), fresh, fresh_opt, fresh_sched).step == 1
    _assert_same(_params(fresh), good)
    # The next save of that step replaces the debris.
    checkpointing.save_checkpoint(cfg, model, optimizer, scheduler, TrainState(step=2))
    assert checkpointing.latest_checkpoint(root) == root / "step_00000002"
    assert not (root / ".tmp_step_00000002").exists()


def test_crash_while_replacing_a_checkpoint_of_the_same_step_keeps_one(cfg, env, monkeypatch):
    """A save of a step that already has a checkpoint (e.g. saved again after a resume from it) replaces the old one.
    A crash between putting the old one aside and publishing the new one must not lose both: the next start
    (`remove_unfinished_saves`, under the run lock) puts the old one back."""
    model, optimizer, scheduler = _build(cfg, env, seed=1)
    _train_one_step(cfg, env, model, optimizer, scheduler)
    root = checkpointing.checkpoint_dir(cfg)
    checkpointing.save_checkpoint(cfg, model, optimizer, scheduler, TrainState(step=1))
    good = _params(model)
    rename = checkpointing.os.rename

    def crash(src, dst):
        if Path(src).name == ".tmp_step_00000001":
            raise OSError("simulated crash while publishing")
        rename(src, dst)

    monkeypatch.setattr(checkpointing.os, "rename", crash)
    with pytest.raises(OSError, match="simulated crash"):
        checkpointing.save_checkpoint(cfg, model, optimizer, scheduler, TrainState(step=1))
    monkeypatch.undo()
    removed, restored = checkpointing.remove_unfinished_saves(root)
    assert removed == [root / ".tmp_step_00000001"] and restored == [root / "step_00000001"]
    assert checkpointing.latest_checkpoint(root) == root / "step_00000001"
    assert sorted(p.name for p in root.iterdir()) == ["step_00000001"]
    fresh, fresh_opt, fresh_sched = _build(cfg, env, seed=3)
    assert checkpointing.load_checkpoint(root / "step_00000001", fresh, fresh_opt, fresh_sched).step == 1
    _assert_same(_params(fresh), good)
    # an uninterrupted replacement leaves the new checkpoint only
    checkpointing.save_checkpoint(cfg, model, optimizer, scheduler, TrainState(step=1))
    assert sorted(p.name for p in root.iterdir()) == ["step_00000001"]
    assert checkpointing.remove_unfinished_saves(root) == ([], [])


def test_every_file_of_a_published_checkpoint_and_its_directory_reach_the_disk(cfg, env, monkeypatch):
    """A checkpoint marked COMPLETE must survive a power loss whole: every file in it (Megatron's common.pt and
    metadata.json and our config.yaml included, not only the shards torch syncs) and the directory holding their
    names are fsynced before it is published."""
    import os

    synced = set()
    real_fsync = os.fsync

    def fsync(fd):
        st = os.fstat(fd)
        synced.add((st.st_dev, st.st_ino))
        real_fsync(fd)

    model, optimizer, scheduler = _build(cfg, env, seed=1)
    _train_one_step(cfg, env, model, optimizer, scheduler)
    monkeypatch.setattr(os, "fsync", fsync)
    path = checkpointing.save_checkpoint(cfg, model, optimizer, scheduler, TrainState(step=1))
    monkeypatch.undo()
    entries = [path, *path.rglob("*")]
    unsynced = sorted(str(p.relative_to(path)) for p in entries if (p.stat().st_dev, p.stat().st_ino) not in synced)
    assert unsynced == []


@pytest.mark.parametrize("code", [errno.EINVAL, errno.ENOTSUP])
def test_a_filesystem_that_cannot_sync_directories_still_publishes_checkpoints(cfg, env, monkeypatch, code):
    """Some FUSE and network mounts refuse fsync on a directory (EINVAL, ENOTSUP); moba_train.staging publishes
    there all the same, and so must a checkpoint save: it is published, the run goes on, nothing is left aside."""
    import os
    import stat

    real_fsync = os.fsync

    def fsync(fd):
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(code, os.strerror(code))
        real_fsync(fd)

    model, optimizer, scheduler = _build(cfg, env, seed=1)
    _train_one_step(cfg, env, model, optimizer, scheduler)
    root = checkpointing.checkpoint_dir(cfg)
    monkeypatch.setattr(os, "fsync", fsync)
    for step in (1, 1, 2):  # a save of a step already saved puts the old one aside: it is removed all the same
        checkpointing.save_checkpoint(cfg, model, optimizer, scheduler, TrainState(step=step))
    monkeypatch.undo()
    assert sorted(p.name for p in root.iterdir()) == ["step_00000001", "step_00000002"]
    assert checkpointing.latest_checkpoint(root) == root / "step_00000002"


def test_model_only_checkpoint_loads_weights_into_a_fresh_model(cfg, env, tmp_path):
    model, optimizer, scheduler = _build(cfg, env, seed=1)
    _train_one_step(cfg, env, model, optimizer, scheduler)
    checkpointing.save_model_checkpoint(tmp_path / "exported", model, cfg)
    fresh, _, _ = _build(cfg, env, seed=2)
    assert checkpointing.load_model_weights(tmp_path / "exported", fresh) == tmp_path / "exported"
    _assert_same(_params(fresh), _params(model))
    with pytest.raises(ConfigError, match="neither a complete checkpoint"):
        checkpointing.load_model_weights(tmp_path / "nothing_here", fresh)


def _clean_up_worker(rank: int, port: int, root: str, seen) -> None:
    import time

    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        if rank == 0:  # rank 0 slow to put the checkpoint back (a large unfinished save to delete first)
            remove = checkpointing.remove_unfinished_saves
            checkpointing.remove_unfinished_saves = lambda path: time.sleep(1.0) or remove(path)
        removed, restored = checkpointing.clean_up_saves(Path(root))
        seen.put((rank, [p.name for p in checkpointing.complete_checkpoints(Path(root))], len(removed), len(restored)))
    finally:
        dist.destroy_process_group()


def test_every_rank_lists_checkpoints_only_after_rank_0_cleaned_up(tmp_path):
    """What rank 0 puts back at the start (a checkpoint set aside by a crash) every rank must see when it looks for
    the resume point: the clean-up is collective, and only rank 0 reports what it did."""
    import multiprocessing
    import socket

    import torch.multiprocessing as mp

    root = tmp_path / "checkpoints"
    (root / ".replaced_step_00000001").mkdir(parents=True)
    (root / ".replaced_step_00000001" / checkpointing.COMPLETE).write_text("complete\n")
    (root / ".tmp_step_00000001").mkdir()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    seen = multiprocessing.get_context("spawn").Queue()
    mp.spawn(_clean_up_worker, args=(port, str(root), seen), nprocs=2, join=True)
    got = {rank: rest for rank, *rest in (seen.get(timeout=5) for _ in range(2))}
    assert got == {0: [["step_00000001"], 1, 1], 1: [["step_00000001"], 0, 0]}
