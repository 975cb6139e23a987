"""MoBA routing diagnostics against the definition: every statistic of `layer_routing` (computed from the
public moba_selection) equals a direct per-query computation from the naive selection and dense
attention; on a real model the hooks see the q/k the attention layers receive."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from moba_train.attention import naive
from moba_train.config import load_config
from moba_train.diagnostics import (
    RoutingDiagnostics,
    choice_positions,
    layer_routing,
    routing_metrics,
    sample_kv_heads,
    sample_queries,
)
from moba_train.metrics import Histogram, Image

BLOCK, TOPK = 8, 3


def _reference(q, k, cu, queries, num_blocks, scale, shared):
    """The statistics by definition, one (query, head) at a time."""
    sel = naive.moba_selection_naive(q, k, cu_seqlens=cu, block_size=BLOCK, topk=TOPK, shared_gqa_selection=shared)
    bounds = cu.tolist()
    heads, group = q.shape[1], q.shape[1] // k.shape[1]
    distance = np.zeros(num_blocks, dtype=np.int64)
    popularity = np.zeros(num_blocks)
    previous = recall = 0.0
    overlaps = []
    for t in queries.tolist():
        start, end = next((a, b) for a, b in zip(bounds[:-1], bounds[1:]) if a <= t < b)
        own = (t - start) // BLOCK
        allowed = naive.key_mask(sel[start:end].long(), end - start, BLOCK)[t - start]  # [H, L]
        picks = []
        for h in range(heads):
            past = {c for c in sel[t, h].tolist() if c >= 0 and c != own}
            picks.append(past)
            for c in past:
                distance[own - c] += 1
                popularity[c] += 1
            previous += (own - 1) in past
            logits = (k[start:t + 1, h // group].double() @ q[t, h].double()) * scale
            probs = torch.softmax(logits, dim=0)
            recall += float(probs[allowed[h, : t - start + 1]].sum())
        for g in range(k.shape[1]):
            members = picks[g * group:(g + 1) * group]
            overlaps += [len(a & b) / (TOPK - 1)
                         for i, a in enumerate(members) for j, b in enumerate(members) if i != j]
    pairs = len(queries) * heads
    heat = np.zeros((num_blocks, num_blocks))
    counts = np.zeros(num_blocks)
    for start, end in zip(bounds[:-1], bounds[1:]):
        for t in range(start, end):
            row = (t - start) // BLOCK
            counts[row] += 1
            for c in sel[t, 0].tolist():
                if c >= 0:
                    heat[row, c] += 1
    heat /= np.maximum(counts, 1)[:, None]
    return dict(distance=distance, popularity=popularity / pairs, previous=previous / pairs, recall=recall / pairs,
                overlap=float(np.mean(overlaps)) if overlaps else None, heat=heat)


@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (3, 3)])
def test_layer_routing_equals_the_definition_on_packed_sequences(shared, heads, kv_heads):
    torch.manual_seed(0)
    lengths = [61, 17, 40]  # 8, 3 and 5 blocks; the middle sequence has no query with a choice
    cu = torch.tensor([0, *np.cumsum(lengths)], dtype=torch.int32)
    total = int(cu[-1])
    q = torch.randn(total, heads, 16)
    k = torch.randn(total, kv_heads, 16) + torch.randn(1, kv_heads, 16)  # a shared component: uneven gate scores
    queries = sample_queries(cu.tolist(), BLOCK, TOPK, 40, torch.Generator().manual_seed(3))
    num_blocks, scale = math.ceil(max(lengths) / BLOCK), 0.3

    got = layer_routing(q, k, cu, block_size=BLOCK, topk=TOPK, softmax_scale=scale, queries=queries,
                        num_blocks=num_blocks, shared_gqa_selection=shared)
    want = _reference(q, k, cu, queries, num_blocks, scale, shared)

    np.testing.assert_array_equal(got.distance_counts, want["distance"])
    np.testing.assert_allclose(got.popularity, want["popularity"], rtol=0, atol=1e-12)
    np.testing.assert_allclose(got.heatmap, want["heat"], rtol=0, atol=1e-12)
    assert got.previous_block_share == pytest.approx(want["previous"], abs=1e-12)
    assert got.gate_recall == pytest.approx(want["recall"], abs=1e-6)
    assert 0 < got.gate_recall < 1
    if heads == kv_heads:
        assert got.head_overlap is None
    else:
        assert got.head_overlap == pytest.approx(want["overlap"], abs=1e-12)
        if shared:
            assert got.head_overlap == pytest.approx(1.0)  # one selection per KV group
    assert got.popularity.sum() == pytest.approx(TOPK - 1)  # every sampled query has TOPK - 1 past picks


def test_recall_is_one_when_every_block_is_selected():
    torch.manual_seed(1)
    cu = torch.tensor([0, 48], dtype=torch.int32)
    q, k = torch.randn(48, 2, 8), torch.randn(48, 2, 8)
    queries = choice_positions(cu.tolist(), BLOCK, 2)  # topk 6 >= 6 blocks: every earlier block is picked
    got = layer_routing(q, k, cu, block_size=BLOCK, topk=6, softmax_scale=1.0, queries=queries, num_blocks=6)
    assert got.gate_recall == pytest.approx(1.0, abs=1e-6)


def test_sampled_queries_have_a_choice_and_are_reproducible():
    bounds = [0, 61, 78, 118]
    queries = sample_queries(bounds, BLOCK, TOPK, 1000, torch.Generator().manual_seed(5))
    expected = [t for a, b in zip(bounds[:-1], bounds[1:]) for t in range(a, b) if (t - a) // BLOCK >= TOPK]
    assert queries.tolist() == expected  # fewer candidates than asked: all of them, ascending
    few = sample_queries(bounds, BLOCK, TOPK, 7, torch.Generator().manual_seed(5))
    assert few.tolist() == sample_queries(bounds, BLOCK, TOPK, 7, torch.Generator().manual_seed(5)).tolist()
    assert len(few) == 7 and set(few.tolist()) <= set(expected)
    assert sample_kv_heads(8, 2, torch.Generator().manual_seed(0)) == sorted(set(
        sample_kv_heads(8, 2, torch.Generator().manual_seed(0))))


def test_top_1_has_no_past_picks_and_logs_no_share_of_them():
    # MoBA with top-1 attends its own block only: the shares of past picks are undefined, not NaN or infinite.
    torch.manual_seed(0)
    cu = torch.tensor([0, 40], dtype=torch.int32)
    q, k = torch.randn(40, 4, 16), torch.randn(40, 2, 16)
    queries = sample_queries(cu.tolist(), BLOCK, 1, 16, torch.Generator().manual_seed(3))
    got = layer_routing(q, k, cu, block_size=BLOCK, topk=1, softmax_scale=0.3, queries=queries,
                        num_blocks=math.ceil(40 / BLOCK))
    assert got.head_overlap is None and got.popularity.sum() == 0 and 0 < got.gate_recall < 1
    metrics = routing_metrics({0: got}, topk=1)
    scalars = {name: value for name, value in metrics.items() if isinstance(value, float)}
    assert scalars and all(math.isfinite(value) for value in scalars.values())
    assert not any(name.startswith("moba/first_block_share") for name in metrics)


def test_routing_metrics_names_layers_and_averages_them():
    def result(recall, popularity):
        from moba_train.diagnostics import LayerRouting

        return LayerRouting(distance_counts=np.array([0, 3, 1]), previous_block_share=0.5, gate_recall=recall,
                            popularity=np.array(popularity), head_overlap=None, heatmap=np.zeros((3, 3)))

    metrics = routing_metrics({0: result(0.8, [1.0, 0.5, 0.5]), 2: result(0.6, [0.5, 1.0, 0.5])}, topk=3)
    assert metrics["moba/gate_recall/layer_02"] == 0.6
    assert metrics["moba/gate_recall"] == pytest.approx(0.7)
    assert metrics["moba/distance_mean/layer_00"] == pytest.approx((3 * 1 + 1 * 2) / 4)
    assert metrics["moba/first_block_share"] == pytest.approx((0.5 + 0.25) / 2)
    assert metrics["moba/distance/layer_00"] == Histogram([0.0, 3.0, 1.0], [-0.5, 0.5, 1.5, 2.5])
    assert "moba/head_overlap" not in metrics


def test_diagnostics_on_a_real_model_see_the_attention_inputs(tmp_path):
    """Hooks on the MoBA core attention of a real Megatron model: the per-layer statistics equal
    layer_routing on the q/k an independent pre-hook captured, with the same sampled queries and heads."""
    from moba_train import data
    from moba_train.core_attention import MoBACoreAttention, to_thd
    from moba_train.distributed import destroy_distributed, init_distributed, set_seed
    from moba_train.model import build_model

    cfg = load_config("configs/tiny_moba.yaml", [
        f"run.output_dir={tmp_path}", "data.kind=synthetic", "train.seq_length=256", "attention.block_size=32",
        "attention.topk=3", "train.micro_batch_size=1", "train.global_batch_size=1", "logging.moba_diag_queries=24",
        "logging.moba_diag_kv_groups=1",
    ])
    env = init_distributed(cfg)
    try:
        set_seed(cfg.run.seed)
        model = build_model(cfg)
        train_set, _ = data.build_datasets(cfg, env)
        batch = next(data.build_dataloader(train_set, cfg, env, consumed_samples=0))
        captured = {}

        def capture(name, module, args, kwargs):
            q, k, _, cu = to_thd(args[0], args[1], args[2], kwargs.get("packed_seq_params"))
            captured[name] = (q.clone(), k.clone(), cu, module)

        for name, module in model.named_modules():
            if isinstance(module, MoBACoreAttention):
                module.register_forward_pre_hook(lambda m, a, kw, name=name: capture(name, m, a, kw), with_kwargs=True)
        step = 7
        metrics = RoutingDiagnostics(cfg, model, enabled=True).run(step, batch)
    finally:
        destroy_distributed()

    assert sorted(captured) == ["decoder.layers.0.self_attention.core_attention",
                                "decoder.layers.1.self_attention.core_attention"]  # layer 2 is full attention
    generator = torch.Generator().manual_seed(cfg.run.seed + step)
    queries = sample_queries([0, 256], 32, 3, 24, generator)
    kv_head = sample_kv_heads(2, 1, generator)
    for layer in (0, 1):
        q, k, cu, module = captured[f"decoder.layers.{layer}.self_attention.core_attention"]
        want = layer_routing(q[:, [2 * kv_head[0], 2 * kv_head[0] + 1]], k[:, kv_head], cu, block_size=32, topk=3,
                             softmax_scale=module.softmax_scale, queries=queries, num_blocks=8)
        assert metrics[f"moba/gate_recall/layer_{layer:02d}"] == pytest.approx(want.gate_recall, abs=1e-9)
        assert metrics[f"moba/popularity/layer_{layer:02d}"].values == pytest.approx(list(want.popularity))
        assert metrics[f"moba/distance/layer_{layer:02d}"].values == [float(c) for c in want.distance_counts]
    heat = np.load(tmp_path / "diagnostics" / f"heatmap_step_{step:08d}.npz")
    assert sorted(heat.files) == ["layer_00", "layer_01"] and heat["layer_00"].shape == (8, 8)
    assert metrics["moba/heatmap"] == Image(str(tmp_path / "diagnostics" / f"heatmap_step_{step:08d}.png"))
    assert Path(metrics["moba/heatmap"].path).stat().st_size > 0
