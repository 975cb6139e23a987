"""Recipe validation: every shipped recipe loads with the shapes it promises; each kind of mistake is
one ConfigError sentence naming the key (the CLI's exit code 2 is tested in tests/scripts)."""

from pathlib import Path

import pytest

from moba_train.config import ConfigError, load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("name", ["tiny_moba", "llama1b_moba_32k", "llama8b_moba"])
def test_shipped_recipes_validate(name):
    cfg = load_config(CONFIGS / f"{name}.yaml")
    assert cfg.train.warmup_steps < cfg.train.steps


def test_llama8b_recipe_has_the_llama31_8b_shape_and_hybrid_plan():
    cfg = load_config(CONFIGS / "llama8b_moba.yaml")
    m = cfg.model
    shape = (m.num_layers, m.hidden_size, m.num_attention_heads, m.num_query_groups, m.ffn_hidden_size, m.vocab_size)
    assert shape == (32, 4096, 32, 8, 14336, 128256)
    assert m.rope_theta == 500000.0
    assert (m.rope_scaling.factor, m.rope_scaling.low_freq_factor, m.rope_scaling.high_freq_factor,
            m.rope_scaling.original_max_position_embeddings) == (8.0, 1.0, 4.0, 8192)
    assert (cfg.attention.block_size, cfg.attention.topk) == (4096, 12)
    assert cfg.layer_kinds() == ["moba"] * 29 + ["full"] * 3
    assert (cfg.parallel.tensor, cfg.parallel.context) == (8, 4)


def test_llama1b_recipe_has_the_notes_shape_at_32k():
    cfg = load_config(CONFIGS / "llama1b_moba_32k.yaml")
    m = cfg.model
    shape = (m.num_layers, m.hidden_size, m.num_attention_heads, m.num_query_groups, m.ffn_hidden_size, m.vocab_size)
    assert shape == (16, 2048, 32, 8, 8192, 32768)
    assert cfg.train.seq_length == 32768 and cfg.train.seq_length % cfg.attention.block_size == 0


def test_the_sparser_32k_recipe_differs_from_the_1b_recipe_only_in_its_blocks_and_name():
    dense, sparse = (load_config(CONFIGS / name).model_dump() for name in ("llama1b_moba_32k.yaml",
                                                                            "llama1b_moba_32k_b512.yaml"))
    assert (sparse["attention"]["block_size"], sparse["attention"]["topk"]) == (512, 3)
    for changed in ("attention", "run"):
        dense.pop(changed), sparse.pop(changed)
    assert sparse == dense


def test_the_128k_recipe_differs_from_the_sparser_32k_one_in_length_blocks_recompute_and_batch_only():
    short, long = (load_config(CONFIGS / name).model_dump() for name in ("llama1b_moba_32k_b512.yaml",
                                                                         "llama1b_moba_128k.yaml"))
    attention = long["attention"]
    assert (attention["block_size"], attention["topk"], attention["full_layers"]) == (1024, 3, 2)
    assert (long["train"]["seq_length"], long["model"]["max_position_embeddings"]) == (131072, 131072)
    assert long["train"]["recompute"] == "selective"
    assert long["train"]["global_batch_size"] * long["train"]["seq_length"] == 262144  # as the 32K recipes' step
    for section, keys in (("attention", ("block_size", "topk")), ("train", ("seq_length", "recompute",
                                                                             "global_batch_size")),
                          ("model", ("max_position_embeddings",))):
        for key in keys:
            short[section].pop(key), long[section].pop(key)
    short.pop("run"), long.pop("run")
    assert long == short


def test_overrides_apply_on_top_of_the_recipe():
    overrides = ["train.lr=1e-5", "train.min_lr=0", "attention.topk=8", "attention.layer_kinds=[full,moba,full]"]
    cfg = load_config(CONFIGS / "tiny_moba.yaml", overrides)
    assert cfg.train.lr == 1e-5 and cfg.attention.topk == 8
    assert cfg.layer_kinds() == ["full", "moba", "full"]


@pytest.mark.parametrize(
    "overrides, fragments",
    [
        (["train.lrr=1e-5"], ["unknown key 'train.lrr'", "did you mean 'train.lr'"]),
        (["train.steps=many"], ["'train.steps'", "'many'"]),
        (["attention.block_size=8"], ["'attention.block_size'", "greater than or equal to 16"]),
        (["train.warmup_steps=100", "train.steps=100"], ["warmup_steps (100) must be smaller than steps (100)"]),
        (["train.lr"], ["not of the form section.key=value"]),
        (["model.init_from_hf=/hf/llama", "model.transformer_impl=te"],
         ["'model'", "init_from_hf fills the local layer spec's parameters", "checkpoint.init_from"]),
    ],
)
def test_each_mistake_is_one_sentence_naming_the_key(overrides, fragments):
    with pytest.raises(ConfigError) as err:
        load_config(CONFIGS / "tiny_moba.yaml", overrides)
    message = str(err.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message


@pytest.mark.parametrize("override, section, key", [("run.name=2024", "run", "name"),
                                                     ("data.split=100", "data", "split")])
def test_a_text_key_takes_a_value_that_yaml_would_read_as_a_number(override, section, key):
    cfg = load_config(CONFIGS / "tiny_moba.yaml", [override])
    assert getattr(getattr(cfg, section), key) == override.split("=")[1]


def test_a_home_relative_output_directory_is_expanded_once_for_every_reader(tmp_path, monkeypatch):
    # The trainer, the SLURM submission and its after-attempt step must all mean the same directory.
    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = load_config(CONFIGS / "tiny_moba.yaml", ["run.output_dir=~/runs/x", "checkpoint.dir=~/ckpt",
                                                   "data.cache_dir=~/cache"])
    assert (cfg.run.output_dir, cfg.checkpoint.dir, cfg.data.cache_dir) == (
        f"{tmp_path}/runs/x", f"{tmp_path}/ckpt", f"{tmp_path}/cache")


def test_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_a_directory_or_an_empty_recipe_is_a_config_error(tmp_path):
    """An empty recipe would train the defaults (32K tokens, runs/moba) as if they had been asked for."""
    with pytest.raises(ConfigError, match=f"'{tmp_path}' is a directory, not a recipe"):
        load_config(tmp_path)
    for text in ("", "# nothing yet\n"):
        (tmp_path / "empty.yaml").write_text(text)
        with pytest.raises(ConfigError, match="empty.yaml: the recipe is empty; .*configs/tiny_moba.yaml"):
            load_config(tmp_path / "empty.yaml")


def test_progress_bar_accepts_yaml_on_off_words():
    assert load_config(CONFIGS / "tiny_moba.yaml", ["logging.progress_bar=off"]).logging.progress_bar == "off"
    assert load_config(CONFIGS / "tiny_moba.yaml", ["logging.progress_bar=on"]).logging.progress_bar == "on"


@pytest.mark.parametrize(
    "text, message",
    [
        ("train:\n  lr: 1.0e-3\n  steps: 10\n  lr: 2.0e-3\n", "key 'train.lr' appears twice (lines 2 and 4)"),
        ("train:\n  steps: 10\nmodel:\n  num_layers: 2\ntrain:\n  lr: 1.0\n",
         "key 'train' appears twice (lines 1 and 5)"),
        ("attention:\n  layer_kinds: [moba, full]\n  mode: moba\n  mode: full\n",
         "key 'attention.mode' appears twice (lines 3 and 4)"),
    ],
    ids=["key", "section", "after-a-list"],
)
def test_a_key_repeated_in_a_recipe_is_refused_naming_the_key_and_both_lines(tmp_path, text, message):
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value) == f"{path}: {message}; keep one of them"


def test_yaml_merge_keys_may_override_what_they_merge(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text("train:\n  <<: {lr: 1.0e-3, steps: 10, warmup_steps: 2}\n  lr: 2.0e-3\n")
    cfg = load_config(path)
    assert (cfg.train.lr, cfg.train.steps, cfg.train.warmup_steps) == (2.0e-3, 10, 2)
