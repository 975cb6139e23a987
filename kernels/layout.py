"""Block layout of a packed varlen batch: where every MoBA key block starts, and which queries it holds.

Blocks are `block_size` consecutive keys restarting at each sequence start (the last block of a
sequence may be partial). Blocks are numbered globally over the batch, sequence by sequence, so a
sequence's local block c is global block `first[seq] + c`. Queries are the last len_q(seq) positions
of their sequence (cu_seqlens_q vs cu_seqlens_k, bottom-right causal alignment; equal offsets for
self-attention): a block's queries are the query rows whose key position falls in the block, a
contiguous run of rows starting `q_offset` positions into the block.

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

    start: torch.Tensor  # [NB] first key of the block
    length: torch.Tensor  # [NB] keys in the block (block_size except a sequence's last block)
    local: torch.Tensor  # [NB] index of the block within its sequence
    first: torch.Tensor  # [NB] global index of local block 0 of the block's sequence
    order: torch.Tensor  # [NB] blocks in ascending local index (heaviest first, see below)
    q_start: torch.Tensor  # [NB] first query row whose current block this is
    q_len: torch.Tensor  # [NB] queries whose current block this is (0 for blocks before the queries)
    q_offset: torch.Tensor  # [NB] position in the block of its first query (0 for self-attention)
    num_blocks: int
    suffix: bool  # queries differ from keys: the kernels read q_start / q_len / q_offset (else start / length / 0)


_CACHE: dict = {}  # (id(cu_q), id(cu_k), block_size, totals, device) -> (weakrefs, versions, layout)


def block_layout(
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    block_size: int,
    total_q: int,
    total_k: int,
    device: torch.device,
    host_cu_seqlens=None,
) -> BlockLayout:
    """Block tables on `device` from the offsets int32 [N+1] of queries and keys (the same tensor for
    self-attention), cached per pair of tensors (see above; a write that bypasses the version counter,
    e.g. through `.data`, is not seen). `host_cu_seqlens` (offsets_q, offsets_k as ints) spares the read."""
    key = (id(cu_seqlens_q), id(cu_seqlens_k), block_size, total_q, total_k, str(device))
    versions = (cu_seqlens_q._version, cu_seqlens_k._version)
    hit = _CACHE.get(key)
    if hit is not None and hit[0][0]() is cu_seqlens_q and hit[0][1]() is cu_seqlens_k and hit[1] == versions:
        return hit[2]
    if host_cu_seqlens is None:
        host_q = cu_seqlens_q.to(device="cpu", dtype=torch.int64).numpy()
        host_k = host_q if cu_seqlens_k is cu_seqlens_q else cu_seqlens_k.to(device="cpu", dtype=torch.int64).numpy()
    else:
        host_q, host_k = (np.asarray(bounds, dtype=np.int64) for bounds in host_cu_seqlens)
    layout = _build_layout(host_q, host_k, block_size, total_q, total_k, device)
    for dead in [k for k, (refs, _, _) in _CACHE.items() if refs[0]() is None or refs[1]() is None]:
        del _CACHE[dead]
    _CACHE[key] = ((weakref.ref(cu_seqlens_q), weakref.ref(cu_seqlens_k)), versions, layout)
    return layout


def _build_layout(
    cu_q: np.ndarray, cu_k: np.ndarray, block_size: int, total_q: int, total_k: int, device: torch.device
) -> BlockLayout:
    """Block tables on `device` from the host offsets of queries and keys.

    `order` lists the blocks by ascending local index: a sequence's first blocks are picked by most
    of its queries, so the key-block-centric kernels start their longest programs first.
    """
    # numpy on the host: a few microseconds per op, where torch's CPU ops measured milliseconds in all
    # (thread-pool wake-ups) while the GPU waited.
    for name, cu, total in (("cu_seqlens_q", cu_q, total_q), ("cu_seqlens_k", cu_k, total_k)):
        if int(cu[-1]) != total:
            raise ValueError(f"{name} must end at the token count {total}; it ends at {int(cu[-1])}.")
    lengths = cu_k[1:] - cu_k[:-1]
    lengths_q = cu_q[1:] - cu_q[:-1]
    if len(lengths_q) != len(lengths) or (lengths_q > lengths).any():
        raise ValueError("cu_seqlens_q and cu_seqlens_k must describe the same sequences with len_q <= len_k.")
    blocks_per_seq = (lengths + block_size - 1) // block_size
    first_of_seq = np.cumsum(blocks_per_seq) - blocks_per_seq
    num_blocks = int(blocks_per_seq.sum())
    seq = np.repeat(np.arange(len(lengths)), blocks_per_seq)
    local = np.arange(num_blocks) - first_of_seq[seq]
    start = cu_k[:-1][seq] + local * block_size
    length = np.minimum(lengths[seq] - local * block_size, block_size)
    order = np.argsort(local, kind="stable")
    # Queries of a block: key positions [max(block start, offset), block end) of its sequence, where the
    # sequence's queries start at offset = len_k - len_q.
    offset = (lengths - lengths_q)[seq]
    first_query = np.maximum(local * block_size, offset)
    q_len = np.maximum(local * block_size + length - first_query, 0)
    q_start = cu_q[:-1][seq] + first_query - offset
    q_offset = first_query - local * block_size
    tables = np.stack([start, length, local, first_of_seq[seq], order, q_start, q_len, q_offset]).astype(np.int32)
    tables = torch.from_numpy(tables)
    if torch.device(device).type == "cuda":  # pinned: the copy does not wait for the GPU's queue
        tables = tables.pin_memory()
    suffix = not np.array_equal(cu_q, cu_k)
    return BlockLayout(*tables.to(device, non_blocking=True).unbind(0), num_blocks, suffix)
