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

`qkv_rope_triton(mixed, q_freqs, k_freqs, q_per_group)`: the same rotation straight from the fused QKV projection's
output `[s, b, g, (r + 2) * d]` (per query group: r query heads, one key head, one value head; Megatron's layout)
to contiguous q `[s, b, g * r, d]`, k and v `[s, b, g, d]` (v copied unrotated), and in the backward from their
gradients straight into the projection's gradient. Unfused, Megatron copies the queries out of the projection (a
strided reshape) before rotating them, and its backward concatenates the three gradients after rotating two: a
pass each way that this form does not make.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rotate(x1, x2, cos1, sin1, cos2, sin2, BACKWARD: tl.constexpr):
    """The rotation of the pairs (x1, x2) in fp32, or its transpose for the backward (rows become columns)."""
    if BACKWARD:
        return x1 * cos1 + x2 * sin2, x2 * cos2 - x1 * sin1
    return x1 * cos1 - x2 * sin1, x2 * cos2 + x1 * sin2


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
    offs_s = (pid_s * BLOCK_S + tl.arange(0, BLOCK_S)).to(tl.int64)  # offsets past 2^31 elements at long contexts
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
        y1, y2 = _rotate(x1, x2, cos1, sin1, cos2, sin2, BACKWARD)
        tl.store(o_ptrs, y1.to(out_ptr.dtype.element_ty), mask=mask)
        tl.store(o_ptrs + HALF, y2.to(out_ptr.dtype.element_ty), mask=mask)


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _angle_rows(freqs: torch.Tensor) -> torch.Tensor:
    """freqs [s, 1, 1, d] as the kernels read them: fp32 [s, d] with a contiguous last dimension."""
    freqs = freqs.reshape(freqs.shape[0], freqs.shape[-1])
    return freqs if freqs.dtype == torch.float32 and freqs.stride(-1) == 1 else freqs.float().contiguous()


def _launch(x: torch.Tensor, freqs: torch.Tensor, backward: bool) -> torch.Tensor:
    x = _last_dim_contiguous(x)
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
    return _RoPE.apply(t, _angle_rows(freqs))


@triton.jit
def _qkv_rope_kernel(
    x_ptr, q_ptr, k_ptr, v_ptr, fq_ptr, fk_ptr,
    seqlen,
    stride_xs, stride_xb, stride_xg,
    stride_qs, stride_qb, stride_qh,
    stride_ks, stride_kb, stride_kh,
    stride_vs, stride_vb, stride_vh,
    stride_fq, stride_fk,
    GROUPS: tl.constexpr, R: tl.constexpr, HALF: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_G: tl.constexpr,
    SAME_FREQS: tl.constexpr, BACKWARD: tl.constexpr,
):
    """Forward: x (the projection) -> q, k (rotated), v (copied). Backward: the gradients q, k, v -> x (q and k
    rotated back by the transposed map). Each angle's cosine and sine are computed once per program."""
    pid_s = tl.program_id(0)
    pid_b = tl.program_id(1)
    offs_s = (pid_s * BLOCK_S + tl.arange(0, BLOCK_S)).to(tl.int64)  # offsets past 2^31 elements at long contexts
    offs_d = tl.arange(0, HALF)
    offs_g = tl.arange(0, BLOCK_G)
    mask_s = offs_s < seqlen
    f_ptrs = fq_ptr + offs_s[:, None] * stride_fq + offs_d[None, :]
    f1 = tl.load(f_ptrs, mask=mask_s[:, None], other=0.0).to(tl.float32)
    f2 = tl.load(f_ptrs + HALF, mask=mask_s[:, None], other=0.0).to(tl.float32)
    qc1, qs1 = tl.cos(f1)[:, None, :], tl.sin(f1)[:, None, :]
    qc2, qs2 = tl.cos(f2)[:, None, :], tl.sin(f2)[:, None, :]
    if SAME_FREQS:
        kc1, ks1, kc2, ks2 = qc1, qs1, qc2, qs2
    else:
        f_ptrs = fk_ptr + offs_s[:, None] * stride_fk + offs_d[None, :]
        f1 = tl.load(f_ptrs, mask=mask_s[:, None], other=0.0).to(tl.float32)
        f2 = tl.load(f_ptrs + HALF, mask=mask_s[:, None], other=0.0).to(tl.float32)
        kc1, ks1 = tl.cos(f1)[:, None, :], tl.sin(f1)[:, None, :]
        kc2, ks2 = tl.cos(f2)[:, None, :], tl.sin(f2)[:, None, :]
    for g0 in tl.static_range(0, GROUPS, BLOCK_G):
        gg = g0 + offs_g
        mask = mask_s[:, None, None] & (gg < GROUPS)[None, :, None]
        x_base = x_ptr + pid_b * stride_xb + offs_s[:, None, None] * stride_xs + gg[None, :, None] * stride_xg \
            + offs_d[None, None, :]
        for j in tl.static_range(R + 2):
            if j < R:  # query head g * R + j
                o_base = q_ptr + pid_b * stride_qb + offs_s[:, None, None] * stride_qs \
                    + (gg * R + j)[None, :, None] * stride_qh + offs_d[None, None, :]
                cos1, sin1, cos2, sin2 = qc1, qs1, qc2, qs2
            elif j == R:  # key head g
                o_base = k_ptr + pid_b * stride_kb + offs_s[:, None, None] * stride_ks + gg[None, :, None] * stride_kh \
                    + offs_d[None, None, :]
                cos1, sin1, cos2, sin2 = kc1, ks1, kc2, ks2
            else:  # value head g
                o_base = v_ptr + pid_b * stride_vb + offs_s[:, None, None] * stride_vs + gg[None, :, None] * stride_vh \
                    + offs_d[None, None, :]
            if BACKWARD:
                src, dst = o_base, x_base + j * 2 * HALF
            else:
                src, dst = x_base + j * 2 * HALF, o_base
            x1 = tl.load(src, mask=mask, other=0.0)
            x2 = tl.load(src + HALF, mask=mask, other=0.0)
            if j <= R:
                y1, y2 = _rotate(x1.to(tl.float32), x2.to(tl.float32), cos1, sin1, cos2, sin2, BACKWARD)
                tl.store(dst, y1.to(dst.dtype.element_ty), mask=mask)
                tl.store(dst + HALF, y2.to(dst.dtype.element_ty), mask=mask)
            else:
                tl.store(dst, x1.to(dst.dtype.element_ty), mask=mask)
                tl.store(dst + HALF, x2.to(dst.dtype.element_ty), mask=mask)


def _qkv_launch(x, q, k, v, fq, fk, r: int, backward: bool) -> None:
    s, b, g, _ = x.shape
    d = q.shape[-1]
    block_s = 16
    block_g = min(triton.next_power_of_2(g), max(1, 4096 // (block_s * d)))
    _qkv_rope_kernel[(triton.cdiv(s, block_s), b)](
        x, q, k, v, fq, fk,
        s,
        x.stride(0), x.stride(1), x.stride(2),
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        fq.stride(0), fk.stride(0),
        GROUPS=g, R=r, HALF=d // 2, BLOCK_S=block_s, BLOCK_G=block_g,
        SAME_FREQS=fq.data_ptr() == fk.data_ptr() and fq.stride() == fk.stride(), BACKWARD=backward,
        num_warps=4,
    )


class _QKVRoPE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, fq: torch.Tensor, fk: torch.Tensor, r: int):
        x = _last_dim_contiguous(x)
        s, b, g, width = x.shape
        d = width // (r + 2)
        q = torch.empty((s, b, g * r, d), dtype=x.dtype, device=x.device)
        k = torch.empty((s, b, g, d), dtype=x.dtype, device=x.device)
        v = torch.empty((s, b, g, d), dtype=x.dtype, device=x.device)
        _qkv_launch(x, q, k, v, fq, fk, r, backward=False)
        ctx.save_for_backward(fq, fk)
        ctx.r, ctx.shape = r, x.shape
        return q, k, v

    @staticmethod
    def backward(ctx, dq, dk, dv):
        fq, fk = ctx.saved_tensors
        # an output left unused gets zeros (autograd materialises them), which the kernel copies like any gradient
        dq, dk, dv = (_last_dim_contiguous(t) for t in (dq, dk, dv))
        dx = torch.empty(ctx.shape, dtype=dq.dtype, device=dq.device)
        _qkv_launch(dx, dq, dk, dv, fq, fk, ctx.r, backward=True)
        return dx, None, None, None


def qkv_rope_supported(mixed: torch.Tensor, q_freqs: torch.Tensor, k_freqs: torch.Tensor, q_per_group: int) -> bool:
    """Whether `qkv_rope_triton` takes these inputs (as `rope_supported`, per head of the projection)."""
    if mixed.dim() != 4 or q_per_group < 1 or mixed.shape[-1] % (q_per_group + 2):
        return False
    d = mixed.shape[-1] // (q_per_group + 2)
    return all(
        f.dim() == 4 and f.shape[-1] == d and f.shape[0] == mixed.shape[0] and f.shape[1] == f.shape[2] == 1
        for f in (q_freqs, k_freqs)
    ) and d % 2 == 0 and triton.next_power_of_2(d // 2) == d // 2


def qkv_rope_triton(mixed: torch.Tensor, q_freqs: torch.Tensor, k_freqs: torch.Tensor,
                    q_per_group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q, k, v) from the fused QKV projection `[s, b, g, (r + 2) * d]` (module docstring), q and k rotated by
    freqs `[s, 1, 1, d]`; differentiable in `mixed`."""
    if not qkv_rope_supported(mixed, q_freqs, k_freqs, q_per_group):
        raise ValueError(
            f"qkv_rope_triton splits [s, b, g, (r + 2) * d] with r={q_per_group} query heads per group and rotates by "
            f"freqs [s, 1, 1, d], d/2 a power of two; got {tuple(mixed.shape)}, freqs {tuple(q_freqs.shape)} and "
            f"{tuple(k_freqs.shape)}"
        )
    return _QKVRoPE.apply(mixed, _angle_rows(q_freqs), _angle_rows(k_freqs), q_per_group)
