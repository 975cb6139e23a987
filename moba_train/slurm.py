"""SLURM jobs: the sbatch script of a run, its submission, and the requeue decision after each attempt.

    scripts/submit_slurm.py --config RECIPE [overrides] --nodes N --gpus-per-node G [--profile P.yaml] [--dry-run]

A job is one sbatch allocation of N nodes. Each attempt (the first run and every requeue) runs one
`torchrun` per node through `srun`; the torchruns meet in a c10d rendezvous on the first node of
`scontrol show hostnames`, with the job id as rendezvous id, and start `scripts/pretrain.py` with the
recipe and overrides. Relaunching resumes from the newest complete checkpoint, so every attempt
continues the same run in the same directory.

Stopping and requeueing. The job asks SLURM for SIGUSR1 to the batch script `signal_seconds` before
its time limit (`--signal=B:USR1@<s>`). The script forwards it, and a SIGTERM that reaches the script,
to every process of the training step (`scancel --signal`); torchrun passes it to its workers too
(`--signals-to-handle` adds SIGUSR1; `--shutdown-timeout` waits as long as the warning lasts). The
trainer finishes its step, saves a checkpoint and exits. The script then asks
`python -m moba_train.slurm after-attempt` what comes next:
- training complete: the job ends;
- `max_requeues` attempts in a row published no new checkpoint (a job that fails the same way each
  time): the job fails;
- SLURM is already ending the job (scancel, the hard time limit, a preemption that cancels or requeues
  it): the job ends, since requeueing would undo a scancel (`scontrol show job` is asked again for a minute
  while the controller does not answer; if it never does, the job ends too, with scontrol's error);
- otherwise: after-attempt runs `scontrol requeue` (tried again for a minute while the controller does
  not answer; if it never does, the job ends with scontrol's error), and the next attempt resumes from the
  newest checkpoint.
Each attempt appends one line to `<output_dir>/slurm/job-<id>.attempts.jsonl`; all attempts log to
`<output_dir>/slurm/job-<id>.out`.

Submitting imports neither torch nor Megatron; the in-job commands import Megatron (through
moba_train.checkpointing) only to read the checkpoints.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional, Sequence

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from moba_train.config import Config, ConfigError, load_config, read_yaml
from moba_train.staging import write_text

EXIT_COMPLETE = 0
"""after-attempt's exit code when training is complete (the job ends)."""
EXIT_REQUEUE = 3
"""after-attempt's exit code when it has requeued the job (`scontrol requeue`)."""
EXIT_STOP = 1
"""after-attempt's exit code when the job must end unfinished: the requeue limit is reached, or SLURM is ending it."""
PREVIOUS = "previous"
"""after-attempt's --started-from for a requeued attempt: where the job's previous attempt ended."""
TORCHRUN_SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"
"""torchrun's default handled signals plus the time-limit warning."""


class SlurmProfile(BaseModel):
    """Cluster defaults for submit_slurm.py, typed once in a YAML file (`--profile`); every key can also
    be given on the command line, which wins."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    partition: Optional[str] = None
    """Partition (sbatch --partition); default: the cluster's default partition."""
    account: Optional[str] = None
    """Account to charge (sbatch --account)."""
    qos: Optional[str] = None
    """Quality of service (sbatch --qos)."""
    time: Optional[str] = None
    """Time limit of each attempt: minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS; default the partition's."""
    gpus_per_node: Optional[int] = Field(None, ge=0)
    """GPUs per node (sbatch --gpus-per-node); 0 for a CPU cluster."""
    procs_per_node: Optional[int] = Field(None, ge=1)
    """Training processes per node: one per GPU (the default); required on a CPU cluster."""
    cpus_per_node: Optional[int] = Field(None, ge=1)
    """CPU cores for each node's torchrun and its processes (--cpus-per-task); default procs_per_node on a CPU
    cluster, the cluster's default with GPUs."""
    signal_seconds: int = Field(300, ge=1)
    """The time-limit warning comes this many seconds before the limit: room for one step, a save and the requeue."""
    max_requeues: int = Field(3, ge=0)
    """Attempts in a row that publish no new checkpoint before the job gives up instead of requeueing."""
    rdzv_port: int = Field(29500, ge=1024, le=64535)
    """Base port of the c10d rendezvous on the first node; the job id modulo 1000 is added (jobs sharing a node)."""
    python: str = "python3"
    """Python interpreter on the compute nodes (after `setup`), with moba-train installed."""
    setup: list[str] = Field(default_factory=list)
    """Shell lines run before the launch (module load ..., source venv/bin/activate, ...)."""
    env: dict[str, str] = Field(default_factory=dict)
    """Environment variables exported for the job (e.g. NCCL_SOCKET_IFNAME, NCCL_IB_HCA)."""
    sbatch: list[str] = Field(default_factory=list)
    """Extra sbatch options, one per entry (e.g. --exclusive, --mem=0, --constraint=h100)."""
    srun: list[str] = Field(default_factory=list)
    """Extra srun options of the training step (e.g. --container-image=... with pyxis)."""

    @field_validator("env")
    @classmethod
    def _shell_names(cls, env: dict[str, str]) -> dict[str, str]:
        for name in env:
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
                raise ValueError(f"'{name}' is not a shell variable name (letters, digits and _, not first a digit)")
        return env


def load_profile(path: str | Path | None) -> SlurmProfile:
    """The profile at `path` (an empty profile for None); ConfigError with one sentence if it is wrong."""
    if path is None:
        return SlurmProfile()
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"profile '{path}' does not exist; pass a YAML file like configs/slurm/example_profile.yaml")
    try:
        raw = read_yaml(path)  # a repeated key is an error, not the last one silently winning
    except yaml.YAMLError:
        raise ConfigError(f"{path}: not valid YAML; fix the syntax") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a profile must be a mapping of keys (partition, account, setup, ...)")
    if isinstance(raw.get("time"), int) and not isinstance(raw["time"], bool):
        # YAML reads an unquoted 24:00:00 as the number 86400 (base 60): take the time as written
        raw["time"] = str(yaml.load(path.read_text(encoding="utf-8"), Loader=yaml.BaseLoader)["time"])
    try:
        return SlurmProfile.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_profile_error(err, str(path))) from None


def _profile_error(err: ValidationError, source: str, as_flag: bool = False) -> str:
    first = err.errors()[0]
    key = ".".join(str(p) for p in first["loc"])
    if as_flag:
        key = "--" + key.replace("_", "-")
    if first["type"] == "extra_forbidden":
        match = difflib.get_close_matches(key, list(SlurmProfile.model_fields), n=1, cutoff=0.5)
        return f"{source}: unknown key '{key}'" + (f"; did you mean '{match[0]}'?" if match else "")
    return f"{source}: invalid value for '{key}' ({first.get('input')!r}): {first['msg']}"


NO_TIME_LIMIT = ("0", "unlimited", "infinite")  # SLURM's spellings of no time limit (the partition's own applies)
_TIME = re.compile(r"^(?:(\d+)-(\d+)(?::(\d+)(?::(\d+))?)?|(\d+)(?::(\d+)(?::(\d+))?)?)$")


def time_limit_seconds(text: str) -> int:
    """Seconds of a SLURM time limit ("90" minutes, "MM:SS", "HH:MM:SS", "D-HH[:MM[:SS]]"); ConfigError if malformed."""
    match = _TIME.match(text.strip())
    if not match:
        raise ConfigError(f"time limit '{text}' is not a SLURM time; use HH:MM:SS, D-HH:MM:SS or minutes")
    days, d_hours, d_minutes, d_seconds, a, b, c = (int(g) if g else 0 for g in match.groups())
    if match.group(1) is not None:
        return ((days * 24 + d_hours) * 60 + d_minutes) * 60 + d_seconds
    if match.group(7) is not None:  # HH:MM:SS
        return (a * 60 + b) * 60 + c
    return a * 60 + b  # minutes, or MM:SS


@dataclass(frozen=True)
class SlurmJob:
    """A checked submission: the recipe, its validated config, the node shape and the merged profile."""

    recipe: Path
    """The recipe file as given (absolute)."""
    overrides: tuple[str, ...]
    cfg: Config
    nodes: int
    profile: SlurmProfile
    """The profile with the command line applied; gpus_per_node and procs_per_node are always set."""
    workdir: Path
    """Directory the job runs in (sbatch --chdir): relative paths of the recipe mean what they meant here."""
    pretrain: Path
    """scripts/pretrain.py (absolute)."""

    @property
    def world_size(self) -> int:
        return self.nodes * self.profile.procs_per_node

    @property
    def run_dir(self) -> Path:
        return _absolute(self.cfg.run.output_dir, self.workdir)

    @property
    def slurm_dir(self) -> Path:
        """`<output_dir>/slurm`: scripts, recipe snapshots, logs and attempt records of the run's jobs."""
        return self.run_dir / "slurm"


def _absolute(path: str | Path, base: Path) -> Path:
    path = Path(path).expanduser()
    return path if path.is_absolute() else base / path


def plan_job(recipe: str | Path, overrides: Sequence[str], nodes: int, profile: SlurmProfile, pretrain: Path,
             workdir: Path | None = None) -> SlurmJob:
    """Check a submission before anything is written; ConfigError with one sentence for the first problem.

    Checks: the recipe validates (moba_train.config.load_config, as scripts/pretrain.py), the node shape
    is complete, tensor x pipeline x context divides nodes x processes per node, the time limit leaves
    room for the warning, and the run's output (and checkpoint) directory is writable.
    """
    workdir = Path(workdir or Path.cwd()).resolve()
    cfg = load_config(recipe, list(overrides))
    if nodes < 1:
        raise ConfigError(f"--nodes must be at least 1 (got {nodes})")
    gpus = profile.gpus_per_node
    if gpus is None:
        raise ConfigError("pass --gpus-per-node (0 for a CPU cluster) or set gpus_per_node in the profile")
    procs = profile.procs_per_node
    if gpus == 0:
        if procs is None:
            raise ConfigError("a CPU job (--gpus-per-node 0) needs --procs-per-node: the training processes per node")
        if cfg.run.device == "cuda":
            raise ConfigError("the recipe sets run.device=cuda but --gpus-per-node is 0; set run.device=auto or ask "
                              "for GPUs")
    elif procs is not None and procs != gpus:
        raise ConfigError(f"--procs-per-node ({procs}) must equal --gpus-per-node ({gpus}): one process per GPU")
    profile = profile.model_copy(update={"procs_per_node": procs or gpus,
                                         "cpus_per_node": profile.cpus_per_node or (None if gpus else procs)})
    par = cfg.parallel
    model_parallel = par.tensor * par.pipeline * par.context
    world = nodes * profile.procs_per_node
    if world % model_parallel:
        raise ConfigError(
            f"parallel.tensor x pipeline x context = {par.tensor} x {par.pipeline} x {par.context} = {model_parallel} "
            f"does not divide nodes x processes per node = {nodes} x {profile.procs_per_node} = {world}; "
            f"change --nodes, --gpus-per-node or the parallel sizes"
        )
    if profile.time is not None and profile.time.strip().lower() not in NO_TIME_LIMIT:
        limit = time_limit_seconds(profile.time)
        if profile.signal_seconds >= limit:
            raise ConfigError(
                f"the time-limit warning ({profile.signal_seconds} s before the limit) does not fit in --time "
                f"{profile.time} ({limit} s); raise --time or lower --signal-seconds"
            )
    job = SlurmJob(Path(recipe).resolve(), tuple(overrides), cfg, nodes, profile, workdir, Path(pretrain).resolve())
    _check_writable(job.run_dir, "run.output_dir")
    if cfg.checkpoint.dir:
        _check_writable(_absolute(cfg.checkpoint.dir, workdir), "checkpoint.dir")
    cfg.microbatches(world // model_parallel)
    return job


def _check_writable(path: Path, key: str) -> None:
    """`path` exists as a writable directory or can be created (its nearest existing ancestor is writable)."""
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"{key} '{path}' cannot be created: '{existing}' is a file; choose another {key}")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{key} '{path}' is not writable ('{existing}' is read-only for you); choose another {key}")


def _directive_value(value) -> str:
    """A value for an #SBATCH line: sbatch splits those lines at spaces unless the value is in double quotes."""
    text = str(value)
    if '"' in text:
        raise ConfigError(f"'{text}' holds a double quote, which an #SBATCH line cannot carry; rename it")
    return f'"{text}"' if any(c.isspace() for c in text) else text


def render_script(job: SlurmJob, recipe_snapshot: Path, script_path: Path) -> str:
    """The sbatch script of `job`; it reads the recipe from `recipe_snapshot` (a copy made at submission,
    so editing the recipe later never changes a queued or requeued job) and names itself `script_path`."""
    p = job.profile
    q = shlex.quote
    recipe_args = " ".join(q(a) for a in ["--config", str(recipe_snapshot), *job.overrides])
    gpus = p.gpus_per_node
    options = [f"--job-name={_directive_value(job.cfg.run.name)}", f"--nodes={job.nodes}", "--ntasks-per-node=1"]
    options += [f"--gpus-per-node={gpus}"] if gpus else []
    options += [f"--cpus-per-task={p.cpus_per_node}"] if p.cpus_per_node else []
    options += [f"--{key}={value}" for key, value in (("time", p.time), ("partition", p.partition),
                                                      ("account", p.account), ("qos", p.qos)) if value]
    options += [f"--signal=B:USR1@{p.signal_seconds}", "--requeue", "--open-mode=append",
                f"--output={_directive_value(job.slurm_dir / 'job-%j.out')}",
                f"--chdir={_directive_value(job.workdir)}", *p.sbatch]
    srun = ["srun", '--nodes="$SLURM_JOB_NUM_NODES"', "--ntasks-per-node=1", "--kill-on-bad-exit=1"]
    srun += [f"--cpus-per-task={p.cpus_per_node}"] if p.cpus_per_node else []  # srun 22.05 does not inherit it
    srun += [q(a) for a in p.srun]
    torchrun = [
        ['"$PYTHON" -m torch.distributed.run', '--nnodes="$SLURM_JOB_NUM_NODES"',
         f"--nproc-per-node={p.procs_per_node}"],
        ["--rdzv-backend=c10d", '--rdzv-endpoint="$HEAD:$PORT"', '--rdzv-id="$SLURM_JOB_ID"'],
        [f"--signals-to-handle={TORCHRUN_SIGNALS}", f"--shutdown-timeout={p.signal_seconds}"],
        [q(str(job.pretrain)), '"${RECIPE[@]}" &'],
    ]
    launch = " \\\n        ".join(" ".join(part) for part in [srun, *torchrun])
    shape = f"{job.nodes} node(s) x {p.procs_per_node} process(es)" + (f" on {gpus} GPU(s) each" if gpus else " (CPU)")
    lines = [
        "#!/bin/bash",
        f"# moba-train: {job.cfg.run.name}, {shape}; written by scripts/submit_slurm.py.",
        f"# Recipe: {job.recipe} (copied to {recipe_snapshot}); overrides: {' '.join(job.overrides) or 'none'}.",
        "# At the time-limit warning or a preemption the trainer saves and exits, and the job requeues itself",
        f"# until training is complete ({p.max_requeues} attempts in a row without a new checkpoint end it).",
        *(f"#SBATCH {option}" for option in options),
        "",
        *p.setup,
        *(f"export {name}={q(value)}" for name, value in p.env.items()),
        f"PYTHON={q(p.python)}",
        f"RECIPE=({recipe_args})",
        "",
        "# The warning (SIGUSR1 to this shell) and a SIGTERM that reaches this shell go to every process of the",
        "# training step; the trainer finishes its step, saves a checkpoint and exits.",
        "STOP_SIGNAL=none",
        "forward() {",
        '    STOP_SIGNAL=$1',
        '    echo "[slurm] $(date -u +%FT%TZ) SIG$1 received: forwarding it to the training step"',
        '    scancel --signal="$1" "$SLURM_JOB_ID"',
        "}",
        "trap 'forward USR1' USR1",
        "trap 'forward TERM' TERM",
        "",
        f'echo "[slurm] $(date -u +%FT%TZ) job $SLURM_JOB_ID attempt $((${{SLURM_RESTART_COUNT:-0}} + 1)) on '
        f'$SLURM_JOB_NODELIST: {script_path}"',
        "# A requeued attempt starts where the previous one ended (its line in the attempts file); only a job's",
        "# first attempt looks (Megatron takes seconds to import).",
        f"STARTED_FROM={PREVIOUS}",
        f'[ -e {q(str(job.slurm_dir))}/"job-$SLURM_JOB_ID.attempts.jsonl" ] || '
        'STARTED_FROM=$("$PYTHON" -m moba_train.slurm newest-checkpoint "${RECIPE[@]}")',
        'HEAD=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
        f"PORT=$(({p.rdzv_port} + SLURM_JOB_ID % 1000))",
        "EXIT_CODE=0",
        'if [ "$STOP_SIGNAL" = none ]; then  # a signal came during the set-up above: skip to the decision',
        f"    {launch}",
        "    STEP=$!",
        '    while kill -0 "$STEP" 2>/dev/null; do wait "$STEP"; done  # a trapped signal interrupts `wait`',
        '    wait "$STEP"; EXIT_CODE=$?',
        "fi",
        "",
        '"$PYTHON" -m moba_train.slurm after-attempt "${RECIPE[@]}" --started-from="$STARTED_FROM" \\',
        f'    --signal="$STOP_SIGNAL" --exit-code="$EXIT_CODE" --max-requeues={p.max_requeues}',
        "case $? in",
        f"    {EXIT_COMPLETE}) exit 0 ;;",
        f"    {EXIT_REQUEUE}) exit 0 ;;  # after-attempt requeued the job",
        "esac",
        "exit 1",
    ]
    return "\n".join(lines) + "\n"


def _submission_stem(slurm_dir: Path) -> str:
    """`submit-<UTC time>` (with a counter when taken): the name of one submission's script and recipe copy."""
    stem = "submit-" + datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    candidate, n = stem, 1
    while (slurm_dir / f"{candidate}.sbatch").exists():
        n += 1
        candidate = f"{stem}-{n}"
    return candidate


def submit(job: SlurmJob, dry_run: bool = False, env: dict | None = None) -> str | None:
    """Write the recipe copy and the script under `job.slurm_dir` and `sbatch` it; print the job id and the
    log path. With `dry_run`, print the script and write nothing. Returns the job id (None for a dry run)."""
    stem = _submission_stem(job.slurm_dir)
    recipe_copy, script_path = job.slurm_dir / f"{stem}.recipe.yaml", job.slurm_dir / f"{stem}.sbatch"
    script = render_script(job, recipe_copy, script_path)
    if dry_run:
        print(script, end="")
        return None
    sbatch = shutil.which("sbatch", path=(env or os.environ).get("PATH"))
    if sbatch is None:
        raise ConfigError("sbatch is not on PATH: submit from a SLURM login node (or pass --dry-run to see the script)")
    made = [d for d in (job.slurm_dir, *job.slurm_dir.parents) if not d.exists()]  # removed again if refused
    job.slurm_dir.mkdir(parents=True, exist_ok=True)
    write_text(recipe_copy, job.recipe.read_text())
    write_text(script_path, script)
    result = subprocess.run([sbatch, "--parsable", str(script_path)], capture_output=True, text=True, env=env)
    if result.returncode != 0:
        recipe_copy.unlink()
        script_path.unlink()
        for directory in made:  # innermost first; only if still empty
            try:
                directory.rmdir()
            except OSError:
                break
        reason = ((result.stderr or result.stdout).strip().splitlines() or ["no reason given"])[0]
        reason = reason.removeprefix("sbatch: error: ")  # the first line names the cause, a second repeats it
        raise ConfigError(f"sbatch refused the job: {reason}")
    job_id = result.stdout.strip().split(";")[0]
    p = job.profile
    log = job.slurm_dir / f"job-{job_id}.out"
    print(f"submitted job {job_id}: {job.nodes} node(s) x {p.procs_per_node} process(es) = {job.world_size}")
    print(f"script: {script_path}")
    print(f"log:    {log}")
    print(f"follow: squeue -j {job_id}; tail -f {log}")
    return job_id


# --- Inside the job: what each attempt did and what comes next. ---


@dataclass(frozen=True)
class Attempt:
    """One attempt of a job, as recorded in `job-<id>.attempts.jsonl`."""

    attempt: int
    """1 for the first run, 2 after the first requeue, ... (SLURM_RESTART_COUNT + 1)."""
    started_from: Optional[str]
    """Newest complete checkpoint (directory name) when the attempt started, or None."""
    ended_at: Optional[str]
    """Newest complete checkpoint when it ended, or None."""
    signal: Optional[str]
    """USR1 (time-limit warning) or TERM (preemption, scancel) when one reached the batch script."""
    exit_code: int
    """Exit code of the training step (srun); torchrun exits 1 whenever a signal stopped it."""
    decision: str = ""
    """complete, requeue, give-up (the requeue limit), ended (SLURM was ending the job, or the controller did not
    answer whether it was) or requeue-failed (the controller did not requeue it)."""


def decide(attempts: Sequence[Attempt], complete: bool, running: bool, max_requeues: int) -> tuple[str, int]:
    """What comes after the last of `attempts`: ("complete" | "requeue" | "give-up" | "ended", attempts in a
    row that published no new checkpoint, the last one included).

    An attempt that published a checkpoint made progress (a time limit or a preemption stops a healthy run
    after its save); only attempts without progress count against `max_requeues`. A job SLURM is already
    ending (`running` false: scancel, the hard time limit, a preemption that cancels or requeues it) is
    never requeued by the script: `scontrol requeue` would bring a cancelled job back.
    """
    stalled = 0
    for attempt in reversed(attempts):
        if attempt.ended_at != attempt.started_from:
            break
        stalled += 1
    if complete:
        return "complete", stalled
    if not running:
        return "ended", stalled
    return ("give-up" if stalled > max_requeues else "requeue"), stalled


def _attempts_path(cfg: Config, job_id: str) -> Path:
    return Path(cfg.run.output_dir).resolve() / "slurm" / f"job-{job_id}.attempts.jsonl"


def _newest_checkpoint(cfg: Config) -> Optional[str]:
    from moba_train import checkpointing  # Megatron: seconds to import, so only here

    newest = checkpointing.latest_checkpoint(checkpointing.checkpoint_dir(cfg))
    return newest.name if newest else None


def _training_complete(cfg: Config) -> bool:
    from moba_train import checkpointing

    return checkpointing.is_complete(checkpointing.step_path(checkpointing.checkpoint_dir(cfg), cfg.train.steps))


SCONTROL_WAITS_S = (2, 4, 8, 16, 30)
"""Seconds between the tries of an scontrol command while the controller does not answer (a minute in all): a
slurmctld restarting or too busy to answer must neither read as a job SLURM is ending nor leave a job that
should requeue unrequeued."""


def _scontrol(*args: str) -> tuple[Optional[subprocess.CompletedProcess], str]:
    """`scontrol ARGS`, tried again while the controller does not answer: (the run, its error or "") once it
    answers (a refusal such as "Invalid job id specified" is an answer), (None, its last error) if it never does."""
    for wait in (*SCONTROL_WAITS_S, None):
        done = subprocess.run(["scontrol", *args], capture_output=True, text=True)
        error = (done.stderr.strip().splitlines() or [f"exit code {done.returncode}"])[-1]
        if done.returncode == 0 or "Invalid job id" in error:
            return done, error if done.returncode else ""
        if wait is None:
            return None, error
        print(f"[slurm] scontrol {' '.join(args)} failed ({error}); trying again in {wait} s", flush=True)
        time.sleep(wait)


def _job_running(job_id: str) -> tuple[Optional[bool], str]:
    """Whether SLURM still has job `job_id` RUNNING (not COMPLETING: being cancelled, timed out or preempted), and
    scontrol's error: (None, error) when the controller answered none of the tries."""
    shown, error = _scontrol("show", "job", "-o", job_id)
    if shown is None:
        return None, error
    return re.search(r"\bJobState=RUNNING\b", shown.stdout) is not None, ""


def _record(path: Path, attempts: Sequence[Attempt]) -> None:
    """Publish the attempts file: one JSON line per attempt (atomically)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, "".join(json.dumps(dataclasses.asdict(a)) + "\n" for a in attempts))


def after_attempt(cfg: Config, job_id: str, attempt: Attempt, max_requeues: int) -> int:
    """Record `attempt` (its ended_at is filled in here, and its started_from when it is PREVIOUS), print
    what happens next, and requeue the job where that is next; returns EXIT_COMPLETE, EXIT_REQUEUE or EXIT_STOP."""
    path = _attempts_path(cfg, job_id)
    earlier = [Attempt(**json.loads(line)) for line in path.read_text().splitlines()] if path.exists() else []
    if attempt.started_from == PREVIOUS:
        attempt = dataclasses.replace(attempt, started_from=earlier[-1].ended_at if earlier else None)
    attempt = dataclasses.replace(attempt, ended_at=_newest_checkpoint(cfg))
    complete = _training_complete(cfg)
    running, scontrol_error = (True, "") if complete else _job_running(job_id)
    decision, stalled = decide([*earlier, attempt], complete, bool(running), max_requeues)
    attempt = dataclasses.replace(attempt, decision=decision)
    _record(path, [*earlier, attempt])
    at = attempt.ended_at or "no checkpoint yet"
    prefix = f"[slurm] attempt {attempt.attempt}"
    if decision == "complete":
        print(f"{prefix}: training complete ({at}, {cfg.train.steps} steps)", flush=True)
        return EXIT_COMPLETE
    if decision == "ended":
        cause = (f"could not ask SLURM whether job {job_id} is still running (scontrol: {scontrol_error})"
                 if running is None else f"SLURM is ending job {job_id} (scancel, its hard time limit or a preemption)")
        print(f"{prefix}: {cause}, so it is not requeued; the run stands at {at} of {cfg.train.steps} steps, submit "
              "again to continue", flush=True)
        return EXIT_STOP
    if decision == "give-up":
        print(f"{prefix}: giving up, {stalled} attempt(s) in a row published no new checkpoint (still at {at}, "
              f"limit {max_requeues} requeues); read this log for the cause, fix it and submit again", flush=True)
        return EXIT_STOP
    why = f"signal {attempt.signal}" if attempt.signal else f"training step exit code {attempt.exit_code}"
    progress = f"no new checkpoint, {stalled} in a row" if stalled else f"newest checkpoint {at}"
    print(f"{prefix} ended ({why}; {progress}; {cfg.train.steps} steps in all): requeueing job {job_id}", flush=True)
    requeued, error = _scontrol("requeue", job_id)
    if requeued is not None and not error:
        return EXIT_REQUEUE
    _record(path, [*earlier, dataclasses.replace(attempt, decision="requeue-failed")])
    print(f"{prefix}: could not requeue job {job_id} (scontrol: {error}); the run stands at {at} of "
          f"{cfg.train.steps} steps, submit again to continue", flush=True)
    return EXIT_STOP


def attempt_main(argv: Sequence[str] | None = None) -> int:
    """The in-job commands of the sbatch script: `newest-checkpoint` and `after-attempt` (see the module doc)."""
    parser = argparse.ArgumentParser(prog="python -m moba_train.slurm", description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["newest-checkpoint", "after-attempt"])
    parser.add_argument("--config", required=True)
    parser.add_argument("overrides", nargs="*", metavar="section.key=value")
    parser.add_argument("--started-from", default="")
    parser.add_argument("--signal", default="none")
    parser.add_argument("--exit-code", type=int, default=0)
    parser.add_argument("--max-requeues", type=int, default=SlurmProfile().max_requeues)
    args = parser.parse_intermixed_args(argv)
    cfg = load_config(args.config, args.overrides)
    if args.command == "newest-checkpoint":
        print(_newest_checkpoint(cfg) or "none")
        return 0
    attempt = Attempt(
        attempt=int(os.environ.get("SLURM_RESTART_COUNT", 0)) + 1,
        started_from=None if args.started_from in ("", "none") else args.started_from,  # or PREVIOUS
        ended_at=None,
        signal=None if args.signal == "none" else args.signal,
        exit_code=args.exit_code,
    )
    return after_attempt(cfg, os.environ.get("SLURM_JOB_ID", "local"), attempt, args.max_requeues)


def submit_main(argv: Sequence[str] | None, pretrain: Path) -> None:
    """scripts/submit_slurm.py: parse the command line, check, write and submit (or print) the job."""
    parser = argparse.ArgumentParser(
        prog="submit_slurm.py",
        description="Submit a moba-train run as a SLURM job that requeues itself at its time limit or on preemption.",
    )
    parser.add_argument("--config", required=True, help="recipe YAML, e.g. configs/llama8b_moba.yaml")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="recipe overrides, as pretrain.py")
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--profile", help="cluster profile YAML (configs/slurm/example_profile.yaml)")
    parser.add_argument("--dry-run", action="store_true", help="print the sbatch script; write and submit nothing")
    for name, field in SlurmProfile.model_fields.items():
        if field.annotation in (Optional[int], int):
            kind = int
        elif field.annotation in (Optional[str], str):
            kind = str
        else:
            continue  # lists and mappings live in the profile only
        parser.add_argument(f"--{name.replace('_', '-')}", type=kind, default=None, help=field.description)
    args = parser.parse_intermixed_args(argv)
    profile = load_profile(args.profile)
    given = {name: getattr(args, name) for name in SlurmProfile.model_fields if getattr(args, name, None) is not None}
    try:
        profile = SlurmProfile.model_validate({**profile.model_dump(), **given})
    except ValidationError as err:
        raise ConfigError(_profile_error(err, "command line", as_flag=True)) from None
    job = plan_job(args.config, args.overrides, args.nodes, profile, pretrain)
    submit(job, dry_run=args.dry_run)


if __name__ == "__main__":
    from moba_train.cli import run_entry

    run_entry(lambda: sys.exit(attempt_main()))
