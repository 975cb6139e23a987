"""MoBA inside Hugging Face transformers (5.x): an attention implementation for Llama-style models.

    from moba_train.hf import register_moba
    register_moba(block_size=4096, topk=12)
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="moba")

`register_moba` registers two names with transformers' AttentionInterface (and, for the attention
masks, its AttentionMaskInterface, with SDPA's boolean masks):
    "moba"        moba_train.attention.moba_attention, backend "auto" (the fastest for the device)
    "moba_naive"  the same with backend "naive" (the dense definition; small inputs only)

What runs when:
- Prefill (query length == key length): MoBA over each batch row's tokens, exactly as our
  Megatron-Core model computes it (the same block_size / topk give the same logits).
- Decoding with a KV cache (query length != key length: one new token, or a chunk appended to a
  cache): full causal attention over the cache, through transformers' SDPA path. MoBA's speed-up is
  in the long prefill; a decode step reads the whole cache once either way. So a generated
  continuation attends with MoBA over the prompt only while the prompt is being prefilled.
- Padding masks are honoured: the non-padded tokens of each row (left or right padding) form one
  sequence whose MoBA blocks start at its first real token (the row's result equals running it
  alone); padded query positions return zeros. Masks that are not causal + padding (packed
  sequences, sliding windows, custom 4D masks) are refused with a ValueError. A padded batch
  carries transformers' [b, 1, L, L] boolean mask (as under SDPA); an unpadded one carries none.
"""

from __future__ import annotations

import functools

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from moba_train.attention import moba_attention

IMPLEMENTATIONS = {"moba": "auto", "moba_naive": "naive"}
"""Registered attention implementation name -> moba_attention backend."""


def _prefill_rows(attention_mask: torch.Tensor | None, batch: int, length: int, device) -> torch.Tensor:
    """Which tokens of each row are real: bool [b, L]. ValueError unless the mask is causal + padding."""
    if attention_mask is None:
        return torch.ones(batch, length, dtype=torch.bool, device=device)
    if attention_mask.dtype != torch.bool or attention_mask.shape[1] != 1:
        raise ValueError(
            f"MoBA attention needs a boolean [batch, 1, q, k] mask, got {attention_mask.dtype} "
            f"{tuple(attention_mask.shape)}; load the model with attn_implementation='moba' after register_moba()"
        )
    mask = attention_mask[:, 0]
    valid = mask.diagonal(dim1=-2, dim2=-1)
    causal = torch.ones(length, length, dtype=torch.bool, device=device).tril()
    expected = causal[None] & valid[:, None, :]
    if not ((mask == expected) | ~valid[:, :, None]).all():
        raise ValueError(
            "MoBA attention supports causal masks with padding only (no packed sequences, sliding windows "
            "or custom masks); pass a plain 2D attention_mask or none"
        )
    return valid


def moba_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    *,
    block_size: int,
    topk: int,
    backend: str,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention function: query [b, Hq, L, D], key/value [b, Hkv, S, D] ->
    ([b, L, Hq, D], None). MoBA when L == S (prefill), full attention over the cache otherwise."""
    if dropout:
        raise ValueError("MoBA attention has no attention dropout; set config.attention_dropout=0 or call model.eval()")
    batch, _, length, _ = query.shape
    if key.shape[2] != length:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    valid = _prefill_rows(attention_mask, batch, length, query.device)
    q_thd, k_thd, v_thd = (x.transpose(1, 2)[valid] for x in (query, key, value))
    lengths = valid.sum(1, dtype=torch.int32)
    cu_seqlens = torch.nn.functional.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))
    out_thd = moba_attention(
        q_thd, k_thd, v_thd, cu_seqlens=cu_seqlens, block_size=block_size, topk=topk, softmax_scale=scaling,
        backend=backend,
    )
    out = query.new_zeros(batch, length, query.shape[1], query.shape[3])
    out[valid] = out_thd
    return out, None


def register_moba(block_size: int, topk: int) -> None:
    """Register "moba" and "moba_naive" with transformers (see the module docstring). Calling it again
    replaces the block size and top-k for models loaded afterwards and for existing ones alike."""
    if block_size < 1 or topk < 1:
        raise ValueError(f"block_size ({block_size}) and topk ({topk}) must be positive")
    for name, backend in IMPLEMENTATIONS.items():
        forward = functools.partial(moba_attention_forward, block_size=block_size, topk=topk, backend=backend)
        AttentionInterface.register(name, forward)
        AttentionMaskInterface.register(name, sdpa_mask)
