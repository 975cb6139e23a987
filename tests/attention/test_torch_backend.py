"""The torch backend against the naive definition: outputs, q/k/v gradients and selections.

Grid: every (Hq, Hkv) in {(1,1),(4,4),(8,2),(8,1)} with every topk in {1,2,3,8} (16 cases, fp32); head dim
{32,64,128} and block size {16,32,64} cycle through those cases so that each value meets every head
layout and several top-k values. Each case packs four sequences: 9 blocks + 5 tokens (5 blocks + 5 tokens
for block 64; top-8 is a real choice for blocks 16 and 32), half a block (shorter than one block), exactly
2 blocks, and 1 block + 1 token. bf16 and fp16 run a smaller sample of the same grid. The full cross
product of the four axes (144 cases) runs in fp32 on shorter packed sequences.
"""

import itertools

import pytest
import torch

from moba_train.attention import moba_attention, moba_selection, torch_backend
from moba_train.attention.naive import moba_attention_naive, moba_selection_naive

HEADS = [(1, 1), (4, 4), (8, 2), (8, 1)]
TOPKS = [1, 2, 3, 8]
DIMS = [32, 64, 128]
BLOCKS = [16, 32, 64]
GRID = [
    (hq, hkv, DIMS[i % 3], BLOCKS[(i // 3) % 3], topk)
    for i, ((hq, hkv), topk) in enumerate(itertools.product(HEADS, TOPKS))
]


def packed(lengths, hq, hkv, dim, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    q = torch.randn(total, hq, dim, generator=gen).to(dtype)
    k = torch.randn(total, hkv, dim, generator=gen).to(dtype)
    v = torch.randn(total, hkv, dim, generator=gen).to(dtype)
    cu = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32)
    return q, k, v, cu


def grid_lengths(block):
    return [(9 if block <= 32 else 5) * block + 5, block // 2, 2 * block, block + 1]


def forward_backward(fn, q, k, v, grad_out, **kwargs):
    inputs = [x.detach().requires_grad_() for x in (q, k, v)]
    out = fn(*inputs, **kwargs)
    out.backward(grad_out)
    return [out, *(x.grad for x in inputs)]


def assert_rel_close(got, ref, rel, what):
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, ref):
        assert a.dtype == b.dtype, f"{what} {name} dtype"
        err = (a.float() - b.float()).abs().max() / b.float().abs().max()
        assert err <= rel, f"{what} {name}: max relative error {err:.2e} > {rel:.0e}"


def check_against_naive(lengths, hq, hkv, dim, block, topk, dtype, rel, shared=False, seed=0):
    q, k, v, cu = packed(lengths, hq, hkv, dim, dtype, seed)
    kwargs = dict(cu_seqlens=cu, block_size=block, topk=topk, shared_gqa_selection=shared)
    assert torch.equal(moba_selection(q, k, **kwargs), moba_selection_naive(q, k, **kwargs))
    grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
    got = forward_backward(moba_attention, q, k, v, grad_out, backend="torch", **kwargs)
    ref = forward_backward(moba_attention_naive, q, k, v, grad_out, **kwargs)
    assert_rel_close(got, ref, rel, f"{dtype} Hq={hq} Hkv={hkv} D={dim} B={block} k={topk}")


@pytest.mark.parametrize("hq,hkv,dim,block,topk", GRID)
def test_torch_backend_matches_naive_outputs_grads_and_selection_fp32(hq, hkv, dim, block, topk):
    check_against_naive(grid_lengths(block), hq, hkv, dim, block, topk, torch.float32, 1e-5)


@pytest.mark.parametrize("hq,hkv,dim,block,topk", GRID[1::4] + GRID[2::8])
def test_torch_backend_matches_naive_bf16(hq, hkv, dim, block, topk):
    check_against_naive(grid_lengths(block), hq, hkv, dim, block, topk, torch.bfloat16, 1.5e-2)


@pytest.mark.parametrize("hq,hkv,dim,block,topk", GRID[3::6])
def test_torch_backend_matches_naive_fp16(hq, hkv, dim, block, topk):
    check_against_naive(grid_lengths(block), hq, hkv, dim, block, topk, torch.float16, 5e-3)


@pytest.mark.parametrize("hq,hkv", [(8, 2), (4, 1)])
def test_shared_gqa_selection_matches_naive_and_is_identical_within_each_group(hq, hkv):
    check_against_naive([150, 70], hq, hkv, 32, 16, 3, torch.float32, 1e-5, shared=True)
    q, k, _, cu = packed([150, 70], hq, hkv, 32)
    selection = moba_selection(q, k, cu_seqlens=cu, block_size=16, topk=3, shared_gqa_selection=True)
    grouped = selection.view(selection.shape[0], hkv, hq // hkv, 3)
    assert torch.equal(grouped, grouped[:, :, :1].expand_as(grouped))
    per_head = moba_selection(q, k, cu_seqlens=cu, block_size=16, topk=3)
    assert not torch.equal(per_head, selection), "random data should make per-head selections differ somewhere"


def test_torch_backend_matches_naive_with_empty_sequences_and_custom_scale():
    q, k, v, cu = packed([0, 90, 0, 40, 0], 4, 2, 32)
    kwargs = dict(cu_seqlens=cu, block_size=16, topk=3, softmax_scale=0.3)
    grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(3))
    got = forward_backward(moba_attention, q, k, v, grad_out, backend="torch", **kwargs)
    ref = forward_backward(moba_attention_naive, q, k, v, grad_out, **kwargs)
    assert_rel_close(got, ref, 1e-5, "empty sequences")


def test_many_small_chunks_give_the_same_selection_and_output(monkeypatch):
    """Chunks that start and end inside sequences and span sequence boundaries change nothing."""
    q, k, v, cu = packed([70, 33, 90, 5], 4, 2, 32)
    kwargs = dict(cu_seqlens=cu, block_size=16, topk=3)
    ref_sel = moba_selection_naive(q, k, **kwargs)
    grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(4))
    ref = forward_backward(moba_attention_naive, q, k, v, grad_out, **kwargs)
    monkeypatch.setattr(torch_backend, "CHUNK_ELEMENTS_CPU", 4 * 16 * 32 * 7)  # 7 tokens per chunk
    assert torch.equal(moba_selection(q, k, **kwargs), ref_sel)
    got = forward_backward(moba_attention, q, k, v, grad_out, backend="torch", **kwargs)
    assert_rel_close(got, ref, 1e-5, "small chunks")


FULL_GRID = list(itertools.product(HEADS, DIMS, BLOCKS, TOPKS))
FULL_GRID_IDS = [f"{h[0]}-{h[1]}-{d}-{b}-{t}" for h, d, b, t in FULL_GRID]


@pytest.mark.parametrize("heads,dim,block,topk", FULL_GRID, ids=FULL_GRID_IDS)
def test_torch_backend_matches_naive_on_the_full_grid_fp32(heads, dim, block, topk):
    # Every combination of the grid, on shorter packed sequences: 4 blocks + 3 tokens (a partial
    # last block), half a block, exactly one block.
    check_against_naive([4 * block + 3, block // 2, block], *heads, dim, block, topk, torch.float32, 1e-5)


def test_one_kv_head_and_a_single_block_matches_naive():
    # [blocks * heads * block, D] key rows are a view only when the padded blocks are contiguous: with one
    # block and one KV head the transposed padding is not, which once broke the backend.
    gen = torch.Generator().manual_seed(12)
    q, k, v = (torch.randn(48, h, 8, generator=gen) for h in (2, 1, 1))
    cu = torch.tensor([0, 48], dtype=torch.int32)
    got = moba_attention(q, k, v, cu_seqlens=cu, block_size=64, topk=1, backend="torch")
    want = moba_attention_naive(q, k, v, cu_seqlens=cu, block_size=64, topk=1)
    assert (got - want).abs().max() < 1e-5
