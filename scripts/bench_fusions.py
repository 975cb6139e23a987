"""The dense parts' fused kernels against each other (moba_train/fusions.py): forward + backward time and
error of every `model.fusions` choice at one recipe's shapes (one micro-batch), on one GPU.

    python scripts/bench_fusions.py --config configs/llama1b_moba_32k.yaml [--out bench/results/fusions.json]

Per operation: the median of do_bench (ms, forward and backward with a fixed output gradient), the memory
the forward keeps for the backward (GiB), and the largest error of the output and of the input gradient
against an fp32 computation of the same function, relative to that reference's largest magnitude.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
from pathlib import Path

import torch

from moba_train.cli import run_entry
from moba_train.config import Config, load_config
from moba_train.staging import write_text


def cases(cfg: Config, device) -> dict:
    """{op: (make_inputs, {choice: fn(*inputs) -> output tensor}, reference fp32 fn)}."""
    import torch.nn.functional as F
    from megatron.core import parallel_state
    from megatron.core.fusions.fused_bias_swiglu import bias_swiglu_impl
    from megatron.core.fusions.fused_cross_entropy import fused_vocab_parallel_cross_entropy
    from megatron.core.models.common.embeddings import rope_utils
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy
    from megatron.core.transformer.torch_norm import WrappedTorchNorm
    from moba_train.kernels.rope import rope_triton

    from moba_train import fusions
    from moba_train.model import transformer_config

    m, s = cfg.model, cfg.train.seq_length * cfg.train.micro_batch_size
    h, ffn, d, bf16 = m.hidden_size, m.ffn_hidden_size, m.head_dim, torch.bfloat16
    config = transformer_config(cfg)
    tp = parallel_state.get_tensor_model_parallel_group()
    out = {}

    def norm(module_type):
        module = module_type(config=config, hidden_size=h, eps=m.norm_epsilon).to(device, bf16)
        return lambda x: module(x)

    choices = {"torch": norm(WrappedTorchNorm), "compile": norm(fusions.CompiledRMSNorm),
               "triton": norm(fusions.TritonRMSNorm)}
    if fusions.liger_available():
        from liger_kernel.megatron import LigerMegatronRMSNorm

        choices["liger"] = norm(LigerMegatronRMSNorm)
    out["rmsnorm"] = (lambda: (torch.randn(s, 1, h, device=device, dtype=bf16),),
                      choices, lambda x: fusions._rms_norm(x.float(), torch.ones(h, device=device), m.norm_epsilon))

    # A layer's residual stream around its two norms: n1 = norm(x) (to the attention), h = x + a (a: the attention's
    # output), n2 = norm(h) (to the MLP); x, n1, h and n2 all carry gradients, as in a layer. torch: two norms and
    # an add, with autograd's sums of x's and h's two gradients; triton: FusedNormTransformerLayer's two calls.
    from moba_train.kernels.rmsnorm import add_rms_norm, rms_norm_with_residual

    w1, w2 = (torch.ones(h, device=device, dtype=bf16) for _ in range(2))
    eps = m.norm_epsilon
    torch_norm = norm(WrappedTorchNorm)

    def residual_torch(x, a):
        hh = x + a
        return x, torch_norm(x), hh, torch_norm(hh)

    def residual_triton(x, a):
        x, n1 = rms_norm_with_residual(x, w1, eps)
        hh, n2 = add_rms_norm(x, a, w2, eps)
        return x, n1, hh, n2

    def residual_reference(x, a):
        hh = x + a
        return (x, fusions._rms_norm(x, torch.ones(h, device=device), eps), hh,
                fusions._rms_norm(hh, torch.ones(h, device=device), eps))

    out["residual_rmsnorm"] = (lambda: (torch.randn(s, 1, h, device=device, dtype=bf16),
                                        torch.randn(s, 1, h, device=device, dtype=bf16)),
                               {"torch": residual_torch, "triton": residual_triton}, residual_reference)

    def swiglu_plain(x):
        gate, up = torch.chunk(x, 2, dim=-1)
        return F.silu(gate) * up

    choices = {"torch": swiglu_plain, "megatron": lambda x: bias_swiglu_impl(x, None)}
    if fusions.liger_available():
        liger_swiglu = fusions.LigerSwiGLU()
        choices["liger"] = liger_swiglu
    out["swiglu"] = (lambda: (torch.randn(s, 1, 2 * ffn, device=device, dtype=bf16),), choices,
                     lambda x: swiglu_plain(x.float()))

    inv_freq = 1.0 / (m.rope_theta ** (torch.arange(0, d, 2, device=device, dtype=torch.float32) / d))
    freqs = torch.outer(torch.arange(s, device=device, dtype=torch.float32), inv_freq)
    freqs = torch.cat((freqs, freqs), dim=-1)[:, None, None, :]
    out["rope"] = (lambda: (torch.randn(s, 1, m.num_attention_heads, d, device=device, dtype=bf16),),
                   {"torch": lambda t: rope_utils._apply_rotary_pos_emb_bshd(t, freqs),
                    "compile": lambda t: fusions._compiled_rope_bshd()(t, freqs, False),
                    "triton": lambda t: rope_triton(t, freqs)},
                   lambda t: rope_utils._apply_rotary_pos_emb_bshd(t.float(), freqs))

    # The fused QKV projection's output to rotated q, k and v (Megatron's layout: per query group r query heads, a
    # key head, a value head): split, the strided query reshape (a copy) and RoPE of q and k, against one kernel
    # each way (kernels/rope.py's qkv_rope_triton, FusedQKVRoPESelfAttention's path).
    from moba_train.kernels.rope import qkv_rope_triton

    g = m.num_query_groups
    r = m.num_attention_heads // g
    split = [r * d, d, d]

    def qkv_split(x, rotate):
        q, k, v = torch.split(x, split, dim=3)
        return rotate(q.reshape(s, 1, g * r, d)), rotate(k), v

    def megatron_rope(t):
        return rope_utils._apply_rotary_pos_emb_bshd(t, freqs)

    out["qkv_rope"] = (lambda: (torch.randn(s, 1, g, (r + 2) * d, device=device, dtype=bf16),),
                       {"split+torch": lambda x: qkv_split(x, megatron_rope),
                        "split+triton": lambda x: qkv_split(x, lambda t: rope_triton(t, freqs)),
                        "fused": lambda x: qkv_rope_triton(x, freqs, freqs, r)},
                       lambda x: qkv_split(x, megatron_rope))

    vocab = m.vocab_size
    labels = torch.randint(0, vocab, (s, 1), device=device)
    choices = {"megatron": lambda z: vocab_parallel_cross_entropy(z, labels),
               "megatron_fused": lambda z: fused_vocab_parallel_cross_entropy(z, labels, tp)}
    if fusions.liger_available():
        from liger_kernel.megatron import LigerMegatronCrossEntropy

        liger_ce = LigerMegatronCrossEntropy()
        choices["liger"] = lambda z: liger_ce(z, labels, tp)
    out["cross_entropy"] = (lambda: (torch.randn(s, 1, vocab, device=device, dtype=bf16) * 3,), choices,
                            lambda z: F.cross_entropy(z.float().view(-1, vocab), labels.view(-1),
                                                      reduction="none").view(s, 1))

    # The output layer and the loss together: the logits materialised (Megatron's output layer, then the
    # chosen cross-entropy) against losses computed in chunks of tokens, which never keep them: ours
    # (recomputes a chunk's logits in the backward) and Liger's (gradients computed in the forward; it reads
    # the count of loss tokens on the host).
    flat = labels.view(-1)
    choices = {"fused_linear": lambda x, w: fusions.linear_cross_entropy(x, w, flat).sum()}
    if fusions.liger_available():
        from liger_kernel.ops.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyFunction

        choices["output_layer+liger"] = lambda x, w: liger_ce(F.linear(x, w).view(s, 1, vocab), labels, tp).sum()
        choices["liger_fused_linear"] = lambda x, w: LigerFusedLinearCrossEntropyFunction.apply(
            x, w, flat, None, None, -100, 0.0, 0.0, "sum")[0]  # (loss, z-loss, accuracy, ...)
    out["linear_cross_entropy"] = (
        lambda: (torch.randn(s, h, device=device, dtype=bf16), torch.randn(vocab, h, device=device, dtype=bf16) * 0.02),
        choices, lambda x, w: F.cross_entropy(F.linear(x, w), flat, reduction="sum"))
    return out


RMSNORM_TILES = [(4096, 4), (16384, 4), (8192, 2), (8192, 8)]
"""(TILE_ELEMENTS, PROGRAMS_PER_SM) of kernels/rmsnorm.py timed beside its defaults."""


@contextlib.contextmanager
def rmsnorm_tiles(tiles):
    from moba_train.kernels import rmsnorm

    if tiles is None:
        yield
        return
    saved = rmsnorm.TILE_ELEMENTS, rmsnorm.PROGRAMS_PER_SM
    rmsnorm.TILE_ELEMENTS, rmsnorm.PROGRAMS_PER_SM = tiles
    try:
        yield
    finally:
        rmsnorm.TILE_ELEMENTS, rmsnorm.PROGRAMS_PER_SM = saved


def measure(make_inputs, fn, reference) -> dict:
    from triton.testing import do_bench

    def outputs(result) -> tuple:
        return result if isinstance(result, tuple) else (result,)

    inputs = [x.requires_grad_() for x in make_inputs()]
    with torch.no_grad():
        samples = outputs(fn(*inputs))
    grad_out = [torch.randn_like(sample) for sample in samples]

    def step():
        torch.autograd.backward(outputs(fn(*inputs)), grad_out)
        for x in inputs:
            x.grad = None

    step()  # compile / autotune
    ms = do_bench(step, warmup=10, rep=100, return_mode="median")
    # Fresh inputs for the error and memory (Megatron's cross-entropy overwrites its logits in place).
    fresh = [x.detach() for x in make_inputs()]
    inputs = [x.clone().requires_grad_() for x in fresh]
    leaves = [x.float().requires_grad_() for x in fresh]
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    result = outputs(fn(*inputs))
    # outputs that are inputs (the residual form's x) are not new memory
    fresh_outputs = [r for r in result
                     if not any(r.untyped_storage().data_ptr() == x.untyped_storage().data_ptr() for x in inputs)]
    kept = torch.cuda.memory_allocated() - before - sum(r.numel() * r.element_size() for r in fresh_outputs)
    torch.autograd.backward(result, grad_out)
    want = outputs(reference(*leaves))
    torch.autograd.backward(want, [g.float() for g in grad_out])

    def rel(a, b):
        return ((a.float() - b).abs().max() / b.abs().max()).item()

    return {"ms": ms, "kept_gib": kept / 2**30,
            "out_rel_err": max(rel(r.detach(), w.detach()) for r, w in zip(result, want)),
            "grad_rel_err": max(rel(x.grad, leaf.grad) for x, leaf in zip(inputs, leaves))}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="recipe YAML (its model and train.seq_length set the shapes)")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value")
    parser.add_argument("--out", help="JSON path (default bench/results/fusions-<gpu>-<commit>.json)")
    parser.add_argument("--ops", help="comma-separated operations to time (default: all)")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, [*args.overrides, "run.device=cuda"])
    if not torch.cuda.is_available():
        parser.error("CUDA is not available: the fused kernels are measured on a GPU")
    from moba_train import distributed

    distributed.init_distributed(cfg)
    device = torch.device("cuda")
    results = {}
    all_cases = cases(cfg, device)
    wanted = args.ops.split(",") if args.ops else list(all_cases)
    unknown = sorted(set(wanted) - set(all_cases))
    if unknown:
        parser.error(f"unknown --ops {', '.join(unknown)}; choose from {', '.join(all_cases)}")
    for op in wanted:
        make_inputs, choices, reference = all_cases[op]
        results[op] = {}
        runs = [(choice, fn, None) for choice, fn in choices.items()]
        if op == "residual_rmsnorm":  # other tiles of our kernels (kernels/rmsnorm.py), forward and backward
            runs += [(f"triton_t{elements}_p{per_sm}", choices["triton"], (elements, per_sm))
                     for elements, per_sm in RMSNORM_TILES]
        for choice, fn, tiles in runs:
            with rmsnorm_tiles(tiles):
                results[op][choice] = record = measure(make_inputs, fn, reference)
            print(f"{op:16} {choice:18} {record['ms']:8.3f} ms  kept {record['kept_gib']:6.2f} GiB  "
                  f"err out {record['out_rel_err']:.1e} grad {record['grad_rel_err']:.1e}", flush=True)
            torch.cuda.empty_cache()
    commit = os.environ.get("GIT_COMMIT", "unknown")
    meta = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "commit": commit,
            "config": args.config, "overrides": args.overrides,
            "tokens": cfg.train.seq_length * cfg.train.micro_batch_size,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    out = Path(args.out or f"bench/results/fusions-{meta['gpu'].replace(' ', '_')}-{commit[:7]}.json")
    write_text(out, json.dumps({"meta": meta, "results": results}, indent=1) + "\n")
    print(f"wrote {out}")
    distributed.destroy_distributed()


if __name__ == "__main__":
    run_entry(main)
