"""MoBA (Mixture of Block Attention) and full causal attention on packed [tokens, heads, dim] tensors.

    from moba_train.attention import moba_attention, moba_selection, full_attention

Layouts (the flash-attn varlen convention):
    q: [T, Hq, D];  k, v: [T, Hkv, D] with Hq % Hkv == 0 (MHA, GQA, MQA); query head h reads KV head
    h // (Hq // Hkv).  cu_seqlens: int32 [num_seqs + 1], 0 = cu[0] <= cu[1] <= ... <= cu[-1] = T;
    sequence i is tokens [cu[i], cu[i+1]).  Outputs are [T, Hq, D] in q's dtype.
    Dtypes: fp32, bf16, fp16.  Everything is differentiable w.r.t. q, k, v.

Semantics of MoBA (exactly these; `naive.py` implements them literally and is the test oracle):
1. Blocks are `block_size` consecutive tokens, restarting at every sequence start; the last block of a
   sequence may be partial.
2. A block's representative key is the mean of its keys, per KV head. The gate score of query token t
   (head h) for block c is q[t, h] . mean_k[c, kv(h)], computed in fp32, unscaled. The gate carries no
   gradient (top-k is not differentiable; q and k still get gradients through attention).
3. The block containing t (the current block) is always selected and attended causally (keys <= t).
   Future blocks are never selected. Candidates for the other slots are the blocks strictly before the
   current block (complete by construction).
4. `topk` counts the current block: each query attends to the current block plus the topk - 1
   highest-scoring earlier blocks (all earlier blocks when fewer exist). Ties go to the lower block
   index.
5. Attention is one softmax over the union of the selected keys (backends compute it per part and
   merge exactly by log-sum-exp). Hence with topk >= number of blocks, MoBA equals full causal
   attention.
6. Each query head selects its own blocks. With `shared_gqa_selection=True` the heads of one KV group
   sum their gate scores and share one selection (fewer KV bytes read at decode time).
`softmax_scale` defaults to 1 / sqrt(D).

Backends (`backend=`):
    naive   dense masks, O(S^2) memory: the definition, for tests and plots (moba_train.attention.naive).
    torch   memory-efficient pure PyTorch, CPU and GPU, hand-written backward (torch_backend.py).
    varlen  the reference algorithm on FA2 varlen kernels, CUDA, fp16/bf16 (varlen.py).
    triton  the fused Triton kernels of `kernels/` (CUDA, or CPU under TRITON_INTERPRET=1).
    auto    see `auto_backend`.
This package depends on torch only (Triton lazily): it works in any PyTorch or HF transformers model.
"""

from __future__ import annotations

import importlib
import math
import os
import weakref

import torch
import torch.nn.functional as F

from moba_train.attention import naive, torch_backend, varlen

__all__ = ["moba_attention", "moba_selection", "full_attention", "auto_backend", "backend_available", "BACKENDS"]

BACKENDS = ("auto", "naive", "torch", "varlen", "triton")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
NAIVE_MAX_WORK = 1 << 18
"""On CPU, `auto` uses the naive backend while max_seqlen^2 * Hq stays below this (e.g. 256 tokens x 4 heads)."""


def _triton_kernel():
    """The Triton entry point, or None when `kernels` cannot be imported."""
    try:
        return importlib.import_module("moba_train.kernels").moba_attention_triton
    except (ImportError, AttributeError):
        return None


def backend_available(backend: str, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether `backend` can run for inputs of this device and dtype."""
    if backend == "varlen":
        return varlen.available(device, dtype)
    if backend == "triton":
        on_device = device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"
        return on_device and dtype in (torch.float16, torch.bfloat16) and _triton_kernel() is not None
    return backend in BACKENDS


def auto_backend(
    device: torch.device, dtype: torch.dtype, max_seqlen: int, num_heads: int, head_dim: int, block_size: int
) -> str:
    """The backend `auto` picks. CUDA: triton if `kernels` imports and the kernels take the input (fp16/bf16,
    head_dim a power of two in [16, 256], block_size a multiple of 16), else varlen for fp16/bf16 when
    the FA2 varlen kernels exist, else torch. CPU: naive while max_seqlen^2 * heads < NAIVE_MAX_WORK
    (dense is fastest on tiny inputs), else torch."""
    if device.type == "cuda":
        triton_shape = head_dim in (16, 32, 64, 128, 256) and block_size % 16 == 0
        if triton_shape and backend_available("triton", device, dtype):
            return "triton"
        if backend_available("varlen", device, dtype):
            return "varlen"
        return "torch"
    return "naive" if max_seqlen * max_seqlen * num_heads < NAIVE_MAX_WORK else "torch"


_BOUNDS: dict = {}  # id(cu_seqlens) -> (weakref, version, bounds)


def _host_bounds(cu_seqlens: torch.Tensor) -> list[int]:
    """cu_seqlens as a list of ints, cached per tensor and version: reading a CUDA tensor syncs with the
    host and drains the GPU's queue, and every attention layer of a step gets the same cu_seqlens
    (a write that bypasses the version counter, e.g. through `.data`, is not seen)."""
    hit = _BOUNDS.get(id(cu_seqlens))
    if hit is not None and hit[0]() is cu_seqlens and hit[1] == cu_seqlens._version:
        return hit[2]
    bounds = cu_seqlens.tolist()
    for dead in [key for key, (ref, _, _) in _BOUNDS.items() if ref() is None]:
        del _BOUNDS[dead]
    _BOUNDS[id(cu_seqlens)] = (weakref.ref(cu_seqlens), cu_seqlens._version, bounds)
    return bounds


def _check_qkv(q, k, v, cu_seqlens) -> list[int]:
    """Validate layouts, dtypes and devices; return cu_seqlens as a list of ints."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.dim() != 3:
            raise ValueError(
                f"{name} must be 3-D [tokens, heads, head_dim], got shape {tuple(x.shape)}; "
                "flatten batches into packed tokens."
            )
        if x.dtype not in DTYPES:
            raise ValueError(f"{name} has unsupported dtype {x.dtype}; use float32, bfloat16 or float16.")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}; cast them to one dtype.")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}.")
    if q.shape[0] != k.shape[0]:
        raise ValueError(f"q and k must have the same token count, got {q.shape[0]} and {k.shape[0]}.")
    if q.shape[2] != k.shape[2]:
        raise ValueError(f"q and k must have the same head dim, got {q.shape[2]} and {k.shape[2]}.")
    if q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"q heads ({q.shape[1]}) must be a multiple of k/v heads ({k.shape[1]}) (Hq % Hkv == 0).")
    if not isinstance(cu_seqlens, torch.Tensor):
        raise ValueError("cu_seqlens must be a torch.Tensor (int32, [num_seqs + 1]).")
    for name, x in (("k", k), ("v", v), ("cu_seqlens", cu_seqlens)):
        if x.device != q.device:
            raise ValueError(f"{name} is on {x.device} but q is on {q.device}; move all inputs to one device.")
    if cu_seqlens.dtype != torch.int32:
        raise ValueError(f"cu_seqlens must be int32, got {cu_seqlens.dtype}; use cu_seqlens.to(torch.int32).")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        raise ValueError(f"cu_seqlens must be 1-D [num_seqs + 1], got shape {tuple(cu_seqlens.shape)}.")
    bounds = _host_bounds(cu_seqlens)
    if bounds[0] != 0:
        raise ValueError(f"cu_seqlens must start at 0, got {bounds[0]}.")
    if any(b < a for a, b in zip(bounds[:-1], bounds[1:])):
        raise ValueError("cu_seqlens must be non-decreasing (monotonic), got a decreasing step.")
    if bounds[-1] != q.shape[0]:
        raise ValueError(f"cu_seqlens must end at total_tokens ({q.shape[0]}), got {bounds[-1]}.")
    return bounds


def _check_blocks(block_size: int, topk: int) -> None:
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}.")
    if topk < 1:
        raise ValueError(f"topk must be >= 1 (it counts the current block), got {topk}.")


def _resolve_backend(backend: str, q: torch.Tensor, bounds: list[int], block_size: int) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}.")
    if backend == "auto":
        max_seqlen = max((b - a for a, b in zip(bounds[:-1], bounds[1:])), default=0)
        return auto_backend(q.device, q.dtype, max_seqlen, q.shape[1], q.shape[2], block_size)
    if backend == "varlen" and not backend_available("varlen", q.device, q.dtype):
        raise ValueError(
            f"backend 'varlen' is not available for {q.dtype} on {q.device}: it needs CUDA, fp16/bf16 and "
            "PyTorch's FA2 kernels; use backend='torch'."
        )
    if backend == "triton":
        if _triton_kernel() is None:
            raise ValueError(
                "backend 'triton' is not available: the `kernels` package does not import; use backend='torch'."
            )
        if not backend_available("triton", q.device, q.dtype):
            raise ValueError(
                f"backend 'triton' cannot run {q.dtype} on {q.device}; use fp16/bf16 on CUDA (or under "
                "TRITON_INTERPRET=1 for small CPU runs)."
            )
    return backend


def moba_attention(
    q, k, v, *, cu_seqlens, block_size, topk, softmax_scale=None, backend="auto", shared_gqa_selection=False
) -> torch.Tensor:
    """MoBA attention: q [T, Hq, D], k/v [T, Hkv, D], cu_seqlens int32 [N+1] -> [T, Hq, D] (q's dtype)."""
    bounds = _check_qkv(q, k, v, cu_seqlens)
    _check_blocks(block_size, topk)
    backend = _resolve_backend(backend, q, bounds, block_size)
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    if backend == "naive":
        return naive.moba_attention_naive(
            q, k, v, cu_seqlens=cu_seqlens, block_size=block_size, topk=topk, softmax_scale=scale,
            shared_gqa_selection=shared_gqa_selection,
        )
    if backend == "triton":
        return _triton_kernel()(q, k, v, cu_seqlens, block_size, topk, scale, shared_gqa_selection)
    run = torch_backend.moba_attention_torch if backend == "torch" else varlen.moba_attention_varlen
    return run(
        q, k, v, bounds=bounds, block_size=block_size, topk=topk, softmax_scale=scale,
        shared_gqa_selection=shared_gqa_selection,
    )


def moba_selection(q, k, *, cu_seqlens, block_size, topk, shared_gqa_selection=False) -> torch.Tensor:
    """Which key blocks every (query, head) attends: int32 [T, Hq, topk].

    Entry [t, h, :] lists block indices LOCAL to t's sequence (block c covers the sequence's tokens
    [c * block_size, (c + 1) * block_size)), ascending, padded at the end with -1 (naive.NO_BLOCK) when
    fewer than topk blocks exist; the current block t_local // block_size is the last real entry. Equal
    to naive.moba_selection_naive, computed in query chunks without an S x S (or S x S/block) tensor.
    """
    bounds = _check_qkv(q, k, k, cu_seqlens)
    _check_blocks(block_size, topk)
    layout = torch_backend.BlockLayout.build(bounds, block_size, q.device)
    selection = torch_backend.select_blocks(q, k, layout, topk, shared_gqa_selection)
    local = selection - layout.token_first[:, None, None]
    return torch.where(selection >= 0, local, naive.NO_BLOCK).to(torch.int32)


def full_attention(q, k, v, *, cu_seqlens, softmax_scale=None) -> torch.Tensor:
    """Causal attention per sequence: q [T, Hq, D], k/v [T, Hkv, D] -> [T, Hq, D]. Differentiable.

    CUDA with fp16/bf16 and several sequences: one FA2 `varlen_attn` call. Otherwise SDPA (GQA through
    `enable_gqa`, no repeated K/V): one batched call when all sequences have the same length, else one
    call per sequence.
    """
    bounds = _check_qkv(q, k, v, cu_seqlens)
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    lengths = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
    if len(lengths) > 1 and varlen.available(q.device, q.dtype):
        return varlen.causal_varlen_attn(q, k, v, cu_seqlens, max(lengths), scale)
    gqa = q.shape[1] != k.shape[1]
    nonempty = [n for n in lengths if n > 0]
    if nonempty and all(n == nonempty[0] for n in nonempty):
        n = nonempty[0]
        q_b, k_b, v_b = (x.view(-1, n, *x.shape[1:]).transpose(1, 2) for x in (q, k, v))
        out = F.scaled_dot_product_attention(q_b, k_b, v_b, is_causal=True, scale=scale, enable_gqa=gqa)
        return out.transpose(1, 2).reshape(q.shape)
    parts = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        if b > a:
            q_s, k_s, v_s = (x[a:b].transpose(0, 1)[None] for x in (q, k, v))
            out = F.scaled_dot_product_attention(q_s, k_s, v_s, is_causal=True, scale=scale, enable_gqa=gqa)
            parts.append(out[0].transpose(0, 1))
    return torch.cat(parts) if parts else q.new_empty(q.shape)
