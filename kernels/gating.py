"""Fused MoBA gating: block mean keys, then a streaming top-k over the blocks per (query, head).

The [tokens, heads, blocks] score matrix is never written: one program holds a tile of queries of
one block, streams the block means of its sequence, and keeps a running top-(topk-1) in registers.
Semantics are those of moba_train/attention/naive.py: fp32, unscaled scores on mean keys; the
current block always selected; candidates are the blocks strictly before it; ties to the lower index;
a NaN score counts as -inf (never chosen). A block's queries are its `q_start`/`q_len` rows (kernels/layout.py).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .layout import BlockLayout, block_layout

NO_BLOCK = -1

GATE_PRECISION = "tf32x3"
"""fp32 gate products on tensor cores as three TF32 products: fp32-level accuracy (the plain "ieee"
FMA dot made gating the forward's bottleneck, bench/NOTES.md)."""

GATE_BF16_SPLIT = True
"""bf16 queries: products against the fp32 means split into three bf16 parts (exact, see the kernel)
instead of TF32x3; fp16 and fp32 queries keep TF32x3 (fp16 residuals would underflow)."""

_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"  # read once, as Triton does when it decorates

GATE_WARPS = 4
GATE_ROWS = 64  # queries per program
GATE_CHUNK = 32  # candidate blocks per step of the streaming top-k (smaller chunks: fewer insertion rounds)


@triton.jit
def _block_mean_kernel(
    k_ptr,
    mean_ptr,
    start_ptr,
    length_ptr,
    stride_kt,
    stride_kh,
    stride_mb,
    stride_mh,
    BLOCK_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    ROWS: tl.constexpr,
):
    """mean[b, h, :] = fp32 mean of the keys of block b, KV head h. Grid (NB, Hkv)."""
    blk = tl.program_id(0)
    head = tl.program_id(1)
    start = tl.load(start_ptr + blk)
    length = tl.load(length_ptr + blk)
    dims = tl.arange(0, HEAD_DIM)
    acc = tl.zeros([HEAD_DIM], dtype=tl.float32)
    for r0 in range(0, BLOCK_SIZE, ROWS):
        rows = r0 + tl.arange(0, ROWS)
        ptrs = k_ptr + (start + rows)[:, None] * stride_kt + head * stride_kh + dims[None, :]
        acc += tl.sum(tl.load(ptrs, mask=(rows < length)[:, None], other=0.0).to(tl.float32), 0)
    tl.store(mean_ptr + blk * stride_mb + head * stride_mh + dims, acc / length.to(tl.float32))


@triton.jit
def _insert_best(scores, cand, best_s, best_i, floor, chunk_max, cols, KP: tl.constexpr):
    """One insertion round: in every row whose best remaining chunk entry (chunk_max, lowest index on
    ties) beats its weakest kept entry (floor), that entry replaces the weakest kept one (the highest
    index among equals) and leaves the chunk. Returns the updated (scores, best_s, best_i, floor, chunk_max)."""
    NONE: tl.constexpr = 2147483647
    take = chunk_max > floor
    chunk_arg = tl.min(tl.where(scores == chunk_max[:, None], cand[None, :], NONE), 1)
    weakest = tl.max(tl.where(best_s == floor[:, None], best_i, -1), 1)
    slot = tl.min(tl.where((best_s == floor[:, None]) & (best_i == weakest[:, None]), cols[None, :], KP), 1)
    put = take[:, None] & (cols[None, :] == slot[:, None])
    best_s = tl.where(put, chunk_max[:, None], best_s)
    best_i = tl.where(put, chunk_arg[:, None], best_i)
    scores = tl.where(take[:, None] & (cand[None, :] == chunk_arg[:, None]), float("-inf"), scores)
    return scores, best_s, best_i, tl.min(best_s, 1), tl.max(scores, 1)


@triton.jit
def _gate_dot(q, means, PRECISION: tl.constexpr, BF16_SPLIT: tl.constexpr, EMULATE: tl.constexpr):
    """fp32 scores q @ means^T of q [M, D] against fp32 means [C, D].

    BF16_SPLIT (q in bf16): the means are split exactly into three bf16 parts, hi + mid + lo (3 x 8
    significand bits hold fp32's 24), and each bf16 x bf16 product is exact in the fp32 accumulator:
    three bf16 matmuls (twice the TF32 rate), smallest part first, and q stays bf16. EMULATE (the
    Triton interpreter, whose bf16 tl.dot is wrong in triton 3.6): the same exact products as fp32
    "ieee" dots. Otherwise q is fp32 and the product takes PRECISION."""
    # One return at the end: Triton compiles the statements after a return inside a constexpr branch.
    if BF16_SPLIT:
        hi = means.to(tl.bfloat16)
        rest = means - hi.to(tl.float32)
        mid = rest.to(tl.bfloat16)
        lo = (rest - mid.to(tl.float32)).to(tl.bfloat16)
        if EMULATE:
            q32 = q.to(tl.float32)
            s = tl.dot(q32, tl.trans(lo.to(tl.float32)), input_precision="ieee")
            s = tl.dot(q32, tl.trans(mid.to(tl.float32)), s, input_precision="ieee")
            s = tl.dot(q32, tl.trans(hi.to(tl.float32)), s, input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(hi), tl.dot(q, tl.trans(mid), tl.dot(q, tl.trans(lo))))
    else:
        s = tl.dot(q, tl.trans(means), input_precision=PRECISION)
    return s


@triton.jit
def _gate_topk_kernel(
    q_ptr,
    mean_ptr,
    sel_ptr,
    start_ptr,
    length_ptr,
    local_ptr,
    first_ptr,
    stride_qt,
    stride_qh,
    stride_mb,
    stride_mh,
    stride_st,
    stride_sh,
    HEADS_PER_PROGRAM: tl.constexpr,
    GROUP: tl.constexpr,
    TILES_PER_BLOCK: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    TOPK: tl.constexpr,
    KP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
    PRECISION: tl.constexpr,
    BF16_SPLIT: tl.constexpr,
    EMULATE_BF16_DOT: tl.constexpr,
):
    """Selection of a tile of BLOCK_M queries of one block (its query rows start_ptr / length_ptr: the
    layout's q_start / q_len). Grid (NB * TILES_PER_BLOCK, Hq / HEADS_PER_PROGRAM).

    HEADS_PER_PROGRAM is 1 (one selection per query head) or GROUP (shared_gqa_selection: the
    group's scores are summed and its heads share the selection). Writes sel[t, h, :TOPK] int32.
    """
    blk = tl.program_id(0) // TILES_PER_BLOCK
    tile = tl.program_id(0) % TILES_PER_BLOCK
    head0 = tl.program_id(1) * HEADS_PER_PROGRAM
    kv_head = head0 // GROUP
    start = tl.load(start_ptr + blk)
    length = tl.load(length_ptr + blk)
    current = tl.load(local_ptr + blk)  # this block's index in its sequence = number of candidates
    first = tl.load(first_ptr + blk)
    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < length
    dims = tl.arange(0, HEAD_DIM)
    cols = tl.arange(0, KP)
    NONE: tl.constexpr = 2147483647
    # Running top-(TOPK-1) per row; empty entries are (-inf, NONE). `floor` is the score an
    # earlier-scanned entry must be beaten by strictly (earlier = lower index = wins ties).
    best_s = tl.where(cols[None, :] < TOPK - 1, tl.full([BLOCK_M, KP], float("-inf"), dtype=tl.float32), float("inf"))
    best_i = tl.full([BLOCK_M, KP], NONE, dtype=tl.int32)
    q_ptrs = q_ptr + (start + rows)[:, None] * stride_qt + dims[None, :]
    q0 = tl.load(q_ptrs + head0 * stride_qh, mask=row_ok[:, None], other=0.0)
    if not BF16_SPLIT:
        q0 = q0.to(tl.float32)
    # Tiles without queries (blocks before a suffix of queries, a partial last tile) scan nothing.
    num_cand = tl.where(tile * BLOCK_M < length, current, 0)
    for c0 in range(0, num_cand, BLOCK_C):
        cand = c0 + tl.arange(0, BLOCK_C)
        cand_ok = cand < current
        means = tl.load(
            mean_ptr + (first + cand)[:, None] * stride_mb + kv_head * stride_mh + dims[None, :],
            mask=cand_ok[:, None],
            other=0.0,
        )
        scores = _gate_dot(q0, means, PRECISION, BF16_SPLIT, EMULATE_BF16_DOT)
        for g in tl.static_range(1, HEADS_PER_PROGRAM):
            q = tl.load(q_ptrs + (head0 + g) * stride_qh, mask=row_ok[:, None], other=0.0)
            if not BF16_SPLIT:
                q = q.to(tl.float32)
            scores += _gate_dot(q, means, PRECISION, BF16_SPLIT, EMULATE_BF16_DOT)
        scores = tl.where(cand_ok[None, :] & (scores == scores), scores, float("-inf"))  # NaN: never chosen
        # Insert chunk entries that beat the row's weakest kept entry, best first (lowest index on
        # ties), each evicting the weakest (highest index among equals). After the first chunks few
        # entries qualify, so this loop usually runs a couple of times, not TOPK-1.
        floor = tl.min(best_s, 1)
        chunk_max = tl.max(scores, 1)
        while tl.max((chunk_max > floor).to(tl.int32), 0) > 0:
            scores, best_s, best_i, floor, chunk_max = _insert_best(
                scores, cand, best_s, best_i, floor, chunk_max, cols, KP
            )
    # Output: the past picks ascending, then the current block, then NO_BLOCK padding.
    past = tl.sort(best_i, 1)
    num_past = tl.sum((best_i != NONE).to(tl.int32), 1)
    out = tl.where(cols[None, :] < num_past[:, None], past, -1)
    out = tl.where(cols[None, :] == num_past[:, None], current, out)
    for g in tl.static_range(HEADS_PER_PROGRAM):
        ptrs = sel_ptr + (start + rows)[:, None] * stride_st + (head0 + g) * stride_sh + cols[None, :]
        tl.store(ptrs, out, mask=row_ok[:, None] & (cols[None, :] < TOPK))


def block_means(k: torch.Tensor, layout: BlockLayout, block_size: int) -> torch.Tensor:
    """fp32 [NB, Hkv, D] mean key of every block."""
    hkv, dim = k.shape[1], k.shape[2]
    means = torch.empty(layout.num_blocks, hkv, dim, dtype=torch.float32, device=k.device)
    if layout.num_blocks:
        _block_mean_kernel[(layout.num_blocks, hkv)](
            k,
            means,
            layout.start,
            layout.length,
            k.stride(0),
            k.stride(1),
            means.stride(0),
            means.stride(1),
            BLOCK_SIZE=block_size,
            HEAD_DIM=dim,
            ROWS=next(n for n in (64, 32, 16) if block_size % n == 0),
        )
    return means


def select_blocks(q, k, layout: BlockLayout, block_size: int, topk: int, shared_gqa_selection: bool) -> torch.Tensor:
    """int32 [T, Hq, topk] selection (layout of moba_selection_naive) for a prepared block layout."""
    total, hq, dim = q.shape
    group = hq // k.shape[1]
    sel = torch.empty(total, hq, topk, dtype=torch.int32, device=q.device)
    if layout.num_blocks == 0:
        return sel
    means = block_means(k, layout, block_size)
    block_m = min(GATE_ROWS, triton.next_power_of_2(block_size))
    heads_per_program = group if shared_gqa_selection else 1
    tiles = triton.cdiv(block_size, block_m)
    grid = (layout.num_blocks * tiles, hq // heads_per_program)
    _gate_topk_kernel[grid](
        q,
        means,
        sel,
        layout.q_start,
        layout.q_len,
        layout.local,
        layout.first,
        q.stride(0),
        q.stride(1),
        means.stride(0),
        means.stride(1),
        sel.stride(0),
        sel.stride(1),
        HEADS_PER_PROGRAM=heads_per_program,
        GROUP=group,
        TILES_PER_BLOCK=tiles,
        HEAD_DIM=dim,
        TOPK=topk,
        KP=max(2, triton.next_power_of_2(topk)),
        BLOCK_M=block_m,
        BLOCK_C=GATE_CHUNK,
        PRECISION=GATE_PRECISION,
        BF16_SPLIT=GATE_BF16_SPLIT and q.dtype == torch.bfloat16,
        EMULATE_BF16_DOT=_INTERPRETED,
        num_warps=GATE_WARPS,
    )
    return sel


def moba_selection_triton(
    q, k, cu_seqlens, block_size, topk, shared_gqa_selection=False, *, cu_seqlens_k=None, host_cu_seqlens=None
) -> torch.Tensor:
    """Selected key blocks per (query, head): int32 [Tq, Hq, topk], as moba_selection_naive.

    q [Tq, Hq, D], k [Tk, Hkv, D] (bf16, fp16 or fp32), cu_seqlens int32 [N+1] (the queries' offsets;
    cu_seqlens_k the keys', default the same: queries are the last len_q keys of their sequence);
    host_cu_seqlens: both as ints, to spare a device read. Block indices are local to the query's
    sequence, ascending, NO_BLOCK (-1) padded.
    """
    check_inputs(q, k, block_size, topk)
    q, k = q.contiguous(), k.contiguous()
    cu_k = cu_seqlens if cu_seqlens_k is None else cu_seqlens_k
    layout = block_layout(cu_seqlens, cu_k, block_size, q.shape[0], k.shape[0], q.device, host_cu_seqlens)
    return select_blocks(q, k, layout, block_size, topk, shared_gqa_selection)


def check_inputs(q, k, block_size: int, topk: int) -> None:
    """User errors on shapes and options, one sentence each."""
    if q.dim() != 3 or k.dim() != 3 or q.shape[0] > k.shape[0] or q.shape[2] != k.shape[2]:
        raise ValueError(
            "q must be [Tq, Hq, D] and k, v [Tk, Hkv, D] with the same D and Tq <= Tk; "
            f"got {tuple(q.shape)} and {tuple(k.shape)}."
        )
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"query heads ({q.shape[1]}) must be a multiple of KV heads ({k.shape[1]}).")
    dim = q.shape[2]
    if dim < 16 or dim > 256 or dim & (dim - 1):
        raise ValueError(
            f"the Triton MoBA kernels need a power-of-two head dim in [16, 256]; got {dim}, use the torch backend."
        )
    if block_size < 16 or block_size % 16:
        raise ValueError(f"block_size must be a positive multiple of 16 for the Triton MoBA kernels; got {block_size}.")
    if topk < 1:
        raise ValueError(f"topk must be at least 1 (the current block); got {topk}.")
