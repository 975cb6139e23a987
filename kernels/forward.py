"""MoBA attention forward: a causal flash kernel over the current block, plus key-block-centric
passes over the past picks (see kernels/workspace.py for the two ways they run).

- Workspace passes: `_past_run_fwd_kernel` (one program per (KV head, past block), walking all the
  picks of that block) writes each pick's normalised partial output and log-sum-exp into the
  workspace at (query head, token, slot); the current-block kernel then reads each query's
  partials, contiguous, merges them in registers and writes (out, lse) once.
- Slot passes: the current-block kernel writes (out, lse); one `_past_fwd_kernel` launch per slot
  merges into them in place (a (query, head) appears at most once per slot: no races).

Internal log-sum-exp is in base 2 of the scaled logits: lse2 = log2(sum_j 2^(q.k_j * scale * log2 e)).
No fp32 [T, H, D] buffer: partials and the running output are in the output dtype; every merge is
a convex combination weighted by the partial sums.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .layout import BlockLayout
from .routing import Routing
from .workspace import Workspace

LOG2E = 1.4426950408889634


@triton.jit
def workspace_rows(tokens, head, head0, num_tokens, SLOTS: tl.constexpr):
    """int64 workspace row of slot 0 of each (token, query head): a chunk's workspace holds its
    query heads head0.. as [heads, T, SLOTS] rows, so one query's picks are contiguous."""
    return ((head - head0) * num_tokens + tokens).to(tl.int64) * SLOTS


@triton.jit
def block_run(seg_start_ptr, seg_count_ptr, kv_head, blk, num_blocks, SEGS: tl.constexpr, SEGS_P2: tl.constexpr):
    """(first position in rows, number of picks) of the run of (KV head, global block): its SEGS
    segments (1 for run keys, one per slot for slot keys) are contiguous in rows."""
    seg = (kv_head * num_blocks + blk) * SEGS
    js = tl.arange(0, SEGS_P2)
    return tl.load(seg_start_ptr + seg), tl.sum(tl.load(seg_count_ptr + seg + js, mask=js < SEGS, other=0), 0)


@triton.jit
def load_picks(rows_ptr, at, row_ok, num_slots, num_q_heads):
    """Pick ids at rows positions `at` and their (flat query row, token, query head), in int32 (rows are
    int64; int64 division is emulated on the GPU and measured +2 ms in dK/dV and the forward)."""
    pick = tl.load(rows_ptr + at, mask=row_ok, other=0).to(tl.int32)
    flat = pick // num_slots
    return pick, flat, flat // num_q_heads, flat % num_q_heads


@triton.jit
def attend_block(
    q, k_ptr, v_ptr, kstart, kv_head, stride_kt, stride_kh, qk_scale, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr
):
    """Online softmax of q [BLOCK_M, D] over the BLOCK_SIZE keys of a full block starting at token
    kstart, BLOCK_N keys per step: (running max m, sum l, unnormalised output acc), base-2 logits."""
    dims = tl.arange(0, q.shape[1])
    m_i = tl.full([q.shape[0]], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([q.shape[0]], dtype=tl.float32)
    acc = tl.zeros([q.shape[0], q.shape[1]], dtype=tl.float32)
    for n0 in range(0, BLOCK_SIZE, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        kv_off = (kstart + cols)[:, None] * stride_kt + kv_head * stride_kh + dims[None, :]
        k = tl.load(k_ptr + kv_off)
        v = tl.load(v_ptr + kv_off)
        s = tl.dot(q, tl.trans(k)) * qk_scale
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    return m_i, l_i, acc


@triton.jit
def block_queries(blk, start_ptr, length_ptr, q_start_ptr, q_len_ptr, q_offset_ptr, SUFFIX: tl.constexpr):
    """(start, length) of block blk's keys and (q_start, q_len, q_offset) of its own query rows: with SUFFIX the
    queries are a suffix of the keys, the first at position q_offset of the block; else they are the keys."""
    start = tl.load(start_ptr + blk)
    length = tl.load(length_ptr + blk)
    if SUFFIX:
        return start, length, tl.load(q_start_ptr + blk), tl.load(q_len_ptr + blk), tl.load(q_offset_ptr + blk)
    else:  # self-attention (the code compiled before suffixes existed)
        return start, length, start, length, 0


@triton.jit
def causal_keys(tile, length, q_len, q_offset, BLOCK_M: tl.constexpr, SUFFIX: tl.constexpr):
    """How many of its block's keys query tile `tile` (BLOCK_M rows of block_queries' rows) reaches causally:
    up to its last query; none for a tile without queries."""
    if SUFFIX:
        return tl.where(tile * BLOCK_M < q_len, tl.minimum(length, q_offset + tile * BLOCK_M + BLOCK_M), 0)
    else:
        return tl.minimum(length, tile * BLOCK_M + BLOCK_M)


@triton.jit
def column(tile, j: tl.constexpr, SLOTS_P2: tl.constexpr):
    """Column j of a [BLOCK_M, SLOTS_P2] tile of the picks."""
    return tl.sum(tl.where(tl.arange(0, SLOTS_P2)[None, :] == j, tile, 0), 1)


@triton.jit
def _current_block_fwd_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    out_ptr,
    lse_ptr,
    start_ptr,
    length_ptr,
    q_start_ptr,
    q_len_ptr,
    q_offset_ptr,
    num_past_ptr,
    part_out_ptr,
    part_lse_ptr,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_ot,
    stride_oh,
    stride_lt,
    qk_scale,
    head0,
    num_q_heads,
    num_tokens,
    GROUP: tl.constexpr,
    TILES_PER_BLOCK: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SLOTS: tl.constexpr,
    SLOTS_P2: tl.constexpr,
    MERGE: tl.constexpr,
    SUFFIX: tl.constexpr,
):
    """Causal attention of a BLOCK_M query tile to its own block; MERGE: merged with the tile's past
    partials from the workspace (part_out [rows, D], part_lse [rows], rows from `workspace_rows`; a
    query's valid slots are 0 .. num_past - 1). The block's keys are start/length, its queries the
    q_start/q_len rows, the first at position q_offset of the block (bottom-right causal).
    Grid (NB * TILES_PER_BLOCK, heads), head = head0 + axis 1."""
    blk = tl.program_id(0) // TILES_PER_BLOCK
    tile = tl.program_id(0) % TILES_PER_BLOCK
    head = head0 + tl.program_id(1)
    kv_head = head // GROUP
    start, length, q_start, q_len, q_offset = block_queries(blk, start_ptr, length_ptr, q_start_ptr, q_len_ptr,
                                                            q_offset_ptr, SUFFIX)
    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < q_len
    dims = tl.arange(0, HEAD_DIM)
    q = tl.load(
        q_ptr + (q_start + rows)[:, None] * stride_qt + head * stride_qh + dims[None, :], mask=row_ok[:, None],
        other=0.0,
    )
    if MERGE:  # the picks' log-sum-exps, loaded early to hide their latency
        base = workspace_rows(q_start + rows, head, head0, num_tokens, SLOTS)
        num_past = tl.load(num_past_ptr + (q_start + rows) * num_q_heads + head, mask=row_ok, other=0)
        js = tl.arange(0, SLOTS_P2)
        lse_t = tl.load(
            part_lse_ptr + base[:, None] + js[None, :], mask=js[None, :] < num_past[:, None], other=float("-inf")
        )
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    for n0 in range(0, causal_keys(tile, length, q_len, q_offset, BLOCK_M, SUFFIX), BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        kv_off = (start + cols)[:, None] * stride_kt + kv_head * stride_kh + dims[None, :]
        col_ok = (cols < length)[:, None]
        k = tl.load(k_ptr + kv_off, mask=col_ok, other=0.0)
        v = tl.load(v_ptr + kv_off, mask=col_ok, other=0.0)
        s = tl.dot(q, tl.trans(k)) * qk_scale
        s = tl.where(cols[None, :] <= (rows + q_offset)[:, None], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    if MERGE:
        # A partial (o_j, lse_j) is a normalised output: the merge is the convex combination of
        # acc / l and the o_j with weights 2^(lse - top) (top: the largest lse of the row).
        lse_cur = m_i + tl.log2(l_i)
        top = tl.maximum(lse_cur, tl.max(lse_t, 1))
        w_t = tl.exp2(lse_t - top[:, None])
        w_cur = tl.exp2(lse_cur - top)
        total = w_cur + tl.sum(w_t, 1)
        acc = acc * (w_cur / l_i)[:, None]
        for j in tl.static_range(SLOTS):
            o_j = tl.load(
                part_out_ptr + (base + j)[:, None] * HEAD_DIM + dims[None, :],
                mask=(j < num_past)[:, None],
                other=0.0,
            )
            acc += o_j.to(tl.float32) * column(w_t, j, SLOTS_P2)[:, None]
        m_i = top
        l_i = total
    out = acc / l_i[:, None]
    tl.store(
        out_ptr + (q_start + rows)[:, None] * stride_ot + head * stride_oh + dims[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=row_ok[:, None],
    )
    tl.store(lse_ptr + (q_start + rows) * stride_lt + head, m_i + tl.log2(l_i), mask=row_ok)


@triton.jit
def _past_run_fwd_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    part_out_ptr,
    part_lse_ptr,
    start_ptr,
    order_ptr,
    rows_ptr,
    seg_start_ptr,
    seg_count_ptr,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    qk_scale,
    num_q_heads,
    num_blocks,
    num_tokens,
    kv_head0,
    kv_heads,
    GROUP: tl.constexpr,
    SLOTS: tl.constexpr,
    SEGS: tl.constexpr,
    SEGS_P2: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Every pick of one (KV head, past block): BLOCK_M gathered picks at a time attend the whole
    block and write their normalised partial (out, lse) at `workspace_rows` + slot. BLOCK_N >=
    BLOCK_SIZE: the block's K and V are loaded once and stay on chip for all its picks (a past
    block is always full; keys past BLOCK_SIZE are padding); otherwise an online softmax over key
    tiles of BLOCK_N. Grid (NB * kv_heads,): blocks in order_ptr's order (heaviest first), KV heads
    kv_head0.. fastest."""
    pid = tl.program_id(0)
    blk = tl.load(order_ptr + pid // kv_heads)
    kv_head = kv_head0 + pid % kv_heads
    kstart = tl.load(start_ptr + blk)
    first, count = block_run(seg_start_ptr, seg_count_ptr, kv_head, blk, num_blocks, SEGS, SEGS_P2)
    dims = tl.arange(0, HEAD_DIM)
    cols = tl.arange(0, BLOCK_N)
    if BLOCK_N >= BLOCK_SIZE:
        kv_off = (kstart + cols)[:, None] * stride_kt + kv_head * stride_kh + dims[None, :]
        k = tl.load(k_ptr + kv_off, mask=(cols < BLOCK_SIZE)[:, None], other=0.0)
        v = tl.load(v_ptr + kv_off, mask=(cols < BLOCK_SIZE)[:, None], other=0.0)
    for i in range(0, count, BLOCK_M):
        r = i + tl.arange(0, BLOCK_M)
        row_ok = r < count
        pick, flat, t, h = load_picks(rows_ptr, first + r, row_ok, SLOTS, num_q_heads)
        q = tl.load(
            q_ptr + t[:, None] * stride_qt + h[:, None] * stride_qh + dims[None, :], mask=row_ok[:, None], other=0.0
        )
        if BLOCK_N >= BLOCK_SIZE:
            s = tl.dot(q, tl.trans(k)) * qk_scale
            if BLOCK_N > BLOCK_SIZE:
                s = tl.where(cols[None, :] < BLOCK_SIZE, s, float("-inf"))
            m_i = tl.max(s, 1)
            p = tl.exp2(s - m_i[:, None])
            l_i = tl.sum(p, 1)
            acc = tl.dot(p.to(v.dtype), v)
        else:
            m_i, l_i, acc = attend_block(
                q, k_ptr, v_ptr, kstart, kv_head, stride_kt, stride_kh, qk_scale, BLOCK_SIZE, BLOCK_N
            )
        idx = workspace_rows(t, h, kv_head0 * GROUP, num_tokens, SLOTS) + pick % SLOTS
        tl.store(
            part_out_ptr + idx[:, None] * HEAD_DIM + dims[None, :],
            (acc / l_i[:, None]).to(part_out_ptr.dtype.element_ty),
            mask=row_ok[:, None],
        )
        tl.store(part_lse_ptr + idx, m_i + tl.log2(l_i), mask=row_ok)


@triton.jit
def _past_slot_fwd_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    out_ptr,
    lse_ptr,
    start_ptr,
    rows_ptr,
    tile_seg_ptr,
    tile_start_ptr,
    tile_count_ptr,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_ot,
    stride_oh,
    stride_lt,
    qk_scale,
    num_q_heads,
    num_blocks,
    num_slots,
    BLOCK_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """One gathered tile of picks of one (KV head, past block) in one slot: attend the whole block and
    merge into the queries' running (out, lse) in place. Grid (max_tiles,)."""
    pid = tl.program_id(0)
    count = tl.load(tile_count_ptr + pid)
    if count > 0:
        seg = tl.load(tile_seg_ptr + pid)
        kv_head = seg // num_blocks
        kstart = tl.load(start_ptr + seg % num_blocks)
        r = tl.arange(0, BLOCK_M)
        row_ok = r < count
        first = tl.load(tile_start_ptr + pid)
        _, _, t, h = load_picks(rows_ptr, first + r, row_ok, num_slots, num_q_heads)
        dims = tl.arange(0, HEAD_DIM)
        q = tl.load(
            q_ptr + t[:, None] * stride_qt + h[:, None] * stride_qh + dims[None, :], mask=row_ok[:, None], other=0.0
        )
        m_i, l_i, acc = attend_block(
            q, k_ptr, v_ptr, kstart, kv_head, stride_kt, stride_kh, qk_scale, BLOCK_SIZE, BLOCK_N
        )
        lse_part = m_i + tl.log2(l_i)
        o_ptrs = out_ptr + t[:, None] * stride_ot + h[:, None] * stride_oh + dims[None, :]
        lse_ptrs = lse_ptr + t * stride_lt + h
        o_old = tl.load(o_ptrs, mask=row_ok[:, None], other=0.0).to(tl.float32)
        lse_old = tl.load(lse_ptrs, mask=row_ok, other=0.0)
        top = tl.maximum(lse_old, lse_part)
        w_old = tl.exp2(lse_old - top)
        w_part = tl.exp2(lse_part - top)
        total = w_old + w_part
        out = (o_old * w_old[:, None] + acc * (w_part / l_i)[:, None]) / total[:, None]
        tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])
        tl.store(lse_ptrs, top + tl.log2(total), mask=row_ok)


def key_tile(block_size: int) -> int:
    """Keys per inner-loop step: the largest of 64, 32, 16 dividing block_size."""
    return next(n for n in (64, 32, 16) if block_size % n == 0)


class SlotTiles(NamedTuple):
    """Tiling of the query-tile kernels (current block and past slots, forward and dQ)."""

    query_tile: int  # rows of a gathered query tile (routing, forward and dQ slot passes)
    key_tile: int  # keys per inner-loop step of the forward
    warps: int
    stages: int  # software-pipelining depth of the forward key loop


LARGE_BLOCK_TILES = SlotTiles(128, 64, 8, 3)
"""Blocks >= 512 keys, head dim <= 128 (at head dim 64 no other tiling measured faster: bench/NOTES.md, session 7)."""


def slot_tiles(block_size: int, dim: int) -> SlotTiles:
    """Blocks >= 512 keys give segments of thousands of queries per (KV head, block, slot), so tiles
    of 128 gathered queries stay full; they halve the K/V re-reads per query and give wgmma 128-row
    operands (the flash-attention tutorial tile, 128 x 64, 8 warps, 3 stages). Smaller blocks keep
    64-row tiles: their segments are short and a half-empty 128-row tile wastes its matmuls."""
    if block_size >= 512 and dim <= 128:
        return LARGE_BLOCK_TILES
    return SlotTiles(64, key_tile(block_size), 8 if dim >= 128 else 4, 3)


class RunTiles(NamedTuple):
    """Tiling of the workspace passes' per-block programs (`_past_run_fwd_kernel`)."""

    query_step: int  # gathered picks per inner-loop step
    max_resident: int  # blocks of up to this many keys (at D 128; scaled by 128 / D) keep K and V on chip
    warps: int
    stages: int


RUN_TILES = RunTiles(64, 128, 4, 3)
MERGE_ROWS = 32  # query rows of a merging current-block program: more, shorter programs hide the gathers better
MERGE_WARPS = 4  # warps of the current-block kernel when it merges partials: more programs in flight


def attention_forward(
    q,
    k,
    v,
    layout: BlockLayout,
    routing: Routing,
    slots: int,
    block_size: int,
    scale: float,
    tiles: SlotTiles,
    work: Workspace,
):
    """out [T, Hq, D] (q's dtype) and lse2 fp32 [T, Hq] for contiguous q [T, Hq, D], k, v [T, Hkv, D];
    `routing` of `slots` past picks per query was built with `tiles.query_tile` rows per slot tile and
    slot tiles if work.kv_heads == 0 (slot passes)."""
    total, hq, dim = q.shape
    hkv = k.shape[1]
    group = hq // hkv
    segs = routing.seg_start.shape[2]
    out = torch.empty_like(q)
    lse = torch.empty(total, hq, dtype=torch.float32, device=q.device)
    if layout.num_blocks == 0:
        return out, lse
    block_m = min(MERGE_ROWS if work.kv_heads else tiles.query_tile, triton.next_power_of_2(block_size))
    per_block = triton.cdiv(block_size, block_m)
    slots_p2 = max(2, triton.next_power_of_2(slots))

    def current(head0, heads, part_out, part_lse):
        _current_block_fwd_kernel[(layout.num_blocks * per_block, heads)](
            q,
            k,
            v,
            out,
            lse,
            layout.start,
            layout.length,
            layout.q_start,
            layout.q_len,
            layout.q_offset,
            routing.num_past,
            part_out,
            part_lse,
            q.stride(0),
            q.stride(1),
            k.stride(0),
            k.stride(1),
            out.stride(0),
            out.stride(1),
            lse.stride(0),
            scale * LOG2E,
            head0,
            hq,
            total,
            GROUP=group,
            TILES_PER_BLOCK=per_block,
            HEAD_DIM=dim,
            BLOCK_M=block_m,
            BLOCK_N=tiles.key_tile,
            SLOTS=slots,
            SLOTS_P2=slots_p2,
            MERGE=part_out is not out,
            SUFFIX=layout.suffix,
            num_warps=MERGE_WARPS if part_out is not out else tiles.warps,
            num_stages=2,
        )

    if work.kv_heads == 0:  # slot passes (also when nothing is past: top-1)
        current(0, hq, out, lse)
        for slot in range(slots):
            _past_slot_fwd_kernel[(routing.tile_seg.shape[1],)](
                q,
                k,
                v,
                out,
                lse,
                layout.start,
                routing.rows,
                routing.tile_seg[slot],
                routing.tile_start[slot],
                routing.tile_count[slot],
                q.stride(0),
                q.stride(1),
                k.stride(0),
                k.stride(1),
                out.stride(0),
                out.stride(1),
                lse.stride(0),
                scale * LOG2E,
                hq,
                layout.num_blocks,
                slots,
                BLOCK_SIZE=block_size,
                HEAD_DIM=dim,
                BLOCK_M=tiles.query_tile,
                BLOCK_N=tiles.key_tile,
                num_warps=tiles.warps,
                num_stages=tiles.stages,
            )
        return out, lse
    chunk = work.kv_heads
    part_out = torch.empty(chunk * work.capacity, dim, dtype=work.dtype, device=q.device)
    part_lse = torch.empty(chunk * work.capacity, dtype=torch.float32, device=q.device)
    run = RUN_TILES
    resident = triton.next_power_of_2(block_size) * dim <= run.max_resident * 128
    for h0 in range(0, hkv, chunk):
        heads = min(chunk, hkv - h0)
        _past_run_fwd_kernel[(layout.num_blocks * heads,)](
            q,
            k,
            v,
            part_out,
            part_lse,
            layout.start,
            layout.order,
            routing.rows,
            routing.seg_start,
            routing.seg_count,
            q.stride(0),
            q.stride(1),
            k.stride(0),
            k.stride(1),
            scale * LOG2E,
            hq,
            layout.num_blocks,
            total,
            h0,
            heads,
            GROUP=group,
            SLOTS=slots,
            SEGS=segs,
            SEGS_P2=max(2, triton.next_power_of_2(segs)),
            BLOCK_SIZE=block_size,
            HEAD_DIM=dim,
            BLOCK_M=run.query_step,
            BLOCK_N=triton.next_power_of_2(block_size) if resident else tiles.key_tile,
            num_warps=run.warps,
            num_stages=run.stages,
        )
        current(h0 * group, heads * group, part_out, part_lse)
    return out, lse
