"""Overhead of the MoBA routing diagnostics on real training: two short runs of one recipe, without
diagnostics and with them every --every steps, timed by the trainer itself (metrics.jsonl:
perf/step_time_s per step, moba/time_s per diagnostic).

    python scripts/bench_diagnostics.py                  # the 1.1B recipe at 32K on one GPU (a few minutes)
    python scripts/bench_diagnostics.py --tiny           # CPU smoke run on the tiny recipe (the test suite runs it)
    python scripts/bench_diagnostics.py --steps 16 --every 4 train.global_batch_size=2

Overhead at an interval I = mean diagnostic time / (I x median step time without diagnostics): the
share of wall time the diagnostics add when they run every I steps (default I: logging.moba_diag_interval).
The first --skip steps of each run (start-up, allocator warm-up) are left out of the medians. Both runs
use synthetic data (no corpus needed), no W&B, no validation, and a temporary output directory.
Writes bench/results/diagnostics-<device>-<commit>.json. On the GPU machine pass the commit (its copy
of the tree may have no or a stale .git): GIT_COMMIT=<sha> python scripts/bench_diagnostics.py
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import tempfile
from pathlib import Path

import torch

from moba_train.config import LoggingConfig, load_config
from moba_train.metrics import read_jsonl
from moba_train.staging import write_text

ROOT = Path(__file__).resolve().parents[1]


def _commit() -> str:
    if os.environ.get("GIT_COMMIT"):
        return os.environ["GIT_COMMIT"][:7]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _run(recipe: Path, overrides: list[str], output_dir: Path) -> list[dict]:
    from moba_train.training import train

    train(load_config(recipe, [*overrides, f"run.output_dir={output_dir}"]))
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return read_jsonl(output_dir / "metrics.jsonl")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", type=Path, default=ROOT / "configs" / "llama1b_moba_32k.yaml")
    parser.add_argument("--steps", type=int, default=12, help="training steps per run")
    parser.add_argument("--every", type=int, default=4, help="diagnostics interval of the run with diagnostics")
    parser.add_argument("--skip", type=int, default=2, help="first steps of each run left out of the medians")
    parser.add_argument("--tiny", action="store_true", help="CPU smoke run: the tiny recipe at 256 tokens")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="extra recipe overrides")
    args = parser.parse_args(argv)
    if args.tiny:
        args.recipe = ROOT / "configs" / "tiny_moba.yaml"
        args.overrides = ["train.seq_length=256", "attention.block_size=32", "train.micro_batch_size=1",
                          "train.global_batch_size=1", *args.overrides]
    common = [f"train.steps={args.steps}", "train.warmup_steps=1", "train.eval_interval=0", "data.kind=synthetic",
              "logging.progress_bar=off", "logging.wandb.mode=disabled", "logging.tensorboard=false",
              f"checkpoint.interval={args.steps}", "checkpoint.keep_last=1", *args.overrides]
    default_interval = LoggingConfig().moba_diag_interval

    with tempfile.TemporaryDirectory(prefix="bench_diagnostics_") as tmp:
        without = _run(args.recipe, [*common, "logging.moba_diag_interval=0"], Path(tmp) / "without")
        with_diag = _run(args.recipe, [*common, f"logging.moba_diag_interval={args.every}"], Path(tmp) / "with")

    def step_times(records):
        return [r["perf/step_time_s"] for r in records if r["step"] > args.skip]

    diag_times = [r["moba/time_s"] for r in with_diag if "moba/time_s" in r]
    step_without = statistics.median(step_times(without))
    step_with = statistics.median(step_times(with_diag))
    diag = statistics.mean(diag_times)
    cfg = load_config(args.recipe, common)
    result = {
        "bench": "diagnostics",
        "commit": _commit(),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "recipe": str(args.recipe.relative_to(ROOT)),
        "overrides": common,
        "tokens_per_step": cfg.train.global_batch_size * cfg.train.seq_length,
        "steps": args.steps,
        "diagnostics_every": args.every,
        "step_time_s_median_without": step_without,
        "step_time_s_median_with": step_with,
        "step_times_s_without": [r["perf/step_time_s"] for r in without],
        "step_times_s_with": [r["perf/step_time_s"] for r in with_diag],
        "diagnostics_time_s": diag_times,
        "default_interval": default_interval,
        "overhead_at_default_interval": diag / (default_interval * step_without),
        "overhead_every_step": diag / step_without,
        "gate_recall": [r["moba/gate_recall"] for r in with_diag if "moba/gate_recall" in r],
    }
    name = f"diagnostics-{'tiny' if args.tiny else result['device'].split()[-1].lower()}-{result['commit']}.json"
    args.out.mkdir(parents=True, exist_ok=True)
    write_text(args.out / name, json.dumps(result, indent=2) + "\n")
    print(f"step time (median) without diagnostics {step_without:.3f} s, with {step_with:.3f} s; one diagnostic "
          f"{diag:.3f} s = {100 * diag / step_without:.1f}% of a step; every {default_interval} steps: "
          f"{100 * result['overhead_at_default_interval']:.3f}% of wall time -> {args.out / name}")


if __name__ == "__main__":
    from moba_train.cli import run_entry

    run_entry(main)  # a recipe too large for this machine is one line, as in pretrain.py
