"""MoBA in memory-efficient pure PyTorch: chunked block selection and a flash-style autograd Function.

Work is O(T * Hq * topk * block_size * D) and memory O(T * H * D) plus one bounded chunk: no
S x S tensor exists. Queries are processed in chunks of tokens; for every chunk and every selection
slot the selected key block of each (query, head) is gathered ([Q, Hq, block_size, D]) and merged into
a running output by online softmax (log-sum-exp), never by plain sums. The backward recomputes the
probabilities from the saved output and log-sum-exp, as flash attention does; no autograd graph of the
forward is kept.

Blocks are numbered globally over the packed batch (sequence 0's blocks first, then sequence 1's, ...),
which turns "a block of the query's own sequence, before its current block" into the index range
[first_block(seq), current_block), so the whole batch is handled by the same vectorised code.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass

import torch

from moba_train.attention.naive import NO_BLOCK

CHUNK_ELEMENTS_CPU = 1 << 22
"""Elements of the largest per-chunk intermediate on CPU (fp32: 16 MiB; cache-friendly)."""
CHUNK_ELEMENTS_CUDA = 1 << 26
"""Elements of the largest per-chunk intermediate on CUDA (fp32: 256 MiB; fewer kernel launches)."""


def chunk_elements(device: torch.device) -> int:
    return CHUNK_ELEMENTS_CUDA if device.type == "cuda" else CHUNK_ELEMENTS_CPU


@dataclass
class BlockLayout:
    """Where every token and block of a packed batch lies. Blocks are numbered globally.

    Host-side (Python ints): `bounds` (cu_seqlens), `first_block` [num_seqs + 1] (global index of each
    sequence's first block; the last entry is num_blocks). Device-side int64 [T]: `token_block`
    (global block of each token), `token_pos` (position inside its block), `token_first` (global index
    of the first block of the token's sequence). `block_start` int64 [num_blocks]: first token of each
    block; `block_len` int64 [num_blocks].
    """

    block_size: int
    bounds: list[int]
    first_block: list[int]
    token_block: torch.Tensor
    token_pos: torch.Tensor
    token_first: torch.Tensor
    block_start: torch.Tensor
    block_len: torch.Tensor

    @property
    def num_blocks(self) -> int:
        return self.first_block[-1]

    @property
    def max_blocks_per_seq(self) -> int:
        return max((b - a for a, b in zip(self.first_block[:-1], self.first_block[1:])), default=0)

    @staticmethod
    def build(bounds: list[int], block_size: int, device: torch.device) -> "BlockLayout":
        lengths_host = [e - s for s, e in zip(bounds[:-1], bounds[1:])]
        first_block = [0]
        for length in lengths_host:
            first_block.append(first_block[-1] + math.ceil(length / block_size))
        total = bounds[-1]
        lengths = torch.tensor(lengths_host, dtype=torch.int64, device=device)
        starts = torch.tensor(bounds[:-1], dtype=torch.int64, device=device)
        firsts = torch.tensor(first_block[:-1], dtype=torch.int64, device=device)
        seq_of_token = torch.repeat_interleave(torch.arange(len(lengths_host), device=device), lengths, output_size=total)
        local = torch.arange(total, device=device) - starts[seq_of_token]
        token_first = firsts[seq_of_token]
        token_block = token_first + local // block_size
        token_pos = local % block_size
        block_start = torch.nonzero(token_pos == 0).flatten()
        assert block_start.numel() == first_block[-1]
        block_len = torch.diff(block_start, append=torch.tensor([total], device=device))
        block_len = torch.minimum(block_len, torch.full_like(block_len, block_size))
        return BlockLayout(block_size, bounds, first_block, token_block, token_pos, token_first, block_start, block_len)

    def token_chunks(self, chunk_tokens: int):
        """Yield (start, end, lo, hi): token ranges and the global block range their candidates lie in."""
        total = self.bounds[-1]
        for start in range(0, total, chunk_tokens):
            end = min(start + chunk_tokens, total)
            seq_a = bisect.bisect_right(self.bounds, start) - 1
            seq_b = bisect.bisect_right(self.bounds, end - 1) - 1
            lo = self.first_block[seq_a]
            hi = self.first_block[seq_b] + (end - 1 - self.bounds[seq_b]) // self.block_size
            yield start, end, lo, hi

    def pad_blocks(self, x_thd: torch.Tensor) -> torch.Tensor:
        """[T, H, D] -> [num_blocks * H, block_size, D] (block-major, then head), zero-padded."""
        _, heads, dim = x_thd.shape
        padded = x_thd.new_zeros(self.num_blocks * self.block_size, heads, dim)
        padded[self.token_block * self.block_size + self.token_pos] = x_thd
        return padded.view(self.num_blocks, self.block_size, heads, dim).transpose(1, 2).reshape(-1, self.block_size, dim)

    def unpad_blocks(self, x_bhd: torch.Tensor, heads: int) -> torch.Tensor:
        """Inverse of pad_blocks: [num_blocks * H, block_size, D] -> [T, H, D]."""
        dim = x_bhd.shape[-1]
        x = x_bhd.view(self.num_blocks, heads, self.block_size, dim).transpose(1, 2)
        return x.reshape(-1, heads, dim)[self.token_block * self.block_size + self.token_pos]


def block_means(k_thd: torch.Tensor, layout: BlockLayout) -> torch.Tensor:
    """Representative key of every block: fp32 [num_blocks, Hkv, D], the mean of its keys."""
    key_sum = torch.zeros(layout.num_blocks, *k_thd.shape[1:], dtype=torch.float32, device=k_thd.device)
    key_sum.index_add_(0, layout.token_block, k_thd.float())
    return key_sum / layout.block_len.to(torch.float32)[:, None, None]


@torch.no_grad()
def select_blocks(q_thd, k_thd, layout: BlockLayout, topk: int, shared_gqa_selection: bool) -> torch.Tensor:
    """Selected blocks of every (query, head): int64 [T, Hq, topk] GLOBAL block indices, ascending,
    NO_BLOCK-padded; the current block is the last real entry. Gate scores are computed per chunk of
    queries against the candidate range only, so memory is O(chunk * Hq * blocks per sequence).
    """
    total, hq, dim = q_thd.shape
    hkv = k_thd.shape[1]
    group = hq // hkv
    device = q_thd.device
    selection = torch.full((total, hq, topk), NO_BLOCK, dtype=torch.int64, device=device)
    if total == 0:
        return selection
    if topk == 1:
        selection[:, :, 0] = layout.token_block[:, None]
        return selection
    mean_k = block_means(k_thd, layout)
    chunk = max(1, chunk_elements(device) // (hq * max(1, layout.max_blocks_per_seq)))
    for start, end, lo, hi in layout.token_chunks(chunk):
        current = layout.token_block[start:end]  # [Q]
        first = layout.token_first[start:end]
        q_c = q_thd[start:end].float().view(end - start, hkv, group, dim)
        span = hi - lo
        n_past = min(topk - 1, span)
        buffer = torch.full((end - start, hq, topk + 1), NO_BLOCK, dtype=torch.int64, device=device)
        count = torch.zeros(end - start, hq, dtype=torch.int64, device=device)
        if n_past > 0:
            scores = torch.einsum("qkgd,rkd->qkgr", q_c, mean_k[lo:hi])
            if shared_gqa_selection:
                scores = scores.sum(2, keepdim=True).expand(-1, -1, group, -1)
            scores = scores.reshape(end - start, hq, span)
            block_ids = torch.arange(lo, hi, device=device)
            candidate = (block_ids[None, :] >= first[:, None]) & (block_ids[None, :] < current[:, None])
            scores = scores.masked_fill(~candidate[:, None, :], float("-inf"))
            # Exact top-k with ties to the lower index: everything above the k-th value, then the
            # first (lowest-index) entries equal to it until k are taken.
            threshold = scores.topk(n_past, dim=-1).values[..., -1:]
            above = scores > threshold
            tied = scores == threshold
            need = n_past - above.sum(-1, keepdim=True)
            chosen = (above | (tied & (tied.cumsum(-1) <= need))) & (scores > float("-inf"))
            slot = torch.where(chosen, chosen.cumsum(-1) - 1, topk)
            buffer.scatter_(-1, slot, block_ids.expand(end - start, hq, span))
            count = chosen.sum(-1)
        buffer.scatter_(-1, count[..., None], current[:, None, None].expand(-1, hq, 1))
        selection[start:end] = buffer[..., :topk]
    return selection


def _slot_logits(q_c, k_blocks, flat, allowed, scale):
    """Logits of one slot: fp32 [Q, Hq, block_size], -inf where not allowed."""
    keys = k_blocks[flat].float()  # [Q, Hq, B, D]
    logits = torch.einsum("qhd,qhbd->qhb", q_c, keys) * scale
    return logits.masked_fill(~allowed, float("-inf")), keys


def _slot_indices(selection_c, current_c, pos_c, kv_head, hkv, block_size, slot):
    """Flat gather index [Q, Hq] into the padded blocks and the allowed-key mask [Q, Hq, B] of one slot."""
    block = selection_c[:, :, slot]
    valid = block >= 0
    flat = block.clamp(min=0) * hkv + kv_head
    key_pos = torch.arange(block_size, device=block.device)
    causal_ok = (block != current_c[:, None])[..., None] | (key_pos <= pos_c[:, None, None])
    return flat, valid[..., None] & causal_ok


class MobaAttentionFunction(torch.autograd.Function):
    """out = MoBA(q, k, v) for a given global selection; backward recomputes from (out, lse)."""

    @staticmethod
    def forward(ctx, q_thd, k_thd, v_thd, selection, layout: BlockLayout, scale: float):
        total, hq, dim = q_thd.shape
        hkv = k_thd.shape[1]
        topk = selection.shape[-1]
        bsz = layout.block_size
        kv_head = torch.arange(hq, device=q_thd.device) // (hq // hkv)
        k_blocks, v_blocks = layout.pad_blocks(k_thd), layout.pad_blocks(v_thd)
        out = torch.empty(total, hq, dim, dtype=torch.float32, device=q_thd.device)
        lse = torch.empty(total, hq, dtype=torch.float32, device=q_thd.device)
        chunk = max(1, chunk_elements(q_thd.device) // (hq * bsz * dim))
        for start in range(0, total, chunk):
            end = min(start + chunk, total)
            q_c = q_thd[start:end].float()
            current, pos = layout.token_block[start:end], layout.token_pos[start:end]
            row_max = torch.full((end - start, hq), float("-inf"), device=q_thd.device)
            row_sum = torch.zeros(end - start, hq, device=q_thd.device)
            acc = torch.zeros(end - start, hq, dim, device=q_thd.device)
            for slot in range(topk):
                flat, allowed = _slot_indices(selection[start:end], current, pos, kv_head, hkv, bsz, slot)
                logits, _ = _slot_logits(q_c, k_blocks, flat, allowed, scale)
                # Slot 0 always holds a real block, so row_max is finite from the first slot on.
                new_max = torch.maximum(row_max, logits.amax(-1))
                correction = torch.exp(row_max - new_max)
                probs = torch.exp(logits - new_max[..., None])
                row_sum = row_sum * correction + probs.sum(-1)
                acc = acc * correction[..., None] + torch.einsum("qhb,qhbd->qhd", probs, v_blocks[flat].float())
                row_max = new_max
            out[start:end] = acc / row_sum[..., None]
            lse[start:end] = row_max + torch.log(row_sum)
        out = out.to(q_thd.dtype)
        ctx.save_for_backward(q_thd, k_thd, v_thd, selection, out, lse)
        ctx.layout, ctx.scale = layout, scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q_thd, k_thd, v_thd, selection, out, lse = ctx.saved_tensors
        layout, scale = ctx.layout, ctx.scale
        total, hq, dim = q_thd.shape
        hkv = k_thd.shape[1]
        topk = selection.shape[-1]
        bsz = layout.block_size
        kv_head = torch.arange(hq, device=q_thd.device) // (hq // hkv)
        k_blocks, v_blocks = layout.pad_blocks(k_thd), layout.pad_blocks(v_thd)
        grad_q = torch.empty(total, hq, dim, dtype=torch.float32, device=q_thd.device)
        grad_k_blocks = torch.zeros(k_blocks.shape, dtype=torch.float32, device=q_thd.device)
        grad_v_blocks = torch.zeros(v_blocks.shape, dtype=torch.float32, device=q_thd.device)
        chunk = max(1, chunk_elements(q_thd.device) // (hq * bsz * dim))
        for start in range(0, total, chunk):
            end = min(start + chunk, total)
            q_c = q_thd[start:end].float()
            do_c = grad_out[start:end].float()
            delta = (do_c * out[start:end].float()).sum(-1)  # [Q, Hq]
            lse_c = lse[start:end]
            current, pos = layout.token_block[start:end], layout.token_pos[start:end]
            grad_q_c = torch.zeros_like(q_c)
            for slot in range(topk):
                flat, allowed = _slot_indices(selection[start:end], current, pos, kv_head, hkv, bsz, slot)
                logits, keys = _slot_logits(q_c, k_blocks, flat, allowed, scale)
                probs = torch.exp(logits - lse_c[..., None])  # [Q, Hq, B]
                values = v_blocks[flat].float()
                grad_probs = torch.einsum("qhd,qhbd->qhb", do_c, values)
                grad_logits = probs * (grad_probs - delta[..., None]) * scale
                grad_q_c += torch.einsum("qhb,qhbd->qhd", grad_logits, keys)
                index = flat.reshape(-1)
                grad_k_blocks.index_add_(0, index, (grad_logits[..., None] * q_c[:, :, None, :]).reshape(-1, bsz, dim))
                grad_v_blocks.index_add_(0, index, (probs[..., None] * do_c[:, :, None, :]).reshape(-1, bsz, dim))
            grad_q[start:end] = grad_q_c
        grad_k = layout.unpad_blocks(grad_k_blocks, hkv).to(k_thd.dtype)
        grad_v = layout.unpad_blocks(grad_v_blocks, hkv).to(v_thd.dtype)
        return grad_q.to(q_thd.dtype), grad_k, grad_v, None, None, None


def moba_attention_torch(q, k, v, *, bounds, block_size, topk, softmax_scale, shared_gqa_selection):
    """MoBA on [T, H, D] tensors (validated by the caller); bounds is cu_seqlens as a list of ints."""
    layout = BlockLayout.build(bounds, block_size, q.device)
    selection = select_blocks(q, k, layout, topk, shared_gqa_selection)
    return MobaAttentionFunction.apply(q, k, v, selection, layout, softmax_scale)
