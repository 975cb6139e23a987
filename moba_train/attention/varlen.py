"""MoBA, the reference algorithm on FA2 variable-length kernels (CUDA, fp16/bf16).

Two kinds of flash calls, merged exactly by log-sum-exp:
  self: causal attention inside every block, the blocks passed as varlen sequences (GQA native);
  past: one non-causal varlen call over the queries grouped by (head, selected earlier block): group
        (h, c) holds the query rows [t, h] that selected block c and attends that block's keys of KV
        head kv(h). Rows are single-head [M, 1, D].
Backward: the gradient of a merged softmax. Running each part's flash backward with the MERGED output
and log-sum-exp gives exactly that part's share of the full gradient (P = exp(S - lse_merged) is the
global probability restricted to the part, and rowsum(dO * O_merged) is the global softmax term).

The kernels are PyTorch's own FA2 (`torch.ops.aten._flash_attention_forward/_backward`, what
`torch.nn.attention.varlen.varlen_attn` wraps); flash-attn is not needed. Their log-sum-exp is
[heads, total_q] fp32 (checked in tests/attention/test_varlen.py).
"""

from __future__ import annotations

import bisect

import torch

from moba_train.attention.torch_backend import BlockLayout, routed

try:
    from torch.nn.attention.varlen import varlen_attn
except ImportError:
    varlen_attn = None


def available(device: torch.device, dtype: torch.dtype) -> bool:
    """FA2 varlen kernels can run here: CUDA, fp16/bf16, PyTorch built with them."""
    return (
        device.type == "cuda"
        and torch.cuda.is_available()
        and dtype in (torch.float16, torch.bfloat16)
        and varlen_attn is not None
        and hasattr(torch.ops.aten, "_flash_attention_forward")
    )


def causal_varlen_attn(q, k, v, cu_q, cu_k, max_q: int, max_k: int, scale: float) -> torch.Tensor:
    """Causal attention per sequence on FA2's varlen kernels (differentiable): [Tq, Hq, D] from k and v of
    Hkv heads; queries fewer than keys are aligned to the bottom right (FA2's causal convention). GQA is
    native: `varlen_attn` in torch 2.11 takes no `enable_gqa`, and repeating K and V to the query heads kept
    the repeats for the backward, 4 Hq D elements per token instead of (2 Hq + 2 Hkv) D (bench/NOTES.md,
    session 26), so the FA2 pair is called here directly, as `MobaVarlenFunction` calls it."""
    return _CausalVarlen.apply(q, k, v, cu_q, cu_k, max_q, max_k, scale)


class _CausalVarlen(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cu_q, cu_k, max_q, max_k, scale):
        out, lse, rng = _flash_forward(q, k, v, cu_q, cu_k, max_q, max_k, True, scale)
        ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k)
        ctx.args = max_q, max_k, scale, rng
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse, cu_q, cu_k = ctx.saved_tensors
        max_q, max_k, scale, rng = ctx.args
        grad_q, grad_k, grad_v = _flash_backward(grad_out.contiguous(), q, k, v, out, lse, cu_q, cu_k, max_q,
                                                 max_k, True, scale, rng)
        return grad_q, grad_k, grad_v, None, None, None, None, None


def _flash_forward(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale):
    """(out [Tq, H, D], lse fp32 [H, Tq], rng state) of one FA2 varlen forward."""
    out, lse, seed, offset, _ = torch.ops.aten._flash_attention_forward(
        q, k, v, cu_q, cu_k, max_q, max_k, 0.0, causal, False, scale=scale
    )
    return out, lse, (seed, offset)


def _flash_backward(grad_out, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, causal, scale, rng):
    return torch.ops.aten._flash_attention_backward(
        grad_out, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, 0.0, causal, rng[0], rng[1], scale=scale
    )


ROWS_PER_ADD = 1 << 22
"""Rows converted to fp32 at a time when accumulating [M, D] partial results (bounds temporary memory)."""


def _add_rows(target_f32, rows, source, weight=None):
    """target_f32[rows[i]] += weight[i] * source[i] in fp32, in chunks of rows."""
    for start in range(0, rows.numel(), ROWS_PER_ADD):
        part = source[start : start + ROWS_PER_ADD].float()
        if weight is not None:
            part = part * weight[start : start + ROWS_PER_ADD, None]
        target_f32.index_add_(0, rows[start : start + ROWS_PER_ADD], part)


MAX_CALL_ELEMENTS = 1 << 30
"""FA2 computes row offsets in 32 bits: one `past` call's gathered query rows x D stay below this
(at s128k-b128, 2 x 128K tokens x 16 heads x 7 slots x D 128 would be 3.8e9 elements)."""


class _PastGroups:
    """Queries grouped by (head, selected earlier block): the inputs of the `past` varlen call(s)."""

    def __init__(self, selection, layout: BlockLayout, hkv: int):
        total, hq, _ = selection.shape
        past = (selection >= 0) & (selection != layout.token_block[:, None, None])
        token, head, slot = past.nonzero(as_tuple=True)
        block = selection[token, head, slot]
        key = head * layout.num_blocks + block
        order = torch.argsort(key, stable=True)
        self.token, self.head, key = token[order], head[order], key[order]
        group_key, counts = torch.unique_consecutive(key, return_counts=True)
        self.num_rows = self.token.numel()
        self.cu_q = torch.zeros(counts.numel() + 1, dtype=torch.int32, device=selection.device)
        self.cu_q[1:] = counts.cumsum(0)
        self.max_q = int(counts.max()) if counts.numel() else 0
        bsz = layout.block_size
        self.cu_k = torch.arange(counts.numel() + 1, dtype=torch.int32, device=selection.device) * bsz
        group_head, group_block = group_key // layout.num_blocks, group_key % layout.num_blocks
        self.kv_rows = group_block * hkv + group_head // (hq // hkv)  # rows of layout.pad_blocks(k)
        self.rows = self.token * hq + self.head  # rows of [T * Hq] flattened outputs
        self.block_size = bsz

    def split(self, dim: int) -> list["_PastGroups"]:
        """Consecutive runs of whole groups, each small enough for one FA2 call (MAX_CALL_ELEMENTS)."""
        max_rows = MAX_CALL_ELEMENTS // dim
        if self.num_rows <= max_rows:
            return [self]
        cu = self.cu_q.tolist()
        parts, g0 = [], 0
        while g0 < len(cu) - 1:
            g1 = max(bisect.bisect_right(cu, cu[g0] + max_rows, lo=g0 + 1) - 1, g0 + 1)
            parts.append(self._slice(g0, g1, cu))
            g0 = g1
        return parts

    def _slice(self, g0: int, g1: int, cu: list[int]) -> "_PastGroups":
        part = object.__new__(_PastGroups)
        r0, r1 = cu[g0], cu[g1]
        part.token, part.head, part.rows = self.token[r0:r1], self.head[r0:r1], self.rows[r0:r1]
        part.kv_rows = self.kv_rows[g0:g1]
        part.cu_q = self.cu_q[g0 : g1 + 1] - r0
        part.cu_k = self.cu_k[: g1 - g0 + 1]
        part.max_q = max(b - a for a, b in zip(cu[g0:g1], cu[g0 + 1 : g1 + 1]))
        part.num_rows, part.block_size = r1 - r0, self.block_size
        return part

    def gather(self, x_thd):
        """[T, Hq, D] -> [M, 1, D]: the query-side rows of the groups."""
        return x_thd[self.token, self.head][:, None]

    def gather_kv(self, x_blocks):
        """pad_blocks(k or v) [num_blocks * Hkv, B, D] -> [groups * B, 1, D]."""
        return x_blocks[self.kv_rows].reshape(-1, 1, x_blocks.shape[-1])


def _block_cu(layout: BlockLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """(cu_q, cu_k) of the `self` call: every block a varlen sequence of its keys and of the queries whose
    current block it is (the block's last keys' positions: FA2's bottom-right causal alignment)."""
    device = layout.block_start.device
    cu_k = torch.empty(layout.num_blocks + 1, dtype=torch.int32, device=device)
    cu_k[:-1] = layout.block_start
    cu_k[-1] = layout.bounds_k[-1]
    cu_q = torch.zeros(layout.num_blocks + 1, dtype=torch.int32, device=device)
    cu_q[1:] = torch.bincount(layout.token_block, minlength=layout.num_blocks).cumsum(0)
    return cu_q, cu_k


class MobaVarlenFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, selection, layout: BlockLayout, scale: float):
        total, hq, dim = q.shape
        hkv = k.shape[1]
        bsz = layout.block_size
        cu_q_blocks, cu_k_blocks = _block_cu(layout)
        out_self, lse_self, rng_self = _flash_forward(q, k, v, cu_q_blocks, cu_k_blocks, bsz, bsz, True, scale)
        assert lse_self.shape == (hq, total), f"unexpected FA2 lse layout {tuple(lse_self.shape)}"
        lse = lse_self.t().reshape(-1)  # [T * Hq]
        out = out_self.float().reshape(total * hq, dim)
        groups = _PastGroups(selection, layout, hkv)
        rng_past = []
        if groups.num_rows:
            k_blocks, v_blocks = layout.pad_blocks(k), layout.pad_blocks(v)
            for part in groups.split(dim):
                out_past, lse_past, rng = _flash_forward(
                    part.gather(q), part.gather_kv(k_blocks), part.gather_kv(v_blocks),
                    part.cu_q, part.cu_k, part.max_q, bsz, False, scale,
                )
                rng_past.append(rng)
                lse_past = lse_past.reshape(-1)
                row_max = lse.clone().scatter_reduce_(0, part.rows, lse_past, "amax")
                row_sum = torch.exp(lse - row_max).index_add_(0, part.rows, torch.exp(lse_past - row_max[part.rows]))
                merged = row_max + torch.log(row_sum)
                out = out * torch.exp(lse - merged)[:, None]
                _add_rows(out, part.rows, out_past[:, 0], torch.exp(lse_past - merged[part.rows]))
                lse = merged
        out = out.view(total, hq, dim).to(q.dtype)
        ctx.save_for_backward(q, k, v, selection, out, lse)
        ctx.layout, ctx.scale, ctx.rng = layout, scale, (rng_self, rng_past)
        lse_out = lse.view(total, hq).clone()
        ctx.mark_non_differentiable(lse_out)  # FA2's backward takes no lse gradient (moba_attention refuses one)
        return out, lse_out

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        q, k, v, selection, out, lse = ctx.saved_tensors
        layout, scale = ctx.layout, ctx.scale
        total, hq, dim = q.shape
        hkv = k.shape[1]
        bsz = layout.block_size
        grad_out = grad_out.contiguous()
        cu_q_blocks, cu_k_blocks = _block_cu(layout)
        lse_hq = lse.view(total, hq).t().contiguous()
        grad_q, grad_k, grad_v = _flash_backward(
            grad_out, q, k, v, out, lse_hq, cu_q_blocks, cu_k_blocks, bsz, bsz, True, scale, ctx.rng[0]
        )
        groups = _PastGroups(selection, layout, hkv)
        if groups.num_rows:
            k_blocks, v_blocks = layout.pad_blocks(k), layout.pad_blocks(v)
            grad_q_f32 = grad_q.float().view(total * hq, dim)
            grad_k_blocks = torch.zeros(k_blocks.shape, dtype=torch.float32, device=q.device)
            grad_v_blocks = torch.zeros_like(grad_k_blocks)
            for part, rng in zip(groups.split(dim), ctx.rng[1]):
                dq_past, dk_past, dv_past = _flash_backward(
                    part.gather(grad_out), part.gather(q), part.gather_kv(k_blocks), part.gather_kv(v_blocks),
                    part.gather(out), lse[part.rows][None].contiguous(),
                    part.cu_q, part.cu_k, part.max_q, bsz, False, scale, rng,
                )
                _add_rows(grad_q_f32, part.rows, dq_past[:, 0])
                _add_rows(grad_k_blocks, part.kv_rows, dk_past.view(-1, bsz, dim))
                _add_rows(grad_v_blocks, part.kv_rows, dv_past.view(-1, bsz, dim))
            grad_q = grad_q_f32.view(total, hq, dim).to(q.dtype)
            grad_k = (grad_k.float() + layout.unpad_blocks(grad_k_blocks, hkv)).to(k.dtype)
            grad_v = (grad_v.float() + layout.unpad_blocks(grad_v_blocks, hkv)).to(v.dtype)
        return grad_q, grad_k, grad_v, None, None, None


def moba_attention_varlen(
    q, k, v, *, bounds_q, bounds_k, block_size, topk, softmax_scale, shared_gqa_selection, selection=None,
    return_lse=False,
):
    """MoBA on [Tq, Hq, D] / [Tk, Hkv, D] CUDA fp16/bf16 tensors (validated by the caller); bounds_q /
    bounds_k are the offsets as ints. With return_lse the lse carries no gradient (see the caller)."""
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    layout, selection = routed(q, k, bounds_q, bounds_k, block_size, topk, shared_gqa_selection, selection)
    out, lse = MobaVarlenFunction.apply(q, k, v, selection, layout, softmax_scale)
    return (out, lse) if return_lse else out
