import itertools
import signal
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import numpy as np
import psutil
import torch

from moba_train.config import Config
from moba_train.data import build_dataloader, build_datasets
from moba_train.data.sampler import PretrainingSampler, share_read_only_maps


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



def _new_workers(before: set[int]) -> list[psutil.Process]:
    """This process's children started since `before`, but for multiprocessing's resource tracker."""
    return [p for p in psutil.Process().children() if p.pid not in before
            and "multiprocessing.resource_tracker" not in " ".join(p.cmdline())]


def test_num_workers_0_reads_in_this_process_whatever_the_recipe_says():
    """Evaluation reads its few batches in the training process (moba_train.training.evaluate): workers would
    take longer to start than the reading takes."""
    c = cfg()
    c.data.num_workers = 2
    train, _ = build_datasets(c, None)
    before = _children()
    batches = build_dataloader(train, c, env(0, 1), 0, num_workers=0)
    assert torch.equal(next(batches)["tokens"], torch.stack([train[0]["tokens"], train[1]["tokens"]]))
    assert _new_workers(before) == []


def _children() -> set[int]:
    return {p.pid for p in psutil.Process().children()}


def test_workers_are_fresh_interpreters_not_forks_of_the_multithreaded_trainer():
    """The trainer runs dozens of threads (gloo, OpenMP, CUDA) when it starts its data-loader workers. A
    fork from there copies the locks those threads hold: CPython 3.11's child can hang in os.fork itself
    (PyOS_AfterFork_Child waiting for the interpreter's thread-state lock), and the trainer then waits
    for its batch forever (a hung 2-process run, the worker's stack in _PyThreadState_DeleteExcept)."""
    stop = threading.Event()
    threads = [threading.Thread(target=stop.wait) for _ in range(4)]  # this process is multi-threaded
    for t in threads:
        t.start()
    try:
        c = cfg()
        c.data.num_workers = 1
        train, _ = build_datasets(c, None)
        before = _children()
        batches = build_dataloader(train, c, env(0, 1), 0)
        assert torch.equal(next(batches)["tokens"], torch.stack([train[0]["tokens"], train[1]["tokens"]]))
        workers = _new_workers(before)
        assert len(workers) == 1
        assert workers[0].cmdline() != psutil.Process().cmdline()  # a fork would run this command
        assert "from multiprocessing.spawn import spawn_main" in " ".join(workers[0].cmdline())
    finally:
        stop.set()


class SlowToUnpickle(torch.utils.data.Dataset):
    """A dataset whose copy in a worker takes a second to arrive (as a large index or slow imports would)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        return self.dataset[index]

    def __setstate__(self, state):
        time.sleep(1.0)
        self.__dict__.update(state)


def test_a_stop_signal_while_a_worker_starts_up_does_not_kill_it():
    """A group signal (torchrun's forwarding, SLURM's, Ctrl-C) reaches the workers too; they leave stopping
    to the trainer from their first instruction on, not only once their init function has run."""
    c = cfg()
    c.data.num_workers = 1
    train, _ = build_datasets(c, None)
    before = _children()
    batches = build_dataloader(SlowToUnpickle(train), c, env(0, 1), 0)
    workers = _new_workers(before)
    assert len(workers) == 1
    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):  # from another process, as torchrun's or SLURM's
        subprocess.run(["kill", f"-{sig.name[3:]}", str(workers[0].pid)], check=True)  # during its unpickling
    assert torch.equal(next(batches)["tokens"], torch.stack([train[0]["tokens"], train[1]["tokens"]]))


TRAINER = """
import sys, time
import psutil
from types import SimpleNamespace
from moba_train.config import Config
from moba_train.data import build_dataloader, build_datasets
c = Config.model_validate({"train": {"seq_length": 64, "micro_batch_size": 2, "global_batch_size": 2},
                           "attention": {"block_size": 16}, "data": {"num_workers": 1}})
train, _ = build_datasets(c, None)
batches = build_dataloader(train, c, SimpleNamespace(rank=0, dp_rank=0, dp=1), 0)
next(batches)
print(*[p.pid for p in psutil.Process().children()], flush=True)
"""


def test_the_workers_exit_when_the_trainer_is_killed():
    """kill -9 of a training process (an OOM kill, a node's cleanup) must leave no worker behind."""
    trainer = subprocess.Popen([sys.executable, "-c", TRAINER + "time.sleep(600)"], stdout=subprocess.PIPE, text=True)
    try:
        children = [psutil.Process(int(pid)) for pid in trainer.stdout.readline().split()]
        assert children, "the trainer started no worker"
    finally:
        trainer.kill()
        trainer.wait()
    gone, alive = psutil.wait_procs(children, timeout=30)  # torch's workers check on their parent every 5 s
    assert alive == [], [p.cmdline() for p in alive]


def test_a_trainer_that_fails_with_its_workers_running_exits():
    """An error that nothing catches (a bug, an out-of-memory error) leaves the workers running while Python
    exits, and multiprocessing ends them with SIGTERM then waits for them: the workers must not ignore
    their own trainer's signal, or the failed process never exits (and its job holds its GPUs until the
    time limit)."""
    trainer = subprocess.run([sys.executable, "-c", TRAINER + "raise RuntimeError('a bug mid-run')"],
                             capture_output=True, text=True, timeout=120)
    assert trainer.returncode == 1 and trainer.stderr.strip().endswith("RuntimeError: a bug mid-run")
    children = [int(pid) for pid in trainer.stdout.split()]  # the worker and multiprocessing's resource tracker
    deadline = time.monotonic() + 10
    while any(psutil.pid_exists(pid) for pid in children) and time.monotonic() < deadline:
        time.sleep(0.1)  # an orphan's exit is reaped by init
    assert children and not any(psutil.pid_exists(pid) for pid in children)



def test_read_only_maps_travel_by_name_and_everything_else_by_value(tmp_path):
    """Through the pickler that sends the dataset to spawned workers: a read-only map of a .npy file (C or
    Fortran order) comes back as a map of the same file; a view into one, a writable map and a copy-on-write
    map come back as copies with the same values."""
    import pickle
    from multiprocessing.reduction import ForkingPickler

    share_read_only_maps()
    for name, values in (("c", np.arange(6000, dtype=np.int32).reshape(50, 120)),
                         ("f", np.asfortranarray(np.arange(6000.0).reshape(50, 120)))):
        np.save(tmp_path / f"{name}.npy", values)
        mapped = np.load(tmp_path / f"{name}.npy", mmap_mode="r")
        sent = ForkingPickler.dumps(mapped)
        again = pickle.loads(sent)
        assert len(sent) < 1000 and isinstance(again, np.memmap) and again.filename == mapped.filename
        assert np.array_equal(again, values) and again.flags.f_contiguous == values.flags.f_contiguous
        for other in (mapped[1:3, 2:], np.load(tmp_path / f"{name}.npy", mmap_mode="r+"),
                      np.load(tmp_path / f"{name}.npy", mmap_mode="c")):
            again = pickle.loads(ForkingPickler.dumps(other))
            assert not isinstance(again, np.memmap) and np.array_equal(again, other)
