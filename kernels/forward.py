"""MoBA attention forward: a causal flash kernel over the current block, then one key-block-centric
pass per past slot that merges its partial softmax into the running (out, lse) of each query.

Internal log-sum-exp is in base 2 of the scaled logits: lse2 = log2(sum_j 2^(q.k_j * scale * log2 e)).
The running output is kept in the output dtype (no fp32 [T, H, D] buffer); every merge is a convex
combination weighted by the two partial sums.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from kernels.layout import BlockLayout
from kernels.routing import Routing

LOG2E = 1.4426950408889634


@triton.jit
def _current_block_fwd_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    out_ptr,
    lse_ptr,
    start_ptr,
    length_ptr,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_ot,
    stride_oh,
    stride_lt,
    qk_scale,
    GROUP: tl.constexpr,
    TILES_PER_BLOCK: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Causal attention of a BLOCK_M query tile to its own block. Grid (NB * TILES_PER_BLOCK, Hq)."""
    blk = tl.program_id(0) // TILES_PER_BLOCK
    tile = tl.program_id(0) % TILES_PER_BLOCK
    head = tl.program_id(1)
    kv_head = head // GROUP
    start = tl.load(start_ptr + blk)
    length = tl.load(length_ptr + blk)
    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < length
    dims = tl.arange(0, HEAD_DIM)
    q = tl.load(
        q_ptr + (start + rows)[:, None] * stride_qt + head * stride_qh + dims[None, :], mask=row_ok[:, None], other=0.0
    )
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
    out = acc / l_i[:, None]
    tl.store(
        out_ptr + (start + rows)[:, None] * stride_ot + head * stride_oh + dims[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=row_ok[:, None],
    )
    tl.store(lse_ptr + (start + rows) * stride_lt + head, m_i + tl.log2(l_i), mask=row_ok)


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
    BLOCK_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """One gathered tile of queries that picked one (KV head, past block) in this slot: attend the
    whole block, merge into the queries' running (out, lse). Grid (max_tiles,)."""
    pid = tl.program_id(0)
    count = tl.load(tile_count_ptr + pid)
    if count > 0:
        seg = tl.load(tile_seg_ptr + pid)
        kv_head = seg // num_blocks
        kstart = tl.load(start_ptr + seg % num_blocks)
        r = tl.arange(0, BLOCK_M)
        row_ok = r < count
        flat = tl.load(rows_ptr + tl.load(tile_start_ptr + pid) + r, mask=row_ok, other=0)
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


def attention_forward(q, k, v, layout: BlockLayout, routing: Routing, block_size: int, scale: float, tiles: SlotTiles):
    """out [T, Hq, D] (q's dtype) and lse2 fp32 [T, Hq] for contiguous q [T, Hq, D], k, v [T, Hkv, D];
    `routing` was built with `tiles.query_tile` rows per tile."""
    total, hq, dim = q.shape
    group = hq // k.shape[1]
    out = torch.empty_like(q)
    lse = torch.empty(total, hq, dtype=torch.float32, device=q.device)
    if layout.num_blocks == 0:
        return out, lse
    block_m = min(tiles.query_tile, triton.next_power_of_2(block_size))
    per_block = triton.cdiv(block_size, block_m)
    _current_block_fwd_kernel[(layout.num_blocks * per_block, hq)](
        q,
        k,
        v,
        out,
        lse,
        layout.start,
        layout.length,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        out.stride(0),
        out.stride(1),
        lse.stride(0),
        scale * LOG2E,
        GROUP=group,
        TILES_PER_BLOCK=per_block,
        HEAD_DIM=dim,
        BLOCK_M=block_m,
        BLOCK_N=tiles.key_tile,
        num_warps=tiles.warps,
        num_stages=2,
    )
    for slot in range(routing.tile_seg.shape[0]):
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
            BLOCK_SIZE=block_size,
            HEAD_DIM=dim,
            BLOCK_M=tiles.query_tile,
            BLOCK_N=tiles.key_tile,
            num_warps=tiles.warps,
            num_stages=tiles.stages,
        )
    return out, lse
