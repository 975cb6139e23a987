"""The quality study of docs/quality.md, run end to end on one GPU within a time budget.

    python scripts/run_study.py --work-dir runs/study --results-dir bench/results/quality --budget-minutes 8.5

Stages, in this order; each one's results are saved before the next starts, and a rerun with the same
--work-dir skips the stages already done (an interrupted training resumes from its checkpoint):

    calibrate      8 steps of the MoBA and the full recipe (on the synthetic task: no corpus needed):
                   seconds per step and per-stage overhead; first, so that a machine that cannot train
                   fails within a minute
    corpus         moba_train.data.corpus over every installed package: 32K BPE, packages held out
    (plan)         the steps of every arm, sized to the time left (once; kept in the state) unless
                   --tokens-per-arm fixes them; the calibration decides which stages still fit
    short          with --short-tokens: a start shared by arms 1-3, the same model trained on short
                   sequences (512 tokens) of copy and passkey documents, where copying forms within
                   hundreds of steps (at 8K it did not form in 1,040: docs/quality.md). Full attention: at
                   512 tokens and blocks of 512, MoBA is full attention, so the start is every arm's own.
                   Arms 1-3 start from its weights (arms 4 and 5 through arm 1); it is evaluated too
    full           arm 1, full attention, S steps (its checkpoint at S/2 is kept for arm 4)
    moba           arm 2, MoBA (block 512, top-3), S steps
    hybrid         arm 3, MoBA with the last 2 layers full, S steps
    cpt            arm 4, arm 1's checkpoint at S/2 resumed with MoBA to S (same schedule and data order)
    recall_full, recall_moba, recall_hybrid
                   arm 5, arm 1's final weights fine-tuned on the synthetic recall task with the loss on
                   the answers only, R = S * recall_fraction steps each
    recall_hybrid_probed
                   (by name only) arm 5 with the hybrid's full layers where arm 1's final weights copy:
                   the trainer's own probe (attention.full_layers_at=probe) of the model it starts from
    swap           arm 1 evaluated with MoBA and arm 2 with full attention (only if time is left)
    moba_eval_topkK
                   arm 2 evaluated with twice its top-k (K = 6 for the recipe's 3), if time is left: how
                   much of MoBA's gap to full attention the blocks its gate leaves out explain

Every arm is evaluated right after it trains (moba_train.evaluation): validation loss on the held-out
packages, loss by position on held-out documents of at least 8K tokens (the trailing-token loss is the
last 1K), passkey accuracy by context length and depth; the recall arms, recall accuracy. Training runs
in this process (moba_train.training.train), so the one-time costs (CUDA and Triton start-up) are paid
once. A stage that would not finish before the deadline is not started.

Outputs. <work-dir>/study.json is the state (plan, stage records, results); after every stage it is
copied to <results-dir>/study.json together with study.md (the result tables); when the run ends (or
is stopped by a signal) the plots follow: loss_by_position.png, passkey.png, training_loss.png (they
take seconds each; `write_plots(json.load(open("study.json")), out_dir)` redraws them from a copy).
Five files at most, so they fit what a device call brings back.
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import json
import math
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from moba_train.config import Config, ConfigError, load_config
from moba_train.distributed import resolve_device
from moba_train.evaluation import (
    EvalSettings,
    plot_loss_by_position,
    plot_passkey,
    save_figure,
)
from moba_train.metrics import attention_backends
from moba_train.model import compute_dtype
from moba_train.signals import StopSignal
from moba_train.staging import write_json, write_text

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "configs" / "study"
CALIBRATION_STEPS = 8
SAFETY = 0.85
"""The plan fills this share of the time left after calibration (estimates are rough)."""
MIN_STEPS = 10


@dataclass(frozen=True)
class Arm:
    """One training run of the study: a recipe of configs/study plus overrides."""

    name: str
    recipe: str
    overrides: tuple[str, ...]
    title: str


FULL = Arm("full", "pretrain.yaml", ("attention.mode=full",), "1 full attention")
MOBA = Arm("moba", "pretrain.yaml", ("attention.mode=moba", "attention.full_layers=0"), "2 MoBA")
HYBRID = Arm("hybrid", "pretrain.yaml", ("attention.mode=moba", "attention.full_layers=2"), "3 hybrid (last 2 full)")
PROBED = Arm("hybrid_probed", "pretrain.yaml", HYBRID.overrides, "3 hybrid (probed full layers)")
"""The hybrid with as many full layers, placed where the shared start copies most (stage short_probe,
moba_train.induction) instead of last: the layer kinds are set once that stage has run."""
CPT = Arm("cpt", "pretrain.yaml", ("attention.mode=moba", "attention.full_layers=0"),
          "4 full, then MoBA for the second half")
RECALL_PROBED = Arm("recall_hybrid_probed", "recall.yaml", (*HYBRID.overrides, "attention.full_layers_at=probe"),
                    "5 sparse-loss recall, hybrid_probed")
"""Arm 5 with the hybrid's full layers placed by the trainer's probe of arm 1's final weights, the model it starts
from: what `attention.full_layers_at=probe` gives a user who converts a trained model and fine-tunes it with the
loss on a few tokens. Does the probed layout keep what the last full layers give sparse-loss training?"""
RECALL = (*(Arm(f"recall_{arm.name}", "recall.yaml", arm.overrides, f"5 sparse-loss recall, {arm.name}")
            for arm in (FULL, MOBA, HYBRID)), RECALL_PROBED)
PRETRAIN_ARMS = (FULL, MOBA, HYBRID, PROBED, CPT)
ARMS = PRETRAIN_ARMS + RECALL
BY_NAME_ONLY = (PROBED, RECALL_PROBED)
DEFAULT_ARMS = tuple(arm.name for arm in ARMS if arm not in BY_NAME_ONLY)
"""The issue's arms 1-5, what a run without --arms trains; the probed hybrids are asked for by name."""
SHORT = Arm("short", "pretrain.yaml", ("attention.mode=full", "attention.full_layers=0"),
            "0 shared start (short sequences)")
"""The shared start (--short-tokens): not an arm of its own, the first part of arms 1-3 (and the probed hybrid)."""
FROM_SHORT = (FULL, MOBA, HYBRID, PROBED)


@dataclass(frozen=True)
class StudySettings:
    """Everything a run of the study is parameterised by (scripts/run_study.py's flags)."""

    work_dir: Path
    results_dir: Path
    budget_s: float
    tokens_per_arm: int | None = None
    """None: sized from the calibration to fill the budget."""
    recall_fraction: float = 0.25
    arms: tuple[str, ...] = DEFAULT_ARMS
    overrides: tuple[str, ...] = ()
    """Applied to every arm's recipe (e.g. a smaller model for a CPU smoke run)."""
    corpus_mb: float = 96.0
    corpus_site_packages: bool = True
    vocab_size: int = 32768
    valid_fraction: float = 0.03
    tokenizer_mb: float = 24.0
    workers: int = os.cpu_count() or 1
    eval_windows: int = 64
    bucket_size: int = 1024
    passkey_lengths: tuple[int, ...] = (2048, 4096, 8192)
    passkey_depths: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    passkey_samples: int = 20
    recall_documents: int = 32
    copy_documents: int = 32
    """Held-out copy documents scored per pretraining arm whose recipe mixes copies (data.copy_mix)."""
    eval_batch_size: int = 4
    gate_recall_queries: int = 16
    """Positions per bucket of the long documents at which a MoBA arm's gate recall is measured (0: none)."""
    short_tokens: int = 0
    """Tokens of the shared start on short sequences (0: none; the arms start from random weights)."""
    short_seq_length: int = 512
    probe_sequences: int = 16
    """Sequences of repeated random tokens the shared start's induction probe (stage short_probe) averages over."""
    short_mix: tuple[tuple[str, float], ...] = (("copy_mix", 0.5), ("passkey_mix", 0.25), ("recall_mix", 0.0))
    """The shared start's training mix (data.* shares; the rest is text)."""
    track_passkey: int = 0
    """Passkey prompts of the in-training retrieval check (`train.eval_passkey`, over the held-out packages) at
    every eighth of arms 1-4's steps, kept as each arm's `retrieval_curve`; 0: off. It does not change what
    trains, so such runs pool with others."""


class StudyInterrupted(Exception):
    """A stop signal (SIGTERM, SIGUSR1, SIGINT) arrived, or a training stopped before its last step: save and stop."""


def _yaml(path: Path) -> str:
    """A path as an override value (JSON is YAML: quoted, whatever characters it holds)."""
    return json.dumps(str(path))


def git_commit() -> str | None:
    """GIT_COMMIT, else the checkout's HEAD (a copied tree may carry a stale .git: set GIT_COMMIT there)."""
    if os.environ.get("GIT_COMMIT"):
        return os.environ["GIT_COMMIT"]
    try:
        result = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    except OSError:  # no git on the machine
        return None
    return result.stdout.strip() or None


def recipe_hashes() -> dict[str, str]:
    """SHA-256 of each study recipe this run trains from (scripts/pool_study.py pools only runs that agree)."""
    return {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in sorted(RECIPES.glob("*.yaml"))}


def machine() -> dict:
    import torch

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return {"gpu": gpu, "torch": torch.__version__, "python": platform.python_version(), "cpus": os.cpu_count()}


def pretrain_step_seconds(step_s: dict[str, float], num_layers: int, full_layers: int) -> float:
    """Seconds per step of a hybrid: the MoBA step plus the full layers' share of the difference."""
    return step_s["moba"] + (step_s["full"] - step_s["moba"]) * full_layers / num_layers


def plan_steps(remaining_s: float, step_s: dict[str, float], overhead_s: float, eval_s: float, num_layers: int,
               recall_fraction: float) -> int:
    """The most steps S per pretraining arm (even: arm 4 switches at S/2) whose whole study fits in
    SAFETY * remaining_s: three arms of S steps, arm 4's S/2 MoBA steps, three recall arms of
    S * recall_fraction steps, a training overhead and an evaluation per arm. ConfigError if S < MIN_STEPS."""
    hybrid = pretrain_step_seconds(step_s, num_layers, 2)
    per_step = (step_s["full"] + step_s["moba"] + hybrid + 0.5 * step_s["moba"]
                + recall_fraction * (step_s["full"] + step_s["moba"] + hybrid))
    fixed = len(DEFAULT_ARMS) * (overhead_s + eval_s)
    steps = int((SAFETY * remaining_s - fixed) / per_step) // 2 * 2
    if steps < MIN_STEPS:
        raise ConfigError(f"the budget leaves {remaining_s:.0f} s after calibration, too little for {MIN_STEPS} "
                          f"steps per arm ({per_step:.1f} s per step of all arms, {fixed:.0f} s fixed); "
                          "raise --budget-minutes")
    return steps


class Study:
    """The stages above over one work directory; `run()` does what is not done yet and fits the budget."""

    def __init__(self, settings: StudySettings):
        self.s = settings
        self.deadline = time.monotonic() + settings.budget_s
        self.work = Path(settings.work_dir)
        self.state_path = self.work / "study.json"
        self.state = json.loads(self.state_path.read_text()) if self.state_path.is_file() else {
            "study": "moba-train quality study (docs/quality.md)", "stages": {}, "arms": {}}
        recipes = recipe_hashes()
        self._check_resume(recipes)
        for arm in (SHORT, *(arm for arm in ARMS if arm.name in settings.arms)):
            self.config(arm, MIN_STEPS)  # an override that does not fit a recipe: one error now, not a failed stage
        self.state["commit"] = git_commit()
        self.state["machine"] = machine()
        self.state["recipes"] = recipes
        self.state["settings"] = {k: (str(v) if isinstance(v, Path) else v)
                                  for k, v in dataclasses.asdict(settings).items()}

    def _check_resume(self, recipes: dict) -> None:
        """A work directory's done stages were trained with its recipes and overrides: resuming it with
        others would pair arms trained differently (session 14's second call, SEED=3456, skipped the start
        and arm 1 done at seed 1234 and trained only arms 3-4 at 3456), so that is refused."""
        done = [name for name, rec in self.state["stages"].items() if rec.get("status") == "done"]
        if not done:
            return
        before = list(self.state.get("settings", {}).get("overrides", []))
        if before != list(self.s.overrides):
            raise ConfigError(
                f"{self.work} holds stages ({', '.join(done)}) trained with the overrides {before}, not "
                f"{list(self.s.overrides)}; rerun with those overrides or give a new --work-dir")
        changed = sorted(name for name, digest in self.state.get("recipes", recipes).items()
                         if recipes.get(name) != digest)
        if changed:
            raise ConfigError(
                f"{self.work} holds stages ({', '.join(done)}) trained with other versions of "
                f"{', '.join(changed)}; restore those recipes or give a new --work-dir")

    # --- bookkeeping ---------------------------------------------------------------------------

    @property
    def corpus_dir(self) -> Path:
        return self.work / "corpus"

    def arm_dir(self, name: str) -> Path:
        return self.work / "arms" / name

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def save(self, plots: bool = False) -> None:
        """The state to <work>/study.json, then study.json, study.md (and the plots) to the results dir."""
        self.state["targets"] = targets(self.state)
        write_json(self.state_path, self.state)
        results = Path(self.s.results_dir)
        write_json(results / "study.json", self.state)
        write_text(results / "study.md", summary_markdown(self.state))
        if plots:
            write_plots(self.state, results)

    def done(self, stage: str) -> bool:
        return self.state["stages"].get(stage, {}).get("status") == "done"

    def stage(self, name: str, estimate_s: float, work: Callable[[], dict | None], needs: tuple[str, ...] = ()) -> None:
        """Run `work` as stage `name` unless done, blocked by a stage it needs, or unable to finish in time."""
        if self.done(name):
            print(f"[study] {name}: done earlier", flush=True)
            return
        record = {"estimate_s": round(estimate_s, 1)}
        missing = [n for n in needs if not self.done(n)]
        if missing:
            record["status"] = f"not run: needs {', '.join(missing)}"
        elif estimate_s > self.remaining():
            record["status"] = (f"not run: needs about {estimate_s:.0f} s, {max(self.remaining(), 0):.0f} s left; "
                                "rerun with the same --work-dir to continue")
        if "status" in record:
            print(f"[study] {name}: {record['status']}", flush=True)
            self.state["stages"][name] = record
            self.save()
            return
        print(f"[study] {name}: starting (about {estimate_s:.0f} s, {self.remaining():.0f} s left)", flush=True)
        started = time.monotonic()
        record["status"] = "interrupted: rerun with the same --work-dir to continue"  # until it ends
        try:
            result = work()
            record.update(status="done", **(result or {}))
        except StudyInterrupted:
            raise
        except Exception as exc:  # a failed arm must not lose the others' results
            record.update(status=f"failed: {type(exc).__name__}: {exc}",
                          traceback=traceback.format_exc().splitlines()[-12:])
        finally:
            record["seconds"] = round(time.monotonic() - started, 1)
            self.state["stages"][name] = record
            _release_memory()
            self.save()
            print(f"[study] {name}: {record['status']} in {record['seconds']:.0f} s", flush=True)

    # --- recipes ---------------------------------------------------------------------------------

    def config(self, arm: Arm, steps: int, extra: tuple[str, ...] = ()) -> Config:
        corpus = self.corpus_dir
        common = (
            f"run.output_dir={_yaml(self.arm_dir(arm.name))}",
            f"data.blend=[{_yaml(corpus / 'python')}]",
            f"data.tokenizer={_yaml(corpus / 'tokenizer')}",
            f"data.cache_dir={_yaml(self.work / 'data_cache')}",
            f"train.steps={steps}",
            f"train.warmup_steps={max(1, steps // 10)}",
        )
        if arm is PROBED and "probe" in self.state:
            extra = (f"attention.layer_kinds=[{','.join(self.state['probe']['layer_kinds'])}]", *extra)
        return load_config(RECIPES / arm.recipe, [*arm.overrides, *common, *self.s.overrides, *extra])

    def tracking(self, steps: int) -> tuple[str, ...]:
        """--track-passkey's overrides of a pretraining arm of `steps` (not of the calibration, which trains on
        the synthetic task, nor of the shared start): the check at every eighth, on the held-out packages."""
        if not self.s.track_passkey:
            return ()
        return (f"data.valid_blend=[{_yaml(self.corpus_dir / 'python_valid')}]",
                f"train.eval_passkey={self.s.track_passkey}", f"train.eval_interval={max(1, steps // 8)}",
                "train.eval_steps=1")

    def short_overrides(self) -> tuple[str, ...]:
        """The shared start's recipe changes: short sequences, as many per step as keep the pretraining
        arms' tokens per step (and per micro-batch: the same activation memory), its own mix, one checkpoint."""
        plan, base = self.state["plan"], self.config(FULL, MIN_STEPS).train
        seq = plan["short_seq_length"]
        batch = max(1, plan["tokens_per_step"] // seq)
        micro = max(1, min(batch, base.micro_batch_size * base.seq_length // seq))
        while batch % micro:
            micro -= 1
        return (f"train.seq_length={seq}", f"train.global_batch_size={batch}", f"train.micro_batch_size={micro}",
                *(f"data.{key}={share}" for key, share in plan["short_mix"].items()),
                f"checkpoint.interval={plan['short_steps']}", "checkpoint.keep_last=1")

    # --- stages ----------------------------------------------------------------------------------

    def build_corpus(self) -> dict:
        from moba_train.data.corpus import build_corpus

        manifest = build_corpus(
            self.corpus_dir, vocab_size=self.s.vocab_size, max_bytes=int(self.s.corpus_mb * 2**20),
            include_site_packages=self.s.corpus_site_packages, valid_fraction=self.s.valid_fraction,
            tokenizer_bytes=int(self.s.tokenizer_mb * 2**20), workers=self.s.workers, progress=False,
        )
        manifest = manifest or json.loads((self.corpus_dir / "manifest.json").read_text())
        self.state["corpus"] = manifest
        return {}

    def calibrate(self) -> dict:
        """Seconds per step (median of steps 3..8) of the MoBA and the full recipe, and a training stage's
        other seconds (start-up, data, checkpoints) from the full run: it goes second, so the one-time
        costs (CUDA start-up, compiling the Triton kernels) are not counted as every stage's. On the
        synthetic task (no corpus needed yet): the same model, sequences and attention cost per step."""
        measured = {}
        for arm in (MOBA, FULL):
            out = self.work / "calibrate" / arm.name
            shutil.rmtree(out, ignore_errors=True)
            cfg = self.config(arm, CALIBRATION_STEPS, (f"run.output_dir={_yaml(out)}", "data.kind=synthetic",
                                                            "data.passkey_mix=0", "data.recall_mix=0",
                                                            "data.copy_mix=0"))
            started = time.monotonic()
            records = self.train(cfg)
            wall = time.monotonic() - started
            steps = [r["perf/step_time_s"] for r in records]
            measured[arm.name] = {"step_s": statistics.median(steps[2:]), "overhead_s": wall - sum(steps),
                                  "tokens_per_s": statistics.median(r["perf/tokens_per_s"] for r in records[2:])}
            shutil.rmtree(out, ignore_errors=True)  # our own scratch run: a 2 GB checkpoint
        self.state["calibration"] = measured
        return {}

    def make_plan(self) -> None:
        cfg = self.config(FULL, MIN_STEPS)
        tokens_per_step = cfg.train.global_batch_size * cfg.train.seq_length
        short_steps = self.short_steps(tokens_per_step)
        if self.s.tokens_per_arm is not None:
            steps = max(2, self.s.tokens_per_arm // tokens_per_step // 2 * 2)
        else:
            cal = self.state["calibration"]
            step_s = {name: cal[name]["step_s"] for name in ("full", "moba")}
            short_s = 0.0  # the shared start at the full recipe's seconds per step: an over-estimate (shorter
            if short_steps:  # sequences, cheaper attention), plus a stage and an evaluation
                short_s = cal["full"]["overhead_s"] + self.eval_estimate() + short_steps * step_s["full"]
            steps = plan_steps(self.remaining() - short_s, step_s, cal["full"]["overhead_s"], self.eval_estimate(),
                               cfg.model.num_layers, self.s.recall_fraction)
        recall_steps = max(2, math.ceil(steps * self.s.recall_fraction))
        moba = self.config(MOBA, MIN_STEPS)
        device = resolve_device(moba)
        backend = attention_backends(moba, device, compute_dtype(moba, device))["moba"]
        self.state["plan"] = {
            "steps": steps, "recall_steps": recall_steps, "tokens_per_step": tokens_per_step,
            "tokens_per_arm": steps * tokens_per_step, "recall_tokens": recall_steps * tokens_per_step,
            "seq_length": cfg.train.seq_length, "global_batch_size": cfg.train.global_batch_size,
            "moba_backend": backend,
        }
        if short_steps:
            self.state["plan"].update(short_steps=short_steps, short_seq_length=self.s.short_seq_length,
                                      short_tokens=short_steps * tokens_per_step, short_mix=dict(self.s.short_mix))
        print(f"[study] plan: {json.dumps(self.state['plan'])}", flush=True)
        if device.type == "cuda" and backend != "triton":
            print(f"[study] warning: MoBA layers run on the {backend!r} backend, not the Triton kernels (does "
                  "moba_train.kernels import? `pip install --no-deps --no-build-isolation -e .`): losses are "
                  "comparable, MoBA's tokens/s are not", flush=True)

    def short_steps(self, tokens_per_step: int) -> int:
        """Steps of the shared start: none unless asked for and one of the arms that start from it runs."""
        if not self.s.short_tokens or not any(arm.name in self.s.arms for arm in FROM_SHORT):
            return 0
        return max(1, self.s.short_tokens // tokens_per_step)

    def starts_from_short(self, arm: Arm) -> bool:
        """Whether `arm` starts from the shared start's weights (the plan has one and the arm is 1-3 or the probed
        hybrid)."""
        return arm in FROM_SHORT and bool(self.state["plan"].get("short_steps"))

    def eval_estimate(self) -> float:
        """Seconds for one evaluation: the longest so far, else model loading (half a training stage's
        overhead) plus the evaluation tokens' forward passes at a third of a training token's time."""
        measured = [rec["seconds"] for name, rec in self.state["stages"].items()
                    if name.endswith("_eval") and rec.get("status") == "done"]
        if measured:
            return max(measured)
        cal = self.state["calibration"]
        s = self.s
        cfg = self.config(FULL, MIN_STEPS)
        tokens = 2 * s.eval_windows * cfg.train.seq_length + sum(s.passkey_lengths) * len(s.passkey_depths) \
            * s.passkey_samples
        per_token = cal["full"]["step_s"] / (cfg.train.global_batch_size * cfg.train.seq_length) / 3
        return cal["full"]["overhead_s"] / 2 + tokens * per_token

    def probe_short(self) -> dict:
        """Where the shared start copies: the induction scores of its layers on repeated random tokens within its
        own sequence length, and the hybrid's full layers placed at the best ones (`induction.probed_layer_kinds`)."""
        from moba_train.induction import probe_model

        self.state["probe"] = probe_model(self.arm_dir(SHORT.name) / "checkpoints",
                                          self.config(HYBRID, MIN_STEPS).attention.full_layers,
                                          sequences=self.s.probe_sequences, batch_size=self.s.eval_batch_size)
        return {}

    def train(self, cfg: Config) -> list[dict]:
        """Train `cfg` in this process; its metrics.jsonl records. StudyInterrupted if it stopped early."""
        from moba_train.checkpointing import checkpoint_dir, latest_checkpoint
        from moba_train.metrics import read_jsonl
        from moba_train.training import train

        received = train(cfg)
        latest = latest_checkpoint(checkpoint_dir(cfg))
        if latest is None or int(latest.name.removeprefix("step_")) < cfg.train.steps:
            raise StudyInterrupted(f"training of {cfg.run.output_dir} stopped before step {cfg.train.steps}")
        if received is not None:  # during the last step or the final save: trained, but stop here
            raise StudyInterrupted(f"signal {received.name} during the training of {cfg.run.output_dir}")
        return read_jsonl(Path(cfg.run.output_dir) / "metrics.jsonl")

    def train_arm(self, arm: Arm) -> dict:
        plan = self.state["plan"]
        if arm is SHORT:
            cfg = self.config(arm, plan["short_steps"], self.short_overrides())
        elif arm in RECALL:
            cfg = self.config(arm, plan["recall_steps"], (
                f"checkpoint.init_from={_yaml(self.arm_dir(FULL.name) / 'checkpoints')}", "checkpoint.keep_last=1",
                f"checkpoint.interval={plan['recall_steps']}"))
        else:  # arm 1 keeps its checkpoint at S/2 for arm 4; the others save only at the end
            saving = arm1_checkpointing(plan["steps"]) if arm is FULL else (
                f"checkpoint.interval={plan['steps']}", "checkpoint.keep_last=1")
            start = (f"checkpoint.init_from={_yaml(self.arm_dir(SHORT.name) / 'checkpoints')}",) \
                if self.starts_from_short(arm) else ()
            cfg = self.config(arm, plan["steps"], (*saving, *start, *self.tracking(plan["steps"])))
        if arm is CPT:
            self.start_from_half_of_full(cfg)
        records = self.train(cfg)
        if arm is FULL:
            keep_half_and_last(cfg, plan["steps"])
        kinds, probe = trained_layer_kinds(cfg)
        device = resolve_device(cfg)
        steady = records[2:] or records
        tokens_per_step = cfg.train.global_batch_size * cfg.train.seq_length  # the shared start's may differ
        summary = {
            "steps": cfg.train.steps, "tokens": cfg.train.steps * tokens_per_step,
            "seq_length": cfg.train.seq_length, "init_from": cfg.checkpoint.init_from,
            "steps_this_run": len(records), "layer_kinds": kinds,
            "attention_backends": attention_backends(cfg, device, compute_dtype(cfg, device)),
            "tokens_per_s": tokens_per_step * len(steady) / sum(r["perf/step_time_s"] for r in steady),
            "final_train_loss": records[-1]["train/loss"],
            "loss_curve": [[r["step"], round(r["train/loss"], 4)] for r in records],
        }
        if probe is not None:
            summary["probe"] = probe
        if any("val/passkey_loss" in r for r in records):  # --track-passkey: [step, key loss, found share]
            summary["retrieval_curve"] = [[r["step"], round(r["val/passkey_loss"], 4), r["val/passkey_found"]]
                                          for r in records if "val/passkey_loss" in r]
        self.state["arms"].setdefault(arm.name, {})["train"] = summary
        return {}

    def start_from_half_of_full(self, cfg: Config) -> None:
        """Arm 4's checkpoint directory starts with arm 1's checkpoint at S/2 (hard links: read-only use)."""
        from moba_train.checkpointing import checkpoint_dir, latest_checkpoint, step_path

        target = checkpoint_dir(cfg)
        if latest_checkpoint(target) is not None:
            return  # resuming arm 4 itself
        half = step_path(self.arm_dir(FULL.name) / "checkpoints", self.state["plan"]["steps"] // 2)
        if not half.is_dir():
            raise ConfigError(f"arm 1's checkpoint at half the steps ({half}) is missing; rerun arm 1 (delete its "
                              "directory) to produce it")
        target.mkdir(parents=True, exist_ok=True)
        shutil.copytree(half, step_path(target, self.state["plan"]["steps"] // 2), copy_function=os.link)

    def evaluate_arm(self, arm: Arm, overrides: tuple[str, ...] = (), key: str = "eval") -> dict:
        from moba_train.distributed import destroy_distributed
        from moba_train.evaluation import evaluate, load_model

        s = self.s
        try:
            loaded = load_model(self.arm_dir(arm.name) / "checkpoints", overrides)
            cfg = loaded.config
            recall = arm in RECALL
            seq, bucket, passkey_lengths = cfg.train.seq_length, s.bucket_size, () if recall else s.passkey_lengths
            if arm is SHORT:  # its own length, and the longer ones the arms train for: does it carry over?
                bucket = min(bucket, seq)
                passkey_lengths = (seq, *(length for length in s.passkey_lengths if length > seq))
            settings = EvalSettings(
                seq_length=seq, windows=s.eval_windows, bucket_size=bucket,
                trailing_tokens=bucket, passkey_lengths=passkey_lengths,
                passkey_depths=s.passkey_depths, passkey_samples=s.passkey_samples,
                # pretraining arms: the recall task they were mixed (data.recall_mix), if any
                recall_documents=s.recall_documents if recall or cfg.data.recall_mix else 0,
                copy_documents=0 if recall or not cfg.data.copy_mix else s.copy_documents,
                gate_recall_queries=s.gate_recall_queries, batch_size=s.eval_batch_size)
            result = evaluate(loaded, settings, None if recall else self.corpus_dir / "python_valid",
                              self.corpus_dir / "tokenizer")
        finally:  # the next training starts its own set-up
            destroy_distributed()
        self.state["arms"].setdefault(arm.name, {})[key] = result
        return {}

    # --- the whole study ---------------------------------------------------------------------------

    def run(self) -> list[str]:
        """Run what is left; the names of the stages that failed (their errors are in the state)."""
        # the trainer's stop signals (SLURM's time-limit warning SIGUSR1 too), outside the trainings as well
        previous = {sig: signal.signal(sig, _interrupt) for sig in StopSignal.handled()}
        try:
            self._run()
        except StudyInterrupted as stop:
            print(f"[study] stopped: {stop}; rerun with the same --work-dir to continue", flush=True)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self.save(plots=True)
        return [name for name, rec in self.state["stages"].items() if rec["status"].startswith("failed")]

    def _run(self) -> None:
        wanted = [arm for arm in ARMS if arm.name in self.s.arms]
        # Calibration first: it needs no corpus, and two trainings in this process fail fast if anything
        # about this machine does. It runs even when the tokens are given: stage estimates need it.
        self.stage("calibrate", 0.0, self.calibrate)
        self.stage("corpus", 0.0, self.build_corpus)
        if not (self.done("calibrate") and self.done("corpus")):
            return
        if "plan" not in self.state:
            self.make_plan()
            self.save()
        plan, cal = self.state["plan"], self.state["calibration"]
        if plan.get("short_steps"):
            self.stage(SHORT.name, self.train_estimate(SHORT, plan, cal), lambda: self.train_arm(SHORT),
                       needs=("corpus",))
            self.stage(f"{SHORT.name}_eval", self.eval_estimate(), lambda: self.evaluate_arm(SHORT),
                       needs=(SHORT.name,))
            if {HYBRID.name, PROBED.name} & set(self.s.arms):
                self.stage(f"{SHORT.name}_probe", 0.0, self.probe_short, needs=(SHORT.name,))
        for arm in wanted:
            needs = ("corpus",) + ((FULL.name,) if arm is CPT or arm in RECALL else ())
            if self.starts_from_short(arm):
                needs += (SHORT.name,)
            if arm is PROBED:
                needs += (f"{SHORT.name}_probe",)
            estimate = self.train_estimate(arm, plan, cal)
            self.stage(arm.name, estimate, lambda arm=arm: self.train_arm(arm), needs=needs)
            self.stage(f"{arm.name}_eval", self.eval_estimate(), lambda arm=arm: self.evaluate_arm(arm),
                       needs=(arm.name,))
        if {FULL.name, MOBA.name} <= set(self.s.arms):
            for arm, mode in ((FULL, "moba"), (MOBA, "full")):
                self.stage(f"{arm.name}_eval_{mode}", self.eval_estimate(),
                           lambda arm=arm, mode=mode: self.evaluate_arm(arm, (f"attention.mode={mode}",),
                                                                        f"eval_{mode}"),
                           needs=(arm.name,))
        if MOBA.name in self.s.arms:  # arm 2 reading twice the blocks: is its gap the blocks its gate leaves out?
            topk = 2 * self.config(MOBA, MIN_STEPS).attention.topk
            self.stage(f"moba_eval_topk{topk}", self.eval_estimate(),
                       lambda: self.evaluate_arm(MOBA, (f"attention.topk={topk}",), f"eval_topk{topk}"),
                       needs=(MOBA.name,))

    def train_estimate(self, arm: Arm, plan: dict, cal: dict) -> float:
        step_s = {name: cal[name]["step_s"] for name in ("full", "moba")}
        overhead = cal["full"]["overhead_s"]
        num_layers = self.config(FULL, MIN_STEPS).model.num_layers
        kind_s = {"full": step_s["full"], "moba": step_s["moba"], "cpt": step_s["moba"], "short": step_s["full"],
                  "hybrid": pretrain_step_seconds(step_s, num_layers, 2)}
        kind = arm.name.removeprefix("recall_").removesuffix("_probed")
        steps = {"cpt": plan["steps"] // 2, "short": plan.get("short_steps", 0)}.get(
            arm.name, plan["recall_steps"] if arm in RECALL else plan["steps"])
        return overhead + steps * kind_s[kind]


def trained_layer_kinds(cfg: Config) -> tuple[list[str], dict | None]:
    """The layer kinds a finished run of `cfg` trained with, and None; where the trainer placed the full layers by
    its probe of the starting weights (attention.full_layers_at: probe), the kinds its last checkpoint's config.yaml
    records and a summary of the probe (run.output_dir/probe.json; None for a run relaunched after it, which
    probed nothing)."""
    from moba_train.checkpointing import checkpoint_dir, latest_checkpoint
    from moba_train.induction import probe_record
    from moba_train.resume import saved_recipe

    if not cfg.probes_full_layers():
        return cfg.layer_kinds(), None
    kinds = saved_recipe(latest_checkpoint(checkpoint_dir(cfg)))["attention.layer_kinds"]
    record = probe_record(cfg)
    if not record.is_file():
        return kinds, None
    placed = json.loads(record.read_text())
    return kinds, {"source": placed["source"], "segment_length": placed["segment_length"],
                   "best_head_per_layer": [layer["max"] for layer in placed["layers"].values()],
                   "copying_layers": placed["copying_layers"], "note": placed["note"]}


def arm1_checkpointing(steps: int) -> tuple[str, ...]:
    """Arm 1's checkpoint overrides: a save at S/2 (arm 4 starts there) and nothing pruned while it trains, so
    that the saves of a stop signal in its second half cannot push S/2 out (`keep_half_and_last` after)."""
    return f"checkpoint.interval={steps // 2}", f"checkpoint.keep_last={steps}"


def keep_half_and_last(cfg: Config, steps: int) -> list[Path]:
    """After arm 1 finished: delete its checkpoints other than S/2 and S (those a stop signal added)."""
    from moba_train.checkpointing import checkpoint_dir, complete_checkpoints, step_path

    root = checkpoint_dir(cfg)
    keep = {step_path(root, steps // 2), step_path(root, steps)}
    extra = [path for path in complete_checkpoints(root) if path not in keep]
    for path in extra:
        shutil.rmtree(path)
    return extra


def _interrupt(signum, frame) -> None:
    raise StudyInterrupted(f"signal {signal.Signals(signum).name}")


def _release_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------
# Results: targets, tables, plots


def _metric(state: dict, arm: str, *path, key: str = "eval"):
    value = state["arms"].get(arm, {}).get(key)
    for part in path:
        if value is None:
            return None
        value = value.get(part) if isinstance(value, dict) else None
    return value


def targets(state: dict) -> dict:
    """The issue's floors against the measured numbers (None where an arm is missing)."""
    def loss(arm):
        return _metric(state, arm, "validation", "loss")

    def passkey_at_trained_length(arm):
        grid = _metric(state, arm, "passkey")
        return None if grid is None else grid["mean_by_length"][-1]

    def recall(arm):
        return _metric(state, arm, "recall", "fact_accuracy")

    out = {}
    # The last pair: the two hybrids of one run start from one start and train on the same batches, so their own
    # paired gap (reported, no floor; no arm 1 needed) says whether placing the full layers by the probe helps.
    for arm, reference, limit in (("moba", "full", 0.01), ("hybrid", "full", 0.005), ("hybrid_probed", "full", 0.005),
                                  ("cpt", "full", 0.01), ("hybrid_probed", "hybrid", None)):
        if loss(arm) is not None and loss(reference) is not None:
            gap = loss(arm) / loss(reference) - 1
            out[f"{arm}_validation_loss_vs_{reference}"] = {
                "relative_gap": gap, "limit": limit, "met": None if limit is None else gap <= limit}
    for arm in ("moba", "hybrid", "hybrid_probed", "cpt"):
        if passkey_at_trained_length(arm) is not None and passkey_at_trained_length("full") is not None:
            out[f"{arm}_passkey_vs_full"] = _accuracy_target(passkey_at_trained_length("full"),
                                                             passkey_at_trained_length(arm), 0.05)
    if recall("recall_full") is not None:
        for arm, limit in (("recall_hybrid", 0.05), ("recall_hybrid_probed", 0.05), ("recall_moba", None)):
            if recall(arm) is not None:
                out[f"{arm}_vs_full"] = _accuracy_target(recall("recall_full"), recall(arm), limit)
    return out


INFORMATIVE_ACCURACY = 0.10
"""Full attention's accuracy below which an accuracy target gives no verdict: when the reference itself
cannot do the task, "within 5 points of it" (0 against 0) says nothing about MoBA."""

RETRIEVAL_ARMS = ("moba", "hybrid", "hybrid_probed", "cpt")
"""Arms whose recall of the mixed task (`data.recall_mix` in their training) is compared with full attention's."""


def retrieval_pairs(state: dict) -> dict[str, tuple[float, float]]:
    """Per arm of RETRIEVAL_ARMS: (its recall of the mixed task's facts, full attention's) where both were measured
    and full attention's is informative. An arm learned no retrieval where its recall is under half of full's
    (`learned_no_retrieval`)."""
    full = _metric(state, "full", "recall", "fact_accuracy")
    if full is None or full < INFORMATIVE_ACCURACY:
        return {}
    pairs = {arm: (_metric(state, arm, "recall", "fact_accuracy"), full) for arm in RETRIEVAL_ARMS}
    return {arm: pair for arm, pair in pairs.items() if pair[0] is not None}


def learned_no_retrieval(arm_recall: float, full_recall: float) -> bool:
    return arm_recall < full_recall / 2


def _accuracy_target(full: float, arm: float, limit: float | None) -> dict:
    gap = full - arm
    record = {"points_below_full": 100 * gap, "limit": None if limit is None else 100 * limit,
              "met": None if limit is None else gap <= limit}
    if full < INFORMATIVE_ACCURACY:
        record["met"] = None
        record["uninformative"] = (f"full attention itself scores {100 * full:.1f}% (under "
                                   f"{100 * INFORMATIVE_ACCURACY:.0f}%): the models are too small or too briefly "
                                   "trained for this task")
    return record


def _fmt(value, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _copy_cell(state: dict, arm: str) -> str:
    copy = _metric(state, arm, "copy")
    if not copy:
        return "-"
    buckets = ", ".join(f"{b['periods'][0]}+: {b['token_accuracy']:.2f}" for b in copy["by_period"])
    return f"{copy['token_accuracy']:.4f} ({buckets})"


def arm_title(state: dict, arm: Arm) -> str:
    """The arm's title with the count of full layers it trained with (its recorded layer kinds): an override such
    as attention.full_layers=3 makes the hybrid "last 3 full", which its default title would misname."""
    kinds = state["arms"].get(arm.name, {}).get("train", {}).get("layer_kinds")
    if not kinds or "moba" not in kinds:
        return arm.title
    if arm in BY_NAME_ONLY:
        full = ", ".join(str(i + 1) for i, kind in enumerate(kinds) if kind == "full")
        return (f"3 hybrid (layers {full} of {len(kinds)} full, probed)" if arm is PROBED
                else f"{arm.title} (layers {full} of {len(kinds)} full, probed on arm 1)")
    return re.sub(r"last \d+ full", f"last {kinds.count('full')} full", arm.title)


def summary_markdown(state: dict) -> str:
    """The result tables of docs/quality.md, from the study state."""
    plan = state.get("plan", {})
    lines = [f"# Quality study results (commit {state.get('commit')}, {state['machine'].get('gpu') or 'CPU'})", "",
             f"Plan: {json.dumps(plan)}", "", "| arm | tokens | tokens/s | val loss | trailing loss (last 1K, "
             "long docs) | passkey at trained length | passkey by depth (trained length) | recall of the mixed "
             "task (facts / tokens) | copy, repeated tokens (by period) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for arm in PRETRAIN_ARMS:
        if arm in BY_NAME_ONLY and arm.name not in state["arms"]:
            continue  # not one of the arms: a row only where it ran
        train = state["arms"].get(arm.name, {}).get("train", {})
        grid = _metric(state, arm.name, "passkey")
        long = _metric(state, arm.name, "long_documents") or _metric(state, arm.name, "validation")
        by_depth = " / ".join(f"{100 * a:.0f}" for a in grid["accuracy"][-1]) if grid else "-"
        lines.append(f"| {arm_title(state, arm)} | {_fmt(train.get('tokens'))} | "
                     f"{_fmt(train.get('tokens_per_s'), 0)} | "
                     f"{_fmt(_metric(state, arm.name, 'validation', 'loss'))} | "
                     f"{_fmt(long and long['trailing_loss'])} | "
                     f"{_fmt(grid and 100 * grid['mean_by_length'][-1], 1)} | {by_depth} | "
                     f"{_fmt(_metric(state, arm.name, 'recall', 'fact_accuracy'))} / "
                     f"{_fmt(_metric(state, arm.name, 'recall', 'token_accuracy'))} | {_copy_cell(state, arm.name)} |")
    by_position = [(arm, _metric(state, arm.name, "long_documents"), _metric(state, arm.name, "gate_recall"))
                   for arm in PRETRAIN_ARMS]
    by_position = [(arm, long, gate) for arm, long, gate in by_position if long]
    if by_position:
        def tokens(n: int) -> str:
            return f"{n // 1024}K" if n and n % 1024 == 0 else str(n)

        edges = " / ".join(f"{tokens(b['start'])}-{tokens(b['end'])}" for b in by_position[0][1]["buckets"])
        lines += ["", f"By position on the long held-out documents ({edges}): the loss, and the share of dense "
                  "attention's mass on the keys MoBA attends (gate recall, %):", "",
                  "| arm | loss by position | gate recall by position |", "| --- | --- | --- |"]
        for arm, long, gate in by_position:
            losses = " / ".join(f"{b['loss']:.3f}" for b in long["buckets"])
            recall = " / ".join(f"{100 * b['gate_recall']:.1f}" for b in gate["buckets"]) if gate else "-"
            lines.append(f"| {arm_title(state, arm)} | {losses} | {recall} |")
    if "train" in state["arms"].get(SHORT.name, {}):
        train = state["arms"][SHORT.name]["train"]
        grid = _metric(state, SHORT.name, "passkey")
        by_length = " / ".join(f"{length}: {100 * a:.0f}"
                               for length, a in zip(grid["lengths"], grid["mean_by_length"])) if grid else "-"
        lines += ["", "Arms 1-3 start from the shared start (arm 4 through arm 1, arm 5 from arm 1's final weights):",
                  "", "| shared start | sequence | tokens | tokens/s | val loss | passkey % by length | copy, repeated "
                  "tokens (by period) | copy, same tokens at first reading |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- |",
                  f"| {SHORT.title} | {train.get('seq_length')} | {_fmt(train.get('tokens'))} | "
                  f"{_fmt(train.get('tokens_per_s'), 0)} | {_fmt(_metric(state, SHORT.name, 'validation', 'loss'))} | "
                  f"{by_length} | {_copy_cell(state, SHORT.name)} | "
                  f"{_fmt(_metric(state, SHORT.name, 'copy', 'first_period_token_accuracy'))} |"]
    if "probe" in state:
        probe = state["probe"]
        probed = arm_title(state, PROBED) if "train" in state["arms"].get(PROBED.name, {}) else "the probed hybrid"
        lines += ["", f"Where the shared start copies (stage short_probe): induction score of each layer's heads on "
                  f"{probe['sequences']} sequences of {probe['segment_length']} random tokens repeated once (best head "
                  f"/ mean of heads); {probed} keeps the best layers full:", "",
                  "| layer | best head | mean | kind in the probed hybrid |", "| --- | --- | --- | --- |"]
        lines += [f"| {int(name.removeprefix('layer_')) + 1} | {rec['max']:.3f} | {rec['mean']:.3f} | {kind} |"
                  for (name, rec), kind in zip(probe["layers"].items(), probe["layer_kinds"])]
    lines += ["", "| arm 5 | tokens | tokens/s | recall (facts) | recall (tokens) | answer loss |",
              "| --- | --- | --- | --- | --- | --- |"]
    for arm in RECALL:
        if arm in BY_NAME_ONLY and arm.name not in state["arms"]:
            continue  # not one of the arms: a row only where it ran
        train = state["arms"].get(arm.name, {}).get("train", {})
        lines.append(f"| {arm_title(state, arm)} | {_fmt(train.get('tokens'))} | "
                     f"{_fmt(train.get('tokens_per_s'), 0)} | "
                     f"{_fmt(_metric(state, arm.name, 'recall', 'fact_accuracy'))} | "
                     f"{_fmt(_metric(state, arm.name, 'recall', 'token_accuracy'))} | "
                     f"{_fmt(_metric(state, arm.name, 'recall', 'answer_loss'))} |")
    probe = state["arms"].get(RECALL_PROBED.name, {}).get("train", {}).get("probe")
    if probe:
        best = ", ".join(f"{x:.3f}" for x in probe["best_head_per_layer"])
        note = f"; {probe['note']}" if probe["note"] else ""
        lines += ["", f"{RECALL_PROBED.name}: the trainer's induction probe of {probe['source']} "
                  f"({probe['segment_length']}-token segments repeated once), best head per layer {best}{note}"]
    lines += ["", "| target | value | limit | met |", "| --- | --- | --- | --- |"]
    for name, t in state.get("targets", {}).items():
        value = t.get("relative_gap", t.get("points_below_full"))
        verdict = f"no verdict: {t['uninformative']}" if "uninformative" in t else _fmt(t["met"])
        lines.append(f"| {name} | {_fmt(value)} | {_fmt(t['limit'])} | {verdict} |")
    pairs = retrieval_pairs(state)
    if pairs:
        lines += ["", "| arm | recall of the mixed task's facts | full attention's | learned retrieval (over half of "
                  "full's) |", "| --- | --- | --- | --- |"]
        lines += [f"| {arm} | {_fmt(a)} | {_fmt(f)} | {'no' if learned_no_retrieval(a, f) else 'yes'} |"
                  for arm, (a, f) in pairs.items()]
    lines += ["", "| stage | status | seconds |", "| --- | --- | --- |"]
    lines += [f"| {name} | {rec['status']} | {_fmt(rec.get('seconds'), 1)} |" for name, rec in state["stages"].items()]
    return "\n".join(lines) + "\n"


def write_plots(state: dict, out_dir: Path) -> None:
    """loss_by_position.png, passkey.png and training_loss.png from the arms evaluated so far."""
    positions = {arm_title(state, arm): _metric(state, arm.name, "long_documents")
                 or _metric(state, arm.name, "validation") for arm in PRETRAIN_ARMS}
    positions = {k: v for k, v in positions.items() if v}
    if positions:
        plot_loss_by_position(positions, out_dir / "loss_by_position.png",
                              "held-out documents of >= 8K tokens (packed windows where none)")
    grids = {arm_title(state, arm): _metric(state, arm.name, "passkey") for arm in PRETRAIN_ARMS}
    grids = {k: v for k, v in grids.items() if v}
    if grids:
        plot_passkey(grids, out_dir / "passkey.png")
    curves = {arm_title(state, arm): state["arms"][arm.name]["train"]["loss_curve"] for arm in (SHORT, *ARMS)
              if "train" in state["arms"].get(arm.name, {})}
    if curves:
        plot_training_loss(curves, out_dir / "training_loss.png")


def plot_training_loss(curves: dict[str, list], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for label, curve in curves.items():
        ax = axes[1] if label.startswith("5") else axes[0]
        steps, losses = zip(*curve)
        ax.plot(steps, losses, label=label, linewidth=1)
    for ax, title in zip(axes, ("pretraining arms: train/loss", "arm 5: loss on the recalled values")):
        ax.set_xlabel("step")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend()
    save_figure(fig, path)
