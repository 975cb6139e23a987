"""Inverse index of a MoBA selection: for every (KV head, key block), the queries that selected it.

The attention kernels are key-block-centric: a program loads one key block and the gathered queries
that chose it as a dense tile, so uncorrelated routing costs no more than correlated routing. Past
selections are split into topk-1 slots (column j of the selection); within one slot a (query, head)
appears at most once, so a slot pass can merge into per-query state in place without races.

`rows` lists flat query indices (t * Hq + h) sorted by (KV head, global block, slot, group head):
the queries of one (KV head, block, slot) are contiguous (a slot segment), and so are all the
queries of one (KV head, block) across slots and group heads (what the dK/dV program loops over).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton

from kernels.layout import BlockLayout


class Routing(NamedTuple):
    rows: torch.Tensor  # int32 [S * T * Hq] flat query indices, sorted (entries past the valid ones unused)
    seg_start: torch.Tensor  # int32 [Hkv, NB, S] first position in rows of each slot segment
    seg_count: torch.Tensor  # int32 [Hkv, NB, S] length of each slot segment
    tile_seg: torch.Tensor  # int32 [S, max_tiles] segment (kv_head * NB + block) of a query tile, -1 if none
    tile_start: torch.Tensor  # int32 [S, max_tiles] first position in rows of the tile
    tile_count: torch.Tensor  # int32 [S, max_tiles] valid rows in the tile (0 for no tile)


def token_blocks(layout: BlockLayout, total_tokens: int) -> torch.Tensor:
    """int64 [T] global block holding each token."""
    blocks = torch.arange(layout.num_blocks, device=layout.start.device)
    return torch.repeat_interleave(blocks, layout.length.long(), output_size=total_tokens)


def route(selection: torch.Tensor, layout: BlockLayout, num_kv_heads: int, block_m: int) -> Routing:
    """Routing of selection int32 [T, Hq, topk] into query tiles of block_m rows (no host sync).

    Pass the selection without keeping another reference: it is freed before the sort.
    """
    total, hq, topk = selection.shape
    slots = topk - 1
    group = hq // num_kv_heads
    nb = layout.num_blocks
    device = selection.device
    if slots == 0:
        none = torch.empty(0, 0, dtype=torch.int32, device=device)
        empty = torch.empty(num_kv_heads, nb, 0, dtype=torch.int32, device=device)
        return Routing(none.view(-1), empty, empty, none, none, none)
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
    del keys
    rows = torch.div(order, slots, rounding_mode="floor").to(torch.int32)
    del order
    seg_count = counts.view(num_kv_heads, nb, slots, group).sum(-1)
    seg_start = (torch.cumsum(seg_count.view(-1), 0) - seg_count.view(-1)).view(num_kv_heads, nb, slots)

    tiles = (seg_count + block_m - 1) // block_m  # [Hkv, NB, S]
    tiles = tiles.view(-1, slots).t()  # [S, Hkv * NB]
    tiles_end = torch.cumsum(tiles, 1)
    max_tiles = triton.cdiv(total * hq, block_m) + num_kv_heads * nb
    ids = torch.arange(max_tiles, device=device).expand(slots, -1).contiguous()
    seg = torch.searchsorted(tiles_end, ids, right=True)
    has = seg < tiles_end.shape[1]
    seg = seg.clamp(max=tiles_end.shape[1] - 1)
    tile_in_seg = ids - (tiles_end.gather(1, seg) - tiles.gather(1, seg))
    starts = seg_start.view(-1, slots).t()
    counts_s = seg_count.view(-1, slots).t()
    tile_start = starts.gather(1, seg) + tile_in_seg * block_m
    tile_count = torch.clamp(counts_s.gather(1, seg) - tile_in_seg * block_m, 0, block_m)
    return Routing(
        rows,
        seg_start.int(),
        seg_count.int(),
        torch.where(has, seg, -1).int(),
        tile_start.int(),
        torch.where(has, tile_count, 0).int(),
    )
