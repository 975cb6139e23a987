"""Staging directories: removed however the writer's block ends, removed by the next writer when their writer
was killed, kept while their writer lives; a published directory replaces the previous one whole."""

import errno
import os
import signal
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from moba_train.staging import remove_stale_staging, replace_dir, staging_dir, write_file

REPO = Path(__file__).resolve().parents[1]


def start_writer(target: Path) -> tuple[subprocess.Popen, Path]:
    """Another process inside `staging_dir(target)`, writing, until it is killed; and its staging directory."""
    code = textwrap.dedent(f"""
        import time
        from moba_train.staging import staging_dir
        with staging_dir({str(target)!r}) as stage:
            (stage / "half-written.bin").write_bytes(b"x" * 1000)
            print(stage, flush=True)
            time.sleep(120)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    return proc, Path(proc.stdout.readline().strip())


def test_staging_of_a_killed_writer_is_removed_and_that_of_a_live_writer_is_kept(tmp_path):
    target = tmp_path / "out"
    proc, theirs = start_writer(target)
    try:
        assert theirs.is_dir() and theirs.parent == tmp_path
        with staging_dir(target) as mine:
            assert remove_stale_staging(target) == [] and theirs.is_dir()
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
            assert theirs.is_dir()  # kill -9 ran no clean-up
            assert remove_stale_staging(target) == [theirs]
            assert not theirs.exists() and mine.is_dir()
        assert list(tmp_path.iterdir()) == []
    finally:
        proc.kill()
        proc.wait()


def test_staging_is_removed_however_the_block_ends(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        with staging_dir(tmp_path / "out") as stage:
            (stage / "part").write_text("half")
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_a_published_directory_replaces_the_previous_one_whole(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "model.safetensors").write_text("old")
    (target / "config.json").write_text("old")
    with staging_dir(target) as stage:
        (stage / "new").mkdir()
        (stage / "new/model-00001-of-00002.safetensors").write_text("new")
        replace_dir(stage / "new", target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert [p.name for p in target.iterdir()] == ["model-00001-of-00002.safetensors"]


def test_a_directory_that_cannot_be_published_leaves_the_previous_one_in_place(tmp_path, monkeypatch):
    """When the new directory cannot be renamed into place (a full or over-quota filesystem refuses the rename), the
    error is raised and `target` still holds the previous directory: it is not left hidden aside."""
    target = tmp_path / "out"
    target.mkdir()
    (target / "model.safetensors").write_text("old")
    rename = os.rename

    def refuse_publishing(src, dst):
        if Path(src).name == "new":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        rename(src, dst)

    with staging_dir(target) as stage:
        (stage / "new").mkdir()
        (stage / "new/model.safetensors").write_text("new")
        monkeypatch.setattr(os, "rename", refuse_publishing)
        with pytest.raises(OSError, match=os.strerror(errno.ENOSPC)):
            replace_dir(stage / "new", target)
        monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert (target / "model.safetensors").read_text() == "old"


def test_a_file_is_published_whole_or_not_at_all(tmp_path):
    """While write_file writes, the name holds the previous file; a writer that fails midway leaves it so and
    no temporary behind; one that finishes replaces it whole, with the umask's mode, as open() would."""
    target = tmp_path / "index.npy"
    target.write_bytes(b"old")

    def write_then_fail(f):
        f.write(b"new, half")
        assert target.read_bytes() == b"old"
        raise OSError("No space left on device")

    with pytest.raises(OSError, match="No space"):
        write_file(target, write_then_fail)
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["index.npy"]
    write_file(target, lambda f: f.write(b"new, whole"))
    assert target.read_bytes() == b"new, whole" and [p.name for p in tmp_path.iterdir()] == ["index.npy"]
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask


@pytest.mark.parametrize("code, published", [(errno.EINVAL, True), (errno.ENOTSUP, True), (errno.EIO, False)])
def test_a_filesystem_that_cannot_sync_directories_still_publishes(tmp_path, monkeypatch, code, published):
    """Some FUSE and network mounts refuse fsync on a directory (EINVAL, ENOTSUP): the file is written and
    renamed all the same. A real I/O error on the directory is still an error."""
    real_fsync = os.fsync

    def fsync(fd):
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(code, os.strerror(code))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    target = tmp_path / "result.json"
    if published:
        write_file(target, lambda f: f.write(b"{}"))
    else:
        with pytest.raises(OSError, match=os.strerror(code)):
            write_file(target, lambda f: f.write(b"{}"))
    assert target.read_bytes() == b"{}"  # renamed before the directory's sync either way
