"""Block layout of a packed varlen batch: where every MoBA key block starts, and which block holds a token.

Blocks are `block_size` consecutive tokens restarting at each sequence start (the last block of a
sequence may be partial). Blocks are numbered globally over the batch, sequence by sequence, so a
sequence's local block c is global block `first[seq] + c`.

The tables are computed on the host from cu_seqlens (one small copy each way): the kernels' grids
need the block count on the host anyway, and a dozen tiny device ops would leave the GPU waiting on
their launches at the start of every call. Reading a device cu_seqlens is a host sync, which drains
the GPU's queue; every MoBA layer of a training step gets the same cu_seqlens, so layouts are cached
per cu_seqlens tensor (while it is alive and not modified in place: its version counter) and only the
first layer pays the sync.
"""

from __future__ import annotations

import weakref
from typing import NamedTuple

import numpy as np
import torch


class BlockLayout(NamedTuple):
    """Global block tables (int32, on the tokens' device)."""

    start: torch.Tensor  # [NB] first token of the block
    length: torch.Tensor  # [NB] tokens in the block (block_size except a sequence's last block)
    local: torch.Tensor  # [NB] index of the block within its sequence
    first: torch.Tensor  # [NB] global index of local block 0 of the block's sequence
    order: torch.Tensor  # [NB] blocks in ascending local index (heaviest first, see below)
    num_blocks: int


_CACHE: dict = {}  # (id(cu_seqlens), block_size, total_tokens, device) -> (weakref, version, layout)


def block_layout(cu_seqlens: torch.Tensor, block_size: int, total_tokens: int, device: torch.device) -> BlockLayout:
    """Block tables on `device` from cu_seqlens int32 [N+1], cached per cu_seqlens tensor (see above;
    a write that bypasses the version counter, e.g. through `.data`, is not seen)."""
    key = (id(cu_seqlens), block_size, total_tokens, str(device))
    hit = _CACHE.get(key)
    if hit is not None and hit[0]() is cu_seqlens and hit[1] == cu_seqlens._version:
        return hit[2]
    layout = _build_layout(cu_seqlens, block_size, total_tokens, device)
    for dead in [k for k, (ref, _, _) in _CACHE.items() if ref() is None]:
        del _CACHE[dead]
    _CACHE[key] = (weakref.ref(cu_seqlens), cu_seqlens._version, layout)
    return layout


def _build_layout(cu_seqlens: torch.Tensor, block_size: int, total_tokens: int, device: torch.device) -> BlockLayout:
    """Block tables on `device` from cu_seqlens int32 [N+1].

    `order` lists the blocks by ascending local index: a sequence's first blocks are picked by most
    of its queries, so the key-block-centric kernels start their longest programs first.
    """
    # numpy on the host: a few microseconds per op, where torch's CPU ops measured milliseconds in all
    # (thread-pool wake-ups) while the GPU waited.
    cu = cu_seqlens.to(device="cpu", dtype=torch.int64).numpy()
    if int(cu[-1]) != total_tokens:
        raise ValueError(f"cu_seqlens must end at the token count {total_tokens}; it ends at {int(cu[-1])}.")
    lengths = cu[1:] - cu[:-1]
    blocks_per_seq = (lengths + block_size - 1) // block_size
    first_of_seq = np.cumsum(blocks_per_seq) - blocks_per_seq
    num_blocks = int(blocks_per_seq.sum())
    seq = np.repeat(np.arange(len(lengths)), blocks_per_seq)
    local = np.arange(num_blocks) - first_of_seq[seq]
    start = cu[:-1][seq] + local * block_size
    length = np.minimum(lengths[seq] - local * block_size, block_size)
    order = np.argsort(local, kind="stable")
    tables = np.stack([start, length, local, first_of_seq[seq], order]).astype(np.int32)
    tables = torch.from_numpy(tables)
    if torch.device(device).type == "cuda":  # pinned: the copy does not wait for the GPU's queue
        tables = tables.pin_memory()
    return BlockLayout(*tables.to(device, non_blocking=True).unbind(0), num_blocks)
