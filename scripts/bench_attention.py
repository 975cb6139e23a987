"""Attention benchmark: SDPA causal, FA2 varlen causal and every available MoBA backend.

Protocol (../shared/BENCH.md): random normal bf16 inputs per shape, correctness of every backend
against a reference before timing (MoBA: the `torch` backend, or `naive` for tiny shapes; FA2: SDPA),
CUDA events, warm-up, median of >= 10 repetitions (3 at 1M tokens), peak memory per measurement,
effective TFLOP/s from moba_train.flops (backward = 2.5 x forward). Prints one table, writes JSON under
bench/results/.

    python scripts/bench_attention.py                      # standard shapes on CUDA (about 6 minutes on an H100)
    python scripts/bench_attention.py --shapes s32k-b128 --backends sdpa,moba-varlen --passes fwd
    python scripts/bench_attention.py --tiny               # CPU smoke run (the test suite runs this)
    python scripts/bench_attention.py --set recipes         # the training recipes' shapes (head dim 64, GQA 32/8)
    python scripts/bench_attention.py --baseline DIR
        # the kernels against an earlier version of themselves (DIR holds that version's `kernels` package,
        # e.g. `git archive 1456a3d kernels | tar -x -C DIR`), both in the same run and both at the kernels'
        # own entry (moba-triton-direct against moba-triton-baseline, unless --backends says otherwise), then
        # each shape's change in time
    python scripts/bench_attention.py --cp-shaped 4         # the queries of each rank at CP 4 against the unsplit call

The `moba-torch` backend is timed only up to 32K tokens per sequence (it gathers each selected key
block once per query and is memory-bound: 1.8 s forward, 6.1 s forward+backward at s32k-b128 on an
H100) and recorded as skipped above, to keep the standard run within about 6 minutes.
On the GPU machine pass the commit (its copy of the tree may have no or a stale .git):
GIT_COMMIT=<sha> python scripts/bench_attention.py
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import math
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from moba_train import flops
from moba_train.attention import backend_available, full_attention, moba_attention, varlen
from moba_train.attention.naive import moba_attention_naive
from moba_train.staging import write_text

K = 1024


@dataclass(frozen=True)
class Shape:
    name: str
    batch: int
    heads: int
    seqlen: int
    block: int
    topk: int
    passes: tuple[str, ...]
    head_dim: int = 128
    kv_heads: int | None = None  # default: heads (MHA)

    @property
    def hkv(self) -> int:
        return self.kv_heads or self.heads


STANDARD = [
    Shape("s32k-b128", 2, 16, 32 * K, 128, 8, ("fwd", "fwdbwd")),
    Shape("s64k-b128", 2, 16, 64 * K, 128, 8, ("fwd", "fwdbwd")),
    Shape("s128k-b128", 2, 16, 128 * K, 128, 8, ("fwdbwd",)),
    Shape("s32k-b512", 2, 16, 32 * K, 512, 3, ("fwd", "fwdbwd")),
    Shape("s128k-b4096", 1, 32, 128 * K, 4096, 12, ("fwd",)),
    Shape("s1m-b4096", 1, 2, 1024 * K, 4096, 12, ("fwd",)),
]
RECIPES = [  # configs/llama1b_moba_32k.yaml's attention (head dim 64, 32 query / 8 KV heads), sparser 32K and 128K
    Shape("r32k-b2048", 2, 32, 32 * K, 2048, 4, ("fwd", "fwdbwd"), head_dim=64, kv_heads=8),
    Shape("r32k-b512", 2, 32, 32 * K, 512, 3, ("fwd", "fwdbwd"), head_dim=64, kv_heads=8),
    Shape("r128k-b1024", 1, 32, 128 * K, 1024, 4, ("fwdbwd",), head_dim=64, kv_heads=8),
    Shape("r128k-b2048", 1, 32, 128 * K, 2048, 4, ("fwdbwd",), head_dim=64, kv_heads=8),
    Shape("r128k-b4096", 1, 32, 128 * K, 4096, 4, ("fwdbwd",), head_dim=64, kv_heads=8),
]
TINY = [
    Shape("tiny-b32", 2, 4, 256, 32, 3, ("fwd", "fwdbwd"), head_dim=32),
    Shape("tiny-b16", 1, 2, 200, 16, 8, ("fwd",), head_dim=32),
]
BACKENDS = ("sdpa", "sdpa-cudnn", "fa2-varlen", "moba-torch", "moba-varlen", "moba-triton", "moba-triton-direct",
            "moba-triton-baseline")
"""sdpa-cudnn: SDPA restricted to cuDNN's attention (K/V repeated to the query heads where it refuses GQA);
moba-triton-direct: the kernels' own entry, moba_train.kernels.moba_attention_triton, as moba-triton-baseline
calls the baseline's (moba-triton goes through moba_train.attention.moba_attention, whose Python checks and
dispatch a forward-only timing, which synchronises every call, also counts)."""
SETS = {"standard": STANDARD, "recipes": RECIPES, "tiny": TINY}
BASELINE = None  # the `kernels` package of --baseline DIR
TORCH_BACKEND_MAX_SEQLEN = 32 * K
CHECK_TOKENS = 16 * K
"""Correctness is checked on each sequence's first CHECK_TOKENS tokens (a prefix is a valid input)..."""
CHECK_TOKENS_NAIVE = 2 * K
"""... or its first CHECK_TOKENS_NAIVE tokens where the reference is the O(S^2) naive backend."""


def available_backends(device: torch.device, dtype: torch.dtype) -> list[str]:
    names = ["sdpa"] + (["sdpa-cudnn"] if device.type == "cuda" else [])
    if varlen.available(device, dtype):
        names.append("fa2-varlen")
    names.append("moba-torch")
    names += [f"moba-{b}" for b in ("varlen", "triton") if backend_available(b, device, dtype)]
    if "moba-triton" in names:
        names.append("moba-triton-direct")
        if BASELINE is not None:
            names.append("moba-triton-baseline")
    return names


def baseline_changes(rows: list[dict]) -> list[dict]:
    """Per (shape, pass) timed both by the baseline's kernels and by this checkout's (its kernels' own entry,
    moba-triton-direct, where timed, else moba-triton through moba_attention): both times in ms and the change
    of this checkout's time against the baseline's."""
    ok = {(r["shape"], r["passes"], r["backend"]): r["ms"] for r in rows if r["status"] == "ok"}
    changes = []
    for (shape, passes, backend), base_ms in ok.items():
        if backend != "moba-triton-baseline":
            continue
        for ours in ("moba-triton-direct", "moba-triton"):
            if (shape, passes, ours) in ok:
                ms = ok[(shape, passes, ours)]
                changes.append(dict(shape=shape, passes=passes, backend=ours, baseline_ms=base_ms, ms=ms,
                                    change=ms / base_ms - 1))
                break
    return changes


def attention_fn(backend: str, shape: Shape):
    """fn(q, k, v, cu_seqlens) -> out, all [T, H, D]."""
    moba = dict(block_size=shape.block, topk=shape.topk)
    if backend == "sdpa":
        def sdpa(q, k, v, cu):
            b = cu.numel() - 1
            q_b, k_b, v_b = (x.view(b, -1, *x.shape[1:]).transpose(1, 2) for x in (q, k, v))
            out = F.scaled_dot_product_attention(q_b, k_b, v_b, is_causal=True, enable_gqa=shape.hkv != shape.heads)
            return out.transpose(1, 2).reshape(q.shape)
        return sdpa
    if backend == "sdpa-cudnn":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        def sdpa_cudnn(q, k, v, cu):
            b = cu.numel() - 1
            q_b, k_b, v_b = (x.view(b, -1, *x.shape[1:]).transpose(1, 2) for x in (q, k, v))
            if shape.hkv != shape.heads:
                k_b, v_b = (x.repeat_interleave(shape.heads // shape.hkv, dim=1) for x in (k_b, v_b))
            with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
                out = F.scaled_dot_product_attention(q_b, k_b, v_b, is_causal=True)
            return out.transpose(1, 2).reshape(q.shape)
        return sdpa_cudnn
    if backend == "moba-triton-direct":
        from moba_train.kernels import moba_attention_triton

        return lambda q, k, v, cu: moba_attention_triton(q, k, v, cu, shape.block, shape.topk)
    if backend == "moba-triton-baseline":
        return lambda q, k, v, cu: BASELINE.moba_attention_triton(q, k, v, cu, shape.block, shape.topk)
    if backend == "fa2-varlen":
        return lambda q, k, v, cu: varlen.causal_varlen_attn(q, k, v, cu, cu, shape.seqlen, shape.seqlen,
                                                             1 / math.sqrt(q.shape[-1]))
    if backend == "moba-naive":
        return lambda q, k, v, cu: moba_attention_naive(q, k, v, cu_seqlens=cu, **moba)
    name = backend.removeprefix("moba-")
    return lambda q, k, v, cu: moba_attention(q, k, v, cu_seqlens=cu, backend=name, **moba)


def reference_fn(backend: str, shape: Shape, device: torch.device):
    if backend == "sdpa":
        return None
    if backend in ("fa2-varlen", "sdpa-cudnn"):
        return lambda q, k, v, cu: full_attention(q.float(), k.float(), v.float(), cu_seqlens=cu)
    if device.type == "cpu" or backend == "moba-torch":
        return attention_fn("moba-naive", shape)
    return attention_fn("moba-torch", shape)


def inputs(batch: int, seqlen: int, shape: Shape, device, dtype, grad: bool):
    total = batch * seqlen
    q, k, v = (torch.randn(total, h, shape.head_dim, device=device, dtype=dtype, requires_grad=grad)
               for h in (shape.heads, shape.hkv, shape.hkv))
    cu = torch.arange(batch + 1, dtype=torch.int32, device=device) * seqlen
    return q, k, v, cu


def max_rel_error(backend: str, shape: Shape, passes: str, device, dtype) -> float | None:
    """Largest relative error ||x - ref|| / ||ref|| over out (and the q/k/v grads for fwdbwd), on a prefix.

    The reference runs in fp32 on the same (upcast) inputs, with the same random upstream gradient,
    so the error measures the backend under test rather than the reference's own rounding. A norm,
    not an elementwise maximum: on random inputs a few of the ~10^6 (query, head) rows have gate
    scores tied to within fp32 rounding, and a backend that sums the block means in another order
    may route such a row to the other block, a legitimate difference that an elementwise maximum
    would report as a large error.
    """
    ref = reference_fn(backend, shape, device)
    if ref is None:
        return None
    fn = attention_fn(backend, shape)
    grad = passes == "fwdbwd"
    limit = CHECK_TOKENS_NAIVE if backend == "moba-torch" else CHECK_TOKENS
    q, k, v, cu = inputs(shape.batch, min(shape.seqlen, limit), shape, device, dtype, grad)
    q32, k32, v32 = (x.detach().float().requires_grad_(grad) for x in (q, k, v))
    grad_out = torch.randn_like(q32)
    results = []
    for f, args in ((fn, (q, k, v)), (ref, (q32, k32, v32))):
        out = f(*args, cu)
        tensors = [out.float()]
        if grad:
            tensors += [g.float() for g in torch.autograd.grad(out, args, grad_out.to(out.dtype))]
        results.append(tensors)
    err = max((torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b)).item() for a, b in zip(*results))
    return float("nan") if math.isnan(err) else err


def time_ms(step, reps: int, device) -> list[float]:
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            step()
            times.append((time.perf_counter() - t0) * 1e3)
    return times


def measure(backend: str, shape: Shape, passes: str, device, dtype, kernel_times: bool = False) -> dict:
    row = dict(shape=shape.name, backend=backend, passes=passes, status="ok", ms=None, tflops=None,
               peak_mem_gib=None, max_rel_err=None, reps=0)
    if backend == "moba-torch" and shape.seqlen > TORCH_BACKEND_MAX_SEQLEN:
        row["status"] = "skipped"
        return row
    try:
        err = max_rel_error(backend, shape, passes, device, dtype)
        row["max_rel_err"] = err
        tolerance = 2e-2 if dtype != torch.float32 else 1e-4
        if err is not None and not err <= tolerance:
            row["status"] = "fail"
            return row
        fn = attention_fn(backend, shape)
        grad = passes == "fwdbwd"
        q, k, v, cu = inputs(shape.batch, shape.seqlen, shape, device, dtype, grad)
        grad_out = torch.randn_like(q) if grad else None

        def step():
            if grad:
                fn(q, k, v, cu).backward(grad_out)
                q.grad = k.grad = v.grad = None
            else:
                with torch.no_grad():
                    fn(q, k, v, cu)

        tokens = shape.batch * shape.seqlen
        few = tokens >= 1024 * K or backend == "moba-torch" or device.type == "cpu"
        reps = 3 if few else 10
        time_ms(step, 1, device)
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        row["ms"] = statistics.median(time_ms(step, reps, device))
        row["reps"] = reps
        if device.type == "cuda":
            row["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
        moba = backend.startswith("moba")
        fwd = flops.attention_forward_flops([shape.seqlen] * shape.batch, shape.heads, shape.head_dim,
                                            shape.block if moba else None, shape.topk if moba else None)
        total = fwd * (1 + flops.BACKWARD_FACTOR) if grad else fwd
        row["tflops"] = total / (row["ms"] * 1e-3) / 1e12
        if kernel_times and device.type == "cuda":
            row["kernels_ms"] = kernel_breakdown(step, 5)
    except torch.OutOfMemoryError:
        row["status"] = "oom"
    except (RuntimeError, ValueError) as error:
        row["status"] = "error"
        row["error"] = f"{type(error).__name__}: {error}"
        print(f"{shape.name} {backend} {passes}: {row['error']}", flush=True)
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return row


def kernel_breakdown(step, reps: int) -> dict[str, float]:
    """GPU milliseconds per call of each kernel name over `reps` calls of `step` (PyTorch's profiler), the
    fifteen longest: where two backends' times differ, this says which kernel differs."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            step()
        torch.cuda.synchronize()
    times: dict[str, float] = {}
    for event in prof.events():
        if event.device_type == DeviceType.CUDA:
            times[event.name] = times.get(event.name, 0.0) + event.device_time / 1e3 / reps
    return dict(sorted(times.items(), key=lambda item: -item[1])[:15])


def measure_cp_shaped(shape: Shape, cp: int, device, dtype) -> dict:
    """The Triton kernels on the queries of each rank at context parallelism `cp` (chunks r and 2cp - 1 - r
    of every sequence, keys their causal prefixes: what moba_train.context_parallel's all_gather design
    computes) against the unsplit call, forward + backward: the compute overhead of splitting
    (sum over ranks / unsplit) and the balance (slowest rank / (unsplit / cp))."""
    q, k, v, cu = inputs(shape.batch, shape.seqlen, shape, device, dtype, grad=True)
    moba = dict(block_size=shape.block, topk=shape.topk, backend="triton")
    grad_out = torch.randn_like(q)

    def timed(args, offsets, dout) -> float:
        leaves = [x.detach().requires_grad_() for x in args]

        def step():
            moba_attention(*leaves, **offsets, **moba).backward(dout)
            for x in leaves:
                x.grad = None

        time_ms(step, 1, device)
        return statistics.median(time_ms(step, 10, device))

    whole = timed((q, k, v), dict(cu_seqlens=cu), grad_out)
    with torch.no_grad():
        reference = moba_attention(q, k, v, cu_seqlens=cu, **moba)
    c = shape.seqlen // (2 * cp)
    ranks, errors = [], []
    for rank in range(cp):
        q_rows, k_rows, host_q, host_k = [], [], [0], [0]
        for i in range(shape.batch):
            for j in (rank, 2 * cp - 1 - rank):
                q_rows.append(torch.arange(i * shape.seqlen + j * c, i * shape.seqlen + (j + 1) * c))
                k_rows.append(torch.arange(i * shape.seqlen, i * shape.seqlen + (j + 1) * c))
                host_q.append(host_q[-1] + c)
                host_k.append(host_k[-1] + (j + 1) * c)
        q_rows, k_rows = torch.cat(q_rows).to(device), torch.cat(k_rows).to(device)
        offsets = dict(cu_seqlens_q=torch.tensor(host_q, dtype=torch.int32, device=device),
                       cu_seqlens_k=torch.tensor(host_k, dtype=torch.int32, device=device),
                       host_cu_seqlens=(host_q, host_k))
        args = (q[q_rows], k[k_rows], v[k_rows])
        with torch.no_grad():
            out = moba_attention(*args, **offsets, **moba)
        want = reference[q_rows]
        errors.append((torch.linalg.vector_norm((out - want).float()) / torch.linalg.vector_norm(want.float())).item())
        ranks.append(timed(args, offsets, grad_out[q_rows]))
        torch.cuda.empty_cache()
    return dict(shape=shape.name, cp=cp, unsplit_ms=whole, rank_ms=ranks, sum_over_unsplit=sum(ranks) / whole,
                slowest_over_even_share=max(ranks) / (whole / cp), max_rel_err=max(errors))


def environment(device) -> dict:
    commit = os.environ.get("GIT_COMMIT")  # first: a copied tree may carry a stale .git
    if not commit:
        try:
            commit = subprocess.run(
                ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True
            ).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            commit = "unknown"
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return dict(
        commit=commit,
        gpu=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        torch=torch.__version__,
        triton=triton_version,
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    )


HEADER = (
    f"{'shape':<12} {'backend':<12} {'pass':<7} {'status':<8} {'ms':>10} {'TFLOP/s':>8} {'peak GiB':>9} "
    f"{'max rel err':>12}"
)


def format_row(r: dict) -> str:
    ms = f"{r['ms']:.2f}" if r["ms"] is not None else "-"
    tf = f"{r['tflops']:.1f}" if r["tflops"] is not None else "-"
    mem = f"{r['peak_mem_gib']:.2f}" if r["peak_mem_gib"] is not None else "-"
    err = f"{r['max_rel_err']:.2e}" if r["max_rel_err"] is not None else "-"
    return f"{r['shape']:<12} {r['backend']:<12} {r['passes']:<7} {r['status']:<8} {ms:>10} {tf:>8} {mem:>9} {err:>12}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", help="comma-separated shape names (default: all of the chosen set)")
    parser.add_argument("--backends", help=f"comma-separated subset of {', '.join(BACKENDS)} (default: all available; "
                        "with --baseline: moba-triton-direct,moba-triton-baseline)")
    parser.add_argument("--passes", help="comma-separated subset of fwd,fwdbwd (default: each shape's own)")
    parser.add_argument("--tiny", action="store_true", help="tiny fp32 shapes on CPU: a smoke test, not a benchmark")
    parser.add_argument("--set", choices=list(SETS), help="shape set (default: standard, or tiny with --tiny)")
    parser.add_argument("--baseline", help="a directory holding an earlier `kernels` package (moba-triton-baseline)")
    parser.add_argument("--cp-shaped", type=int, metavar="CP",
                        help="instead: each rank's queries at this context-parallel size against the unsplit call")
    parser.add_argument("--kernel-times", action="store_true",
                        help="also record each kernel's GPU time per call (PyTorch's profiler; CUDA only)")
    parser.add_argument("--out", help="JSON output path (default: bench/results/attention-<gpu>-<time>.json)")
    args = parser.parse_args(argv)

    device = torch.device("cpu" if args.tiny else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("CUDA is not available; run on a GPU, or use --tiny for a CPU smoke run.")
    dtype = torch.float32 if args.tiny else torch.bfloat16
    if args.baseline:
        global BASELINE
        if not (Path(args.baseline) / "kernels" / "__init__.py").is_file():  # else this checkout's would load
            parser.error(f"--baseline {args.baseline} holds no kernels package (kernels/__init__.py); make one "
                         f"with: mkdir -p DIR && git archive <commit> kernels | tar -x -C DIR")
        if "moba-triton" not in available_backends(device, dtype):
            parser.error(f"--baseline times Triton kernels, which do not run on {device.type} in {dtype} here; "
                         "run it on a GPU, without --tiny.")
        sys.path.insert(0, str(Path(args.baseline).resolve()))
        BASELINE = importlib.import_module("kernels")
    unknown_passes = sorted(set(args.passes.split(",")) - {"fwd", "fwdbwd"}) if args.passes else []
    if unknown_passes:
        parser.error(f"unknown pass(es) {', '.join(unknown_passes)}; choose from fwd, fwdbwd.")
    catalog = SETS[args.set or ("tiny" if args.tiny else "standard")]
    shapes = catalog
    if args.shapes:
        by_name = {s.name: s for s in catalog}
        unknown = [n for n in args.shapes.split(",") if n not in by_name]
        if unknown:
            parser.error(f"unknown shape(s) {', '.join(unknown)}; choose from {', '.join(by_name)}.")
        shapes = [by_name[n] for n in args.shapes.split(",")]
    if args.cp_shaped:
        meta = environment(device)
        rows = [measure_cp_shaped(shape, args.cp_shaped, device, dtype) for shape in shapes
                if "fwdbwd" in shape.passes]
        for r in rows:
            print(f"{r['shape']} CP {r['cp']}: unsplit {r['unsplit_ms']:.2f} ms, ranks "
                  f"{', '.join(f'{ms:.2f}' for ms in r['rank_ms'])} ms: sum / unsplit {r['sum_over_unsplit']:.3f}, "
                  f"slowest / even share {r['slowest_over_even_share']:.3f}, max rel err {r['max_rel_err']:.1e}",
                  flush=True)
        out = Path(args.out or f"bench/results/cp-shaped-{meta['gpu'].replace(' ', '_')}-{meta['commit'][:7]}.json")
        write_text(out, json.dumps(dict(meta=meta, dtype=str(dtype), results=rows), indent=1))
        print(f"wrote {out}")
        return 0
    backends = available_backends(device, dtype)
    wanted = args.backends.split(",") if args.backends else (
        ["moba-triton-direct", "moba-triton-baseline"] if BASELINE else None)
    if wanted:
        unknown = [b for b in wanted if b not in BACKENDS]
        if unknown:
            parser.error(f"unknown backend(s) {', '.join(unknown)}; choose from {', '.join(BACKENDS)}.")
        missing = [b for b in wanted if b not in backends]
        if missing == wanted:
            parser.error(f"none of the backends {', '.join(wanted)} runs on {device.type} in {dtype} here; "
                         f"available: {', '.join(backends)}.")
        if missing:
            print(f"skipping {', '.join(missing)}: not available on {device.type} in {dtype} here", file=sys.stderr)
        backends = [b for b in wanted if b in backends]
    rows = []
    print(HEADER, flush=True)
    for shape in shapes:
        torch.manual_seed(0)
        passes = [p for p in shape.passes if not args.passes or p in args.passes.split(",")]
        for p in passes:
            for backend in backends:
                rows.append(measure(backend, shape, p, device, dtype, args.kernel_times))
                print(format_row(rows[-1]), flush=True)
    meta = environment(device)
    print()
    print(f"{meta['gpu']}  torch {meta['torch']}  triton {meta['triton']}  commit {meta['commit'][:10]}")
    print(HEADER)
    print("-" * len(HEADER))
    print("\n".join(format_row(r) for r in rows))
    changes = baseline_changes(rows)
    if changes:
        print("\nagainst the baseline's kernels (--baseline): ms, baseline / this checkout")
        for c in changes:
            print(f"{c['shape']:<12} {c['passes']:<7} {c['baseline_ms']:>10.2f} {c['ms']:>10.2f} "
                  f"{100 * c['change']:+6.1f}%  ({c['backend']})")
    out = Path(args.out) if args.out else Path("bench/results") / (
        f"attention-{meta['gpu'].replace(' ', '_')}-{meta['date'].replace(':', '')}.json")
    write_text(out, json.dumps(dict(meta=meta, dtype=str(dtype), results=rows,
                                    **(dict(baseline_changes=changes) if changes else {})), indent=1))
    print(f"wrote {out}")
    return 1 if any(r["status"] in ("fail", "error") for r in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
