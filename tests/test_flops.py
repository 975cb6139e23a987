"""moba_train.flops closed forms against brute-force sums over query positions (../shared/BENCH.md)."""

import pytest

from moba_train import flops


def keys_brute(length, block=None, topk=None):
    if block is None:
        return sum(t + 1 for t in range(length))
    return sum((t % block) + 1 + block * min(topk - 1, t // block) for t in range(length))


def gating_brute(length, block):
    return sum(t // block for t in range(length))


LENGTHS = [0, 1, 7, 16, 17, 64, 100, 1000, 4099]


@pytest.mark.parametrize("block,topk", [(1, 1), (16, 1), (16, 2), (16, 3), (16, 8), (64, 12), (7, 5)])
def test_moba_attended_keys_and_gating_match_brute_force_sums(block, topk):
    for n in LENGTHS:
        assert flops.attended_keys(n, block, topk) == keys_brute(n, block, topk), n
    assert flops.attention_forward_flops(LENGTHS, 3, 64, block, topk) == 4 * 64 * 3 * sum(
        keys_brute(n, block, topk) for n in LENGTHS
    )
    assert flops.gating_flops(LENGTHS, 3, 64, block) == 2 * 64 * 3 * sum(gating_brute(n, block) for n in LENGTHS)


def test_dense_causal_flops_match_brute_force_and_moba_with_topk_covering_all_blocks():
    assert flops.attention_forward_flops(LENGTHS, 2, 128) == 4 * 128 * 2 * sum(keys_brute(n) for n in LENGTHS)
    # topk >= number of blocks: MoBA attends exactly the causal keys.
    assert flops.attention_forward_flops([1000], 2, 128, 16, 63) == flops.attention_forward_flops([1000], 2, 128)


def test_standard_shape_s32k_b128_forward_flops():
    seq, block, topk = 32 * 1024, 128, 8
    expected = 4 * 128 * 16 * 2 * keys_brute(seq, block, topk)
    assert flops.attention_forward_flops([seq, seq], 16, 128, block, topk) == expected


def test_training_step_flops_is_6n_tokens_plus_3x_attention_per_layer_kind():
    seqlens, heads, dim, block, topk, params = [300, 200], 4, 32, 64, 3, 10_000
    dense = 4 * dim * heads * sum(keys_brute(n) for n in seqlens)
    moba = 4 * dim * heads * sum(keys_brute(n, block, topk) for n in seqlens)
    gate = 2 * dim * heads * sum(gating_brute(n, block) for n in seqlens)
    kinds = ["moba", "moba", "full"]
    got = flops.training_step_flops(params, seqlens, kinds, heads, dim, block, topk)
    assert got == 6 * params * 500 + 3 * (2 * (moba + gate) + dense)


def test_flops_reject_half_specified_moba_and_unknown_layer_kinds():
    with pytest.raises(ValueError, match="block_size and topk"):
        flops.attention_forward_flops([10], 1, 8, block_size=4)
    with pytest.raises(ValueError, match="layer_kinds"):
        flops.training_step_flops(1, [10], ["sparse"], 1, 8, 4, 2)
