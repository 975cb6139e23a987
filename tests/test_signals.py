"""Stopping a job loses no work: a 2-process torchrun run of the tiny recipe (CPU, gloo, synthetic
data, 256 tokens) started in its own process group is signalled as a group mid-run, as `kill` on the
launcher, `kill -- -PGID`, Ctrl-C and SLURM do, after an earlier periodic save (the save that started
Megatron-Core's writer helpers, which such a signal used to kill). Every worker must finish its step,
save, and exit 0 with nothing half-written left. One run is stopped four times (SIGTERM, SIGUSR1,
SIGINT, SIGHUP) and relaunched each time; in the end it must equal an uninterrupted run. A run started with
SIGHUP ignored (nohup) keeps ignoring it.

The workers' exit codes are read with strace, which follows the launcher's process tree from outside
(torchrun reaps its workers and never reports their codes when it is stopped by a signal)."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parents[1]
STEPS = 24
RECIPE = [
    "--config", str(ROOT / "configs" / "tiny_moba.yaml"), f"train.steps={STEPS}", "train.warmup_steps=2",
    "train.seq_length=256", "train.micro_batch_size=1", "train.global_batch_size=2", "checkpoint.interval=2",
    "checkpoint.keep_last=2", "logging.progress_bar=off", "data.kind=synthetic",
]
STRACE = shutil.which("strace")

# What the launcher itself returns (as Popen.returncode: minus the signal that killed it), and why:
LAUNCHER_EXIT = {
    # torchrun handles these: it forwards the signal to every worker's process group, waits for the
    # workers (up to --shutdown-timeout, then SIGKILL), then re-raises the signal as SignalException
    # and exits 1 whatever the workers returned.
    signal.SIGTERM: 1,
    signal.SIGINT: 1,
    signal.SIGHUP: 1,  # the terminal closed
    # torchrun does not handle SIGUSR1 unless told (--signals-to-handle): it dies of it at once; the
    # workers get SIGTERM from the kernel as their parent dies (moba_train.signals) and stop cleanly.
    signal.SIGUSR1: -signal.SIGUSR1,
}


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}


def _torchrun(output_dir: Path, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            str(ROOT / "scripts" / "pretrain.py"), *RECIPE, f"run.output_dir={output_dir}", *overrides]


def _metrics(output_dir: Path) -> list[dict]:
    path = output_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().split("\n")[:-1]] if path.exists() else []  # whole lines


def _run_to_completion(output_dir: Path) -> subprocess.CompletedProcess:
    result = subprocess.run(_torchrun(output_dir), capture_output=True, text=True, env=_env(), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> list[dict]:
    """The metrics of an uninterrupted run."""
    out = tmp_path_factory.mktemp("reference")
    _run_to_completion(out)
    return _metrics(out)


def _stop_with_group_signal(out: Path, trace: Path, sig: signal.Signals, after_steps: int, *overrides: str) -> str:
    """Launch the run (with `overrides` of the recipe), signal its process group once `after_steps` steps
    are logged (a periodic save of this launch came before), check that the workers exit 0 and the
    launcher as LAUNCHER_EXIT says; returns the launch's stdout."""
    # The launcher leads a new process group (as in a shell or a SLURM step) holding everything it starts;
    # strace, its parent, stays outside so that the signal cannot stop it.
    lead_a_group = "import os, sys; os.setsid(); os.execv(sys.argv[1], sys.argv[1:])"
    proc = subprocess.Popen([STRACE, "-f", "-q", "--seccomp-bpf", "-e", "trace=none",
                             "-o", str(trace), sys.executable, "-c", lead_a_group, *_torchrun(out, *overrides)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    deadline = time.monotonic() + 240
    while len(_metrics(out)) < after_steps and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    if len(_metrics(out)) < after_steps:  # a run that hung or failed first, not one that a signal stopped badly
        proc.kill()
        stdout, stderr = proc.communicate(timeout=60)
        pytest.fail(f"{sig.name}: the run logged {len(_metrics(out))} of {after_steps} steps before the signal "
                    f"(launcher exit {proc.returncode}); its stderr ends:\n{stderr[-3000:]}")
    launcher = psutil.Process(proc.pid).children()[0]
    # The training processes are the launcher's children; their data-loader workers (forked) are theirs.
    workers = [p.pid for p in launcher.children() if "pretrain.py" in " ".join(p.cmdline())]
    os.killpg(launcher.pid, sig)
    stdout, stderr = proc.communicate(timeout=240)

    exits = dict(re.findall(r"^(\d+)\s+\+\+\+ (.+) \+\+\+$", trace.read_text(), re.MULTILINE))
    assert len(workers) == 2, sig.name
    assert [exits.get(str(pid)) for pid in workers] == ["exited with 0"] * 2, (sig.name, stderr[-3000:])
    assert proc.returncode == LAUNCHER_EXIT[sig], sig.name  # strace returns what the command it ran returned
    assert "[rank" not in stderr, (sig.name, stderr[-3000:])  # no worker traceback
    return stdout


@pytest.mark.skipif(STRACE is None, reason="strace reads the workers' exit codes")
def test_group_signals_stop_after_a_saved_step_and_relaunches_resume_exactly(reference, tmp_path):
    out = tmp_path / "run"
    stopped_at = 0
    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT, signal.SIGHUP):
        # Step stopped_at + 3 is logged after this launch's first periodic save (every 2 steps).
        stdout = _stop_with_group_signal(out, tmp_path / f"strace-{sig.name}.log", sig, stopped_at + 3)
        steps = [m["step"] for m in _metrics(out)]
        assert steps == list(range(1, len(steps) + 1)), sig.name  # each step once
        assert stopped_at + 3 <= len(steps) < STEPS, f"{sig.name} should arrive mid-run"
        stopped_at = len(steps)
        assert f"stopped by signal after step {stopped_at}" in stdout, sig.name
        checkpoints = sorted(p.name for p in (out / "checkpoints").iterdir())
        assert checkpoints[-1] == f"step_{stopped_at:08d}", sig.name
        assert not any(name.startswith(".tmp") for name in checkpoints), sig.name

    _run_to_completion(out)
    got = _metrics(out)
    assert [m["step"] for m in got] == list(range(1, STEPS + 1))
    for key in ("train/loss", "train/lr", "train/grad_norm"):
        assert [m[key] for m in got] == [m[key] for m in reference], key  # full-precision floats, exactly


@pytest.mark.skipif(STRACE is None, reason="strace reads the workers' exit codes")
def test_a_group_signal_also_reaching_the_data_loader_workers_still_stops_after_a_saved_step(tmp_path):
    """The data loader's worker processes (data.num_workers > 0) are in each training process's group, so
    torchrun's forwarded signal, SLURM's and Ctrl-C reach them too. They must leave stopping to the
    trainer: a worker that died of the signal made torch raise in the trainer mid-step, with no save.
    (Under strace, forked workers hung in about one launch of 20: see tests/data/test_sampler.py.)"""
    out = tmp_path / "run"
    stdout = _stop_with_group_signal(out, tmp_path / "strace.log", signal.SIGTERM, 3, "data.num_workers=1")
    steps = len(_metrics(out))
    assert 3 <= steps < STEPS
    assert f"stopped by signal after step {steps}" in stdout
    assert sorted(p.name for p in (out / "checkpoints").iterdir())[-1] == f"step_{steps:08d}"


@pytest.mark.parametrize("nohup", [False, True], ids=["terminal", "nohup"])
def test_sighup_asks_a_run_to_stop_unless_it_was_started_under_nohup(nohup):
    ask = ("import os, signal\nfrom moba_train.signals import StopSignal\nwith StopSignal() as stop:\n"
           "    os.kill(os.getpid(), signal.SIGHUP)\n    print(stop.received.name if stop.received else 'not asked')")
    command = [sys.executable, "-c", ask]
    result = subprocess.run(["nohup", *command] if nohup else command, capture_output=True, text=True, env=_env(),
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ("not asked" if nohup else "SIGHUP")
