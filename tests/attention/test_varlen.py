"""The varlen (FA2) backend against the torch backend, and the FA2 log-sum-exp layout it relies on. CUDA only."""

import math

import pytest
import torch

from moba_train.attention import full_attention, moba_attention, varlen

pytestmark = pytest.mark.skipif(
    not varlen.available(torch.device("cuda"), torch.bfloat16), reason="needs CUDA with PyTorch's FA2 varlen kernels"
)


def _packed(lengths, hq, hkv, dim, dtype=torch.bfloat16, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    total = sum(lengths)
    q = torch.randn(total, hq, dim, device="cuda", dtype=dtype, generator=gen)
    k = torch.randn(total, hkv, dim, device="cuda", dtype=dtype, generator=gen)
    v = torch.randn(total, hkv, dim, device="cuda", dtype=dtype, generator=gen)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    return q, k, v, cu


def _rel(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def test_fa2_varlen_lse_is_heads_by_tokens_and_equals_logsumexp_of_scaled_logits():
    q, k, v, cu = _packed([100, 37], 4, 4, 64)
    scale = 1 / math.sqrt(64)
    out, lse, *_ = torch.ops.aten._flash_attention_forward(q, k, v, cu, cu, 100, 100, 0.0, True, False, scale=scale)
    assert lse.shape == (4, 137) and lse.dtype == torch.float32
    for a, b in ((0, 100), (100, 137)):
        logits = torch.einsum("thd,shd->hts", q[a:b].float(), k[a:b].float()) * scale
        causal = torch.ones(b - a, b - a, dtype=torch.bool, device="cuda").tril()
        expected = torch.logsumexp(logits.masked_fill(~causal, float("-inf")), dim=-1)
        torch.testing.assert_close(lse[:, a:b], expected, rtol=0, atol=1e-3)
    from torch.nn.attention.varlen import AuxRequest, varlen_attn

    _, lse_public = varlen_attn(q, k, v, cu, cu, 100, 100, return_aux=AuxRequest(lse=True), window_size=(-1, 0))
    torch.testing.assert_close(lse_public, lse)


@pytest.mark.parametrize(
    "lengths,hq,hkv,dim,block,topk",
    [
        ([1024], 4, 4, 64, 128, 3),
        ([700, 300, 90], 8, 2, 128, 64, 4),
        ([513, 40], 8, 1, 64, 128, 8),
        ([2048, 1000], 4, 4, 128, 128, 1),
        ([256], 2, 2, 64, 64, 8),
    ],
)
def test_varlen_backend_matches_torch_backend_outputs_and_grads_bf16(lengths, hq, hkv, dim, block, topk):
    q, k, v, cu = _packed(lengths, hq, hkv, dim)
    grad_out = torch.randn_like(q)
    results = []
    for backend, cast in (("varlen", lambda x: x), ("torch", lambda x: x.float())):
        inputs = [cast(x).detach().requires_grad_() for x in (q, k, v)]
        out = moba_attention(*inputs, cu_seqlens=cu, block_size=block, topk=topk, backend=backend)
        out.backward(grad_out.to(out.dtype))
        results.append([out, *(x.grad for x in inputs)])
    for name, got, ref in zip(("out", "dq", "dk", "dv"), *results):
        assert _rel(got, ref) < 2e-2, name


def test_varlen_backend_shared_gqa_selection_matches_torch_backend():
    q, k, v, cu = _packed([600, 200], 8, 2, 64, seed=1)
    got = moba_attention(q, k, v, cu_seqlens=cu, block_size=64, topk=3, backend="varlen", shared_gqa_selection=True)
    ref = moba_attention(q.float(), k.float(), v.float(), cu_seqlens=cu, block_size=64, topk=3, backend="torch",
                         shared_gqa_selection=True)
    assert _rel(got, ref) < 2e-2


@pytest.mark.parametrize("hq,hkv", [(4, 4), (8, 2)])
def test_full_attention_on_cuda_matches_fp32_sdpa_per_sequence(hq, hkv):
    q, k, v, cu = _packed([300, 129, 64], hq, hkv, 64)
    out = full_attention(q, k, v, cu_seqlens=cu)
    bounds = cu.tolist()
    for a, b in zip(bounds[:-1], bounds[1:]):
        q_s, k_s, v_s = (x[a:b].float().transpose(0, 1) for x in (q, k, v))
        ref = torch.nn.functional.scaled_dot_product_attention(q_s, k_s, v_s, is_causal=True, enable_gqa=hq != hkv)
        assert _rel(out[a:b], ref.transpose(0, 1)) < 1e-2


@pytest.mark.parametrize("hq,hkv", [(4, 4), (8, 2)])
def test_full_attention_gradients_on_cuda_match_fp32_sdpa_per_sequence(hq, hkv):
    q, k, v, cu = _packed([300, 129, 64], hq, hkv, 64, seed=5)
    grad_out = torch.randn_like(q)
    inputs = [x.detach().requires_grad_() for x in (q, k, v)]
    full_attention(*inputs, cu_seqlens=cu).backward(grad_out)
    bounds = cu.tolist()
    for a, b in zip(bounds[:-1], bounds[1:]):
        ref_in = [x[a:b].float().transpose(0, 1).detach().requires_grad_() for x in (q, k, v)]
        ref = torch.nn.functional.scaled_dot_product_attention(*ref_in, is_causal=True, enable_gqa=hq != hkv)
        ref.backward(grad_out[a:b].float().transpose(0, 1))
        for name, got, want in zip(("dq", "dk", "dv"), inputs, ref_in):
            assert _rel(got.grad[a:b], want.grad.transpose(0, 1)) < 2e-2, name


def test_full_attention_on_packed_documents_keeps_k_and_v_with_their_own_heads():
    # GQA 32 / 8 at head dim 64 (the 1.1B recipes): what the backward keeps is q, k, v, the output and the
    # log-sum-exp, not K and V repeated to the query heads (4 Hq D elements per token instead of (2 Hq + 2 Hkv) D)
    q, k, v, cu = _packed([700, 324], 32, 8, 64, seed=6)
    inputs = [x.detach().requires_grad_() for x in (q, k, v)]
    saved = []

    def pack(tensor):
        saved.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = full_attention(*inputs, cu_seqlens=cu)
    kept = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in saved if t.is_cuda}
    tokens, hq, hkv, dim = q.shape[0], 32, 8, 64
    expected = tokens * (2 * hq + 2 * hkv) * dim * 2 + tokens * hq * 4  # bf16 q, k, v, out; fp32 lse
    assert sum(kept.values()) <= expected * 1.05, (sum(kept.values()), expected)
    out.backward(torch.ones_like(out))
    assert all(x.grad is not None and x.grad.shape == x.shape for x in inputs)


def test_varlen_backend_split_into_several_fa2_calls_matches_one_call(monkeypatch):
    q, k, v, cu = _packed([1500, 700], 8, 2, 64, seed=2)
    grad_out = torch.randn_like(q)
    results = []
    for limit in (varlen.MAX_CALL_ELEMENTS, 500 * 64):
        monkeypatch.setattr(varlen, "MAX_CALL_ELEMENTS", limit)
        inputs = [x.detach().requires_grad_() for x in (q, k, v)]
        out = moba_attention(*inputs, cu_seqlens=cu, block_size=64, topk=4, backend="varlen")
        out.backward(grad_out)
        results.append([out, *(x.grad for x in inputs)])
    for name, got, ref in zip(("out", "dq", "dk", "dv"), *results):
        assert _rel(got, ref) < 1e-2, name


def test_varlen_backend_with_suffix_queries_matches_torch_backend_outputs_and_grads():
    # Queries the last tokens of their sequences (a suffix starting mid-block; all keys; none).
    _, k, v, cu_k = _packed([700, 300, 90], 8, 2, 64, seed=3)
    lengths_q = [450, 300, 0]
    cu_q = torch.tensor([0, 450, 750, 750], dtype=torch.int32, device="cuda")
    q = torch.randn(750, 8, 64, device="cuda", dtype=torch.bfloat16)
    grad_out = torch.randn_like(q)
    results = []
    for backend, cast in (("varlen", lambda x: x), ("torch", lambda x: x.float())):
        inputs = [cast(x).detach().requires_grad_() for x in (q, k, v)]
        out = moba_attention(*inputs, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, block_size=64, topk=4, backend=backend)
        out.backward(grad_out.to(out.dtype))
        results.append([out, *(x.grad for x in inputs)])
    for name, got, ref in zip(("out", "dq", "dk", "dv"), *results):
        assert _rel(got, ref) < 2e-2, name
    assert sum(lengths_q) == q.shape[0]


def test_full_attention_on_cuda_with_suffix_queries_matches_fp32_naive():
    from moba_train.attention.naive import full_attention_naive

    _, k, v, cu_k = _packed([300, 129], 4, 2, 64, seed=4)
    cu_q = torch.tensor([0, 100, 229], dtype=torch.int32, device="cuda")
    q = torch.randn(229, 4, 64, device="cuda", dtype=torch.bfloat16)
    out = full_attention(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
    ref = full_attention_naive(q.float(), k.float(), v.float(), cu_seqlens=cu_q, cu_seqlens_k=cu_k)
    assert _rel(out, ref) < 1e-2
