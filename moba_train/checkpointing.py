"""Checkpoints: Megatron-Core dist_checkpointing, published atomically, newest K kept.

Layout of `checkpoint.dir`:

    step_00000100/          a complete checkpoint (the only kind discovery returns)
        COMPLETE            completion marker, written last, just before publishing
        checksums.json      size and checksum of every other file (moba_train.checksums)
        config.yaml         the resolved recipe of the run that wrote it
        ...                 dist_checkpointing files (model, optimizer, scheduler, RNG, trainer state)
    .tmp_step_00000200/     a save in progress (or one a stopped run left: removed at the next start)
    .replaced_step_00000100/  a checkpoint put aside while a new save of its step takes its place (put back
                            at the next start if a stopped run left it there)
    .pruned_step_00000050/  an old checkpoint being deleted by pruning (renamed first, so a run stopped midway
                            leaves no half-deleted checkpoint; removed at the next start)

A save writes everything into the temporary directory, checksums it, writes COMPLETE, renames the
directory into place (an atomic rename on POSIX file systems) and only then prunes old checkpoints,
so a crash at any point leaves the newest complete checkpoint untouched. Pruning keeps the newest
`checkpoint.keep_last` checkpoints at or below the current step: the one just written is always kept,
and newer ones (left by a run that was resumed from an earlier step, e.g. past a damaged checkpoint)
are never deleted.

What a training checkpoint holds: the model's and optimizer's sharded state dicts (resharding across
tensor/data-parallel sizes is Megatron's), the LR scheduler, every RNG state (python, numpy, torch,
CUDA, Megatron's tracker; one copy per model-parallel rank), the step and the consumed samples (the
data position). A model-only checkpoint (`save_model_checkpoint`) holds the model and config.yaml.
"""

from __future__ import annotations

import dataclasses
import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import yaml
from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedObject
from torch.distributed.checkpoint.api import CheckpointException

from moba_train import checksums
from moba_train.checkpoint_writer import CheckpointWriteError, InProcessSaveStrategy, storage_errno
from moba_train.cli import SharedConfigError
from moba_train.config import Config, ConfigError
from moba_train.optimizer import place_adam_steps
from moba_train.staging import fsync_dir

COMPLETE = "COMPLETE"
_OPTIMIZER_FORMAT = {"distrib_optim_sharding_type": "dp_reshardable"}
"""Distributed-optimizer state layout (Megatron-LM's default): parallel save and load, reshardable
over data-parallel sizes only. Megatron-Core 0.16.1's implicit default (fully_sharded_model_space)
fails to save ("ShardedTensor.flattened_range is not supported")."""
_STEP_DIR = re.compile(r"^step_(\d{8})$")


@dataclass
class TrainState:
    """What the trainer needs to continue exactly where a checkpoint left off."""

    step: int = 0
    consumed_samples: int = 0
    skipped_steps: int = 0
    nonfinite_in_a_row: int = 0
    """Non-finite steps just before this one (train.max_nonfinite_steps counts them across a relaunch)."""
    wandb_run_id: str | None = None
    """The W&B run this training logs to: a resumed run continues it (moba_train.metrics)."""


def checkpoint_dir(cfg: Config) -> Path:
    """`checkpoint.dir`, default `<run.output_dir>/checkpoints`."""
    return Path(cfg.checkpoint.dir or Path(cfg.run.output_dir) / "checkpoints")


def step_path(root: Path, step: int) -> Path:
    return Path(root) / f"step_{step:08d}"


def is_complete(path: Path) -> bool:
    return (Path(path) / COMPLETE).is_file()


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under `root`, oldest first (unfinished and temporary ones ignored)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _STEP_DIR.match(p.name) and is_complete(p)]
    return sorted(found, key=_step_of)


def _step_of(checkpoint: Path) -> int:
    return int(_STEP_DIR.match(checkpoint.name).group(1))


def latest_checkpoint(root: Path) -> Path | None:
    """The newest complete checkpoint under `root`, or None."""
    found = complete_checkpoints(root)
    return found[-1] if found else None


REPLACED_PREFIX = ".replaced_"
"""A complete checkpoint put aside while a new save of the same step is published in its place."""
PRUNED_PREFIX = ".pruned_"
"""A checkpoint that pruning is deleting (renamed first: it is no checkpoint from then on)."""


def remove_unfinished_saves(root: Path) -> tuple[list[Path], list[Path]]:
    """Delete the `.tmp_step_*` directories under `root`, saves that a stopped run never published, and the
    `.pruned_step_*` ones, checkpoints it was deleting (neither is a checkpoint). Put back a checkpoint that a
    stopped run had put aside to publish a save of the same step in its place, where that save never got there
    (else delete it). Only while holding the run directory's lock (no live run is writing them). Returns (the
    deleted directories, the checkpoints put back)."""
    root = Path(root)
    if not root.is_dir():
        return [], []
    doomed = sorted(root.glob(".tmp_step_*")) + sorted(root.glob(f"{PRUNED_PREFIX}step_*"))
    for path in doomed:
        shutil.rmtree(path)
    restored = []
    for aside in sorted(root.glob(f"{REPLACED_PREFIX}step_*")):
        target = root / aside.name[len(REPLACED_PREFIX):]
        if is_complete(target):
            shutil.rmtree(aside)
        else:
            if target.exists():
                shutil.rmtree(target)
            os.rename(aside, target)
            restored.append(target)
    return doomed, restored


def clean_up_saves(root: Path) -> tuple[list[Path], list[Path]]:
    """`remove_unfinished_saves` on rank 0, collectively: every rank waits for it before it lists checkpoints (what
    rank 0 puts back must be seen by all) and raises its OSError if any. Returns rank 0's lists (empty on the
    others)."""
    return _on_rank0(lambda: remove_unfinished_saves(root)) or ([], [])


def resolve_checkpoint(path: str | Path) -> Path:
    """A complete checkpoint directory, or the newest one under a checkpoint root; ConfigError if neither."""
    path = Path(path)
    if is_complete(path):
        return path
    latest = latest_checkpoint(path)
    if latest is None:
        raise ConfigError(
            f"'{path}' is neither a complete checkpoint nor a directory holding one; pass a step_* directory"
        )
    return latest


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The GPTModel inside DDP / Float16Module wrappers: checkpoint keys never depend on wrapping."""
    while hasattr(model, "module") and not hasattr(model, "decoder"):
        model = model.module
    return model


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _rng_state() -> ShardedObject:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }
    ps = parallel_state
    return ShardedObject(
        "rng_state",
        state,
        _model_parallel_sizes(),
        (ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank(), ps.get_context_parallel_rank()),
        replica_id=ps.get_data_parallel_rank(),
    )


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _on_rank0(action):
    """Run `action()` on rank 0; every rank raises the OSError it raised, if any (collective). Returns what it
    returned on rank 0, None on the others."""
    failed, result = [None], None
    if dist.get_rank() == 0:
        try:
            result = action()
        except OSError as err:
            failed = [err]
    dist.broadcast_object_list(failed, src=0)
    if failed[0] is not None:
        raise failed[0]
    return result


def _fresh_dir(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)


def _sync_tree(directory: Path) -> None:
    """fsync every file and subdirectory under `directory` (its own entries are the caller's): torch syncs the
    shards it writes, but not Megatron's common.pt and metadata.json nor our config.yaml."""
    for path in sorted(directory.rglob("*"), reverse=True):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        elif path.is_dir():
            fsync_dir(path)


def _mark_complete_and_rename(tmp: Path, target: Path, manifest: dict) -> None:
    checksums.save_manifest(tmp, manifest)
    _sync_tree(tmp)
    with open(tmp / COMPLETE, "w") as marker:
        marker.write("complete\n")
        marker.flush()
        os.fsync(marker.fileno())
    fsync_dir(tmp)  # the names of everything in it, COMPLETE included, before it is published
    # A checkpoint of the same step is put aside, not deleted, until the new one is in place: a crash in between
    # leaves it to remove_unfinished_saves to put back.
    replaced = target.parent / f"{REPLACED_PREFIX}{target.name}"
    if target.exists():
        if replaced.exists():
            shutil.rmtree(replaced)
        os.rename(target, replaced)
    os.rename(tmp, target)
    fsync_dir(target.parent)
    if replaced.exists():
        shutil.rmtree(replaced)


def _publish(state_dict: dict, target: Path, cfg: Config) -> None:
    """Write `state_dict` to a temporary sibling of `target`, checksum it, mark it complete, rename it into
    place (collective). CheckpointWriteError when the filesystem refuses (the partial save is removed)."""
    tmp = target.parent / f".tmp_{target.name}"
    try:
        _on_rank0(lambda: _fresh_dir(tmp))
        dist_checkpointing.save(state_dict, str(tmp), sharded_strategy=InProcessSaveStrategy())
        _on_rank0(lambda: (tmp / "config.yaml").write_text(cfg.to_yaml()))
        manifest = checksums.compute_manifest(tmp)
        _on_rank0(lambda: _mark_complete_and_rename(tmp, target, manifest))
    except (Exception, CheckpointException) as err:
        number = storage_errno(err, target.parent)
        if number is None:
            raise
        if dist.get_rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)  # frees what the partial save took
        raise CheckpointWriteError(
            f"cannot write checkpoint '{target}': {os.strerror(number)}; free space or make "
            f"'{target.parent}' writable (or set checkpoint.dir), then relaunch to resume from the last checkpoint"
        ) from None


def prune(root: Path, keep_last: int, step: int) -> list[Path]:
    """Delete all but the newest `keep_last` complete checkpoints at or below `step`, the step just saved
    (rank 0's job); returns the deleted."""
    doomed = [p for p in complete_checkpoints(root) if _step_of(p) <= step][:-keep_last]
    for path in doomed:
        # Renamed out of the checkpoints' names first: a run stopped while deleting leaves a directory that is no
        # checkpoint (remove_unfinished_saves deletes it), never a half-deleted one that still reads COMPLETE.
        pruned = path.with_name(PRUNED_PREFIX + path.name)
        os.rename(path, pruned)
        shutil.rmtree(pruned)
    return doomed


def optimizer_layout(distributed: bool, bf16: bool) -> dict:
    """How the optimizer's state is laid out in a checkpoint: a distributed optimizer's state is sharded
    over data-parallel ranks, a bf16 run's holds fp32 main parameters; a checkpoint loads only into an
    optimizer of the same layout."""
    return {"distributed_optimizer": distributed, "bf16": bf16}


def _optimizer_config(optimizer):
    return getattr(optimizer, "chained_optimizers", [optimizer])[0].config


def _training_state_dict(model, optimizer, scheduler, state: TrainState, is_loading: bool) -> dict:
    model_sd = unwrap_model(model).sharded_state_dict()
    opt_cfg = _optimizer_config(optimizer)
    return {
        "model": model_sd,
        "optimizer": optimizer.sharded_state_dict(model_sd, is_loading=is_loading, metadata=_OPTIMIZER_FORMAT),
        "optimizer_layout": optimizer_layout(opt_cfg.use_distributed_optimizer, opt_cfg.bf16),
        "scheduler": scheduler.state_dict(),
        "rng_state": _rng_state(),
        "trainer": dataclasses.asdict(state),
    }


def save_checkpoint(cfg: Config, model, optimizer, scheduler, state: TrainState) -> Path:
    """Save a full training checkpoint of `state.step` (collective), then keep the newest K."""
    root = checkpoint_dir(cfg)
    target = step_path(root, state.step)
    _publish(_training_state_dict(model, optimizer, scheduler, state, is_loading=False), target, cfg)
    if dist.get_rank() == 0:
        prune(root, cfg.checkpoint.keep_last, state.step)
    _barrier()
    return target


def _model_parallel_sizes() -> tuple[int, int, int]:
    ps = parallel_state
    return (ps.get_pipeline_model_parallel_world_size(), ps.get_tensor_model_parallel_world_size(),
            ps.get_context_parallel_world_size())


def _materialize_optimizer_state(optimizer, adam_step: int) -> None:
    """Give every parameter of a fresh optimizer an Adam state (the checkpoint's update count, zero
    moments) for loading to overwrite. Megatron-Core 0.16.1's DistributedOptimizer on torch's Adam
    (no Apex or Transformer Engine) needs it twice: state_dict() reads each parameter's 'step' and
    fails on an optimizer that never stepped, and the dp_reshardable load copies the moments but
    keeps the 'step' tensors already there."""
    for chained in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = chained.optimizer
        for group in inner.param_groups:
            for param in group["params"]:
                if not inner.state[param]:
                    inner.state[param] = {"step": torch.tensor(float(adam_step)), "exp_avg": torch.zeros_like(param),
                                          "exp_avg_sq": torch.zeros_like(param)}


def load_checkpoint(path: Path, model, optimizer, scheduler) -> TrainState:
    """Restore model, optimizer, scheduler and RNG states from a training checkpoint (collective).

    Model and optimizer reshard to the current parallel sizes (Megatron's sharded tensors); the RNG
    states exist per model-parallel rank, so they are restored only when pipeline/tensor/context
    sizes are unchanged (otherwise the RNGs stay as seeded).
    """
    saved_state = TrainState(**dist_checkpointing.load_common_state_dict(str(path))["trainer"])
    _materialize_optimizer_state(optimizer, adam_step=saved_state.step - saved_state.skipped_steps)
    template = _training_state_dict(model, optimizer, scheduler, TrainState(), is_loading=True)
    saved = yaml.safe_load((Path(path) / "config.yaml").read_text())["parallel"]  # as written: keys may have changed
    if (saved["pipeline"], saved["tensor"], saved["context"]) != _model_parallel_sizes():
        del template["rng_state"]
    loaded = dist_checkpointing.load(template, str(path))
    unwrap_model(model).load_state_dict(loaded["model"])
    optimizer.load_state_dict(loaded["optimizer"])
    place_adam_steps(optimizer)  # its own step tensor per parameter, where the (fused) Adam reads it
    scheduler.load_state_dict(loaded["scheduler"])
    if "rng_state" in loaded:
        _set_rng_state(loaded["rng_state"])
    return saved_state


def save_model_checkpoint(path: str | Path, model, cfg: Config) -> Path:
    """Write a model-only checkpoint directory at `path` (collective) that `checkpoint.init_from` accepts."""
    target = Path(path)
    _publish({"model": unwrap_model(model).sharded_state_dict()}, target, cfg)
    return target


def load_model_weights(path: str | Path, model) -> Path:
    """Load only the model weights of a checkpoint (training or model-only) into `model` (collective).

    `path` is a complete checkpoint or a checkpoint root (its newest). Returns the directory read.
    SharedConfigError when its files do not match their checksums.
    """
    path = resolve_checkpoint(path)
    damage = checksums.find_damage(path)
    if damage is not None:
        raise SharedConfigError(f"checkpoint '{path}' is damaged: {damage}; pass another checkpoint")
    inner = unwrap_model(model)
    loaded = dist_checkpointing.load({"model": inner.sharded_state_dict()}, str(path))
    inner.load_state_dict(loaded["model"])
    return path
