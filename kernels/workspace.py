"""How the past-block passes run: through a bounded workspace of per-pick partials, or slot by slot.

Workspace passes: one launch covers every pick of a chunk of KV heads; a program owns one gathered
tile of a (KV head, block) run across all slots and writes one partial per row (forward: output
and log-sum-exp; backward: dQ), and the current-block kernel of each query then merges its picks'
partials in registers (found through `Routing.pos`). Each query's state is read and written once
instead of once per slot, and K/V are read once per block instead of once per slot.

Slot passes (the fallback): one launch per slot merges into every query's state in place. They need
no workspace, so they serve shapes where even one KV head's partials would not fit the budget
(1M tokens with top-12: 3 GB per head).

In the backward the dK/dV program (up to 128 keys of a block) computes the dQ partials of its
keys from the dS already in its registers, so a pick has one partial per key tile (1 for blocks up
to 128 keys, 4 for 512): no pass recomputes the scores for dQ. Blocks of more than MAX_KEY_TILES
key tiles use slot passes.

Budgets, in bytes of q: the forward's partials may take half of q (at 32K with top-8 one KV head of
16 takes 0.44x q); the backward's may take as much as the fp32 dQ accumulator that the slot passes
needed (2x q for bf16), so the backward's peak does not grow.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

FORWARD_BUDGET = 0.5
BACKWARD_BUDGET = 2.0
DQ_PARTIAL_DTYPE = torch.float32
MAX_KEY_TILES = 4  # blocks of up to 512 keys: the dQ of a pick comes in at most 4 partials
MAX_CHUNK_KV_HEADS = None  # cap on KV heads per chunk (tests and benchmarks force chunking with it)


class Workspace(NamedTuple):
    kv_heads: int  # KV heads per chunk; 0: slot passes
    capacity: int  # picks per KV head (T * group * slots)
    dtype: torch.dtype  # of the backward's dQ partials


def plan(q: torch.Tensor, num_kv_heads: int, slots: int, pick_bytes: int, budget: float) -> Workspace:
    """KV heads per workspace chunk so that chunk * capacity * pick_bytes <= budget * bytes of q."""
    total, hq, _ = q.shape
    capacity = total * (hq // num_kv_heads) * slots
    if slots == 0:
        return Workspace(0, 0, DQ_PARTIAL_DTYPE)
    heads = int(budget * q.numel() * q.element_size()) // max(capacity * pick_bytes, 1)
    return Workspace(min(heads, num_kv_heads, MAX_CHUNK_KV_HEADS or num_kv_heads), capacity, DQ_PARTIAL_DTYPE)


def forward_plan(q: torch.Tensor, num_kv_heads: int, slots: int) -> Workspace:
    """Partials: output row in q's dtype plus an fp32 log-sum-exp."""
    return plan(q, num_kv_heads, slots, q.shape[-1] * q.element_size() + 4, FORWARD_BUDGET)


def backward_plan(q: torch.Tensor, num_kv_heads: int, slots: int, key_tiles: int) -> Workspace:
    """Partials: one dQ row in DQ_PARTIAL_DTYPE per pick and key tile of the dK/dV programs (each
    program owns up to 128 keys and writes the dQ of its keys); slot passes above MAX_KEY_TILES."""
    if key_tiles > MAX_KEY_TILES:
        return Workspace(0, 0, DQ_PARTIAL_DTYPE)
    itemsize = torch.empty(0, dtype=DQ_PARTIAL_DTYPE).element_size()
    return plan(q, num_kv_heads, slots, q.shape[-1] * itemsize * key_tiles, BACKWARD_BUDGET)
