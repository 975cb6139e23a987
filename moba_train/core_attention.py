"""Megatron-Core `core_attention` modules that call our attention API (MoBA or full causal).

They fill the `core_attention` slot of a layer spec (see moba_train/model.py `layer_specs`) with
DotProductAttention's constructor and forward signature, and hold no parameters, so the attention
kind never changes checkpoint keys.

Layouts: Megatron hands the core attention query `[sq, b, Hq/tp, D]` and key/value
`[sq, b, Hkv/tp, D]` ("sbhd"), or `[t, H/tp, D]` ("thd") when `packed_seq_params.qkv_format` is
"thd" (packed documents, see moba_train/model.py `packed_seq_params`). `to_thd` turns either into
`[tokens, heads, D]` + int32 cu_seqlens, the attention API's layout, and `from_thd` turns the output
back into what DotProductAttention returns (`[sq, b, Hq/tp * D]`, or `[t, Hq/tp * D]` for thd).
Context parallelism will sit between these conversions and the attention call.
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import torch
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig

from moba_train.attention import full_attention, moba_attention


def to_thd(query, key, value, packed_seq_params: Optional[PackedSeqParams]):
    """(q, k, v) as `[tokens, heads, D]` plus int32 cu_seqlens `[n+1]` over those tokens.

    sbhd: each of the b samples is one sequence, tokens ordered sample by sample.
    thd: the tensors already are `[t, heads, D]`; cu_seqlens come from packed_seq_params.
    """
    if packed_seq_params is not None and packed_seq_params.qkv_format == "thd":
        return query, key, value, packed_seq_params.cu_seqlens_q
    assert packed_seq_params is None, "packed sequences reach the core attention only in thd format"
    sq, b = query.shape[:2]
    q, k, v = (x.transpose(0, 1).reshape(b * sq, *x.shape[2:]) for x in (query, key, value))
    return q, k, v, sbhd_cu_seqlens(b, sq, query.device)


@functools.lru_cache(maxsize=16)
def sbhd_cu_seqlens(batch: int, seqlen: int, device: torch.device) -> torch.Tensor:
    """int32 [0, s, 2s, ..., b*s], one tensor per shape: every layer of every step passes the same
    object, so the attention's host-side tables (bounds, block layouts) are built once, not once per
    layer (each build reads the tensor: a host sync). Never modify it in place."""
    return torch.arange(0, (batch + 1) * seqlen, seqlen, dtype=torch.int32, device=device)


def from_thd(out_thd: torch.Tensor, query: torch.Tensor, packed_seq_params: Optional[PackedSeqParams]):
    """The attention output `[tokens, Hq, D]` in DotProductAttention's output layout (see module doc)."""
    if packed_seq_params is not None:
        return out_thd.reshape(out_thd.shape[0], -1)
    sq, b = query.shape[:2]
    return out_thd.reshape(b, sq, -1).transpose(0, 1).contiguous()


class _CoreAttention(MegatronModule):
    """Shared constructor and layout handling; subclasses define `attend(q, k, v, cu_seqlens)`."""

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection=None,
    ):
        super().__init__(config=config)
        assert attn_mask_type == AttnMaskType.causal, "moba-train models are causal language models"
        assert config.context_parallel_size == 1, "context parallelism is not implemented yet"
        dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        assert dropout == 0.0, "Llama attention has no dropout"
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(config.kv_channels)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: Optional[torch.Tensor],
        attn_mask_type: Optional[AttnMaskType] = None,
        attention_bias: Optional[torch.Tensor] = None,
        packed_seq_params: Optional[PackedSeqParams] = None,
    ) -> torch.Tensor:
        """Causal attention within each sequence; masks come from cu_seqlens, attention_mask is unused."""
        assert attention_bias is None, "attention bias is not supported"
        q, k, v, cu_seqlens = to_thd(query, key, value, packed_seq_params)
        return from_thd(self.attend(q, k, v, cu_seqlens), query, packed_seq_params)


class MoBACoreAttention(_CoreAttention):
    """MoBA (moba_train.attention.moba_attention); block_size, topk, backend and
    shared_gqa_selection come from the layer spec's params."""

    def __init__(
        self, *args, block_size: int, topk: int, backend: str = "auto", shared_gqa_selection: bool = False, **kwargs
    ):
        super().__init__(*args, **kwargs)
        self.block_size = block_size
        self.topk = topk
        self.backend = backend
        self.shared_gqa_selection = shared_gqa_selection

    def attend(self, q, k, v, cu_seqlens):
        return moba_attention(
            q,
            k,
            v,
            cu_seqlens=cu_seqlens,
            block_size=self.block_size,
            topk=self.topk,
            softmax_scale=self.softmax_scale,
            backend=self.backend,
            shared_gqa_selection=self.shared_gqa_selection,
        )


class FullCoreAttention(_CoreAttention):
    """Full causal attention per sequence (moba_train.attention.full_attention)."""

    def attend(self, q, k, v, cu_seqlens):
        return full_attention(q, k, v, cu_seqlens=cu_seqlens, softmax_scale=self.softmax_scale)
