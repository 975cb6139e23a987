"""MoBA, the definition: dense masks, O(S^2) memory. The oracle every backend and test follows.

Layouts (flash-attn varlen convention):
    q_thd: [total_tokens, Hq, D];  k_thd, v_thd: [total_tokens, Hkv, D], Hq % Hkv == 0
    cu_seqlens: int32 [num_seqs + 1], 0 = cu[0] <= cu[1] <= ... <= cu[-1] = total_tokens
Query head h reads KV head kv(h) = h // (Hq // Hkv).

Semantics (the contract; see moba_train/attention/__init__.py for the full statement):
1. Blocks are `block_size` consecutive tokens, restarting at every sequence start; the last block of
   a sequence may be partial.
2. A block's representative key is the mean of its keys, per KV head. The gate score of query t
   (head h) for block c is q[t, h] . mean_k[c, kv(h)], in fp32, unscaled, without gradient.
3. The current block (the one holding t) is always selected and attended causally (keys <= t).
   Future blocks are never selected; candidates for the other slots are the blocks strictly before
   the current one (all complete by construction).
4. `topk` counts the current block: the current block plus the topk-1 highest-scoring earlier
   blocks (all of them when fewer exist). Ties go to the lower block index (stable sort).
5. One softmax over the union of selected keys.
6. With `shared_gqa_selection`, the heads of one KV group sum their gate scores and share one
   selection.
"""

from __future__ import annotations

import math

import torch

NO_BLOCK = -1
"""Padding value in selection tensors for slots a query cannot fill (fewer blocks than topk)."""


def gate_scores(q_lhd: torch.Tensor, k_lhd: torch.Tensor, block_size: int, shared_gqa_selection: bool) -> torch.Tensor:
    """Gate scores of one sequence: [L, Hq, num_blocks] fp32, -inf where a block is not a candidate.

    Candidates for query t are the blocks c < t // block_size (the current block is handled apart).
    """
    length, hq, _ = q_lhd.shape
    hkv = k_lhd.shape[1]
    num_blocks = math.ceil(length / block_size)
    block_of_key = torch.arange(length, device=k_lhd.device) // block_size
    key_sum = torch.zeros(num_blocks, hkv, k_lhd.shape[2], dtype=torch.float32, device=k_lhd.device)
    key_sum.index_add_(0, block_of_key, k_lhd.float())
    counts = torch.bincount(block_of_key, minlength=num_blocks).to(torch.float32)
    mean_k = key_sum / counts[:, None, None]  # [num_blocks, Hkv, D]
    mean_k = mean_k.repeat_interleave(hq // hkv, dim=1)  # [num_blocks, Hq, D]
    scores = torch.einsum("thd,chd->thc", q_lhd.float(), mean_k)
    if shared_gqa_selection:
        group = hq // hkv
        scores = scores.view(length, hkv, group, num_blocks).sum(2, keepdim=True).expand(-1, -1, group, -1)
        scores = scores.reshape(length, hq, num_blocks)
    query_block = torch.arange(length, device=q_lhd.device) // block_size
    candidate = torch.arange(num_blocks, device=q_lhd.device)[None, :] < query_block[:, None]  # [L, nb]
    return scores.masked_fill(~candidate[:, None, :], float("-inf"))


def select_blocks(q_lhd, k_lhd, block_size: int, topk: int, shared_gqa_selection: bool = False) -> torch.Tensor:
    """Selected blocks of one sequence: int32 [L, Hq, topk], block indices ascending, NO_BLOCK-padded.

    The current block is always included (it is the largest index of the set).
    """
    with torch.no_grad():
        length, hq, _ = q_lhd.shape
        scores = gate_scores(q_lhd, k_lhd, block_size, shared_gqa_selection)
        num_blocks = scores.shape[-1]
        query_block = (torch.arange(length, device=q_lhd.device) // block_size)[:, None].expand(length, hq)
        chosen = torch.full((length, hq, topk), NO_BLOCK, dtype=torch.int64, device=q_lhd.device)
        chosen[..., 0] = query_block
        n_past = min(topk - 1, num_blocks)
        if n_past > 0:
            order_scores, order = torch.sort(scores, dim=-1, descending=True, stable=True)
            past = order[..., :n_past]
            past = past.masked_fill(order_scores[..., :n_past] == float("-inf"), NO_BLOCK)
            chosen[..., 1 : 1 + n_past] = past
        # Ascending with NO_BLOCK last: sort with padding mapped above any real index.
        big = num_blocks + 1
        chosen = torch.sort(chosen.masked_fill(chosen == NO_BLOCK, big), dim=-1).values
        return chosen.masked_fill(chosen == big, NO_BLOCK).to(torch.int32)


def key_mask(selection_lhk: torch.Tensor, length: int, block_size: int) -> torch.Tensor:
    """Boolean [L, Hq, L]: may query t (head h) attend key s. Current block causal, others whole."""
    device = selection_lhk.device
    pos = torch.arange(length, device=device)
    key_block = pos // block_size
    selected = (selection_lhk[..., None] == key_block[None, None, None, :]).any(2)  # [L, Hq, L]
    causal = pos[None, :] <= pos[:, None]  # [L, L]
    return selected & causal[:, None, :]


def moba_selection_naive(q, k, *, cu_seqlens, block_size, topk, shared_gqa_selection=False) -> torch.Tensor:
    """Selected key blocks for every (query, head): int32 [total_tokens, Hq, topk].

    Entries are block indices local to the query's sequence (block c covers its tokens
    [c * block_size, (c + 1) * block_size)), ascending, padded with NO_BLOCK (-1) at the end when a
    query has fewer than topk blocks available (it then has exactly 1 + number of earlier blocks).
    """
    bounds = cu_seqlens.tolist()
    out = torch.full((q.shape[0], q.shape[1], topk), NO_BLOCK, dtype=torch.int32, device=q.device)
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end > start:
            out[start:end] = select_blocks(q[start:end], k[start:end], block_size, topk, shared_gqa_selection)
    return out


def moba_attention_naive(
    q, k, v, *, cu_seqlens, block_size, topk, softmax_scale=None, shared_gqa_selection=False
) -> torch.Tensor:
    """MoBA by definition: [total_tokens, Hq, D] in q's dtype, computed in fp32, differentiable."""
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    group = q.shape[1] // k.shape[1]
    bounds = cu_seqlens.tolist()
    parts = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end == start:
            continue
        q_l, k_l, v_l = q[start:end].float(), k[start:end].float(), v[start:end].float()
        selection = select_blocks(q[start:end], k[start:end], block_size, topk, shared_gqa_selection)
        allowed = key_mask(selection, end - start, block_size)  # [L, Hq, L]
        k_l = k_l.repeat_interleave(group, dim=1)
        v_l = v_l.repeat_interleave(group, dim=1)
        logits = torch.einsum("thd,shd->ths", q_l, k_l) * scale
        probs = torch.softmax(logits.masked_fill(~allowed, float("-inf")), dim=-1)
        parts.append(torch.einsum("ths,shd->thd", probs, v_l))
    if not parts:
        return q.new_empty(q.shape)
    return torch.cat(parts).to(q.dtype)


def full_attention_naive(q, k, v, *, cu_seqlens, softmax_scale=None) -> torch.Tensor:
    """Causal attention per sequence by definition (fp32 math): [total_tokens, Hq, D]."""
    bounds = cu_seqlens.tolist()
    length = max((e - s for s, e in zip(bounds[:-1], bounds[1:])), default=0)
    block = max(length, 1)
    return moba_attention_naive(q, k, v, cu_seqlens=cu_seqlens, block_size=block, topk=1, softmax_scale=softmax_scale)
