"""Our core_attention modules turn Megatron's layouts into the attention API's and back:
checked against SDPA (full) and the naive MoBA definition, for sbhd and packed thd inputs."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.transformer_config import TransformerConfig

from moba_train.attention.naive import moba_attention_naive
from moba_train.core_attention import FullCoreAttention, MoBACoreAttention

HQ, HKV, D = 4, 2, 16


def make(cls, **params):
    config = TransformerConfig(num_layers=1, hidden_size=HQ * D, num_attention_heads=HQ, num_query_groups=HKV,
                               kv_channels=D, attention_dropout=0.0, hidden_dropout=0.0)
    return cls(config, layer_number=1, attn_mask_type=AttnMaskType.causal, attention_type="self", **params)


def qkv(*leading):
    gen = torch.Generator().manual_seed(0)
    return (torch.randn(*leading, h, D, generator=gen) for h in (HQ, HKV, HKV))


def test_full_core_attention_on_sbhd_equals_sdpa_causal():
    sq, b = 32, 2
    q, k, v = qkv(sq, b)
    out = make(FullCoreAttention)(q, k, v, attention_mask=None)
    assert out.shape == (sq, b, HQ * D)
    to_bhsd = lambda x: x.permute(1, 2, 0, 3)  # noqa: E731
    expected = F.scaled_dot_product_attention(to_bhsd(q), to_bhsd(k), to_bhsd(v), is_causal=True, enable_gqa=True)
    torch.testing.assert_close(out, expected.permute(2, 0, 1, 3).reshape(sq, b, HQ * D), rtol=1e-5, atol=1e-5)


def test_full_core_attention_on_packed_thd_attends_within_each_document():
    bounds = [0, 7, 30, 48]
    q, k, v = qkv(bounds[-1])
    cu = torch.tensor(bounds, dtype=torch.int32)
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=23, max_seqlen_kv=23)
    out = make(FullCoreAttention)(q, k, v, attention_mask=None, packed_seq_params=params)
    assert out.shape == (bounds[-1], HQ * D)
    for start, end in zip(bounds[:-1], bounds[1:]):
        doc = [x[start:end].transpose(0, 1)[None] for x in (q, k, v)]
        expected = F.scaled_dot_product_attention(*doc, is_causal=True, enable_gqa=True)[0].transpose(0, 1)
        torch.testing.assert_close(out[start:end], expected.reshape(end - start, HQ * D), rtol=1e-5, atol=1e-5)


def test_moba_core_attention_on_sbhd_equals_the_definition_per_sample():
    sq, b = 64, 2
    q, k, v = qkv(sq, b)
    out = make(MoBACoreAttention, block_size=16, topk=2, backend="auto")(q, k, v, attention_mask=None)
    for i in range(b):
        cu = torch.tensor([0, sq], dtype=torch.int32)
        expected = moba_attention_naive(q[:, i], k[:, i], v[:, i], cu_seqlens=cu, block_size=16, topk=2)
        torch.testing.assert_close(out[:, i], expected.reshape(sq, HQ * D), rtol=1e-5, atol=1e-5)


def test_sbhd_layers_share_one_cu_seqlens_tensor():
    # The attention's host tables are cached per cu_seqlens tensor: sbhd calls of the same shape must
    # pass the same object (one host read per shape, not one per layer).
    from moba_train.core_attention import to_thd

    x = torch.randn(16, 2, 4, 8)  # [s, b, heads, D]
    *_, cu1 = to_thd(x, x, x, None)
    *_, cu2 = to_thd(x.clone(), x, x, None)
    assert cu1 is cu2 and cu1.tolist() == [0, 16, 32] and cu1.dtype == torch.int32
    *_, cu3 = to_thd(torch.randn(8, 3, 4, 8), torch.randn(8, 3, 4, 8), torch.randn(8, 3, 4, 8), None)
    assert cu3.tolist() == [0, 8, 16, 24]
