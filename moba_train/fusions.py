"""Fused kernels for the dense parts of a Llama layer without Transformer Engine (`model.fusions`).

Four operations, each with its plain path and the fused ones measured against it
(`scripts/bench_fusions.py`, bench/results/fusions-*.json):

    rmsnorm        torch    torch.nn.RMSNorm (Megatron's WrappedTorchNorm)
                   liger    Liger-Kernel's Triton RMSNorm (LigerMegatronRMSNorm: one kernel each way,
                            keeps only the input and the inverse RMS)
                   compile  the Llama RMSNorm through torch.compile
                   triton   our kernels (moba_train.kernels.rmsnorm: one pass each way, the weight's
                            gradient in the same pass), with each layer's residual adds folded in
                            (FusedNormTransformerLayer: the attention's residual add is the second norm's
                            forward, and both gradient sums of the residual stream are the norms' backward)
    swiglu         torch    Megatron's unfused chunk, SiLU, multiply (keeps both halves and SiLU's output)
                   megatron Megatron's own fused SwiGLU (bias_activation_fusion: torch.compile'd
                            forward and backward, keeps the fc1 output only)
                   liger    Liger-Kernel's gate-up SiLU-multiply kernel on the concatenated fc1 output
    rope           torch    Megatron's unfused rotation (cos and sin recomputed, four passes over q/k)
                   compile  the same function through torch.compile (one kernel each way)
                   triton   our kernel (moba_train.kernels.rope: one read and one write each way, the
                            angles' cosines and sines computed once per position for all heads); where
                            Megatron allows (one sequence per sample, no inference context), one kernel
                            splits and rotates the fused QKV projection's output and one writes its gradient
                            (FusedQKVRoPESelfAttention: Megatron's fused_single_qkv_rope without Transformer
                            Engine); packed documents (data.reset_attention_mask, context parallelism) are
                            one call over all tokens by the angles of their positions in their documents
                   (compile and triton are installed where Megatron looks for Transformer Engine's
                   fused RoPE)
    grad_accumulation
                   torch    Megatron's default without Apex: each weight gradient is a bf16 product, which
                            the DDP hook then adds to the fp32 main gradient (a second pass, unvectorised)
                   fused    the weight-gradient product accumulates into the fp32 main gradient itself
                            (Megatron's gradient_accumulation_fusion, whose Apex kernel is replaced by
                            PyTorch's matmul with an fp32 output: cuBLAS's beta = 1 epilogue); only on
                            models wrapped in Megatron's DDP, the owner of the main gradients
    cross_entropy  megatron Megatron's vocab-parallel cross-entropy (unfused: several fp32 passes)
                   megatron_fused  Megatron's native fused cross-entropy (cross_entropy_loss_fusion;
                            it rounds the logits' gradient to bf16 whatever the training precision)
                   liger    Liger-Kernel's vocab-parallel cross-entropy kernel (LigerMegatronCrossEntropy)
                   fused_linear  the output layer and the cross-entropy in chunks of tokens
                            (`linear_cross_entropy`): the [tokens, vocabulary] logits never exist whole,
                            for the price of the output layer's product once more in the backward; a
                            memory choice for long contexts and large vocabularies (tensor parallel 1)

`auto` (the default) takes FUSED_DEFAULTS on CUDA, the fastest alternative measured at the 1.1B recipe's
shapes (Liger's RMSNorm lost to PyTorch's own, which lost to ours with the residual adds), and the plain path on
CPU. Liger-Kernel's
kernels run on CUDA only (its Triton kernels do not run in Triton's CPU interpreter); asking for one on
CPU, or without the package, is one clear error. Every choice computes the same function:
tests/test_fusions.py compares the fused model's loss and gradients with the plain one's (CPU: the
torch.compile and Megatron paths; CUDA: all).
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import os
from typing import Callable

import torch

from moba_train.config import Config, ConfigError

OPS = ("rmsnorm", "swiglu", "rope", "grad_accumulation", "cross_entropy")
PLAIN = {"rmsnorm": "torch", "swiglu": "torch", "rope": "torch", "grad_accumulation": "torch",
         "cross_entropy": "megatron"}
FUSED_DEFAULTS = {"rmsnorm": "triton", "swiglu": "liger", "rope": "triton", "grad_accumulation": "fused",
                  "cross_entropy": "liger"}
"""`auto` on CUDA: the fastest per operation, forward + backward at the 1.1B recipe's shapes on an H200
(bench/results/fusions-NVIDIA_H200-cce91e3.json, ms): RMSNorm torch 0.32 / compile 0.38 / Liger 0.55 (PyTorch's
own RMSNorm is a fused kernel; alone, ours is slower: 0.46 against 0.39 on an H100); a layer's two norms with the
residual add between them (fusions-h100-57291f5.json, an H100) torch 1.29 / triton 0.86, and in the 32K recipe's
step (train-h100-*-32k-norms*.json) triton is 0.0-0.7% faster with full attention and 1.3-1.7% with MoBA;
SwiGLU Liger 1.00 / Megatron 1.31 / torch 3.79; RoPE (queries) triton 0.16 / compile 0.40 / torch 1.85;
cross-entropy Liger 6.2 / Megatron fused 11.5 / Megatron 17.9. The gradient accumulation is measured end to end
(train-h200-10a78b1-32k.json): with the Triton RoPE, full attention at 32K
1.878 -> 1.860 s per step (the fp32 adds, 8.7 ms, are gone; RoPE 18.2 -> 6.4 ms)."""
WITHOUT_LIGER = {"swiglu": "megatron", "cross_entropy": "megatron_fused"}
"""`auto` on CUDA where Liger-Kernel is not installed."""


def liger_available() -> bool:
    return importlib.util.find_spec("liger_kernel") is not None


def resolve(cfg: Config, device: torch.device) -> dict[str, str]:
    """The implementation of each operation for `cfg` on `device` (`auto` resolved); ConfigError for a
    choice this machine cannot run."""
    chosen = {}
    for op in OPS:
        value = getattr(cfg.model.fusions, op)
        if cfg.model.transformer_impl == "te" and op in ("rmsnorm", "swiglu", "grad_accumulation"):
            if value not in ("auto", "torch"):
                raise ConfigError(f"model.fusions.{op}={value} applies to model.transformer_impl=local (Transformer "
                                  f"Engine's layers fuse it themselves); set model.fusions.{op}=auto")
            value = "torch"  # the spec's own: Transformer Engine's
        if value == "auto":
            value = FUSED_DEFAULTS[op] if device.type == "cuda" else PLAIN[op]
            if value == "liger" and not liger_available():
                value = WITHOUT_LIGER[op]
        elif value == "liger" and device.type != "cuda":
            raise ConfigError(f"model.fusions.{op}=liger needs a CUDA device (Liger-Kernel's Triton kernels do not run "
                              f"on {device.type}); set model.fusions.{op}={PLAIN[op]} or auto")
        elif value == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ConfigError(f"model.fusions.{op}=triton needs a CUDA device (or TRITON_INTERPRET=1 for small CPU "
                              f"runs); set model.fusions.{op}={PLAIN[op]} or auto")
        elif value == "fused_linear" and cfg.parallel.tensor > 1:
            raise ConfigError(f"model.fusions.{op}=fused_linear computes the whole vocabulary on one rank; with "
                              f"parallel.tensor={cfg.parallel.tensor} set model.fusions.{op}=auto")
        elif value == "liger" and not liger_available():
            raise ConfigError(f"model.fusions.{op}=liger needs liger-kernel (pip install liger-kernel); install it or "
                              f"set model.fusions.{op}=auto")
        chosen[op] = value
    return chosen


def transformer_config_kwargs(chosen: dict[str, str]) -> dict:
    """TransformerConfig fields for the chosen implementations (install_rope first for rope=compile)."""
    kwargs = {}
    if chosen["swiglu"] == "megatron":
        kwargs["bias_activation_fusion"] = True
    elif chosen["swiglu"] == "liger":
        # Megatron's MLP builds its activation from the spec's module when this flag is set (its hook for
        # Transformer Engine's activations); the module sees the whole [gate | up] fc1 output.
        kwargs["use_te_activation_func"] = True
    if chosen["rope"] in ("compile", "triton"):
        kwargs["apply_rope_fusion"] = True
    if chosen["cross_entropy"] == "megatron_fused":
        kwargs.update(cross_entropy_loss_fusion=True, cross_entropy_fusion_impl="native")
    return kwargs


def norm_module(chosen: dict[str, str], default: type) -> type:
    """The RMSNorm module class for Megatron's layer specs (and the final norm)."""
    if chosen["rmsnorm"] == "triton":
        return TritonRMSNorm
    if chosen["rmsnorm"] == "liger":
        from liger_kernel.megatron import LigerMegatronRMSNorm

        return LigerMegatronRMSNorm
    if chosen["rmsnorm"] == "compile":
        return CompiledRMSNorm
    return default


def activation_module(chosen: dict[str, str]) -> type | None:
    return LigerSwiGLU if chosen["swiglu"] == "liger" else None


def loss_function(chosen: dict[str, str]) -> Callable | None:
    """Replacement for Megatron's cross-entropy, (logits [s, b, V/t], labels [s, b], tp_group) -> [s, b];
    None keeps Megatron's (plain or native fused, decided by the TransformerConfig)."""
    if chosen["cross_entropy"] != "liger":
        return None
    from liger_kernel.megatron import LigerMegatronCrossEntropy

    return LigerMegatronCrossEntropy()


# --- RMSNorm through torch.compile ------------------------------------------------------------------


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Llama's RMSNorm: statistics in fp32, normalised input cast back, then the weight."""
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype)


@functools.cache
def _compiled_rms_norm() -> Callable:
    return torch.compile(_rms_norm, dynamic=False)


class CompiledRMSNorm(torch.nn.Module):
    """RMSNorm with Megatron's norm-module signature, computed by `_rms_norm` through torch.compile.
    Its parameter is `weight`, as torch.nn.RMSNorm's: checkpoints and conversions are unchanged."""

    choice = "compile"

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, persist_layer_norm: bool = False,
                 zero_centered_gamma: bool = False, normalization: str = "RMSNorm"):
        super().__init__()
        if normalization != "RMSNorm" or zero_centered_gamma:
            raise ConfigError(f"model.fusions.rmsnorm={self.choice} implements Llama's RMSNorm only")
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size))
        setattr(self.weight, "sequence_parallel", bool(getattr(config, "sequence_parallel", False)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _compiled_rms_norm()(x, self.weight, self.eps)


# --- RMSNorm and the residual adds through our Triton kernels --------------------------------------


class TritonRMSNorm(CompiledRMSNorm):
    """RMSNorm by moba_train.kernels.rmsnorm (same parameter and signature as CompiledRMSNorm). On its own it is
    the final norm; inside FusedNormTransformerLayer the layer calls the residual forms with its weight."""

    choice = "triton"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from moba_train.kernels.rmsnorm import rms_norm

        return rms_norm(x, self.weight, self.eps)


@functools.cache
def fused_norm_layer_class() -> type:
    """FusedNormTransformerLayer, defined on first use (Megatron's TransformerLayer is imported lazily here)."""
    from megatron.core import tensor_parallel
    from megatron.core.transformer.identity_op import IdentityOp
    from megatron.core.transformer.transformer_layer import TransformerLayer
    from megatron.core.utils import make_viewless_tensor

    class FusedNormTransformerLayer(TransformerLayer):
        """Megatron's pre-norm layer with its norms and residual adds as moba_train.kernels.rmsnorm's kernels:

            x, a = rms_norm_with_residual(x)          the residual use of x; its gradient is summed in the norm's
            h, b = add_rms_norm(x, attention(a))      h = x + attention, one kernel; the gradient of h likewise
            out  = h + mlp(b)

        The same function as TransformerLayer's; two add kernels and two gradient sums fewer per layer, and each
        norm's backward one pass. Anything this form does not cover (dropout in training, linear biases, norm
        recomputation or offloading, cross-attention, MoE, inference contexts, positional calls) runs
        Megatron's forward, and so does an fp32 residual stream (Megatron casts it to the branch's dtype)."""

        def _fusable(self, kwargs: dict) -> bool:
            return (
                isinstance(self.input_layernorm, TritonRMSNorm) and isinstance(self.pre_mlp_layernorm, TritonRMSNorm)
                and isinstance(self.pre_cross_attn_layernorm, IdentityOp)
                and "hidden_states" in kwargs and kwargs.get("context") is None
                and kwargs.get("inference_context") is None and kwargs.get("inference_params") is None
                and not (self.training and self.hidden_dropout > 0.0) and not self.config.add_bias_linear
                and not self.config.fp32_residual_connection
                and not (self.recompute_input_layernorm or self.recompute_pre_mlp_layernorm)
                and not (getattr(self, "offload_attn_norm", False) or getattr(self, "offload_mlp_norm", False))
                and not self.is_moe_layer
            )

        def forward(self, *args, **kwargs):
            if args or not self._fusable(kwargs):
                return super().forward(*args, **kwargs)
            from moba_train.kernels.rmsnorm import add_rms_norm, rms_norm_with_residual

            norm1, norm2 = self.input_layernorm, self.pre_mlp_layernorm
            x, normed = rms_norm_with_residual(kwargs["hidden_states"], norm1.weight, norm1.eps)
            attention, _ = self.self_attention(
                normed,
                attention_mask=kwargs.get("attention_mask"),
                rotary_pos_emb=kwargs.get("rotary_pos_emb"),
                rotary_pos_cos=kwargs.get("rotary_pos_cos"),
                rotary_pos_sin=kwargs.get("rotary_pos_sin"),
                rotary_pos_cos_sin=kwargs.get("rotary_pos_cos_sin"),
                attention_bias=kwargs.get("attention_bias"),
                packed_seq_params=kwargs.get("packed_seq_params"),
                sequence_len_offset=kwargs.get("sequence_len_offset"),
            )
            h, normed = add_rms_norm(x, attention, norm2.weight, norm2.eps)
            mlp = functools.partial(self.mlp, padding_mask=kwargs.get("padding_mask"))
            if self.recompute_mlp:
                mlp_output, _ = tensor_parallel.checkpoint(mlp, False, normed)
            else:
                mlp_output, _ = mlp(normed)
            out = h + mlp_output
            return make_viewless_tensor(inp=out, requires_grad=out.requires_grad, keep_graph=True), None

    return FusedNormTransformerLayer


def layer_module(chosen: dict[str, str], default: type) -> type:
    """The transformer layer class for Megatron's layer specs: FusedNormTransformerLayer with rmsnorm=triton."""
    return fused_norm_layer_class() if chosen["rmsnorm"] == "triton" else default


# --- SwiGLU through Liger-Kernel ----------------------------------------------------------------------


class LigerSwiGLU(torch.nn.Module):
    """SiLU(gate) * up over Megatron's concatenated [gate | up] fc1 output, by Liger-Kernel's kernel (it
    keeps the fc1 output only and recomputes SiLU in the backward)."""

    def __init__(self, config=None):
        super().__init__()

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None) -> dict:
        """Nothing to save (no parameters); Megatron's MLP asks each of its modules when it checkpoints."""
        return {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from liger_kernel.ops import LigerFusedGateUpSiLUMulFunction

        shape = x.shape
        out = LigerFusedGateUpSiLUMulFunction.apply(x.reshape(-1, shape[-1]), False)
        return out.view(*shape[:-1], shape[-1] // 2)


# --- RoPE through torch.compile or our Triton kernel --------------------------------------------------


@functools.cache
def _compiled_rope_bshd() -> Callable:
    from megatron.core.models.common.embeddings import rope_utils

    def rope(t: torch.Tensor, freqs: torch.Tensor, rotary_interleaved: bool = False) -> torch.Tensor:
        return rope_utils._apply_rotary_pos_emb_bshd(t, freqs, rotary_interleaved=rotary_interleaved)

    return torch.compile(rope, dynamic=False)


_ROPE = {"impl": "compile"}  # the fused RoPE of the last model built (`install_rope`)


def _fused_rope(t: torch.Tensor, freqs: torch.Tensor, interleaved: bool = False, **_) -> torch.Tensor:
    """Transformer Engine's fused_apply_rotary_pos_emb signature, [s, b, h, d] with freqs [s, 1, 1, d]."""
    if _ROPE["impl"] == "triton" and not interleaved:
        from moba_train.kernels.rope import rope_supported, rope_triton

        if rope_supported(t, freqs):
            return rope_triton(t, freqs)
    return _compiled_rope_bshd()(t, freqs, interleaved)


def _fused_rope_thd(t: torch.Tensor, cu_seqlens: torch.Tensor, freqs: torch.Tensor, cp_size: int = 1,
                    cp_rank: int = 0, **_) -> torch.Tensor:
    """Packed sequences (thd: t `[tokens, h, d]`, documents delimited by cu_seqlens). With rope=triton, our
    kernel over every token at once, by the angles of each token's position in its document (`_packed_freqs`:
    built once per forward and shared by the layers, so no layer keeps its own for the backward). Otherwise,
    and for shapes the kernel does not take, Megatron's own path (the compiled kernel would be recompiled for
    every document length), which builds the same angles in every call and rotates in four unfused passes."""
    from megatron.core import parallel_state
    from megatron.core.models.common.embeddings import rope_utils

    group = parallel_state.get_context_parallel_group()
    if (group.size(), group.rank()) != (cp_size, cp_rank):
        raise RuntimeError(f"RoPE was asked for context-parallel rank {cp_rank} of {cp_size}, but this process is "
                           f"rank {group.rank()} of {group.size()}")
    if _ROPE["impl"] == "triton" and t.dim() == 3:
        from moba_train.kernels.rope import rope_supported, rope_triton

        angles = _packed_freqs(t, cu_seqlens, freqs, cp_size, cp_rank)
        if rope_supported(t[:, None], angles):
            return rope_triton(t[:, None], angles)[:, 0]
    return rope_utils._apply_rotary_pos_emb_thd(t, cu_seqlens, freqs, cp_group=group)


_PACKED_FREQS: dict = {}  # the last call's freqs (held, so that identity means the same tensor), version, key, angles


def _packed_freqs(t: torch.Tensor, cu_seqlens: torch.Tensor, freqs: torch.Tensor, cp_size: int,
                  cp_rank: int) -> torch.Tensor:
    """The angles `[tokens, 1, 1, d]` of each token of this context-parallel rank's packed documents, chosen from
    freqs as Megatron's `_apply_rotary_pos_emb_thd` chooses them (each document from position 0, or at its
    offset when freqs covers every packed position). Every layer of a forward passes the same freqs and
    boundaries, so the last result is reused while both are unchanged."""
    from megatron.core.models.common.embeddings import rope_utils

    bounds = tuple(cu_seqlens.tolist())  # on the host (model.packed_seq_params): no device sync
    key = (bounds, cp_size, cp_rank, t.shape[0], t.device)
    last = _PACKED_FREQS
    if last and last["freqs"] is freqs and last["version"] == freqs._version and last["key"] == key:
        return last["angles"]
    seqlens = [(b - a) // cp_size for a, b in zip(bounds[:-1], bounds[1:])]
    exact = freqs.dim() >= 1 and freqs.size(0) == bounds[-1]
    parts = [rope_utils._get_thd_freqs_on_this_cp_rank(cp_rank, cp_size, x, freqs, bounds[i] if exact else 0)
             for i, x in enumerate(torch.split(t, seqlens))]
    angles = torch.cat(parts).float().contiguous()
    _PACKED_FREQS.update(freqs=freqs, version=freqs._version, key=key, angles=angles)
    return angles


def _fused_qkv_rope(mixed_qkv: torch.Tensor, q_freqs: torch.Tensor, k_freqs: torch.Tensor,
                    split_arg_list: list[int], **_) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Transformer Engine's apply_fused_qkv_rotary_pos_emb signature: the projection [s, b, g, (r + 2) d] and the
    split [r d, d, d] -> q [s, b, g r, d], k and v [s, b, g, d]."""
    from moba_train.kernels.rope import qkv_rope_supported, qkv_rope_triton

    r = split_arg_list[0] // split_arg_list[1]
    if qkv_rope_supported(mixed_qkv, q_freqs, k_freqs, r):
        return qkv_rope_triton(mixed_qkv, q_freqs, k_freqs, r)
    query, key, value = torch.split(mixed_qkv, split_arg_list, dim=3)
    query = query.reshape(query.shape[0], query.shape[1], -1, split_arg_list[1])
    return _fused_rope(query, q_freqs), _fused_rope(key, k_freqs), value


@functools.cache
def fused_qkv_rope_attention_class() -> type:
    """FusedQKVRoPESelfAttention, defined on first use (Megatron imported lazily here)."""
    from megatron.core.transformer import attention as attention_module
    from megatron.core.transformer.identity_op import IdentityOp

    class FusedQKVRoPESelfAttention(attention_module.SelfAttention):
        """Megatron's SelfAttention that takes its fused_single_qkv_rope path (one kernel splits and rotates the QKV
        projection, `_fused_qkv_rope`) on every call that path covers: one sequence per sample (no packed
        documents, hence no context parallelism here), no inference context, RoPE given, no q/k norms, query groups
        not split by tensor parallelism. Megatron asserts when the flag is on for a call it does not cover, so the
        flag is set per call on this module's own copy of the config; other calls take the split path."""

        def __init__(self, config, *args, **kwargs):
            super().__init__(config, *args, **kwargs)
            self.config = copy.copy(self.config)  # the flag below is this module's alone
            c, no_rope = self.config, self.config.no_rope_freq  # no_rope: layers Megatron runs without RoPE
            self.fused_layer = (  # what the layer's build decides; each call adds its own conditions
                attention_module.HAVE_FUSED_QKV_ROPE and not (no_rope and no_rope[self.layer_number - 1])
                and not c.test_mode and not c.flash_decode and not c.attention_output_gate
                and not hasattr(c, "yarn_rotary_scaling_factor") and c.num_query_groups >= self.world_size
                and all(norm is None or isinstance(norm, IdentityOp) for norm in (self.q_layernorm, self.k_layernorm))
            )

        def forward(self, hidden_states, *args, **kwargs):
            self.config.fused_single_qkv_rope = (
                self.fused_layer and not args and kwargs.get("rotary_pos_emb") is not None
                and kwargs.get("packed_seq_params") is None and kwargs.get("inference_context") is None
                and kwargs.get("inference_params") is None and kwargs.get("key_value_states") is None
            )
            return super().forward(hidden_states, *args, **kwargs)

    return FusedQKVRoPESelfAttention


def attention_module(chosen: dict[str, str], default: type) -> type:
    """The self-attention class for Megatron's layer specs: FusedQKVRoPESelfAttention with rope=triton."""
    return fused_qkv_rope_attention_class() if chosen["rope"] == "triton" else default


def install_rope(chosen: dict[str, str]) -> None:
    """For rope=compile or triton, fill Megatron's hooks for a fused RoPE (left None without Transformer
    Engine, and checked by TransformerConfig) with ours. Process-wide, like the hooks themselves (the last
    model built decides between compile and triton); models whose config leaves apply_rope_fusion off never
    call them. Shapes the Triton kernel does not take (interleaved or partial rotation) are compiled."""
    if chosen["rope"] not in ("compile", "triton"):
        return
    from megatron.core.models.common.embeddings import rope_utils

    _ROPE["impl"] = chosen["rope"]

    if rope_utils.fused_apply_rotary_pos_emb is None:
        rope_utils.fused_apply_rotary_pos_emb = _fused_rope
    if rope_utils.fused_apply_rotary_pos_emb_thd is None:
        rope_utils.fused_apply_rotary_pos_emb_thd = _fused_rope_thd
    if chosen["rope"] == "triton":
        from megatron.core.transformer import attention as attention_module

        if not attention_module.HAVE_FUSED_QKV_ROPE:  # Transformer Engine's, where installed, stays
            attention_module.apply_fused_qkv_rotary_pos_emb = _fused_qkv_rope
            attention_module.HAVE_FUSED_QKV_ROPE = True


# --- Weight gradients accumulated into the fp32 main gradients ----------------------------------------


def _wgrad_gemm_accum(total_input: torch.Tensor, grad_output: torch.Tensor, main_grad: torch.Tensor) -> None:
    """main_grad += grad_output^T @ total_input over all leading dimensions (Apex's wgrad_gemm_accum_fp32 /
    _fp16 contract): on CUDA with half-precision operands one cuBLAS product that reads and writes the
    main gradient in its own dtype; otherwise in the main gradient's dtype."""
    a = grad_output.reshape(-1, grad_output.shape[-1]).t()
    b = total_input.reshape(-1, total_input.shape[-1])
    if main_grad.is_cuda and a.dtype != main_grad.dtype and _ACCUMULATE["mode"] == "in_place":
        torch.addmm(main_grad, a, b, out_dtype=main_grad.dtype, out=main_grad)
    elif main_grad.is_cuda and a.dtype != main_grad.dtype:
        main_grad.add_(torch.mm(a, b, out_dtype=main_grad.dtype))
    else:
        main_grad.addmm_(a.to(main_grad.dtype), b.to(main_grad.dtype))


class _ApexWgrad:
    """What Megatron's linear layers call for gradient_accumulation_fusion (Apex's fused_weight_gradient_mlp_cuda)."""

    wgrad_gemm_accum_fp32 = staticmethod(_wgrad_gemm_accum)
    wgrad_gemm_accum_fp16 = staticmethod(_wgrad_gemm_accum)


_ACCUMULATE = {"mode": "in_place"}


def accumulation_mode(device: torch.device) -> str | None:
    """How `_wgrad_gemm_accum` can accumulate a bf16 product in fp32 on `device`: "in_place" (into an fp32
    `out` that is also its input), "out_dtype" (an fp32 product, then added), "cpu" (fp32 operands), or None
    where this PyTorch has no fp32-output product (`out_dtype` of torch.mm is recent). Checked once, before
    training: the check reads the device."""
    if device.type != "cuda":
        return "cpu"
    g = torch.Generator().manual_seed(0)
    total_input, grad_output = (torch.randn(80, n, generator=g).bfloat16() for n in (64, 96))
    main_grad = torch.randn(96, 64, generator=g)
    expected = main_grad + grad_output.float().t() @ total_input.float()
    before = _ACCUMULATE["mode"]
    try:
        for mode in ("in_place", "out_dtype"):  # the product training runs, in each of its two forms
            _ACCUMULATE["mode"] = mode
            out = main_grad.to(device)
            try:
                _wgrad_gemm_accum(total_input.to(device), grad_output.to(device), out)
            except (RuntimeError, TypeError):
                continue
            if torch.allclose(out.cpu(), expected, rtol=1e-3, atol=1e-3):
                return mode
        return None
    finally:
        _ACCUMULATE["mode"] = before


def install_grad_accumulation(cfg: Config, ddp_model: torch.nn.Module, device: torch.device) -> int:
    """For grad_accumulation=fused, turn on gradient_accumulation_fusion in every Megatron linear layer of a
    model already wrapped in Megatron's DDP (which gave each weight its fp32 `main_grad`), with our product
    in the place of Apex's kernel. Returns the number of layers switched: 0 for the plain choice, and for
    `auto` where this PyTorch cannot accumulate in fp32 (asked for explicitly, that is a ConfigError)."""
    if resolve(cfg, device)["grad_accumulation"] != "fused":
        return 0
    mode = accumulation_mode(device)
    if mode is None:
        if cfg.model.fusions.grad_accumulation == "fused":
            raise ConfigError(f"model.fusions.grad_accumulation=fused needs PyTorch's fp32-output matmul, which torch "
                              f"{torch.__version__} lacks; upgrade torch or set model.fusions.grad_accumulation=auto")
        return 0
    _ACCUMULATE["mode"] = mode
    from megatron.core.tensor_parallel import layers

    if getattr(layers, "fused_weight_gradient_mlp_cuda", None) is None:
        layers.fused_weight_gradient_mlp_cuda = _ApexWgrad
    switched = 0
    for module in ddp_model.modules():
        if isinstance(module, (layers.ColumnParallelLinear, layers.RowParallelLinear)):
            if module.weight is not None and not hasattr(module.weight, "main_grad"):  # None: the tied embedding's
                raise RuntimeError("grad_accumulation=fused needs the model wrapped in Megatron's DDP first")
            module.gradient_accumulation_fusion = True
            switched += 1
    return switched


# --- The output layer and the cross-entropy in chunks of tokens ---------------------------------------

LINEAR_LOSS_CHUNK_BYTES = 512 << 20  # fp32 logits of one chunk (`linear_cross_entropy`)


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Per-token cross-entropy of the logits hidden @ weight^T, a chunk of tokens at a time: the logits of
    all tokens never exist at once. The forward keeps each token's log-sum-exp; the backward recomputes a
    chunk's logits (the output layer's product once more) and forms softmax - onehot, scaled by each token's
    incoming gradient, so any use of the per-token losses (loss masks, weights) is exact and nothing is read
    on the host."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk: int) -> torch.Tensor:
        n = hidden.shape[0]
        losses = torch.empty(n, dtype=torch.float32, device=hidden.device)
        lse = torch.empty_like(losses)
        for start in range(0, n, chunk):
            end = min(start + chunk, n)
            logits = (hidden[start:end] @ weight.t()).float()
            lse[start:end] = torch.logsumexp(logits, dim=-1)
            losses[start:end] = lse[start:end] - logits.gather(1, labels[start:end, None]).squeeze(1)
        ctx.save_for_backward(hidden, weight, labels, lse)
        ctx.chunk = chunk
        return losses

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        hidden, weight, labels, lse = ctx.saved_tensors
        n, chunk = hidden.shape[0], ctx.chunk
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) \
            if ctx.needs_input_grad[1] else None
        for start in range(0, n, chunk):
            end = min(start + chunk, n)
            h = hidden[start:end]
            probs = torch.exp((h @ weight.t()).float() - lse[start:end, None])
            probs.scatter_add_(1, labels[start:end, None], probs.new_full((end - start, 1), -1.0))
            dlogits = (probs * grad[start:end, None].float()).to(hidden.dtype)
            if grad_hidden is not None:
                grad_hidden[start:end] = dlogits @ weight
            if grad_weight is not None:
                grad_weight += (dlogits.t() @ h).float()
        return grad_hidden, None if grad_weight is None else grad_weight.to(weight.dtype), None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         chunk: int | None = None) -> torch.Tensor:
    """Per-token losses `[N]` (fp32) of hidden `[N, H]` through the output layer's weight `[V, H]` against
    labels `[N]`: Megatron's cross-entropy of the output layer's logits, without keeping `[N, V]` logits
    (`model.fusions.cross_entropy=fused_linear`). `chunk` tokens at a time (default: fp32 logits of
    LINEAR_LOSS_CHUNK_BYTES)."""
    if chunk is None:
        chunk = max(1, LINEAR_LOSS_CHUNK_BYTES // (4 * weight.shape[0]))
    return _ChunkedLinearCrossEntropy.apply(hidden, weight, labels, chunk)
