"""Rotary position embedding (RoPE, Llama's rotate-half form) as one Triton kernel each way.

`rope_triton(t, freqs)`: t `[s, b, h, d]` (any strides with a contiguous last dimension: the query or key
view of a fused QKV projection is read in place), freqs fp32 `[s, 1, 1, d]` (the angles, first half and
second half of the last dimension each for one half of the rotation) -> `[s, b, h, d]` contiguous in t's
dtype:

    out[..., j]        = t[..., j] cos f[j]               - t[..., j + d/2] sin f[j]
    out[..., j + d/2]  = t[..., j + d/2] cos f[j + d/2]   + t[..., j] sin f[j + d/2]      (j < d/2)

The backward applies the transposed map to the gradient. Arithmetic in fp32, one rounding at the store.

Why our own: one program covers a tile of positions for every head, so each angle's cosine and sine are
computed once per position and used for all h heads (of queries or keys), and both directions are a
single read and a single write of the tensor. Transformer Engine's fused RoPE does the same; without it,
Megatron's unfused form makes four passes and torch.compile's kernel recomputes the angles per head.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rope_kernel(
    x_ptr, out_ptr, freqs_ptr,
    seqlen,
    stride_xs, stride_xb, stride_xh,
    stride_os, stride_ob, stride_oh,
    stride_fs,
    HEADS: tl.constexpr, HALF: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_H: tl.constexpr, BACKWARD: tl.constexpr,
):
    pid_s = tl.program_id(0)
    pid_b = tl.program_id(1)
    offs_s = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, HALF)
    mask_s = offs_s < seqlen
    f_ptrs = freqs_ptr + offs_s[:, None] * stride_fs + offs_d[None, :]
    f1 = tl.load(f_ptrs, mask=mask_s[:, None], other=0.0).to(tl.float32)
    f2 = tl.load(f_ptrs + HALF, mask=mask_s[:, None], other=0.0).to(tl.float32)
    cos1 = tl.cos(f1)[:, None, :]
    sin1 = tl.sin(f1)[:, None, :]
    cos2 = tl.cos(f2)[:, None, :]
    sin2 = tl.sin(f2)[:, None, :]
    offs_h = tl.arange(0, BLOCK_H)
    x_base = x_ptr + pid_b * stride_xb + offs_s[:, None, None] * stride_xs + offs_d[None, None, :]
    o_base = out_ptr + pid_b * stride_ob + offs_s[:, None, None] * stride_os + offs_d[None, None, :]
    for h0 in tl.static_range(0, HEADS, BLOCK_H):
        hh = h0 + offs_h
        mask = mask_s[:, None, None] & (hh < HEADS)[None, :, None]
        x_ptrs = x_base + hh[None, :, None] * stride_xh
        o_ptrs = o_base + hh[None, :, None] * stride_oh
        x1 = tl.load(x_ptrs, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(x_ptrs + HALF, mask=mask, other=0.0).to(tl.float32)
        if BACKWARD:  # the transpose: rows of the forward map become columns
            y1 = x1 * cos1 + x2 * sin2
            y2 = x2 * cos2 - x1 * sin1
        else:
            y1 = x1 * cos1 - x2 * sin1
            y2 = x2 * cos2 + x1 * sin2
        tl.store(o_ptrs, y1.to(out_ptr.dtype.element_ty), mask=mask)
        tl.store(o_ptrs + HALF, y2.to(out_ptr.dtype.element_ty), mask=mask)


def _launch(x: torch.Tensor, freqs: torch.Tensor, backward: bool) -> torch.Tensor:
    if x.stride(-1) != 1:
        x = x.contiguous()
    s, b, h, d = x.shape
    out = torch.empty((s, b, h, d), dtype=x.dtype, device=x.device)
    block_s = 16
    block_h = min(triton.next_power_of_2(h), max(1, 4096 // (block_s * d)))
    grid = (triton.cdiv(s, block_s), b)
    _rope_kernel[grid](
        x, out, freqs,
        s,
        x.stride(0), x.stride(1), x.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        freqs.stride(0),
        HEADS=h, HALF=d // 2, BLOCK_S=block_s, BLOCK_H=block_h, BACKWARD=backward,
        num_warps=4,
    )
    return out


class _RoPE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(freqs)
        return _launch(t, freqs, backward=False)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (freqs,) = ctx.saved_tensors
        return _launch(grad, freqs, backward=True), None


def rope_supported(t: torch.Tensor, freqs: torch.Tensor) -> bool:
    """Whether `rope_triton` takes these inputs: rotation over the whole head dimension, a power-of-two half
    (Triton's tile sizes), one angle row per position."""
    d = t.shape[-1]
    return (
        t.dim() == 4 and freqs.dim() == 4 and freqs.shape[-1] == d and d % 2 == 0
        and triton.next_power_of_2(d // 2) == d // 2 and freqs.shape[0] == t.shape[0]
        and freqs.shape[1] == freqs.shape[2] == 1
    )


def rope_triton(t: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """RoPE of t `[s, b, h, d]` by the angles freqs `[s, 1, 1, d]` (module docstring). Differentiable in t."""
    if not rope_supported(t, freqs):
        raise ValueError(
            f"rope_triton rotates [s, b, h, d] by freqs [s, 1, 1, d] with d/2 a power of two; got t "
            f"{tuple(t.shape)} and freqs {tuple(freqs.shape)}"
        )
    freqs = freqs.reshape(freqs.shape[0], freqs.shape[-1])
    if freqs.dtype != torch.float32 or freqs.stride(-1) != 1:
        freqs = freqs.float().contiguous()
    return _RoPE.apply(t, freqs)
