"""Quick GPU check and timing of the Triton MoBA kernels against dense SDPA and FA2 varlen (one process).

Usage (on a CUDA machine, repo root): PYTHONPATH=$PWD python3 scripts/bench_kernels.py [--out DIR]
Checks correctness (bf16, against the naive definition at a moderate shape), then times the
BENCH.md shapes (median of CUDA-event timings via triton.testing.do_bench), prints a table and writes
triton_dev.json. The official table is scripts/bench_attention.py; this is the kernel author's loop.

--variants: compare variants instead (module attributes of kernels.workspace / interface / backward /
forward / gating replaced per variant: workspace or slot passes, budgets, tilings, gating):
correctness of every variant first, then timings and per-kernel breakdowns, written to variants.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import moba_train.kernels.backward
import moba_train.kernels.forward
import moba_train.kernels.gating
import moba_train.kernels.interface
import moba_train.kernels.routing
import moba_train.kernels.workspace
import torch
import torch.nn.functional as F
import triton
from moba_train.kernels import moba_attention_triton, moba_selection_triton
from moba_train.kernels.backward import DkdvTiles
from moba_train.kernels.forward import SlotTiles
from triton.testing import do_bench

from moba_train.staging import write_text


def load_naive():
    """moba_train/attention/naive.py by path: it needs torch only, the package needs the whole framework."""
    path = Path(__file__).resolve().parents[1] / "moba_train" / "attention" / "naive.py"
    spec = importlib.util.spec_from_file_location("moba_naive", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def moba_flops(seq_len: int, block: int, topk: int, dim: int) -> float:
    """Forward attention FLOPs of one head of one sequence (BENCH.md): 4 * D * sum_t n_t."""
    t = torch.arange(seq_len, dtype=torch.float64)
    n = (t % block) + 1 + block * torch.clamp(torch.div(t, block, rounding_mode="floor"), max=topk - 1)
    return 4.0 * dim * float(n.sum())


def dense_flops(seq_len: int, dim: int) -> float:
    return 4.0 * dim * seq_len * (seq_len + 1) / 2


def rel_err(a, b) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


CORRECTNESS_CASES = [  # name, cu_seqlens, Hq, Hkv, D, block, top-k, shared GQA selection[, skewed routing]
    ("mha_b128_top8", [0, 3072, 6144], 16, 16, 128, 128, 8, False),
    ("gqa_varlen_b64_top4_shared", [0, 1000, 1017, 3000], 8, 2, 64, 64, 4, True),
    ("gqa_b48_top3", [0, 2000], 4, 2, 128, 48, 3, False),
    ("gqa_varlen_b512_top3", [0, 4100, 6144], 8, 2, 128, 512, 3, False),
    # the training recipes' head dim: workspace dQ (block 512) and slot passes both ways (block 2048)
    ("gqa_d64_varlen_b512_top3", [0, 4100, 6144], 8, 2, 64, 512, 3, False),
    ("gqa_d64_varlen_b2048_top4", [0, 9000, 12288], 8, 2, 64, 2048, 4, False),
    # the quality study's attention (configs/study: 12 query / 4 KV heads, a group of 3), at its 8K length, with
    # random routing and with training's skew (every query draws its sequence's first block: split dK/dV programs)
    ("study_d64_g3_b512_top3", [0, 8192, 16384], 12, 4, 64, 512, 3, False),
    ("study_d64_g3_b512_top3_skew", [0, 8192, 16384], 12, 4, 64, 512, 3, False, True),
]


def check_correctness(naive, only_dim: int | None = None) -> dict:
    """bf16 out/grads vs the fp32 naive definition; selection vs naive on identical inputs (the cases of
    head dim `only_dim` if given)."""
    results = {}
    torch.manual_seed(0)
    cases = [case for case in CORRECTNESS_CASES if only_dim is None or case[4] == only_dim]
    for name, cu, hq, hkv, dim, block, topk, shared, *skew in cases:
        cu_t = torch.tensor(cu, dtype=torch.int32, device="cuda")
        total = cu[-1]
        q = torch.randn(total, hq, dim, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(total, hkv, dim, device="cuda", dtype=torch.bfloat16)
        v = torch.randn(total, hkv, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        if skew and skew[0]:  # as bench_shape's skew
            q += 1.0
            for start in cu[:-1]:
                k[start:start + block] += 2.0
        q.requires_grad_()
        k.requires_grad_()
        sel = moba_selection_triton(q, k, cu_t, block, topk, shared)
        sel_ref = naive.moba_selection_naive(
            q, k, cu_seqlens=cu_t, block_size=block, topk=topk, shared_gqa_selection=shared
        )
        out = moba_attention_triton(q, k, v, cu_t, block, topk, shared_gqa_selection=shared)
        dout = torch.randn_like(out)
        grads = torch.autograd.grad(out, (q, k, v), dout)
        out2 = moba_attention_triton(q, k, v, cu_t, block, topk, shared_gqa_selection=shared)
        grads2 = torch.autograd.grad(out2, (q, k, v), dout)
        ref = naive.moba_attention_naive(
            q.float(), k.float(), v.float(), cu_seqlens=cu_t, block_size=block, topk=topk, shared_gqa_selection=shared
        )
        ref_grads = torch.autograd.grad(ref, (q, k, v), dout.float())
        row = {
            "selection_mismatch_frac": float((sel != sel_ref).any(-1).float().mean()),
            "out_rel_err": rel_err(out, ref),
            "dq_rel_err": rel_err(grads[0], ref_grads[0]),
            "dk_rel_err": rel_err(grads[1], ref_grads[1]),
            "dv_rel_err": rel_err(grads[2], ref_grads[2]),
            "deterministic": bool(torch.equal(out, out2) and all(torch.equal(a, b) for a, b in zip(grads, grads2))),
            "nan": bool(torch.isnan(out).any() or any(torch.isnan(g).any() for g in grads)),
        }
        results[name] = row
        print(name, json.dumps(row), flush=True)
        del ref, ref_grads
        torch.cuda.empty_cache()
    return results


def sdpa_causal(q, k, v, batch):
    """q [b*s, H, D] -> SDPA causal on [b, H, s, D]."""

    def split(x):
        return x.view(batch, -1, x.shape[1], x.shape[2]).transpose(1, 2)

    return F.scaled_dot_product_attention(split(q), split(k), split(v), is_causal=True)


def fa2_causal(q, k, v, cu, max_len):
    from torch.nn.attention.varlen import varlen_attn

    return varlen_attn(q, k, v, cu, cu, max_len, max_len, window_size=(-1, 0))


def measure(fn, backward: bool, reps_ms: int, params=()):
    """(median ms, peak memory GiB above the inputs) of fn() or fn() + backward (params' grads reset
    after each backward, as scripts/bench_attention.py does: no accumulation kernels in the timing)."""

    def step():
        out = fn()
        if backward:
            out.backward(grad)
            for p in params:
                p.grad = None

    out = fn()
    grad = torch.randn_like(out)
    del out
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    peak_total = torch.cuda.max_memory_allocated() / 2**30
    peak = peak_total - base / 2**30
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    step()
    end.record()
    torch.cuda.synchronize()
    if start.elapsed_time(end) > 150:  # seconds-long dense baselines: 3 timed repetitions, median
        times = []
        for _ in range(3):
            start.record()
            step()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        return sorted(times)[1], peak, peak_total, sorted(times)[1]
    ms = do_bench(step, warmup=max(reps_ms // 4, 1), rep=reps_ms, return_mode="median")
    synced = []  # as scripts/bench_attention.py times: each step from an idle GPU, host overhead included
    for _ in range(10):
        start.record()
        step()
        end.record()
        torch.cuda.synchronize()
        synced.append(start.elapsed_time(end))
    return ms, peak, peak_total, sorted(synced)[5]


def bench_shape(name, batch, heads, seq_len, block, topk, passes, dense: bool, dim=128, kv_heads=None, skew=False):
    """`skew`: every query draws its sequence's first block (a shared offset in the queries and in that block's
    keys), the extreme of the skewed routing of training."""
    total = batch * seq_len
    cu = torch.arange(0, total + 1, seq_len, dtype=torch.int32, device="cuda")
    q = torch.randn(total, heads, dim, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(total, kv_heads or heads, dim, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(total, kv_heads or heads, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    if skew:
        q += 1.0
        for start in range(0, total, seq_len):
            k[start:start + block] += 2.0
    q.requires_grad_()
    k.requires_grad_()
    rows = []
    fwd_flops = moba_flops(seq_len, block, topk, dim) * batch * heads
    dense_fwd = dense_flops(seq_len, dim) * batch * heads
    reps = 200
    backends = [("triton", lambda: moba_attention_triton(q, k, v, cu, block, topk), fwd_flops)]
    if dense:
        backends += [
            ("sdpa", lambda: sdpa_causal(q, k, v, batch), dense_fwd),
            ("fa2_varlen", lambda: fa2_causal(q, k, v, cu, seq_len), dense_fwd),
        ]
    for backend, fn, flops in backends:
        for pas in passes:
            try:
                ms, peak, peak_total, ms_synced = measure(fn, pas == "fwd+bwd", reps, (q, k, v))
                mult = 3.5 if pas == "fwd+bwd" else 1.0
                row = dict(
                    shape=name,
                    backend=backend,
                    pass_=pas,
                    ms=ms,
                    ms_synced=ms_synced,
                    tflops=flops * mult / ms / 1e9,
                    peak_gib=peak,
                    peak_total_gib=peak_total,
                )
            except Exception as exc:  # noqa: BLE001 - a failing baseline must not hide the others
                row = dict(shape=name, backend=backend, pass_=pas, error=repr(exc)[:300])
            q.grad = k.grad = v.grad = None
            rows.append(row)
            print(json.dumps(row), flush=True)
            torch.cuda.empty_cache()
    return rows


def kernel_breakdown(name, batch, heads, seq_len, block, topk, passes, dense, dim=128, kv_heads=None):
    """Per-kernel device time of one Triton MoBA call (torch.profiler), to see where the time goes."""
    total = batch * seq_len
    cu = torch.arange(0, total + 1, seq_len, dtype=torch.int32, device="cuda")
    q, k, v = (
        torch.randn(total, h, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        for h in (heads, kv_heads or heads, kv_heads or heads)
    )
    backward = "fwd+bwd" in passes

    def step():
        out = moba_attention_triton(q, k, v, cu, block, topk)
        if backward:
            out.backward(torch.ones_like(out))
            q.grad = k.grad = v.grad = None

    step()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    rows = []
    for evt in prof.key_averages():
        dev_us = getattr(evt, "self_device_time_total", None) or getattr(evt, "self_cuda_time_total", 0)
        if dev_us > 0:
            rows.append({"kernel": evt.key[:60], "calls": evt.count, "ms": dev_us / 1e3})
    rows.sort(key=lambda r: -r["ms"])
    print(
        f"--- {name} kernel breakdown ({'fwd+bwd' if backward else 'fwd'}), total {sum(r['ms'] for r in rows):.2f} ms"
    )
    for r in rows[:14]:
        print(f"{r['ms']:9.3f} ms {r['calls']:4d}x  {r['kernel']}")
    return {"shape": name, "pass_": "fwd+bwd" if backward else "fwd", "kernels": rows}


# name: module attribute overrides (kernels.workspace budgets, tilings, gating), shapes
SLOTS = {"workspace.INFERENCE_BUDGET": 0.0, "workspace.TRAINING_BUDGET": 0.0}
VARIANTS = {  # the variants measured in each session are in bench/NOTES.md and bench/results/triton_variants_*.json
    "workspace": ({}, "all"),
    "gate_tf32x3": ({"gating.GATE_BF16_SPLIT": False}, ("small",)),
    "gate_chunk64": ({"gating.GATE_CHUNK": 64}, ("small",)),
    "gate_rows128_w8": ({"gating.GATE_ROWS": 128, "gating.GATE_WARPS": 8}, ("small",)),
    "current_dq_kernel": ({"backward.CURRENT_DQ_IN_DKDV": False}, ("small",)),
    "int32_run_keys": ({"routing.SHORT_KEYS_MAX": 0}, ("small",)),
    "dq_merge_rows64": ({"backward.DQ_MERGE_ROWS": 64}, ("small",)),
    "slots": (SLOTS, ("bwd",)),
    # head dim 64 (the training recipes): tilings of the slot passes, the dK/dV programs and the dQ kernels
    "d64_base": ({}, ("d64",)),
    "d64_fwd_k128": ({"forward.LARGE_BLOCK_TILES": SlotTiles(128, 128, 8, 3)}, ("d64",)),
    "d64_fwd_k128_s2": ({"forward.LARGE_BLOCK_TILES": SlotTiles(128, 128, 8, 2)}, ("d64",)),
    "d64_fwd_w4": ({"forward.LARGE_BLOCK_TILES": SlotTiles(128, 64, 4, 3)}, ("d64",)),
    "d64_fwd_s4": ({"forward.LARGE_BLOCK_TILES": SlotTiles(128, 64, 8, 4)}, ("d64",)),
    "d64_dkdv_m64": ({"backward.DKDV_TILES_D64": DkdvTiles(128, 64, 8, 3)}, ("d64",)),
    "d64_dkdv_w4": ({"backward.DKDV_TILES_D64": DkdvTiles(128, 32, 4, 3)}, ("d64",)),
    "d64_dkdv_m64_w4": ({"backward.DKDV_TILES_D64": DkdvTiles(128, 64, 4, 3)}, ("d64",)),
    "d64_dkdv_s4": ({"backward.DKDV_TILES_D64": DkdvTiles(128, 32, 8, 4)}, ("d64",)),
    "d64_dq_w8": ({"backward.SMALL_DIM_WARPS": 8}, ("d64",)),
    "d64_ws_kt8": ({"workspace.MAX_KEY_TILES": 8}, ("d64",)),
    # after session 7's first sweep (the base dK/dV tiling at D 64 became d64_dkdv_w4's)
    "d64_dkdv_w4_s2": ({"backward.DKDV_TILES_D64": DkdvTiles(128, 32, 4, 2)}, ("d64",)),
    "d64_dkdv_w4_s4": ({"backward.DKDV_TILES_D64": DkdvTiles(128, 32, 4, 4)}, ("d64",)),
    "d64_dkdv_m16_w4": ({"backward.DKDV_TILES_D64": DkdvTiles(128, 16, 4, 3)}, ("d64",)),
    "d64_dkdv_k64_w4": ({"backward.DKDV_TILES_D64": DkdvTiles(64, 32, 4, 3), "workspace.MAX_KEY_TILES": 8}, ("d64",)),
    "d64_dq_w2": ({"backward.SMALL_DIM_WARPS": 2}, ("d64",)),
    "d64_dq_untransposed": ({"backward.DKDV_TILES_D64": DkdvTiles(256, 32, 8, 3, False)}, ("d64",)),
    "d64_merge_rows64": ({"backward.MERGE_ROWS": 64}, ("d64",)),
    "d64_merge_w8": ({"backward.MERGE_WARPS": 8}, ("d64",)),
    # dK/dV of one block split over programs (backward.dkdv_splits): training's routing is skewed
    "d64_splits1": ({"backward.MAX_DKDV_SPLITS": 1}, ("d64",)),
    "d64_splits4": ({"backward.MAX_DKDV_SPLITS": 4}, ("d64",)),
    "d64_splits8_w8": ({"backward.DKDV_TILES_D64": DkdvTiles(128, 32, 8, 3)}, ("d64",)),
    # session 10 (d64_split_uniform, session 8's rule of splitting every block alike, was removed after its run)
    "d64_dkdv_w4_s5": ({"backward.DKDV_TILES_D64": DkdvTiles(128, 32, 4, 5)}, ("d64",)),
    "d64_dkdv_k256_w8": ({"backward.DKDV_TILES_D64": DkdvTiles(256, 32, 8, 3)}, ("d64",)),
    # (d64_causal_masked and d64_row_mask, timed in triton_variants_24_d64_causes.json, set switches that 821f22c
    # removed: kept, they would time the shipped kernel under their names)
    "d64_k256_splits1": ({"backward.DKDV_TILES_D64": DkdvTiles(256, 32, 8, 3), "backward.MAX_DKDV_SPLITS": 1},
                         ("d64",)),
    # session 14: Triton's automatic warp specialisation of the dK/dV gather loop (Hopper autoWS)
    "d64_dkdv_ws": ({"backward.DKDV_WARP_SPECIALIZE": True}, ("d64",)),
    "d64_dkdv_ws_k128_w4": ({"backward.DKDV_WARP_SPECIALIZE": True,
                             "backward.DKDV_TILES_D64": DkdvTiles(128, 32, 4, 3)}, ("d64",)),
    "d64_k256_w8_s2": ({"backward.DKDV_TILES_D64": DkdvTiles(256, 32, 8, 2)}, ("d64",)),
    # session 15: what the r32k-b512 dK/dV spends on the gathers and on the dQ partials (timing probes: their
    # correctness rows are wrong by design; backward.DKDV_PROBE)
    "d64_probe_rows": ({"backward.DKDV_PROBE": 1}, ("d64",)),
    "d64_probe_no_dq": ({"backward.DKDV_PROBE": 2}, ("d64",)),
    "d64_probe_both": ({"backward.DKDV_PROBE": 3}, ("d64",)),
    # session 16: of the dQ partials' 2.1 ms, the products alone (summed in registers, not transposed nor stored)
    "d64_probe_dq_product": ({"backward.DKDV_PROBE": 4}, ("d64",)),
    # and the kernel the probes would call for: q, dO, lse and delta packed into routing order (a correct variant)
    "d64_packed": ({"backward.DKDV_PACKED": True}, ("d64",)),
    # session 16: the packed dK/dV at the standard shapes (head dim 128) too, before it could become the default
    "std_base": ({}, ("small", "bwd")),
    "std_packed": ({"backward.DKDV_PACKED": True}, ("small", "bwd")),
    # after session 16 (packed where a block has several key tiles): the gathered dK/dV everywhere, for comparison
    "d64_gathered": ({"backward.DKDV_PACKED": False}, ("d64",)),
    # and 64-row query steps over the packed rows: a dQ partial product of N = 64 instead of 32 (the dQ partials
    # cost 2.1 of dK/dV's 7.6 ms at r32k-b512), against more registers (128 keys: 4 partials per pick)
    "d64_k128_m64": ({"backward.DKDV_TILES_D64": DkdvTiles(128, 64, 8, 3)}, ("d64",)),
    "d64_k256_m64_s2": ({"backward.DKDV_TILES_D64": DkdvTiles(256, 64, 8, 2)}, ("d64",)),
    # session 17: the packed rows of q and dO by TMA (backward.DKDV_TMA), and Triton's warp specialisation over
    # them (it failed to compile over gathered rows in session 14); the probe without dQ partials says what warp
    # specialisation gives the products alone
    "d64_packed_tma": ({"backward.DKDV_TMA": True}, ("d64",)),
    "d64_packed_ws": ({"backward.DKDV_WARP_SPECIALIZE": True}, ("d64",)),
    "d64_packed_tma_ws": ({"backward.DKDV_TMA": True, "backward.DKDV_WARP_SPECIALIZE": True}, ("d64",)),
    "d64_probe_no_dq_tma": ({"backward.DKDV_PROBE": 2, "backward.DKDV_TMA": True}, ("d64",)),
    "d64_probe_no_dq_tma_ws": ({"backward.DKDV_PROBE": 2, "backward.DKDV_TMA": True,
                                "backward.DKDV_WARP_SPECIALIZE": True}, ("d64",)),
    # session 19 (no GPU; scripts/compile_kernels.py): the shipped 256-key dK/dV spills in its main loop on sm_90 (33
    # spill instructions); with the dQ partials as dS K, at 3 or 2 stages or with 16-row query steps, it does not
    "d64_dq_untransposed_s2": ({"backward.DKDV_TILES_D64": DkdvTiles(256, 32, 8, 2, False)}, ("d64",)),
    "d64_dq_untransposed_m16": ({"backward.DKDV_TILES_D64": DkdvTiles(256, 16, 8, 3, False)}, ("d64",)),
    # session 20 (dS K became the 256-key tiling's form): the form shipped before, for comparison
    "d64_dq_transposed": ({"backward.DKDV_TILES_D64": DkdvTiles(256, 32, 8, 3, True)}, ("d64",)),
}
VARIANT_SHAPES = {
    "s32k-b128": ((2, 16, 32768, 128, 8, ("fwd", "fwd+bwd"), False), "small"),
    "s64k-b128": ((2, 16, 65536, 128, 8, ("fwd+bwd",), False), "small"),
    "s32k-b512": ((2, 16, 32768, 512, 3, ("fwd", "fwd+bwd"), False), "bwd"),
    "s128k-b4096": ((1, 32, 131072, 4096, 12, ("fwd",), False), "all"),
    "s1m-b4096": ((1, 2, 1048576, 4096, 12, ("fwd",), False), "all"),
    # the recipes' attention (bench_attention.py --set recipes): head dim 64, 32 query / 8 KV heads
    "r32k-b2048": ((2, 32, 32768, 2048, 4, ("fwd", "fwd+bwd"), False, 64, 8), "d64"),
    "r32k-b512": ((2, 32, 32768, 512, 3, ("fwd", "fwd+bwd"), False, 64, 8), "d64"),
    "r128k-b1024": ((1, 32, 131072, 1024, 4, ("fwd", "fwd+bwd"), False, 64, 8), "d64"),
    "r32k-b512-skew": ((1, 32, 32768, 512, 3, ("fwd+bwd",), False, 64, 8, True), "d64"),
}
MODULES = {
    "workspace": moba_train.kernels.workspace,
    "interface": moba_train.kernels.interface,
    "backward": moba_train.kernels.backward,
    "forward": moba_train.kernels.forward,
    "gating": moba_train.kernels.gating,
    "routing": moba_train.kernels.routing,
}


def apply_variant(overrides: dict) -> dict:
    """Set the overrides; returns the previous values (to restore)."""
    previous = {}
    for key, value in overrides.items():
        module, attr = key.split(".")
        previous[key] = getattr(MODULES[module], attr)
        setattr(MODULES[module], attr, value)
    return previous


def gating_probe(result: dict) -> None:
    """Selection alone at s32k-b128 with top-8 and top-2 (the same scores and loads, but top-2 keeps one
    entry per row: the gap is the cost of the top-k upkeep), and a near tie finer than bf16: block 1's
    mean key exceeds block 0's by 2^-11 per dimension, so only an fp32-exact gate picks block 1."""
    total, heads, dim = 65536, 16, 128
    cu = torch.arange(0, total + 1, 32768, dtype=torch.int32, device="cuda")
    q, k = (torch.randn(total, heads, dim, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    probe = {
        f"top{topk}_ms": do_bench(lambda: moba_selection_triton(q, k, cu, 128, topk), warmup=25, rep=200)
        for topk in (8, 2)
    }
    k = torch.ones(48, 1, 16, device="cuda")
    k[16] = 1 + 2**-7
    tie = moba_selection_triton(torch.ones_like(k).bfloat16(), k.bfloat16(), cu.new_tensor([0, 48]), 16, 2)
    probe["near_tie_picks_block_1"] = tie[40, 0].tolist() == [1, 2]
    result["gating_probe"] = probe
    print("gating probe:", probe, flush=True)


def compare_variants(result: dict, save, names=None, shapes=None) -> None:
    """Correctness of every variant (selection, out, dq, dk, dv vs the fp32 naive definition), then
    timings ("all" variants time every shape; others the shapes of their kind and "all"; only `shapes` if
    given)."""
    naive = load_naive()
    result.update(correctness={}, timings=[], breakdown=[])
    variants = {name: VARIANTS[name] for name in (names or VARIANTS)}
    for name, (overrides, which) in variants.items():
        previous = apply_variant(overrides)
        print("== correctness", name, flush=True)
        try:
            result["correctness"][name] = check_correctness(naive, 64 if which == ("d64",) else None)
        except Exception as error:  # a variant that does not compile must not cost the others their call
            result["correctness"][name] = {"error": f"{type(error).__name__}: {error}"[:2000]}
            print(f"{name}: {result['correctness'][name]['error'][:300]}", flush=True)
        finally:
            apply_variant(previous)
        save()
    for name, (overrides, which) in variants.items():
        if "error" in result["correctness"][name]:  # it did not compile
            continue
        previous = apply_variant(overrides)
        for shape, (args, kind) in VARIANT_SHAPES.items():
            if shapes and shape not in shapes:
                continue
            if which == "all" or kind in which:
                for row in bench_shape(shape, *args):
                    result["timings"].append(dict(row, variant=name))
                print(f"{name} {shape} done", flush=True)
                save()
        for shape in ("s32k-b128", "s32k-b512", "r32k-b2048", "r32k-b512"):
            args, kind = VARIANT_SHAPES[shape]
            if (which == "all" and kind != "d64" or kind in which) and (not shapes or shape in shapes):
                result["breakdown"].append(
                    dict(kernel_breakdown(shape, *args[:5], ("fwd+bwd",), False, *args[7:]), variant=name))
        save()
        apply_variant(previous)
    print(f"\n{'variant':22} {'shape':12} {'pass':8} {'ms':>9} {'synced':>9} {'TFLOP/s':>8} {'peakGiB':>8}")
    for row in result["timings"]:
        if "error" in row:
            print(f"{row['variant']:22} {row['shape']:12} {row['pass_']:8} ERROR {row['error'][:80]}")
        else:
            print(
                f"{row['variant']:22} {row['shape']:12} {row['pass_']:8} {row['ms']:9.2f} {row['ms_synced']:9.2f}"
                f" {row['tflops']:8.1f}"
                f" {row['peak_total_gib']:8.2f}"
            )
    for name, cases in result["correctness"].items():
        if "error" in cases:
            print(f"{name:22} FAILED {cases['error'][:100]}")
            continue
        worst = max(max(v for key, v in row.items() if key.endswith("rel_err")) for row in cases.values())
        ok = all(
            row["deterministic"] and not row["nan"] and row["selection_mismatch_frac"] == 0 for row in cases.values()
        )
        print(f"{name:22} max rel err {worst:.2e} deterministic/no-NaN/selection {ok}")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--skip-check", action="store_true")
    parser.add_argument("--variants", action="store_true", help="compare variants (writes variants.json)")
    parser.add_argument("--variant-names", help="comma-separated subset of VARIANTS (default: all)")
    parser.add_argument("--variant-shapes", help="comma-separated subset of VARIANT_SHAPES (default: all)")
    parser.add_argument("--gating-probe", action="store_true", help="time selection at top-8 and top-2")
    head = subprocess.run(["git", "rev-parse", "--verify", "-q", "HEAD"], capture_output=True, text=True).stdout.strip()
    parser.add_argument(
        "--commit", default=head or "unknown", help="commit of the kernels (the device copy has no .git)"
    )
    parser.add_argument("--shapes", default="s32k-b128,s64k-b128,s32k-b512,s128k-b128,s1m-b4096")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("error: bench_kernels.py times the Triton kernels on a CUDA device; run it on a GPU machine",
              file=sys.stderr)
        sys.exit(2)
    t0 = time.time()
    meta = {
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "commit": args.commit,
    }
    result = {"meta": meta}
    out_file = Path(args.out) / ("variants.json" if args.variants else "triton_dev.json")
    out_file.parent.mkdir(parents=True, exist_ok=True)

    def save():  # after every stage, so a run cut short still leaves its numbers
        write_text(out_file, json.dumps(result, indent=1))

    if args.variants:
        if args.gating_probe:
            gating_probe(result)
        compare_variants(result, save, args.variant_names.split(",") if args.variant_names else None,
                         args.variant_shapes.split(",") if args.variant_shapes else None)
        return

    if not args.skip_check:
        result["correctness"] = check_correctness(load_naive())
        save()
        print(f"correctness done at {time.time() - t0:.0f}s", flush=True)
    shapes = {
        "s32k-b128": (2, 16, 32768, 128, 8, ("fwd", "fwd+bwd"), True),
        "s64k-b128": (2, 16, 65536, 128, 8, ("fwd", "fwd+bwd"), True),
        "s32k-b512": (2, 16, 32768, 512, 3, ("fwd", "fwd+bwd"), True),
        "s128k-b128": (2, 16, 131072, 128, 8, ("fwd+bwd",), False),
        "s1m-b4096": (1, 2, 1048576, 4096, 12, ("fwd",), True),
    }
    result["breakdown"] = []
    for name in ("s32k-b128", "s32k-b512", "s1m-b4096"):
        try:
            result["breakdown"].append(kernel_breakdown(name, *shapes[name]))
        except Exception as exc:  # noqa: BLE001 - the profiler is a diagnostic, the table matters more
            print(name, "breakdown failed:", repr(exc)[:300], flush=True)
        torch.cuda.empty_cache()
    save()
    print(f"breakdown done at {time.time() - t0:.0f}s", flush=True)
    result["timings"] = []
    for name in args.shapes.split(","):
        result["timings"] += bench_shape(name, *shapes[name])
        save()
        print(f"{name} done at {time.time() - t0:.0f}s", flush=True)
    print(f"\n{'shape':12} {'backend':11} {'pass':8} {'ms':>9} {'TFLOP/s':>8} {'peakGiB':>8} {'totalGiB':>8}")
    for row in result["timings"]:
        if "error" in row:
            print(f"{row['shape']:12} {row['backend']:11} {row['pass_']:8} ERROR {row['error'][:80]}")
        else:
            print(
                f"{row['shape']:12} {row['backend']:11} {row['pass_']:8} {row['ms']:9.2f} {row['tflops']:8.1f} "
                f"{row['peak_gib']:8.2f} {row['peak_total_gib']:8.2f}"
            )


if __name__ == "__main__":
    main()
