"""Checks that need only the recipe, the launch and the filesystem, made by every rank before
torch.distributed starts or anything is built: a mistake costs a second instead of the 15-30 s of
building a model first, and every rank raises the same SharedConfigError, which is printed once per node.

- model.max_position_embeddings must cover train.seq_length;
- indexed data: the blend, the split, the tokenizer and every dataset's .bin/.idx pair must be readable
  (moba_train.data's own checks, without the pass over the tokens);
- run.output_dir and the checkpoint directory must be writable, and the checkpoint directory must have
  room for one more checkpoint (estimated from the model's size: 12 bytes per parameter in fp32, the
  weights and Adam's two moments; 14 in bf16, which adds the fp32 main weights).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch

from moba_train.checkpointing import checkpoint_dir
from moba_train.cli import SharedConfigError
from moba_train.config import Config, ConfigError
from moba_train.distributed import resolve_device
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


def check(cfg: Config) -> None:
    """SharedConfigError for the first problem found (see the module docstring)."""
    _positions(cfg)
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
