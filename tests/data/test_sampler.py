import itertools
from types import SimpleNamespace

import torch

from moba_train.config import Config
from moba_train.data import build_dataloader, build_datasets
from moba_train.data.sampler import PretrainingSampler


def cfg(mbs=2):
    return Config.model_validate({"train": {"seq_length": 64, "micro_batch_size": mbs, "global_batch_size": 8},
                                  "attention": {"block_size": 16}, "data": {"synthetic": {"num_samples": 50}}})


def env(rank, size):
    return SimpleNamespace(rank=rank, dp_rank=rank, dp=size)


def take(sampler, n):
    return list(itertools.islice(iter(sampler), n))


def test_data_parallel_ranks_interleave_into_the_single_process_order():
    single = [i for mb in take(PretrainingSampler(50, 0, 2, 0, 1), 30) for i in mb]
    ranks = [take(PretrainingSampler(50, 0, 2, r, 3), 10) for r in range(3)]
    interleaved = [i for step in zip(*ranks) for mb in step for i in mb]
    assert interleaved == single
    assert single[:5] == [0, 1, 2, 3, 4] and single[50:53] == [0, 1, 2]  # wraps around


def test_resume_from_consumed_samples_continues_at_the_exact_sample():
    c = cfg()
    train, _ = build_datasets(c, None)
    for dp in (1, 2):
        for r in range(dp):
            full = list(itertools.islice(build_dataloader(train, c, env(r, dp), 0), 7))
            resumed = list(itertools.islice(build_dataloader(train, c, env(r, dp), 3 * 2 * dp), 4))
            for x, y in zip(full[3:], resumed):
                for key in x:
                    assert torch.equal(x[key], y[key]), key


def test_micro_batch_holds_the_dataset_samples_of_this_rank():
    c = cfg()
    train, _ = build_datasets(c, None)
    batch = next(build_dataloader(train, c, env(1, 2), 8))
    # consumed 8, rank 1 of 2, micro-batch 2 -> samples 10, 11
    assert torch.equal(batch["tokens"], torch.stack([train[10]["tokens"], train[11]["tokens"]]))
    assert batch["cu_seqlens"].tolist() == [0, 64, 128]


def test_worker_processes_give_the_same_batches():
    c = cfg()
    train, _ = build_datasets(c, None)
    c2 = c.model_copy(deep=True)
    c2.data.num_workers = 2
    a = list(itertools.islice(build_dataloader(train, c, env(0, 1), 5), 3))
    b = list(itertools.islice(build_dataloader(train, c2, env(0, 1), 5), 3))
    assert all(torch.equal(x[k], y[k]) for x, y in zip(a, b) for k in x)
