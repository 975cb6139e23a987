"""The attention under context parallelism equals one rank: both communication designs, MoBA and full
attention, outputs and q/k/v gradients, and the bytes each rank sends equal their closed form (CPU, gloo
processes; this module imports no Megatron, so its processes start fast)."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from moba_train import context_parallel
from moba_train.attention import full_attention, moba_attention

LENGTHS = [64, 40]  # padded lengths (multiples of 2 x CP); blocks of 16 straddle the chunks at CP 4


def _moba(q, k, v, **offsets):
    return moba_attention(q, k, v, **offsets, block_size=16, topk=3, backend="torch")


def _full(q, k, v, **offsets):
    return full_attention(q, k, v, **offsets)


ATTENTION = {"moba": _moba, "full": _full}


def _worker(rank: int, world: int, port: int, cases: dict) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        rows = context_parallel.chunk_order(LENGTHS, world, rank)  # this rank's tokens, in its local order
        for (design, name), case in cases.items():
            q, k, v, dout = (case[key][rows].clone().requires_grad_() for key in ("q", "k", "v", "dout"))
            context_parallel.reset_comm_bytes()
            out = context_parallel.attention(q, k, v, LENGTHS, ATTENTION[name], design, dist.group.WORLD)
            grads = torch.autograd.grad(out, (q, k, v), dout.detach())
            torch.testing.assert_close(out, case["out"][rows], rtol=1e-5, atol=1e-6)
            # K/V gradients of a rank's tokens include what every other rank's queries sent back.
            for got, want in zip(grads, case["grads"]):
                torch.testing.assert_close(got, want[rows], rtol=1e-5, atol=1e-6)
            expected = context_parallel.bytes_per_layer(design, q.shape[0], world, q.shape[1], k.shape[1], q.shape[2],
                                                        q.element_size())
            assert context_parallel.comm_bytes() == {(design, p): n for p, n in expected.items()}
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("cp", [2, 4])
def test_attention_under_cp_equals_one_rank_outputs_and_gradients_and_counts_its_bytes(cp):
    gen = torch.Generator().manual_seed(2)
    cu = torch.tensor([0, *torch.tensor(LENGTHS).cumsum(0).tolist()], dtype=torch.int32)
    cases = {}
    for design in context_parallel.COMM_DESIGNS:
        kv_heads = 4 if design == "a2a" else 2  # a2a splits the KV heads over the ranks
        q, dout = (torch.randn(sum(LENGTHS), 4, 8, generator=gen) for _ in range(2))
        k, v = (torch.randn(sum(LENGTHS), kv_heads, 8, generator=gen) for _ in range(2))
        for name, attend in ATTENTION.items():
            leaves = [x.clone().requires_grad_() for x in (q, k, v)]
            out = attend(*leaves, cu_seqlens_q=cu, cu_seqlens_k=cu)
            cases[design, name] = {"q": q, "k": k, "v": v, "dout": dout, "out": out.detach(),
                                   "grads": torch.autograd.grad(out, leaves, dout)}
    mp.spawn(_worker, args=(cp, _free_port(), cases), nprocs=cp, join=True)
