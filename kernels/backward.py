"""MoBA attention backward, deterministic (no atomics).

- dK, dV: one program owns up to 128 keys of one (KV head, block) and loops over every query that
  attends them: the causal queries of the block itself (all heads of the KV group), then the
  gathered queries of all past slots (one contiguous run of the routing rows). In training the
  routing is skewed (a few blocks, such as a sequence's first, are picked by most queries), so a
  popular block's picks are split over several programs (the count from its run's length, on the
  device: `dkdv_schedule`), each writing fp32 partial dK/dV that `_dkdv_reduce_kernel` sums in a
  fixed order; otherwise one program walks every pick of a popular block while the rest of the GPU
  idles. Blocks of ordinary popularity stay whole and write dK/dV directly.
- dQ, workspace passes (kernels/workspace.py): every dK/dV program writes the dQ partials of its
  keys for its block's picks from the dS already in its registers (one row per pick and key tile, at
  the pick's (query head, token, slot) row). Blocks of one key tile (up to 128 keys): the program
  holds all the keys of its block, so it also writes the complete causal dQ of the block's own
  queries into dq, and `_dq_merge_kernel` adds each query's partials (a pure read of contiguous
  rows); larger blocks: the causal current-block kernel computes that part and adds the partials.
- dQ, slot passes: the current-block kernel writes fp32 dQ and one gathered pass per slot adds into
  it in place (a (query, head) appears once per slot, so no two programs touch the same row).
Gathered dQ programs walk their tile (64 or 128 rows, `SlotTiles`) in 64-row sub-tiles: a 128-row
fp32 dQ accumulator next to q and dO would not fit the registers.
Probabilities are recomputed from the saved base-2 log-sum-exp; delta = rowsum(dO * O).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .forward import LOG2E, SlotTiles, block_queries, block_run, causal_keys, key_tile, load_picks, workspace_rows
from .layout import BlockLayout
from .routing import Routing
from .workspace import Workspace


@triton.jit
def add_dq_partials(dq, part_dq_ptr, base, num_past, SLOTS: tl.constexpr, KTILES: tl.constexpr):
    """dq [rows, D] fp32 plus the rows' dQ partials from the workspace: KTILES rows per pick from
    `base` (forward.workspace_rows * KTILES), valid slots 0 .. num_past - 1."""
    dims = tl.arange(0, dq.shape[1])
    for j in tl.static_range(SLOTS * KTILES):
        dq += tl.load(
            part_dq_ptr + (base + j)[:, None] * dq.shape[1] + dims[None, :],
            mask=(j // KTILES < num_past)[:, None],
            other=0.0,
        ).to(tl.float32)
    return dq


@triton.jit
def _delta_kernel(
    o_ptr, do_ptr, dlse_ptr, delta_ptr, num_rows, HEAD_DIM: tl.constexpr, ROWS: tl.constexpr, DLSE: tl.constexpr
):
    """delta[r] = sum_d O[r, d] * dO[r, d] (minus dlse[r] with DLSE: the gradient of the natural lse output
    adds p * dlse to dS) over rows r of contiguous [T * Hq, D]. Grid (cdiv(rows, ROWS),)."""
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    ok = rows < num_rows
    offs = rows[:, None] * HEAD_DIM + tl.arange(0, HEAD_DIM)[None, :]
    o = tl.load(o_ptr + offs, mask=ok[:, None], other=0.0).to(tl.float32)
    do = tl.load(do_ptr + offs, mask=ok[:, None], other=0.0).to(tl.float32)
    delta = tl.sum(o * do, 1)
    if DLSE:
        delta -= tl.load(dlse_ptr + rows, mask=ok, other=0.0)
    tl.store(delta_ptr + rows, delta, mask=ok)


@triton.jit
def _pack_picks_kernel(
    q_ptr, do_ptr, lse_ptr, delta_ptr, rows_ptr, pq_ptr, pdo_ptr, plse_ptr, pdelta_ptr, num_rows, stride_qt,
    stride_qh, num_q_heads, SLOTS: tl.constexpr, HEAD_DIM: tl.constexpr, ROWS: tl.constexpr,
):
    """q, dO, lse and delta of the picks copied in routing order (`DKDV_PACKED`): row j of the packed arrays
    is pick rows[j]'s, so dK/dV reads a run's picks as contiguous rows. Grid (cdiv(num_rows, ROWS),)."""
    at = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    ok = at < num_rows
    pick, flat, t, h = load_picks(rows_ptr, at, ok, SLOTS, num_q_heads)
    dims = tl.arange(0, HEAD_DIM)
    src = t[:, None] * stride_qt + h[:, None] * stride_qh + dims[None, :]
    dst = at.to(tl.int64)[:, None] * HEAD_DIM + dims[None, :]
    tl.store(pq_ptr + dst, tl.load(q_ptr + src, mask=ok[:, None]), mask=ok[:, None])
    tl.store(pdo_ptr + dst, tl.load(do_ptr + src, mask=ok[:, None]), mask=ok[:, None])
    tl.store(plse_ptr + at, tl.load(lse_ptr + flat, mask=ok), mask=ok)
    tl.store(pdelta_ptr + at, tl.load(delta_ptr + flat, mask=ok), mask=ok)


@triton.jit
def _dkdv_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    do_ptr,
    lse_ptr,
    delta_ptr,
    dk_ptr,
    dv_ptr,
    start_ptr,
    length_ptr,
    q_start_ptr,
    q_len_ptr,
    q_offset_ptr,
    order_ptr,
    rows_ptr,
    seg_start_ptr,
    seg_count_ptr,
    part_dq_ptr,
    dq_ptr,
    part_dk_ptr,
    part_dv_ptr,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    qk_scale,
    scale,
    num_q_heads,
    num_blocks,
    num_tokens,
    kv_head0,
    kv_heads,
    split_rows,
    extra_run_ptr,
    extra_split_ptr,
    run_first_ptr,
    extra_programs,
    bound,
    pq_ptr,
    pdo_ptr,
    plse_ptr,
    pdelta_ptr,
    GROUP: tl.constexpr,
    SLOTS: tl.constexpr,
    SEGS: tl.constexpr,
    SEGS_P2: tl.constexpr,
    TILES_PER_BLOCK: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DQ_WORKSPACE: tl.constexpr,
    DQ_TRANSPOSED: tl.constexpr,
    CURRENT_DQ: tl.constexpr,
    SUFFIX: tl.constexpr,
    SPLITS: tl.constexpr,
    WARP_SPEC: tl.constexpr = False,
    PROBE: tl.constexpr = 0,
    PACKED: tl.constexpr = False,
    TMA: tl.constexpr = False,
):
    """dK, dV of BLOCK_N keys of one (block, KV head). Grid (extra_programs + NB * TILES_PER_BLOCK * kv_heads,):
    first the further splits of popular blocks, TILES_PER_BLOCK programs per entry of the extra_run /
    extra_split lists (`extra_splits`; run -1 or a KV head outside this launch's: nothing to do), then one
    program per tile: blocks in the order of order_ptr (heaviest first: a sequence's first blocks are
    picked by most of its queries), then KV heads kv_head0.., then key tiles. A block whose run has
    `count` picks is split over n = min(SPLITS, cdiv(count, split_rows)) programs (`block_splits`): split
    s < n takes the s-th of n equal ranges of the picks (split 0, the tile's own program, also the causal
    queries). n = 1: the program writes dK, dV; n > 1: each writes its fp32 partial dK (scaled) and dV to
    part_dk/part_dv [2 * bound, block keys, D] (`partial_slot`), which `_dkdv_reduce_kernel` sums. DQ_WORKSPACE:
    also write this key tile's dQ
    partial of every gathered pick into part_dq [rows, TILES_PER_BLOCK, D] at the pick's row
    (forward.workspace_rows + slot). CURRENT_DQ (one key tile per block): also write the dQ of the
    block's own queries from their causal dS, complete, into dq (contiguous [T, Hq, D]). The block's
    own queries are its q_start/q_len rows, the first at position q_offset of the block.

    PACKED (`DKDV_PACKED`): the gathered loop reads q, dO, lse and delta from pq/pdo/plse/pdelta, the picks'
    rows in routing order (`_pack_picks_kernel`), at its run positions: contiguous rows instead of gathers.
    TMA (`DKDV_TMA`, with PACKED): pq and pdo are tensor descriptors, and each step's rows of q and dO arrive as
    one TMA copy each (rows past the run are zeroed after the load: a descriptor masks only its bounds); lse and
    delta stay pointer loads (a descriptor's innermost offset must be 16-byte aligned, and a run starts anywhere).

    PROBE (timing only, wrong results; `DKDV_PROBE`): bit 1 reads each step's 32 rows of the group's query
    heads at consecutive tokens instead of the gathered picks (no index load, 512-byte runs); bit 2 drops the
    dQ partials' product and store; bit 4 keeps the product but sums it in registers instead of transposing
    and storing it. The time each one saves is what the gathers, the partials and their stores cost.

    q and dO share q's strides; lse and delta are contiguous [T, Hq]; dK, dV share k's strides.
    """
    pid = tl.program_id(0)
    if SPLITS > 1:  # programs 0 .. extra_programs - 1: the further splits of popular blocks (heavy: first)
        is_extra = pid < extra_programs
        e = tl.minimum(pid, tl.maximum(extra_programs - 1, 0)) // TILES_PER_BLOCK
        run = tl.load(extra_run_ptr + e, mask=is_extra, other=-1)
        main = tl.maximum(pid - extra_programs, 0)
        blk = tl.where(is_extra, tl.maximum(run, 0) % num_blocks,
                       tl.load(order_ptr + main // (TILES_PER_BLOCK * kv_heads)))
        kv_head = tl.where(is_extra, tl.maximum(run, 0) // num_blocks, kv_head0 + (main // TILES_PER_BLOCK) % kv_heads)
        ktile = tl.where(is_extra, pid, main) % TILES_PER_BLOCK
        listed = (run >= 0) & (kv_head >= kv_head0) & (kv_head < kv_head0 + kv_heads)  # this launch's KV heads
        split = tl.where(is_extra, tl.where(listed, tl.load(extra_split_ptr + e, mask=is_extra, other=0), SPLITS), 0)
    else:
        is_extra = False
        e = 0
        split = 0
        blk = tl.load(order_ptr + pid // (TILES_PER_BLOCK * kv_heads))
        kv_head = kv_head0 + (pid // TILES_PER_BLOCK) % kv_heads
        ktile = pid % TILES_PER_BLOCK
    start, length, q_start, q_len, q_offset = block_queries(blk, start_ptr, length_ptr, q_start_ptr, q_len_ptr,
                                                            q_offset_ptr, SUFFIX)
    if SLOTS > 0:
        first, count = block_run(seg_start_ptr, seg_count_ptr, kv_head, blk, num_blocks, SEGS, SEGS_P2)
        num_splits = block_splits(count, split_rows, SPLITS)
    else:
        num_splits = 1
    cols = ktile * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < length
    # Splits from num_splits on load and write nothing.
    active_ok = cols < tl.where(split < num_splits, length, 0)
    dims = tl.arange(0, HEAD_DIM)
    kv_off = (start + cols)[:, None] * stride_kt + kv_head * stride_kh + dims[None, :]
    k = tl.load(k_ptr + kv_off, mask=active_ok[:, None], other=0.0)
    v = tl.load(v_ptr + kv_off, mask=active_ok[:, None], other=0.0)
    if PROBE & 4:  # the dQ partials' products, summed in registers (see the gathered loop)
        dq_sum = tl.zeros([HEAD_DIM, BLOCK_M], dtype=tl.float32)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    # Causal queries of the block itself: rows from the first query tile that reaches these keys.
    if SUFFIX:
        first_row = (tl.maximum(ktile * BLOCK_N - q_offset, 0) // BLOCK_M) * BLOCK_M
    else:
        first_row = (ktile * BLOCK_N // BLOCK_M) * BLOCK_M
    causal_end = tl.where(split == 0, q_len, first_row)  # the causal queries belong to split 0
    for g in tl.static_range(GROUP):
        head = kv_head * GROUP + g
        for m0 in range(first_row, causal_end, BLOCK_M):
            rows = m0 + tl.arange(0, BLOCK_M)
            row_ok = rows < q_len
            q_off = (q_start + rows)[:, None] * stride_qt + head * stride_qh + dims[None, :]
            q = tl.load(q_ptr + q_off, mask=row_ok[:, None], other=0.0)
            do = tl.load(do_ptr + q_off, mask=row_ok[:, None], other=0.0)
            lse = tl.load(lse_ptr + (q_start + rows) * num_q_heads + head, mask=row_ok, other=0.0)
            delta = tl.load(delta_ptr + (q_start + rows) * num_q_heads + head, mask=row_ok, other=0.0)
            p_t = tl.exp2(tl.dot(k, tl.trans(q)) * qk_scale - lse[None, :])
            p_t = tl.where((cols[:, None] <= (rows + q_offset)[None, :]) & row_ok[None, :], p_t, 0.0)
            dv += tl.dot(p_t.to(do.dtype), do)
            ds_t = (p_t * (tl.dot(v, tl.trans(do)) - delta[None, :])).to(q.dtype)
            dk += tl.dot(ds_t, q)
            if CURRENT_DQ:
                dq = tl.trans(tl.dot(tl.trans(k), ds_t)) * scale
                dq_off = ((q_start + rows) * num_q_heads + head)[:, None] * HEAD_DIM + dims[None, :]
                tl.store(dq_ptr + dq_off, dq.to(dq_ptr.dtype.element_ty), mask=row_ok[:, None])
    if SLOTS > 0:
        share = tl.cdiv(count, num_splits)
        lo = tl.minimum(split * share, count)
        hi = tl.minimum(count, lo + share)
        for i in tl.range(lo, hi, BLOCK_M, warp_specialize=WARP_SPEC):
            r = i + tl.arange(0, BLOCK_M)
            row_ok = r < hi
            if PROBE & 1:  # rows of this KV head's query heads at consecutive tokens, computed, not loaded
                seq = first + r
                t = (seq // GROUP) % num_tokens
                h = kv_head * GROUP + seq % GROUP
                flat = t * num_q_heads + h
                pick = flat * SLOTS
            else:
                pick, flat, t, h = load_picks(rows_ptr, first + r, row_ok, SLOTS, num_q_heads)
            if PACKED:  # the picks' rows in routing order: this step's are contiguous
                at = (first + r).to(tl.int64)
                if TMA:  # one bulk copy each of this step's q and dO rows
                    q = tl.where(row_ok[:, None], pq_ptr.load([first + i, 0]), 0.0)
                    do = tl.where(row_ok[:, None], pdo_ptr.load([first + i, 0]), 0.0)
                else:
                    p_off = at[:, None] * HEAD_DIM + dims[None, :]
                    q = tl.load(pq_ptr + p_off, mask=row_ok[:, None], other=0.0)
                    do = tl.load(pdo_ptr + p_off, mask=row_ok[:, None], other=0.0)
                lse = tl.load(plse_ptr + at, mask=row_ok, other=0.0)
                delta = tl.load(pdelta_ptr + at, mask=row_ok, other=0.0)
            else:
                q_off = t[:, None] * stride_qt + h[:, None] * stride_qh + dims[None, :]
                q = tl.load(q_ptr + q_off, mask=row_ok[:, None], other=0.0)
                do = tl.load(do_ptr + q_off, mask=row_ok[:, None], other=0.0)
                lse = tl.load(lse_ptr + flat, mask=row_ok, other=0.0)
                delta = tl.load(delta_ptr + flat, mask=row_ok, other=0.0)
            # Rows past the run load q = dO = lse = delta = 0: p = 1 and dS = 0, so they add exactly 0.
            p_t = tl.exp2(tl.dot(k, tl.trans(q)) * qk_scale - lse[None, :])
            dv += tl.dot(p_t.to(do.dtype), do)
            ds_t = (p_t * (tl.dot(v, tl.trans(do)) - delta[None, :])).to(q.dtype)
            dk += tl.dot(ds_t, q)
            if DQ_WORKSPACE and (PROBE & 4) != 0:
                dq_sum += tl.dot(tl.trans(k), ds_t)
            if DQ_WORKSPACE and (PROBE & 6) == 0:
                if DQ_TRANSPOSED:  # K^T dS^T: M = head dim, a warpgroup-sized (wgmma) operand
                    dq = tl.trans(tl.dot(tl.trans(k), ds_t)) * scale
                else:
                    dq = tl.dot(tl.trans(ds_t), k) * scale
                idx = workspace_rows(t, h, kv_head0 * GROUP, num_tokens, SLOTS) + pick % SLOTS
                idx = idx * TILES_PER_BLOCK + ktile
                tl.store(
                    part_dq_ptr + idx[:, None] * HEAD_DIM + dims[None, :],
                    dq.to(part_dq_ptr.dtype.element_ty),
                    mask=row_ok[:, None],
                )
    if PROBE & 4:  # keeps the products alive: a term far below dK's bf16 resolution (x * 0.0 may fold away)
        dk += tl.sum(dq_sum, 1)[None, :] * 1e-30
    if SPLITS == 1:
        tl.store(dk_ptr + kv_off, (dk * scale).to(dk_ptr.dtype.element_ty), mask=col_ok[:, None])
        tl.store(dv_ptr + kv_off, dv.to(dv_ptr.dtype.element_ty), mask=col_ok[:, None])
    else:
        whole = cols < tl.where((num_splits == 1) & (split == 0), length, 0)  # an unsplit block's one program
        tl.store(dk_ptr + kv_off, (dk * scale).to(dk_ptr.dtype.element_ty), mask=whole[:, None])
        tl.store(dv_ptr + kv_off, dv.to(dv_ptr.dtype.element_ty), mask=whole[:, None])
        first_extra = tl.load(run_first_ptr + kv_head * num_blocks + blk, mask=num_splits > 1, other=0)
        slot = partial_slot(is_extra, e, first_extra, bound)
        part_off = ((slot * TILES_PER_BLOCK * BLOCK_N + cols).to(tl.int64) * HEAD_DIM)[:, None] + dims[None, :]
        partial = cols < tl.where((num_splits > 1) & (split < num_splits), length, 0)
        tl.store(part_dk_ptr + part_off, dk * scale, mask=partial[:, None])
        tl.store(part_dv_ptr + part_off, dv, mask=partial[:, None])


@triton.jit
def block_splits(count, split_rows, SPLITS: tl.constexpr):
    """Programs sharing a run of `count` picks: cdiv(count, split_rows), within [1, SPLITS]."""
    return tl.minimum(tl.maximum(tl.cdiv(count, split_rows), 1), SPLITS)


@triton.jit
def partial_slot(is_extra, e, first_extra, bound):
    """Slot of a split program's partial dK/dV: entry e of the further splits' list for those, bound plus
    the run's first entry for split 0 of a split run (so the partials take 2 * bound slots, not one per
    tile and split)."""
    return tl.where(is_extra, e, bound + first_extra)


@triton.jit
def _dkdv_reduce_kernel(
    part_dk_ptr, part_dv_ptr, dk_ptr, dv_ptr, start_ptr, length_ptr, seg_start_ptr, seg_count_ptr, run_first_ptr,
    stride_kt, stride_kh, num_kv_heads, num_blocks, split_rows, bound,
    TILES_PER_BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, ROWS: tl.constexpr,
    SEGS: tl.constexpr, SEGS_P2: tl.constexpr, SPLITS: tl.constexpr,
):
    """dK, dV of the BLOCK_N keys of one (block, KV head, key tile) that `_dkdv_kernel` split over n > 1
    programs = the sum of their n partials, in split order (tiles of unsplit blocks were written whole):
    split 0's at slot bound + the run's first entry, then the further splits' entries.
    Grid (NB * TILES_PER_BLOCK * num_kv_heads,)."""
    pid = tl.program_id(0)
    blk = pid // (TILES_PER_BLOCK * num_kv_heads)
    kv_head = (pid // TILES_PER_BLOCK) % num_kv_heads
    ktile = pid % TILES_PER_BLOCK
    _, count = block_run(seg_start_ptr, seg_count_ptr, kv_head, blk, num_blocks, SEGS, SEGS_P2)
    num_splits = block_splits(count, split_rows, SPLITS)
    if num_splits > 1:
        first_extra = tl.load(run_first_ptr + kv_head * num_blocks + blk)
        start = tl.load(start_ptr + blk)
        length = tl.load(length_ptr + blk)
        dims = tl.arange(0, HEAD_DIM)
        for c in tl.static_range(BLOCK_N // ROWS):
            cols = ktile * BLOCK_N + c * ROWS + tl.arange(0, ROWS)  # within the block
            ok = (cols < length)[:, None]
            dk = tl.zeros([ROWS, HEAD_DIM], dtype=tl.float32)
            dv = tl.zeros([ROWS, HEAD_DIM], dtype=tl.float32)
            for j in range(0, num_splits):
                slot = tl.where(j == 0, bound + first_extra, first_extra + j - 1)
                off = ((slot * TILES_PER_BLOCK * BLOCK_N + cols).to(tl.int64) * HEAD_DIM)[:, None] + dims[None, :]
                dk += tl.load(part_dk_ptr + off, mask=ok, other=0.0)
                dv += tl.load(part_dv_ptr + off, mask=ok, other=0.0)
            out = (start + cols)[:, None] * stride_kt + kv_head * stride_kh + dims[None, :]
            tl.store(dk_ptr + out, dk.to(dk_ptr.dtype.element_ty), mask=ok)
            tl.store(dv_ptr + out, dv.to(dv_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _current_block_dq_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    do_ptr,
    lse_ptr,
    delta_ptr,
    dq_ptr,
    start_ptr,
    length_ptr,
    q_start_ptr,
    q_len_ptr,
    q_offset_ptr,
    num_past_ptr,
    part_dq_ptr,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    scale,
    qk_scale,
    num_q_heads,
    num_tokens,
    head0,
    GROUP: tl.constexpr,
    TILES_PER_BLOCK: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SLOTS: tl.constexpr,
    KTILES: tl.constexpr,
    MERGE: tl.constexpr,
    SUFFIX: tl.constexpr,
):
    """dQ of a query tile from its own block (causal); MERGE: plus its past picks' partials from the
    workspace ([rows, KTILES, D], KTILES per pick, one per key tile of the dK/dV programs; rows from
    forward.workspace_rows; valid slots 0 .. num_past - 1), written in dq's dtype. Grid
    (NB * TILES_PER_BLOCK, heads), head = head0 + axis 1. dq is contiguous [T, Hq, D]."""
    blk = tl.program_id(0) // TILES_PER_BLOCK
    tile = tl.program_id(0) % TILES_PER_BLOCK
    head = head0 + tl.program_id(1)
    kv_head = head // GROUP
    start, length, q_start, q_len, q_offset = block_queries(blk, start_ptr, length_ptr, q_start_ptr, q_len_ptr,
                                                            q_offset_ptr, SUFFIX)
    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < q_len
    dims = tl.arange(0, HEAD_DIM)
    q_off = (q_start + rows)[:, None] * stride_qt + head * stride_qh + dims[None, :]
    q = tl.load(q_ptr + q_off, mask=row_ok[:, None], other=0.0)
    do = tl.load(do_ptr + q_off, mask=row_ok[:, None], other=0.0)
    lse = tl.load(lse_ptr + (q_start + rows) * num_q_heads + head, mask=row_ok, other=0.0)
    delta = tl.load(delta_ptr + (q_start + rows) * num_q_heads + head, mask=row_ok, other=0.0)
    flat = (q_start + rows) * num_q_heads + head
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    for n0 in range(0, causal_keys(tile, length, q_len, q_offset, BLOCK_M, SUFFIX), BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        kv_off = (start + cols)[:, None] * stride_kt + kv_head * stride_kh + dims[None, :]
        k = tl.load(k_ptr + kv_off, mask=(cols < length)[:, None], other=0.0)
        v = tl.load(v_ptr + kv_off, mask=(cols < length)[:, None], other=0.0)
        p = tl.exp2(tl.dot(q, tl.trans(k)) * qk_scale - lse[:, None])
        p = tl.where(cols[None, :] <= (rows + q_offset)[:, None], p, 0.0)
        ds = p * (tl.dot(do, tl.trans(v)) - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k)
    dq = dq * scale
    if MERGE:
        base = workspace_rows(start + rows, head, head0, num_tokens, SLOTS) * KTILES
        num_past = tl.load(num_past_ptr + flat, mask=row_ok, other=0)
        dq = add_dq_partials(dq, part_dq_ptr, base, num_past, SLOTS, KTILES)
    tl.store(dq_ptr + flat[:, None] * HEAD_DIM + dims[None, :], dq.to(dq_ptr.dtype.element_ty), mask=row_ok[:, None])


@triton.jit
def _dq_merge_kernel(
    dq_ptr,
    part_dq_ptr,
    num_past_ptr,
    num_q_heads,
    num_tokens,
    head0,
    HEAD_DIM: tl.constexpr,
    ROWS: tl.constexpr,
    SLOTS: tl.constexpr,
):
    """dq[t, h] += the dQ partials of (t, h)'s past picks (workspace rows from forward.workspace_rows,
    valid slots 0 .. num_past - 1), for ROWS tokens of head head0 + axis 1: a pure read of contiguous
    partials (the causal part is already in dq, from the dK/dV programs). Grid (cdiv(T, ROWS), heads)."""
    head = head0 + tl.program_id(1)
    tokens = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    ok = tokens < num_tokens
    dims = tl.arange(0, HEAD_DIM)
    flat = tokens * num_q_heads + head
    num_past = tl.load(num_past_ptr + flat, mask=ok, other=0)
    base = workspace_rows(tokens, head, head0, num_tokens, SLOTS)
    dq_ptrs = dq_ptr + flat[:, None] * HEAD_DIM + dims[None, :]
    dq = tl.load(dq_ptrs, mask=ok[:, None], other=0.0).to(tl.float32)
    dq = add_dq_partials(dq, part_dq_ptr, base, num_past, SLOTS, 1)
    tl.store(dq_ptrs, dq.to(dq_ptr.dtype.element_ty), mask=ok[:, None])


@triton.jit
def _past_slot_dq_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    do_ptr,
    lse_ptr,
    delta_ptr,
    dq_ptr,
    start_ptr,
    rows_ptr,
    tile_seg_ptr,
    tile_start_ptr,
    tile_count_ptr,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    scale,
    qk_scale,
    num_q_heads,
    num_blocks,
    num_slots,
    BLOCK_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    SUB_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """dQ contribution of one gathered tile's past block in this slot, added in place into fp32 dQ
    [T * Hq, D], SUB_M rows at a time. Grid (max_tiles,)."""
    pid = tl.program_id(0)
    count = tl.load(tile_count_ptr + pid)
    if count > 0:
        seg = tl.load(tile_seg_ptr + pid)
        kv_head = seg // num_blocks
        kstart = tl.load(start_ptr + seg % num_blocks)
        first = tl.load(tile_start_ptr + pid)
        dims = tl.arange(0, HEAD_DIM)
        for sub in tl.static_range(BLOCK_M // SUB_M):
            r = sub * SUB_M + tl.arange(0, SUB_M)
            row_ok = r < count
            _, flat, t, h = load_picks(rows_ptr, first + r, row_ok, num_slots, num_q_heads)
            q_off = t[:, None] * stride_qt + h[:, None] * stride_qh + dims[None, :]
            q = tl.load(q_ptr + q_off, mask=row_ok[:, None], other=0.0)
            do = tl.load(do_ptr + q_off, mask=row_ok[:, None], other=0.0)
            lse = tl.load(lse_ptr + flat, mask=row_ok, other=0.0)
            delta = tl.load(delta_ptr + flat, mask=row_ok, other=0.0)
            dq = tl.zeros([SUB_M, HEAD_DIM], dtype=tl.float32)
            for n0 in range(0, BLOCK_SIZE, BLOCK_N):
                cols = n0 + tl.arange(0, BLOCK_N)
                kv_off = (kstart + cols)[:, None] * stride_kt + kv_head * stride_kh + dims[None, :]
                k = tl.load(k_ptr + kv_off)
                v = tl.load(v_ptr + kv_off)
                p = tl.exp2(tl.dot(q, tl.trans(k)) * qk_scale - lse[:, None])
                ds = p * (tl.dot(do, tl.trans(v)) - delta[:, None])
                dq += tl.dot(ds.to(k.dtype), k)
            dq_ptrs = dq_ptr + flat[:, None] * HEAD_DIM + dims[None, :]
            dq_old = tl.load(dq_ptrs, mask=row_ok[:, None], other=0.0)
            tl.store(dq_ptrs, dq_old + dq * scale, mask=row_ok[:, None])


class DkdvTiles(NamedTuple):
    """Tiling of the dK/dV kernel."""

    key_tile: int  # keys owned by one program
    query_step: int  # queries per inner-loop step
    warps: int
    stages: int
    # dQ partials as (K^T dS^T)^T, whose M is the head dim (a warpgroup-sized wgmma operand), or as dS K, whose M is
    # the 32-row query step. At head dim 64 and 256 keys dS K spills nothing in the main loop on sm_90 (the
    # transposed form: 33 spill instructions with Triton 3.6) and is 2-3% faster at r32k-b512 (bench/NOTES.md,
    # session 20).
    dq_transposed: bool = True


DKDV_TILES_128 = DkdvTiles(128, 32, 8, 3)
# head dim <= 64, blocks a multiple of 256 keys (bench/NOTES.md, sessions 10 and 20)
DKDV_TILES_D64 = DkdvTiles(256, 32, 8, 3, dq_transposed=False)
DKDV_TILES_D64_128 = DkdvTiles(128, 32, 4, 3)  # head dim <= 64, other blocks: 4 warps, 17% faster than 8 warps
SMALL_DIM_WARPS = 4  # warps of the dQ kernels (current block, past slots) below head dim 128
MERGE_ROWS = 32  # query rows of a merging current-block program: more, shorter programs hide the gathers better
MERGE_WARPS = 4  # warps of the current-block dQ kernel when it merges partials: more programs in flight
CURRENT_DQ_IN_DKDV = True  # blocks of one key tile: the dK/dV programs write the causal dQ, a pure merge adds partials
DQ_MERGE_ROWS = 32  # tokens per program of the pure dQ merge (64: 0.92 ms, 32: 0.83 at s32k-b128)
DQ_MERGE_WARPS = 4
DKDV_REDUCE_ROWS = 32
MAX_DKDV_SPLITS = 8  # programs sharing one (KV head, block, key tile)'s picks (see the module docstring)
DKDV_WARPS_PER_SM = 8  # warps of dK/dV programs resident per SM (two fp32 [128 or 256, D] accumulators each)
DKDV_SPLIT_BALANCE = 2  # a split takes at most half a resident program's fair share of the picks
DKDV_SPLIT_ROWS = None  # picks per split, fixed (tests force splits with it); None: `dkdv_schedule`'s rule
# Triton's automatic warp specialisation of the gathered-query loop. On sm_90 (Triton 3.6 and 3.9) it builds nothing
# here: 8-warp tilings compile to the same PTX, 4-warp ones fail (K and V are pointer loads, and the dQ partials
# are a fifth product; bench/NOTES.md, session 19, and bench/hopper_ws_probe.py).
DKDV_WARP_SPECIALIZE = False
# Timing probes of the gathered-query loop, 0 in use (the kernel's PROBE: 1 contiguous rows, 2 no dQ partials, 3
# both, 4 the dQ partials' products without their stores; their results are wrong by design).
# scripts/bench_kernels.py's d64_probe_* variants set it.
DKDV_PROBE = 0
# q, dO, lse and delta copied once into routing order so that dK/dV reads contiguous rows: S x T x Hq rows of
# 2 x D bf16 + 2 fp32 more memory, for the backward pass only. None: where a block has more than one key tile (each
# pick is then read by several programs, and one copy replaces their gathers); True / False: always / never.
# Session 16 (bench/NOTES.md): fwd+bwd 256 -> 279 TFLOP/s at r32k-b2048, 184 -> 196 at r32k-b512, 202 -> 211 at
# s32k-b512; at s32k-b128 (one key tile) 164 -> 160 and 3.5 GiB more, hence the rule.
DKDV_PACKED: bool | None = None
PACK_ROWS = 64
# With the packed rows: read them by TMA (host tensor descriptors) instead of pointer loads. Off: 6% slower at
# r32k-b512 (bench/NOTES.md, session 18), and it does not let DKDV_WARP_SPECIALIZE build either (session 19).
DKDV_TMA = False


def dkdv_tiles(block_size: int, dim: int) -> DkdvTiles:
    """One program owns up to 128 keys of a block: every program re-gathers all queries of its
    (KV head, block), so fewer, wider key tiles cut the gathers (block 128: 1 program instead of 2,
    block 512: 4 instead of 8). With 128 keys the query step is 32 rows (the flash-attention
    tutorial's 128 x 32 dK/dV tile) so the two fp32 [128, D] accumulators keep their registers. At head
    dim <= 64 a program of 8 warps holds 256 keys (two fp32 [256, 64] accumulators) where the block is
    a multiple of 256: half the gathers again (session 10: dK/dV 26.2 -> 25.1 ms at r32k-b2048)."""
    keys = next(n for n in (128, 64, 32, 16) if block_size % n == 0)
    if dim <= 64 and block_size % DKDV_TILES_D64.key_tile == 0:
        return DKDV_TILES_D64
    if keys == 128 and dim <= 64:
        return DKDV_TILES_D64_128
    if keys == 128 and dim <= 128:
        return DKDV_TILES_128
    return DkdvTiles(keys, 64, 8 if dim >= 128 else 4, 2)


def multiprocessors(device: torch.device) -> int:
    """SMs of a CUDA device; 132 (an H100's or H200's) elsewhere, so the interpreter takes a GPU's schedule."""
    if device.type != "cuda":
        return 132
    return torch.cuda.get_device_properties(device).multi_processor_count


def dkdv_schedule(
    num_tokens: int, num_q_heads: int, num_kv_heads: int, slots: int, key_tiles: int, resident: int
) -> tuple[int, int]:
    """(programs per dK/dV tile at most, picks per program): a (KV head, block)'s run of `count` picks is
    split over min(splits, cdiv(count, split_rows)) programs (`block_splits`, on the device).

    Routing in training is skewed: a few blocks (a sequence's first among them) are picked by most
    queries, and one program walking all of a popular block's picks sets the kernel's time while the GPU
    idles (32K tokens, block 512: 34.4 ms unsplit against 8.0 with 8 splits at the extreme skew). But
    splitting every block costs where routing is even: partial writes and their sum (the benchmark's
    uniform r32k-b2048: 48.6 ms unsplit, 50.7 with 4 splits; 128K in blocks of 1024: 515 ms of dK/dV per
    step unsplit, 561 with 8 splits), and so do programs launched only to find nothing to do (8 per tile
    at r32k-b512: dK/dV 7.9 -> 9.7 ms). So a block is split only where its run is longer than
    1 / DKDV_SPLIT_BALANCE of the fair share of the `resident` programs the GPU runs at once (of all the
    tiles' picks: the upper bound T * Hq * slots, each walked by every key tile of its block), into
    pieces of that size, and only its further splits are launched (`extra_splits`). The most splits:
    MAX_DKDV_SPLITS, and no more than the longest possible run (T * group: every query of the group picks
    the block) needs; 1: no partials at all. The partials of all split programs fit 2 * (T * Hq * slots /
    split_rows) blocks, i.e. 4 * resident / key_tiles blocks of fp32 dK and dV (about 70 MB at head
    dim 64 on an H200), not one per tile and split."""
    if slots == 0:
        return 1, 1
    fair = num_tokens * num_q_heads * slots * key_tiles // resident
    split_rows = DKDV_SPLIT_ROWS or max(1, fair // DKDV_SPLIT_BALANCE)
    longest = num_tokens * (num_q_heads // num_kv_heads)
    return max(1, min(MAX_DKDV_SPLITS, triton.cdiv(longest, split_rows))), split_rows


def extra_splits(seg_count: torch.Tensor, split_rows: int, splits: int, bound: int):
    """The further splits of the (KV head, block) runs, listed on the device (no host sync): run
    kv_head * NB + block and split 1 .. n - 1 for each run of n = block_splits(count) programs, in run
    order; `bound` entries (a host bound on their number), unused ones with run -1. Returns int32 (run,
    split) of each entry and each run's first entry (where its further splits start)."""
    counts = seg_count.sum(-1).flatten()
    extra = ((counts + split_rows - 1) // split_rows).clamp(1, splits) - 1
    ends = extra.cumsum(0)
    slot = torch.arange(bound, device=seg_count.device)
    run = torch.searchsorted(ends, slot, right=True)
    valid = run < counts.numel()
    run = run.clamp(max=counts.numel() - 1)
    split = slot - (ends[run] - extra[run]) + 1
    return torch.where(valid, run, -1).to(torch.int32), split.to(torch.int32), (ends - extra).to(torch.int32)


def attention_backward(
    dout,
    q,
    k,
    v,
    out,
    lse,
    layout: BlockLayout,
    routing: Routing,
    slots: int,
    block_size: int,
    scale: float,
    tiles: SlotTiles,
    work: Workspace,
    dlse=None,
):
    """dq, dk, dv for contiguous q [T, Hq, D], k, v [Tk, Hkv, D], out/dout [T, Hq, D], lse2 fp32 [T, Hq]
    and the gradient of the natural lse output, fp32 contiguous [T, Hq], or None;
    `routing` of `slots` past picks per query was built with `tiles.query_tile` rows per slot tile,
    with slot tiles if work.kv_heads == 0 (slot passes); `work` from kernels.workspace.backward_plan."""
    total, hq, dim = q.shape
    hkv = k.shape[1]
    group = hq // hkv
    nb = layout.num_blocks
    segs = routing.seg_start.shape[2]
    use_workspace = work.kv_heads > 0  # the plan gives slot passes when nothing is past (top-1)
    dq = torch.empty(total, hq, dim, dtype=q.dtype if use_workspace else torch.float32, device=q.device)
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    if nb == 0:
        return dq.to(q.dtype), dk, dv
    delta = torch.empty(total, hq, dtype=torch.float32, device=q.device)
    _delta_kernel[(triton.cdiv(total * hq, 64),)](
        out, dout, delta if dlse is None else dlse, delta, total * hq, HEAD_DIM=dim, ROWS=64, DLSE=dlse is not None
    )
    block_n = key_tile(block_size)
    warps = 8 if dim >= 128 else SMALL_DIM_WARPS
    kv_tiles = dkdv_tiles(block_size, dim)
    ktiles = block_size // kv_tiles.key_tile
    block_m = min(MERGE_ROWS if use_workspace else 64, triton.next_power_of_2(block_size))
    per_block = triton.cdiv(block_size, block_m)
    current_dq = use_workspace and ktiles == 1 and CURRENT_DQ_IN_DKDV
    resident = multiprocessors(q.device) * DKDV_WARPS_PER_SM // kv_tiles.warps
    splits, split_rows = dkdv_schedule(total, hq, hkv, slots, ktiles, resident)
    # Further splits: cdiv(count, split_rows) - 1 <= count / split_rows per run, so at most (the bound on
    # all picks) / split_rows in all; and at most splits - 1 per run.
    bound = min(hkv * nb * (splits - 1), total * hq * slots // split_rows)
    if bound == 0:
        splits = 1
    part_dk = part_dv = dk
    extra_run = extra_split = run_first = routing.num_past  # unread without splits
    extra_programs = 0
    if splits > 1:
        extra_run, extra_split, run_first = extra_splits(routing.seg_count, split_rows, splits, bound)
        extra_programs = bound * ktiles
        part_dk, part_dv = (torch.empty(2 * bound, ktiles * kv_tiles.key_tile, dim, dtype=torch.float32,
                                        device=k.device) for _ in range(2))

    pack = slots > 0 and (ktiles > 1 if DKDV_PACKED is None else DKDV_PACKED)
    packed = (q, dout, lse, delta)  # unread unless packed
    if pack:
        num_rows = routing.rows.numel()
        packed = (q.new_empty(num_rows, dim), q.new_empty(num_rows, dim),
                  *(torch.empty(num_rows, dtype=torch.float32, device=q.device) for _ in range(2)))
        _pack_picks_kernel[(triton.cdiv(num_rows, PACK_ROWS),)](
            q, dout, lse, delta, routing.rows, *packed, num_rows, q.stride(0), q.stride(1), hq,
            SLOTS=slots, HEAD_DIM=dim, ROWS=PACK_ROWS,
        )
        if DKDV_TMA:
            from triton.tools.tensor_descriptor import TensorDescriptor

            step = kv_tiles.query_step
            packed = (*(TensorDescriptor.from_tensor(x, [step, dim]) for x in packed[:2]), *packed[2:])

    def dkdv(kv_head0, heads, part_dq):
        _dkdv_kernel[(extra_programs + nb * ktiles * heads,)](
            q,
            k,
            v,
            dout,
            lse,
            delta,
            dk,
            dv,
            layout.start,
            layout.length,
            layout.q_start,
            layout.q_len,
            layout.q_offset,
            layout.order,
            routing.rows,
            routing.seg_start,
            routing.seg_count,
            dq if part_dq is None else part_dq,
            dq,
            part_dk,
            part_dv,
            q.stride(0),
            q.stride(1),
            k.stride(0),
            k.stride(1),
            scale * LOG2E,
            scale,
            hq,
            nb,
            total,
            kv_head0,
            heads,
            split_rows,
            extra_run,
            extra_split,
            run_first,
            extra_programs,
            bound,
            *packed,
            GROUP=group,
            SLOTS=slots,
            SEGS=segs,
            SEGS_P2=max(2, triton.next_power_of_2(segs)),
            TILES_PER_BLOCK=ktiles,
            HEAD_DIM=dim,
            BLOCK_M=kv_tiles.query_step,
            BLOCK_N=kv_tiles.key_tile,
            DQ_WORKSPACE=part_dq is not None,
            DQ_TRANSPOSED=kv_tiles.dq_transposed,
            CURRENT_DQ=current_dq,
            SUFFIX=layout.suffix,
            SPLITS=splits,
            WARP_SPEC=DKDV_WARP_SPECIALIZE,
            PROBE=DKDV_PROBE,
            PACKED=pack,
            TMA=pack and DKDV_TMA,
            num_warps=kv_tiles.warps,
            num_stages=kv_tiles.stages,
        )

    def reduce_dkdv():
        if splits > 1:
            _dkdv_reduce_kernel[(nb * ktiles * hkv,)](
                part_dk, part_dv, dk, dv, layout.start, layout.length, routing.seg_start, routing.seg_count,
                run_first, k.stride(0), k.stride(1), hkv, nb, split_rows, bound,
                TILES_PER_BLOCK=ktiles, HEAD_DIM=dim, BLOCK_N=kv_tiles.key_tile,
                ROWS=min(DKDV_REDUCE_ROWS, kv_tiles.key_tile), SEGS=segs,
                SEGS_P2=max(2, triton.next_power_of_2(segs)), SPLITS=splits, num_warps=4,
            )

    def current(head0, heads, part_dq):
        _current_block_dq_kernel[(nb * per_block, heads)](
            q,
            k,
            v,
            dout,
            lse,
            delta,
            dq,
            layout.start,
            layout.length,
            layout.q_start,
            layout.q_len,
            layout.q_offset,
            routing.num_past,
            dq if part_dq is None else part_dq,
            q.stride(0),
            q.stride(1),
            k.stride(0),
            k.stride(1),
            scale,
            scale * LOG2E,
            hq,
            total,
            head0,
            GROUP=group,
            TILES_PER_BLOCK=per_block,
            HEAD_DIM=dim,
            BLOCK_M=block_m,
            BLOCK_N=block_n,
            SLOTS=slots,
            KTILES=ktiles,
            MERGE=part_dq is not None,
            SUFFIX=layout.suffix,
            num_warps=MERGE_WARPS if part_dq is not None else warps,
            num_stages=2,
        )

    if not use_workspace:
        dkdv(0, hkv, None)
        reduce_dkdv()
        current(0, hq, None)
        for slot in range(slots):
            _past_slot_dq_kernel[(routing.tile_seg.shape[1],)](
                q,
                k,
                v,
                dout,
                lse,
                delta,
                dq,
                layout.start,
                routing.rows,
                routing.tile_seg[slot],
                routing.tile_start[slot],
                routing.tile_count[slot],
                q.stride(0),
                q.stride(1),
                k.stride(0),
                k.stride(1),
                scale,
                scale * LOG2E,
                hq,
                nb,
                slots,
                BLOCK_SIZE=block_size,
                HEAD_DIM=dim,
                BLOCK_M=tiles.query_tile,
                SUB_M=min(64, tiles.query_tile),
                BLOCK_N=block_n,
                num_warps=warps,
                num_stages=2,
            )
        return dq.to(q.dtype), dk, dv
    part_dq = torch.empty(work.kv_heads * work.capacity, dim, dtype=work.dtype, device=q.device)  # [rows, ktiles, D]
    for h0 in range(0, hkv, work.kv_heads):
        heads = min(work.kv_heads, hkv - h0)
        dkdv(h0, heads, part_dq)
        if current_dq:
            _dq_merge_kernel[(triton.cdiv(total, DQ_MERGE_ROWS), heads * group)](
                dq,
                part_dq,
                routing.num_past,
                hq,
                total,
                h0 * group,
                HEAD_DIM=dim,
                ROWS=DQ_MERGE_ROWS,
                SLOTS=slots,
                num_warps=DQ_MERGE_WARPS,
            )
        else:
            current(h0 * group, heads * group, part_dq)
    reduce_dkdv()
    return dq, dk, dv
