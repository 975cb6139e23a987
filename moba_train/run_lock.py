"""One run at a time per run directory: an exclusive lock on `<output_dir>/run.lock` for the run's life.

    with RunLock(output_dir) as lock:   # RunDirectoryInUse if another live process holds it
        ...                             # lock.note: a line about a previous holder that died, or None

A distributed run holds it from rank 0 (`hold_run_directory`); every rank stops alike when it cannot.

The lock is an flock, which the kernel drops when its holder dies however it dies (kill -9, the OOM
killer), so a dead run never blocks the next one.
The file also says who holds it (pid, host, start time) so that a refused launch can name the holder;
the holder empties it when it ends cleanly. A non-empty file whose lock is free therefore means its
holder died: the lock is taken over with a note naming it. Where the filesystem refuses locks, the run
goes on unlocked with a note saying so.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import Iterator

import torch.distributed as dist

from moba_train.cli import SharedConfigError

LOCK_FILE = "run.lock"
_NO_LOCKS = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


class RunDirectoryInUse(SharedConfigError):
    """Another live process holds the run directory's lock; the message names it."""


def _holder_text(raw: str) -> str:
    try:
        holder = json.loads(raw)
        return f"process {holder['pid']} on host {holder['host']} (started {holder['started']})"
    except (ValueError, KeyError, TypeError):
        return "an unknown process (the lock file is not ours)"


class RunLock:
    """Hold `<output_dir>/run.lock` while the `with` block runs (creates output_dir)."""

    def __init__(self, output_dir: str | os.PathLike):
        self.path = Path(output_dir) / LOCK_FILE
        self.note: str | None = None
        self._fd: int | None = None

    def __enter__(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            previous = os.pread(fd, 4096, 0).decode(errors="replace")
            os.close(fd)
            if err.errno in _NO_LOCKS:
                self.note = (f"note: the filesystem of {self.path.parent} does not support locks; make sure no "
                             "other run writes to this run directory")
                return self
            raise RunDirectoryInUse(
                f"run directory '{self.path.parent}' is in use by {_holder_text(previous)}; stop that run or "
                "set another run.output_dir"
            ) from None
        previous = os.pread(fd, 4096, 0).decode(errors="replace")
        if previous.strip():
            self.note = (f"note: took over the lock of run directory '{self.path.parent}' from "
                         f"{_holder_text(previous)}, which is no longer running")
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
        os.fsync(fd)
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is None:
            return
        os.ftruncate(self._fd, 0)  # emptied, never deleted: a deleted lock file could be locked twice
        os.close(self._fd)
        self._fd = None


@contextlib.contextmanager
def hold_run_directory(output_dir: str | os.PathLike, is_main: bool) -> Iterator[None]:
    """Rank 0 holds `output_dir`'s RunLock for the block and prints its note; when it cannot, every rank
    raises the same error: RunDirectoryInUse, or a SharedConfigError where the directory cannot be created or
    locked at all (an OSError on rank 0, which the others must not wait for). Collective: every rank calls it
    once torch.distributed is up."""
    lock = RunLock(output_dir) if is_main else None
    refusal = [None, None]
    if lock is not None:
        try:
            lock.__enter__()
        except RunDirectoryInUse as err:
            refusal = ["in_use", str(err)]
        except OSError as err:
            refusal = ["unusable", f"cannot create or lock run directory '{output_dir}': {err}; set run.output_dir "
                                   "to a directory this process can create and write"]
    dist.broadcast_object_list(refusal, src=0)
    if refusal[0] == "in_use":
        raise RunDirectoryInUse(refusal[1])
    if refusal[0] is not None:
        raise SharedConfigError(refusal[1])
    if lock is not None and lock.note:
        print(lock.note, flush=True)
    try:
        yield
    finally:
        if lock is not None:
            lock.__exit__(None, None, None)
