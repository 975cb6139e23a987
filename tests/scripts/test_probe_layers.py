"""scripts/probe_layers.py as a user runs it: a checkpoint in, one line per layer and the layer_kinds override
out (and the scores as JSON, the same as the probe computes in this process; a model that copies nowhere keeps its
full layer last, with a warning); a segment too long for the model is one stderr line and exit code 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from moba_train import distributed
from moba_train.checkpointing import save_model_checkpoint
from moba_train.config import Config
from moba_train.evaluation import load_model
from moba_train.induction import COPYING, induction_scores, query_positions
from moba_train.model import build_model

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "probe_layers.py"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A random 3-layer full-attention Llama checkpoint with 96 positions."""
    cfg = Config.model_validate({
        "run": {"device": "cpu"},
        "model": {"num_layers": 3, "hidden_size": 32, "ffn_hidden_size": 64, "num_attention_heads": 2,
                  "num_query_groups": 1, "vocab_size": 300, "make_vocab_size_divisible_by": 64,
                  "max_position_embeddings": 96, "init_method_std": 0.3},
        "attention": {"mode": "full"},
        "train": {"seq_length": 64},
    })
    path = tmp_path_factory.mktemp("probe") / "ckpt" / "step_00000001"
    distributed.init_distributed(cfg)
    try:
        distributed.set_seed(2)
        save_model_checkpoint(path, build_model(cfg), cfg)
    finally:
        distributed.destroy_distributed()
    return path


def probe(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_the_script_prints_each_layer_and_the_override_and_writes_the_probes_scores(checkpoint, tmp_path):
    result = probe(str(checkpoint.parent), "--full-layers", "1", "--segment-length", "40", "--sequences", "3",
                   "--queries", "8", "--json", str(tmp_path / "probe.json"))
    assert result.returncode == 0, result.stderr[-2000:]
    written = json.loads((tmp_path / "probe.json").read_text())
    try:
        expected = induction_scores(load_model(checkpoint), segment_length=40, sequences=3, queries=8)
    finally:
        distributed.destroy_distributed()
    for name, layer in expected["layers"].items():
        assert written["layers"][name]["heads"] == pytest.approx(layer["heads"], rel=1e-6), name
    # A random model copies nowhere: no head reaches COPYING x the weight of uniform attention (its definition,
    # from the query positions drawn), so the full layer stays last and the script says why.
    uniform = float(np.mean(1 / (query_positions(40, 8, seed=0) + 1)))
    assert max(layer["max"] for layer in expected["layers"].values()) < COPYING * uniform
    best = 2
    kinds = ["moba", "moba", "full"]
    assert written["layer_kinds"] == kinds and written["full_layers"] == 1 and written["copying_layers"] == []
    lines = result.stdout.splitlines()
    assert f"attention.layer_kinds=[{','.join(kinds)}]" in lines
    assert any(line.startswith("warning: only 0 layer(s) copy") for line in lines)
    for layer in range(3):
        record = expected["layers"][f"layer_{layer:02d}"]
        line = f"  layer {layer + 1:3d}  {record['max']:.3f} / {record['mean']:.3f}"
        assert line + ("  full" if layer == best else "") in lines


def test_a_segment_longer_than_half_the_models_positions_is_one_clear_error(checkpoint):
    result = probe(str(checkpoint), "--segment-length", "49")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (  # the lines above it are Megatron's loading warnings
        "error: two copies of 49 tokens exceed the model's 96 positions; pass a segment length of at most 48")
