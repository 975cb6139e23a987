"""Errors that need only the recipe, the launch and the filesystem come before anything is built, as one
line (printed once under a 2-process torchrun, not once per rank); a full or read-only checkpoint
directory is named as such, before training where it can be seen then (real tmpfs mounts in a user
namespace) and when a save runs out of space."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from moba_train.cli import SharedConfigError
from moba_train.config import load_config
from moba_train.preflight import checkpoint_bytes
from moba_train.training import train

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny_moba.yaml"
SMALL = ["train.steps=4", "train.warmup_steps=1", "train.seq_length=256", "train.micro_batch_size=1",
         "train.global_batch_size=1", "logging.progress_bar=off", "data.kind=synthetic"]


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}


def _refused(tmp_path, capsys, *overrides: str) -> str:
    """The message `train` refuses the recipe with; nothing may have been printed (nothing built)."""
    with pytest.raises(SharedConfigError) as refused:
        train(load_config(TINY, [f"run.output_dir={tmp_path / 'run'}", *SMALL, *overrides]))
    assert capsys.readouterr().out == ""
    return str(refused.value)


def test_max_position_embeddings_below_the_sequence_length(tmp_path, capsys):
    assert _refused(tmp_path, capsys, "model.max_position_embeddings=200") == (
        "model.max_position_embeddings (200) is below train.seq_length (256): the model would see positions it "
        "is not built for; raise it to at least 256")


def test_missing_tokenizer_and_missing_dataset(tmp_path, capsys):
    indexed = ["data.kind=indexed", f"data.blend=[{tmp_path / 'corpus'}]"]
    assert _refused(tmp_path, capsys, *indexed, f"data.tokenizer={tmp_path / 'no_tokenizer'}") == (
        f"tokenizer '{tmp_path / 'no_tokenizer'}' does not exist; pass a tokenizer directory or a tokenizer.json file")
    assert _refused(tmp_path, capsys, *indexed, "data.tokenizer=null").startswith(
        f"indexed dataset '{tmp_path / 'corpus'}' is missing (corpus.idx and corpus.bin must both exist)")


def test_an_output_directory_that_cannot_be_created(tmp_path, capsys):
    (tmp_path / "a_file").write_text("")
    assert _refused(tmp_path, capsys, f"run.output_dir={tmp_path / 'a_file' / 'run'}") == (
        f"run.output_dir '{tmp_path / 'a_file' / 'run'}' is not writable (Not a directory); set run.output_dir "
        "to a writable directory")


def _torchrun(tmp_path, *overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(ROOT / "scripts" / "pretrain.py"), "--config", str(TINY), f"run.output_dir={tmp_path / 'run'}", *SMALL,
         *overrides],
        capture_output=True, text=True, env=_env(), timeout=300)


@pytest.mark.parametrize("overrides, message", [
    (["model.max_position_embeddings=200"], "error: model.max_position_embeddings (200) is below train.seq_length"),
    (["train.global_batch_size=3"], "error: train.global_batch_size (3) must be a multiple of micro_batch_size x "
                                    "data-parallel size (1 x 2)"),
], ids=["before-torch-distributed", "after-torch-distributed"])
def test_under_torchrun_an_error_every_rank_raises_is_printed_once(tmp_path, overrides, message):
    result = _torchrun(tmp_path, *overrides)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith(message), result.stderr[-3000:]
    assert "# resolved config" not in result.stdout
    assert result.returncode != 0  # torchrun reports the workers' exit code 2 as a failure


def test_the_error_is_printed_when_the_printing_rank_gets_there_last(tmp_path):
    # torchrun ends every worker as soon as one fails: if rank 1 exits on the error before rank 0 (the one
    # that prints it) has got there, rank 0 must not be killed before it prints (a SLURM log once held no
    # cause at all). Rank 0 starts 8 s late here, through a launcher script that then runs pretrain.py.
    late_rank_0 = tmp_path / "late_rank_0.py"
    late_rank_0.write_text(
        "import os, runpy, sys, time\n"
        "if os.environ['LOCAL_RANK'] == '0':\n    time.sleep(8)\n"
        f"sys.argv[0] = {str(ROOT / 'scripts' / 'pretrain.py')!r}\n"
        "runpy.run_path(sys.argv[0], run_name='__main__')\n")
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(late_rank_0),
         "--config", str(TINY), f"run.output_dir={tmp_path / 'run'}", *SMALL, "data.kind=indexed",
         f"data.blend=[{tmp_path / 'missing'}]", "data.tokenizer=null"],
        capture_output=True, text=True, env=_env(), timeout=300)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith(f"error: indexed dataset '{tmp_path / 'missing'}' is missing"), \
        result.stderr[-3000:]
    assert result.returncode != 0


def _unshare_works() -> bool:
    return shutil.which("unshare") is not None and subprocess.run(
        ["unshare", "--user", "--map-root-user", "--mount", "true"], capture_output=True).returncode == 0


def _pretrain_on_tmpfs(tmp_path, size: int, read_only: bool, *overrides: str) -> subprocess.CompletedProcess:
    """scripts/pretrain.py with checkpoint.dir on a tmpfs of `size` bytes, in a user and mount namespace of
    its own (no privileges needed, nothing mounted outside it); its stdout ends with the tmpfs's listing."""
    mount = tmp_path / "small_disk"
    mount.mkdir(parents=True)
    remount = f" && mount -o remount,ro {mount}" if read_only else ""
    command = " ".join([sys.executable, str(ROOT / "scripts" / "pretrain.py"), "--config", str(TINY),
                        f"run.output_dir={tmp_path / 'run'}", f"checkpoint.dir={mount}", *SMALL, *overrides])
    return subprocess.run(  # the run's exit code, then (on stdout) what the tmpfs holds after it
        ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
         f"mount -t tmpfs -o size={size} tmpfs {mount}{remount} && {{ {command}; rc=$?; ls -A {mount}; exit $rc; }}"],
        capture_output=True, text=True, env=_env(), timeout=300)


def _error_lines(result: subprocess.CompletedProcess) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("error: ")]


needs_unshare = pytest.mark.skipif(not _unshare_works(), reason="needs user namespaces to mount a small tmpfs")


@needs_unshare
def test_a_read_only_or_too_small_checkpoint_directory_is_named_before_training(tmp_path):
    one_checkpoint = checkpoint_bytes(load_config(TINY, SMALL))
    result = _pretrain_on_tmpfs(tmp_path / "ro", 4 * one_checkpoint, True)
    assert result.returncode == 2 and "step 1/" not in result.stdout
    assert _error_lines(result) == [f"error: checkpoint.dir '{tmp_path / 'ro' / 'small_disk'}' is not writable "
                                    "(Read-only file system); set checkpoint.dir to a writable directory"]
    result = _pretrain_on_tmpfs(tmp_path / "full", one_checkpoint // 2, False)
    assert result.returncode == 2 and "step 1/" not in result.stdout
    [line] = _error_lines(result)
    assert line.startswith(f"error: the checkpoint directory '{tmp_path / 'full' / 'small_disk'}' has 4.")
    assert line.endswith(" MB free, but a checkpoint of this model takes about 8.7 MB; free some space or set "
                         "checkpoint.dir to another disk")


@needs_unshare
def test_a_save_that_runs_out_of_space_is_one_line_and_leaves_no_partial_save(tmp_path):
    one_checkpoint = checkpoint_bytes(load_config(TINY, SMALL))
    # Room for one checkpoint and a half: the first save fits, the second runs out of space.
    result = _pretrain_on_tmpfs(tmp_path, one_checkpoint * 3 // 2, False, "checkpoint.interval=1",
                                "checkpoint.keep_last=1")
    assert result.returncode == 1
    assert _error_lines(result) == [
        f"error: cannot write checkpoint '{tmp_path / 'small_disk' / 'step_00000002'}': No space left on device; "
        f"free space or make '{tmp_path / 'small_disk'}' writable (or set checkpoint.dir), then relaunch to resume "
        "from the last checkpoint"]
    assert "Traceback" not in result.stderr
    assert result.stdout.splitlines()[-1:] == ["step_00000001"]  # the partial save of step 2 is gone
