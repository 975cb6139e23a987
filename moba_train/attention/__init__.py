"""MoBA (Mixture of Block Attention) and full causal attention on packed [tokens, heads, dim] tensors.

    from moba_train.attention import moba_attention, moba_selection, full_attention

Layouts (the flash-attn varlen convention):
    q: [Tq, Hq, D];  k, v: [Tk, Hkv, D] with Hq % Hkv == 0 (MHA, GQA, MQA); query head h reads KV head
    h // (Hq // Hkv).  Offsets, int32 [num_seqs + 1] on q's device, 0 = cu[0] <= cu[1] <= ... <= cu[-1]:
    `cu_seqlens` when queries and keys are the same tokens (self-attention, Tq == Tk), or
    `cu_seqlens_q` (ending at Tq) and `cu_seqlens_k` (ending at Tk) when queries are a SUFFIX of their
    sequence's keys: sequence j has len_k(j) keys and len_q(j) <= len_k(j) queries, and query i of
    sequence j sits at key position len_k(j) - len_q(j) + i (causal alignment to the bottom right, as
    flash-attn's varlen causal). Context parallelism uses this: a rank's queries attend the prefix of
    keys before them. Outputs are [Tq, Hq, D] in q's dtype.
    Dtypes: fp32, bf16, fp16.  Everything is differentiable w.r.t. q, k, v (and through lse).

Host bounds: reading a CUDA offsets tensor syncs the host with the GPU. Each tensor is read once and
cached (per tensor and version); a caller that already has the offsets on the host passes them as
`host_cu_seqlens=(offsets_q, offsets_k)` (lists of ints) and the call never syncs.

Semantics of MoBA (exactly these; `naive.py` implements them literally and is the test oracle):
1. Blocks are `block_size` consecutive keys, restarting at every sequence start; the last block of a
   sequence may be partial.
2. A block's representative key is the mean of its keys, per KV head. The gate score of query t
   (head h) for block c is q[t, h] . mean_k[c, kv(h)], computed in fp32, unscaled. The gate carries no
   gradient (top-k is not differentiable; q and k still get gradients through attention).
3. The block containing t's key position p (the current block) is always selected and attended
   causally (keys <= p). Future blocks are never selected. Candidates for the other slots are the
   blocks strictly before the current block (complete by construction).
4. `topk` counts the current block: each query attends to the current block plus the topk - 1
   highest-scoring earlier blocks (all earlier blocks when fewer exist). Ties go to the lower block
   index. A block whose score is -inf or NaN (non-finite inputs) is never chosen for a past slot.
5. Attention is one softmax over the union of the selected keys (backends compute it per part and
   merge exactly by log-sum-exp). Hence with topk >= number of blocks, MoBA equals full causal
   attention. `return_lse=True` also returns that softmax's log-sum-exp of the scaled logits, fp32
   [Tq, Hq] (natural log), so partial results over disjoint key sets merge exactly:
   lse = logaddexp(lse_a, lse_b), out = exp(lse_a - lse) * out_a + exp(lse_b - lse) * out_b.
6. Each query head selects its own blocks. With `shared_gqa_selection=True` the heads of one KV group
   sum their gate scores and share one selection (fewer KV bytes read at decode time).
7. Selection is separable: `moba_selection` returns it (int32 [Tq, Hq, topk], local block indices,
   ascending, -1-padded) and `moba_attention(..., selection=sel)` attends exactly those blocks, so a
   selection computed once (diagnostics, context parallelism) is not computed again.
`softmax_scale` defaults to 1 / sqrt(D).

Backends (`backend=`):
    naive   dense masks, O(S^2) memory: the definition, for tests and plots (moba_train.attention.naive).
    torch   memory-efficient pure PyTorch, CPU and GPU, hand-written backward (torch_backend.py).
    varlen  the reference algorithm on FA2 varlen kernels, CUDA, fp16/bf16 (varlen.py).
    triton  the fused Triton kernels of `moba_train.kernels` (CUDA, or CPU under TRITON_INTERPRET=1).
    auto    see `auto_backend`.
This package depends on torch only (Triton lazily): it works in any PyTorch or HF transformers model.
"""

from __future__ import annotations

import importlib
import math
import numbers
import os
import weakref

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

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


def _check_tensors(q, k, v) -> None:
    """Layouts, dtypes and devices of q [Tq, Hq, D], k and v [Tk, Hkv, D] (v may be k for selection)."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor) or x.dim() != 3:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{name} must be a 3-D tensor [tokens, heads, head_dim], got {shape}; "
                             "flatten batches into packed tokens.")
        if x.dtype not in DTYPES:
            raise ValueError(f"{name} has unsupported dtype {x.dtype}; use float32, bfloat16 or float16.")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}; cast them to one dtype.")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}.")
    if q.shape[2] != k.shape[2]:
        raise ValueError(f"q and k must have the same head dim, got {q.shape[2]} and {k.shape[2]}.")
    if q.shape[1] == 0 or k.shape[1] == 0:
        raise ValueError(f"q and k/v need at least one head each, got {q.shape[1]} and {k.shape[1]}.")
    if q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"q heads ({q.shape[1]}) must be a multiple of k/v heads ({k.shape[1]}) (Hq % Hkv == 0).")
    for name, x in (("k", k), ("v", v)):
        if x.device != q.device:
            raise ValueError(f"{name} is on {x.device} but q is on {q.device}; move all inputs to one device.")


def _check_offsets(name: str, cu: torch.Tensor, total: int, device: torch.device, host) -> list[int]:
    """One offsets tensor against its token count; returns it as a list of ints (host copy or one read)."""
    if not isinstance(cu, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor (int32, [num_seqs + 1]).")
    if cu.device != device:
        raise ValueError(f"{name} is on {cu.device} but q is on {device}; move all inputs to one device.")
    if cu.dtype != torch.int32:
        raise ValueError(f"{name} must be int32, got {cu.dtype}; use {name}.to(torch.int32).")
    if cu.dim() != 1 or cu.numel() < 1:
        raise ValueError(f"{name} must be 1-D [num_seqs + 1], got shape {tuple(cu.shape)}.")
    bounds = [int(b) for b in host] if host is not None else _host_bounds(cu)
    if len(bounds) != cu.numel():
        raise ValueError(f"host_cu_seqlens gives {len(bounds)} offsets for {name} but it has {cu.numel()}.")
    if bounds[0] != 0:
        raise ValueError(f"{name} must start at 0, got {bounds[0]}.")
    if any(b < a for a, b in zip(bounds[:-1], bounds[1:])):
        raise ValueError(f"{name} must be non-decreasing (monotonic), got a decreasing step.")
    if bounds[-1] != total:
        raise ValueError(f"{name} must end at total_tokens ({total}), got {bounds[-1]}.")
    return bounds


def _offsets(q, k, cu_seqlens, cu_seqlens_q, cu_seqlens_k, host_cu_seqlens):
    """(cu_q, cu_k, bounds_q, bounds_k) from either `cu_seqlens` or the pair; every sequence must have
    at least as many keys as queries (queries are the suffix of their sequence)."""
    if cu_seqlens is not None:
        if cu_seqlens_q is not None or cu_seqlens_k is not None:
            raise ValueError("pass either cu_seqlens or cu_seqlens_q with cu_seqlens_k, not both.")
        cu_seqlens_q = cu_seqlens_k = cu_seqlens
    elif cu_seqlens_q is None or cu_seqlens_k is None:
        raise ValueError("pass cu_seqlens (queries = keys) or both cu_seqlens_q and cu_seqlens_k.")
    host_q, host_k = host_cu_seqlens if host_cu_seqlens is not None else (None, None)
    bounds_q = _check_offsets("cu_seqlens_q" if cu_seqlens is None else "cu_seqlens", cu_seqlens_q, q.shape[0],
                              q.device, host_q)
    if cu_seqlens_k is cu_seqlens_q and host_k is None:
        bounds_k = bounds_q
    else:
        bounds_k = _check_offsets("cu_seqlens_k", cu_seqlens_k, k.shape[0], q.device, host_k)
    if cu_seqlens is None and q.shape[0] > k.shape[0]:
        raise ValueError(f"q has more tokens ({q.shape[0]}) than k ({k.shape[0]}); queries are a suffix of the keys.")
    if cu_seqlens is not None and q.shape[0] != k.shape[0]:
        raise ValueError(f"q and k must have the same token count with cu_seqlens, got {q.shape[0]} and {k.shape[0]}; "
                         "pass cu_seqlens_q and cu_seqlens_k for queries that are a suffix of the keys.")
    if len(bounds_q) != len(bounds_k):
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k must describe the same number of sequences, got "
                         f"{len(bounds_q) - 1} and {len(bounds_k) - 1}.")
    if bounds_q is not bounds_k:
        for j, (qa, qb, ka, kb) in enumerate(zip(bounds_q[:-1], bounds_q[1:], bounds_k[:-1], bounds_k[1:])):
            if qb - qa > kb - ka:
                raise ValueError(f"sequence {j} has {qb - qa} queries but only {kb - ka} keys; queries must be the "
                                 "last tokens of their sequence (len_q <= len_k).")
    return cu_seqlens_q, cu_seqlens_k, bounds_q, bounds_k


def _check_blocks(block_size, topk) -> None:
    for name, value in (("block_size", block_size), ("topk", topk)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{name} must be an int, got {value!r}; pass a whole number such as {name}=8.")
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}.")
    if topk < 1:
        raise ValueError(f"topk must be >= 1 (it counts the current block), got {topk}.")


def _scale(softmax_scale, head_dim: int) -> float:
    if softmax_scale is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(softmax_scale, bool) or not isinstance(softmax_scale, numbers.Real) or not (
        math.isfinite(softmax_scale) and softmax_scale > 0
    ):
        raise ValueError(f"softmax_scale must be a finite positive number or None (1/sqrt(head_dim)), "
                         f"got {softmax_scale!r}.")
    return float(softmax_scale)


def _check_selection(selection, q, topk: int) -> None:
    want = (q.shape[0], q.shape[1], topk)
    if not isinstance(selection, torch.Tensor) or selection.dtype != torch.int32 or tuple(selection.shape) != want:
        got = (selection.dtype, tuple(selection.shape)) if isinstance(selection, torch.Tensor) else type(selection)
        raise ValueError(f"selection must be an int32 tensor of shape {want} (what moba_selection returns for the "
                         f"same inputs and topk), got {got}.")
    if selection.device != q.device:
        raise ValueError(f"selection is on {selection.device} but q is on {q.device}; move it to q's device.")


def _max_len(bounds: list[int]) -> int:
    return max((b - a for a, b in zip(bounds[:-1], bounds[1:])), default=0)


def _resolve_backend(backend: str, q: torch.Tensor, bounds_k: list[int], block_size: int) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}.")
    if backend == "auto":
        return auto_backend(q.device, q.dtype, _max_len(bounds_k), q.shape[1], q.shape[2], block_size)
    if backend == "varlen" and not backend_available("varlen", q.device, q.dtype):
        raise ValueError(
            f"backend 'varlen' is not available for {q.dtype} on {q.device}: it needs CUDA, fp16/bf16 and "
            "PyTorch's FA2 kernels; use backend='torch'."
        )
    if backend == "triton":
        if _triton_kernel() is None:
            raise ValueError(
                "backend 'triton' is not available: `moba_train.kernels` does not import (is triton installed?); "
                "use backend='torch'."
            )
        if not backend_available("triton", q.device, q.dtype):
            raise ValueError(
                f"backend 'triton' cannot run {q.dtype} on {q.device}; use fp16/bf16 on CUDA (or under "
                "TRITON_INTERPRET=1 for small CPU runs)."
            )
    return backend


def moba_attention(
    q, k, v, *, cu_seqlens=None, block_size, topk, softmax_scale=None, backend="auto", shared_gqa_selection=False,
    cu_seqlens_q=None, cu_seqlens_k=None, host_cu_seqlens=None, selection=None, return_lse=False,
):
    """MoBA attention: q [Tq, Hq, D], k/v [Tk, Hkv, D] -> out [Tq, Hq, D] (q's dtype), and with `return_lse`
    (out, lse fp32 [Tq, Hq]). Offsets: `cu_seqlens`, or `cu_seqlens_q` + `cu_seqlens_k` (see module doc)."""
    _check_tensors(q, k, v)
    cu_q, cu_k, bounds_q, bounds_k = _offsets(q, k, cu_seqlens, cu_seqlens_q, cu_seqlens_k, host_cu_seqlens)
    _check_blocks(block_size, topk)
    scale = _scale(softmax_scale, q.shape[-1])
    if selection is not None:
        _check_selection(selection, q, topk)
    backend = _resolve_backend(backend, q, bounds_k, block_size)
    if backend == "naive":
        return naive.moba_attention_naive(
            q, k, v, cu_seqlens=cu_q, cu_seqlens_k=cu_k, block_size=block_size, topk=topk, softmax_scale=scale,
            shared_gqa_selection=shared_gqa_selection, selection=selection, return_lse=return_lse,
        )
    if backend == "triton":
        return _triton_kernel()(
            q, k, v, cu_q, block_size, topk, scale, shared_gqa_selection, cu_seqlens_k=cu_k,
            host_cu_seqlens=(bounds_q, bounds_k), selection=selection, return_lse=return_lse,
        )
    if backend == "varlen" and return_lse and torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v)):
        raise ValueError("backend 'varlen' returns lse without a gradient (FA2's backward takes none); use "
                         "backend='triton' or 'torch' to differentiate through lse.")
    run = torch_backend.moba_attention_torch if backend == "torch" else varlen.moba_attention_varlen
    return run(
        q, k, v, bounds_q=bounds_q, bounds_k=bounds_k, block_size=block_size, topk=topk, softmax_scale=scale,
        shared_gqa_selection=shared_gqa_selection, selection=selection, return_lse=return_lse,
    )


def moba_selection(
    q, k, *, cu_seqlens=None, block_size, topk, shared_gqa_selection=False, cu_seqlens_q=None, cu_seqlens_k=None,
    host_cu_seqlens=None, backend="auto",
) -> torch.Tensor:
    """Which key blocks every (query, head) attends: int32 [Tq, Hq, topk].

    Entry [t, h, :] lists block indices LOCAL to t's sequence (block c covers the sequence's keys
    [c * block_size, (c + 1) * block_size)), ascending, padded at the end with -1 (naive.NO_BLOCK) when
    fewer than topk blocks exist; the current block is the last real entry. Equal to
    naive.moba_selection_naive; `backend` auto takes the Triton gating where `moba_attention` would take
    the Triton kernels, otherwise chunked PyTorch (no S x S or S x S/block tensor either way).
    """
    _check_tensors(q, k, k)
    cu_q, cu_k, bounds_q, bounds_k = _offsets(q, k, cu_seqlens, cu_seqlens_q, cu_seqlens_k, host_cu_seqlens)
    _check_blocks(block_size, topk)
    backend = _resolve_backend(backend, q, bounds_k, block_size)
    if backend == "naive":
        return naive.moba_selection_naive(q, k, cu_seqlens=cu_q, cu_seqlens_k=cu_k, block_size=block_size, topk=topk,
                                          shared_gqa_selection=shared_gqa_selection)
    if backend == "triton":
        return importlib.import_module("moba_train.kernels").moba_selection_triton(
            q, k, cu_q, block_size, topk, shared_gqa_selection, cu_seqlens_k=cu_k,
            host_cu_seqlens=(bounds_q, bounds_k),
        )
    layout = torch_backend.BlockLayout.build(bounds_q, bounds_k, block_size, q.device)
    return torch_backend.local_selection(torch_backend.select_blocks(q, k, layout, topk, shared_gqa_selection), layout)


SDPA_BACKENDS = ("auto", "sdpa", "cudnn")
AUTO_SDPA_BACKEND = "sdpa"
"""What sdpa_backend="auto" takes on CUDA (bench/NOTES.md, session 6, measured both on an H200)."""


def full_attention(
    q, k, v, *, cu_seqlens=None, softmax_scale=None, cu_seqlens_q=None, cu_seqlens_k=None, host_cu_seqlens=None,
    sdpa_backend="auto",
) -> torch.Tensor:
    """Causal attention per sequence: q [Tq, Hq, D], k/v [Tk, Hkv, D] -> [Tq, Hq, D]. Differentiable.
    Offsets as for `moba_attention` (queries a suffix of their keys: bottom-right causal alignment).

    CUDA with fp16/bf16 and several sequences (or queries fewer than keys): one FA2 `varlen_attn` call.
    Otherwise SDPA (GQA through `enable_gqa`, no repeated K/V): one batched call when all sequences have
    the same lengths, else one call per sequence; a bottom-right causal mask where queries are fewer.
    `sdpa_backend` "cudnn" runs the batched call on cuDNN's fused attention (CUDA only; K/V repeated to the
    query heads, which it needs), "sdpa" leaves the choice to PyTorch, "auto" is AUTO_SDPA_BACKEND on CUDA.
    """
    _check_tensors(q, k, v)
    if sdpa_backend not in SDPA_BACKENDS:
        raise ValueError(f"sdpa_backend must be one of {', '.join(SDPA_BACKENDS)}, got {sdpa_backend!r}.")
    if sdpa_backend == "cudnn" and q.device.type != "cuda":
        raise ValueError(f"sdpa_backend 'cudnn' needs CUDA tensors, got {q.device.type}; use 'sdpa' or 'auto'.")
    cudnn = q.device.type == "cuda" and (sdpa_backend == "cudnn" or (sdpa_backend == "auto"
                                                                     and AUTO_SDPA_BACKEND == "cudnn"))
    _, _, bounds_q, bounds_k = _offsets(q, k, cu_seqlens, cu_seqlens_q, cu_seqlens_k, host_cu_seqlens)
    scale = _scale(softmax_scale, q.shape[-1])
    lengths_q = [b - a for a, b in zip(bounds_q[:-1], bounds_q[1:])]
    lengths_k = [b - a for a, b in zip(bounds_k[:-1], bounds_k[1:])]
    suffix = lengths_q != lengths_k
    if (len(lengths_q) > 1 or suffix) and varlen.available(q.device, q.dtype):
        cu_q, cu_k = (cu_seqlens, cu_seqlens) if cu_seqlens is not None else (cu_seqlens_q, cu_seqlens_k)
        return varlen.causal_varlen_attn(q, k, v, cu_q, cu_k, max(lengths_q), max(lengths_k), scale)
    gqa = q.shape[1] != k.shape[1]
    pairs = [(n, m) for n, m in zip(lengths_q, lengths_k) if n > 0]
    if pairs and all(pair == pairs[0] for pair in pairs) and not suffix:
        n = pairs[0][0]
        q_b, k_b, v_b = (x.view(-1, n, *x.shape[1:]).transpose(1, 2) for x in (q, k, v))
        if cudnn:
            from torch.nn.attention import SDPBackend, sdpa_kernel

            if gqa:
                k_b, v_b = (x.repeat_interleave(q.shape[1] // k.shape[1], dim=1) for x in (k_b, v_b))
            with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
                out = F.scaled_dot_product_attention(q_b, k_b, v_b, is_causal=True, scale=scale)
        else:
            out = F.scaled_dot_product_attention(q_b, k_b, v_b, is_causal=True, scale=scale, enable_gqa=gqa)
        return out.transpose(1, 2).reshape(q.shape)
    parts = []
    for qa, qb, ka, kb in zip(bounds_q[:-1], bounds_q[1:], bounds_k[:-1], bounds_k[1:]):
        if qb > qa:
            q_s = q[qa:qb].transpose(0, 1)[None]
            k_s, v_s = (x[ka:kb].transpose(0, 1)[None] for x in (k, v))
            causal = True if qb - qa == kb - ka else causal_lower_right(qb - qa, kb - ka)
            out = F.scaled_dot_product_attention(q_s, k_s, v_s, is_causal=causal is True,
                                                 attn_mask=None if causal is True else causal, scale=scale,
                                                 enable_gqa=gqa)
            parts.append(out[0].transpose(0, 1))
    return torch.cat(parts) if parts else q.new_empty(q.shape)
