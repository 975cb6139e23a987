"""Training metrics through one interface: `MetricLogger.log(step, metrics)` fans a dict out to sinks.

A new metric is a new key in the dict the trainer logs, never a new argument. Names are grouped by
prefix, so W&B's default workspace builds one section per group:

    train/  loss, lr, grad_norm, skipped (1 for a skipped non-finite step), skipped_steps (so far),
            tokens_seen (global tokens trained on so far)
    val/    loss, loss_by_position/<first>-<end> (positions [first, end) of the sequence)
    perf/   step_time_s (data loading through the optimizer update), data_time_s, data_share
            (data_time_s / step_time_s), tokens_per_s, tflops_per_gpu, mfu (CUDA only),
            memory_allocated_gib and memory_reserved_gib (peak since start, CUDA only)
    moba/   MoBA routing diagnostics (moba_train.diagnostics), every logging.moba_diag_interval steps
    system/ rss_gib (this process's resident memory), host_memory_used (fraction of the host's memory)

Throughput of one step: tokens_per_s = global tokens / step_time_s; tflops_per_gpu = model FLOPs of
the step / step_time_s / world size / 1e12; mfu = tflops_per_gpu / PEAK_BF16_TFLOPS. Model FLOPs
follow moba_train.flops.training_step_flops: 6 x matrix parameters x tokens plus 3 x the attention
forward FLOPs of every layer at its own kind (MoBA layers with the keys each query really attends,
plus gating; full layers causally); recomputation is not counted.

Values are numbers, `Histogram`s (a value per bin) or `Image`s (a PNG file). Sinks, all on rank 0
only (every other rank's MetricLogger has none):
    ConsoleSink      one line every train.log_interval steps (and for every validation and diagnostic)
    ProgressBarSink  tqdm, when logging.progress_bar says so
    JsonlSink        <output_dir>/metrics.jsonl, one JSON object per step
    WandbSink        Weights & Biases (logging.wandb.mode online or offline)
    TensorBoardSink  <output_dir>/tensorboard event files (logging.tensorboard)

Resume never duplicates a step. A run that starts from a checkpoint at step s rewrites metrics.jsonl
(atomically) without the steps after s that an interrupted attempt had logged; TensorBoard purges
them (SummaryWriter's purge_step); the W&B run id travels in the checkpoint (TrainState) and the
resumed run continues that W&B run (resume="allow"): the steps its transaction logs already hold are
not sent again, and those up to s that they lack (W&B's service, killed with the job, writes none of
what it buffered) are sent again from metrics.jsonl first (W&B keeps a run's history monotonic in its
step; offline run files are synced in order into one run). A fresh start (no checkpoint) moves an
earlier metrics.jsonl aside.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import string
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Union

import psutil
import torch
import torch.distributed as dist

from moba_train.config import Config
from moba_train.staging import write_text

PEAK_BF16_TFLOPS = 989.0
"""H100/H200 SXM dense bf16 peak (datasheet), the MFU denominator."""


@dataclass(frozen=True)
class Histogram:
    """One value per bin: `values[i]` for bin [edges[i], edges[i+1]) (counts or shares)."""

    values: list[float]
    edges: list[float]

    def __post_init__(self):
        assert len(self.edges) == len(self.values) + 1, "a histogram has one more edge than values"


@dataclass(frozen=True)
class Image:
    """A PNG file (absolute path) that sinks show as an image."""

    path: str


Value = Union[float, int, Histogram, Image]


class Sink:
    """Where metrics go; `log` receives every step's dict once, in increasing step order."""

    def log(self, step: int, metrics: dict[str, Value]) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


def _duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60:02d}:{rest % 60:02d}"


def _number(value: float, spec: str) -> str:
    return format(value, spec) if math.isfinite(value) else str(value)


class ConsoleSink(Sink):
    """The log line: every `log_interval` steps and at the last step; validation and diagnostics get a
    line of their own whenever they are logged."""

    TRAIN = (  # (key, label, format)
        ("train/loss", "loss", ".4f"),
        ("train/lr", "lr", ".3e"),
        ("train/grad_norm", "grad_norm", ".3f"),
        ("perf/tokens_per_s", "tokens/s", ",.0f"),
        ("perf/tflops_per_gpu", "TFLOP/s/GPU", ".3g"),
    )
    MOBA = (
        ("moba/gate_recall", "gate recall", ".3f"),
        ("moba/previous_block_share", "previous block", ".3f"),
        ("moba/distance_mean", "mean distance", ".2f"),
        ("moba/first_block_share", "first block", ".3f"),
        ("moba/head_overlap", "head overlap", ".3f"),
    )

    def __init__(self, total_steps: int, start_step: int, log_interval: int, write: Callable[[str], None]):
        self.total_steps = total_steps
        self.start_step = start_step
        self.log_interval = log_interval
        self.write = write
        self.start_time = time.perf_counter()

    def log(self, step: int, metrics: dict[str, Value]) -> None:
        head = f"step {step}/{self.total_steps}"
        if "train/loss" in metrics and (step % self.log_interval == 0 or step == self.total_steps):
            parts = [head] + [f"{label} {_number(metrics[key], spec)}" for key, label, spec in self.TRAIN
                              if key in metrics]
            if "perf/mfu" in metrics:
                parts.append(f"MFU {100 * metrics['perf/mfu']:.1f}%")
            memory = metrics.get("perf/memory_allocated_gib", metrics.get("system/rss_gib"))
            if memory is not None:
                parts.append(f"mem {memory:.2f} GiB")
            done = step - self.start_step
            eta = (time.perf_counter() - self.start_time) / max(done, 1) * (self.total_steps - step)
            parts.append(f"ETA {_duration(eta)}")
            if metrics.get("train/skipped"):
                parts.append("SKIPPED (non-finite)")
            self.write(" | ".join(parts))
        if "val/loss" in metrics:
            passkey = (f" | passkey loss {metrics['val/passkey_loss']:.4f}, found {metrics['val/passkey_found']:.0%}"
                       if "val/passkey_loss" in metrics else "")
            self.write(f"{head} | val loss {metrics['val/loss']:.4f}{passkey}")
        moba = [f"{label} {_number(metrics[key], spec)}" for key, label, spec in self.MOBA if key in metrics]
        if moba:
            self.write(" | ".join([head, "moba"] + moba))


class ProgressBarSink(Sink):
    """A tqdm bar over the run's steps; other console output goes through `write` above it."""

    def __init__(self, total_steps: int, start_step: int):
        from tqdm import tqdm

        self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)
        self.step = start_step

    def write(self, line: str) -> None:
        self.bar.write(line)

    def log(self, step: int, metrics: dict[str, Value]) -> None:
        self.bar.update(step - self.step)
        self.step = step
        if "train/loss" in metrics:
            self.bar.set_postfix(loss=_number(metrics["train/loss"], ".4f"))

    def close(self) -> None:
        self.bar.close()


def _json_value(value: Value):
    if isinstance(value, Histogram):
        return {"values": list(value.values), "edges": list(value.edges)}
    if isinstance(value, Image):
        return value.path
    return value


def read_jsonl(path: Path) -> list[dict]:
    """The records of a metrics.jsonl, in file order; a line cut short by a crash is left out."""
    records = []
    if not Path(path).is_file():
        return records
    for line in Path(path).read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            records.append(record)
    return records


class JsonlSink(Sink):
    """<output_dir>/metrics.jsonl: one JSON object per step, `{"step": N, "<name>": value, ...}`.

    Opened for a run that starts after step `start_step` (0 for a fresh run). On a resume the steps after
    `start_step` that an interrupted attempt wrote are dropped by an atomic rewrite; on a fresh start an
    earlier file is renamed to metrics.<UTC time>.jsonl. `previous_last_step` is the newest step the file
    held before (0 if none): the steps up to it were logged once already. `records` are the steps up to
    `start_step` it keeps, in file order (for the W&B sink's start; MetricLogger empties it then).
    """

    def __init__(self, path: Path, start_step: int, write: Callable[[str], None]):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        records = read_jsonl(self.path)
        self.previous_last_step = max((r["step"] for r in records), default=0)
        self.records = [r for r in records if r["step"] <= start_step]
        if start_step == 0 and self.path.exists() and self.path.stat().st_size:
            stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
            aside = self.path.with_name(f"metrics.{stamp}.jsonl")
            os.replace(self.path, aside)
            write(f"{self.path} held an earlier run's steps (this run starts from step 0): moved to {aside}")
        elif self.path.exists():
            if len(self.records) != len(self.path.read_text().splitlines()):
                write_text(self.path, "".join(json.dumps(r) + "\n" for r in self.records))
                write(f"metrics.jsonl: dropped the steps after {start_step} (logged by the interrupted attempt); "
                      "they are logged again as they run")
        self.file = open(self.path, "a")

    def log(self, step: int, metrics: dict[str, Value]) -> None:
        record = {"step": step, **{key: _json_value(value) for key, value in metrics.items()}}
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def wandb_credentials() -> bool:
    """Whether an API key is configured (environment, settings or .netrc), without prompting."""
    import wandb

    return bool(wandb.login(prompt=False, verify=False))


class WandbSink(Sink):
    """A W&B run with id `run_id` (created or continued: resume="allow") under <output_dir>/wandb.

    Histograms become wandb.Histogram, images wandb.Image. W&B's service is a separate process that a
    scheduler's signal to every process of the job (SLURM preemption, scancel --signal=TERM) ends too: then
    the sink says so once and stops, and training goes on (metrics.jsonl keeps every step). The service
    exits on that signal without writing the records it buffered, so a sink that continues the run from a
    checkpoint gets `logged`, metrics.jsonl's records up to the checkpoint, and `logged_through`, the newest
    step the interrupted attempt logged, and first reads which steps the run's transaction logs hold
    (moba_train.wandb_transaction_log): the records of `logged` after the newest of them are sent again
    (their numbers), and live steps up to it are not sent again. Where there is no such log or it cannot be
    read, one line says so and steps up to `logged_through` count as sent.
    """

    def __init__(self, cfg: Config, run_id: str, config: dict, write: Callable[[str], None],
                 logged: list[dict] | None = None, logged_through: int = 0):
        import wandb

        wb = cfg.logging.wandb
        mode = wb.mode
        if mode == "online" and not wandb_credentials():
            write("W&B: no API key configured (WANDB_API_KEY, `wandb login`); logging offline instead: upload with "
                  f"`wandb sync {Path(cfg.run.output_dir) / 'wandb'}/offline-run-*`")
            mode = "offline"
        self.wandb = wandb
        self.write = write
        self.skip_through, resend = 0, []
        if logged is not None:
            held = self._newest_held(Path(cfg.run.output_dir) / "wandb", run_id, logged_through)
            self.skip_through = logged_through if held is None else held
            resend = [] if held is None else [record for record in logged if record["step"] > held]
        self.run = wandb.init(
            project=wb.project, entity=wb.entity, name=wb.name or cfg.run.name, group=wb.group, tags=wb.tags or None,
            notes=wb.notes, mode=mode, dir=cfg.run.output_dir, config=config, id=run_id, resume="allow",
        )
        for record in resend:
            self.log(record["step"], {key: value for key, value in record.items()
                                      if key != "step" and isinstance(value, (int, float))})
        if resend:
            holds = f"steps up to {held}" if held else "no step"
            write(f"W&B run {run_id}: continuing it; its transaction logs hold {holds}: re-sent steps "
                  f"{resend[0]['step']}-{resend[-1]['step']} ({len(resend)} steps, their numbers) from metrics.jsonl")
        elif self.skip_through:
            write(f"W&B run {run_id}: continuing it; steps up to {self.skip_through} were already sent and are not "
                  "sent again")

    def _newest_held(self, wandb_dir: Path, run_id: str, logged_through: int) -> int | None:
        """The newest step the transaction logs of run `run_id` hold (0: none); None, said in one line, where
        there is no log of it or one cannot be read."""
        from moba_train.wandb_transaction_log import newest_step

        fallback = f"steps up to {logged_through} count as sent, as metrics.jsonl says"
        try:
            held = newest_step(wandb_dir, run_id)
        except Exception as err:  # noqa: BLE001 - a format this cannot read must not stop training
            self.write(f"W&B run {run_id}: cannot read its transaction logs ({type(err).__name__}: {err}); {fallback}")
            return None
        if held is None:
            self.write(f"W&B run {run_id}: no transaction log of it under {wandb_dir}; {fallback}")
        return held

    def _value(self, value: Value):
        if isinstance(value, Histogram):
            return self.wandb.Histogram(np_histogram=(list(value.values), list(value.edges)))
        if isinstance(value, Image):
            return self.wandb.Image(value.path)
        return value

    def log(self, step: int, metrics: dict[str, Value]) -> None:
        if self.run is not None and step > self.skip_through:
            self._guarded(lambda: self.run.log({key: self._value(value) for key, value in metrics.items()}, step=step))

    def close(self) -> None:
        if self.run is not None:
            self._guarded(self.run.finish)

    def _guarded(self, call) -> None:
        try:
            call()
        except Exception as err:  # noqa: BLE001 - whatever the W&B client raises, training must go on
            self.write(f"W&B stopped working ({type(err).__name__}: {err}); the run continues and metrics.jsonl "
                       "keeps every step")
            self.run = None
            try:  # close the dead connection now, or W&B's exit hook prints the same error as a traceback
                self.wandb.teardown()
            except Exception:  # noqa: BLE001
                pass


class TensorBoardSink(Sink):
    """TensorBoard event files in <output_dir>/tensorboard: scalars, raw histograms, images. A run that
    starts after step `start_step` hides the events earlier writers logged after it (SummaryWriter's
    purge_step; their files stay on disk): an interrupted attempt's, or on a fresh start an earlier run's."""

    def __init__(self, log_dir: Path, start_step: int):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(log_dir), purge_step=start_step + 1)

    def log(self, step: int, metrics: dict[str, Value]) -> None:
        for key, value in metrics.items():
            if isinstance(value, Histogram):
                self._histogram(key, value, step)
            elif isinstance(value, Image):
                import matplotlib.image

                pixels = matplotlib.image.imread(value.path)[..., :3]  # [H, W, 3] floats in [0, 1]
                self.writer.add_image(key, pixels, step, dataformats="HWC")
            else:
                self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def _histogram(self, key: str, hist: Histogram, step: int) -> None:
        values, edges = hist.values, hist.edges
        total = float(sum(values))
        if total <= 0:
            return
        centers = [(a + b) / 2 for a, b in zip(edges[:-1], edges[1:])]
        mean = sum(c * v for c, v in zip(centers, values)) / total
        self.writer.add_histogram_raw(
            key, min=edges[0], max=edges[-1], num=total, sum=mean * total,
            sum_squares=sum(c * c * v for c, v in zip(centers, values)), bucket_limits=list(edges[1:]),
            bucket_counts=list(values), global_step=step,
        )

    def close(self) -> None:
        self.writer.close()


def perf_metrics(step_time_s: float, data_time_s: float, tokens: int, flops: float, world_size: int,
                 cuda: bool) -> dict[str, float]:
    """perf/ and system/ metrics of one step of `tokens` global tokens and `flops` model FLOPs (all GPUs)."""
    step_time_s = max(step_time_s, 1e-9)
    tflops = flops / step_time_s / world_size / 1e12
    metrics = {
        "perf/step_time_s": step_time_s,
        "perf/data_time_s": data_time_s,
        "perf/data_share": data_time_s / step_time_s,
        "perf/tokens_per_s": tokens / step_time_s,
        "perf/tflops_per_gpu": tflops,
    }
    if cuda:
        metrics["perf/mfu"] = tflops / PEAK_BF16_TFLOPS
        metrics["perf/memory_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
        metrics["perf/memory_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
    metrics["system/rss_gib"] = psutil.Process().memory_info().rss / 2**30
    metrics["system/host_memory_used"] = psutil.virtual_memory().percent / 100
    return metrics


def attention_backends(cfg: Config, device: torch.device, dtype: torch.dtype) -> dict[str, str]:
    """The attention implementation of each layer kind in use: MoBA layers run the backend `auto` resolves
    to for sequences of train.seq_length on this device (or the one the recipe names); full layers run
    moba_train.attention.full_attention."""
    from moba_train.attention import auto_backend

    att, model = cfg.attention, cfg.model
    resolved = {}
    for kind in dict.fromkeys(cfg.layer_kinds()):
        if kind == "full":
            resolved[kind] = "full_attention"
        elif att.backend != "auto":
            resolved[kind] = att.backend
        else:
            resolved[kind] = auto_backend(device, dtype, cfg.train.seq_length,
                                          model.num_attention_heads // cfg.parallel.tensor, model.head_dim,
                                          att.block_size)
    return resolved


def new_wandb_run_id() -> str:
    """A fresh W&B run id: 8 random lowercase letters and digits, the form W&B generates."""
    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))


def _from_rank0(value):
    """`value` as rank 0 has it, on every rank (the checkpoint's common state must agree across ranks)."""
    if not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class MetricLogger:
    """Fans `log(step, metrics)` out to the sinks the recipe asks for (rank 0 only: `enabled`).

    `start_step` is the step the run resumes after (0 for a fresh run); `wandb_run_id` the W&B run to
    continue (None: a new one; the id in use is `self.wandb_run_id`, for the checkpoint); `run_info`
    extra entries of the W&B config (e.g. the resolved attention backends) beside the resolved recipe.
    """

    def __init__(self, cfg: Config, start_step: int, enabled: bool, wandb_run_id: str | None = None,
                 run_info: dict | None = None):
        self.sinks: list[Sink] = []
        self.last_step = start_step
        self.wandb_run_id = wandb_run_id
        if cfg.logging.wandb.mode != "disabled":
            self.wandb_run_id = _from_rank0(wandb_run_id or (new_wandb_run_id() if enabled else None))
        self._write: Callable[[str], None] = lambda line: print(line, flush=True)
        if not enabled:
            return
        output_dir = Path(cfg.run.output_dir)
        bar = cfg.logging.progress_bar
        if bar == "on" or (bar == "auto" and sys.stdout.isatty()):
            progress = ProgressBarSink(cfg.train.steps, start_step)
            self._write = progress.write
            self.sinks.append(progress)
        self.sinks.append(ConsoleSink(cfg.train.steps, start_step, cfg.train.log_interval, self.print))
        jsonl = JsonlSink(output_dir / "metrics.jsonl", start_step, self.print)
        self.sinks.append(jsonl)
        if cfg.logging.wandb.mode != "disabled":
            config = {**cfg.model_dump(mode="json"), **(run_info or {})}
            continued = bool(start_step and wandb_run_id)  # the run holds (or should hold) the steps logged so far
            self.sinks.append(WandbSink(cfg, self.wandb_run_id, config, self.print,
                                        logged=jsonl.records if continued else None,
                                        logged_through=jsonl.previous_last_step))
        jsonl.records = []  # needed only to start the W&B sink: a long run's steps are not held in memory throughout
        if cfg.logging.tensorboard:
            self.sinks.append(TensorBoardSink(output_dir / "tensorboard", start_step))

    def print(self, line: str) -> None:
        """A console line (rank 0) that does not break the progress bar."""
        if self.sinks:
            self._write(line)

    def log(self, step: int, metrics: dict[str, Value]) -> None:
        """Record `metrics` of step `step`: each step once, in increasing order."""
        assert step > self.last_step, f"step {step} logged after step {self.last_step}"
        self.last_step = step
        for sink in self.sinks:
            sink.log(step, metrics)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()
        self.sinks = []
