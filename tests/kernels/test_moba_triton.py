"""Triton MoBA kernels against the naive definition: compiled on a CUDA machine, under the Triton
interpreter on CPU (conftest.py sets it up).

The interpreter's bf16 tl.dot is wrong (triton 3.6), so attention is checked in fp16 here (and in bf16
on the GPU by scripts/bench_kernels.py); gating casts to fp32 and is checked in bf16 too.
"""

import pytest
import torch
from moba_train.kernels import moba_attention_triton, moba_selection_triton, workspace
from moba_train.kernels.layout import block_layout

from moba_train.attention.naive import moba_attention_naive, moba_selection_naive

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

# (cu_seqlens, Hq, Hkv, D, block, topk, shared_gqa_selection): varlen with a 7-token sequence and
# partial last blocks, GQA (groups of 2 and 3), a block size that is not a power of two, topk larger than the blocks.
CASES = [
    ([0, 100, 107, 200], 4, 2, 32, 16, 3, False),
    ([0, 150], 2, 1, 64, 48, 2, False),
    ([0, 90, 170], 4, 2, 16, 16, 8, True),
    ([0, 130, 200], 6, 2, 16, 32, 3, False),  # a GQA group of 3 (the quality study's 12 / 4 heads)
]
# Block 512: 128-row gathered query tiles (forward, dQ in 64-row sub-tiles) and 128-key dK/dV tiles;
# a partial last block and more than 128 queries per past-block segment (two query tiles).
LARGE_BLOCKS = ([0, 1100], 1, 1, 16, 512, 2, False)


def inputs(cu, hq, hkv, dim, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    total = cu[-1]
    q = torch.randn(total, hq, dim, generator=gen).to(dtype)
    k = torch.randn(total, hkv, dim, generator=gen).to(dtype)
    v = torch.randn(total, hkv, dim, generator=gen).to(dtype)
    return q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), torch.tensor(cu, dtype=torch.int32, device=DEVICE)


def assert_close_to_naive(out, grads, ref, ref_grads):
    """fp16 inputs, fp32 accumulation, fp16 running output: a few fp16 ulps relative to the scale."""
    for name, got, want in [("out", out, ref), *zip(("dq", "dk", "dv"), grads, ref_grads)]:
        err = (got.float() - want).abs().max() / want.abs().max()
        assert err < 4e-3, f"{name}: max error {err:.2e} relative to the largest value"


def attention_matches_naive(q, k, v, cu_t, block, topk, **kwargs):
    """The Triton attention's output and gradients (for a seeded dO) against the naive definition's in fp32;
    returns the Triton output."""
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    out = moba_attention_triton(q, k, v, cu_t, block, topk, **kwargs)
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE, out.dtype)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    ref = moba_attention_naive(q.float(), k.float(), v.float(), cu_seqlens=cu_t, block_size=block, topk=topk, **kwargs)
    ref_grads = torch.autograd.grad(ref, (q, k, v), dout.float())
    assert out.shape == ref.shape
    assert_close_to_naive(out, grads, ref, ref_grads)
    return out


# More than one chunk of 64 candidate blocks: the running top-k merges across chunks.
MANY_BLOCKS = ([0, 1056], 1, 1, 16, 16, 4, False)


@pytest.mark.parametrize(
    "case, dtype",
    [(case, dtype) for case in CASES for dtype in (torch.bfloat16, torch.float32)] + [(MANY_BLOCKS, torch.float32)],
)
def test_selection_equals_naive_exactly(case, dtype):
    cu, hq, hkv, dim, block, topk, shared = case
    q, k, _, cu_t = inputs(cu, hq, hkv, dim, dtype)
    got = moba_selection_triton(q, k, cu_t, block, topk, shared)
    want = moba_selection_naive(q, k, cu_seqlens=cu_t, block_size=block, topk=topk, shared_gqa_selection=shared)
    assert got.dtype == torch.int32 and torch.equal(got, want)


def test_selection_ties_go_to_lower_block_index():
    # Identical keys everywhere: every earlier block scores the same, so the lowest indices win. The
    # queries are small integers, so every score is exact whatever the order of its sums (random floats
    # tie only in exact arithmetic: under Triton 3.8's interpreter, numpy's matrix product summed some
    # columns of a tile in another order, and blocks 8 and 9 out-scored 0 and 1 by an ulp).
    cu, hq, hkv, dim, block, topk = [0, 1056], 1, 1, 16, 16, 3
    _, _, _, cu_t = inputs(cu, hq, hkv, dim, torch.float32)
    q = torch.randint(-4, 5, (cu[-1], hq, dim), generator=torch.Generator().manual_seed(0)).float().to(DEVICE)
    k = torch.ones(cu[-1], hkv, dim, device=DEVICE)
    got = moba_selection_triton(q, k, cu_t, block, topk)
    want = moba_selection_naive(q, k, cu_seqlens=cu_t, block_size=block, topk=topk)
    assert torch.equal(got, want)
    assert got[1055, 0].tolist() == [0, 1, 65]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_selection_resolves_gate_scores_finer_than_the_input_dtype(dtype):
    # Block 1's mean key exceeds block 0's by 2^-11 per dimension (one key row of 1 + 2^-7 among 16):
    # the means round to the same bf16, so a gate that rounds them to the input dtype ties and picks
    # block 0; the fp32 definition picks block 1.
    cu, dim, block = [0, 48], 16, 16
    k = torch.ones(48, 1, dim)
    k[16] = 1 + 2**-7
    q = torch.ones(48, 1, dim)
    q, k, cu_t = q.to(DEVICE, dtype), k.to(DEVICE, dtype), torch.tensor(cu, dtype=torch.int32, device=DEVICE)
    got = moba_selection_triton(q, k, cu_t, block, 2)
    want = moba_selection_naive(q, k, cu_seqlens=cu_t, block_size=block, topk=2)
    assert torch.equal(got, want)
    assert got[40, 0].tolist() == [1, 2]


# How the past picks run (kernels/workspace.py): all KV heads in one workspace chunk, one KV head
# per chunk, or slot passes without a workspace.
PASSES = {"workspace": (1e9, None), "workspace_per_kv_head": (1e9, 1), "slots": (0.0, None)}


@pytest.mark.parametrize("passes", list(PASSES))
@pytest.mark.parametrize("case", CASES + [LARGE_BLOCKS])
def test_attention_output_and_gradients_match_naive(case, passes, monkeypatch):
    budget, max_heads = PASSES[passes]
    for name in ("INFERENCE_BUDGET", "TRAINING_BUDGET"):
        monkeypatch.setattr(workspace, name, budget)
    monkeypatch.setattr(workspace, "FORWARD_MAX_BLOCK", 1 << 30)
    monkeypatch.setattr(workspace, "MAX_CHUNK_KV_HEADS", max_heads)
    cu, hq, hkv, dim, block, topk, shared = case
    q, k, v, cu_t = inputs(cu, hq, hkv, dim, torch.float16)
    out = attention_matches_naive(q, k, v, cu_t, block, topk, shared_gqa_selection=shared)
    assert out.dtype == torch.float16


def test_head_dim_64_blocks_of_one_256_key_tile_match_naive():
    """Head dim 64 with blocks of 256 keys, GQA 3 (the quality study's heads at block 256, top-6 in
    bench/h200_session18.sh moba256): one 256-key dK/dV program per block, which writes the block's causal dQ
    itself; a partial last block."""
    q, k, v, cu_t = inputs([0, 1100], 3, 1, 64, torch.float16)
    attention_matches_naive(q, k, v, cu_t, 256, 3)


def test_attention_rejects_fp32_with_a_clear_error():
    q, k, v, cu_t = inputs([0, 32], 2, 2, 16, torch.float32)
    with pytest.raises(TypeError, match="bf16 or fp16"):
        moba_attention_triton(q, k, v, cu_t, 16, 2)


def test_attention_rejects_cu_seqlens_not_covering_all_tokens():
    q, k, v, _ = inputs([0, 32], 2, 2, 16, torch.float16)
    with pytest.raises(ValueError, match="cu_seqlens_q must end at the token count 32"):
        moba_attention_triton(q, k, v, torch.tensor([0, 16], dtype=torch.int32, device=DEVICE), 16, 2)


def test_inference_forward_matches_naive_in_every_pass_mode(monkeypatch):
    # No gradients: the forward plans with the inference budget (kernels/workspace.py).
    cu, hq, hkv, dim, block, topk, shared = CASES[0]
    q, k, v, cu_t = inputs(cu, hq, hkv, dim, torch.float16)
    ref = moba_attention_naive(q.float(), k.float(), v.float(), cu_seqlens=cu_t, block_size=block, topk=topk)
    for budget in (1e9, 0.0):
        monkeypatch.setattr(workspace, "INFERENCE_BUDGET", budget)
        with torch.no_grad():
            out = moba_attention_triton(q, k, v, cu_t, block, topk)
        assert (out.float() - ref).abs().max() / ref.abs().max() < 4e-3


def test_workspace_plans_follow_budgets_and_fall_back_to_slot_passes():
    # 32K tokens, 16 heads, D 128, top-8 (the s32k-b128 shape): one KV head's forward partials are
    # 32768 * 7 * (256 + 4) bytes = 0.44x q, its backward partials (7 rows per query) 0.44x q; the
    # training budget is 3x q, the inference budget 0.25x q.
    q = torch.empty(32768, 16, 128, dtype=torch.bfloat16, device="meta")
    assert workspace.forward_plan(q, 16, 7, 128, training=True).kv_heads == 6
    assert workspace.forward_plan(q, 16, 7, 128, training=False).kv_heads == 0  # 0.25x q: slot passes
    assert workspace.forward_plan(q, 16, 7, 512, training=True).kv_heads == 0  # blocks >= 512: slot passes
    assert workspace.forward_plan(q, 16, 0, 128, training=True).kv_heads == 0  # top-1: nothing past
    bwd = workspace.backward_plan(q, 16, 7, 1)
    assert (bwd.kv_heads, bwd.capacity, bwd.dtype) == (6, 32768 * 7, torch.bfloat16)
    assert workspace.backward_plan(q, 16, 2, 4).kv_heads == 6  # block 512, top-3: 2 * 4 rows per query
    assert workspace.backward_plan(q, 16, 11, 32).kv_heads == 0  # block 4096: slot passes
    gqa = torch.empty(32768, 32, 128, dtype=torch.bfloat16, device="meta")
    assert workspace.backward_plan(gqa, 8, 7, 1).kv_heads == 3  # a KV head's capacity counts its 4 query heads


def naive_layout(cu, block):
    """(start, length, local, first) of every block, by walking the sequences."""
    rows, first = [], 0
    for a, b in zip(cu[:-1], cu[1:]):
        blocks = list(range(a, b, block))
        rows += [(s, min(block, b - s), i, first) for i, s in enumerate(blocks)]
        first += len(blocks)
    return rows


def test_block_layout_matches_a_walk_and_is_cached_per_tensor_version():
    cu = torch.tensor([0, 100, 107, 107, 200], dtype=torch.int32, device=DEVICE)  # an empty sequence too
    layout = block_layout(cu, cu, 16, 200, 200, DEVICE)
    got = list(zip(*(t.tolist() for t in layout[:4])))
    assert got == naive_layout(cu.tolist(), 16) and layout.num_blocks == len(got)
    local = layout.local.tolist()
    assert sorted(range(len(local)), key=lambda b: (local[b], b)) == layout.order.tolist()
    assert torch.equal(layout.q_start, layout.start) and torch.equal(layout.q_len, layout.length)
    assert not layout.q_offset.any() and not layout.suffix  # self-attention: every block's queries are its keys
    assert block_layout(cu, cu, 16, 200, 200, DEVICE) is layout  # same tensor, same version: cached
    cu[1] = 90  # in place: the version counter moves, the layout is rebuilt
    rebuilt = block_layout(cu, cu, 16, 200, 200, DEVICE)
    assert list(zip(*(t.tolist() for t in rebuilt[:4]))) == naive_layout(cu.tolist(), 16)


@pytest.mark.parametrize("keys", ["run_int16", "run_int32", "slot"])
def test_routing_groups_every_past_pick_under_its_block(keys, monkeypatch):
    # Routing against a direct walk of the selection: every (KV head, block) run holds exactly the
    # picks of that block (run keys: ascending pick ids; slot keys: one segment per slot, in order).
    from moba_train.kernels import routing

    if keys == "run_int32":
        monkeypatch.setattr(routing, "SHORT_KEYS_MAX", 0)
    cu, hq, hkv, dim, block, topk, _ = CASES[0]
    q, k, _, cu_t = inputs(cu, hq, hkv, dim, torch.float32)
    layout = block_layout(cu_t, cu_t, block, cu[-1], cu[-1], q.device)
    sel = moba_selection_naive(q, k, cu_seqlens=cu_t, block_size=block, topk=topk)
    slots, group, nb = topk - 1, hq // hkv, layout.num_blocks
    r = routing.route(sel.clone(), layout, hkv, block, 64, slot_tiles=keys == "slot")
    assert r.rows.dtype == torch.int64
    expected = {}  # (kv head, global block, slot) -> pick ids, ascending
    block_of = {}
    for b in range(nb):
        for t in range(layout.start[b], layout.start[b] + layout.length[b]):
            block_of[t] = b
    num_past = torch.zeros(cu[-1] * hq, dtype=torch.int32, device=DEVICE)
    for t in range(cu[-1]):
        b = block_of[t]
        for h in range(hq):
            for j in range(slots):
                past = int(sel[t, h, j])
                if past >= 0 and past != int(layout.local[b]):
                    flat = t * hq + h
                    num_past[flat] += 1
                    expected.setdefault((h // group, int(layout.first[b]) + past, j), []).append(flat * slots + j)
    assert torch.equal(r.num_past, num_past)
    segs = r.seg_start.shape[2]
    assert segs == (slots if keys == "slot" else 1)
    for kv in range(hkv):
        for b in range(nb):
            picks = [r.rows[r.seg_start[kv, b, s] : r.seg_start[kv, b, s] + r.seg_count[kv, b, s]] for s in range(segs)]
            want = [sorted(expected.get((kv, b, j), [])) for j in range(slots)]
            if keys == "slot":  # within a slot segment: by group head, then token
                assert [sorted(p.tolist()) for p in picks] == want
                assert all(r.seg_start[kv, b, s] + r.seg_count[kv, b, s] == r.seg_start[kv, b, s + 1]
                           for s in range(segs - 1))
            else:
                assert picks[0].tolist() == sorted(sum(want, []))


# Queries that are a suffix of their keys (cu_seqlens_q != cu_seqlens_k): key offsets, then query counts
# per sequence. A suffix starting mid-block, a sequence whose queries are all its keys, one with no
# queries, and the context-parallel shape (two chunks of one sequence, each with its causal prefix).
SUFFIX_CASES = [
    ([0, 100, 107, 200, 240], [37, 7, 0, 40], 4, 2, 32, 16, 3),
    ([0, 64, 192], [32, 32], 2, 1, 16, 16, 4),  # CP 2, rank 0: chunks 0 and 3 of a 128-token sequence
]


def suffix_inputs(cu_k, lengths_q, hq, hkv, dim, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    cu_q = [0]
    for n in lengths_q:
        cu_q.append(cu_q[-1] + n)
    q = torch.randn(cu_q[-1], hq, dim, generator=gen).to(dtype)
    k = torch.randn(cu_k[-1], hkv, dim, generator=gen).to(dtype)
    v = torch.randn(cu_k[-1], hkv, dim, generator=gen).to(dtype)
    offsets = (torch.tensor(c, dtype=torch.int32, device=DEVICE) for c in (cu_q, cu_k))
    return (*(x.to(DEVICE) for x in (q, k, v)), *offsets)


@pytest.mark.parametrize("passes", list(PASSES))
@pytest.mark.parametrize("case", SUFFIX_CASES)
def test_suffix_queries_output_lse_and_gradients_match_naive(case, passes, monkeypatch):
    budget, max_heads = PASSES[passes]
    for name in ("INFERENCE_BUDGET", "TRAINING_BUDGET"):
        monkeypatch.setattr(workspace, name, budget)
    monkeypatch.setattr(workspace, "FORWARD_MAX_BLOCK", 1 << 30)
    monkeypatch.setattr(workspace, "MAX_CHUNK_KV_HEADS", max_heads)
    cu_k, lengths_q, hq, hkv, dim, block, topk = case
    q, k, v, cu_q, cu_k_t = suffix_inputs(cu_k, lengths_q, hq, hkv, dim, torch.float16)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    out, lse = moba_attention_triton(q, k, v, cu_q, block, topk, cu_seqlens_k=cu_k_t, return_lse=True)
    gen = torch.Generator().manual_seed(1)
    dout = torch.randn(out.shape, generator=gen).to(DEVICE, out.dtype)
    dlse = torch.randn(lse.shape, generator=gen).to(DEVICE)
    grads = torch.autograd.grad((out, lse), (q, k, v), (dout, dlse))
    ref, ref_lse = moba_attention_naive(q.float(), k.float(), v.float(), cu_seqlens=cu_q, cu_seqlens_k=cu_k_t,
                                        block_size=block, topk=topk, return_lse=True)
    ref_grads = torch.autograd.grad((ref, ref_lse), (q, k, v), (dout.float(), dlse))
    assert out.shape == ref.shape and lse.dtype == torch.float32 and lse.shape == ref_lse.shape
    assert (lse - ref_lse).abs().max() < 2e-3
    assert_close_to_naive(out, grads, ref, ref_grads)
    sel = moba_selection_triton(q, k, cu_q, block, topk, cu_seqlens_k=cu_k_t)
    assert torch.equal(sel, moba_selection_naive(q, k, cu_seqlens=cu_q, cu_seqlens_k=cu_k_t, block_size=block,
                                                 topk=topk))


def test_given_selection_is_attended_instead_of_the_gate():
    # A selection that is not the gate's (every query keeps only the lowest past blocks and its own):
    # the kernels must attend exactly it, as the definition with that selection does.
    cu, hq, hkv, dim, block, topk, _ = CASES[0]
    q, k, v, cu_t = inputs(cu, hq, hkv, dim, torch.float16)
    gate = moba_selection_naive(q, k, cu_seqlens=cu_t, block_size=block, topk=topk)
    count = (gate >= 0).sum(-1, keepdim=True)
    slot = torch.arange(topk, device=DEVICE)
    current = gate.gather(-1, count - 1)
    chosen = torch.where(slot < count - 1, slot.expand_as(gate).int(), torch.where(slot == count - 1, current, -1))
    assert not torch.equal(chosen, gate)
    out = moba_attention_triton(q, k, v, cu_t, block, topk, selection=chosen.int())
    ref = moba_attention_naive(q.float(), k.float(), v.float(), cu_seqlens=cu_t, block_size=block, topk=topk,
                               selection=chosen.int())
    assert (out.float() - ref).abs().max() / ref.abs().max() < 4e-3


def test_block_layout_of_suffix_queries_matches_a_walk():
    cu_k, lengths_q = [0, 100, 107, 200, 240], [37, 7, 0, 40]
    cu_q = [0, 37, 44, 44, 84]
    layout = block_layout(torch.tensor(cu_q, dtype=torch.int32, device=DEVICE),
                          torch.tensor(cu_k, dtype=torch.int32, device=DEVICE), 16, 84, 240, DEVICE)
    want = []  # (q_start, q_len, q_offset) of each block, by walking each query
    for j, (a, b) in enumerate(zip(cu_k[:-1], cu_k[1:])):
        offset = (b - a) - lengths_q[j]
        for s in range(0, b - a, 16):
            rows = [cu_q[j] + p - offset for p in range(s, min(s + 16, b - a)) if p >= offset]
            want.append((rows[0], len(rows), s + len(range(s, min(s + 16, b - a))) - len(rows) - s) if rows else None)
    got = list(zip(layout.q_start.tolist(), layout.q_len.tolist(), layout.q_offset.tolist()))
    assert layout.suffix and len(got) == len(want)
    for have, expect in zip(got, want):
        assert have[1] == 0 if expect is None else have == expect


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_selection_ties_across_gating_chunks_equal_naive_exactly(dtype):
    # 80 blocks (three gating chunks of 32 candidates) with integer keys: every gate score is an exact
    # small integer. Eight blocks spread over the chunks share one mean key, so for a query that prefers
    # it they tie for 5 past slots, and the running top-k's insertion rounds must resolve the ties to the
    # lower block index across chunks, as the definition's stable sort does.
    gen = torch.Generator().manual_seed(13)
    block, nblocks, dim, topk = 16, 80, 16, 6
    means = torch.randint(-1, 2, (nblocks, 1, dim), generator=gen).float()
    tied = [3, 20, 33, 40, 50, 60, 70, 75]
    means[tied] = 3.0
    k = means.repeat_interleave(block, 0)  # every key of a block equal: its mean is exact
    q = torch.randint(-2, 3, (nblocks * block, 2, dim), generator=gen).float()
    q[-1, 0] = 1.0  # the last query of head 0 prefers the tied blocks
    cu = torch.tensor([0, nblocks * block], dtype=torch.int32, device=DEVICE)
    q, k = q.to(DEVICE, dtype), k.to(DEVICE, dtype)
    got = moba_selection_triton(q, k, cu, block, topk)
    want = moba_selection_naive(q, k, cu_seqlens=cu, block_size=block, topk=topk)
    assert want[-1, 0].tolist() == [3, 20, 33, 40, 50, 79]
    assert torch.equal(got, want)


def test_nan_in_the_keys_gives_the_same_outputs_as_the_definition():
    cu, hq, hkv, dim, block, topk, _ = CASES[0]
    q, k, v, cu_t = inputs(cu, hq, hkv, dim, torch.float16)
    k[20, 1, 3] = float("nan")  # block 1 of sequence 0 (KV head 1): a past block for later queries
    out = moba_attention_triton(q, k, v, cu_t, block, topk)
    ref = moba_attention_naive(q.float(), k.float(), v.float(), cu_seqlens=cu_t, block_size=block, topk=topk)
    assert torch.equal(out.isnan(), ref.isnan()) and ref.isnan().any()
    finite = ~ref.isnan()
    assert (out.float()[finite] - ref[finite]).abs().max() / ref[finite].abs().max() < 4e-3
    assert torch.equal(moba_selection_triton(q, k, cu_t, block, topk),
                       moba_selection_naive(q, k, cu_seqlens=cu_t, block_size=block, topk=topk))


def test_dkdv_schedule_splits_only_where_a_run_outgrows_its_share(monkeypatch):
    """The recipes' shapes on an H200 (132 SMs, one 8-warp program of 256 keys each at head dim 64). Block
    2048 (8 key tiles): runs split past 190,650 picks, so the longest possible run (65,536 tokens x 4
    heads) needs 2 programs at most and even routing's busiest run (about 61K) none. Block 512 (2 key
    tiles): past 31,775 picks, up to 8. 128K in blocks of 1024 (4 key tiles): 3. No picks, nothing to
    split; a fixed split size from DKDV_SPLIT_ROWS."""
    from moba_train.kernels import backward

    monkeypatch.setattr(backward, "MAX_DKDV_SPLITS", 8)
    monkeypatch.setattr(backward, "DKDV_SPLIT_BALANCE", 2)
    assert backward.dkdv_schedule(65536, 32, 8, 3, 8, 132) == (2, 190650)
    assert backward.dkdv_schedule(65536, 32, 8, 2, 2, 132) == (8, 31775)
    assert backward.dkdv_schedule(131072, 32, 8, 3, 4, 132)[0] == 3
    assert backward.dkdv_schedule(32768, 32, 8, 0, 2, 132) == (1, 1)
    monkeypatch.setattr(backward, "DKDV_SPLIT_ROWS", 1000)
    assert backward.dkdv_schedule(32768, 32, 8, 2, 2, 132) == (8, 1000)
    assert backward.dkdv_schedule(1000, 4, 2, 2, 1, 132) == (2, 1000)


def test_extra_splits_list_every_further_split_of_each_run():
    """Runs of 0, 5, 25, 12, 40 and 0 picks split every 10 (at most 3 programs): runs 2, 3 and 4 need 3, 2
    and 3 programs, so their further splits are (2, 1), (2, 2), (3, 1), (4, 1), (4, 2); the rest of the
    list is unused (-1)."""
    from moba_train.kernels import backward

    seg_count = torch.tensor([[[0, 0], [2, 3], [20, 5]], [[12, 0], [40, 0], [0, 0]]], dtype=torch.int32)
    run, split, first = backward.extra_splits(seg_count, 10, 3, 8)
    assert run.tolist() == [2, 2, 3, 4, 4, -1, -1, -1]
    assert split.tolist()[:5] == [1, 2, 1, 1, 2]
    assert first.tolist()[2:5] == [0, 2, 3]  # where each split run's further splits start


@pytest.mark.parametrize("case", [([0, 300, 620], 4, 2, 32, 64, 3, False), ([0, 1100], 2, 1, 16, 512, 2, False)],
                         ids=["gqa-varlen-b64", "b512-two-key-tiles"])
def test_packed_dkdv_matches_naive_and_the_gathered_kernel(case, monkeypatch):
    """DKDV_PACKED (q, dO, lse and delta copied into routing order, read as contiguous rows), with pointer loads
    and with TMA (DKDV_TMA), against the definition, and against the gathered reads: the same products of the
    same rows, so the same bits."""
    from moba_train.kernels import backward

    cu, hq, hkv, dim, block, topk, shared = case
    q, k, v, cu_t = inputs(cu, hq, hkv, dim, torch.float16, seed=5)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    dout = torch.randn(cu[-1], hq, dim, generator=torch.Generator().manual_seed(2)).to(DEVICE, q.dtype)
    ref = moba_attention_naive(q.float(), k.float(), v.float(), cu_seqlens=cu_t, block_size=block, topk=topk)
    ref_grads = torch.autograd.grad(ref, (q, k, v), dout.float())
    results = {}
    for packed, tma in ((False, False), (True, False), (True, True)):
        monkeypatch.setattr(backward, "DKDV_PACKED", packed)
        monkeypatch.setattr(backward, "DKDV_TMA", tma)
        out = moba_attention_triton(q, k, v, cu_t, block, topk, shared_gqa_selection=shared)
        results[packed, tma] = torch.autograd.grad(out, (q, k, v), dout)
        assert_close_to_naive(out, results[packed, tma], ref, ref_grads)
    assert all(torch.equal(a, b) for a, b in zip(results[True, False], results[False, False]))
    # DKDV_TMA: the packed rows by tensor descriptor, the run's end masked after the load: the same bits again
    assert all(torch.equal(a, b) for a, b in zip(results[True, True], results[False, False]))


@pytest.mark.parametrize("transposed, query_step", [(False, 32), (False, 16), (True, 16)])
def test_dq_partials_of_the_packed_dkdv_match_naive_in_each_form(transposed, query_step, monkeypatch):
    """The dQ partials of the packed 256-key dK/dV programs (block 512, the workspace passes) as dS K instead of
    (K^T dS^T)^T, and with 16-row query steps (either form), against the definition. dS K is the 256-key tiling's
    form since session 20 (no spills in its main loop on sm_90, 2-3% faster at r32k-b512; bench/NOTES.md); the
    transposed form stays for the other tilings."""
    from moba_train.kernels import backward

    for name in ("INFERENCE_BUDGET", "TRAINING_BUDGET"):
        monkeypatch.setattr(workspace, name, 1e9)
    tiles = backward.DkdvTiles(256, query_step, 8, 2, dq_transposed=transposed)
    monkeypatch.setattr(backward, "DKDV_TILES_D64", tiles)
    assert backward.dkdv_tiles(512, 16) == tiles
    q, k, v, cu_t = inputs([0, 1100], 2, 1, 16, torch.float16, seed=7)
    attention_matches_naive(q, k, v, cu_t, 512, 3)


@pytest.mark.parametrize("splits, split_rows", [(1, None), (3, None), (8, None), (8, 40)])
def test_dkdv_split_over_programs_matches_naive_when_one_block_draws_every_pick(splits, split_rows, monkeypatch):
    """A shared offset in the queries and in block 0's keys makes every query pick block 0 (the skew of
    training: a few blocks drawn by most queries), so the split of its picks over programs is uneven, some
    splits of other blocks are empty and (split size 40) most other blocks stay whole in the same launch;
    dK, dV (and the rest) equal the definition for any split count."""
    from moba_train.kernels import backward

    monkeypatch.setattr(backward, "MAX_DKDV_SPLITS", splits)
    monkeypatch.setattr(backward, "DKDV_SPLIT_ROWS", split_rows)
    cu, hq, hkv, dim, block, topk = [0, 200, 300], 4, 2, 16, 16, 3
    q, k, v, cu_t = inputs(cu, hq, hkv, dim, torch.float16, seed=3)
    q, k = q + 1.0, k.clone()
    k[0:16] += 2.0
    k[200:216] += 2.0
    picks = moba_selection_naive(q.float(), k.float(), cu_seqlens=cu_t, block_size=block, topk=topk)
    assert bool((picks[32:200] == 0).any(-1).all()) and bool((picks[232:300] == 0).any(-1).all())
    attention_matches_naive(q, k, v, cu_t, block, topk)


def test_dkdv_packs_the_picks_only_where_a_block_has_several_key_tiles(monkeypatch):
    """DKDV_PACKED None (the default): the copy into routing order runs where each pick is read by several
    key-tile programs (block 512: two tiles of 256 keys at this head dim) and not where one program reads it
    (block 64), where it would only add a copy (bench/NOTES.md, session 16)."""
    from moba_train.kernels import backward

    launches = []

    class Spy:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            launches.append(grid)
            return self.kernel[grid]

    monkeypatch.setattr(backward, "_pack_picks_kernel", Spy(backward._pack_picks_kernel))
    assert backward.DKDV_PACKED is None
    for block, tiles, want in ((64, 1, 0), (512, 2, 1)):
        assert backward.dkdv_tiles(block, 16).key_tile * tiles == block
        launches.clear()
        q, k, v, cu_t = inputs([0, 1100], 2, 1, 16, torch.float16, seed=3)
        v.requires_grad_()
        out = moba_attention_triton(q, k, v, cu_t, block, 3)
        out.sum().backward()
        assert len(launches) == want, (block, launches)
