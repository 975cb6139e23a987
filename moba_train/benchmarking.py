"""Timed training steps of a recipe (what scripts/bench_train.py runs), following ../shared/BENCH.md's
training protocol: the trainer's own step (`training.train_step`) on the recipe's model, optimizer and
data, at least 2 warm-up steps, the median of at least 5 timed steps, tokens/s = tokens per optimizer
step / step time, model TFLOP/s and MFU from moba_train.flops (the formula of BENCH.md, recomputation
not counted), peak memory allocated and reserved.

With `profile=True` one more step runs under the PyTorch profiler and its GPU kernel time is split by
kernel name into: MoBA attention (the Triton kernels of moba_train.kernels), full attention (flash / SDPA
kernels), matrix products (GEMMs), norms/activations/RoPE and other elementwise kernels, loss (cross
entropy), optimizer (Adam and the gradient-norm kernels), communication (NCCL); host gaps are the median
unprofiled step's time not covered by any kernel (`gpu_idle`; the train-*.json results of session 6 and
before took the profiled step's own wall time, which counted the profiler's overhead as gaps).
"""

from __future__ import annotations

import dataclasses
import gc
import math
import statistics
import time
from dataclasses import dataclass, field

import torch

from moba_train.config import Config

CATEGORIES = {  # first match wins, on the lower-cased kernel name
    # the routing's sort (kernels/routing.py) is the step's radix sort; the embedding's backward sorts its few
    # thousand token ids, a fraction of a millisecond
    "moba_attention": ("_gate_topk", "_block_mean", "_pick_keys", "_slot_tiles", "_current_block", "_past_run",
                       "_past_slot", "_dkdv", "_dq_merge", "_delta_kernel", "_pack_picks", "radix_sort"),
    "full_attention": ("flash", "fmha", "attention", "sdpa", "efficient_attention", "cudnn::fusion"),
    "loss": ("cross_entropy", "log_softmax", "nll_loss", "softmax", "vocab_parallel_ce"),
    "optimizer": ("adam", "multi_tensor", "l2norm", "foreach", "lerp"),
    "communication": ("nccl",),
    "matmul": ("gemm", "nvjet", "sm90_xmma", "cutlass", "cublas", "xmma", "ampere", "hopper", "matmul", "_mm_"),
    "norm_activation_rope": ("norm", "silu", "swiglu", "rotary", "rope", "elementwise", "vectorized", "mul",
                             "add", "copy", "cat", "index", "reduce", "fill", "gammabeta", "rsqrt"),
}


def kernel_category(name: str) -> str:
    lower = name.lower()
    for category, needles in CATEGORIES.items():
        if any(needle in lower for needle in needles):
            return category
    return "other"


@dataclass
class StepBenchmark:
    """One arm's measurement (times in seconds, memory in GiB)."""

    name: str
    overrides: list[str]
    seq_length: int
    attention: str
    layer_kinds: list[str]
    recompute: str
    tokens_per_step: int
    step_times: list[float]
    median_step_s: float
    tokens_per_s: float
    tflops_per_gpu: float
    mfu: float | None
    peak_allocated_gib: float | None
    peak_reserved_gib: float | None
    losses: list[float]
    breakdown_s: dict[str, float] = field(default_factory=dict)
    diagnostics_s: float | None = None  # one routing-diagnostics pass (moba_train.diagnostics), after a warm-up one
    diagnostics_overhead: float | None = None  # diagnostics_s / (logging.moba_diag_interval x median step)
    top_kernels: list[dict] = field(default_factory=list)  # the profiled step's costliest kernels (TOP_KERNELS)


def gpu_idle(busy_us: list[tuple[float, float]], step_s: float) -> float:
    """Seconds of a step of `step_s` in which no kernel ran: the step minus the union of the kernels'
    (start, end) intervals in microseconds. `step_s` is the unprofiled step's time: the profiler slows the
    host side of the step it records (by about 0.17 s of a 1.9 s step at 32K), so that step's own wall time
    would count its overhead as idle GPU."""
    covered, end = 0.0, -math.inf
    for start, stop in sorted(busy_us):
        if stop > end:
            covered += (stop - max(start, end)) / 1e6
            end = stop
    return max(step_s - covered, 0.0)


TOP_KERNELS = 30
"""Kernels listed by name in a profiled arm's JSON: enough to see what each category is made of."""


def tally(events, step_s: float) -> tuple[dict[str, float], list[dict]]:
    """Seconds of GPU kernel time per category over the profiler's `events`, plus host gaps (`gpu_idle` of a
    step of `step_s`); and the TOP_KERNELS costliest kernels by name (seconds, launches, category).
    Only kernels count: the profiler also puts user annotations (e.g. `Optimizer.step#AdamW.step`, the
    whole update) on the GPU timeline, which would count twice and cover the idle time inside them."""
    seconds: dict[str, float] = {}
    kernels: dict[str, list] = {}
    busy = []
    for event in events:
        kind = str(getattr(event, "activity_type", ""))
        annotation = getattr(event, "is_user_annotation", False) or "annotation" in kind
        if event.device_type != torch.autograd.DeviceType.CUDA or annotation:
            continue
        category = kernel_category(event.name)
        seconds[category] = seconds.get(category, 0.0) + event.device_time / 1e6
        entry = kernels.setdefault(event.name, [0.0, 0, category])
        entry[0] += event.device_time / 1e6
        entry[1] += 1
        busy.append((event.time_range.start, event.time_range.end))
    seconds["host_gaps"] = gpu_idle(busy, step_s)
    top = sorted(kernels.items(), key=lambda item: -item[1][0])[:TOP_KERNELS]
    return dict(sorted(seconds.items())), [{"kernel": name[:160], "s": s, "launches": n, "category": c}
                                           for name, (s, n, c) in top]


def _breakdown(step, device, step_s: float) -> tuple[dict[str, float], list[dict]]:
    """`tally` of one profiled step (`step_s`: the median unprofiled step, see `gpu_idle`)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    return tally(prof.events(), step_s)


def run_arm(cfg: Config, name: str, overrides: list[str], warmup: int, steps: int, profile: bool,
            diagnostics: bool = False) -> StepBenchmark:
    """Build the recipe's model, optimizer and data in this process and time `steps` optimizer steps (and,
    with `diagnostics`, one routing-diagnostics pass: its cost at the recipe's interval)."""
    from moba_train import data
    from moba_train.distributed import destroy_distributed, init_distributed, set_seed
    from moba_train.flops import training_step_flops
    from moba_train.metrics import PEAK_BF16_TFLOPS
    from moba_train.model import build_model, compute_dtype, matrix_params
    from moba_train.optimizer import build_optimizer, build_scheduler, use_distributed_optimizer
    from moba_train.training import num_microbatches, train_step, wrap_model

    env = init_distributed(cfg)
    try:
        set_seed(cfg.run.seed)
        model = wrap_model(cfg, build_model(cfg), env)
        optimizer = build_optimizer(cfg, [model], bf16=compute_dtype(cfg, env.device) == torch.bfloat16,
                                    distributed=use_distributed_optimizer(cfg, env.device))
        scheduler = build_scheduler(cfg, optimizer)
        train_set, _ = data.build_datasets(cfg, env)
        batches = data.build_dataloader(train_set, cfg, env, consumed_samples=0)
        n_micro = num_microbatches(cfg, env)
        losses = []

        def step():
            scheduler.step(1)
            loss, _, _ = train_step(model, optimizer, [next(batches) for _ in range(n_micro)], env)
            losses.append(loss.float())  # read after the timed steps: a host read would add a sync

        def synced():
            if env.device.type == "cuda":
                torch.cuda.synchronize()

        for _ in range(warmup):
            step()
        synced()
        if env.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(steps):
            started = time.perf_counter()
            step()
            synced()
            times.append(time.perf_counter() - started)
        cuda = env.device.type == "cuda"
        peak = (torch.cuda.max_memory_allocated() / 2**30, torch.cuda.max_memory_reserved() / 2**30) if cuda \
            else (None, None)
        median = statistics.median(times)
        breakdown, top_kernels = _breakdown(step, env.device, median) if profile else ({}, [])
        diagnostics_s = overhead = None
        if diagnostics and "moba" in cfg.layer_kinds() and cfg.logging.moba_diag_interval:
            from moba_train.diagnostics import RoutingDiagnostics

            diag = RoutingDiagnostics(cfg, model, enabled=env.is_main)
            batch = next(batches)
            for _ in range(2):  # the first pass compiles and caches; the second is timed
                synced()
                started = time.perf_counter()
                diag.run(warmup + steps, batch)
                synced()
                diagnostics_s = time.perf_counter() - started
            overhead = diagnostics_s / (cfg.logging.moba_diag_interval * median)
        seqlens = [cfg.train.seq_length] * cfg.train.global_batch_size
        m, att = cfg.model, cfg.attention
        flops = training_step_flops(matrix_params(cfg), seqlens, cfg.layer_kinds(), m.num_attention_heads,
                                    m.head_dim, att.block_size, att.topk)
        tflops = flops / median / env.world_size / 1e12
        tokens = cfg.train.global_batch_size * cfg.train.seq_length
        return StepBenchmark(
            name=name, overrides=overrides, seq_length=cfg.train.seq_length, attention=att.mode,
            layer_kinds=cfg.layer_kinds(), recompute=cfg.train.recompute, tokens_per_step=tokens,
            step_times=times, median_step_s=median, tokens_per_s=tokens / median, tflops_per_gpu=tflops,
            mfu=tflops / PEAK_BF16_TFLOPS if cuda else None, peak_allocated_gib=peak[0], peak_reserved_gib=peak[1],
            losses=[float(x) for x in losses], breakdown_s=breakdown, diagnostics_s=diagnostics_s,
            diagnostics_overhead=overhead, top_kernels=top_kernels,
        )
    finally:
        destroy_distributed()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def amdahl_bound(full: StepBenchmark | dict, moba_layers: int) -> float | None:
    """The largest MoBA / full speed-up the full-attention arm allows: its step time over the step time left
    if the attention of the layers that MoBA replaces cost nothing (needs the full arm's breakdown). Takes
    the arm or its JSON record; the step is the median unprofiled one (the profiled step is slower)."""
    record = dataclasses.asdict(full) if isinstance(full, StepBenchmark) else full
    attention = (record.get("breakdown_s") or {}).get("full_attention")
    if attention is None:
        return None
    saved = attention * moba_layers / len(record["layer_kinds"])
    step = record["median_step_s"]
    return step / max(step - saved, 1e-12)


@dataclass
class LayerMemory:
    """What one transformer layer keeps for its backward, measured (`layer_memory`): bytes per token of the
    micro-batch, the kept tensors (one entry per storage: shape, dtype, bytes) and, on CUDA, the allocator's
    view of one forward and backward of the 1-layer and 2-layer models."""

    attention: str
    packed: bool
    tokens: int
    bytes_per_token: float
    tensors: list[dict]
    cuda: dict = field(default_factory=dict)


def _one_micro_batch(cfg: Config, packed: bool, seed: int = 0) -> dict:
    """Random tokens in the shape of one micro-batch of `cfg`; `packed`: two documents per sample."""
    b, s = cfg.train.micro_batch_size, cfg.train.seq_length
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, cfg.model.vocab_size, (b, s + 1), generator=gen)
    bounds = [0, s // 2, s] if packed else [0, s]
    position_ids = torch.cat([torch.arange(hi - lo) for lo, hi in zip(bounds[:-1], bounds[1:])]).repeat(b, 1)
    cu_seqlens = torch.tensor(sorted({row * s + x for row in range(b) for x in bounds}), dtype=torch.int32)
    return {"tokens": tokens[:, :-1].contiguous(), "labels": tokens[:, 1:].contiguous(),
            "loss_mask": torch.ones(b, s), "position_ids": position_ids, "cu_seqlens": cu_seqlens}


def layer_memory(cfg: Config, packed: bool) -> LayerMemory:
    """What autograd keeps for the backward of one layer of `cfg`'s attention kind (`attention.mode`, every
    layer that kind), measured: the model built with 1 and then 2 layers, one micro-batch forward each under
    `torch.autograd.graph.saved_tensors_hooks`, each saved storage counted once (parameters excluded), and
    the difference taken. The model is wrapped as the trainer wraps it (bf16 compute where the recipe's
    precision resolves to it). Tensors a function keeps outside `save_for_backward` are not seen; on CUDA the
    allocator's bytes after the forward and its peak through the backward are recorded too."""
    from moba_train.distributed import destroy_distributed, init_distributed, set_seed
    from moba_train.model import build_model, forward_step
    from moba_train.training import wrap_model

    batch = _one_micro_batch(cfg, packed)
    kept, cuda = {}, {}
    for layers in (1, 2):
        one = Config.model_validate(
            {**cfg.model_dump(), "model": {**cfg.model.model_dump(), "num_layers": layers},
             "attention": {**cfg.attention.model_dump(), "full_layers": 0, "layer_kinds": None}})
        env = init_distributed(one)
        try:
            set_seed(one.run.seed)
            model = wrap_model(one, build_model(one), env)  # as the trainer runs it: bf16 compute where chosen
            params = {p.untyped_storage().data_ptr() for p in model.parameters()}
            storages: dict[int, dict] = {}

            def pack(tensor, storages=storages, params=params):
                storage = tensor.untyped_storage()
                if storage.data_ptr() not in params and storage.nbytes():
                    storages[storage.data_ptr()] = dict(shape=list(tensor.shape), dtype=str(tensor.dtype),
                                                        bytes=storage.nbytes())
                return tensor

            if env.device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                before = torch.cuda.memory_allocated()
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
                loss, count = forward_step(model, batch)
            if env.device.type == "cuda":
                after_forward = torch.cuda.memory_allocated() - before
                (loss / count).backward()
                torch.cuda.synchronize()
                cuda[layers] = dict(after_forward=after_forward, peak=torch.cuda.max_memory_allocated() - before)
            kept[layers] = list(storages.values())
            del model, loss, count
        finally:
            destroy_distributed()
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    one_layer = _multiset_difference(kept[2], kept[1])
    tokens = cfg.train.micro_batch_size * cfg.train.seq_length
    return LayerMemory(attention=cfg.attention.mode, packed=packed, tokens=tokens,
                       bytes_per_token=sum(t["bytes"] for t in one_layer) / tokens,
                       tensors=sorted(one_layer, key=lambda t: -t["bytes"]),
                       cuda={str(k): v for k, v in cuda.items()})


def _multiset_difference(more: list[dict], fewer: list[dict]) -> list[dict]:
    """The entries of `more` left after removing one equal entry for each of `fewer`'s (the tensors the
    second layer adds: both models keep the embedding's and the loss's)."""
    left = list(more)
    for entry in fewer:
        if entry in left:
            left.remove(entry)
    return left
