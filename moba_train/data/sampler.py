"""Megatron pretraining-sampler order: which samples each data-parallel rank reads, resumable exactly.

The global order is the dataset index order (datasets shuffle internally, deterministically). Each
group of `micro_batch_size * dp_size` consecutive samples is one micro-batch for every rank: rank r
takes the r-th slice of `micro_batch_size`. Starting from `consumed_samples` (counted over all ranks)
continues at the exact sample a stopped run would have read next. Indices wrap around the dataset.
"""

from __future__ import annotations

import functools
import mmap
from multiprocessing.reduction import ForkingPickler
from typing import Iterator

import numpy as np
import torch

from moba_train.data.batches import collate
from moba_train.signals import leave_stopping_to_the_trainer, stop_signals_blocked


class PretrainingSampler:
    """Yields this rank's micro-batches of dataset indices forever (a `batch_sampler`)."""

    def __init__(self, num_samples: int, consumed_samples: int, micro_batch_size: int, dp_rank: int, dp_size: int):
        assert 0 <= dp_rank < dp_size and num_samples > 0 and consumed_samples >= 0
        self.num_samples = num_samples
        self.consumed_samples = consumed_samples
        self.micro_batch_size = micro_batch_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size

    def __iter__(self) -> Iterator[list[int]]:
        step = self.micro_batch_size * self.dp_size
        start = self.consumed_samples + self.dp_rank * self.micro_batch_size
        while True:
            yield [(start + j) % self.num_samples for j in range(self.micro_batch_size)]
            start += step


def _open_read_only_map(filename: str, dtype: np.dtype, offset: int, shape: tuple, order: str) -> np.memmap:
    return np.memmap(filename, dtype=dtype, mode="r", offset=offset, shape=shape, order=order)


def _reduce_read_only_map(array: np.memmap):
    """A read-only map of a whole file region (Megatron's index caches, np.load(mmap_mode="r")) travels to a
    worker as its file's name, offset and shape, and the worker maps the same pages: a copy of the bytes would
    cost each worker the indices' size in memory and seconds to unpickle (hundreds of MB for a large corpus).
    Views of a map and writable maps travel as copies, as plain arrays do."""
    if array.mode == "r" and isinstance(array.base, mmap.mmap) and array.filename:
        order = "F" if array.flags.f_contiguous and not array.flags.c_contiguous else "C"
        return _open_read_only_map, (array.filename, array.dtype, array.offset, array.shape, order)
    return np.asarray(array).__reduce__()


def share_read_only_maps() -> None:
    """Send read-only file maps to worker processes by name (`_reduce_read_only_map`) from now on."""
    ForkingPickler.register(np.memmap, _reduce_read_only_map)


def build_dataloader(dataset, cfg, env, consumed_samples: int,
                     num_workers: int | None = None) -> Iterator[dict[str, torch.Tensor]]:
    """This data-parallel rank's micro-batches (see `collate`), starting after `consumed_samples`, read by
    `num_workers` worker processes (default data.num_workers; 0 reads them in this process).

    The workers are fresh interpreters (spawn), not forks of the trainer: by now it runs dozens of threads
    (gloo, OpenMP, CUDA), and a fork copies the locks they hold. CPython 3.11's child can hang inside
    os.fork itself (PyOS_AfterFork_Child waiting for the interpreter's thread-state lock), and the trainer
    then waits for its batch forever. A worker imports torch and the dataset's modules once (seconds, at
    the first batch) and, as a fork would, exits when the trainer dies. Read-only file maps in the dataset
    (the index caches) reach it as file names, so it shares their pages as a fork would. It starts with the
    stop signals blocked, so one that reaches its group meanwhile cannot kill it."""
    workers = cfg.data.num_workers if num_workers is None else num_workers
    sampler = PretrainingSampler(
        len(dataset), consumed_samples, cfg.train.micro_batch_size, env.dp_rank, env.dp
    )
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=functools.partial(collate, reset_attention_mask=cfg.data.reset_attention_mask),
        num_workers=workers,
        persistent_workers=workers > 0,
        multiprocessing_context="spawn" if workers > 0 else None,
        worker_init_fn=leave_stopping_to_the_trainer,
    )
    if workers == 0:
        return iter(loader)
    share_read_only_maps()  # the dataset reaches the spawned workers through ForkingPickler
    with stop_signals_blocked():
        return iter(loader)  # the persistent workers start here and inherit the block
