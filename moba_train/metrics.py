"""Training metrics: console log lines, a progress bar, and `<output_dir>/metrics.jsonl`.

Throughput per log line, over the steps since the previous line:
    tokens/s       = tokens of the global batches / wall seconds
    TFLOP/s/GPU    = model FLOPs of those steps / wall seconds / world size
    MFU            = TFLOP/s/GPU / 989 (H100/H200 SXM bf16 dense peak); printed on CUDA only
Model FLOPs per step follow BENCH.md (`moba_train.flops.training_step_flops`): 6 x matrix params x
tokens plus 3 x the attention forward FLOPs of every layer at its own kind (MoBA counted with the
keys each query really attends, plus gating), recomputation not counted.
Memory: peak allocated CUDA memory on GPU, resident set size of the process on CPU.

Every rank builds a MetricsLogger; only rank 0's writes, prints and (with logging.wandb.enabled) logs
to Weights & Biases.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import psutil
import torch

from moba_train.config import Config

PEAK_BF16_TFLOPS = 989.0
"""H100/H200 SXM dense bf16 peak (datasheet), the MFU denominator."""


def _duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60:02d}:{rest % 60:02d}"


def memory_gib() -> float:
    """Peak CUDA memory allocated by this process, or its resident set size on CPU, in GiB."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return psutil.Process().memory_info().rss / 2**30


class MetricsLogger:
    """Writes one JSON line per step and prints a summary line every `log_interval` steps."""

    def __init__(self, cfg: Config, start_step: int, world_size: int, cuda: bool, enabled: bool):
        self.enabled = enabled
        self.path = Path(cfg.run.output_dir) / "metrics.jsonl"
        self.total_steps = cfg.train.steps
        self.log_interval = cfg.train.log_interval
        self.world_size = world_size
        self.cuda = cuda
        self.start_step = start_step
        self.start_time = time.perf_counter()
        self.window_start = self.start_time
        self.window_tokens = 0
        self.window_flops = 0.0
        self.bar = None
        self.wandb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        bar = cfg.logging.progress_bar
        if bar == "on" or (bar == "auto" and sys.stdout.isatty()):
            from tqdm import tqdm

            self.bar = tqdm(total=self.total_steps, initial=start_step, unit="step", dynamic_ncols=True)
        wb = cfg.logging.wandb
        if wb.enabled:
            import wandb

            self.wandb = wandb.init(project=wb.project, entity=wb.entity, name=cfg.run.name, mode=wb.mode,
                                    dir=cfg.run.output_dir, config=cfg.model_dump(mode="json"))

    def print(self, line: str) -> None:
        """A console line (rank 0) that does not break the progress bar."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(line)
        else:
            print(line, flush=True)

    def log_step(self, step: int, loss: float, lr: float, grad_norm: float, tokens: int, flops: float,
                 skipped: bool) -> None:
        """Record step `step` (1-based) of `tokens` global tokens and `flops` model FLOPs."""
        if not self.enabled:
            return
        record = {"step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens": tokens, "skipped": skipped}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            self.wandb.log({f"train/{key}": value for key, value in record.items() if key != "step"}, step=step)
        self.window_tokens += tokens
        self.window_flops += flops
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.4f}")
        if step % self.log_interval and step != self.total_steps:
            return
        now = time.perf_counter()
        elapsed = max(now - self.window_start, 1e-9)
        tflops = self.window_flops / elapsed / self.world_size / 1e12
        done = step - self.start_step
        eta = (now - self.start_time) / max(done, 1) * (self.total_steps - step)
        parts = [
            f"step {step}/{self.total_steps}",
            f"loss {loss:.4f}",
            f"lr {lr:.3e}",
            f"grad_norm {grad_norm:.3f}" if math.isfinite(grad_norm) else f"grad_norm {grad_norm}",
            f"tokens/s {self.window_tokens / elapsed:,.0f}",
            f"TFLOP/s/GPU {tflops:.3g}",
        ]
        if self.cuda:
            parts.append(f"MFU {100 * tflops / PEAK_BF16_TFLOPS:.1f}%")
        parts += [f"mem {memory_gib():.2f} GiB", f"ETA {_duration(eta)}"]
        if skipped:
            parts.append("SKIPPED (non-finite)")
        self.print(" | ".join(parts))
        self.window_start, self.window_tokens, self.window_flops = now, 0, 0.0

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.wandb is not None:
            self.wandb.finish()
