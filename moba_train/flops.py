"""FLOP formulas of ../shared/BENCH.md, in closed form (pure Python, no torch).

For one head and a query at position t (0-based in its sequence) with block size B and top-k k,
MoBA attends n_t = (t mod B) + 1 keys of its own block plus B * min(k - 1, t // B) keys of earlier
blocks; dense causal attention attends n_t = t + 1. Attention forward FLOPs = 4 * D * sum_t n_t per head
(QK^T and PV); backward = 2.5 x forward. Gating adds 2 * D * (t // B) per query and head.
Training step (model FLOPs, for MFU): 6 * N * tokens for the matrix parameters N, plus 3 x every
layer's attention forward FLOPs (its own kind; MoBA layers also count gating).
"""

from __future__ import annotations

from collections.abc import Sequence

BACKWARD_FACTOR = 2.5
"""Attention backward FLOPs as a multiple of forward."""


def _sum_min(cap: int, count: int) -> int:
    """sum over c in [0, count) of min(cap, c)."""
    if count <= cap + 1:
        return count * (count - 1) // 2
    return cap * (cap + 1) // 2 + cap * (count - 1 - cap)


def attended_keys(length: int, block_size: int | None = None, topk: int | None = None) -> int:
    """sum_t n_t over one sequence: keys attended by all its queries (one head)."""
    if block_size is None:
        return length * (length + 1) // 2
    full, rest = divmod(length, block_size)
    own = full * block_size * (block_size + 1) // 2 + rest * (rest + 1) // 2
    earlier = block_size * (block_size * _sum_min(topk - 1, full) + rest * min(topk - 1, full))
    return own + earlier


def attention_forward_flops(
    seqlens: Sequence[int], num_heads: int, head_dim: int, block_size: int | None = None, topk: int | None = None
) -> int:
    """Attention forward FLOPs of a batch of sequences: dense causal when block_size/topk are None."""
    if (block_size is None) != (topk is None):
        raise ValueError("block_size and topk must be given together (MoBA) or both left None (dense causal).")
    return 4 * head_dim * num_heads * sum(attended_keys(n, block_size, topk) for n in seqlens)


def gating_flops(seqlens: Sequence[int], num_heads: int, head_dim: int, block_size: int) -> int:
    """Gate-score FLOPs (2 * D * (t // B) per query and head) of a batch of sequences."""
    total = 0
    for n in seqlens:
        full, rest = divmod(n, block_size)
        total += block_size * full * (full - 1) // 2 + rest * full
    return 2 * head_dim * num_heads * total


def training_step_flops(
    matrix_params: int,
    seqlens: Sequence[int],
    layer_kinds: Sequence[str],
    num_heads: int,
    head_dim: int,
    block_size: int,
    topk: int,
) -> int:
    """Model FLOPs of one training step over `seqlens` (all micro-batches): 6 N tokens + 3 x attention."""
    dense = attention_forward_flops(seqlens, num_heads, head_dim)
    moba = attention_forward_flops(seqlens, num_heads, head_dim, block_size, topk)
    moba += gating_flops(seqlens, num_heads, head_dim, block_size)
    per_kind = {"full": dense, "moba": moba}
    unknown = set(layer_kinds) - per_kind.keys()
    if unknown:
        raise ValueError(f"layer_kinds may hold only 'moba' and 'full', got {sorted(unknown)}.")
    attention = sum(per_kind[kind] for kind in layer_kinds)
    return 6 * matrix_params * sum(seqlens) + 3 * attention
