"""scripts/evaluate.py as a user runs it: a checkpoint and validation text in, eval.json and the plots out;
a missing model or a flag that contradicts the weights is one stderr line and exit code 2."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from moba_train import distributed
from moba_train.checkpointing import save_model_checkpoint
from moba_train.config import Config, ConfigError
from moba_train.data.corpus import train_tokenizer
from moba_train.data.preprocess import write_indexed_dataset
from moba_train.model import build_model

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "evaluate.py"


@pytest.fixture(scope="module")
def model_and_data(tmp_path_factory):
    """A random MoBA Llama checkpoint (vocab 300, 128-token windows) and held-out text for it."""
    root = tmp_path_factory.mktemp("eval")
    rng = np.random.default_rng(0)
    texts = ["".join(f"def f{rng.integers(1000)}(x):\n    return x * {rng.integers(100)}  # pass key 31415\n"
                     for _ in range(rng.integers(5, 60))) for _ in range(20)]
    tokenizer = train_tokenizer(texts, 300, root / "tokenizer")
    write_indexed_dataset(texts, tokenizer, root / "valid", progress=False)
    cfg = Config.model_validate({
        "run": {"device": "cpu"},
        "model": {"num_layers": 2, "hidden_size": 32, "ffn_hidden_size": 64, "num_attention_heads": 2,
                  "num_query_groups": 1, "vocab_size": 300, "make_vocab_size_divisible_by": 64,
                  "max_position_embeddings": 256},
        "attention": {"mode": "moba", "block_size": 32, "topk": 2},
        "train": {"seq_length": 128},
        "data": {"tokenizer": str(tokenizer)},
    })
    distributed.init_distributed(cfg)
    try:
        distributed.set_seed(1)
        save_model_checkpoint(root / "ckpt" / "step_00000001", build_model(cfg), cfg)
    finally:
        distributed.destroy_distributed()
    return root


def evaluate(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_evaluating_a_checkpoint_writes_json_and_plots(model_and_data, tmp_path):
    root = model_and_data
    result = evaluate(str(root / "ckpt"), "--data", str(root / "valid"), "--out", str(tmp_path / "out"),
                      "--attention", "full", "--windows", "3", "--bucket", "32", "--passkey-lengths", "96,128",
                      "--passkey-depths", "0,1", "--passkey-samples", "2", "--copy-documents", "3")
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "out/eval.json").read_text())
    assert report["attention"]["mode"] == "full" and report["attention"]["layer_kinds"] == ["full", "full"]
    assert report["validation"]["windows"] == 3 and len(report["validation"]["buckets"]) == 4
    assert report["long_documents"]["seq_length"] == 128
    assert report["passkey"]["lengths"] == [96, 128] and np.asarray(report["passkey"]["accuracy"]).shape == (2, 2)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["eval.json", "loss_by_position.png", "passkey.png"]
    assert f"validation loss {report['validation']['loss']:.4f} over 3 windows of 128 tokens" in result.stdout
    copy = report["copy"]
    assert copy["documents"] == 3 and sum(b["documents"] for b in copy["by_period"]) == 3
    assert f"copy: {100 * copy['token_accuracy']:.1f}% of {copy['tokens']} repeated tokens" in result.stdout


def test_gate_recall_is_measured_on_the_long_documents_of_a_moba_model(model_and_data, tmp_path):
    """--gate-recall N: the MoBA gate's share of dense attention's mass by position bucket, in eval.json and on the
    console; exactly 1 in the first two blocks (top-2 attends every earlier block there)."""
    root = model_and_data
    result = evaluate(str(root / "ckpt"), "--data", str(root / "valid"), "--out", str(tmp_path / "out"),
                      "--windows", "2", "--bucket", "32", "--gate-recall", "8")
    assert result.returncode == 0, result.stderr[-3000:]
    gate = json.loads((tmp_path / "out/eval.json").read_text())["gate_recall"]
    assert gate["windows"] == 2 and gate["queries_per_bucket"] == 8 and set(gate["layers"]) == {"layer_00", "layer_01"}
    recall = [b["gate_recall"] for b in gate["buckets"]]
    assert [(b["start"], b["end"]) for b in gate["buckets"]] == [(0, 32), (32, 64), (64, 96), (96, 128)]
    assert recall[:2] == pytest.approx([1.0, 1.0], abs=1e-6) and all(0 < r < 1 for r in recall[2:])
    assert "gate recall (dense attention's mass on the keys MoBA attends) by position: 0-32: 100.0%" in result.stdout


def test_a_missing_model_is_one_line_and_exit_code_2(tmp_path):
    result = evaluate(str(tmp_path / "nothing"), "--data", str(tmp_path / "valid"), "--out", str(tmp_path / "out"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (  # the lines above it are Megatron's import warnings
        f"error: '{tmp_path / 'nothing'}' is neither a moba-train checkpoint (a step_* directory or a directory "
        "holding one) nor a Hugging Face model directory (config.json); pass one of them")
    assert not (tmp_path / "out").exists()


def test_a_flag_that_contradicts_the_weights_is_one_clear_error(model_and_data, tmp_path):
    spec = importlib.util.spec_from_file_location("evaluate_script", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    root = model_and_data
    with pytest.raises(ConfigError, match="holds a model with model.num_query_groups=1 but the flags set 2; drop"):
        script.main([str(root / "ckpt"), "--data", str(root / "valid"), "--out", str(tmp_path / "out"),
                     "model.num_query_groups=2"])
    assert not (tmp_path / "out").exists()
    with pytest.raises(ConfigError, match="^--data is needed for the validation loss, passkey prompts and copy"):
        script.main([str(root / "ckpt"), "--out", str(tmp_path / "out"), "--copy-documents", "2"])
    assert not (tmp_path / "out").exists()
    with pytest.raises(ConfigError, match=r"^gate recall needs at least 1 position per bucket, not -2; pass a"):
        script.main([str(root / "ckpt"), "--data", str(root / "valid"), "--out", str(tmp_path / "out"),
                     "--windows", "1", "--gate-recall", "-2"])
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flags, message", [
    (["--passkey-lengths", "8"], r"^a passkey context of 8 tokens cannot hold the needle, question and answer; pass "
                                 r"lengths of at least \d+ tokens$"),
    (["--passkey-lengths", "128", "--passkey-depths", "0,50"],
     r"^passkey depths \[0.0, 50.0\] are not all in \[0, 1\]"),
    (["--windows", "0"], r"^evaluation setting windows is 0; it must be at least 1$"),
], ids=["short-passkey-context", "depth-beyond-1", "no-windows"])
def test_settings_that_cannot_be_evaluated_are_one_clear_error_before_any_work(model_and_data, tmp_path, flags,
                                                                               message):
    spec = importlib.util.spec_from_file_location("evaluate_script", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    root = model_and_data
    with pytest.raises(ConfigError, match=message):
        script.main([str(root / "ckpt"), "--data", str(root / "valid"), "--out", str(tmp_path / "out"),
                     "--windows", "1", "--passkey-samples", "1", *flags])
    assert not (tmp_path / "out").exists()
