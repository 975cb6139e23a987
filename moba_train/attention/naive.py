"""MoBA, the definition: dense masks, O(S^2) memory. The oracle every backend and test follows.

Layouts (flash-attn varlen convention):
    q_thd: [Tq, Hq, D];  k_thd, v_thd: [Tk, Hkv, D], Hq % Hkv == 0
    cu_seqlens_q: int32 [num_seqs + 1] over q's tokens, cu_seqlens_k: int32 [num_seqs + 1] over k's tokens;
    sequence j has len_k(j) keys and len_q(j) <= len_k(j) queries, the LAST len_q(j) positions of the
    sequence (causal alignment to the bottom right): query i of sequence j sits at key position
    len_k(j) - len_q(j) + i. Equal offsets (cu_seqlens_q == cu_seqlens_k) is the usual self-attention.
Query head h reads KV head kv(h) = h // (Hq // Hkv).

Semantics (the contract; see moba_train/attention/__init__.py for the full statement):
1. Blocks are `block_size` consecutive keys, restarting at every sequence start; the last block of
   a sequence may be partial.
2. A block's representative key is the mean of its keys, per KV head. The gate score of query t
   (head h) for block c is q[t, h] . mean_k[c, kv(h)], in fp32, unscaled, without gradient.
3. The current block (the one holding t's key position p) is always selected and attended causally
   (keys <= p). Future blocks are never selected; candidates for the other slots are the blocks
   strictly before the current one (all complete by construction).
4. `topk` counts the current block: the current block plus the topk-1 highest-scoring earlier
   blocks (all of them when fewer exist). Ties go to the lower block index (stable sort). A block
   whose score is -inf or NaN (non-finite queries or keys) is never chosen for a past slot.
5. One softmax over the union of selected keys; its log-sum-exp (natural log, fp32) is the `lse`.
6. With `shared_gqa_selection`, the heads of one KV group sum their gate scores and share one
   selection.
"""

from __future__ import annotations

import math

import torch

NO_BLOCK = -1
"""Padding value in selection tensors for slots a query cannot fill (fewer blocks than topk)."""


def gate_scores(q_lhd: torch.Tensor, k_lhd: torch.Tensor, block_size: int, shared_gqa_selection: bool) -> torch.Tensor:
    """Gate scores of one sequence's Lq queries (the last Lq of its Lk keys): [Lq, Hq, num_blocks] fp32,
    -inf where a block is not a candidate (and where the score is NaN).

    Candidates for the query at key position p are the blocks c < p // block_size.
    """
    length_q, hq, _ = q_lhd.shape
    length, hkv = k_lhd.shape[:2]
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
        scores = scores.view(length_q, hkv, group, num_blocks).sum(2, keepdim=True).expand(-1, -1, group, -1)
        scores = scores.reshape(length_q, hq, num_blocks)
    query_block = query_positions(length_q, length, q_lhd.device) // block_size
    candidate = torch.arange(num_blocks, device=q_lhd.device)[None, :] < query_block[:, None]  # [Lq, nb]
    return scores.masked_fill(~candidate[:, None, :] | scores.isnan(), float("-inf"))


def query_positions(length_q: int, length_k: int, device) -> torch.Tensor:
    """Key positions of a sequence's Lq queries: the last Lq of its Lk positions (bottom-right causal)."""
    return torch.arange(length_k - length_q, length_k, device=device)


def select_blocks(q_lhd, k_lhd, block_size: int, topk: int, shared_gqa_selection: bool = False) -> torch.Tensor:
    """Selected blocks of one sequence: int32 [Lq, Hq, topk], block indices ascending, NO_BLOCK-padded.

    The current block is always included (it is the largest index of the set).
    """
    with torch.no_grad():
        length_q, hq, _ = q_lhd.shape
        scores = gate_scores(q_lhd, k_lhd, block_size, shared_gqa_selection)
        num_blocks = scores.shape[-1]
        query_block = query_positions(length_q, k_lhd.shape[0], q_lhd.device) // block_size
        query_block = query_block[:, None].expand(length_q, hq)
        chosen = torch.full((length_q, hq, topk), NO_BLOCK, dtype=torch.int64, device=q_lhd.device)
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


def key_mask(selection_lhk: torch.Tensor, length_k: int, block_size: int) -> torch.Tensor:
    """Boolean [Lq, Hq, Lk]: may query t (head h) attend key s. Current block causal, others whole."""
    device = selection_lhk.device
    keys = torch.arange(length_k, device=device)
    key_block = keys // block_size
    selected = (selection_lhk[..., None] == key_block[None, None, None, :]).any(2)  # [Lq, Hq, Lk]
    causal = keys[None, :] <= query_positions(selection_lhk.shape[0], length_k, device)[:, None]  # [Lq, Lk]
    return selected & causal[:, None, :]


def _sequences(cu_seqlens_q, cu_seqlens_k):
    """(q_start, q_end, k_start, k_end) of every sequence."""
    bounds_q = cu_seqlens_q.tolist()
    bounds_k = bounds_q if cu_seqlens_k is None else cu_seqlens_k.tolist()
    return list(zip(bounds_q[:-1], bounds_q[1:], bounds_k[:-1], bounds_k[1:]))


def moba_selection_naive(
    q, k, *, cu_seqlens, block_size, topk, shared_gqa_selection=False, cu_seqlens_k=None
) -> torch.Tensor:
    """Selected key blocks for every (query, head): int32 [Tq, Hq, topk].

    `cu_seqlens` are the queries' offsets; `cu_seqlens_k` the keys' (default: the same). Entries are block
    indices local to the query's sequence (block c covers its keys [c * block_size, (c + 1) * block_size)),
    ascending, padded with NO_BLOCK (-1) at the end when a query has fewer than topk blocks available
    (it then has exactly 1 + number of earlier blocks).
    """
    out = torch.full((q.shape[0], q.shape[1], topk), NO_BLOCK, dtype=torch.int32, device=q.device)
    for qa, qb, ka, kb in _sequences(cu_seqlens, cu_seqlens_k):
        if qb > qa:
            out[qa:qb] = select_blocks(q[qa:qb], k[ka:kb], block_size, topk, shared_gqa_selection)
    return out


def moba_attention_naive(
    q, k, v, *, cu_seqlens, block_size, topk, softmax_scale=None, shared_gqa_selection=False, cu_seqlens_k=None,
    selection=None, return_lse=False,
):
    """MoBA by definition: [Tq, Hq, D] in q's dtype, computed in fp32, differentiable (also through lse).

    `cu_seqlens` are the queries' offsets, `cu_seqlens_k` the keys' (default: the same); `selection`
    (int32 [Tq, Hq, topk], the layout of moba_selection_naive) replaces the gate when given. With
    `return_lse`, also the fp32 log-sum-exp [Tq, Hq] of the scaled logits over the attended keys.
    """
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    group = q.shape[1] // k.shape[1]
    parts, lses = [], []
    for qa, qb, ka, kb in _sequences(cu_seqlens, cu_seqlens_k):
        if qb == qa:
            continue
        q_l, k_l, v_l = q[qa:qb].float(), k[ka:kb].float(), v[ka:kb].float()
        if selection is None:
            chosen = select_blocks(q[qa:qb], k[ka:kb], block_size, topk, shared_gqa_selection)
        else:
            chosen = selection[qa:qb]
        allowed = key_mask(chosen, kb - ka, block_size)  # [Lq, Hq, Lk]
        k_l = k_l.repeat_interleave(group, dim=1)
        v_l = v_l.repeat_interleave(group, dim=1)
        logits = (torch.einsum("thd,shd->ths", q_l, k_l) * scale).masked_fill(~allowed, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        parts.append(torch.einsum("ths,shd->thd", probs, v_l))
        lses.append(torch.logsumexp(logits, dim=-1))
    if not parts:
        out, lse = q.new_empty(q.shape), torch.empty(q.shape[:2], dtype=torch.float32, device=q.device)
    else:
        out, lse = torch.cat(parts).to(q.dtype), torch.cat(lses)
    return (out, lse) if return_lse else out


def full_attention_naive(q, k, v, *, cu_seqlens, softmax_scale=None, cu_seqlens_k=None) -> torch.Tensor:
    """Causal attention per sequence by definition (fp32 math, bottom-right aligned): [Tq, Hq, D]."""
    lengths = [kb - ka for _, _, ka, kb in _sequences(cu_seqlens, cu_seqlens_k)]
    block = max(max(lengths, default=0), 1)
    return moba_attention_naive(q, k, v, cu_seqlens=cu_seqlens, cu_seqlens_k=cu_seqlens_k, block_size=block, topk=1,
                                softmax_scale=softmax_scale)
