"""The Llama GPTModel: hybrid layer plan, MoBA vs full attention, checkpoint keys, RoPE scaling,
packed documents, the forward-step contract and the matrix-parameter count."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from moba_train import distributed
from moba_train.config import Config, ConfigError
from moba_train.core_attention import FullCoreAttention, MoBACoreAttention
from moba_train.model import (
    build_model,
    forward_step,
    layer_specs,
    matrix_params,
    packed_seq_params,
    rope_inv_freq,
    to_device,
    token_losses,
)

SEQ = 64
BLOCK = 16


def tiny(**sections) -> Config:
    """A 2-layer GQA Llama with 16-token MoBA blocks on the CPU (the tests compare with CPU tensors, also on a
    GPU machine), plus `sections` merged in."""
    raw = {
        "run": {"device": "cpu"},
        "model": {"num_layers": 2, "hidden_size": 64, "ffn_hidden_size": 160, "num_attention_heads": 4,
                  "num_query_groups": 2, "vocab_size": 250, "make_vocab_size_divisible_by": 64},
        "attention": {"block_size": BLOCK, "topk": 2},
        "train": {"seq_length": SEQ},
    }
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    return Config.model_validate(raw)


@pytest.fixture(scope="module", autouse=True)
def single_process():
    distributed.init_distributed(tiny())
    yield
    distributed.destroy_distributed()


def build(cfg: Config, seed: int = 7):
    distributed.set_seed(seed)
    return build_model(cfg)


def make_batch(b: int, s: int, cu_seqlens: list[int] | None = None, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 250, (b, s + 1), generator=gen)
    return {
        "tokens": tokens[:, :-1].contiguous(),
        "labels": tokens[:, 1:].contiguous(),
        "loss_mask": (torch.rand(b, s, generator=gen) > 0.2).float(),
        "position_ids": torch.arange(s).repeat(b, 1),
        "cu_seqlens": torch.tensor(cu_seqlens or list(range(0, (b + 1) * s, s)), dtype=torch.int32),
    }


def core_attention_kinds(model) -> list[str]:
    kinds = {MoBACoreAttention: "moba", FullCoreAttention: "full"}
    return [kinds[type(layer.self_attention.core_attention)] for layer in model.decoder.layers]


@pytest.mark.parametrize(
    "attention, expected",
    [
        ({"full_layers": 0}, ["moba"] * 4),
        ({"full_layers": 1}, ["moba", "moba", "moba", "full"]),
        ({"full_layers": 3}, ["moba", "full", "full", "full"]),
        ({"full_layers": 4}, ["full"] * 4),
        ({"layer_kinds": ["full", "moba", "full", "moba"], "full_layers": 1}, ["full", "moba", "full", "moba"]),
        ({"mode": "full", "full_layers": 1}, ["full"] * 4),
    ],
)
def test_built_model_puts_moba_core_attention_on_the_planned_layers(attention, expected):
    cfg = tiny(model={"num_layers": 4}, attention={**attention, "topk": 3})
    model = build(cfg)
    assert core_attention_kinds(model) == expected
    for layer in model.decoder.layers:
        core = layer.self_attention.core_attention
        if isinstance(core, MoBACoreAttention):
            assert (core.block_size, core.topk, core.backend) == (BLOCK, 3, "auto")


def test_layer_specs_differ_only_in_the_core_attention_slot():
    specs = layer_specs(tiny(attention={"layer_kinds": ["moba", "full"]}))
    assert [spec.submodules.self_attention.submodules.core_attention.module for spec in specs] == [
        MoBACoreAttention, FullCoreAttention
    ]
    stripped = []
    for spec in specs:
        spec = copy.deepcopy(spec)
        spec.submodules.self_attention.submodules.core_attention = None
        stripped.append(spec)
    assert stripped[0] == stripped[1]


def test_moba_with_topk_covering_every_block_has_the_full_attention_loss():
    batch = make_batch(2, SEQ)
    full_sum, count = forward_step(build(tiny(attention={"mode": "full"})), batch)
    all_blocks_sum, _ = forward_step(build(tiny(attention={"topk": SEQ // BLOCK})), batch)
    sparse_sum, _ = forward_step(build(tiny(attention={"topk": 1})), batch)
    torch.testing.assert_close(all_blocks_sum, full_sum, rtol=1e-6, atol=1e-6)
    assert (sparse_sum - full_sum).abs() / count > 1e-4


def test_attention_kind_does_not_change_checkpoint_keys():
    moba = build(tiny(attention={"full_layers": 1}))
    full = build(tiny(attention={"mode": "full"}), seed=8)
    moba_state, full_state = moba.state_dict(), full.state_dict()
    assert {k: v.shape for k, v in moba_state.items() if torch.is_tensor(v)} == {
        k: v.shape for k, v in full_state.items() if torch.is_tensor(v)
    }
    assert moba_state.keys() == full_state.keys()
    assert moba.sharded_state_dict().keys() == full.sharded_state_dict().keys()
    full.load_state_dict(moba_state, strict=True)
    moba.load_state_dict(full_state, strict=True)


def test_rope_inv_freq_matches_transformers_llama3_with_non_default_scaling():
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    scaling = {"factor": 32.0, "low_freq_factor": 2.0, "high_freq_factor": 8.0,
               "original_max_position_embeddings": 2048}
    cfg = tiny(model={"hidden_size": 256, "num_attention_heads": 2, "num_query_groups": 2,
                      "rope_theta": 500000.0, "rope_scaling": scaling})
    hf = LlamaConfig(hidden_size=256, num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=131072,
                     rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, **scaling})
    expected = LlamaRotaryEmbedding(hf).inv_freq
    ours = rope_inv_freq(cfg)
    torch.testing.assert_close(ours, expected, rtol=0, atol=0)
    # The three non-factor values matter: Megatron's built-in defaults (1, 4, 8192) give other values.
    default_rest = tiny(model={"hidden_size": 256, "num_attention_heads": 2, "num_query_groups": 2,
                               "rope_scaling": {"factor": 32.0}})
    assert not torch.allclose(rope_inv_freq(default_rest), expected)
    torch.testing.assert_close(build(cfg).rotary_pos_emb.inv_freq, expected, rtol=0, atol=0)


def test_rope_inv_freq_without_scaling_matches_transformers_default():
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    cfg = tiny(model={"rope_theta": 10000.0})
    hf = LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                     rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    expected = LlamaRotaryEmbedding(hf).inv_freq
    torch.testing.assert_close(rope_inv_freq(cfg), expected, rtol=0, atol=0)


def test_packed_documents_have_the_losses_of_each_document_alone():
    bounds = [0, 20, 64, 100, 128]  # documents of 20 and 44 tokens in sample 0, 36 and 28 in sample 1
    batch = make_batch(2, SEQ, cu_seqlens=bounds)
    model = build(tiny(attention={"topk": 2, "full_layers": 1}))
    assert packed_seq_params(batch) is not None
    packed = token_losses(model, batch).flatten()
    flat = {key: batch[key].flatten() for key in ("tokens", "labels", "loss_mask")}
    for start, end in zip(bounds[:-1], bounds[1:]):
        alone = {key: value[start:end][None] for key, value in flat.items()}
        alone["position_ids"] = torch.arange(end - start)[None]
        alone["cu_seqlens"] = torch.tensor([0, end - start], dtype=torch.int32)
        assert packed_seq_params(alone) is None
        torch.testing.assert_close(packed[start:end], token_losses(model, alone)[0], rtol=1e-5, atol=1e-5)


def test_forward_step_sums_masked_cross_entropy_of_the_logits():
    batch = make_batch(2, SEQ)
    model = build(tiny())
    loss_sum, count = forward_step(model, batch)
    logits = model(batch["tokens"], batch["position_ids"], attention_mask=None)  # [b, s, padded vocab]
    per_token = F.cross_entropy(logits.flatten(0, 1).float(), batch["labels"].flatten(), reduction="none")
    torch.testing.assert_close(loss_sum, (per_token * batch["loss_mask"].flatten()).sum(), rtol=1e-5, atol=1e-4)
    assert count == batch["loss_mask"].sum()


@pytest.mark.parametrize("tie", [False, True])
def test_matrix_params_counts_every_linear_weight_of_the_built_model(tie):
    cfg = tiny(model={"tie_embeddings": tie, "num_query_groups": 1})
    model = build(cfg)
    linear = sum(p.numel() for name, p in model.named_parameters() if p.dim() == 2 and "embedding" not in name)
    output_layer = model.embedding.word_embeddings.weight.numel() if tie else 0
    assert matrix_params(cfg) == linear + output_layer
    assert model.embedding.word_embeddings.weight.shape[0] == 256  # 250 padded to a multiple of 64


def test_transformer_engine_spec_without_transformer_engine_is_a_config_error():
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        with pytest.raises(ConfigError, match="transformer_engine is not installed"):
            build(tiny(model={"transformer_impl": "te"}))
    else:
        pytest.skip("transformer_engine is installed")


@pytest.mark.parametrize("recompute", ["selective", "full"])
def test_activation_recomputation_keeps_loss_and_gradients(recompute):
    batch = make_batch(2, SEQ)
    results = []
    for mode in ("none", recompute):
        model = build(tiny(train={"recompute": mode}, attention={"full_layers": 1}))
        loss_sum, count = forward_step(model, batch)
        (loss_sum / count).backward()
        results.append((loss_sum.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (reference_loss, reference_grads), (loss, grads) = results
    torch.testing.assert_close(loss, reference_loss, rtol=0, atol=0)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, reference_grads[name], rtol=1e-6, atol=1e-7)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned host copies need CUDA")
def test_host_tensors_of_any_layout_reach_the_gpu_unchanged():
    """The evaluation's batches hold a broadcast view (position ids: arange(s).expand(b, s)), slices and
    transposes; each arrives on the GPU equal to itself (the study's GPU run of 10f4154 failed on the first)."""
    base = torch.arange(24).reshape(4, 6)
    for tensor in (torch.arange(6).expand(4, 6), base[:, 1:], base.t(), base):
        moved = to_device(tensor, torch.device("cuda"))
        torch.cuda.synchronize()
        assert moved.is_cuda and torch.equal(moved.cpu(), tensor)
