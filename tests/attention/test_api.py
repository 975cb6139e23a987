"""The public attention API: equivalences with full causal attention and SDPA, packing, selection
properties, backend choice and input validation."""

import itertools

import pytest
import torch
import torch.nn.functional as F

from moba_train.attention import auto_backend, full_attention, moba_attention, moba_selection
from moba_train.attention.naive import NO_BLOCK, full_attention_naive, moba_attention_naive


def packed(lengths, hq, hkv, dim, dtype=torch.float32, seed=0, grad=False):
    gen = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    q, k, v = (torch.randn(total, h, dim, generator=gen).to(dtype).requires_grad_(grad) for h in (hq, hkv, hkv))
    cu = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32)
    return q, k, v, cu


def rel_err(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def sdpa_per_sequence(q, k, v, cu):
    bounds = cu.tolist()
    parts = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        q_s, k_s, v_s = (x[a:b].transpose(0, 1) for x in (q, k, v))
        group = q.shape[1] // k.shape[1]
        k_s, v_s = k_s.repeat_interleave(group, 0), v_s.repeat_interleave(group, 0)
        parts.append(F.scaled_dot_product_attention(q_s, k_s, v_s, is_causal=True).transpose(0, 1))
    return torch.cat(parts)


@pytest.mark.parametrize("backend", ["torch", "naive"])
@pytest.mark.parametrize("hq,hkv", [(4, 4), (8, 2)])
def test_topk_at_least_num_blocks_equals_full_attention_and_sdpa_causal(backend, hq, hkv):
    lengths = [100, 37, 64, 5]
    q, k, v, cu = packed(lengths, hq, hkv, 32)
    out = moba_attention(q, k, v, cu_seqlens=cu, block_size=16, topk=7, backend=backend)  # 7 blocks at most
    assert rel_err(out, full_attention(q, k, v, cu_seqlens=cu)) < 1e-5
    assert rel_err(out, sdpa_per_sequence(q, k, v, cu)) < 1e-5


@pytest.mark.parametrize("lengths", [[64, 64, 64], [50, 0, 130, 3], [77]])
@pytest.mark.parametrize("hq,hkv", [(4, 4), (4, 1)])
def test_full_attention_matches_sdpa_per_sequence_and_naive_with_grads(lengths, hq, hkv):
    q, k, v, cu = packed(lengths, hq, hkv, 32, grad=True)
    grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(1))
    results = []
    for fn in (full_attention, full_attention_naive):
        out = fn(q, k, v, cu_seqlens=cu, softmax_scale=0.2)
        results.append([out, *torch.autograd.grad(out, (q, k, v), grad_out)])
    for got, ref in zip(*results):
        assert rel_err(got, ref) < 1e-5


def test_packed_batch_equals_each_sequence_alone_outputs_and_grads():
    lengths = [90, 17, 130]
    q, k, v, cu = packed(lengths, 4, 2, 32, grad=True)
    grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(2))
    kwargs = dict(block_size=16, topk=3, backend="torch")
    out = moba_attention(q, k, v, cu_seqlens=cu, **kwargs)
    packed_grads = torch.autograd.grad(out, (q, k, v), grad_out)
    bounds = cu.tolist()
    for a, b in zip(bounds[:-1], bounds[1:]):
        q_s, k_s, v_s = (x[a:b].detach().requires_grad_() for x in (q, k, v))
        alone = moba_attention(q_s, k_s, v_s, cu_seqlens=torch.tensor([0, b - a], dtype=torch.int32), **kwargs)
        alone_grads = torch.autograd.grad(alone, (q_s, k_s, v_s), grad_out[a:b])
        assert rel_err(out[a:b], alone) < 1e-6
        for got, ref in zip(packed_grads, alone_grads):
            assert rel_err(got[a:b], ref) < 1e-6


@pytest.mark.parametrize("topk", [1, 2, 4, 20])
def test_selection_has_current_block_no_future_block_and_min_topk_blocks(topk):
    lengths = [150, 40, 16]
    block = 16
    q, k, _, cu = packed(lengths, 4, 2, 32)
    selection = moba_selection(q, k, cu_seqlens=cu, block_size=block, topk=topk)
    assert selection.dtype == torch.int32 and selection.shape == (sum(lengths), 4, topk)
    local = torch.cat([torch.arange(n) for n in lengths])
    current = (local // block)[:, None].expand(-1, 4)
    real = selection != NO_BLOCK
    count = real.sum(-1)
    assert torch.equal(count, torch.clamp(current + 1, max=topk))
    assert torch.equal(selection.gather(-1, (count - 1)[..., None])[..., 0], current)  # current block last
    assert bool((selection <= current[..., None]).all())
    assert bool((selection[real] >= 0).all())
    ascending = selection[..., 1:] > selection[..., :-1]
    assert bool((ascending | ~real[..., 1:]).all())
    assert bool((real[..., :-1] | ~real[..., 1:]).all()), "padding only at the end"


def test_selection_picks_the_highest_gate_scores():
    q, k, _, cu = packed([160], 2, 1, 16, seed=5)
    selection = moba_selection(q, k, cu_seqlens=cu, block_size=16, topk=3)
    means = k.view(10, 16, 1, 16).mean(1)[:, 0]  # [blocks, D]
    scores = q @ means.t()  # [T, Hq, blocks]
    for t, h in [(159, 0), (159, 1), (100, 0), (40, 1)]:
        earlier = scores[t, h, : t // 16]
        expected = sorted(earlier.topk(2).indices.tolist()) + [t // 16]
        assert selection[t, h].tolist() == expected


def test_selection_ties_go_to_the_lower_block_index():
    block, topk = 8, 3
    q = torch.ones(64, 1, 4)
    k = torch.ones(64, 1, 4)  # every block has the same mean key: all gate scores tie
    cu = torch.tensor([0, 64], dtype=torch.int32)
    selection = moba_selection(q, k, cu_seqlens=cu, block_size=block, topk=topk)
    assert selection[63, 0].tolist() == [0, 1, 7]
    assert selection[20, 0].tolist() == [0, 1, 2]


def test_auto_backend_uses_naive_for_tiny_cpu_inputs_and_torch_otherwise():
    assert auto_backend(torch.device("cpu"), torch.float32, 128, 4, 64, 64) == "naive"
    assert auto_backend(torch.device("cpu"), torch.float32, 4096, 4, 64, 64) == "torch"
    q, k, v, cu = packed([300], 4, 4, 32)
    auto = moba_attention(q, k, v, cu_seqlens=cu, block_size=32, topk=3)
    assert rel_err(auto, moba_attention_naive(q, k, v, cu_seqlens=cu, block_size=32, topk=3)) < 1e-5


def test_gate_gives_no_gradient_but_q_and_k_get_gradients_through_attention():
    q, k, v, cu = packed([64], 2, 2, 16, grad=True)
    out = moba_attention(q, k, v, cu_seqlens=cu, block_size=16, topk=2, backend="torch")
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    ref = torch.autograd.grad(moba_attention_naive(q, k, v, cu_seqlens=cu, block_size=16, topk=2).sum(), (q, k, v))
    for got, expected in zip(grads, ref):
        assert got.abs().sum() > 0 and rel_err(got, expected) < 1e-5


def _good():
    q, k, v, cu = packed([20, 12], 4, 2, 8)
    return dict(q=q, k=k, v=v, cu_seqlens=cu, block_size=8, topk=2)


BAD_INPUTS = [
    ("topk", dict(topk=0)),
    ("block_size", dict(block_size=0)),
    ("multiple", dict(k=torch.randn(32, 3, 8), v=torch.randn(32, 3, 8))),
    ("head dim", dict(k=torch.randn(32, 2, 4), v=torch.randn(32, 2, 4))),
    ("token count", dict(k=torch.randn(30, 2, 8), v=torch.randn(30, 2, 8))),
    ("same shape", dict(v=torch.randn(32, 2, 4))),
    ("3-D", dict(q=torch.randn(32, 32))),
    ("int32", dict(cu_seqlens=torch.tensor([0, 20, 32], dtype=torch.int64))),
    ("1-D", dict(cu_seqlens=torch.tensor([[0, 20, 32]], dtype=torch.int32))),
    ("start at 0", dict(cu_seqlens=torch.tensor([2, 20, 32], dtype=torch.int32))),
    ("monotonic", dict(cu_seqlens=torch.tensor([0, 25, 20, 32], dtype=torch.int32))),
    ("total_tokens", dict(cu_seqlens=torch.tensor([0, 20, 31], dtype=torch.int32))),
    ("device", dict(cu_seqlens=torch.tensor([0, 20, 32], dtype=torch.int32, device="meta"))),
    ("unsupported dtype", dict(q=torch.randn(32, 4, 8, dtype=torch.float64))),
    ("share one dtype", dict(k=torch.randn(32, 2, 8, dtype=torch.bfloat16))),
    ("backend must be one of", dict(backend="flash")),
    ("not available", dict(backend="varlen")),
    ("block_size must be an int", dict(block_size=8.0)),
    ("block_size must be an int", dict(block_size=None)),
    ("topk must be an int", dict(topk=2.5)),
    ("topk must be an int", dict(topk=None)),
    ("softmax_scale must be a finite positive number", dict(softmax_scale=float("nan"))),
    ("softmax_scale must be a finite positive number", dict(softmax_scale=0.0)),
    ("softmax_scale must be a finite positive number", dict(softmax_scale=-1.0)),
    ("at least one head", dict(k=torch.randn(32, 0, 8), v=torch.randn(32, 0, 8))),
]


def test_a_numpy_softmax_scale_is_a_number_like_any_other():
    import numpy as np

    args = _good()
    q, k, v = args.pop("q"), args.pop("k"), args.pop("v")
    expected = moba_attention(q, k, v, softmax_scale=0.25, **args)
    torch.testing.assert_close(moba_attention(q, k, v, softmax_scale=np.float32(0.25), **args), expected)


@pytest.mark.parametrize("match,change", BAD_INPUTS, ids=[m for m, _ in BAD_INPUTS])
def test_moba_attention_rejects_bad_input_with_a_value_error_naming_the_rule(match, change):
    args = {**_good(), **change}
    with pytest.raises(ValueError, match=match):
        moba_attention(args.pop("q"), args.pop("k"), args.pop("v"), **args)


BAD_SELECTION_INPUTS = BAD_INPUTS[:3] + BAD_INPUTS[7:13] + BAD_INPUTS[17:21]


@pytest.mark.parametrize("match,change", BAD_SELECTION_INPUTS, ids=[m for m, _ in BAD_SELECTION_INPUTS])
def test_moba_selection_rejects_bad_input_with_a_value_error_naming_the_rule(match, change):
    args = {**_good(), **change}
    del args["v"]
    with pytest.raises(ValueError, match=match):
        moba_selection(args.pop("q"), args.pop("k"), **args)


def test_triton_backend_on_cpu_without_interpreter_is_rejected(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    args = _good()
    with pytest.raises(ValueError, match="triton"):
        moba_attention(args.pop("q"), args.pop("k"), args.pop("v"), backend="triton", **args)


def test_cu_seqlens_are_read_once_per_tensor_and_again_after_an_in_place_write(monkeypatch):
    # Reading a CUDA cu_seqlens is a host sync: every layer of a step passes the same tensor, so only
    # the first read may happen; an in-place write (a new version) must be seen, and still validated.
    reads = []
    real = torch.Tensor.tolist

    def counting_tolist(self):
        reads.append(self)
        return real(self)

    monkeypatch.setattr(torch.Tensor, "tolist", counting_tolist)
    q, k, v = (torch.randn(32, 2, 8) for _ in range(3))
    cu = torch.tensor([0, 20, 32], dtype=torch.int32)
    first = moba_attention(q, k, v, cu_seqlens=cu, block_size=8, topk=2, backend="torch")
    again = moba_attention(q, k, v, cu_seqlens=cu, block_size=8, topk=2, backend="torch")
    assert len([r for r in reads if r is cu]) == 1 and torch.equal(first, again)
    cu[1] = 12
    moved = moba_attention(q, k, v, cu_seqlens=cu, block_size=8, topk=2, backend="torch")
    want = moba_attention_naive(q, k, v, cu_seqlens=torch.tensor([0, 12, 32], dtype=torch.int32), block_size=8, topk=2)
    assert len([r for r in reads if r is cu]) == 2 and torch.allclose(moved, want, atol=1e-5)
    cu[1] = 40
    with pytest.raises(ValueError, match="monotonic"):
        moba_attention(q, k, v, cu_seqlens=cu, block_size=8, topk=2, backend="torch")


@pytest.mark.parametrize("where", ["past block", "current block"])
def test_nan_in_the_keys_gives_the_same_outputs_in_the_torch_backend_as_the_definition(where):
    # A NaN key makes its block's mean and gate scores NaN: the block is never chosen for a past slot
    # (naive.py, rule 4), and queries whose own block holds it attend a NaN. Every backend must agree
    # with the definition on which outputs are NaN and on the others' values.
    q, k, v, cu = packed([160, 48], 4, 2, 16, seed=11)
    k[5 if where == "past block" else 150, 1, 3] = float("nan")
    kwargs = dict(cu_seqlens=cu, block_size=16, topk=3)
    want = moba_attention_naive(q, k, v, **kwargs)
    got = moba_attention(q, k, v, backend="torch", **kwargs)
    assert torch.equal(got.isnan(), want.isnan())
    finite = ~want.isnan()
    assert finite.any() and (got[finite] - want[finite]).abs().max() < 1e-5
    assert torch.equal(moba_selection(q, k, backend="torch", **kwargs), moba_selection(q, k, backend="naive", **kwargs))
