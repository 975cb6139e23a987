"""Megatron pretraining-sampler order: which samples each data-parallel rank reads, resumable exactly.

The global order is the dataset index order (datasets shuffle internally, deterministically). Each
group of `micro_batch_size * dp_size` consecutive samples is one micro-batch for every rank: rank r
takes the r-th slice of `micro_batch_size`. Starting from `consumed_samples` (counted over all ranks)
continues at the exact sample a stopped run would have read next. Indices wrap around the dataset.
"""

from __future__ import annotations

import functools
from typing import Iterator

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


def build_dataloader(dataset, cfg, env, consumed_samples: int,
                     num_workers: int | None = None) -> Iterator[dict[str, torch.Tensor]]:
    """This data-parallel rank's micro-batches (see `collate`), starting after `consumed_samples`, read by
    `num_workers` worker processes (default data.num_workers; 0 reads them in this process).

    The workers are fresh interpreters (spawn), not forks of the trainer: by now it runs dozens of threads
    (gloo, OpenMP, CUDA), and a fork copies the locks they hold. CPython 3.11's child can hang inside
    os.fork itself (PyOS_AfterFork_Child waiting for the interpreter's thread-state lock), and the trainer
    then waits for its batch forever. A worker imports torch and the dataset's modules once (seconds, at
    the first batch) and, as a fork would, exits when the trainer dies. It starts with the stop signals
    blocked, so one that reaches its group meanwhile cannot kill it."""
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
    with stop_signals_blocked():
        return iter(loader)  # the persistent workers start here and inherit the block
