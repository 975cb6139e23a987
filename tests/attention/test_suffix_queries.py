"""The widened attention contract: queries that are a suffix of their keys (cu_seqlens_q != cu_seqlens_k,
bottom-right causal), the log-sum-exp output, and a selection handed to the attention.

References: the rows of the same sequence computed as ordinary self-attention (a suffix of queries must
see exactly what those queries see when every token is a query), a direct logsumexp of scaled logits,
and SDPA with an explicit mask."""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from moba_train.attention import full_attention, moba_attention, moba_selection

# (key lengths, query lengths): a suffix starting mid-block, all keys as queries, a sequence without
# queries, and the context-parallel shape (two chunks of one 128-token sequence with their prefixes).
CASES = [([100, 7, 93, 40], [37, 7, 0, 40]), ([64, 128], [32, 32])]


def offsets(lengths):
    return torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32)


def suffix_of_full(lengths_k, lengths_q, hq, hkv, dim, seed=0):
    """Full sequences (every token a query) and the suffix-query view of the same tensors: (q_full, k, v,
    cu_k, q_suffix, cu_q, rows) with q_suffix = q_full[rows]."""
    gen = torch.Generator().manual_seed(seed)
    cu_k = offsets(lengths_k)
    q_full, k, v = (torch.randn(cu_k[-1].item(), h, dim, generator=gen) for h in (hq, hkv, hkv))
    rows = torch.cat([torch.arange(b - n, b) for b, n in zip(cu_k[1:].tolist(), lengths_q)])
    return q_full, k, v, cu_k, q_full[rows].clone(), offsets(lengths_q), rows


def rel_err(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30)).item()


@pytest.mark.parametrize("backend", ["naive", "torch"])
@pytest.mark.parametrize("lengths_k, lengths_q", CASES)
def test_suffix_queries_see_what_they_see_as_rows_of_the_whole_sequence(backend, lengths_k, lengths_q):
    q_full, k, v, cu_k, q, cu_q, rows = suffix_of_full(lengths_k, lengths_q, 4, 2, 16)
    kwargs = dict(block_size=16, topk=3, backend=backend)
    whole = moba_attention(q_full, k, v, cu_seqlens=cu_k, **kwargs)
    out = moba_attention(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, **kwargs)
    assert out.shape == q.shape and rel_err(out, whole[rows]) < 1e-6
    sel_whole = moba_selection(q_full, k, cu_seqlens=cu_k, block_size=16, topk=3, backend=backend)
    sel = moba_selection(q, k, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, block_size=16, topk=3, backend=backend)
    assert torch.equal(sel, sel_whole[rows])


@pytest.mark.parametrize("lengths_k, lengths_q", CASES)
@pytest.mark.parametrize("hq, hkv", [(4, 2), (2, 2)])
def test_torch_backend_matches_naive_with_suffix_queries_outputs_lse_and_grads(lengths_k, lengths_q, hq, hkv):
    _, k, v, cu_k, q, cu_q, _ = suffix_of_full(lengths_k, lengths_q, hq, hkv, 16, seed=3)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    gen = torch.Generator().manual_seed(4)
    dout, dlse = torch.randn(q.shape, generator=gen), torch.randn(q.shape[:2], generator=gen)
    results = []
    for backend in ("torch", "naive"):
        out, lse = moba_attention(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, block_size=16, topk=3,
                                  backend=backend, return_lse=True)
        results.append([out, lse, *torch.autograd.grad((out, lse), (q, k, v), (dout, dlse))])
    for name, got, want in zip(("out", "lse", "dq", "dk", "dv"), *results):
        assert rel_err(got, want) < 1e-5, name


@pytest.mark.parametrize("backend", ["naive", "torch"])
def test_lse_equals_a_direct_logsumexp_of_the_attended_scaled_logits(backend):
    # topk covering every block: MoBA is causal attention, so lse is logsumexp over keys <= position.
    _, k, v, cu_k, q, cu_q, _ = suffix_of_full([100, 64], [37, 32], 2, 1, 8, seed=5)
    _, lse = moba_attention(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, block_size=16, topk=10, backend=backend,
                            softmax_scale=0.3, return_lse=True)
    want = []
    for qa, qb, ka, kb in zip(cu_q[:-1].tolist(), cu_q[1:].tolist(), cu_k[:-1].tolist(), cu_k[1:].tolist()):
        logits = torch.einsum("thd,shd->ths", q[qa:qb], k[ka:kb].repeat_interleave(2, 1)) * 0.3
        pos = torch.arange(kb - ka - (qb - qa), kb - ka)
        logits = logits.masked_fill(torch.arange(kb - ka)[None, None, :] > pos[:, None, None], -math.inf)
        want.append(torch.logsumexp(logits, -1))
    assert rel_err(lse, torch.cat(want)) < 1e-6


@pytest.mark.parametrize("backend", ["naive", "torch"])
def test_given_selection_is_attended_instead_of_the_gate(backend):
    _, k, v, cu_k, q, cu_q, _ = suffix_of_full([100, 64], [37, 32], 4, 2, 16, seed=7)
    kw = dict(cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, block_size=16, topk=3)
    gate = moba_selection(q, k, **kw)
    # Every query keeps only its current block: single-block causal attention, whatever the gate says.
    current = gate.gather(-1, (gate >= 0).sum(-1, keepdim=True) - 1)
    only_current = torch.cat([current, torch.full_like(gate[..., 1:], -1)], -1)
    out = moba_attention(q, k, v, backend=backend, selection=only_current, **kw)
    ref = moba_attention(q, k, v, backend="naive", **{**kw, "topk": 1})
    assert rel_err(out, ref) < 1e-6
    assert rel_err(moba_attention(q, k, v, backend=backend, selection=gate, **kw),
                   moba_attention(q, k, v, backend="naive", **kw)) < 1e-6


@pytest.mark.parametrize("hq, hkv", [(4, 4), (4, 2)])
def test_full_attention_with_suffix_queries_matches_sdpa_with_a_bottom_right_mask(hq, hkv):
    _, k, v, cu_k, q, cu_q, _ = suffix_of_full([100, 7, 64], [37, 7, 32], hq, hkv, 16, seed=8)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    out = full_attention(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
    parts = []
    for qa, qb, ka, kb in zip(cu_q[:-1].tolist(), cu_q[1:].tolist(), cu_k[:-1].tolist(), cu_k[1:].tolist()):
        pos = torch.arange(kb - ka - (qb - qa), kb - ka)
        mask = torch.arange(kb - ka)[None, :] <= pos[:, None]
        k_s, v_s = (x[ka:kb].repeat_interleave(hq // hkv, 1).transpose(0, 1) for x in (k, v))
        parts.append(F.scaled_dot_product_attention(q[qa:qb].transpose(0, 1), k_s, v_s, attn_mask=mask).transpose(0, 1))
    ref = torch.cat(parts)
    assert rel_err(out, ref) < 1e-5
    gen = torch.Generator().manual_seed(9)
    dout = torch.randn(out.shape, generator=gen)
    for got, want in zip(torch.autograd.grad(out, (q, k, v), dout), torch.autograd.grad(ref, (q, k, v), dout)):
        assert rel_err(got, want) < 1e-5


def _args():
    _, k, v, cu_k, q, cu_q, _ = suffix_of_full([20, 12], [8, 12], 4, 2, 8)
    return dict(q=q, k=k, v=v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, block_size=8, topk=2)


BAD = [
    ("either cu_seqlens or", dict(cu_seqlens=offsets([20, 12]))),
    ("both cu_seqlens_q and cu_seqlens_k", dict(cu_seqlens_k=None)),
    ("same number of sequences", dict(cu_seqlens_k=offsets([32]))),
    ("only 12 keys", dict(cu_seqlens_q=offsets([6, 14]), q=torch.randn(20, 4, 8))),
    ("int32 tensor of shape", dict(selection=torch.zeros(20, 4, 2, dtype=torch.int64))),
    ("selection must be", dict(selection=torch.zeros(20, 4, 3, dtype=torch.int32))),
]


@pytest.mark.parametrize("match, change", BAD, ids=[m for m, _ in BAD])
def test_bad_suffix_inputs_get_a_value_error_naming_the_rule(match, change):
    args = {**_args(), **change}
    with pytest.raises(ValueError, match=match):
        moba_attention(args.pop("q"), args.pop("k"), args.pop("v"), **args)


def test_more_query_tokens_than_key_tokens_is_refused():
    args = _args()
    with pytest.raises(ValueError, match="more tokens"):
        moba_attention(torch.randn(40, 4, 8), args["k"], args["v"], cu_seqlens_q=offsets([20, 20]),
                       cu_seqlens_k=args["cu_seqlens_k"], block_size=8, topk=2)


def test_host_offsets_spare_every_device_read(monkeypatch):
    args = _args()
    reads = []
    real = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda self: reads.append(self) or real(self))
    host = (args["cu_seqlens_q"].numpy().tolist(), args["cu_seqlens_k"].numpy().tolist())
    out = moba_attention(args.pop("q"), args.pop("k"), args.pop("v"), host_cu_seqlens=host, backend="torch", **args)
    assert out.shape == (20, 4, 8)
    assert not [r for r in reads if r is args["cu_seqlens_q"] or r is args["cu_seqlens_k"]]
