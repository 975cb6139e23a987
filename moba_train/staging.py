"""Outputs are written in a staging directory beside their target and renamed into place when complete.

    with staging_dir(target) as stage:       # `.<name>.tmp-XXXXXXXX/` next to `target`, locked while in use
        ... write everything under `stage` ...
        replace_dir(stage / "out", target)   # or os.replace single files out of `stage`

A staging directory is never an output: it is removed when the `with` block ends, however it ends. One
left behind by a writer that was killed (kill -9, OOM killer, power loss) is removed by the next writer of
the same target (`remove_stale_staging`). Each writer holds an exclusive flock on its staging directory,
which the kernel drops when the process dies, so a directory whose writer is still alive (a second run
writing the same target) keeps its lock and is left alone. Where the filesystem refuses locks, nothing is
removed.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import json
import os
import secrets
import shutil
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable, Iterator


def _stage_prefix(target: Path) -> str:
    return f".{target.name}.tmp-"


def _lock(path: Path) -> int | None:
    """An open descriptor of `path` holding an exclusive flock on it; None if another process holds one (or the
    filesystem has no locks)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def remove_stale_staging(target: str | os.PathLike) -> list[Path]:
    """Delete the staging directories of `target` whose writer has died; returns them."""
    target = Path(target)
    removed = []
    for stage in sorted(target.parent.glob(glob.escape(_stage_prefix(target)) + "*")):
        fd = _lock(stage)
        if fd is None:
            continue
        try:
            shutil.rmtree(stage, ignore_errors=True)
            removed.append(stage)
        finally:
            os.close(fd)
    return removed


@contextlib.contextmanager
def staging_dir(target: str | os.PathLike) -> Iterator[Path]:
    """A fresh, locked staging directory beside `target` (same filesystem, so renames out of it are atomic),
    removed on exit. Stale staging of `target` is removed first. OSError when `target`'s directory cannot be
    written."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(target)
    # Created under a name the cleaner does not match, and renamed once locked: another writer's cleanup
    # never sees this directory unlocked.
    fresh = Path(tempfile.mkdtemp(prefix=f".{target.name}.new-", dir=target.parent))
    fd = _lock(fresh)
    stage = fresh.with_name(_stage_prefix(target) + fresh.name.rsplit("-", 1)[1])
    try:
        os.rename(fresh, stage)
        yield stage
    finally:
        shutil.rmtree(stage if stage.exists() else fresh, ignore_errors=True)
        if fd is not None:
            os.close(fd)


def fsync_dir(path: Path) -> None:
    """Make a rename in `path` durable; a filesystem that cannot sync directories (EINVAL, ENOTSUP: some FUSE
    and network mounts) keeps the rename without the guarantee."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as error:
        if error.errno not in (errno.EINVAL, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)


def replace_dir(new: Path, target: Path) -> None:
    """Publish the complete directory `new` as `target`, replacing what `target` held (a directory or nothing).

    POSIX cannot rename a directory over a non-empty one, so the previous `target` is first renamed to a
    hidden `.<name>.previous-*` sibling and deleted once `new` is in place (put back if `new` cannot be); only a
    crash between the two renames leaves it there (complete, and never removed automatically)."""
    previous = None
    if target.exists() or target.is_symlink():
        previous = Path(tempfile.mkdtemp(prefix=f".{target.name}.previous-", dir=target.parent))
        os.rename(target, previous / target.name)
    try:
        os.rename(new, target)
    except BaseException:
        if previous is not None:  # put the previous one back rather than leave it hidden aside
            os.rename(previous / target.name, target)
            previous.rmdir()
        raise
    fsync_dir(target.parent)
    if previous is not None:
        shutil.rmtree(previous)


def write_file(path: str | os.PathLike, write: Callable[[BinaryIO], object]) -> Path:
    """Write one file atomically and durably: `write(f)` fills a hidden temporary sibling (a name no other
    writer, on this host or another sharing the filesystem, picks), which is flushed to the disk and renamed
    over `path`. A reader sees the previous file or the whole new one, never a part; a writer that dies midway
    leaves only its temporary, under another name."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "xb") as f:  # created with the umask's mode, as a plain open would create `path`
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write `text` (UTF-8) atomically (write_file)."""
    return write_file(path, lambda f: f.write(text.encode()))


def write_json(path: str | os.PathLike, data) -> Path:
    """Write `data` as indented JSON, atomically."""
    return write_text(path, json.dumps(data, indent=2) + "\n")
