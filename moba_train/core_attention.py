"""Megatron-Core `core_attention` modules that call our attention API (MoBA or full causal).

They fill the `core_attention` slot of a layer spec (see moba_train/model.py `layer_specs`) with
DotProductAttention's constructor and forward signature, and hold no parameters, so the attention
kind never changes checkpoint keys.

Layouts: Megatron hands the core attention query `[sq, b, Hq/tp, D]` and key/value
`[sq, b, Hkv/tp, D]` ("sbhd"), or `[t, H/tp, D]` ("thd") when `packed_seq_params.qkv_format` is
"thd" (packed documents, see moba_train/model.py `packed_seq_params`). `to_thd` turns either into
`[tokens, heads, D]` + int32 cu_seqlens, the attention API's layout, and `from_thd` turns the output
back into what DotProductAttention returns (`[sq, b, Hq/tp * D]`, or `[t, Hq/tp * D]` for thd).
The offsets are known on the host (thd: packed_seq_params carries them on the CPU; sbhd: from the
shape), so no layer reads a device tensor back.

Context parallelism sits between these conversions and the attention call: with a CP group of more
than one rank, `moba_train.context_parallel.attention` runs the layer's attention over whole sequences
(design `cp_comm_type`: all_gather or a2a) through the attention API's suffix-of-keys contract.
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

from moba_train import context_parallel
from moba_train.attention import full_attention, moba_attention


def to_thd(query, key, value, packed_seq_params: Optional[PackedSeqParams]):
    """(q, k, v) as `[tokens, heads, D]` plus int32 cu_seqlens `[n+1]` over those tokens, on q's device.

    sbhd: each of the b samples is one sequence, tokens ordered sample by sample.
    thd: the tensors already are `[t, heads, D]`; cu_seqlens come from packed_seq_params (on the host,
    copied to the device once per tensor).
    """
    if packed_seq_params is not None and packed_seq_params.qkv_format == "thd":
        return query, key, value, device_offsets(packed_seq_params.cu_seqlens_q, query.device)
    assert packed_seq_params is None, "packed sequences reach the core attention only in thd format"
    sq, b = query.shape[:2]
    q, k, v = (x.transpose(0, 1).reshape(b * sq, *x.shape[2:]) for x in (query, key, value))
    return q, k, v, sbhd_cu_seqlens(b, sq, query.device)


def own_storage(x: torch.Tensor) -> torch.Tensor:
    """`x`, copied if it is a view of a larger tensor. Megatron splits v off the QKV projection's output (q
    and k are rotated into tensors of their own): the attention's backward keeps v, and through the view the
    whole output, (Hq + 2 Hkv) D elements per token instead of Hkv D (moba_train/memory.py)."""
    if x.untyped_storage().nbytes() == x.numel() * x.element_size():
        return x
    return x.clone(memory_format=torch.contiguous_format)


def host_offsets(query: torch.Tensor, packed_seq_params: Optional[PackedSeqParams]) -> list[int]:
    """The offsets of `to_thd` as ints, without reading a device tensor."""
    if packed_seq_params is not None:
        return _host_list(packed_seq_params.cu_seqlens_q)
    sq, b = query.shape[:2]
    return list(range(0, (b + 1) * sq, sq))


_DEVICE_COPIES: dict = {}  # (id(cu), device) -> (cu, version, copy): one copy per step's offsets tensor


def device_offsets(cu: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`cu` on `device`; every layer of a step passes the same tensor, so it is copied once."""
    if cu.device == device:
        return cu
    key = (id(cu), str(device))
    hit = _DEVICE_COPIES.get(key)
    if hit is not None and hit[0] is cu and hit[1] == cu._version:
        return hit[2]
    _DEVICE_COPIES.clear()  # one live micro-batch at a time: older copies are done with
    copy = cu.to(device, non_blocking=True)
    _DEVICE_COPIES[key] = (cu, cu._version, copy)
    return copy


def _host_list(cu: torch.Tensor) -> list[int]:
    assert cu.device.type == "cpu", "packed offsets reach the core attention on the host (model.packed_seq_params)"
    return cu.tolist()


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
    """Shared constructor, layout handling and context parallelism; subclasses define
    `attend(q, k, v, *, cu_seqlens_q, cu_seqlens_k, host_cu_seqlens)` (the attention API's offsets)."""

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
        dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        assert dropout == 0.0, "Llama attention has no dropout"
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(config.kv_channels)
        self.cp_group = None
        if config.context_parallel_size > 1:
            assert pg_collection is not None and pg_collection.cp.size() == config.context_parallel_size
            assert cp_comm_type in context_parallel.COMM_DESIGNS, f"unsupported cp_comm_type {cp_comm_type!r}"
            self.cp_group, self.cp_comm_type = pg_collection.cp, cp_comm_type

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
        v = own_storage(v)
        host = host_offsets(query, packed_seq_params)
        if self.cp_group is None:
            out = self.attend(q, k, v, cu_seqlens_q=cu_seqlens, cu_seqlens_k=cu_seqlens, host_cu_seqlens=(host, host))
        else:  # under CP the offsets are the whole (padded) sequences', split over the group
            lengths = [b - a for a, b in zip(host[:-1], host[1:])]
            out = context_parallel.attention(q, k, v, lengths, self.attend, self.cp_comm_type, self.cp_group)
        return from_thd(out, query, packed_seq_params)


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

    def attend(self, q, k, v, **offsets):
        return moba_attention(
            q,
            k,
            v,
            **offsets,
            block_size=self.block_size,
            topk=self.topk,
            softmax_scale=self.softmax_scale,
            backend=self.backend,
            shared_gqa_selection=self.shared_gqa_selection,
        )


class FullCoreAttention(_CoreAttention):
    """Full causal attention per sequence (moba_train.attention.full_attention; attention.full_backend)."""

    def __init__(self, *args, sdpa_backend: str = "auto", **kwargs):
        super().__init__(*args, **kwargs)
        self.sdpa_backend = sdpa_backend

    def attend(self, q, k, v, **offsets):
        return full_attention(q, k, v, **offsets, softmax_scale=self.softmax_scale, sdpa_backend=self.sdpa_backend)
