"""Inverse index of a MoBA selection: for every (KV head, key block), the queries that selected it.

The attention kernels are key-block-centric: a program loads one key block and the gathered queries
that chose it as a dense tile, so uncorrelated routing costs no more than correlated routing. Past
selections are split into topk-1 slots (column j of the selection); within one slot a (query, head)
appears at most once.

`rows` lists flat query indices (t * Hq + h) sorted by (KV head, global block, slot, group head):
the queries of one (KV head, block, slot) are contiguous (a slot segment), and so are all the
queries of one (KV head, block) across slots and group heads (a run), and all the rows of one KV
head. Two tilings of `rows` into gathered query tiles:
- slot tiles [S, max_tiles]: per slot, tiles that never cross a slot segment (slot passes, which
  merge in place into per-query state);
- run tiles [Hkv, max_run_tiles]: per KV head, tiles that never cross a run (workspace passes,
  which write one partial result per row; `pos` finds a pick's row again).
A tile's `seg` is its global segment kv_head * NB + block (slot tiles: of its slot).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton

from kernels.layout import BlockLayout


class Routing(NamedTuple):
    rows: torch.Tensor  # int32 [S * T * Hq] flat query indices, sorted (entries past the valid ones unused)
    pos: torch.Tensor  # int32 [T * Hq, S] position in rows of each past pick, -1 where empty (run tiles only)
    seg_start: torch.Tensor  # int32 [Hkv, NB, S] first position in rows of each slot segment
    seg_count: torch.Tensor  # int32 [Hkv, NB, S] length of each slot segment
    tile_seg: torch.Tensor  # int32 [S, max_tiles] segment of a slot tile, -1 if none
    tile_start: torch.Tensor  # int32 [S, max_tiles] first position in rows of the tile
    tile_count: torch.Tensor  # int32 [S, max_tiles] valid rows in the tile (0 for no tile)
    run_seg: torch.Tensor  # int32 [Hkv, max_run_tiles] segment of a run tile, -1 if none
    run_start: torch.Tensor  # int32 [Hkv, max_run_tiles]
    run_count: torch.Tensor  # int32 [Hkv, max_run_tiles]


def token_blocks(layout: BlockLayout, total_tokens: int) -> torch.Tensor:
    """int64 [T] global block holding each token."""
    blocks = torch.arange(layout.num_blocks, device=layout.start.device)
    return torch.repeat_interleave(blocks, layout.length.long(), output_size=total_tokens)


def tile_segments(counts: torch.Tensor, starts: torch.Tensor, block_m: int, max_tiles: int, seg_ids: torch.Tensor):
    """Tiles of at most block_m rows over the segments of each row of counts/starts [R, n] (int64):
    (seg [R, max_tiles] = seg_ids[r, segment] or -1, tile start, tile count), int32, no host sync."""
    tiles = (counts + block_m - 1) // block_m
    tiles_end = torch.cumsum(tiles, 1)
    ids = torch.arange(max_tiles, device=counts.device).expand(counts.shape[0], -1).contiguous()
    seg = torch.searchsorted(tiles_end, ids, right=True)
    has = seg < counts.shape[1]
    seg = seg.clamp(max=counts.shape[1] - 1)
    tile_in_seg = ids - (tiles_end.gather(1, seg) - tiles.gather(1, seg))
    start = starts.gather(1, seg) + tile_in_seg * block_m
    count = torch.clamp(counts.gather(1, seg) - tile_in_seg * block_m, 0, block_m)
    return (
        torch.where(has, seg_ids.gather(1, seg), -1).int(),
        start.int(),
        torch.where(has, count, 0).int(),
    )


def route(
    selection: torch.Tensor,
    layout: BlockLayout,
    num_kv_heads: int,
    block_m: int,
    slot_tiles: bool = True,
    run_tiles: bool = True,
) -> Routing:
    """Routing of selection int32 [T, Hq, topk] into query tiles of block_m rows (no host sync);
    `slot_tiles` / `run_tiles` say which tilings to build (the other is left empty).

    Pass the selection without keeping another reference: it is freed before the sort.
    """
    total, hq, topk = selection.shape
    slots = topk - 1
    group = hq // num_kv_heads
    nb = layout.num_blocks
    device = selection.device
    none = torch.empty(0, 0, dtype=torch.int32, device=device)
    if slots == 0:
        empty = torch.empty(num_kv_heads, nb, 0, dtype=torch.int32, device=device)
        return Routing(none.view(-1), none, empty, empty, none, none, none, none, none, none)
    tok_block = token_blocks(layout, total)
    # int32 throughout: at 1M tokens these [T, Hq, S] temporaries set the peak memory.
    current = layout.local[tok_block][:, None, None]
    first = layout.first[tok_block][:, None, None]
    del tok_block
    past = selection[:, :, :slots]  # the past picks all sit in the first topk-1 columns
    num_keys = hq * nb * slots
    head = torch.arange(hq, device=device, dtype=torch.int32)[None, :, None]
    slot = torch.arange(slots, device=device, dtype=torch.int32)[None, None, :]
    keys = (((head // group) * nb + first + past) * slots + slot) * group + head % group
    keys.masked_fill_((past < 0) | (past == current), num_keys)
    del selection, past
    keys = keys.view(-1)
    counts = torch.bincount(keys, minlength=num_keys + 1)[:num_keys]
    order = torch.sort(keys, stable=True).indices
    pos = none
    if run_tiles:  # the inverse of the sort: only the workspace passes look picks up by query
        pos = torch.empty(keys.shape[0], dtype=torch.int32, device=device)
        pos.scatter_(0, order, torch.arange(keys.shape[0], dtype=torch.int32, device=device))
        pos = pos.masked_fill_(keys == num_keys, -1).view(total * hq, slots)
    del keys
    rows = torch.div(order, slots, rounding_mode="floor").to(torch.int32)
    del order
    seg_count = counts.view(num_kv_heads, nb, slots, group).sum(-1)
    seg_start = (torch.cumsum(seg_count.view(-1), 0) - seg_count.view(-1)).view(num_kv_heads, nb, slots)
    seg_ids = torch.arange(num_kv_heads * nb, device=device).view(num_kv_heads, nb)

    slot_tables = (none, none, none)
    if slot_tiles:
        max_tiles = triton.cdiv(total * hq, block_m) + num_kv_heads * nb
        slot_tables = tile_segments(
            seg_count.view(-1, slots).t(),
            seg_start.view(-1, slots).t(),
            block_m,
            max_tiles,
            seg_ids.view(1, -1).expand(slots, -1),
        )
    run_tables = (none, none, none)
    if run_tiles:
        max_run_tiles = triton.cdiv(total * group * slots, block_m) + nb
        run_tables = tile_segments(seg_count.sum(-1), seg_start[:, :, 0], block_m, max_run_tiles, seg_ids)
    return Routing(rows, pos, seg_start.int(), seg_count.int(), *slot_tables, *run_tables)
