"""How the past-block passes run: through a bounded workspace of per-pick partials, or slot by slot.

Workspace passes: one launch covers every pick of a chunk of KV heads; a program owns one (KV head,
block), walks all its picks across slots in gathered tiles and writes one partial per pick
(forward: output and log-sum-exp; backward: dQ) at the pick's (query head, token, slot) row, and the
current-block kernel of each query then reads its picks' partials (contiguous) and merges them in
registers. Each query's state is read and written once instead of once per slot, and K/V are read
once per block instead of once per slot.

Slot passes (the fallback): one launch per slot merges into every query's state in place. They need
no workspace, so they serve shapes where even one KV head's partials would not fit the budget
(1M tokens with top-12: 3 GB per head).

In the backward the dK/dV program (up to 128 keys of a block, 256 at head dim 64) computes the dQ
partials of its keys for the block's picks from the dS already in its registers, so a pick's dQ comes
in key-tiles partials (1 for blocks up to 128 keys, 4 for 512, 2 for 512 at head dim 64) and no pass
recomputes scores for past dQ. Blocks of one key tile also get their causal dQ from the dK/dV programs
and a pure merge adds the partials; larger blocks' current-block dQ kernel adds them to the causal part
it computes. Blocks of more than MAX_BLOCK keys or MAX_KEY_TILES key tiles use slot passes. dQ partials
are in q's dtype (the dtype of the dQ they sum to; fp32 partials measured slower for no gain that
matters, bench/NOTES.md).

Budgets, in bytes of q. Training: 3x q for the backward's partials (the slot passes needed an fp32
dQ accumulator of 2x q; fewer, larger chunks measured faster, and 3x keeps the benchmark's peak
within 1.2x of SDPA's), and the same for a forward followed by a backward: its partials are freed
before the backward allocates dQ, dK, dV and its own workspace. A forward alone (inference,
evaluation) may take a quarter of q. Forward workspace passes are used for blocks up to
FORWARD_MAX_BLOCK keys only (see bench/NOTES.md).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

INFERENCE_BUDGET = 0.25
TRAINING_BUDGET = 3.0
FORWARD_MAX_BLOCK = 256
DQ_PARTIAL_DTYPE = None  # None: q's dtype (benchmarks compare torch.float32)
MAX_KEY_TILES = 4  # at most 4 dQ partials per pick
MAX_BLOCK = 512  # larger blocks take slot passes in the backward (1024 with 8 partials: 21% slower at 128K)
MAX_CHUNK_KV_HEADS = None  # cap on KV heads per chunk (tests and benchmarks force chunking with it)


class Workspace(NamedTuple):
    kv_heads: int  # KV heads per chunk; 0: slot passes
    capacity: int  # partial rows per KV head
    dtype: torch.dtype  # of the partials (forward: of the output rows; their lse is fp32)


SLOT_PASSES = Workspace(0, 0, torch.float32)


def plan(q: torch.Tensor, num_kv_heads: int, capacity: int, row_bytes: int, budget: float, dtype) -> Workspace:
    """KV heads per workspace chunk so that chunk * capacity * row_bytes <= budget * bytes of q."""
    heads = int(budget * q.numel() * q.element_size()) // max(capacity * row_bytes, 1)
    return Workspace(min(heads, num_kv_heads, MAX_CHUNK_KV_HEADS or num_kv_heads), capacity, dtype)


def forward_plan(q: torch.Tensor, num_kv_heads: int, slots: int, block_size: int, training: bool) -> Workspace:
    """One partial per pick: an output row in q's dtype and an fp32 log-sum-exp."""
    if slots == 0 or block_size > FORWARD_MAX_BLOCK:
        return SLOT_PASSES
    total, hq, dim = q.shape
    capacity = total * (hq // num_kv_heads) * slots
    budget = TRAINING_BUDGET if training else INFERENCE_BUDGET
    return plan(q, num_kv_heads, capacity, dim * q.element_size() + 4, budget, q.dtype)


def backward_plan(
    q: torch.Tensor, num_kv_heads: int, slots: int, key_tiles: int, block_size: int | None = None
) -> Workspace:
    """key_tiles dQ rows per pick (blocks of more than MAX_BLOCK keys, or more than MAX_KEY_TILES key
    tiles: slot passes)."""
    if slots == 0 or key_tiles > MAX_KEY_TILES or (block_size or 0) > MAX_BLOCK:
        return SLOT_PASSES
    total, hq, dim = q.shape
    dtype = DQ_PARTIAL_DTYPE or q.dtype
    capacity = total * (hq // num_kv_heads) * slots * key_tiles
    row_bytes = dim * torch.empty(0, dtype=dtype).element_size()
    return plan(q, num_kv_heads, capacity, row_bytes, TRAINING_BUDGET, dtype)
