"""The trainer's `attention.full_layers_at: probe`: the induction probe (moba_train/induction.py) of the model
training starts from, run under the training's own parallel layout, places its full layers. References: the
single-process probe of the evaluation path (`load_model`, itself checked against Hugging Face's eager attention
in tests/test_induction.py), the hand-built copying circuit of tests/test_induction.py (its layer is known in
closed form), and a run that names the same layers in attention.layer_kinds."""

from __future__ import annotations

import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
import yaml
from test_induction import copier  # noqa: F401  (a module-scoped fixture: the hand-built copying circuit)
from transformers import LlamaConfig, LlamaForCausalLM

from moba_train import convert, distributed
from moba_train.checkpointing import latest_checkpoint
from moba_train.config import Config, ConfigError, load_config
from moba_train.evaluation import load_model
from moba_train.induction import PROBE_QUERIES, PROBE_SEQUENCES, induction_scores, probe_model, probe_start
from moba_train.study import trained_layer_kinds
from moba_train.training import train

SEQ = 64


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _recipe(hf_dir, **sections) -> dict:
    """MoBA with the probe, started from the Hugging Face model at `hf_dir` (its own model section)."""
    model = convert.model_config_from_hf(convert.read_hf_config(hf_dir)).model_dump()
    raw = {
        "run": {"device": "cpu", "seed": 7},
        "model": {**model, "init_from_hf": str(hf_dir)},
        "attention": {"mode": "moba", "block_size": 16, "topk": 2, "full_layers": 1, "full_layers_at": "probe"},
        "train": {"seq_length": SEQ, "steps": 2, "micro_batch_size": 1, "global_batch_size": 1, "warmup_steps": 1,
                  "log_interval": 1, "lr": 1e-3},
        "data": {"kind": "synthetic", "synthetic": {"num_facts": 2, "key_tokens": 1, "value_tokens": 1}},
        "checkpoint": {"interval": 1},
        "logging": {"progress_bar": "off"},
    }
    for section, values in sections.items():
        raw[section] = {**raw.get(section, {}), **values}
    return raw


@pytest.fixture(scope="module")
def sharp_llama(tmp_path_factory):
    """A random 3-layer GQA Llama (4 query heads, 2 KV heads) with large weights, so that heads attend sharply and
    their induction scores differ (near-uniform heads would hide a head-order mistake)."""
    config = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         initializer_range=0.6, tie_word_embeddings=False)
    torch.manual_seed(3)
    path = tmp_path_factory.mktemp("sharp_llama")
    LlamaForCausalLM(config).save_pretrained(path)
    return path


def _probe_worker(rank: int, world: int, port: int, tp: int, cp: int, raw: dict, want: dict) -> None:
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    cfg = Config.model_validate(raw)
    env = distributed.init_distributed(cfg)
    try:
        assert (env.tp, env.cp) == (tp, cp)
        distributed.set_seed(cfg.run.seed)  # as the trainer has before it probes
        got = probe_start(cfg, raw["model"]["init_from_hf"], hugging_face=True)
    finally:
        distributed.destroy_distributed()
    assert got["ranking"] == want["ranking"]
    for name, record in want["layers"].items():
        torch.testing.assert_close(torch.tensor(got["layers"][name]["heads"]), torch.tensor(record["heads"]),
                                   rtol=1e-4, atol=1e-6, msg=lambda m: f"rank {rank}, {name}: {m}")


@pytest.mark.parametrize("tp, cp", [(2, 2), (1, 2)], ids=["tp2xcp2", "cp2"])
def test_the_probe_under_tensor_and_context_parallelism_scores_as_one_process(sharp_llama, tp, cp):
    """Each rank holds some heads of a shard of every sequence; every rank must score all heads of whole sequences,
    head for head the evaluation path's single-process scores."""
    try:
        want = induction_scores(load_model(sharp_llama), segment_length=SEQ // 2, sequences=PROBE_SEQUENCES,
                                queries=PROBE_QUERIES, batch_size=1)
    finally:
        distributed.destroy_distributed()
    heads = [h for record in want["layers"].values() for h in record["heads"]]
    assert max(heads) > 2 * min(heads)  # the heads differ: a wrong head order or shard could not pass
    raw = _recipe(sharp_llama, parallel={"tensor": tp, "context": cp})
    mp.spawn(_probe_worker, args=(tp * cp, _free_port(), tp, cp, raw, want), nprocs=tp * cp, join=True)


def _losses(output_dir) -> list[float]:
    lines = (output_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["train/loss"] for line in lines]


def _saved_attention(output_dir) -> dict:
    return yaml.safe_load((latest_checkpoint(output_dir / "checkpoints") / "config.yaml").read_text())["attention"]


def test_the_trainer_keeps_the_copying_layer_full_and_trains_as_a_recipe_naming_it(copier, tmp_path, capsys):  # noqa: F811
    probed, named = tmp_path / "probed", tmp_path / "named"
    train(Config.model_validate(_recipe(copier, run={"output_dir": str(probed)})))
    out = capsys.readouterr().out
    assert "full attention in layers 2" in out, out[-2000:]
    record = json.loads((probed / "probe.json").read_text())
    assert record["layer_kinds"] == ["moba", "full", "moba"] and record["ranking"][0] == 1  # the circuit's layer
    assert _saved_attention(probed)["layer_kinds"] == ["moba", "full", "moba"]
    # What the quality study records of such a run (its arm recall_hybrid_probed): the probed layers, not the last.
    cfg = Config.model_validate(_recipe(copier, run={"output_dir": str(probed)}))
    kinds, summary = trained_layer_kinds(cfg)
    assert kinds == ["moba", "full", "moba"] != cfg.layer_kinds()
    assert summary["best_head_per_layer"] == [record["layers"][name]["max"] for name in record["layers"]]
    assert summary["copying_layers"] == [1] and summary["note"] == "" and summary["source"] == str(copier)
    # The one-process probe of scripts/probe_layers.py, given the training length, scores what the trainer did.
    try:
        alone = probe_model(copier, 1, [f"train.seq_length={SEQ}"], sequences=PROBE_SEQUENCES, queries=PROBE_QUERIES)
    finally:
        distributed.destroy_distributed()
    assert alone["segment_length"] == record["segment_length"] == SEQ // 2
    assert alone["layer_kinds"] == record["layer_kinds"]
    for name, layer in alone["layers"].items():
        assert record["layers"][name]["heads"] == pytest.approx(layer["heads"], rel=1e-5, abs=1e-7), name

    # The same hybrid named by hand: the same steps, loss for loss (the probe's model leaves no trace in the run).
    train(Config.model_validate(_recipe(copier, run={"output_dir": str(named)}, attention={
        "full_layers_at": "last", "layer_kinds": ["moba", "full", "moba"]})))
    assert _losses(probed) == _losses(named) and len(_losses(named)) == 2

    # Relaunched further, the run keeps the layers it trained with and probes nothing.
    capsys.readouterr()
    os.remove(probed / "probe.json")
    train(Config.model_validate(_recipe(copier, run={"output_dir": str(probed)}, train={"steps": 3})))
    out = capsys.readouterr().out
    assert "full attention in layers 2, as probed when this run started" in out and "at step 2" in out
    assert not (probed / "probe.json").exists()
    assert trained_layer_kinds(cfg) == (["moba", "full", "moba"], None)  # its checkpoint's kinds, no probe of its own
    assert _saved_attention(probed)["layer_kinds"] == ["moba", "full", "moba"] and len(_losses(probed)) == 3


def test_full_layers_beyond_the_copying_ones_stay_last_and_the_run_says_so(copier, tmp_path, capsys):  # noqa: F811
    """The circuit copies in layer 2 only (layers 1 and 3 attend uniformly, tests/test_induction.py): with 2 full
    layers the probe places one there and leaves the other last, warns, and records both in probe.json."""
    train(Config.model_validate(_recipe(copier, run={"output_dir": str(tmp_path)}, attention={"full_layers": 2})))
    out = capsys.readouterr().out
    assert "full attention in layers 2, 3" in out
    assert "warning: only 1 layer(s) copy" in out and "so 1 full layer(s) stay last" in out
    record = json.loads((tmp_path / "probe.json").read_text())
    assert record["copying_layers"] == [1] and record["layer_kinds"] == ["moba", "full", "full"]
    assert record["note"].startswith("only 1 layer(s) copy")
    assert _saved_attention(tmp_path)["layer_kinds"] == ["moba", "full", "full"]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["attention.full_layers=1", "attention.full_layers_at=probe"],
         "attention.full_layers_at=probe keeps full attention where the model training starts from copies, but no "
         "such model is set; set model.init_from_hf or checkpoint.init_from"),
        (["attention.full_layers=2", "attention.full_layers_at=probe", "checkpoint.init_from=runs/x",
          "attention.layer_kinds=[moba,moba,full]"],
         "attention.layer_kinds keeps 1 layers full but attention.full_layers is 2"),
    ],
    ids=["no-start", "disagreeing-kinds"],
)
def test_a_probe_without_a_start_or_with_other_layer_kinds_is_one_clear_error(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, ["model.num_layers=3", *overrides])


def test_the_dry_run_says_the_trainer_will_place_the_full_layers_by_the_probe():
    from pathlib import Path

    from moba_train.preflight import dry_run

    recipe = Path(__file__).resolve().parents[1] / "configs" / "llama8b_moba.yaml"
    probed = dry_run(load_config(recipe, ["model.init_from_hf=/hf/llama", "attention.full_layers_at=probe"]), 32)
    last = dry_run(load_config(recipe, ["model.init_from_hf=/hf/llama"]), 32)
    assert "3 full (where the starting model copies: the trainer probes it first)" in probed
    assert "3 full\n" in last and "probes" not in last


def test_a_run_relaunched_with_the_probe_places_the_full_layers_where_its_checkpoint_copies(copier, tmp_path, capsys):  # noqa: F811
    """A run trained with the last layer full, continued with attention.full_layers_at=probe: the probe reads the
    checkpoint it resumes (not the Hugging Face start), and the continued steps train the probed layout."""
    train(Config.model_validate(_recipe(copier, run={"output_dir": str(tmp_path)},
                                        attention={"full_layers_at": "last"})))
    assert _saved_attention(tmp_path)["layer_kinds"] is None  # the last layer full, by attention.full_layers
    resumed = latest_checkpoint(tmp_path / "checkpoints")
    capsys.readouterr()
    train(Config.model_validate(_recipe(copier, run={"output_dir": str(tmp_path)}, train={"steps": 3})))
    out = capsys.readouterr().out
    record = json.loads((tmp_path / "probe.json").read_text())
    assert record["source"] == str(resumed) and f"induction probe of {resumed}" in out
    try:  # the one-process probe of that checkpoint, as scripts/probe_layers.py runs it
        alone = probe_model(resumed, 1, sequences=PROBE_SEQUENCES, queries=PROBE_QUERIES)
    finally:
        distributed.destroy_distributed()
    assert record["layer_kinds"] == alone["layer_kinds"] == ["moba", "full", "moba"]
    for name, layer in alone["layers"].items():
        assert record["layers"][name]["heads"] == pytest.approx(layer["heads"], rel=1e-5, abs=1e-7), name
    assert _saved_attention(tmp_path)["layer_kinds"] == ["moba", "full", "moba"] and len(_losses(tmp_path)) == 3
