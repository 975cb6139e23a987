"""Checks that need only the recipe, the launch and the filesystem, made by every rank before
torch.distributed starts or anything is built: a mistake costs a second instead of the 15-30 s of
building a model first, and every rank raises the same SharedConfigError, which is printed once per node.

- model.max_position_embeddings must cover train.seq_length;
- indexed data: the blend, the validation blend, the split, the tokenizer and every dataset's .bin/.idx pair must
  be readable (moba_train.data's own checks, without the pass over the tokens);
- the model must fit: moba_train.memory's estimate per process against the GPU's memory, or on CPU the
  machine's available memory shared by the node's processes (a 70 GB model on a 24 GB machine is one
  line, not a crash minutes later);
- run.output_dir and the checkpoint directory must be writable, and the checkpoint directory must have
  room for one more checkpoint (estimated from the model's size: 12 bytes per parameter in fp32, the
  weights and Adam's two moments; 14 in bf16, which adds the fp32 main weights).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import psutil
import torch

from moba_train.checkpointing import checkpoint_dir
from moba_train.cli import SharedConfigError
from moba_train.config import Config, ConfigError
from moba_train.distributed import check_world_size, resolve_device
from moba_train.model import compute_dtype, matrix_params, padded_vocab_size


def _positions(cfg: Config) -> None:
    if cfg.model.max_position_embeddings < cfg.train.seq_length:
        raise SharedConfigError(
            f"model.max_position_embeddings ({cfg.model.max_position_embeddings}) is below train.seq_length "
            f"({cfg.train.seq_length}): the model would see positions it is not built for; raise it to at least "
            f"{cfg.train.seq_length}"
        )


def _data(cfg: Config) -> None:
    if cfg.data.kind != "indexed":
        return
    from moba_train.data.indexed import check_indexed_dataset, check_split, parse_blend
    from moba_train.data.preprocess import load_tokenizer

    try:
        prefixes, _ = parse_blend(cfg.data.blend)
        prefixes += parse_blend(cfg.data.valid_blend)[0] if cfg.data.valid_blend else []
        check_split(cfg.data.split)
        if cfg.data.tokenizer:
            load_tokenizer(cfg.data.tokenizer)
        for prefix in prefixes:
            check_indexed_dataset(prefix)
    except ConfigError as err:
        raise SharedConfigError(str(err)) from None


def _writable(path: Path, key: str) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as err:
        raise SharedConfigError(f"{key} '{path}' is not writable ({err.strerror}); set {key} to a writable "
                                "directory") from None


def checkpoint_bytes(cfg: Config) -> int:
    """About how many bytes one training checkpoint of `cfg`'s model takes."""
    m = cfg.model
    embedding = 0 if m.tie_embeddings else m.hidden_size * padded_vocab_size(cfg, cfg.parallel.tensor)
    params = matrix_params(cfg) + embedding
    bf16 = compute_dtype(cfg, resolve_device(cfg)) == torch.bfloat16
    return params * (14 if bf16 else 12)


def _size(n: float) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


MEMORY_MARGIN = 0.8
"""Refuse a launch whose estimated memory per process is more than available / MEMORY_MARGIN. The estimate
(moba_train/memory.py) was at most 7% above a measured peak (and up to 2.3% below one, at 99f2efd on an H200), so
a refused run would not have fit; runs somewhat too large still start and meet the allocator's out-of-memory
error."""


def memory_estimate(cfg: Config, world_size: int, device: torch.device | None = None):
    """moba_train.memory's estimate for `cfg` on `world_size` processes of `device` (default: the device the recipe
    asks for on this machine)."""
    from moba_train.fusions import resolve
    from moba_train.memory import estimate
    from moba_train.optimizer import use_distributed_optimizer

    device = device or resolve_device(cfg, int(os.environ.get("LOCAL_RANK", 0)))
    return estimate(cfg, world_size, compute_dtype(cfg, device) == torch.bfloat16,
                    use_distributed_optimizer(cfg, device), resolve(cfg, device))


def _launch(cfg: Config) -> None:
    try:
        check_world_size(cfg, int(os.environ.get("WORLD_SIZE", 1)))
    except ConfigError as err:
        raise SharedConfigError(str(err)) from None


def _memory(cfg: Config) -> None:
    device = resolve_device(cfg, int(os.environ.get("LOCAL_RANK", 0)))
    world = int(os.environ.get("WORLD_SIZE", 1))
    need = memory_estimate(cfg, world).total
    if device.type == "cuda":  # the whole GPU is the process's
        available = torch.cuda.mem_get_info(device)[1]
        where = f"GPU {device.index} ({torch.cuda.get_device_name(device)})"
    else:  # the node's processes share its memory
        available = psutil.virtual_memory().available // max(int(os.environ.get("LOCAL_WORLD_SIZE", 1)), 1)
        where = "this machine's available memory per process"
    if need * MEMORY_MARGIN > available:
        raise SharedConfigError(
            f"this recipe needs about {need / 2**30:.1f} GiB per process on {world} process(es) (weights, optimizer "
            f"state and activations; `scripts/pretrain.py --dry-run` itemizes it) but {where} has "
            f"{available / 2**30:.1f} GiB; launch it on the parallel layout it was written for, or shrink the model, "
            "train.seq_length or train.micro_batch_size, or set train.recompute=full"
        )


def check(cfg: Config) -> None:
    """SharedConfigError for the first problem found (see the module docstring)."""
    _positions(cfg)
    _launch(cfg)
    _memory(cfg)
    _data(cfg)
    ckpt_dir = checkpoint_dir(cfg)
    _writable(Path(cfg.run.output_dir), "run.output_dir")
    _writable(ckpt_dir, "checkpoint.dir")
    free, needed = shutil.disk_usage(ckpt_dir).free, checkpoint_bytes(cfg)
    if free < needed:
        raise SharedConfigError(
            f"the checkpoint directory '{ckpt_dir}' has {_size(free)} free, but a checkpoint of this model takes "
            f"about {_size(needed)}; free some space or set checkpoint.dir to another disk"
        )


def dry_run(cfg: Config, world_size: int) -> str:
    """What `scripts/pretrain.py --dry-run` prints: the parallel layout of `world_size` processes and the
    memory estimate per process, without building anything (ConfigError if the launch cannot work). On a
    machine without a GPU (a login node), a recipe with `run.device: auto` is described as on the GPU nodes
    it would take one on: bf16 under `train.precision: auto` and the fused kernels `auto` picks on CUDA
    (`run.device=cpu` describes a CPU run)."""
    check_world_size(cfg, world_size)
    m, par, train, att = cfg.model, cfg.parallel, cfg.train, cfg.attention
    dp = world_size // (par.tensor * par.pipeline * par.context)
    try:
        batches = f"  {cfg.microbatches(dp)} micro-batch(es) of {train.micro_batch_size} per step on each data rank"
    except ConfigError as err:
        batches = f"  the launch would be refused: {err}"
    kinds = cfg.layer_kinds()
    device, where = resolve_device(cfg), ""
    if device.type == "cpu" and cfg.run.device == "auto":
        device, where = torch.device("cuda"), " (as on a GPU node: none here, and run.device auto takes one there)"
    estimate = memory_estimate(cfg, world_size, device)
    lines = [
        f"dry run: {world_size} process(es) on {device.type}{where}; nothing is built",
        f"layout: tensor {par.tensor} x context {par.context} x pipeline {par.pipeline} x data {dp} = {world_size}",
        f"  per tensor rank: {m.num_attention_heads // par.tensor} query / {m.num_query_groups // par.tensor} KV "
        f"heads, {m.ffn_hidden_size // par.tensor} FFN columns, "
        f"{padded_vocab_size(cfg, par.tensor) // par.tensor} vocabulary rows",
        f"  each {train.seq_length}-token sequence: "
        + (f"{2 * par.context} chunks of {train.seq_length // (2 * par.context)}, {train.seq_length // par.context} "
           f"tokens per context rank ({par.context_comm})" if par.context > 1 else "whole on every rank"),
        batches,
        f"layers: {kinds.count('moba')} MoBA (block {att.block_size}, top-{att.topk}), {kinds.count('full')} full"
        + (" (where the starting model copies: the trainer probes it first)" if cfg.probes_full_layers() else ""),
        f"memory per process (estimate; {'bf16' if compute_dtype(cfg, device) == torch.bfloat16 else 'fp32'}, "
        f"recompute {train.recompute}; moba_train/memory.py):",
        *estimate.lines(),
    ]
    return "\n".join(lines)
