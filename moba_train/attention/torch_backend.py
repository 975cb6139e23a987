"""MoBA in memory-efficient pure PyTorch: chunked block selection and a flash-style autograd Function.

Attention work is O(T * Hq * topk * block_size * D) (gating adds O(T * Hq * blocks * D), as in MoBA
itself) and memory O(T * H * (D + topk)) plus one bounded chunk: no S x S tensor exists. Queries are
processed in chunks of tokens; for every chunk and every selection slot, the logits of each (query,
head) against its selected key block come from one sparse sampled product (SDDMM) and P @ V from one
sparse-dense product (see `_Slot`); the slots are merged into a running output by online softmax
(log-sum-exp), never by plain sums. The backward recomputes the probabilities from the saved output
and log-sum-exp, as flash attention does; no autograd graph of the forward is kept.

Blocks are numbered globally over the packed batch (sequence 0's blocks first, then sequence 1's, ...),
which turns "a block of the query's own sequence, before its current block" into the index range
[first_block(seq), current_block), so the whole batch is handled by the same vectorised code.
"""

from __future__ import annotations

import bisect
import math
import warnings
from dataclasses import dataclass

import torch

from moba_train.attention.naive import NO_BLOCK

# The CSR tensors below are internal scratch matrices; PyTorch's "beta" notice would only confuse users.
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta", category=UserWarning)

CHUNK_ELEMENTS_CPU = 1 << 22
"""Elements of the largest per-chunk intermediate on CPU (fp32: 16 MiB; cache-friendly)."""
CHUNK_ELEMENTS_CUDA = 1 << 26
"""Elements of the largest per-chunk intermediate on CUDA (fp32: 256 MiB; fewer kernel launches)."""


def chunk_elements(device: torch.device) -> int:
    return CHUNK_ELEMENTS_CUDA if device.type == "cuda" else CHUNK_ELEMENTS_CPU


@dataclass
class BlockLayout:
    """Where every query, key and block of a packed batch lies. Blocks (of keys) are numbered globally.

    Host-side (Python ints): `bounds_q` / `bounds_k` (cu_seqlens of queries and keys), `first_block`
    [num_seqs + 1] (global index of each sequence's first block; the last entry is num_blocks).
    Query tables, device int64 [Tq]: `token_block` (global current block of each query, the block of its
    key position), `token_pos` (that position inside the block), `token_first` (global index of the first
    block of the query's sequence). Key tables, device int64 [Tk]: `key_block`, `key_pos`.
    `block_start` int64 [num_blocks]: first key of each block; `block_len` int64 [num_blocks].
    """

    block_size: int
    bounds_q: list[int]
    bounds_k: list[int]
    first_block: list[int]
    token_block: torch.Tensor
    token_pos: torch.Tensor
    token_first: torch.Tensor
    key_block: torch.Tensor
    key_pos: torch.Tensor
    block_start: torch.Tensor
    block_len: torch.Tensor

    @property
    def num_blocks(self) -> int:
        return self.first_block[-1]

    @property
    def max_blocks_per_seq(self) -> int:
        return max((b - a for a, b in zip(self.first_block[:-1], self.first_block[1:])), default=0)

    @staticmethod
    def build(bounds_q: list[int], bounds_k: list[int], block_size: int, device: torch.device) -> "BlockLayout":
        lengths_k = [e - s for s, e in zip(bounds_k[:-1], bounds_k[1:])]
        lengths_q = [e - s for s, e in zip(bounds_q[:-1], bounds_q[1:])]
        first_block = [0]
        for length in lengths_k:
            first_block.append(first_block[-1] + math.ceil(length / block_size))
        firsts = torch.tensor(first_block[:-1], dtype=torch.int64, device=device)
        key_first, key_local = _token_tables(bounds_k, lengths_k, firsts, device)
        key_block = key_first + key_local // block_size
        key_pos = key_local % block_size
        # Queries are the last len_q keys of their sequence: local key position = (len_k - len_q) + local index.
        offsets = [k - q for k, q in zip(lengths_k, lengths_q)]
        token_first, token_local = _token_tables(bounds_q, lengths_q, firsts, device, offsets)
        block_start = torch.nonzero(key_pos == 0).flatten()
        assert block_start.numel() == first_block[-1]
        block_len = torch.diff(block_start, append=torch.tensor([bounds_k[-1]], device=device))
        block_len = torch.minimum(block_len, torch.full_like(block_len, block_size))
        return BlockLayout(block_size, bounds_q, bounds_k, first_block, token_first + token_local // block_size,
                           token_local % block_size, token_first, key_block, key_pos, block_start, block_len)

    def token_chunks(self, chunk_tokens: int):
        """Yield (start, end, lo, hi): query ranges and the global block range their candidates lie in."""
        total = self.bounds_q[-1]
        for start in range(0, total, chunk_tokens):
            end = min(start + chunk_tokens, total)
            seq_a = bisect.bisect_right(self.bounds_q, start) - 1
            seq_b = bisect.bisect_right(self.bounds_q, end - 1) - 1
            # Key position of the chunk's last query: its sequence's len_k minus the queries after it.
            last = (self.bounds_k[seq_b + 1] - self.bounds_k[seq_b]) - (self.bounds_q[seq_b + 1] - end + 1)
            lo = self.first_block[seq_a]
            hi = self.first_block[seq_b] + last // self.block_size
            yield start, end, lo, hi

    def pad_blocks(self, x_thd: torch.Tensor) -> torch.Tensor:
        """Keys or values [Tk, H, D] -> [num_blocks * H, block_size, D] (block-major, then head), zero-padded."""
        _, heads, dim = x_thd.shape
        padded = x_thd.new_zeros(self.num_blocks * self.block_size, heads, dim)
        padded[self.key_block * self.block_size + self.key_pos] = x_thd
        padded = padded.view(self.num_blocks, self.block_size, heads, dim).transpose(1, 2)
        return padded.reshape(-1, self.block_size, dim)

    def unpad_blocks(self, x_bhd: torch.Tensor, heads: int) -> torch.Tensor:
        """Inverse of pad_blocks: [num_blocks * H, block_size, D] -> [Tk, H, D]."""
        dim = x_bhd.shape[-1]
        x = x_bhd.view(self.num_blocks, heads, self.block_size, dim).transpose(1, 2)
        return x.reshape(-1, heads, dim)[self.key_block * self.block_size + self.key_pos]


def _token_tables(bounds, lengths, firsts, device, offsets=None):
    """(first global block of each token's sequence, local position of each token) over a packed tensor;
    `offsets` shift the local positions of each sequence (queries: len_k - len_q)."""
    total = bounds[-1]
    seq_of_token = torch.repeat_interleave(torch.arange(len(lengths), device=device),
                                           torch.tensor(lengths, dtype=torch.int64, device=device), output_size=total)
    starts = torch.tensor(bounds[:-1], dtype=torch.int64, device=device)
    if offsets is not None:
        starts = starts - torch.tensor(offsets, dtype=torch.int64, device=device)
    return firsts[seq_of_token], torch.arange(total, device=device) - starts[seq_of_token]


def local_selection(selection: torch.Tensor, layout: BlockLayout) -> torch.Tensor:
    """GLOBAL selection int64 [Tq, Hq, topk] -> int32 block indices local to each query's sequence (-1 kept)."""
    local = selection - layout.token_first[:, None, None]
    return torch.where(selection >= 0, local, NO_BLOCK).to(torch.int32)


def global_selection(selection: torch.Tensor, layout: BlockLayout) -> torch.Tensor:
    """Inverse of local_selection: int32 local indices -> int64 global ones (-1 kept)."""
    global_ = selection.long() + layout.token_first[:, None, None]
    return torch.where(selection >= 0, global_, NO_BLOCK)


def block_means(k_thd: torch.Tensor, layout: BlockLayout) -> torch.Tensor:
    """Representative key of every block: fp32 [num_blocks, Hkv, D], the mean of its keys."""
    key_sum = torch.zeros(layout.num_blocks, *k_thd.shape[1:], dtype=torch.float32, device=k_thd.device)
    key_sum.index_add_(0, layout.key_block, k_thd.float())
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
            scores = scores.masked_fill(~candidate[:, None, :] | scores.isnan(), float("-inf"))
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


class _Slot:
    """One selection slot of a query chunk as sparse matrices over the rows r = (t, h) of the chunk.

    Row r reads the `block_size` consecutive rows of the padded key matrix [num_blocks * Hkv * B, D]
    that hold its selected block (for KV head kv(h)). Logits are a sampled dense-dense product (SDDMM)
    and P @ V a sparse-dense product, so nothing of size [rows, B, D] is ever materialised.
    """

    def __init__(self, selection_c, current_c, pos_c, kv_head, hkv, block_size, slot, num_key_rows):
        block = selection_c[:, :, slot]  # [Q, Hq]
        key_pos = torch.arange(block_size, device=block.device)
        causal_ok = (block != current_c[:, None])[..., None] | (key_pos <= pos_c[:, None, None])
        self.allowed = ((block >= 0)[..., None] & causal_ok).view(-1, block_size)  # [R, B]
        rows = block.numel()
        self.block_size = block_size
        self.target = (block.clamp(min=0) * hkv + kv_head).view(-1)  # [R]: padded (block, KV head)
        self.cols = (self.target[:, None] * block_size + key_pos).view(-1)
        self.crow = torch.arange(rows + 1, device=block.device) * block_size
        self.shape = (rows, num_key_rows)
        self._transpose = None

    def matrix(self, values_rb):
        """CSR [R, key rows] with values [R, B] at this slot's positions."""
        return torch.sparse_csr_tensor(self.crow, self.cols, values_rb.reshape(-1), self.shape, check_invariants=False)

    def transposed(self, values_rb):
        """CSR [key rows, R]: the transpose of matrix(values_rb). Key row (g, b) of target g lists the
        rows r that selected g, ascending; its pattern is built once per slot."""
        if self._transpose is None:
            rows, bsz = self.shape[0], self.block_size
            device = self.target.device
            order = torch.argsort(self.target, stable=True)
            counts = torch.bincount(self.target, minlength=self.shape[1] // bsz)
            starts = counts.cumsum(0) - counts
            target = self.target[order]
            rank = torch.arange(rows, device=device) - starts[target]
            key_pos = torch.arange(bsz, device=device)
            position = (starts[target, None] * bsz + key_pos * counts[target, None] + rank[:, None]).view(-1)
            cols = torch.empty(rows * bsz, dtype=torch.int64, device=device)
            cols[position] = order.repeat_interleave(bsz)
            crow = torch.empty(self.shape[1] + 1, dtype=torch.int64, device=device)
            crow[:-1] = (starts[:, None] * bsz + key_pos * counts[:, None]).view(-1)
            crow[-1] = rows * bsz
            self._transpose = (order, position, crow, cols)
        order, position, crow, cols = self._transpose
        values = torch.empty_like(values_rb.view(-1))
        values[position] = values_rb[order].view(-1)
        return torch.sparse_csr_tensor(crow, cols, values, self.shape[::-1], check_invariants=False)

    def sampled_products(self, rows_rd, keys_nd):
        """[R, B]: rows_rd[r] . keys_nd[key] for this slot's (row, key) pairs."""
        pattern = self.matrix(torch.zeros(self.cols.numel(), dtype=rows_rd.dtype, device=rows_rd.device))
        return torch.sparse.sampled_addmm(pattern, rows_rd, keys_nd.t(), beta=0.0).values().view(self.shape[0], -1)

    def logits(self, q_rd, k_nd, scale):
        """fp32 [R, B] scaled logits, -inf where the key is not allowed (causal / no block)."""
        return (self.sampled_products(q_rd, k_nd) * scale).masked_fill(~self.allowed, float("-inf"))


def _keys_matrix(x_thd, layout: BlockLayout) -> torch.Tensor:
    """fp32 [num_blocks * H * block_size, D]: padded blocks, block-major then head, as rows."""
    return layout.pad_blocks(x_thd.float()).reshape(-1, x_thd.shape[-1])


def _plan(q_thd, k_thd, v_thd, selection, layout: BlockLayout):
    """What forward and backward share: (slots any query can fill, each query head's KV head, the padded key and
    value matrices, query tokens per chunk)."""
    hq, hkv = q_thd.shape[1], k_thd.shape[1]
    topk = min(selection.shape[-1], max(1, layout.max_blocks_per_seq))
    kv_head = torch.arange(hq, device=q_thd.device) // (hq // hkv)
    chunk = max(1, chunk_elements(q_thd.device) // (hq * layout.block_size))
    return topk, kv_head, _keys_matrix(k_thd, layout), _keys_matrix(v_thd, layout), chunk


class MobaAttentionFunction(torch.autograd.Function):
    """(out, lse) = MoBA(q, k, v) for a given global selection; backward recomputes from (out, lse).

    lse is an output with a gradient too: d lse / d logit_j = p_j, so dS = P * (dP - delta + dlse)."""

    @staticmethod
    def forward(ctx, q_thd, k_thd, v_thd, selection, layout: BlockLayout, scale: float):
        total, hq, dim = q_thd.shape
        hkv, bsz = k_thd.shape[1], layout.block_size
        topk, kv_head, keys, values, chunk = _plan(q_thd, k_thd, v_thd, selection, layout)
        out = torch.empty(total * hq, dim, dtype=torch.float32, device=q_thd.device)
        lse = torch.empty(total * hq, dtype=torch.float32, device=q_thd.device)
        for start in range(0, total, chunk):
            end = min(start + chunk, total)
            rows = slice(start * hq, end * hq)
            q_rd = q_thd[start:end].float().reshape(-1, dim)
            current, pos = layout.token_block[start:end], layout.token_pos[start:end]
            row_max = torch.full((q_rd.shape[0],), float("-inf"), device=q_thd.device)
            row_sum = torch.zeros(q_rd.shape[0], device=q_thd.device)
            acc = torch.zeros(q_rd.shape[0], dim, device=q_thd.device)
            for slot in range(topk):
                part = _Slot(selection[start:end], current, pos, kv_head, hkv, bsz, slot, keys.shape[0])
                logits = part.logits(q_rd, keys, scale)
                # Slot 0 always holds a real block, so row_max is finite from the first slot on.
                new_max = torch.maximum(row_max, logits.amax(-1))
                correction = torch.exp(row_max - new_max)
                probs = torch.exp(logits - new_max[:, None])
                row_sum = row_sum * correction + probs.sum(-1)
                acc = acc * correction[:, None] + part.matrix(probs) @ values
                row_max = new_max
            out[rows] = acc / row_sum[:, None]
            lse[rows] = row_max + torch.log(row_sum)
        out = out.view(total, hq, dim).to(q_thd.dtype)
        ctx.save_for_backward(q_thd, k_thd, v_thd, selection, out, lse)
        ctx.layout, ctx.scale = layout, scale
        return out, lse.view(total, hq)

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        q_thd, k_thd, v_thd, selection, out, lse = ctx.saved_tensors
        layout, scale = ctx.layout, ctx.scale
        total, hq, dim = q_thd.shape
        hkv, bsz = k_thd.shape[1], layout.block_size
        topk, kv_head, keys, values, chunk = _plan(q_thd, k_thd, v_thd, selection, layout)
        grad_q = torch.empty(total * hq, dim, dtype=torch.float32, device=q_thd.device)
        grad_keys = torch.zeros_like(keys)
        grad_values = torch.zeros_like(values)
        for start in range(0, total, chunk):
            end = min(start + chunk, total)
            rows = slice(start * hq, end * hq)
            q_rd = q_thd[start:end].float().reshape(-1, dim)
            do_rd = grad_out[start:end].float().reshape(-1, dim)
            delta = (do_rd * out[start:end].float().reshape(-1, dim)).sum(-1) - grad_lse[start:end].reshape(-1)
            current, pos = layout.token_block[start:end], layout.token_pos[start:end]
            grad_q_rd = torch.zeros_like(q_rd)
            for slot in range(topk):
                part = _Slot(selection[start:end], current, pos, kv_head, hkv, bsz, slot, keys.shape[0])
                probs = torch.exp(part.logits(q_rd, keys, scale) - lse[rows, None])  # [R, B]
                grad_probs = part.sampled_products(do_rd, values)
                grad_logits = probs * (grad_probs - delta[:, None]) * scale
                grad_q_rd += part.matrix(grad_logits) @ keys
                grad_keys += part.transposed(grad_logits) @ q_rd
                grad_values += part.transposed(probs) @ do_rd
            grad_q[rows] = grad_q_rd
        grad_k = layout.unpad_blocks(grad_keys.view(-1, bsz, dim), hkv).to(k_thd.dtype)
        grad_v = layout.unpad_blocks(grad_values.view(-1, bsz, dim), hkv).to(v_thd.dtype)
        return grad_q.view(total, hq, dim).to(q_thd.dtype), grad_k, grad_v, None, None, None


def routed(q, k, bounds_q, bounds_k, block_size, topk, shared_gqa_selection, selection=None):
    """(layout, GLOBAL selection) of a call: the gate's, or the caller's local `selection` made global."""
    layout = BlockLayout.build(bounds_q, bounds_k, block_size, q.device)
    if selection is None:
        return layout, select_blocks(q, k, layout, topk, shared_gqa_selection)
    return layout, global_selection(selection, layout)


def moba_attention_torch(
    q, k, v, *, bounds_q, bounds_k, block_size, topk, softmax_scale, shared_gqa_selection, selection=None,
    return_lse=False,
):
    """MoBA on [Tq, Hq, D] / [Tk, Hkv, D] tensors (validated by the caller); bounds_q / bounds_k are the
    offsets as lists of ints; `selection` (local, int32) replaces the gate when given."""
    layout, selection = routed(q, k, bounds_q, bounds_k, block_size, topk, shared_gqa_selection, selection)
    out, lse = MobaAttentionFunction.apply(q, k, v, selection, layout, softmax_scale)
    return (out, lse) if return_lse else out
