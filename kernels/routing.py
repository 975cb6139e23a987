"""Inverse index of a MoBA selection: for every (KV head, key block), the queries that selected it.

The attention kernels are key-block-centric: a program loads one key block and the gathered queries
that chose it as dense tiles, so uncorrelated routing costs no more than correlated routing. Past
selections are split into topk-1 slots (column j of the selection); within one slot a (query, head)
appears at most once.

`rows` lists pick ids (flat * S + slot, flat = t * Hq + h: the pick's index in the [T, Hq, S] past
columns of the selection) grouped by (KV head, global block): all the picks of one (KV head, block)
across slots and group heads are contiguous (a run, which the workspace passes and dK/dV walk), and
so are all the picks of one KV head. Two orders:
- run keys (workspace passes): within a run, picks in ascending pick id (token-major). The sort key
  is the run id kv_head * NB + block alone, int16 where it fits: a 2-pass radix sort instead of 4;
- slot keys (slot passes): within a run, by (slot, group head), so the picks of one (KV head, block,
  slot) are contiguous too (a slot segment). Slot passes walk slot tiles [S, max_tiles]: per slot,
  tiles of block_m picks that never cross a slot segment (they merge in place into per-query
  state). A tile's `seg` is its global segment kv_head * NB + block.
`seg_start` and `seg_count` bound the segments: [Hkv, NB, 1] (runs) or [Hkv, NB, S] (slot segments).

The gating writes a query's past picks first, ascending, so its valid slots are 0 .. num_past - 1:
the workspace passes find a pick's partial result by (query, head, slot) with no inverse index.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .layout import BlockLayout


class Routing(NamedTuple):
    rows: torch.Tensor  # int64 [S * T * Hq] pick ids flat * S + slot, grouped (entries past the valid ones unused)
    num_past: torch.Tensor  # int32 [T * Hq] past picks of each (query, head)
    seg_start: torch.Tensor  # int32 [Hkv, NB, 1 or S] first position in rows of each run or slot segment
    seg_count: torch.Tensor  # int32 [Hkv, NB, 1 or S] length of each run or slot segment
    tile_seg: torch.Tensor  # int32 [S, max_tiles] segment of a slot tile (set where tile_count > 0)
    tile_start: torch.Tensor  # int32 [S, max_tiles] first position in rows of the tile (where tile_count > 0)
    tile_count: torch.Tensor  # int32 [S, max_tiles] valid rows in the tile (0 for no tile)


@triton.jit
def _pick_keys_kernel(
    sel_ptr,
    keys_ptr,
    num_past_ptr,
    start_ptr,
    length_ptr,
    local_ptr,
    first_ptr,
    num_q_heads,
    num_blocks,
    GROUP: tl.constexpr,
    TOPK: tl.constexpr,
    SLOTS: tl.constexpr,
    SLOTS_P2: tl.constexpr,
    ROWS: tl.constexpr,
    TILES_PER_BLOCK: tl.constexpr,
    RUN_KEYS: tl.constexpr,
):
    """Sort key of every past pick of ROWS queries of one block and one head, and each query's number
    of past picks (the block's query rows: start_ptr / length_ptr are the layout's q_start / q_len).
    RUN_KEYS: the run id kv_head * NB + block (empty slots -1, sorted first); else the slot segment key
    (empty slots Hq * NB * SLOTS, sorted last). Grid (NB * TILES_PER_BLOCK, Hq); sel is contiguous
    [T, Hq, TOPK]; keys in keys_ptr's dtype."""
    blk = tl.program_id(0) // TILES_PER_BLOCK
    head = tl.program_id(1)
    start = tl.load(start_ptr + blk)
    length = tl.load(length_ptr + blk)
    current = tl.load(local_ptr + blk)
    first = tl.load(first_ptr + blk)
    rows = (tl.program_id(0) % TILES_PER_BLOCK) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < length
    flat = (start + rows) * num_q_heads + head
    js = tl.arange(0, SLOTS_P2)
    ok = row_ok[:, None] & (js < SLOTS)[None, :]
    past = tl.load(sel_ptr + flat[:, None] * TOPK + js[None, :], mask=ok, other=-1)
    valid = (past >= 0) & (past != current)
    run = (head // GROUP) * num_blocks + first + past
    if RUN_KEYS:
        key = tl.where(valid, run, -1)
    else:
        key = tl.where(valid, (run * SLOTS + js[None, :]) * GROUP + head % GROUP, num_q_heads * num_blocks * SLOTS)
    tl.store(keys_ptr + flat[:, None] * SLOTS + js[None, :], key.to(keys_ptr.dtype.element_ty), mask=ok)
    tl.store(num_past_ptr + flat, tl.sum(valid.to(tl.int32), 1), mask=row_ok)


@triton.jit
def _slot_tiles_kernel(
    seg_start_ptr,
    seg_count_ptr,
    tiles_end_ptr,
    tile_seg_ptr,
    tile_start_ptr,
    tile_count_ptr,
    num_segs,
    max_tiles,
    SLOTS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    STEP: tl.constexpr,
):
    """Slot tiles of one slot segment: tiles of BLOCK_M picks at positions tiles_end - tiles .. of its
    slot's table (tiles_end: inclusive cumsum over the slot's segments). Grid (num_segs, SLOTS)."""
    seg = tl.program_id(0)
    slot = tl.program_id(1)
    count = tl.load(seg_count_ptr + seg * SLOTS + slot)
    first = tl.load(seg_start_ptr + seg * SLOTS + slot)
    tiles = (count + BLOCK_M - 1) // BLOCK_M
    base = slot * max_tiles + tl.load(tiles_end_ptr + slot * num_segs + seg) - tiles
    for j0 in range(0, tiles, STEP):
        j = j0 + tl.arange(0, STEP)
        ok = j < tiles
        tl.store(tile_seg_ptr + base + j, tl.zeros([STEP], dtype=tl.int32) + seg, mask=ok)
        tl.store(tile_start_ptr + base + j, first + j * BLOCK_M, mask=ok)
        tl.store(tile_count_ptr + base + j, tl.minimum(count - j * BLOCK_M, BLOCK_M), mask=ok)


SHORT_KEYS_MAX = 32766  # run keys are int16 while every run id and its bound fit (Hkv * NB <= this)


def route(
    selection: torch.Tensor, layout: BlockLayout, num_kv_heads: int, block_size: int, block_m: int, slot_tiles: bool
) -> Routing:
    """Routing of selection int32 [T, Hq, topk] (contiguous; no host sync). `slot_tiles` (slot passes):
    slot keys and the slot tiles of block_m picks; otherwise run keys.

    Pass the selection without keeping another reference: it is freed before the sort.
    """
    total, hq, topk = selection.shape
    slots = topk - 1
    group = hq // num_kv_heads
    nb = layout.num_blocks
    device = selection.device
    none = torch.empty(0, 0, dtype=torch.int32, device=device)
    if slots == 0 or nb == 0:
        empty = torch.empty(num_kv_heads, nb, slots, dtype=torch.int32, device=device)
        return Routing(none.view(-1).long(), none.view(-1), empty, empty, none, none, none)
    num_runs = num_kv_heads * nb
    if slot_tiles:  # keys per run: one per (slot, group head); segments per run: one per slot
        keys_per_run, segs, key_dtype = slots * group, slots, torch.int32
    else:
        keys_per_run, segs, key_dtype = 1, 1, torch.int16 if num_runs <= SHORT_KEYS_MAX else torch.int32
    keys = torch.empty(total * hq * slots, dtype=key_dtype, device=device)
    num_past = torch.empty(total * hq, dtype=torch.int32, device=device)
    rows_per_program = 64
    tiles = triton.cdiv(block_size, rows_per_program)
    _pick_keys_kernel[(nb * tiles, hq)](
        selection,
        keys,
        num_past,
        layout.q_start,
        layout.q_len,
        layout.local,
        layout.first,
        hq,
        nb,
        GROUP=group,
        TOPK=topk,
        SLOTS=slots,
        SLOTS_P2=max(2, triton.next_power_of_2(slots)),
        ROWS=rows_per_program,
        TILES_PER_BLOCK=tiles,
        RUN_KEYS=not slot_tiles,
    )
    del selection
    keys, rows = torch.sort(keys, stable=True)  # a key's index is its pick id; int64 rows (no conversion pass)
    # Segment bounds by binary search in the sorted keys: torch.bincount syncs with the host (it
    # reads the input's min and max) and its atomics contend when few segments hold many picks.
    step = keys_per_run // segs  # a slot segment spans its group heads' keys
    bounds = torch.searchsorted(
        keys, torch.arange(0, num_runs * keys_per_run + 1, step, device=device, dtype=keys.dtype)
    )
    del keys
    seg_start = bounds[:-1].int().view(num_kv_heads, nb, segs)
    seg_count = (bounds[1:] - bounds[:-1]).int().view(num_kv_heads, nb, segs)
    slot_tables = (none, none, none)
    if slot_tiles:
        max_tiles = triton.cdiv(total * hq, block_m) + num_runs
        tiles_end = torch.cumsum(((seg_count + block_m - 1) // block_m).view(num_runs, slots).t(), 1)
        slot_tables = (
            torch.empty(slots, max_tiles, dtype=torch.int32, device=device),
            torch.empty(slots, max_tiles, dtype=torch.int32, device=device),
            torch.zeros(slots, max_tiles, dtype=torch.int32, device=device),
        )
        _slot_tiles_kernel[(num_runs, slots)](
            seg_start, seg_count, tiles_end, *slot_tables, num_runs, max_tiles, SLOTS=slots, BLOCK_M=block_m, STEP=64
        )
    return Routing(rows, num_past, seg_start, seg_count, *slot_tables)
