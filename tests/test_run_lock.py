"""One run per run directory: the lock names a live holder (pid, host), is taken over from a dead one
with a note, and is released empty; end to end, a second launch into a running run's directory is one
line naming the first, and a trainer killed with kill -9 leaves no process behind, its lock is taken
over by the relaunch, its unfinished save is removed, and training resumes."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from moba_train.cli import SharedConfigError
from moba_train.run_lock import LOCK_FILE, RunDirectoryInUse, RunLock, hold_run_directory

ROOT = Path(__file__).resolve().parents[1]
HOLD = ("import sys, time; from moba_train.run_lock import RunLock; RunLock(sys.argv[1]).__enter__(); "
        "print('held', flush=True); time.sleep(600)")


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}


def _holder(run_dir: Path) -> subprocess.Popen:
    """Another process holding the lock of `run_dir`."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], stdout=subprocess.PIPE, text=True, env=_env())
    assert proc.stdout.readline() == "held\n"
    return proc


def test_a_live_holder_is_named_by_pid_and_host(tmp_path):
    holder = _holder(tmp_path)
    try:
        with pytest.raises(RunDirectoryInUse) as refused:
            RunLock(tmp_path).__enter__()
        assert str(refused.value).startswith(
            f"run directory '{tmp_path}' is in use by process {holder.pid} on host {socket.gethostname()} (started ")
        assert str(refused.value).endswith("; stop that run or set another run.output_dir")
    finally:
        holder.kill()
        holder.wait()


def test_the_lock_of_a_killed_holder_is_taken_over_with_a_note_and_released_empty(tmp_path):
    holder = _holder(tmp_path)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    with RunLock(tmp_path) as lock:
        assert lock.note.startswith(f"note: took over the lock of run directory '{tmp_path}' from process "
                                    f"{holder.pid} on host {socket.gethostname()}")
        assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    assert (tmp_path / LOCK_FILE).read_text() == ""
    with RunLock(tmp_path) as lock:  # a clean release leaves nothing to take over
        assert lock.note is None


RECIPE = [
    "--config", str(ROOT / "configs" / "tiny_moba.yaml"), "train.warmup_steps=2",
    "train.seq_length=256", "train.micro_batch_size=1", "train.global_batch_size=1", "checkpoint.interval=1",
    "checkpoint.keep_last=2", "logging.progress_bar=off", "data.kind=synthetic",
]


def _pretrain(out: Path, steps: int) -> list[str]:
    return [sys.executable, str(ROOT / "scripts" / "pretrain.py"), *RECIPE, f"run.output_dir={out}",
            f"train.steps={steps}"]


def _steps_logged(out: Path) -> int:
    path = out / "metrics.jsonl"
    return path.read_text().count("\n") if path.exists() else 0


def test_second_launch_is_refused_and_kill_9_leaves_nothing_behind_and_relaunch_resumes(tmp_path):
    out = tmp_path / "run"
    first = subprocess.Popen(_pretrain(out, steps=10_000), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                             env=_env())
    deadline = time.monotonic() + 240
    while _steps_logged(out) < 2 and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert first.poll() is None, first.communicate()[1][-3000:]

    second = subprocess.run(_pretrain(out, steps=10_000), capture_output=True, text=True, env=_env(), timeout=240)
    assert second.returncode == 2
    [line] = second.stderr.splitlines()
    assert line.startswith(f"error: run directory '{out}' is in use by process {first.pid} on host "
                           f"{socket.gethostname()} (started ")
    assert first.poll() is None, "the refused launch must leave the running one alone"

    # Every step saves a checkpoint (checkpoint.interval=1): the kill lands during or between saves.
    started = psutil.Process(first.pid).children(recursive=True)
    first.send_signal(signal.SIGKILL)
    first.wait()
    assert psutil.wait_procs(started, timeout=5)[1] == []  # nothing it started outlives it

    (out / "checkpoints" / ".tmp_step_00099999").mkdir()  # as a kill during a save leaves it
    steps = _steps_logged(out) + 2
    third = subprocess.run(_pretrain(out, steps), capture_output=True, text=True, env=_env(), timeout=300)
    assert third.returncode == 0, third.stderr[-3000:]
    assert (f"note: took over the lock of run directory '{out}' from process {first.pid} on host "
            f"{socket.gethostname()}") in third.stdout
    assert f"removed {out / 'checkpoints' / '.tmp_step_00099999'}: a save that a stopped run never finished" \
        in third.stdout
    assert not list((out / "checkpoints").glob(".tmp*"))
    assert (out / "checkpoints" / f"step_{steps:08d}" / "COMPLETE").is_file()
    assert (out / LOCK_FILE).read_text() == ""


def _unusable_directory_worker(rank: int, port: int, run_dir: str, errors) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        with hold_run_directory(run_dir, is_main=rank == 0):
            errors.put((rank, "entered"))
    except SharedConfigError as err:
        errors.put((rank, str(err)))
    finally:
        dist.destroy_process_group()


def test_a_run_directory_rank_0_cannot_create_is_one_error_on_every_rank(tmp_path):
    """Rank 0 takes the lock; when it cannot even create the directory (an OSError, here a path below a file), the
    other ranks must not wait for it in the broadcast: every rank raises the same one-line error."""
    import multiprocessing
    import socket as sockets

    import torch.multiprocessing as mp

    (tmp_path / "file").write_text("")
    run_dir = tmp_path / "file" / "run"
    with sockets.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    errors = multiprocessing.get_context("spawn").Queue()
    mp.spawn(_unusable_directory_worker, args=(port, str(run_dir), errors), nprocs=2, join=True)
    got = dict(errors.get(timeout=5) for _ in range(2))
    assert got[0] == got[1]
    assert got[0].startswith(f"cannot create or lock run directory '{run_dir}': ")
    assert got[0].endswith("set run.output_dir to a directory this process can create and write")
