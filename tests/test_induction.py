"""The induction probe (moba_train/induction.py) on tiny CPU models: its scores equal the attention weights that
Hugging Face's eager Llama returns for the same weights and tokens; in a hand-built model whose middle layer
completes an induction circuit, that layer scores near 1, the others near 0, and it is the one kept full; the
ranking keeps the layers whose best head copies most, and only layers that copy at all; bad sizes are one clear
error."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from moba_train import convert, distributed
from moba_train.checkpointing import save_model_checkpoint
from moba_train.config import Config, ConfigError
from moba_train.evaluation import load_model
from moba_train.induction import (
    COPYING,
    FIRST_TOKEN,
    copying_layers,
    induction_scores,
    placement,
    probed_layer_kinds,
    query_positions,
    repeated_random_tokens,
    uniform_score,
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


@pytest.fixture(scope="module")
def copier(tmp_path_factory):
    """A 3-layer Llama (Hugging Face directory) with hand-set weights whose layers 0 and 1 form an induction
    circuit and whose layer 2 attends uniformly (zero q and k). Residual stream: the token one-hot (dims 0-63),
    the previous token's one-hot (64-127, written by layer 0), a constant (128).
    - Layer 0, head 0, attends to the token before the query by position: q and k come from the constant, in the
      six fastest RoPE pairs, k turned one step ahead, so q.k peaks at a distance of 1.
    - Layer 1, head 0, attends by content: q is a random unit code of the current token, k the code of the
      previous token, in the slowest RoPE pairs (a turn below 0.01 rad over these lengths): the query finds the
      token after its token's earlier occurrence."""
    vocab, hidden, head_dim, theta = 64, 192, 64, 1e7
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=16, num_hidden_layers=3,
                         num_attention_heads=3, num_key_value_heads=3, head_dim=head_dim, max_position_embeddings=256,
                         rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": theta},
                         tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    state = {name: torch.zeros_like(t) for name, t in model.state_dict().items()}
    const, half = 128, head_dim // 2
    state["model.embed_tokens.weight"][torch.arange(vocab), torch.arange(vocab)] = 1
    state["model.embed_tokens.weight"][:, const] = 1
    first, second = "model.layers.0.self_attn.", "model.layers.1.self_attn."
    for i in range(6):  # RoPE pair (i, i + 32) turns omega_i = theta^(-2i / head_dim) per position
        omega = theta ** (-2 * i / head_dim)
        state[first + "q_proj.weight"][i, const] = 2.0
        state[first + "k_proj.weight"][i, const] = 2.0 * math.cos(omega)
        state[first + "k_proj.weight"][i + half, const] = 2.0 * math.sin(omega)
    norm = math.sqrt(hidden / 2)  # RMSNorm of an embedding (two ones): each one becomes sqrt(hidden / 2)
    for token in range(vocab):
        state[first + "v_proj.weight"][token, token] = 1
        state[first + "o_proj.weight"][vocab + token, token] = 1 / norm
    slow = [*range(16, half), *range(half + 16, head_dim)]
    codes = torch.nn.functional.normalize(torch.randn(vocab, len(slow), generator=torch.Generator().manual_seed(0)),
                                          dim=1)
    for m, dim in enumerate(slow):
        state[second + "q_proj.weight"][dim, :vocab] = 4.0 * codes[:, m]
        state[second + "k_proj.weight"][dim, vocab:2 * vocab] = codes[:, m]
    for name in state:
        if name.endswith("layernorm.weight") or name == "model.norm.weight":
            state[name] += 1  # MLPs stay zero: they add nothing
    model.load_state_dict(state)
    path = tmp_path_factory.mktemp("copier")
    model.save_pretrained(path)
    return path


def test_a_hand_built_induction_circuit_is_found_in_its_layer_and_kept_full(copier):
    result = induction_scores(load_model(copier), segment_length=20, sequences=4, queries=20, seed=1)
    best = [result["layers"][f"layer_{layer:02d}"]["max"] for layer in range(3)]
    # Closed form of the circuit: at query t the head spreads its weight evenly over the keys s <= t whose previous
    # token is the query's (key 0 reads itself as its previous token); the earlier copy's is one of them.
    tokens = repeated_random_tokens(4, 20, 64, seed=1)
    previous = np.concatenate([tokens[:, :1], tokens[:, :-1]], axis=1)
    shares = [1 / np.sum(previous[b, :t + 1] == tokens[b, t]) for b in range(4) for t in range(20, 40)]
    assert 0.5 < np.mean(shares) < 0.95  # the random tokens repeat inside a copy, and the test says so
    assert best[1] == pytest.approx(np.mean(shares), abs=0.02)
    uniform = np.mean([1 / (t + 1) for t in range(20, 40)])  # a head with zero q and k: every earlier key alike
    assert result["layers"]["layer_00"]["heads"][0] < 0.01  # the previous-token head
    assert best[0] == pytest.approx(uniform, rel=1e-4) and best[2] == pytest.approx(uniform, rel=1e-4)
    assert result["ranking"][0] == 1 and probed_layer_kinds(result, 1) == ["moba", "full", "moba"]


def test_the_probed_override_builds_the_hugging_face_model_as_the_hybrid_it_names(copier):
    """README, "Evaluation": the override the probe prints for a Hugging Face directory, passed with MoBA on, builds
    that model with full attention in the layer that copies and MoBA elsewhere, its weights the directory's."""
    from moba_train.core_attention import FullCoreAttention, MoBACoreAttention

    try:
        kinds = probed_layer_kinds(induction_scores(load_model(copier), segment_length=20, sequences=2, queries=8), 1)
        loaded = load_model(copier, ["attention.mode=moba", "attention.block_size=16", "attention.topk=2",
                                     f"attention.layer_kinds=[{','.join(kinds)}]"])
    finally:
        distributed.destroy_distributed()
    assert kinds == ["moba", "full", "moba"]
    built = [type(m) for m in loaded.model.modules() if isinstance(m, (FullCoreAttention, MoBACoreAttention))]
    assert built == [MoBACoreAttention, FullCoreAttention, MoBACoreAttention]
    hf = LlamaForCausalLM.from_pretrained(copier).state_dict()
    embedding = next(w for name, w in loaded.model.named_parameters() if name.endswith("word_embeddings.weight"))
    assert torch.equal(embedding[:64].float(), hf["model.embed_tokens.weight"].float())


def _scores(best: list[float], segment: int = 256, queries: int = 64, seed: int = 0) -> dict:
    """A probe's record with these best-head scores, ranked as induction_scores ranks them."""
    ranking = sorted(range(len(best)), key=lambda layer: (-best[layer], -layer))
    return {"segment_length": segment, "queries": queries, "seed": seed, "ranking": ranking,
            "layers": {f"layer_{layer:02d}": {"heads": [b], "max": b, "mean": b} for layer, b in enumerate(best)}}


def test_the_ranking_keeps_the_layers_whose_best_head_copies_most():
    scores = _scores([0.3, 0.6, 0.1, 0.05, 0.7, 0.5])  # all far above the uniform weight (about 0.0027)
    assert scores["ranking"] == [4, 1, 5, 0, 2, 3]
    assert probed_layer_kinds(scores, 2) == ["moba", "full", "moba", "moba", "full", "moba"]
    assert probed_layer_kinds(scores, 0) == ["moba"] * 6
    assert probed_layer_kinds(scores, 6) == ["full"] * 6
    assert placement(scores, 6)["note"] == ""
    with pytest.raises(ConfigError, match="cannot keep 7 full layers of a model of 6"):
        probed_layer_kinds(scores, 7)


def test_layers_that_do_not_copy_are_not_placed_by_the_probe_and_the_run_is_told():
    """A layer whose best head is within COPYING x of uniform attention's weight does not copy: where fewer layers
    copy than are kept full, the rest are the last layers (the layout without the probe), and the note says so."""
    positions = query_positions(256, 64, seed=0)
    uniform = float(np.mean(1 / (positions + 1)))  # the definition, from the positions the probe draws
    assert uniform_score(_scores([0.0] * 4)) == pytest.approx(uniform, rel=1e-12)
    assert 1 / 512 < uniform < 1 / 257
    at = COPYING * uniform
    # layer 1 copies; layers 0 and 2 score just below the threshold (above uniform, so the ranking alone would
    # place layer 2 next); the rest is noise around the uniform weight, as random weights give
    scores = _scores([0.999 * at, 0.4, 0.99 * at, 1.1 * uniform, 0.9 * uniform])
    assert copying_layers(scores) == [1]
    assert probed_layer_kinds(scores, 1) == ["moba", "full", "moba", "moba", "moba"]
    assert placement(scores, 1)["note"] == ""
    assert probed_layer_kinds(scores, 2) == ["moba", "full", "moba", "moba", "full"]
    assert probed_layer_kinds(scores, 3) == ["moba", "full", "moba", "full", "full"]
    note = placement(scores, 2)["note"]
    assert note.startswith("only 1 layer(s) copy") and "so 1 full layer(s) stay last" in note
    at_threshold = _scores([at, 0.4, 0.99 * at, uniform, uniform])
    assert copying_layers(at_threshold) == [1, 0]
    assert probed_layer_kinds(at_threshold, 2) == ["full", "full", "moba", "moba", "moba"]
    noise = _scores([1.2 * uniform, 0.8 * uniform, 1.5 * uniform])  # a random model: nothing to place by
    assert copying_layers(noise) == [] and probed_layer_kinds(noise, 1) == ["moba", "moba", "full"]
    assert placement(noise, 1)["note"].startswith("only 0 layer(s) copy")


def test_the_threshold_keeps_every_committed_probe_of_the_quality_study():
    """Each probed start of bench/results/quality chose its layers before COPYING existed: the rule must choose them
    again (a threshold above 21x would move seed 5555's second full layer)."""
    import json
    from pathlib import Path

    probes = [json.loads(path.read_text()).get("probe")
              for path in sorted((Path(__file__).parents[1] / "bench/results/quality").glob("*/study.json"))]
    probes = [probe for probe in probes if probe]
    assert len(probes) >= 10
    for probe in probes:
        placed = placement(probe, probe["full_layers"])
        assert placed["layer_kinds"] == probed_layer_kinds(probe, probe["full_layers"]) == probe["layer_kinds"]
        assert len(copying_layers(probe)) >= probe["full_layers"] and placed["note"] == ""


def test_bad_sizes_are_one_clear_error(checkpoint):
    loaded = load_model(checkpoint)
    with pytest.raises(ConfigError, match="exceed the model's 128 positions; pass a segment length of at most 64"):
        induction_scores(loaded, segment_length=65)
    with pytest.raises(ConfigError, match="at least 2 tokens"):
        induction_scores(loaded, segment_length=1)
    with pytest.raises(ConfigError, match="vocabulary has only 10"):
        repeated_random_tokens(1, 4, 10)
