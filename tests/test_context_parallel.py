"""Context parallelism equals one rank: batch sharding, the attention under CP (both communication designs,
MoBA and full layers) and the whole hybrid model's loss and every parameter's gradient, with tensor
parallelism too, on CPU with gloo processes. References: the single-process computation of the same
inputs and weights."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from megatron.core import parallel_state
from test_tensor_parallel import shard

from moba_train import context_parallel, distributed
from moba_train.config import Config, ConfigError
from moba_train.diagnostics import RoutingDiagnostics
from moba_train.model import build_model, forward_step

SEQ = 64


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _batch(cu_seqlens: list[int], seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 250, (2, SEQ + 1), generator=gen)
    return {
        "tokens": tokens[:, :-1].contiguous(),
        "labels": tokens[:, 1:].contiguous(),
        "loss_mask": (torch.rand(2, SEQ, generator=gen) > 0.2).float(),
        "position_ids": torch.arange(SEQ).repeat(2, 1),
        "cu_seqlens": torch.tensor(cu_seqlens, dtype=torch.int32),
    }


# One batch of two unpacked samples, one of two samples packed into documents whose lengths are not
# multiples of 2 x CP (so every document is padded before it is split).
BATCHES = {"unpacked": [0, SEQ, 2 * SEQ], "packed": [0, 21, 64, 101, 128]}


@pytest.mark.parametrize("cp", [2, 4])
@pytest.mark.parametrize("kind", list(BATCHES))
def test_the_shards_of_all_ranks_hold_every_token_once_with_its_label_mask_and_position(cp, kind):
    batch = _batch(BATCHES[kind], seed=1)
    lengths = torch.tensor(BATCHES[kind]).diff().tolist()
    padded = context_parallel.padded_lengths(lengths, cp)
    assert all(p % (2 * cp) == 0 and 0 <= p - n < 2 * cp for p, n in zip(padded, lengths))
    seen = torch.zeros(2 * SEQ, dtype=torch.int64)
    for rank in range(cp):
        local = context_parallel.shard_batch(batch, cp, rank)
        assert local["cu_seqlens"].tolist() == [0, *torch.tensor(padded).cumsum(0).tolist()]
        assert local["tokens"].shape == (1, sum(padded) // cp)
        where = context_parallel.chunk_order(padded, cp, rank)  # padded positions of the local tokens
        doc = torch.searchsorted(local["cu_seqlens"][1:], where, right=True)
        within = where - local["cu_seqlens"][doc]
        real = within < torch.tensor(lengths)[doc]
        flat = torch.tensor(BATCHES[kind])[doc] + within
        assert torch.equal(local["position_ids"][0], within)
        assert torch.equal(local["tokens"][0][real], batch["tokens"].reshape(-1)[flat[real]])
        assert torch.equal(local["labels"][0][real], batch["labels"].reshape(-1)[flat[real]])
        assert torch.equal(local["loss_mask"][0][real], batch["loss_mask"].reshape(-1)[flat[real]])
        assert not local["loss_mask"][0][~real].any()
        seen.index_add_(0, flat[real], torch.ones_like(flat[real]))
    assert torch.equal(seen, torch.ones_like(seen))


def recipe(tp: int, cp: int, design: str = "all_gather", rope: str = "auto") -> dict:
    """The hybrid model (MoBA then a full layer), 8 query / 4 KV heads so both designs run at CP 4 and TP 2 x CP 2;
    `rope`: model.fusions.rope (auto: Megatron's unfused rotation on CPU)."""
    return {
        "model": {"num_layers": 2, "hidden_size": 64, "ffn_hidden_size": 96, "num_attention_heads": 8,
                  "num_query_groups": 4, "vocab_size": 250, "make_vocab_size_divisible_by": 64,
                  "fusions": {"rope": rope}},
        "attention": {"block_size": 16, "topk": 3, "full_layers": 1, "backend": "torch"},
        "train": {"seq_length": SEQ},
        "parallel": {"tensor": tp, "context": cp, "context_comm": design},
        "logging": {"moba_diag_interval": 1, "moba_diag_queries": 32},
    }


def _scalars(metrics: dict) -> dict:
    return {key: value for key, value in metrics.items() if isinstance(value, float) and key != "moba/time_s"}


def _diagnostics(cfg: Config, model, enabled: bool, out_dir: str) -> dict:
    """The routing diagnostics of the unpacked batch (rank 0's metrics; {} elsewhere)."""
    cfg = cfg.model_copy(update={"run": cfg.run.model_copy(update={"output_dir": out_dir})})
    return _scalars(RoutingDiagnostics(cfg, model, enabled).run(1, _batch(BATCHES["unpacked"], seed=5)))


def _model_worker(rank: int, world: int, port: int, tp: int, cp: int, rope: str, state: dict, reference: dict) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    env = distributed.init_distributed(Config.model_validate(recipe(tp, cp)))  # the designs share the groups
    try:
        assert (env.tp, env.cp, env.dp) == (tp, cp, 1)
        group = parallel_state.get_context_parallel_group()
        tp_rank = parallel_state.get_tensor_model_parallel_rank()
        for design in context_parallel.COMM_DESIGNS:
            cfg = Config.model_validate(recipe(tp, cp, design, rope))
            distributed.set_seed(cfg.run.seed)
            model = build_model(cfg)
            params = dict(model.named_parameters())
            with torch.no_grad():
                for name, param in params.items():
                    param.copy_(shard(param, state[name], tp_rank, tp, name))
            for kind, cu in BATCHES.items():
                model.zero_grad()
                loss_sum, count = forward_step(model, _batch(cu, seed=5))
                totals = torch.stack([loss_sum.detach(), count])
                dist.all_reduce(totals, group=group)
                (loss_sum / totals[1]).backward()  # this rank's share of the mean over the whole batch
                want_loss, want_grads = reference[kind]
                torch.testing.assert_close(totals[0] / totals[1], want_loss, rtol=1e-5, atol=1e-6)
                for name, param in params.items():
                    grad = param.grad.clone()
                    dist.all_reduce(grad, group=group)  # what DDP's data x context parallel reduction sums
                    want = shard(param, want_grads[name], tp_rank, tp, name)
                    torch.testing.assert_close(grad, want, rtol=1e-4, atol=1e-6,
                                               msg=lambda m: f"{design} {kind} {name}: {m}")
            # Routing diagnostics see whole sequences under CP: the same numbers as one process.
            got = _diagnostics(cfg, model, rank == 0, reference["out_dir"])
            if rank == 0:
                want = reference["diagnostics"]
                assert got.keys() == want.keys() and "moba/gate_recall" in got, design
                assert got == pytest.approx(want, rel=1e-4, abs=1e-6), design
            else:
                assert got == {}, design
    finally:
        distributed.destroy_distributed()


def _reference(out_dir) -> tuple[dict, dict]:
    cfg = Config.model_validate(recipe(1, 1))
    distributed.init_distributed(cfg)
    try:
        distributed.set_seed(cfg.run.seed)
        model = build_model(cfg)
        state = {name: p.detach().clone() for name, p in model.named_parameters()}
        reference = {}
        for kind, cu in BATCHES.items():
            model.zero_grad()
            loss_sum, count = forward_step(model, _batch(cu, seed=5))
            (loss_sum / count).backward()
            reference[kind] = ((loss_sum / count).detach(), {n: p.grad.clone() for n, p in model.named_parameters()})
        reference["out_dir"] = str(out_dir)
        reference["diagnostics"] = _diagnostics(cfg, model, True, str(out_dir))
    finally:
        distributed.destroy_distributed()
    return state, reference


@pytest.mark.parametrize("tp, cp, rope", [(1, 2, "auto"), (1, 4, "auto"), (2, 2, "auto"), (1, 2, "triton")],
                         ids=["cp2", "cp4", "tp2xcp2", "cp2-triton-rope"])
def test_hybrid_model_under_cp_equals_one_process_loss_gradients_and_routing_diagnostics(tp, cp, rope, tmp_path):
    """Under CP every batch is one row of packed documents; with rope=triton RoPE is our kernel over each rank's
    shard by the angles Megatron's thd path would choose (`fusions._packed_freqs`), against Megatron's rotation in
    one process."""
    state, reference = _reference(tmp_path)
    mp.spawn(_model_worker, args=(tp * cp, _free_port(), tp, cp, rope, state, reference), nprocs=tp * cp, join=True)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"parallel": {"context": 4}, "train": {"seq_length": 100}, "attention": {"block_size": 16}},
         "must be a multiple of 2 x parallel.context \\(8\\)"),
        ({"parallel": {"context": 4, "context_comm": "a2a"}, "model": {"num_query_groups": 2},
          "train": {"seq_length": 4096}},
         "splits the KV heads of each tensor-parallel rank \\(2\\) over parallel.context \\(4\\)"),
    ],
    ids=["seq-length", "a2a-kv-heads"],
)
def test_cp_constraints_are_one_line_errors_before_any_model_is_built(overrides, message):
    from moba_train.config import load_config

    raw = [f"{section}.{key}={value}" for section, values in overrides.items() for key, value in values.items()]
    with pytest.raises(ConfigError, match=message):
        load_config(None, ["model.num_attention_heads=8", "model.hidden_size=64", *raw])
