"""MoBA attention forward: a causal flash kernel over the current block, plus key-block-centric
passes over the past picks (see kernels/workspace.py for the two ways they run).

- Workspace passes: `_past_fwd_kernel` writes each pick's normalised partial output and log-sum-exp
  into the workspace; the current-block kernel then merges every query's picks in registers and
  writes (out, lse) once.
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

from kernels.layout import BlockLayout
from kernels.routing import Routing
from kernels.workspace import Workspace

LOG2E = 1.4426950408889634


@triton.jit
def load_picks(pos_ptr, row_base_ptr, flat, row_ok, SLOTS: tl.constexpr, SLOTS_P2: tl.constexpr):
    """Workspace rows [BLOCK_M, SLOTS_P2] of the past picks of the query rows `flat` (0 where there is
    no pick) and which picks exist: pos is [T * Hq, SLOTS] (-1: none), a pick at rows position p has
    workspace row p - row_base."""
    js = tl.arange(0, SLOTS_P2)
    pos_t = tl.load(
        pos_ptr + flat[:, None] * SLOTS + js[None, :], mask=row_ok[:, None] & (js < SLOTS)[None, :], other=-1
    )
    has_t = pos_t >= 0
    return tl.where(has_t, pos_t - tl.load(row_base_ptr), 0), has_t


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
    pos_ptr,
    part_out_ptr,
    part_lse_ptr,
    row_base_ptr,
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
    GROUP: tl.constexpr,
    TILES_PER_BLOCK: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SLOTS: tl.constexpr,
    SLOTS_P2: tl.constexpr,
):
    """Causal attention of a BLOCK_M query tile to its own block, merged with the tile's SLOTS past
    partials from the workspace (SLOTS = 0: none). Grid (NB * TILES_PER_BLOCK, heads), head = head0 + axis 1.

    pos is [T * Hq, SLOTS]; a pick at rows position p has its partial at p - row_base in the
    contiguous part_out [rows, D] and part_lse [rows]."""
    blk = tl.program_id(0) // TILES_PER_BLOCK
    tile = tl.program_id(0) % TILES_PER_BLOCK
    head = head0 + tl.program_id(1)
    kv_head = head // GROUP
    start = tl.load(start_ptr + blk)
    length = tl.load(length_ptr + blk)
    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < length
    dims = tl.arange(0, HEAD_DIM)
    q = tl.load(
        q_ptr + (start + rows)[:, None] * stride_qt + head * stride_qh + dims[None, :], mask=row_ok[:, None], other=0.0
    )
    if SLOTS > 0:  # the picks' rows and log-sum-exps, loaded early to hide their latency
        idx_t, has_t = load_picks(pos_ptr, row_base_ptr, (start + rows) * num_q_heads + head, row_ok, SLOTS, SLOTS_P2)
        lse_t = tl.load(part_lse_ptr + idx_t, mask=has_t, other=float("-inf"))
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    for n0 in range(0, tl.minimum(length, tile * BLOCK_M + BLOCK_M), BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        kv_off = (start + cols)[:, None] * stride_kt + kv_head * stride_kh + dims[None, :]
        col_ok = (cols < length)[:, None]
        k = tl.load(k_ptr + kv_off, mask=col_ok, other=0.0)
        v = tl.load(v_ptr + kv_off, mask=col_ok, other=0.0)
        s = tl.dot(q, tl.trans(k)) * qk_scale
        s = tl.where(cols[None, :] <= rows[:, None], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    if SLOTS > 0:
        # A partial (o_j, lse_j) is a normalised output: the merge is the convex combination of
        # acc / l and the o_j with weights 2^(lse - top) (top: the largest lse of the row).
        lse_cur = m_i + tl.log2(l_i)
        top = tl.maximum(lse_cur, tl.max(lse_t, 1))
        w_t = tl.exp2(lse_t - top[:, None])
        w_cur = tl.exp2(lse_cur - top)
        total = w_cur + tl.sum(w_t, 1)
        acc = acc * (w_cur / l_i)[:, None]
        for j in tl.static_range(SLOTS):
            has_j = column(has_t.to(tl.int32), j, SLOTS_P2) > 0
            o_j = tl.load(
                part_out_ptr + column(idx_t, j, SLOTS_P2)[:, None] * HEAD_DIM + dims[None, :],
                mask=has_j[:, None],
                other=0.0,
            )
            acc += o_j.to(tl.float32) * column(w_t, j, SLOTS_P2)[:, None]
        m_i = top
        l_i = total
    out = acc / l_i[:, None]
    tl.store(
        out_ptr + (start + rows)[:, None] * stride_ot + head * stride_oh + dims[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=row_ok[:, None],
    )
    tl.store(lse_ptr + (start + rows) * stride_lt + head, m_i + tl.log2(l_i), mask=row_ok)


@triton.jit
def _past_fwd_kernel(
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
    row_base_ptr,
    tile_stride,
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
    BLOCK_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    WORKSPACE: tl.constexpr,
):
    """One gathered tile of queries that picked one (KV head, past block): attend the whole block.
    WORKSPACE: write the normalised partial (out, lse) of each row at its position in rows minus
    row_base (out_ptr/lse_ptr are the workspace [rows, D] / [rows]); otherwise merge into the
    queries' running (out, lse) in place (slot passes). Grid (tiles, tables): table tile_stride *
    axis 1, tile axis 0."""
    pid = tl.program_id(1) * tile_stride + tl.program_id(0)
    count = tl.load(tile_count_ptr + pid)
    if count > 0:
        seg = tl.load(tile_seg_ptr + pid)
        kv_head = seg // num_blocks
        kstart = tl.load(start_ptr + seg % num_blocks)
        r = tl.arange(0, BLOCK_M)
        row_ok = r < count
        first = tl.load(tile_start_ptr + pid)
        flat = tl.load(rows_ptr + first + r, mask=row_ok, other=0)
        t = flat // num_q_heads
        h = flat % num_q_heads
        dims = tl.arange(0, HEAD_DIM)
        q = tl.load(
            q_ptr + t[:, None] * stride_qt + h[:, None] * stride_qh + dims[None, :], mask=row_ok[:, None], other=0.0
        )
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
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
        lse_part = m_i + tl.log2(l_i)
        if WORKSPACE:
            idx = first - tl.load(row_base_ptr) + r
            tl.store(
                out_ptr + idx[:, None] * HEAD_DIM + dims[None, :],
                (acc / l_i[:, None]).to(out_ptr.dtype.element_ty),
                mask=row_ok[:, None],
            )
            tl.store(lse_ptr + idx, lse_part, mask=row_ok)
        else:
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


def slot_tiles(block_size: int, dim: int) -> SlotTiles:
    """Blocks >= 512 keys give segments of thousands of queries per (KV head, block, slot), so tiles
    of 128 gathered queries stay full; they halve the K/V re-reads per query and give wgmma 128-row
    operands (the flash-attention tutorial tile, 128 x 64, 8 warps, 3 stages). Smaller blocks keep
    64-row tiles: their segments are short and a half-empty 128-row tile wastes its matmuls."""
    if block_size >= 512 and dim <= 128:
        return SlotTiles(128, 64, 8, 3)
    return SlotTiles(64, key_tile(block_size), 8 if dim >= 128 else 4, 3)


def attention_forward(
    q, k, v, layout: BlockLayout, routing: Routing, block_size: int, scale: float, tiles: SlotTiles, work: Workspace
):
    """out [T, Hq, D] (q's dtype) and lse2 fp32 [T, Hq] for contiguous q [T, Hq, D], k, v [T, Hkv, D];
    `routing` was built with `tiles.query_tile` rows per tile, with run tiles if work.kv_heads > 0,
    slot tiles otherwise."""
    total, hq, dim = q.shape
    hkv = k.shape[1]
    group = hq // hkv
    slots = routing.seg_start.shape[2]
    out = torch.empty_like(q)
    lse = torch.empty(total, hq, dtype=torch.float32, device=q.device)
    if layout.num_blocks == 0:
        return out, lse
    block_m = min(tiles.query_tile, triton.next_power_of_2(block_size))
    per_block = triton.cdiv(block_size, block_m)

    def past(out_t, lse_t, seg, start_, count, row_base, grid, workspace):
        _past_fwd_kernel[grid](
            q,
            k,
            v,
            out_t,
            lse_t,
            layout.start,
            routing.rows,
            seg,
            start_,
            count,
            row_base,
            seg.stride(0) if seg.dim() == 2 else 0,
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
            BLOCK_SIZE=block_size,
            HEAD_DIM=dim,
            BLOCK_M=tiles.query_tile,
            BLOCK_N=tiles.key_tile,
            WORKSPACE=workspace,
            num_warps=tiles.warps,
            num_stages=tiles.stages,
        )

    def current(head0, heads, combine, part_out, part_lse, row_base):
        _current_block_fwd_kernel[(layout.num_blocks * per_block, heads)](
            q,
            k,
            v,
            out,
            lse,
            layout.start,
            layout.length,
            routing.pos,
            part_out,
            part_lse,
            row_base,
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
            GROUP=group,
            TILES_PER_BLOCK=per_block,
            HEAD_DIM=dim,
            BLOCK_M=block_m,
            BLOCK_N=tiles.key_tile,
            SLOTS=slots if combine else 0,
            SLOTS_P2=max(2, triton.next_power_of_2(slots)),
            num_warps=tiles.warps,
            num_stages=2,
        )

    if work.kv_heads == 0:  # slot passes (also when nothing is past: top-1)
        current(0, hq, False, out, lse, lse)
        for slot in range(slots):
            seg = routing.tile_seg[slot]
            past(out, lse, seg, routing.tile_start[slot], routing.tile_count[slot], lse, (seg.shape[0], 1), False)
        return out, lse
    chunk = work.kv_heads
    part_out = torch.empty(chunk * work.capacity, dim, dtype=work.dtype, device=q.device)
    part_lse = torch.empty(chunk * work.capacity, dtype=torch.float32, device=q.device)
    seg_start = routing.seg_start.view(-1)
    for h0 in range(0, hkv, chunk):
        heads = min(chunk, hkv - h0)
        row_base = seg_start[h0 * layout.num_blocks * slots :]
        seg = routing.run_seg[h0 : h0 + heads]
        past(
            part_out,
            part_lse,
            seg,
            routing.run_start[h0 : h0 + heads],
            routing.run_count[h0 : h0 + heads],
            row_base,
            (seg.shape[1], heads),
            True,
        )
        current(h0 * group, heads * group, True, part_out, part_lse, row_base)
    return out, lse
