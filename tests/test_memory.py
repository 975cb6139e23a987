"""The memory estimate behind `pretrain.py --dry-run` and the launch check: its parameter count is the
built model's, its parts follow the formulas of moba_train/memory.py, the activations it counts per layer are
what the built layer keeps for its backward, and a recipe far too large for the machine is one line before
anything is built."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moba_train import distributed, fusions
from moba_train.config import Config, load_config
from moba_train.memory import estimate, parameters_per_rank
from moba_train.model import build_model

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("tie", [False, True])
def test_parameters_per_rank_equal_the_built_models_parameter_count(tie):
    cfg = load_config(ROOT / "configs" / "tiny_moba.yaml", ["data.kind=synthetic", f"model.tie_embeddings={tie}"])
    distributed.init_distributed(cfg)
    try:
        distributed.set_seed(cfg.run.seed)
        built = sum(p.numel() for p in build_model(cfg).parameters())
    finally:
        distributed.destroy_distributed()
    assert parameters_per_rank(cfg) == built


def test_the_8b_recipe_estimate_follows_its_formulas():
    cfg = load_config(ROOT / "configs" / "llama8b_moba.yaml")
    params = parameters_per_rank(cfg)
    e = estimate(cfg, world_size=64, bf16=True, distributed_optimizer=True)  # data parallel 2
    tokens = 131072 // 4  # one 128K sequence over context parallel 4
    # TP 8: 4 query / 1 KV heads of 128; packed documents (context parallel), the plain paths: the rotated q
    # and k, v copied off the QKV output, the output, Megatron's RoPE cosines and sines; PyTorch's SwiGLU; the
    # log-sum-exp and the norms' inverse RMS in fp32
    per_layer = 2 * (4 * 4096 + (2 * 4 + 2 * 1) * 128 + 4 * 128 + 5 * 14336 // 8) + 4 * (4 + 2)
    kept = 2 * 32 * 4096 + per_layer  # full recompute: every layer's input and one layer's activations
    # all_gather: K and V prefixes of 1 + 1/8 sequences, inside the attention: under full recomputation only the
    # layer being recomputed holds them
    gathered = 1 * 2 * 131072 * 9 // 8 * 1 * 128
    assert (e.weights, e.gradients, e.optimizer) == (2 * params, 4 * params, 12 * params // 8)
    assert e.activations == tokens * kept + 2 * gathered
    assert e.logits == tokens * (128256 // 8) * 6
    assert 15 * 2**30 < e.total < 40 * 2**30  # fits an 80 GB GPU


def test_the_chunked_loss_keeps_no_logits_at_128k():
    """The 1.1B recipe at 128K: the logits and the loss's fp32 copy are 24 GiB per micro-batch (as much with
    Liger's cross-entropy, measured); with the output layer and the loss in chunks (fused_linear) 8 bytes per
    token and one chunk's fp32 logits and probabilities remain. Nothing else changes."""
    from moba_train import fusions

    cfg = load_config(ROOT / "configs" / "llama1b_moba_128k.yaml")
    plain, liger, chunked = (estimate(cfg, world_size=1, bf16=True, distributed_optimizer=True,
                                      fused=dict(fusions.PLAIN, cross_entropy=choice))
                             for choice in ("megatron", "liger", "fused_linear"))
    assert plain.logits == 131072 * 32768 * 6 == liger.logits
    assert chunked.logits == 8 * 131072 + 2 * fusions.LINEAR_LOSS_CHUNK_BYTES < 2**30 + 2**21
    assert chunked.total - chunked.logits == plain.total - plain.logits


_TORCH_LOG = re.compile(r"^[IWE]\d{4} \d\d:\d\d:\d\d")


def _pretrain(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    env.pop("WORLD_SIZE", None)
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "pretrain.py"), *args], capture_output=True,
                          text=True, env=env, timeout=300)


def test_dry_run_prints_the_layout_and_the_estimate_without_building_anything(tmp_path):
    result = _pretrain("--config", str(ROOT / "configs" / "llama8b_moba.yaml"), f"run.output_dir={tmp_path}/run",
                       "--dry-run")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "layout: tensor 8 x context 4 x pipeline 1 x data 1 = 32" in out
    assert "8 chunks of 16384, 32768 tokens per context rank (all_gather)" in out
    assert "layers: 29 MoBA (block 4096, top-12), 3 full" in out
    cfg = load_config(ROOT / "configs" / "llama8b_moba.yaml")  # run.device auto: described as on the GPU nodes
    expected = estimate(cfg, 32, True, True, fused=fusions.resolve(cfg, torch.device("cuda")))
    assert expected.lines()[-1] in out.splitlines()
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("device", ["auto", "cpu"])
def test_a_dry_run_without_a_gpu_describes_the_gpu_nodes_unless_told_cpu(device):
    """On a machine without a GPU (a login node), run.device auto is described as the launch on the GPU nodes
    (bf16 and the fused kernels `auto` picks on CUDA: for the 128K recipe the estimate within 2.3% of its
    measured peaks), and run.device=cpu as a CPU run (fp32, the plain paths)."""
    from moba_train.optimizer import use_distributed_optimizer

    recipe = ROOT / "configs" / "llama1b_moba_128k.yaml"
    result = _pretrain("--config", str(recipe), f"run.device={device}", "--dry-run")
    assert result.returncode == 0, result.stderr
    cfg = load_config(recipe, [f"run.device={device}"])
    gpu = torch.device("cuda" if device == "auto" else "cpu")
    expected = estimate(cfg, 1, bf16=gpu.type == "cuda", distributed_optimizer=use_distributed_optimizer(cfg, gpu),
                        fused=fusions.resolve(cfg, gpu))
    lines = result.stdout.splitlines()
    assert expected.lines()[-1] in lines and expected.lines()[3] in lines  # the total and the activations
    assert f"estimate; {'bf16' if gpu.type == 'cuda' else 'fp32'}, recompute selective" in result.stdout
    first = lines[0] if lines[0].startswith("dry run:") else next(line for line in lines if line.startswith("dry run"))
    assert first.startswith(f"dry run: 1 process(es) on {gpu.type}")
    assert ("as on a GPU node" in first) == (device == "auto" and not torch.cuda.is_available())


def test_a_recipe_too_large_for_the_machine_is_one_line_before_anything_is_built(tmp_path):
    result = _pretrain("--config", str(ROOT / "configs" / "llama8b_moba.yaml"), "parallel.tensor=1",
                       "parallel.context=1", f"run.output_dir={tmp_path}/run", "run.device=cpu")
    assert result.returncode == 2
    # One error line and no traceback (torch may log its own import-time notes, e.g. about CUDA_HOME, above it).
    lines = [line for line in result.stderr.strip().splitlines() if not _TORCH_LOG.match(line)]
    assert len(lines) == 1 and lines[0].startswith("error: this recipe needs about ") and "GiB per process" in lines[0]


def _layer_cfg(fused: dict, attention: str, recompute: str, micro_batch: int):
    """A small layer whose terms differ: h 96, 4 query heads / 2 KV heads of 32 (Hq D = 128), ffn 224."""
    return Config.model_validate({
        "run": {"device": "cpu"},
        "model": {"num_layers": 1, "hidden_size": 96, "kv_channels": 32, "ffn_hidden_size": 224,
                  "num_attention_heads": 4, "num_query_groups": 2, "vocab_size": 128,
                  "make_vocab_size_divisible_by": 64, "fusions": dict(fusions.PLAIN, **fused)},
        "attention": {"mode": attention, "block_size": 64, "topk": 2, "backend": "torch"},
        "train": {"seq_length": 256, "micro_batch_size": micro_batch, "global_batch_size": micro_batch,
                  "recompute": recompute},
    })


FUSED = {"rmsnorm": "triton", "rope": "triton", "swiglu": "megatron"}


@pytest.mark.parametrize("fused,attention,packed,micro_batch,recompute", [
    (FUSED, "full", False, 1, "none"),  # the QKV split and rotated by one kernel: q, k, v, out
    (FUSED, "full", True, 1, "none"),  # packed documents: rotated q and k, v copied off the QKV output, out
    (FUSED, "moba", False, 2, "none"),  # two rows: the attention's layout copies
    (FUSED, "moba", True, 2, "selective"),  # the MLP recomputed
    ({"rmsnorm": "triton", "swiglu": "torch"}, "full", False, 1, "none"),  # PyTorch's SwiGLU, Megatron's RoPE
    ({"rmsnorm": "triton", "rope": "compile"}, "full", True, 1, "none"),  # packed: Megatron's thd RoPE
])
def test_the_estimate_counts_what_autograd_keeps_for_each_layer(fused, attention, packed, micro_batch, recompute):
    """The formula of moba_train/memory.py against what one layer of the built model saves for its backward
    (benchmarking.layer_memory: the storages autograd keeps, a 2-layer model against a 1-layer one)."""
    from moba_train.benchmarking import layer_memory
    from moba_train.memory import layer_activation_bytes

    cfg = _layer_cfg(fused, attention, recompute, micro_batch)
    measured = layer_memory(cfg, packed)
    core, mlp = layer_activation_bytes(cfg, dict(fusions.PLAIN, **fused), element=4, packed=packed)
    expected = core + (0 if recompute == "selective" else mlp)
    # MoBA's reference backend also keeps its block selection (int64, top-k blocks per query head: 8 bytes x
    # 4 heads x 2 = 64 bytes per token here, about 2% of the layer), which the formula leaves out
    selection = 8 * 4 * 2 if attention == "moba" else 0
    assert measured.bytes_per_token == expected + selection, measured.tensors
