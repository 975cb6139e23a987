"""HF Llama <-> our checkpoints: logits match transformers after import (MHA, GQA, MQA, tied,
Llama 3.1 RoPE scaling, explicit head_dim), import -> export is lossless, tensor-parallel loading and
resharding match, every bad input gets one clear error."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import yaml
from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

from moba_train import checksums, convert, distributed
from moba_train.checkpointing import load_model_weights
from moba_train.config import Config
from moba_train.model import build_model

VOCAB = 250
SEQ = 40
REPO = Path(__file__).resolve().parents[1]

VARIANTS = {
    "mha": dict(num_attention_heads=4, num_key_value_heads=4),
    "gqa": dict(num_attention_heads=4, num_key_value_heads=2),
    "mqa": dict(num_attention_heads=4, num_key_value_heads=1),
    "tied": dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
    "llama31_rope": dict(
        num_attention_heads=4, num_key_value_heads=2,
        rope_parameters={"rope_type": "llama3", "rope_theta": 50000.0, "factor": 4.0, "low_freq_factor": 2.0,
                         "high_freq_factor": 8.0, "original_max_position_embeddings": 16},
    ),
    "head_dim_24": dict(num_attention_heads=4, num_key_value_heads=2, head_dim=24),
}


def save_llama(
    path: Path, dtype: torch.dtype = torch.float32, max_shard_size: str | None = None, **overrides
) -> LlamaForCausalLM:
    """A random 2-layer Llama saved with save_pretrained; weights large enough for peaked attention."""
    fields = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128, initializer_range=0.2, rms_norm_eps=1e-5,
                  tie_word_embeddings=False)
    fields.update(overrides)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**fields)).to(dtype).eval()
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, **kwargs)
    return model


def tokens(batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, SEQ), generator=torch.Generator().manual_seed(seed))


def recipe(hf_dir: Path, tp: int = 1) -> Config:
    model = convert.model_config_from_hf(convert.read_hf_config(hf_dir))
    raw = {"model": model.model_dump(), "attention": {"mode": "full"}, "parallel": {"tensor": tp}}
    return Config.model_validate(raw)


def megatron_logits(model, toks: torch.Tensor) -> torch.Tensor:
    """Logits [b, s, VOCAB], gathered over tensor-parallel ranks (the output layer splits the vocabulary)."""
    position_ids = torch.arange(toks.shape[1]).expand_as(toks)
    with torch.no_grad():
        logits = model(toks, position_ids, attention_mask=None)
    return gather_from_tensor_model_parallel_region(logits)[..., :VOCAB]


@pytest.fixture(scope="module")
def single_process():
    distributed.init_distributed(Config.model_validate({"attention": {"mode": "full"}}))
    distributed.set_seed(1)
    yield
    distributed.destroy_distributed()


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_imported_model_logits_match_transformers(tmp_path, single_process, variant):
    hf = save_llama(tmp_path, **VARIANTS[variant])
    cfg = recipe(tmp_path)
    model = build_model(cfg).eval()
    convert.load_hf_weights(model, tmp_path, cfg)
    with torch.no_grad():
        expected = hf(tokens()).logits
    assert expected.std() > 0.5
    torch.testing.assert_close(megatron_logits(model, tokens()), expected, rtol=0, atol=1e-4)


@pytest.mark.parametrize("variant", ["gqa", "tied"])
def test_gradients_of_a_masked_loss_match_transformers(tmp_path, single_process, variant):
    """Training, not only inference, is the reference's: the gradient of a loss on a few tokens (the sparse
    loss masks of the recall task) reaches every weight as transformers' autograd computes it."""
    hf = save_llama(tmp_path, **VARIANTS[variant]).train()
    cfg = recipe(tmp_path)
    cfg.model.make_vocab_size_divisible_by = 2  # no padded rows: their logits (0) would join the softmax
    model = build_model(cfg)
    convert.load_hf_weights(model, tmp_path, cfg)
    toks = tokens(batch=2, seed=3)
    inputs, labels = toks[:, :-1], toks[:, 1:]
    mask = torch.zeros(labels.shape)
    mask[:, -6:] = 1  # the loss on the last six tokens only
    per_token = model(inputs, torch.arange(inputs.shape[1]).expand_as(inputs), attention_mask=None, labels=labels)
    ((per_token * mask).sum() / mask.sum()).backward()
    logits = hf(input_ids=inputs).logits
    reference = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none")
    ((reference * mask.flatten()).sum() / mask.sum()).backward()
    grads = {name: param.grad for name, param in model.named_parameters()}
    ours = dict(convert.hf_tensors_from_megatron(grads, cfg.model))
    for name, param in hf.named_parameters():
        assert param.grad.norm() > 0, name
        torch.testing.assert_close(ours[name], param.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_config_mapping_reads_published_rope_scaling_form():
    published = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336,
        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
        "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "tie_word_embeddings": False,
        "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    }
    ours = convert.model_config_from_hf(published)
    theirs = LlamaConfig.from_dict(published)
    assert ours.rope_theta == theirs.rope_parameters["rope_theta"] == 500000.0
    assert ours.rope_scaling.model_dump() == {k: theirs.rope_parameters[k] for k in ours.rope_scaling.model_dump()}
    assert (ours.num_query_groups, ours.head_dim, ours.ffn_hidden_size) == (8, 128, 14336)
    assert convert.model_config_from_hf(convert.hf_config_from_model(ours, torch.bfloat16)) == ours


def test_import_then_export_returns_identical_tensors_and_config(tmp_path):
    source = tmp_path / "hf"
    save_llama(source, dtype=torch.bfloat16, max_shard_size="100KB", **VARIANTS["llama31_rope"])
    assert (source / "model.safetensors.index.json").is_file()
    (source / "tokenizer_config.json").write_text('{"model_max_length": 128}')
    convert.import_hf(source, tmp_path / "ckpt")
    convert.export_hf(tmp_path / "ckpt", tmp_path / "out")

    def tensors(path: Path) -> dict[str, torch.Tensor]:
        return {k: v for f in convert.safetensors_files(path) for k, v in load_file(f).items()}

    before, after = tensors(source), tensors(tmp_path / "out")
    assert before.keys() == after.keys()
    for name in before:
        assert after[name].dtype == torch.bfloat16 and torch.equal(before[name], after[name]), name
    assert json.loads((tmp_path / "out/config.json").read_text()) == json.loads((source / "config.json").read_text())
    assert (tmp_path / "out/tokenizer_config.json").read_text() == '{"model_max_length": 128}'


def test_export_of_a_run_started_with_init_from_hf_keeps_the_source_config_and_tokenizer(tmp_path):
    save_llama(tmp_path / "hf", **VARIANTS["mqa"])
    (tmp_path / "hf/tokenizer.json").write_text("{}")
    convert.import_hf(tmp_path / "hf", tmp_path / "ckpt")
    shutil.rmtree(tmp_path / "ckpt/hf")  # now like a training run's checkpoint: config.yaml + weights
    recorded = Config.model_validate(yaml.safe_load((tmp_path / "ckpt/config.yaml").read_text()))
    recorded.model.init_from_hf = str(tmp_path / "hf")
    (tmp_path / "ckpt/config.yaml").write_text(recorded.to_yaml())
    checksums.write_manifest(tmp_path / "ckpt")  # the edit is deliberate: record it, or loading finds damage
    convert.export_hf(tmp_path / "ckpt", tmp_path / "out")
    exported, source = (json.loads((tmp_path / d / "config.json").read_text()) for d in ("out", "hf"))
    assert exported == source
    assert (tmp_path / "out/tokenizer.json").read_text() == "{}"


def test_export_of_a_gpu_run_whose_recipe_names_cuda_only_kernels_is_lossless(tmp_path):
    """A GPU run records its fused kernels (Liger's cross-entropy, our Triton RoPE) and maybe Transformer Engine;
    export runs on the CPU and must not refuse the checkpoint for them: none of them changes a parameter."""
    save_llama(tmp_path / "hf", dtype=torch.bfloat16, **VARIANTS["gqa"])
    convert.import_hf(tmp_path / "hf", tmp_path / "ckpt")
    shutil.rmtree(tmp_path / "ckpt/hf")
    recorded = yaml.safe_load((tmp_path / "ckpt/config.yaml").read_text())
    recorded["model"]["fusions"] = {"cross_entropy": "liger", "rope": "triton"}
    # Transformer Engine's layers keep the same checkpoint keys (Megatron-Core's local spec maps its norms to
    # TE's names), so export builds the local spec whatever the run used, with or without TE installed.
    recorded["model"]["transformer_impl"] = "te"
    (tmp_path / "ckpt/config.yaml").write_text(yaml.safe_dump(recorded))
    checksums.write_manifest(tmp_path / "ckpt")
    convert.export_hf(tmp_path / "ckpt", tmp_path / "out")
    before, after = (load_file(tmp_path / d / "model.safetensors") for d in ("hf", "out"))
    assert before.keys() == after.keys()
    assert all(torch.equal(before[name], after[name]) for name in before)


def test_export_writes_sharded_safetensors_that_transformers_loads(tmp_path, monkeypatch):
    hf = save_llama(tmp_path / "hf", tie_word_embeddings=True)
    convert.import_hf(tmp_path / "hf", tmp_path / "ckpt")
    monkeypatch.setattr(convert, "MAX_SHARD_BYTES", 60_000)
    convert.export_hf(tmp_path / "ckpt", tmp_path / "out")
    index = json.loads((tmp_path / "out/model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(tokens()).logits, hf(tokens()).logits, rtol=0, atol=0)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _tp2_worker(rank: int, port: int, hf_dir: Path, ckpt: Path, expected: torch.Tensor) -> None:
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    cfg = recipe(hf_dir, tp=2)
    distributed.init_distributed(cfg)
    try:
        distributed.set_seed(cfg.run.seed)
        from_hf = build_model(cfg).eval()
        convert.load_hf_weights(from_hf, hf_dir, cfg)
        resharded = build_model(cfg).eval()
        load_model_weights(ckpt, resharded)
        for model in (from_hf, resharded):
            torch.testing.assert_close(megatron_logits(model, tokens()), expected, rtol=0, atol=1e-4)
    finally:
        distributed.destroy_distributed()


def test_tensor_parallel_2_loads_hf_weights_and_reshards_the_import(tmp_path):
    hf = save_llama(tmp_path / "hf", **VARIANTS["gqa"])
    convert.import_hf(tmp_path / "hf", tmp_path / "ckpt")
    with torch.no_grad():
        expected = hf(tokens()).logits
    mp.spawn(_tp2_worker, args=(_free_port(), tmp_path / "hf", tmp_path / "ckpt", expected), nprocs=2, join=True)


# --- errors -----------------------------------------------------------------------------------


def test_missing_shard_is_named(tmp_path):
    save_llama(tmp_path, max_shard_size="100KB")
    shard = sorted(tmp_path.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(ValueError, match=f"shard '{shard.name}'.*missing"):
        convert.import_hf(tmp_path, tmp_path / "ckpt")


def test_missing_tensor_is_named(tmp_path, single_process):
    save_llama(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    del weights["model.layers.1.mlp.up_proj.weight"]
    save_file(weights, tmp_path / "model.safetensors")
    cfg = recipe(tmp_path)
    with pytest.raises(ValueError, match="lacks tensor 'model.layers.1.mlp.up_proj.weight'"):
        convert.load_hf_weights(build_model(cfg), tmp_path, cfg)


def test_directory_without_safetensors_is_refused(tmp_path):
    save_llama(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="no model.safetensors"):
        convert.import_hf(tmp_path, tmp_path / "ckpt")


@pytest.mark.parametrize(
    "edit, message",
    [
        ({"architectures": ["MistralForCausalLM"], "model_type": "mistral"}, "MistralForCausalLM model, not Llama"),
        ({"attention_bias": True}, "attention_bias=true"),
        ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
        ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}}, "RoPE type 'yarn'"),
    ],
)
def test_non_llama_configs_are_refused(tmp_path, edit, message):
    save_llama(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, **edit}))
    with pytest.raises(ValueError, match=message):
        convert.import_hf(tmp_path, tmp_path / "ckpt")


@pytest.mark.parametrize(
    "field, value",
    [("hidden_size", 128), ("num_attention_heads", 8), ("num_query_groups", 4), ("vocab_size", 256), ("num_layers", 3)],
)
def test_recipe_disagreeing_with_hf_config_names_the_field(tmp_path, field, value):
    save_llama(tmp_path)
    cfg = recipe(tmp_path)
    bad = cfg.model.model_copy(update={field: value})
    with pytest.raises(ValueError, match=f"recipe model.{field} is {value} but the Hugging Face checkpoint"):
        convert.check_recipe_matches(bad, tmp_path)


def test_export_of_a_directory_without_a_checkpoint_is_refused(tmp_path):
    with pytest.raises(ValueError, match="neither a complete checkpoint nor a directory holding one"):
        convert.export_hf(tmp_path, tmp_path / "out")


def test_script_exits_2_with_one_line_on_bad_input(tmp_path):
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts/convert_hf.py"), "import", str(tmp_path), str(tmp_path / "ckpt")],
        capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert result.returncode == 2
    expected = f"error: '{tmp_path}' has no config.json; pass a Hugging Face model directory"
    assert result.stderr.strip().splitlines() == [expected]  # no Megatron-Core import warnings before it


@pytest.mark.parametrize("cut", ["inside the header length", "inside the header", "inside the weights"])
def test_truncated_safetensors_file_is_named(tmp_path, cut):
    save_llama(tmp_path)
    weights = tmp_path / "model.safetensors"
    data = weights.read_bytes()
    header = 8 + int.from_bytes(data[:8], "little")
    weights.write_bytes(data[:{"inside the header length": 5, "inside the header": header // 2,
                               "inside the weights": (header + len(data)) // 2}[cut]])
    with pytest.raises(ValueError) as err:
        convert.import_hf(tmp_path, tmp_path / "ckpt")
    assert str(err.value).startswith(f"'{weights}' is not a complete safetensors file (")
    assert str(err.value).endswith("); it is truncated or damaged: download it again")
    assert "\n" not in str(err.value) and not (tmp_path / "ckpt").exists()


@pytest.mark.parametrize(
    "text, message",
    [
        ('{"architectures": ["LlamaForCausalLM"], "model_type": "lla', "is not valid JSON (line 1, column 55: "),
        ('["LlamaForCausalLM"]', "is not a JSON object"),
        ("drop hidden_size", "lacks 'hidden_size'; it is incomplete"),
        ("drop factor", "lacks 'factor'; it is incomplete"),
        ("hidden_size null", "has hidden_size=None"),
        ("heads do not divide", "has num_attention_heads=3, num_key_value_heads=2"),
    ],
)
def test_malformed_or_incomplete_config_json_is_one_line(tmp_path, text, message):
    save_llama(tmp_path, **VARIANTS["llama31_rope"])
    path = tmp_path / "config.json"
    config = json.loads(path.read_text())
    if text == "drop hidden_size":
        del config["hidden_size"]
    elif text == "drop factor":
        del config["rope_parameters"]["factor"]
    elif text == "hidden_size null":
        config["hidden_size"] = None
    elif text == "heads do not divide":
        config["num_attention_heads"] = 3
    path.write_text(text if text.startswith(("{", "[")) else json.dumps(config))
    with pytest.raises(ValueError) as err:
        convert.import_hf(tmp_path, tmp_path / "ckpt")
    assert str(err.value).startswith(f"'{path}' ") and message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(
    "edit, tensor, shape, implied",
    [
        ({"hidden_size": 128}, "lm_head.weight", [VOCAB, 64], [VOCAB, 128]),  # safetensors sorts the names
        ({"vocab_size": 256}, "lm_head.weight", [VOCAB, 64], [256, 64]),
        ({"intermediate_size": 128}, "model.layers.0.mlp.down_proj.weight", [64, 96], [64, 128]),
        ({"num_key_value_heads": 4}, "model.layers.0.self_attn.k_proj.weight", [32, 64], [64, 64]),
    ],
)
def test_weights_that_do_not_match_config_json_are_one_line(tmp_path, edit, tensor, shape, implied):
    save_llama(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, **edit}))
    with pytest.raises(ValueError) as err:
        convert.import_hf(tmp_path, tmp_path / "ckpt")
    assert str(err.value) == (f"tensor '{tensor}' has shape {shape} but '{tmp_path / 'config.json'}' implies "
                              f"{implied}; the weights do not belong to this config.json")


def exported_files(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir())


def test_import_refuses_a_target_holding_other_files_and_keeps_them(tmp_path):
    save_llama(tmp_path / "hf")
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt/notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="'.*ckpt' is not empty and is not an earlier import: choose a new or empty "
                                         "directory, or pass --overwrite to replace everything in it"):
        convert.import_hf(tmp_path / "hf", tmp_path / "ckpt")
    assert exported_files(tmp_path / "ckpt") == ["notes.txt"] and (tmp_path / "ckpt/notes.txt").read_text() == "mine"
    convert.import_hf(tmp_path / "hf", tmp_path / "ckpt", overwrite=True)
    assert "notes.txt" not in exported_files(tmp_path / "ckpt") and (tmp_path / "ckpt/hf/config.json").is_file()
    assert exported_files(tmp_path) == ["ckpt", "hf"]


def test_import_over_an_earlier_import_replaces_it(tmp_path):
    save_llama(tmp_path / "first", **VARIANTS["gqa"])
    second = save_llama(tmp_path / "second", **VARIANTS["mqa"])
    convert.import_hf(tmp_path / "first", tmp_path / "ckpt")
    convert.import_hf(tmp_path / "second", tmp_path / "ckpt")
    assert exported_files(tmp_path) == ["ckpt", "first", "second"]
    convert.export_hf(tmp_path / "ckpt", tmp_path / "out")
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(tokens()).logits, second(tokens()).logits, rtol=0, atol=0)


def test_export_over_an_earlier_export_leaves_no_stale_weights(tmp_path, monkeypatch):
    save_llama(tmp_path / "hf_a", tie_word_embeddings=True)
    b = save_llama(tmp_path / "hf_b", tie_word_embeddings=True, initializer_range=0.05)
    convert.import_hf(tmp_path / "hf_a", tmp_path / "ckpt_a")
    convert.import_hf(tmp_path / "hf_b", tmp_path / "ckpt_b")
    convert.export_hf(tmp_path / "ckpt_a", tmp_path / "out")
    assert "model.safetensors" in exported_files(tmp_path / "out")
    monkeypatch.setattr(convert, "MAX_SHARD_BYTES", 60_000)
    convert.export_hf(tmp_path / "ckpt_b", tmp_path / "out")
    index = json.loads((tmp_path / "out/model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    expected = ["config.json", "generation_config.json", "model.safetensors.index.json", *shards]
    assert exported_files(tmp_path / "out") == sorted(expected)
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(tokens()).logits, b(tokens()).logits, rtol=0, atol=0)
    assert exported_files(tmp_path) == ["ckpt_a", "ckpt_b", "hf_a", "hf_b", "out"]


def test_export_refuses_a_hugging_face_directory_it_did_not_write(tmp_path):
    save_llama(tmp_path / "hf")
    convert.import_hf(tmp_path / "hf", tmp_path / "ckpt")
    before = {p.name: p.read_bytes() for p in (tmp_path / "hf").iterdir()}
    with pytest.raises(ValueError, match="'.*hf' is not empty and is not an earlier export"):
        convert.export_hf(tmp_path / "ckpt", tmp_path / "hf")
    assert {p.name: p.read_bytes() for p in (tmp_path / "hf").iterdir()} == before


def test_interrupted_export_keeps_the_earlier_export(tmp_path, monkeypatch):
    save_llama(tmp_path / "hf")
    convert.import_hf(tmp_path / "hf", tmp_path / "ckpt")
    convert.export_hf(tmp_path / "ckpt", tmp_path / "out")
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    tensors = convert.hf_tensors_from_megatron

    def interrupted(state, model):
        for i, item in enumerate(tensors(state, model)):
            if i == 5:
                raise KeyboardInterrupt  # ^C in the middle of writing the weights
            yield item

    monkeypatch.setattr(convert, "MAX_SHARD_BYTES", 20_000)
    monkeypatch.setattr(convert, "hf_tensors_from_megatron", interrupted)
    with pytest.raises(KeyboardInterrupt):
        convert.export_hf(tmp_path / "ckpt", tmp_path / "out")
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == before
    assert exported_files(tmp_path) == ["ckpt", "hf", "out"]


def test_script_refuses_a_non_empty_target_in_one_line(tmp_path):
    save_llama(tmp_path / "hf")
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt/notes.txt").write_text("mine")
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts/convert_hf.py"), "import", str(tmp_path / "hf"), str(tmp_path / "ckpt")],
        capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: '{tmp_path / 'ckpt'}' is not empty")
    assert (tmp_path / "ckpt/notes.txt").read_text() == "mine"
