"""Writing a checkpoint's files: Megatron-Core's torch_dist format from threads of the trainer process,
every failure raised on every rank, and a full, read-only or forbidden filesystem named as such.

Why not Megatron-Core 0.16.1's own writer (FileSystemWriterAsync, behind its synchronous saves too):
it forks a writer process per file and collects their results through a *spawned* multiprocessing
Manager process. A signal to the trainer's process group (torchrun stopping its workers, SLURM, Ctrl-C
of a single process) kills that Manager and the save fails with BrokenPipeError; after kill -9 of the
trainer the Manager lives on as an orphan. `InProcessSaveStrategy` writes the same files (Megatron's
key translation and planner; Megatron's torch_dist strategy loads them) with torch.distributed.
checkpoint's FileSystemWriter from `thread_count` threads: nothing outlives the trainer or receives
its signals.

FileSystemWriter drops what its helper threads raise (threading prints it, and the file's items are
missing from the checkpoint's metadata, silently); `InProcessSaveStrategy` collects those failures
and raises them on every rank.
"""

from __future__ import annotations

import contextlib
import errno
import os
import threading
from pathlib import Path
from typing import Iterator

import torch.distributed as dist
from megatron.core.dist_checkpointing.strategies.torch import (
    MCoreSavePlanner,
    TorchDistSaveShardedStrategy,
    _replace_state_dict_keys_with_sharded_keys,
    mcore_to_pyt_state_dict,
)
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint import save as dcp_save
from torch.distributed.checkpoint.api import CheckpointException

_STORAGE_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG}
_NEARLY_FULL = 1 << 20
"""Free bytes below which a filesystem counts as full after a failed write (the write filled it)."""


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (full disk, read-only or forbidden directory); the message is one
    line for the user. Raised on every rank."""


@contextlib.contextmanager
def _writer_thread_failures() -> Iterator[list[BaseException]]:
    """What FileSystemWriter's helper threads (named after their target, `_write_files_from_queue`) raise
    while the block runs; other threads' exceptions go to the previous hook."""
    failures, previous = [], threading.excepthook

    def collect(args) -> None:
        if args.thread is not None and args.thread.name.endswith("(_write_files_from_queue)"):
            failures.append(args.exc_value)
        else:
            previous(args)

    threading.excepthook = collect
    try:
        yield failures
    finally:
        threading.excepthook = previous


def _chain(err: BaseException) -> Iterator[BaseException]:
    """`err`, what it was raised from or during, and the failures a CheckpointException wraps."""
    seen = set()
    todo = [err]
    while todo:
        err = todo.pop()
        if err is None or id(err) in seen:
            continue
        seen.add(id(err))
        yield err
        todo += [err.__cause__, err.__context__]
        if isinstance(err, CheckpointException):
            todo += [exc for exc, _ in err.failures.values()]


def storage_errno(err: BaseException, directory: Path) -> int | None:
    """The errno when `err`, raised while writing into `directory`, comes from a full, read-only or
    forbidden filesystem, else None. An OSError behind `err` tells; failing that (torch's serializer turns
    a full disk into an 'unexpected pos' RuntimeError), the filesystem's state right after does."""
    for cause in _chain(err):
        if isinstance(cause, OSError) and cause.errno in _STORAGE_ERRORS:
            return cause.errno
    try:
        fs = os.statvfs(directory)
    except OSError:
        return None
    if fs.f_flag & os.ST_RDONLY:
        return errno.EROFS
    if fs.f_bavail * fs.f_frsize < _NEARLY_FULL:
        return errno.ENOSPC
    return None


def _raise_on_every_rank(failure: BaseException | None, directory: Path) -> None:
    """Raise on every rank when any rank had `failure` (collective): the rank that had it raises it, the
    others an OSError of the same storage problem, or a RuntimeError quoting it."""
    mine = None if failure is None else (storage_errno(failure, directory), f"{type(failure).__name__}: {failure}")
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    if failure is not None:
        raise failure
    first = next((entry for entry in everyone if entry is not None), None)
    if first is not None:
        number, text = first
        if number is not None:
            raise OSError(number, os.strerror(number))
        raise RuntimeError(f"another rank failed to write its part of the checkpoint: {text}")


class InProcessSaveStrategy(TorchDistSaveShardedStrategy):
    """Megatron-Core's torch_dist format, written by threads of the trainer (see the module docstring)."""

    def __init__(self):
        super().__init__("torch_dist", 1)

    def save(self, sharded_state_dict: dict, checkpoint_dir: str | Path) -> None:
        main_only = self.keep_only_main_replica
        flat, _, _ = _replace_state_dict_keys_with_sharded_keys(sharded_state_dict, main_only)
        with _writer_thread_failures() as failures:
            dcp_save(
                mcore_to_pyt_state_dict(flat, is_loading=False),
                storage_writer=FileSystemWriter(checkpoint_dir, thread_count=self.thread_count),
                planner=MCoreSavePlanner(dedup_replicated_tensors=not main_only, flatten_state_dict=False),
            )
        _raise_on_every_rank(failures[0] if failures else None, Path(checkpoint_dir))
