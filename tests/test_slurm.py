"""moba_train.slurm and scripts/submit_slurm.py.

Everywhere: SLURM time limits, the requeue decision, the checks before submitting (one stderr line,
exit code 2, nothing written) and the multi-node script of the 8B recipe (bash syntax, one torchrun per
node, rendezvous, profile).

On a real one-node SLURM cluster started for this module (tests/slurm_cluster.py; 2 CPUs here; these
tests skip, with the reason, where its daemons cannot start), the tiny recipe as a 2-process CPU job
(synthetic data, 256 tokens):
- runs to its final step and checkpoint;
- stopped by the time-limit warning (`scancel --signal=USR1 --batch`: what `--signal=B:USR1@s` sends),
  then by a preemption (SIGTERM to every process of the training step), saves, requeues itself twice
  and ends with the metrics, the weights and the optimizer state of the uninterrupted job;
- run past its `--time`, gets SLURM's own warning, saves, requeues and resumes (in the same W&B run,
  offline files), and stays cancelled after a plain `scancel`;
- preempted with W&B logging on (its service process ends with the SIGTERM, its buffered records
  unwritten), saves, requeues, and the W&B run's offline files of both attempts hold every step once;
- failing in the trainer before any save, stops at the requeue limit (FAILED).
"""

import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import wandb_offline
from slurm_cluster import LocalSlurmCluster, unavailable_reason

from moba_train import slurm
from moba_train.config import ConfigError, load_config
from moba_train.slurm import Attempt, decide, time_limit_seconds

ROOT = Path(__file__).resolve().parents[1]
SUBMIT = ROOT / "scripts" / "submit_slurm.py"
TINY = ROOT / "configs" / "tiny_moba.yaml"
STEPS = 20
SMALL = [
    f"train.steps={STEPS}", "data.kind=synthetic", "train.seq_length=256", "train.micro_batch_size=1",
    "train.global_batch_size=2", "train.warmup_steps=2", "train.log_interval=1", "checkpoint.interval=5",
    "checkpoint.keep_last=2", "logging.progress_bar=off",
]
CPU_JOB = ["--gpus-per-node", "0", "--procs-per-node", "2", "--python", sys.executable]
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "BOOT_FAIL"}


def _env(extra: dict | None = None) -> dict:
    env = {**os.environ, **(extra or {})}
    env["PYTHONPATH"] = f"{ROOT}{os.pathsep}{env.get('PYTHONPATH', '')}"
    return env


def _submit(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SUBMIT), *args], capture_output=True, text=True, env=_env(env),
                          timeout=120)


# --- Everywhere. ---


@pytest.mark.parametrize("text, seconds", [
    ("90", 90 * 60), ("05:30", 5 * 60 + 30), ("01:02:03", 3600 + 2 * 60 + 3), ("2-0", 2 * 86400),
    ("1-02", 86400 + 2 * 3600), ("1-02:03", 86400 + 2 * 3600 + 3 * 60), ("1-02:03:04", 86400 + 2 * 3600 + 3 * 60 + 4),
])
def test_time_limit_seconds_reads_every_slurm_format(text, seconds):
    assert time_limit_seconds(text) == seconds


@pytest.mark.parametrize("text", ["", "4h", "1:2:3:4", "1-", "-5"])
def test_malformed_time_limit_is_a_config_error(text):
    with pytest.raises(ConfigError, match="not a SLURM time"):
        time_limit_seconds(text)


@pytest.mark.parametrize("text", ["0", "UNLIMITED", "infinite"])
def test_slurms_no_limit_times_are_submitted_as_given(tmp_path, text):
    result = _submit("--config", str(TINY), f"run.output_dir={tmp_path / 'run'}", *CPU_JOB, "--time", text,
                     "--dry-run", env={"PATH": "/nonexistent"})
    assert result.returncode == 0, result.stderr
    assert f"#SBATCH --time={text}\n" in result.stdout


@pytest.mark.skipif(not Path("/usr/bin/sbatch").is_file(), reason="sbatch reads the script's directives")
def test_sbatch_reads_the_directives_of_a_run_whose_paths_and_name_hold_spaces(tmp_path):
    # No daemon: a throwaway slurm.conf lets sbatch parse the script and then fail to reach a controller.
    conf = tmp_path / "slurm.conf"
    conf.write_text("ClusterName=t\nSlurmctldHost=localhost\nSlurmctldPort=6999\n"
                    "NodeName=localhost CPUs=2 State=UNKNOWN\nPartitionName=p Nodes=localhost Default=YES\n")
    dry = _submit("--config", str(TINY), f"run.output_dir={tmp_path / 'my runs' / 'tiny'}", "run.name=my run",
                  *CPU_JOB, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    (tmp_path / "job.sbatch").write_text(dry.stdout)
    result = subprocess.run(["sbatch", "--test-only", str(tmp_path / "job.sbatch")], capture_output=True, text=True,
                            env={**os.environ, "SLURM_CONF": str(conf)}, timeout=60)
    assert "Invalid directive" not in result.stderr and "unrecognized option" not in result.stderr, result.stderr


def _attempt(n: int, started: int | None, ended: int | None) -> Attempt:
    name = lambda step: None if step is None else f"step_{step:08d}"  # noqa: E731
    return Attempt(attempt=n, started_from=name(started), ended_at=name(ended), signal=None, exit_code=1)


def test_requeue_decision_counts_only_attempts_in_a_row_without_a_new_checkpoint():
    # Healthy runs stopped at their time limit requeue however many times they need.
    healthy = [_attempt(i + 1, 10 * i or None, 10 * (i + 1)) for i in range(8)]
    assert decide(healthy, complete=False, running=True, max_requeues=3) == ("requeue", 0)
    assert decide(healthy, complete=True, running=True, max_requeues=3) == ("complete", 0)
    # A job SLURM is ending (scancel, hard time limit) is never requeued: that would undo a scancel.
    assert decide(healthy, complete=False, running=False, max_requeues=3) == ("ended", 0)
    # A job that fails the same way each time: max_requeues requeues, then it gives up.
    failing = [_attempt(1, None, 10)] + [_attempt(i, 10, 10) for i in range(2, 6)]
    assert [decide(failing[:n], False, True, 3) for n in range(1, 6)] == [
        ("requeue", 0), ("requeue", 1), ("requeue", 2), ("requeue", 3), ("give-up", 4)]
    # Progress resets the count; no checkpoint at all is no progress either.
    assert decide([*failing[:4], _attempt(5, 10, 15)], False, True, 3) == ("requeue", 0)
    assert decide([_attempt(1, None, None)], False, True, 0) == ("give-up", 1)


def _scontrol(tmp_path: Path, state: str, show_failures: int, requeue_failures: int) -> str:
    """A PATH whose `scontrol` fails as it does while the controller is down (exit 1, SLURM's message): `show job`
    its first `show_failures` times and then prints `state`, `requeue` its first `requeue_failures` times and then
    succeeds; each call is appended to <tmp_path>/calls. The fault injected around the real requeue decision."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "scontrol"
    script.write_text(f"""#!/bin/bash
echo "$*" >> {tmp_path}/calls
n=$(grep -c "^$1 " {tmp_path}/calls)
limit={show_failures}; [ "$1" = requeue ] && limit={requeue_failures}
if [ $n -le $limit ]; then
    echo "slurm_load_jobs error: Unable to contact slurm controller (connect failure)" >&2; exit 1
fi
[ "$1" = show ] && echo {shlex.quote(state)}
exit 0
""")
    script.chmod(0o755)
    return f"{bin_dir}{os.pathsep}{os.environ['PATH']}"


RUNNING = "JobId=7 JobState=RUNNING Reason=None"
UNREACHABLE = "(scontrol: slurm_load_jobs error: Unable to contact slurm controller (connect failure))"


@pytest.mark.parametrize("state, show_failures, requeue_failures, decision, line, calls, retries", [
    (RUNNING, 2, 2, "requeue", "[slurm] attempt 1 ended (signal TERM; no new checkpoint, 1 in a row; 20 steps in "
     "all): requeueing job 7", ["show job -o 7"] * 3 + ["requeue 7"] * 3, 4),
    ("JobId=7 JobState=COMPLETING Reason=None", 0, 0, "ended", "[slurm] attempt 1: SLURM is ending job 7",
     ["show job -o 7"], 0),
    ("", 99, 0, "ended", f"[slurm] attempt 1: could not ask SLURM whether job 7 is still running {UNREACHABLE}, "
     "so it is not requeued", ["show job -o 7"] * 4, 3),
    (RUNNING, 0, 99, "requeue-failed", f"[slurm] attempt 1: could not requeue job 7 {UNREACHABLE}; the run stands "
     "at no checkpoint yet of 20 steps, submit again to continue", ["show job -o 7"] + ["requeue 7"] * 4, 3),
], ids=["controller-back", "job-ending", "controller-gone", "requeue-refused"])
def test_requeue_decision_and_requeue_wait_for_a_controller_that_does_not_answer(
        tmp_path, monkeypatch, capsys, state, show_failures, requeue_failures, decision, line, calls, retries):
    # A controller that is restarting or too busy must not read as a job SLURM is ending, nor leave a job that
    # should requeue unrequeued: either stops the run for good at a preemption or a time limit.
    monkeypatch.setattr(slurm, "SCONTROL_WAITS_S", (0, 0, 0))
    monkeypatch.setenv("PATH", _scontrol(tmp_path, state, show_failures, requeue_failures))
    cfg = load_config(TINY, [f"run.output_dir={tmp_path / 'run'}", *SMALL])
    attempt = Attempt(attempt=1, started_from=None, ended_at=None, signal="TERM", exit_code=1)
    code = slurm.after_attempt(cfg, "7", attempt, max_requeues=3)
    out = capsys.readouterr().out
    assert line in out, out
    assert code == (slurm.EXIT_REQUEUE if decision == "requeue" else slurm.EXIT_STOP)
    assert (tmp_path / "calls").read_text().splitlines() == calls
    assert out.count("trying again in 0 s") == retries, out
    (recorded,) = _attempts(tmp_path / "run", "7")
    assert recorded["decision"] == decision


@pytest.mark.parametrize("args, expected", [
    (["parallel.tensor=2", "--gpus-per-node", "0", "--procs-per-node", "3"],
     "parallel.tensor x pipeline x context = 2 x 1 x 1 = 2 does not divide nodes x processes per node = 1 x 3 = 3"),
    (["--nodes", "2", "--gpus-per-node", "0"], "a CPU job (--gpus-per-node 0) needs --procs-per-node"),
    (["--gpus-per-node", "8", "--procs-per-node", "4"], "--procs-per-node (4) must equal --gpus-per-node (8)"),
    (["run.device=cuda", "--gpus-per-node", "0", "--procs-per-node", "2"], "run.device=cuda but --gpus-per-node is 0"),
    ([], "pass --gpus-per-node (0 for a CPU cluster)"),
    (["--gpus-per-node", "8", "--time", "00:04:00"], "(300 s before the limit) does not fit in --time 00:04:00"),
    (["--gpus-per-node", "8", "--time", "4h"], "time limit '4h' is not a SLURM time"),
    (["--gpus-per-node", "8", "--signal-seconds", "0"], "command line: invalid value for '--signal-seconds' (0)"),
    (["train.lrr=1e-4", "--gpus-per-node", "8"], "unknown key 'train.lrr'; did you mean 'train.lr'?"),
    (["--gpus-per-node", "8", "--profile", "PROFILE"], "unknown key 'partiton'; did you mean 'partition'?"),
    (["run.output_dir=BLOCKED/run", "--gpus-per-node", "8"], "cannot be created: 'BLOCKED' is a file"),
    (["train.global_batch_size=6", "--gpus-per-node", "0", "--procs-per-node", "2", "--nodes", "2"],
     "train.global_batch_size (6) must be a multiple of micro_batch_size x data-parallel size (2 x 4)"),
    (["--gpus-per-node", "8", "--profile", "REPEATED"], "key 'partition' appears twice (lines 1 and 2)"),
], ids=["parallel-sizes", "cpu-without-procs", "procs-not-gpus", "cuda-on-cpu", "no-gpus-flag", "warning-too-long",
        "bad-time", "bad-flag-value", "bad-recipe", "bad-profile", "output-dir-not-writable", "global-batch",
        "repeated-profile-key"])
def test_submission_check_is_one_stderr_line_exit_2_and_writes_nothing(tmp_path, args, expected):
    profile, blocked, repeated = tmp_path / "profile.yaml", tmp_path / "blocked", tmp_path / "repeated.yaml"
    profile.write_text("partiton: gpu\n")
    repeated.write_text("partition: gpu\npartition: cpu\n")
    blocked.write_text("a file where a directory should be\n")
    args = [a.replace("PROFILE", str(profile)).replace("BLOCKED", str(blocked)).replace("REPEATED", str(repeated))
            for a in args]
    expected = expected.replace("BLOCKED", str(blocked))
    out = tmp_path / "run"
    result = _submit("--config", str(TINY), f"run.output_dir={out}", *args, env={"PATH": "/nonexistent"})
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], result.stderr
    assert not out.exists()


def test_eight_node_dry_run_is_a_valid_script_with_one_torchrun_per_node_and_the_profile(tmp_path):
    out = tmp_path / "llama8b"
    overrides = ["parallel.context=1", "train.seq_length=32768", f"run.output_dir={out}"]
    result = _submit("--config", str(ROOT / "configs" / "llama8b_moba.yaml"), *overrides, "--nodes", "8",
                     "--profile", str(ROOT / "configs" / "slurm" / "example_profile.yaml"), "--time", "12:00:00",
                     "--dry-run", env={"PATH": "/nonexistent"})  # no sbatch needed (nor run)
    assert result.returncode == 0, result.stderr
    script = result.stdout
    assert not out.exists(), "a dry run writes nothing"
    syntax = subprocess.run(["bash", "-n"], input=script, capture_output=True, text=True)
    assert syntax.returncode == 0, syntax.stderr
    sbatch = re.findall(r"^#SBATCH (\S+)$", script, re.M)
    assert {"--nodes=8", "--ntasks-per-node=1", "--gpus-per-node=8", "--cpus-per-task=96", "--partition=gpu",
            "--account=my-project", "--time=12:00:00", "--signal=B:USR1@600", "--requeue", "--open-mode=append",
            f"--output={out}/slurm/job-%j.out", "--exclusive", "--mem=0"} <= set(sbatch), sbatch
    assert 'HEAD=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)' in script
    launch = " ".join(script[script.index("    srun "):script.index(" &\n")].split())
    for part in ('srun --nodes="$SLURM_JOB_NUM_NODES" --ntasks-per-node=1', "--cpus-per-task=96",
                 '-m torch.distributed.run --nnodes="$SLURM_JOB_NUM_NODES" --nproc-per-node=8',
                 '--rdzv-backend=c10d --rdzv-endpoint="$HEAD:$PORT" --rdzv-id="$SLURM_JOB_ID"',
                 "--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 --shutdown-timeout=600",
                 f'{ROOT / "scripts" / "pretrain.py"} "${{RECIPE[@]}}"'):
        assert part in launch, part
    recipe = re.search(r"^RECIPE=\((.*)\)$", script, re.M).group(1).split()
    assert recipe[0] == "--config" and recipe[1].startswith(f"{out}/slurm/submit-") and recipe[2:] == overrides
    for line in ('source "$HOME/venvs/moba/bin/activate"', "export NCCL_SOCKET_IFNAME=ib0", "PYTHON=python"):
        assert re.search(rf"^{re.escape(line)}$", script, re.M), line


@pytest.mark.parametrize("written", ["24:00:00", "90", "30:00"])
def test_an_unquoted_profile_time_is_submitted_as_written(tmp_path, written):
    """A profile's `time: 24:00:00` without quotes (YAML reads it as the number 86400, base 60) is the time the
    user wrote, as quoted, not a refusal naming a number they never typed."""
    profile = tmp_path / "profile.yaml"
    profile.write_text(f"time: {written}\n")
    result = _submit("--config", str(TINY), f"run.output_dir={tmp_path / 'run'}", *CPU_JOB, "--profile", str(profile),
                     "--dry-run", env={"PATH": "/nonexistent"})
    assert result.returncode == 0, result.stderr
    assert f"#SBATCH --time={written}\n" in result.stdout


def test_a_profile_environment_variable_that_is_no_shell_name_is_refused_at_submission(tmp_path):
    """A profile `env` key bash cannot export (`NCCL-IB-HCA`) is one stderr line and exit code 2 at submission, not a
    job that starts without the variable and a bash error in its log."""
    profile = tmp_path / "profile.yaml"
    profile.write_text("env:\n  NCCL-IB-HCA: mlx5\n")
    out = tmp_path / "run"
    result = _submit("--config", str(TINY), f"run.output_dir={out}", *CPU_JOB, "--profile", str(profile), "--dry-run",
                     env={"PATH": "/nonexistent"})
    assert result.returncode == 2, result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "'NCCL-IB-HCA'" in lines[0], result.stderr
    assert not out.exists()


# --- On a real SLURM cluster. ---


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    reason = unavailable_reason()
    if reason:
        pytest.skip(f"no SLURM cluster: {reason}")
    cluster = LocalSlurmCluster(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


def _submit_job(cluster: LocalSlurmCluster, out: Path, *args: str) -> str:
    result = _submit("--config", str(TINY), *SMALL, f"run.output_dir={out}", *args, *CPU_JOB, env=cluster.env)
    assert result.returncode == 0, result.stderr
    return re.search(r"^submitted job (\d+):", result.stdout, re.M).group(1)


def _job(cluster: LocalSlurmCluster, job: str) -> dict:
    shown = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True, env=cluster.env)
    return dict(re.findall(r"(\w+)=(\S*)", shown.stdout))


def _wait(condition, timeout_s: float, what: str, cluster: LocalSlurmCluster, job: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}; job {_job(cluster, job)}")
        time.sleep(0.2)


def _wait_for_end(cluster: LocalSlurmCluster, job: str, timeout_s: float) -> dict:
    _wait(lambda: _job(cluster, job).get("JobState") in TERMINAL, timeout_s, "the job to end", cluster, job)
    return _job(cluster, job)


def _log(out: Path, job: str) -> str:
    path = out / "slurm" / f"job-{job}.out"
    return path.read_text(errors="replace") if path.exists() else ""


def _attempts(out: Path, job: str) -> list[dict]:
    path = out / "slurm" / f"job-{job}.attempts.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _metrics(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().split("\n")[:-1]] if path.exists() else []  # whole lines


def _step(name: str) -> int:
    return int(name.removeprefix("step_"))


def _checkpoint_tensors(path: Path, scratch: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a distributed checkpoint (model and optimizer state), read without a process group."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    scratch.parent.mkdir(parents=True, exist_ok=True)
    dcp_to_torch_save(path, scratch)
    return {k: v for k, v in torch.load(scratch, weights_only=False).items() if isinstance(v, torch.Tensor)}


def test_sbatch_refusal_is_one_stderr_line_and_leaves_no_script(cluster, tmp_path):
    out = tmp_path / "refused"
    result = _submit("--config", str(TINY), *SMALL, f"run.output_dir={out}", "--partition", "nosuch", *CPU_JOB,
                     env=cluster.env)
    assert result.returncode == 2
    assert result.stderr.strip() == "error: sbatch refused the job: invalid partition specified: nosuch", result.stderr
    assert not out.exists()  # nothing left behind: not even the directories made for the script


@pytest.fixture(scope="module")
def uninterrupted(cluster, tmp_path_factory) -> tuple[Path, str]:
    """The tiny recipe as a 2-process job that nobody interrupts."""
    out = tmp_path_factory.mktemp("uninterrupted")
    job = _submit_job(cluster, out, "--time", "10")
    state = _wait_for_end(cluster, job, 300)
    assert state["JobState"] == "COMPLETED", _log(out, job)[-5000:]
    return out, job


def test_two_process_cpu_job_trains_to_the_final_step_and_checkpoint(uninterrupted):
    out, job = uninterrupted
    log = _log(out, job)
    assert "# resolved config (2 process(es), cpu" in log
    assert [m["step"] for m in _metrics(out)] == list(range(1, STEPS + 1))
    final = out / "checkpoints" / f"step_{STEPS:08d}"
    assert (final / "COMPLETE").is_file() and (final / "config.yaml").is_file()
    assert _attempts(out, job) == [{"attempt": 1, "started_from": None, "ended_at": final.name, "signal": None,
                                    "exit_code": 0, "decision": "complete"}]
    assert f"[slurm] attempt 1: training complete ({final.name}, {STEPS} steps)" in log


def test_warning_and_preemption_save_requeue_and_finish_like_the_uninterrupted_job(cluster, uninterrupted, tmp_path):
    reference, _ = uninterrupted
    out = tmp_path / "interrupted"
    job = _submit_job(cluster, out, "--time", "10")

    # The time-limit warning, as SLURM sends it: SIGUSR1 to the batch script only.
    _wait(lambda: len(_metrics(out)) >= 3, 240, "step 3", cluster, job)
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], check=True, env=cluster.env)
    _wait(lambda: len(_attempts(out, job)) == 1, 240, "the first attempt to end", cluster, job)
    first = _attempts(out, job)[0]
    warned_at = _step(first["ended_at"])

    # A preemption: SIGTERM to every process of the training step (not to the batch script).
    _wait(lambda: len(_metrics(out)) >= warned_at + 2, 240, "two steps of the second attempt", cluster, job)
    subprocess.run(["scancel", "--signal=TERM", job], check=True, env=cluster.env)
    state = _wait_for_end(cluster, job, 300)
    log = _log(out, job)
    assert state["JobState"] == "COMPLETED" and state["Restarts"] == "2", log[-5000:]

    attempts = _attempts(out, job)
    preempted_at = _step(attempts[1]["ended_at"])
    assert 3 <= warned_at < preempted_at < STEPS, attempts
    assert [(a["attempt"], a["started_from"], a["signal"], a["decision"]) for a in attempts] == [
        (1, None, "USR1", "requeue"),
        (2, f"step_{warned_at:08d}", None, "requeue"),
        (3, f"step_{preempted_at:08d}", None, "complete"),
    ]
    for stopped in (warned_at, preempted_at):
        assert f"stopped by signal after step {stopped};" in log
        assert f"resumed from {out / 'checkpoints'}/step_{stopped:08d} at step {stopped} " in log
    assert not list((out / "checkpoints").glob(".tmp_*")), "a save was left half-written"

    got, want = _metrics(out), _metrics(reference)
    assert [m["step"] for m in got] == list(range(1, STEPS + 1)), "a step was lost or repeated"
    for key in ("train/loss", "train/lr", "train/grad_norm"):
        assert [m[key] for m in got] == [m[key] for m in want], key  # full-precision floats, exactly
    final = f"step_{STEPS:08d}"
    got_tensors = _checkpoint_tensors(out / "checkpoints" / final, tmp_path / "scratch" / "got.pt")
    want_tensors = _checkpoint_tensors(reference / "checkpoints" / final, tmp_path / "scratch" / "want.pt")
    assert "output_layer.weight" in want_tensors and got_tensors.keys() == want_tensors.keys()
    different = [key for key in want_tensors if not torch.equal(got_tensors[key], want_tensors[key])]
    assert not different, different


def test_job_past_its_time_limit_gets_the_warning_saves_requeues_and_resumes_and_scancel_ends_it(cluster, tmp_path):
    # Two minutes and the warning 45 s before: SLURM checks time limits every 30 s, so SIGUSR1 comes
    # 45-75 s into each attempt; the run is far longer than that and saves only when told to.
    out = tmp_path / "timelimit"
    job = _submit_job(cluster, out, "train.steps=5000", "checkpoint.interval=5000", "logging.wandb.mode=offline",
                      "--time", "2", "--signal-seconds", "45")
    _wait(lambda: ": continuing it;" in _log(out, job), 400, "a requeued attempt to continue its W&B run", cluster, job)
    subprocess.run(["scancel", job], check=True, env=cluster.env)  # the user stops it: it must stay stopped
    _wait_for_end(cluster, job, 120)
    time.sleep(cluster.cred_expire_s + 3)  # longer than a requeued job waits before it starts again
    state, log, attempts = _job(cluster, job), _log(out, job), _attempts(out, job)

    # On a machine so loaded that the warning beats the trainer's start, that attempt saves nothing and
    # requeues (a stall); the first warning that reaches a training run must save, requeue and resume.
    saved = next(a for a in attempts if a["ended_at"] != a["started_from"])
    assert (saved["signal"], saved["decision"]) == ("USR1", "requeue"), attempts
    saved_at = _step(saved["ended_at"])
    assert 1 <= saved_at < 5000
    assert f"stopped by signal after step {saved_at};" in log
    assert f"resumed from {out / 'checkpoints'}/step_{saved_at:08d} at step {saved_at} " in log
    continued = re.search(rf"^W&B run (\w+): continuing it; steps up to {saved_at} were already sent", log, re.M)
    assert continued and len(list((out / "wandb").glob(f"offline-run-*-{continued.group(1)}"))) >= 2, \
        "the requeued attempt should log to the W&B run of the attempt it resumes"
    assert "DUE TO TIME LIMIT" not in log, "an attempt was killed at its limit instead of stopping at the warning"
    assert state["JobState"] == "CANCELLED", state
    assert state["Restarts"] == str(sum(a["decision"] == "requeue" for a in attempts)), (state, attempts)
    assert attempts[-1]["decision"] in ("requeue", "ended"), attempts  # "ended" if it got to decide before SIGKILL


def test_preemption_with_wandb_logging_saves_and_the_next_attempt_continues_the_wandb_run_with_each_step_once(
        cluster, tmp_path):
    # SLURM's SIGTERM to every process of the training step reaches W&B's service process too (wandb-core:
    # a process of its own, which ends on it without writing the records it buffered); the trainer must
    # still save, and the next attempt send again what the first one's run file lacks and log on.
    out = tmp_path / "wandb"
    job = _submit_job(cluster, out, "checkpoint.interval=5000", "logging.wandb.mode=offline", "--time", "10")
    _wait(lambda: len(_metrics(out)) >= 3, 240, "step 3", cluster, job)
    subprocess.run(["scancel", "--signal=TERM", job], check=True, env=cluster.env)
    state = _wait_for_end(cluster, job, 400)
    attempts, log = _attempts(out, job), _log(out, job)
    assert (state["JobState"], state["Restarts"]) == ("COMPLETED", "1"), log[-5000:]
    assert attempts[0]["ended_at"] is not None and attempts[0]["decision"] == "requeue", (attempts, log[-5000:])
    stopped = _step(attempts[0]["ended_at"])
    assert 3 <= stopped < STEPS and f"stopped by signal after step {stopped};" in log, log[-5000:]
    continued = re.search(r"^W&B run (\w+): continuing it; .*$", log, re.M)
    assert continued, log[-5000:]

    runs = wandb_offline.offline_runs(out / "wandb", killed=1)  # the first attempt's service was killed
    assert [path.parent.name.endswith(f"-{continued.group(1)}") for path in runs] == [True, True]
    rows = [row for path in runs for row in wandb_offline.history(path)]
    assert [row["_step"] for row in rows] == list(range(1, STEPS + 1)), (continued.group(0), "each step exactly once")
    for row, metrics in zip(rows, _metrics(out)):
        numbers = {key: value for key, value in metrics.items() if key != "step" and isinstance(value, (int, float))}
        assert {key: row[key] for key in numbers} == numbers, row["_step"]


def test_job_whose_attempts_publish_no_checkpoint_fails_at_the_requeue_limit(cluster, tmp_path):
    # A dataset that does not exist passes the checks before submitting (the recipe is valid; the files are
    # the job's to read) and fails in the trainer every time. max_requeues 0: no second attempt.
    out = tmp_path / "failing"
    job = _submit_job(cluster, out, "data.kind=indexed", f"data.blend=[{tmp_path / 'missing'}]", "data.tokenizer=null",
                      "--time", "10", "--max-requeues", "0")
    state = _wait_for_end(cluster, job, 300)
    log = _log(out, job)
    assert (state["JobState"], state["Restarts"]) == ("FAILED", "0"), log[-5000:]
    assert f"indexed dataset '{tmp_path / 'missing'}' is missing" in log
    assert _attempts(out, job) == [{"attempt": 1, "started_from": None, "ended_at": None, "signal": None,
                                    "exit_code": 1, "decision": "give-up"}]
    assert "[slurm] attempt 1: giving up, 1 attempt(s) in a row published no new checkpoint" in log
