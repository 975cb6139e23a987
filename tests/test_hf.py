"""MoBA inside transformers: an exported model under attn_implementation="moba" equals eager
attention when top-k covers every block, equals our Megatron MoBA model at small top-k, honours
padding, decodes with full attention over the KV cache, and refuses masks it cannot honour."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import WhitespaceSplit
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from moba_train import convert, distributed
from moba_train.config import Config
from moba_train.hf import moba_attention_forward, register_moba
from moba_train.model import build_model

VOCAB = 250
SEQ = 70
BLOCK = 16


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A random GQA Llama, imported and exported again (the path users take), and its directory."""
    root = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         initializer_range=0.2, tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(root / "source")
    words = WordLevel({f"w{i}": i for i in range(VOCAB)}, unk_token="w0")
    tokenizer = Tokenizer(words)
    tokenizer.pre_tokenizer = WhitespaceSplit()
    tokenizer.decoder = decoders.WordPiece(prefix="##")
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="w0").save_pretrained(root / "source")
    convert.import_hf(root / "source", root / "ckpt")
    convert.export_hf(root / "ckpt", root / "exported")
    return root


def load(path, attn: str) -> LlamaForCausalLM:
    return AutoModelForCausalLM.from_pretrained(path / "exported", attn_implementation=attn).eval()


def tokens(batch: int = 2, length: int = SEQ, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("attn", ["moba", "moba_naive"])
def test_moba_with_topk_covering_every_block_equals_eager(exported, attn):
    register_moba(block_size=BLOCK, topk=math.ceil(SEQ / BLOCK))
    with torch.no_grad():
        expected = load(exported, "eager")(tokens()).logits
        got = load(exported, attn)(tokens()).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)


def test_moba_with_small_topk_matches_our_megatron_moba_model(exported):
    register_moba(block_size=BLOCK, topk=2)
    with torch.no_grad():
        got = load(exported, "moba")(tokens()).logits
        eager = load(exported, "eager")(tokens()).logits
    assert (got - eager).abs().max() > 0.1, "top-2 of 5 blocks must differ from full attention"
    model_cfg = convert.model_config_from_hf(convert.read_hf_config(exported / "exported"))
    cfg = Config.model_validate({"model": model_cfg.model_dump(), "attention": {"block_size": BLOCK, "topk": 2},
                                 "train": {"seq_length": SEQ}})
    distributed.init_distributed(cfg)
    try:
        distributed.set_seed(0)
        model = build_model(cfg).eval()
        convert.load_hf_weights(model, exported / "exported", cfg)
        with torch.no_grad():
            ours = model(tokens(), torch.arange(SEQ).expand(2, -1), attention_mask=None)[..., :VOCAB]
    finally:
        distributed.destroy_distributed()
    torch.testing.assert_close(got, ours, rtol=0, atol=1e-4)


def test_moba_auto_backend_on_long_prompts_equals_the_naive_definition(exported):
    """300 tokens x 4 heads is past the naive backend's size on CPU: "moba" runs the torch backend."""
    register_moba(block_size=BLOCK, topk=3)
    long = tokens(batch=1, length=300)
    with torch.no_grad():
        got = load(exported, "moba")(long).logits
        expected = load(exported, "moba_naive")(long).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_rows_equal_each_row_run_alone(exported, side):
    register_moba(block_size=BLOCK, topk=2)
    model = load(exported, "moba")
    toks, pad = tokens(), 21
    mask = torch.ones_like(toks)
    real = slice(pad, None) if side == "left" else slice(None, SEQ - pad)
    mask[1] = 0
    mask[1, real] = 1
    position_ids = (mask.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        batched = model(toks, attention_mask=mask, position_ids=position_ids).logits
        alone = [model(toks[:1]).logits[0], model(toks[1:, real]).logits[0]]
    torch.testing.assert_close(batched[0], alone[0], rtol=0, atol=1e-4)
    torch.testing.assert_close(batched[1, real], alone[1], rtol=0, atol=1e-4)


def test_greedy_generation_with_covering_topk_equals_eager(exported):
    register_moba(block_size=BLOCK, topk=8)
    prompt = tokens(batch=1, length=50)
    with torch.no_grad():
        expected = load(exported, "eager").generate(prompt, max_new_tokens=12, do_sample=False)
        got = load(exported, "moba").generate(prompt, max_new_tokens=12, do_sample=False)
    assert torch.equal(got, expected)


def test_decoding_against_a_kv_cache_is_full_attention(exported):
    """Query length != key length (a decode step, or a chunk appended to a cache): plain causal
    attention of the new queries over every cached key, whatever the top-k."""
    module = load(exported, "moba").model.layers[0].self_attn
    gen = torch.Generator().manual_seed(2)
    query = torch.randn(2, 4, 3, 16, generator=gen)
    key, value = torch.randn(2, 2, 40, 16, generator=gen), torch.randn(2, 2, 40, 16, generator=gen)
    causal = torch.ones(3, 40, dtype=torch.bool).tril(diagonal=37)[None, None].expand(2, 1, -1, -1)
    out, _ = moba_attention_forward(module, query, key, value, causal, scaling=0.25, block_size=BLOCK, topk=1,
                                    backend="naive")
    k, v = key.repeat_interleave(2, dim=1), value.repeat_interleave(2, dim=1)
    probs = torch.softmax((query @ k.transpose(-1, -2) * 0.25).masked_fill(~causal, float("-inf")), dim=-1)
    torch.testing.assert_close(out, (probs @ v).transpose(1, 2), rtol=1e-5, atol=1e-5)


def test_masks_other_than_causal_with_padding_are_refused(exported):
    register_moba(block_size=BLOCK, topk=2)
    model = load(exported, "moba")
    window = torch.ones(SEQ, SEQ, dtype=torch.bool).tril() & ~torch.ones(SEQ, SEQ, dtype=torch.bool).tril(-8)
    with pytest.raises(ValueError, match="causal masks with padding only"), torch.no_grad():
        model(tokens(), attention_mask=window[None, None].expand(2, 1, -1, -1))


def test_register_moba_rejects_nonpositive_settings():
    with pytest.raises(ValueError, match="must be positive"):
        register_moba(block_size=0, topk=2)


def test_example_generates_the_same_text_with_moba_covering_topk_as_with_full_attention(exported):
    spec = importlib.util.spec_from_file_location("llama_example", Path(__file__).parents[1] / "examples/llama.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    prompt = " ".join(f"w{i}" for i in tokens(batch=1, length=40)[0].tolist())
    texts = {
        attn: example.generate(str(exported / "exported"), attn, prompt, block_size=BLOCK, topk=4, max_new_tokens=8)
        for attn in ("moba", "full")
    }
    assert texts["moba"].startswith(prompt) and len(texts["moba"].split()) > 40  # stops early at eos (w2)
    assert texts["moba"] == texts["full"]
