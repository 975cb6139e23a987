"""Training-step benchmark: timed optimizer steps of a recipe, one or several arms in the same process
(e.g. MoBA against full attention on the same model, sequence length, batch and recompute), following
../shared/BENCH.md's training protocol (moba_train/benchmarking.py). Prints a table and writes JSON.

    python scripts/bench_train.py --config configs/llama1b_moba_32k.yaml data.kind=synthetic \\
        --arm moba: --arm full:attention.mode=full --profile
    python scripts/bench_train.py --config configs/tiny_moba.yaml data.kind=synthetic --arm moba: --steps 2 --warmup 1
        # a CPU smoke run (the test suite runs one)
    python scripts/bench_train.py --table bench/results/train-*.json   # a Markdown table of committed results

Each arm is NAME:OVERRIDES (comma-separated section.key=value, applied after the common ones). The arm
named `full` (if any) is the reference of the speed-up column; with --profile the table also gives the
Amdahl bound of each MoBA arm (the speed-up if the attention of its MoBA layers cost nothing).
On the GPU machine pass the commit: GIT_COMMIT=<sha> python scripts/bench_train.py ...
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import os
import subprocess
import sys
from pathlib import Path

from moba_train.cli import run_entry
from moba_train.config import ConfigError, load_config
from moba_train.staging import write_text


def _commit() -> str:
    if os.environ.get("GIT_COMMIT"):
        return os.environ["GIT_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["--table"]:  # the README's training table from committed results
        print(markdown_table([json.loads(Path(path).read_text()) for path in argv[1:]]))
        return
    parser.add_argument("--config", required=True, help="recipe YAML")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="applied to every arm")
    parser.add_argument("--arm", action="append", required=True, metavar="NAME:OVERRIDES")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--profile", action="store_true", help="one more step under the profiler: time breakdown")
    parser.add_argument("--diagnostics", action="store_true",
                        help="time one routing-diagnostics pass: its overhead at logging.moba_diag_interval")
    parser.add_argument("--out", help="JSON path (default bench/results/train-<gpu>-<commit>-<time>.json)")
    args = parser.parse_args(argv)
    arms = []
    for spec in args.arm:
        name, sep, extra = spec.partition(":")
        if not sep or not name:
            raise ConfigError(f"--arm {spec!r} is not NAME:OVERRIDES (e.g. full:attention.mode=full, or moba:)")
        overrides = [*args.overrides, *[o for o in extra.split(",") if o]]
        arms.append((name, overrides, load_config(args.config, overrides)))  # every arm valid before any runs

    import torch

    from moba_train.benchmarking import run_arm

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    meta = dict(commit=_commit(), gpu=gpu, torch=torch.__version__, recipe=args.config,
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                protocol=dict(warmup=args.warmup, steps=args.steps))
    out = Path(args.out or f"bench/results/train-{gpu.replace(' ', '_')}-{meta['commit'][:7]}-"
                           f"{meta['date'].replace(':', '')}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    results, failed = [], []
    for name, overrides, cfg in arms:
        try:
            results.append(run_arm(cfg, name, overrides, args.warmup, args.steps, args.profile, args.diagnostics))
        except torch.OutOfMemoryError as error:  # one arm too large must not lose the others
            failed.append(dict(name=name, overrides=overrides, error=f"out of memory: {str(error).splitlines()[0]}"))
            print(f"{name}: out of memory", flush=True)
            _write(out, meta, _records(results) + failed)
            continue
        finally:
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        r = results[-1]
        print(f"{name}: {r.tokens_per_s:,.0f} tokens/s, median step {r.median_step_s:.3f} s, "
              f"{r.tflops_per_gpu:.1f} TFLOP/s/GPU" + (f", MFU {100 * r.mfu:.1f}%" if r.mfu is not None else "")
              + (f", peak {r.peak_allocated_gib:.1f} GiB" if r.peak_allocated_gib is not None else ""), flush=True)
        if r.diagnostics_s is not None:
            print(f"  routing diagnostics {r.diagnostics_s:.3f} s: {100 * r.diagnostics_overhead:.2f}% of step time "
                  f"at logging.moba_diag_interval={cfg.logging.moba_diag_interval}", flush=True)
        if r.breakdown_s:
            print("  breakdown (s): " + ", ".join(f"{k} {v:.3f}" for k, v in r.breakdown_s.items()), flush=True)
        _write(out, meta, _records(results) + failed)  # after every arm: a stopped run keeps what it measured
    for record in _records(results):
        if "speedup_vs_full" in record:
            print(f"{record['name']} / full: {record['speedup_vs_full']:.2f}x"
                  + (f" (Amdahl bound {record['amdahl_bound_vs_full']:.2f}x)"
                     if record.get("amdahl_bound_vs_full") else ""), flush=True)
    print(f"wrote {out}")


def markdown_table(runs: list[dict]) -> str:
    """One row per arm of the given result files (bench_train's JSON): the README's training table, the tokens of
    a step as sequences x length. A file without a `full` arm takes the one of another file of the same commit,
    sequence length and tokens per step."""
    lines = ["| run (commit) | arm | tokens / step | attention | recompute | tokens/s | MFU | peak GiB | vs full "
             "| Amdahl bound |", "|---|---|---|---|---|---|---|---|---|---|"]
    from moba_train.benchmarking import amdahl_bound

    def same(run, arm):  # the arms one full arm serves: one commit, length and batch (tokens per step)
        return run["meta"]["commit"], arm["seq_length"], arm["tokens_per_step"]

    fulls = {same(run, a): a for run in runs for a in run["arms"] if a["name"] == "full" and "error" not in a}
    for run in runs:
        own = next((a for a in run["arms"] if a["name"] == "full" and "error" not in a), None)
        for arm in run["arms"]:
            full = own
            if own is None and "error" not in arm:  # a file of MoBA arms only: the full arm of another file
                full = fulls.get(same(run, arm))
                if full is not None and "speedup_vs_full" not in arm:
                    arm = dict(arm, speedup_vs_full=arm["tokens_per_s"] / full["tokens_per_s"])
            if "error" in arm:
                lines.append(f"| {run['meta']['commit'][:7]} | {arm['name']} | | | | {arm['error']} | | | | |")
                continue
            kinds = arm["layer_kinds"]
            moba = kinds.count("moba")
            cfg = load_config(run["meta"]["recipe"], arm["overrides"])  # the arm's block and top-k
            attention = "full" if not moba else (f"MoBA b{cfg.attention.block_size} top-{cfg.attention.topk}, "
                                                 f"{len(kinds) - moba} full")
            # Recomputed, not read: results of session 6 and before stored bounds of the profiled step.
            speedup = arm.get("speedup_vs_full")
            bound = None if full is None or arm is full or full["seq_length"] != arm["seq_length"] \
                else amdahl_bound(full, moba)
            mfu = "" if arm.get("mfu") is None else f"{100 * arm['mfu']:.1f}%"
            peak = "" if arm.get("peak_allocated_gib") is None else f"{arm['peak_allocated_gib']:.1f}"
            lines.append(
                f"| {run['meta']['commit'][:7]} | {arm['name']} | {arm['tokens_per_step'] // arm['seq_length']} x "
                f"{arm['seq_length'] // 1024}K | {attention} | "
                f"{arm['recompute']} | {arm['tokens_per_s']:,.0f} | {mfu} | {peak} | "
                f"{'' if speedup is None else f'{speedup:.2f}x'} | {'' if not bound else f'{bound:.2f}x'} |")
    return "\n".join(lines)


def _records(results: list) -> list[dict]:
    """The arms as JSON records, each MoBA arm with its speed-up over the arm named `full` at its length."""
    from moba_train.benchmarking import amdahl_bound

    full = next((r for r in results if r.name == "full"), None)
    records = []
    for r in results:
        record = dataclasses.asdict(r)
        if full is not None and r is not full and full.seq_length == r.seq_length:
            record["speedup_vs_full"] = r.tokens_per_s / full.tokens_per_s
            record["amdahl_bound_vs_full"] = amdahl_bound(full, r.layer_kinds.count("moba"))
        records.append(record)
    return records


def _write(out: Path, meta: dict, records: list[dict]) -> None:
    write_text(out, json.dumps(dict(meta=meta, arms=records), indent=1))


if __name__ == "__main__":
    run_entry(lambda: main(sys.argv[1:]))
