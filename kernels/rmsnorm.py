"""RMSNorm with the residual stream's add and gradient sum folded in, one Triton kernel each way.

A pre-norm layer computes `h = x + attention(norm1(x))`, then `norm2(h)`, and `h` also feeds the next residual
add. Unfused, the residual stream costs each norm its own passes (PyTorch's RMSNorm backward reads the input and
the gradient twice: once for the input's gradient, once for the weight's), plus an add kernel in the forward
and an add of the two gradients of `x` (or of `h`) in the backward. Here:

    rms_norm(x, w, eps)                    -> y                y = x / rms(x) * w
    rms_norm_with_residual(x, w, eps)      -> (x', y)          x' = x (the residual branch's use of x); in the
                                                              backward dx = dx' + the norm's gradient, in the
                                                              same kernel
    add_rms_norm(x, branch, w, eps)        -> (h, y)          h = x + branch (rounded to x's dtype), y = norm(h);
                                                              in the backward dh + the norm's gradient is the
                                                              gradient of both x and branch

rms(x) = sqrt(mean(x^2) + eps) over the last dimension, in fp32; one rounding at each store. Inputs are
`[..., n]` with a contiguous last dimension (made contiguous otherwise); the weight is `[n]`.

The backward is one pass over the rows: each program walks a strided set of row tiles, writes the input's
gradient and keeps its share of the weight's gradient in registers; a sum over the programs' shares (a small
`[programs, n]` fp32 tensor) gives the weight's gradient. So the input and the output gradient are read once.

Why our own: PyTorch's RMSNorm kernel is one pass forward but two backward and never sees the residual add;
Liger-Kernel's walks one row at a time per program and ran slower than PyTorch's at the 1.1B recipe's shapes
(moba_train/fusions.py's measurements). Transformer Engine fuses the same add; it is optional here.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rmsnorm_fwd_kernel(
    x_ptr, branch_ptr, h_ptr, y_ptr, w_ptr, rstd_ptr,
    rows, n, eps,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ADD: tl.constexpr,
):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    mask_m = offs_m < rows
    mask = mask_m[:, None] & (offs_n < n)[None, :]
    offs = offs_m[:, None].to(tl.int64) * n + offs_n[None, :]
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if ADD:
        h = (x + tl.load(branch_ptr + offs, mask=mask, other=0.0).to(tl.float32)).to(h_ptr.dtype.element_ty)
        tl.store(h_ptr + offs, h, mask=mask)
        x = h.to(tl.float32)  # the norm sees the stored (rounded) sum, as it would unfused
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / n + eps)
    w = tl.load(w_ptr + offs_n, mask=offs_n < n, other=0.0).to(tl.float32)
    y = x * rstd[:, None] * w[None, :]
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(rstd_ptr + offs_m, rstd, mask=mask_m)


@triton.jit
def _rmsnorm_bwd_kernel(
    x_ptr, dy_ptr, dres_ptr, dx_ptr, w_ptr, rstd_ptr, dw_ptr,
    rows, n,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, RESIDUAL: tl.constexpr,
):
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    offs_n = tl.arange(0, BLOCK_N)
    mask_n = offs_n < n
    w = tl.load(w_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_N], dtype=tl.float32)
    for start in range(pid * BLOCK_M, rows, programs * BLOCK_M):
        offs_m = start + tl.arange(0, BLOCK_M)
        mask_m = offs_m < rows
        mask = mask_m[:, None] & mask_n[None, :]
        offs = offs_m[:, None].to(tl.int64) * n + offs_n[None, :]
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + offs_m, mask=mask_m, other=0.0)
        xhat = x * rstd[:, None]
        g = dy * w[None, :]
        c = tl.sum(g * xhat, axis=1) / n
        dx = (g - xhat * c[:, None]) * rstd[:, None]
        if RESIDUAL:
            dx += tl.load(dres_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        dw += tl.sum(dy * xhat, axis=0)
    tl.store(dw_ptr + pid * n + offs_n, dw, mask=mask_n)


TILE_ELEMENTS = 8192
"""Elements per row tile (whole rows: 4 rows of the 1.1B recipe's 2,048); scripts/bench_fusions.py times others."""
PROGRAMS_PER_SM = 4
"""Backward programs per SM; each keeps its share of the weight's gradient in registers."""


def _tiles(n: int) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_M, num_warps): whole rows per tile, about TILE_ELEMENTS per tile."""
    block_n = triton.next_power_of_2(n)
    block_m = max(1, min(16, TILE_ELEMENTS // block_n))
    return block_n, block_m, 8 if block_n * block_m >= 4096 else 4


def _backward_programs(rows: int, block_m: int, device: torch.device) -> int:
    """Programs of the backward: PROGRAMS_PER_SM per SM on a GPU, at most 4 on the interpreter."""
    tiles = triton.cdiv(rows, block_m)
    if device.type == "cuda":
        return max(1, min(tiles, PROGRAMS_PER_SM * torch.cuda.get_device_properties(device).multi_processor_count))
    return max(1, min(tiles, 4))


def _forward(x: torch.Tensor, branch: torch.Tensor | None, weight: torch.Tensor, eps: float):
    n = x.shape[-1]
    x2 = x.reshape(-1, n).contiguous()
    rows = x2.shape[0]
    y = torch.empty_like(x2)
    h = torch.empty_like(x2) if branch is not None else None
    b2 = branch.reshape(-1, n).contiguous() if branch is not None else None
    rstd = torch.empty(rows, dtype=torch.float32, device=x.device)
    block_n, block_m, warps = _tiles(n)
    _rmsnorm_fwd_kernel[(triton.cdiv(rows, block_m),)](
        x2, b2 if b2 is not None else x2, h if h is not None else y, y, weight, rstd,
        rows, n, eps,
        BLOCK_M=block_m, BLOCK_N=block_n, ADD=branch is not None, num_warps=warps,
    )
    return (h if h is not None else x2), y, rstd


def _backward(normed_input: torch.Tensor, rstd: torch.Tensor, weight: torch.Tensor, dy: torch.Tensor,
              dres: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(d input, d weight) of y = rms_norm(normed_input) for the output gradient dy, plus dres if given."""
    rows, n = normed_input.shape
    dy = dy.reshape(rows, n).contiguous()
    dres = dres.reshape(rows, n).contiguous() if dres is not None else None
    dx = torch.empty_like(normed_input)
    block_n, block_m, warps = _tiles(n)
    programs = _backward_programs(rows, block_m, normed_input.device)
    dw = torch.empty((programs, n), dtype=torch.float32, device=normed_input.device)
    _rmsnorm_bwd_kernel[(programs,)](
        normed_input, dy, dres if dres is not None else dy, dx, weight, rstd, dw,
        rows, n,
        BLOCK_M=block_m, BLOCK_N=block_n, RESIDUAL=dres is not None, num_warps=warps,
    )
    return dx, dw.sum(0).to(weight.dtype)


class _RMSNormWithResidual(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        x2, y, rstd = _forward(x, None, weight, eps)
        ctx.save_for_backward(x2, weight, rstd)
        ctx.shape = x.shape
        ctx.set_materialize_grads(False)  # an unused output's gradient stays None: no kernel for zeros
        return x, y.view(x.shape)  # x returned as is: autograd makes it a view whose gradient comes back here

    @staticmethod
    def backward(ctx, dres, dy):
        x2, weight, rstd = ctx.saved_tensors
        if dy is None:
            return dres, None, None
        dx, dw = _backward(x2, rstd, weight, dy, dres)
        return dx.view(ctx.shape), dw, None


class _AddRMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, branch, weight, eps):
        h, y, rstd = _forward(x, branch, weight, eps)
        ctx.save_for_backward(h, weight, rstd)
        ctx.shape = x.shape
        ctx.set_materialize_grads(False)
        return h.view(x.shape), y.view(x.shape)

    @staticmethod
    def backward(ctx, dh, dy):
        h, weight, rstd = ctx.saved_tensors
        if dy is None:
            return dh, dh, None, None
        dx, dw = _backward(h, rstd, weight, dy, dh)
        dx = dx.view(ctx.shape)
        return dx, dx, dw, None


def _check(x: torch.Tensor, weight: torch.Tensor, branch: torch.Tensor | None = None) -> None:
    if weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(f"the RMSNorm weight must be [{x.shape[-1]}] for inputs [..., {x.shape[-1]}]; got "
                         f"{tuple(weight.shape)}")
    if branch is not None and (branch.shape != x.shape or branch.dtype != x.dtype):
        raise ValueError(f"add_rms_norm adds tensors of one shape and dtype; got {tuple(x.shape)} {x.dtype} and "
                         f"{tuple(branch.shape)} {branch.dtype}")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps) * weight over the last dimension; differentiable in x and weight. (The residual
    form with its first output unused: that output's gradient stays None and adds nothing.)"""
    _check(x, weight)
    return _RMSNormWithResidual.apply(x, weight, eps)[1]


def rms_norm_with_residual(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, rms_norm(x)): use the first for the residual branch, so that its gradient and the norm's are summed in
    the norm's backward kernel instead of by a separate add."""
    _check(x, weight)
    return _RMSNormWithResidual.apply(x, weight, eps)


def add_rms_norm(x: torch.Tensor, branch: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(h, rms_norm(h)) with h = x + branch, in one kernel each way (module docstring)."""
    _check(x, weight, branch)
    return _AddRMSNorm.apply(x, branch, weight, eps)
