"""The induction probe (moba_train/induction.py) on tiny CPU models: its scores equal the attention weights that
Hugging Face's eager Llama returns for the same weights and tokens; the ranking keeps the layers whose best head
copies most; bad sizes are one clear error."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import LlamaForCausalLM

from moba_train import convert, distributed
from moba_train.checkpointing import save_model_checkpoint
from moba_train.config import Config, ConfigError
from moba_train.evaluation import load_model
from moba_train.induction import (
    FIRST_TOKEN,
    induction_scores,
    probed_layer_kinds,
    query_positions,
    repeated_random_tokens,
)
from moba_train.model import build_model

VOCAB = 250
SEGMENT = 24


@pytest.fixture(scope="module", autouse=True)
def single_process():
    distributed.init_distributed(Config.model_validate({"run": {"device": "cpu"}, "attention": {"mode": "full"}}))
    yield
    distributed.destroy_distributed()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A random 3-layer GQA Llama (4 query heads, 2 key heads) trained with MoBA, saved as a checkpoint."""
    cfg = Config.model_validate({
        "model": {"num_layers": 3, "hidden_size": 64, "ffn_hidden_size": 160, "num_attention_heads": 4,
                  "num_query_groups": 2, "vocab_size": VOCAB, "make_vocab_size_divisible_by": 64,
                  "max_position_embeddings": 128, "init_method_std": 0.2},
        "attention": {"mode": "moba", "block_size": 16, "topk": 2, "full_layers": 1},
        "train": {"seq_length": 64},
    })
    distributed.set_seed(5)
    path = tmp_path_factory.mktemp("ckpt") / "step_00000001"
    save_model_checkpoint(path, build_model(cfg), cfg)
    return path


def test_repeated_tokens_repeat_and_avoid_the_special_ids():
    tokens = repeated_random_tokens(3, 40, VOCAB, seed=2)
    assert tokens.shape == (3, 80)
    np.testing.assert_array_equal(tokens[:, :40], tokens[:, 40:])
    assert tokens.min() >= FIRST_TOKEN and tokens.max() < VOCAB and len(np.unique(tokens)) > 40
    positions = query_positions(40, 10, seed=2)
    assert len(positions) == 10 and positions.min() >= 40 and positions.max() < 80
    np.testing.assert_array_equal(query_positions(40, 99), np.arange(40, 80))


@pytest.mark.parametrize("queries", [7, SEGMENT], ids=["sampled", "every"])
def test_scores_equal_the_attention_weights_of_hugging_faces_eager_llama(checkpoint, tmp_path, queries):
    """The probe reads q and k inside Megatron's layers; the reference is Hugging Face's own RoPE, GQA and softmax
    over the exported weights. Every layer attends densely in both, as the probe scores each layer; with the
    trained MoBA layers the first layer's inputs, and so its scores, are the same."""
    convert.export_hf(checkpoint, tmp_path / "hf", dtype=torch.float32)
    kwargs = dict(segment_length=SEGMENT, sequences=3, queries=queries, batch_size=2, seed=4)
    result = induction_scores(load_model(checkpoint, ["attention.mode=full"]), **kwargs)
    as_trained = induction_scores(load_model(checkpoint), **kwargs)
    assert as_trained["layers"]["layer_00"]["heads"] == pytest.approx(result["layers"]["layer_00"]["heads"], rel=1e-5)
    assert as_trained["layers"]["layer_01"]["heads"] != pytest.approx(result["layers"]["layer_01"]["heads"], rel=1e-3)
    hf = LlamaForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager").eval()
    tokens = torch.from_numpy(repeated_random_tokens(3, SEGMENT, VOCAB, seed=4))
    with torch.no_grad():
        attentions = hf(tokens, output_attentions=True).attentions  # per layer [b, H, s, s]
    positions = torch.from_numpy(query_positions(SEGMENT, queries, seed=4))
    assert result["queries"] == len(positions)
    for layer, weights in enumerate(attentions):
        expected = weights[:, :, positions, positions - SEGMENT + 1].mean((0, 2))
        got = torch.tensor(result["layers"][f"layer_{layer:02d}"]["heads"])
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)
        assert result["layers"][f"layer_{layer:02d}"]["max"] == pytest.approx(expected.max().item(), rel=1e-4)
    best = [result["layers"][f"layer_{layer:02d}"]["max"] for layer in range(3)]
    assert result["ranking"] == sorted(range(3), key=lambda layer: -best[layer])


def test_the_ranking_keeps_the_layers_whose_best_head_copies_most():
    scores = {"ranking": [4, 1, 5, 0, 2, 3]}
    assert probed_layer_kinds(scores, 2) == ["moba", "full", "moba", "moba", "full", "moba"]
    assert probed_layer_kinds(scores, 0) == ["moba"] * 6
    assert probed_layer_kinds(scores, 6) == ["full"] * 6
    with pytest.raises(ConfigError, match="cannot keep 7 full layers of a model of 6"):
        probed_layer_kinds(scores, 7)


def test_bad_sizes_are_one_clear_error(checkpoint):
    loaded = load_model(checkpoint)
    with pytest.raises(ConfigError, match="exceed the model's 128 positions; pass a segment length of at most 64"):
        induction_scores(loaded, segment_length=65)
    with pytest.raises(ConfigError, match="at least 2 tokens"):
        induction_scores(loaded, segment_length=1)
    with pytest.raises(ConfigError, match="vocabulary has only 10"):
        repeated_random_tokens(1, 4, 10)
