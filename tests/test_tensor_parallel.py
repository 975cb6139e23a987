"""Tensor parallel 2 computes what a single process computes: losses and gradients (CPU, gloo)."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from moba_train import distributed
from moba_train.config import Config
from moba_train.model import build_model, forward_step

SEQ = 64


def recipe(tp: int, fusions: dict | None = None) -> dict:
    """A GQA model with one MoBA and one full layer, padded vocabulary, untied output layer; `fusions`: model.fusions
    choices (default the plain paths, as `auto` on CPU)."""
    return {
        "model": {"num_layers": 2, "hidden_size": 64, "ffn_hidden_size": 96, "num_attention_heads": 4,
                  "num_query_groups": 2, "vocab_size": 250, "make_vocab_size_divisible_by": 64,
                  "fusions": fusions or {}},
        "attention": {"block_size": 16, "topk": 2, "full_layers": 1},
        "train": {"seq_length": SEQ},
        "parallel": {"tensor": tp},
    }


def batches() -> list[dict]:
    """One batch of two unpacked samples, one of two samples packed with four documents."""
    gen = torch.Generator().manual_seed(3)
    out = []
    for cu_seqlens in ([0, SEQ, 2 * SEQ], [0, 20, 64, 100, 128]):
        tokens = torch.randint(0, 250, (2, SEQ + 1), generator=gen)
        out.append({
            "tokens": tokens[:, :-1].contiguous(),
            "labels": tokens[:, 1:].contiguous(),
            "loss_mask": (torch.rand(2, SEQ, generator=gen) > 0.2).float(),
            "position_ids": torch.arange(SEQ).repeat(2, 1),
            "cu_seqlens": torch.tensor(cu_seqlens, dtype=torch.int32),
        })
    return out


def losses_and_grads(model) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
    """Mean masked loss of each batch; gradients of their sum by parameter name."""
    losses = []
    for batch in batches():
        loss_sum, count = forward_step(model, batch)
        (loss_sum / count).backward()
        losses.append((loss_sum / count).detach())
    return losses, {name: p.grad.clone() for name, p in model.named_parameters()}


def shard(param: torch.nn.Parameter, full: torch.Tensor, rank: int, tp: int, name: str) -> torch.Tensor:
    """The slice of the single-process tensor `full` that tensor-parallel rank `rank` holds for `param`."""
    if not getattr(param, "tensor_model_parallel", False):
        return full
    if name.endswith("linear_fc1.weight"):  # SwiGLU: [gate; up], each split over ranks
        return torch.cat([half.chunk(tp, 0)[rank] for half in full.chunk(2, 0)])
    return full.chunk(tp, param.partition_dim)[rank]


def _tp2_worker(rank: int, port: int, state: dict, expected_losses: list, expected_grads: dict,
                fusions: dict | None) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2")
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    cfg = Config.model_validate(recipe(tp=2, fusions=fusions))
    env = distributed.init_distributed(cfg)
    try:
        assert (env.tp, env.dp, env.world_size) == (2, 1, 2)
        distributed.set_seed(cfg.run.seed)
        model = build_model(cfg)
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, param in params.items():
                param.copy_(shard(param, state[name], rank, 2, name))
        from moba_train.kernels import rope

        fused_qkv, qkv_rope_triton = [], rope.qkv_rope_triton
        rope.qkv_rope_triton = lambda *a: fused_qkv.append(1) or qkv_rope_triton(*a)
        losses, grads = losses_and_grads(model)
        # the unpacked batch through both layers' fused QKV split; the packed one through Megatron's split
        assert len(fused_qkv) == (2 if fusions else 0)
        for loss, expected in zip(losses, expected_losses):
            torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
        for name, grad in grads.items():
            expected = shard(params[name], expected_grads[name], rank, 2, name)
            torch.testing.assert_close(grad, expected, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")
    finally:
        distributed.destroy_distributed()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("fusions", [None, {"rmsnorm": "triton", "rope": "triton"}], ids=["plain", "triton"])
def test_tensor_parallel_2_matches_single_process_losses_and_gradients(fusions):
    """The plain model's single process against tensor parallel 2; with our norm and RoPE kernels on the ranks
    (Triton's interpreter on CPU) too: each rank keeps one query group, so the fused QKV split runs there."""
    cfg = Config.model_validate(recipe(tp=1))
    distributed.init_distributed(cfg)
    try:
        distributed.set_seed(cfg.run.seed)
        model = build_model(cfg)
        state = {name: p.detach().clone() for name, p in model.named_parameters()}
        losses, grads = losses_and_grads(model)
    finally:
        distributed.destroy_distributed()
    assert all(g.abs().sum() > 0 for g in grads.values())
    mp.spawn(_tp2_worker, args=(_free_port(), state, losses, grads, fusions), nprocs=2, join=True)
