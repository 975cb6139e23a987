"""Public entry points of the Triton MoBA kernels (the thin layer over gating, routing, forward, backward)."""

from __future__ import annotations

import math

import torch

from . import workspace
from .backward import attention_backward, dkdv_tiles
from .forward import LOG2E, attention_forward, slot_tiles
from .gating import check_inputs, select_blocks
from .layout import BlockLayout, block_layout
from .routing import Routing, route

LN2 = 1.0 / LOG2E  # the kernels keep the log-sum-exp in base 2 (lse2 = lse * log2 e)


class MobaAttentionFunction(torch.autograd.Function):
    """(out, lse2) = MoBA(q, k, v); gradients for q, k, v (and through the lse output). Selection is not
    differentiated (as in the definition)."""

    @staticmethod
    def forward(ctx, q, k, v, layout, selection, block_size, topk, softmax_scale, shared_gqa_selection):
        tiles = slot_tiles(block_size, q.shape[-1])
        grads = any(ctx.needs_input_grad[:3])
        fwd_work = workspace.forward_plan(q, k.shape[1], topk - 1, block_size, grads)
        key_tiles = block_size // dkdv_tiles(block_size, q.shape[-1]).key_tile
        bwd_work = workspace.backward_plan(q, k.shape[1], topk - 1, key_tiles, block_size)
        ctx.set_materialize_grads(False)  # an unused lse output brings no gradient pass of its own
        routing = route(  # a fresh selection is freed inside route, before its sort
            select_blocks(q, k, layout, block_size, topk, shared_gqa_selection) if selection is None else selection,
            layout,
            k.shape[1],
            block_size,
            tiles.query_tile,
            slot_tiles=fwd_work.kv_heads == 0 or (grads and bwd_work.kv_heads == 0),
        )
        out, lse = attention_forward(q, k, v, layout, routing, topk - 1, block_size, softmax_scale, tiles, fwd_work)
        ctx.save_for_backward(q, k, v, out, lse, *layout[:-2], *routing)
        ctx.num_blocks, ctx.suffix = layout.num_blocks, layout.suffix
        ctx.block_size = block_size
        ctx.slots = topk - 1
        ctx.softmax_scale = softmax_scale
        ctx.tiles = tiles
        ctx.work = bwd_work
        return out, lse * LN2

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse, *tensors = ctx.saved_tensors
        fields = len(BlockLayout._fields) - 2
        layout = BlockLayout(*tensors[:fields], ctx.num_blocks, ctx.suffix)
        routing = tensors[fields:]
        dout = torch.zeros_like(out) if dout is None else dout.contiguous()
        dq, dk, dv = attention_backward(
            dout,
            q,
            k,
            v,
            out,
            lse,
            layout,
            Routing(*routing),
            ctx.slots,
            ctx.block_size,
            ctx.softmax_scale,
            ctx.tiles,
            ctx.work,
            dlse=None if dlse is None else dlse.float().contiguous(),
        )
        return dq, dk, dv, None, None, None, None, None, None


def moba_attention_triton(
    q, k, v, cu_seqlens, block_size, topk, softmax_scale=None, shared_gqa_selection=False, *, cu_seqlens_k=None,
    host_cu_seqlens=None, selection=None, return_lse=False,
):
    """MoBA attention (semantics of moba_train/attention/naive.py), differentiable w.r.t. q, k, v.

    q [Tq, Hq, D], k and v [Tk, Hkv, D] (Hq % Hkv == 0, GQA without repeating K/V), bf16 or fp16, on one
    CUDA device (or under TRITON_INTERPRET=1); cu_seqlens int32 [N+1]: the queries' offsets (flash-attn
    varlen layout); cu_seqlens_k: the keys', default the same (queries are the last len_q keys of their
    sequence, bottom-right causal); host_cu_seqlens: (offsets_q, offsets_k) as ints, sparing the device
    read; selection: int32 [Tq, Hq, topk] local block indices (moba_selection's layout) instead of the
    gate. D a power of two in [16, 256]; block_size a multiple of 16. Returns out [Tq, Hq, D] in q's
    dtype, and with return_lse also the natural log-sum-exp fp32 [Tq, Hq] (differentiable).
    Deterministic: no atomics, fixed reduction orders.
    """
    check_inputs(q, k, block_size, topk)
    if q.dtype not in (torch.bfloat16, torch.float16) or k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(
            "the Triton MoBA attention takes bf16 or fp16 q, k, v of one dtype; "
            f"got {q.dtype}, {k.dtype}, {v.dtype}: cast them first."
        )
    if v.shape != k.shape:
        raise ValueError(f"k and v must have the same shape; got {tuple(k.shape)} and {tuple(v.shape)}.")
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    cu_k = cu_seqlens if cu_seqlens_k is None else cu_seqlens_k
    layout = block_layout(cu_seqlens, cu_k, block_size, q.shape[0], k.shape[0], q.device, host_cu_seqlens)
    if selection is not None:
        selection = selection.contiguous()
    out, lse = MobaAttentionFunction.apply(
        q.contiguous(), k.contiguous(), v.contiguous(), layout, selection, block_size, topk, scale,
        shared_gqa_selection,
    )
    return (out, lse) if return_lse else out
