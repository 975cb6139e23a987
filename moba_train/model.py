"""The Llama model: Megatron-Core GPTModel from a Config, with our core attention in every layer.

- `layer_specs(cfg)`: the hybrid plan as one list of layer specs (MoBA or full core attention).
- `build_model(cfg)`: GPTModel in fp32 on the current device (the trainer wraps it for bf16 / DDP).
- `forward_step(model, batch)`: the model-forward contract the trainer and the HF tests share.

RoPE positions. Megatron's GPTModel does not read `position_ids` for RoPE: it rotates by the token
index within each sequence the attention sees. Unpacked batches (each sample one sequence) go
through the usual sbhd path, positions 0..s-1 per sample. Packed batches (per-document cu_seqlens,
`data.reset_attention_mask`) go through Megatron's thd path: the micro-batch is flattened into one
row of b*s tokens with PackedSeqParams(qkv_format="thd"), and Megatron's `_apply_rotary_pos_emb_thd`
restarts positions at every document, exactly like running each document alone; our core attention
receives `[t, heads, D]` and the same cu_seqlens, so MoBA blocks restart at each document too.
Batches with reset position ids but one sequence per sample therefore still rotate by the sample
index (keep data.reset_position_ids equal to data.reset_attention_mask).
"""

from __future__ import annotations

import copy
import math
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.torch_norm import WrappedTorchNorm
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
from megatron.core.transformer.transformer_config import TransformerConfig

from moba_train import context_parallel, fusions
from moba_train.config import Config, ConfigError
from moba_train.core_attention import FullCoreAttention, MoBACoreAttention
from moba_train.distributed import resolve_device


def padded_vocab_size(cfg: Config, tp: int) -> int:
    """Embedding rows: vocab_size rounded up to a multiple of make_vocab_size_divisible_by * tp."""
    multiple = cfg.model.make_vocab_size_divisible_by * tp
    return math.ceil(cfg.model.vocab_size / multiple) * multiple


def compute_dtype(cfg: Config, device: torch.device) -> torch.dtype:
    """train.precision resolved for `device`: auto is bf16 on CUDA and fp32 on CPU."""
    if cfg.train.precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32


def transformer_config(cfg: Config) -> TransformerConfig:
    """Megatron-Core TransformerConfig for the Llama architecture in `cfg` (uses the parallel state)."""
    m, par = cfg.model, cfg.parallel
    if par.sequence_parallel and m.transformer_impl == "local":
        raise ConfigError(
            "parallel.sequence_parallel needs model.transformer_impl=te (the local RMSNorm does not support it); "
            "set parallel.sequence_parallel=false"
        )
    bf16 = compute_dtype(cfg, resolve_device(cfg)) == torch.bfloat16
    recompute = {
        "none": {},
        "full": {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1},
        # The MLP only: Megatron-Core 0.16's norm recomputation (recompute_modules "layernorm") needs
        # Transformer Engine (CheckpointWithoutOutput() takes itself for FP8 and calls TE's FP8 state).
        "selective": {"recompute_granularity": "selective", "recompute_modules": ["mlp"]},
    }[cfg.train.recompute]
    chosen = fusions.resolve(cfg, resolve_device(cfg))
    fusions.install_rope(chosen)  # before TransformerConfig, which checks that a fused RoPE exists
    return TransformerConfig(
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        ffn_hidden_size=m.ffn_hidden_size,
        num_attention_heads=m.num_attention_heads,
        num_query_groups=m.num_query_groups,
        kv_channels=m.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=m.norm_epsilon,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=m.init_method_std,
        tensor_model_parallel_size=par.tensor,
        pipeline_model_parallel_size=par.pipeline,
        context_parallel_size=par.context,
        cp_comm_type=par.context_comm,
        sequence_parallel=par.sequence_parallel,
        bf16=bf16,
        params_dtype=torch.float32,
        pipeline_dtype=torch.bfloat16 if bf16 else torch.float32,
        **recompute,
        **fusions.transformer_config_kwargs(chosen),
    )


def _base_layer_spec(cfg: Config) -> tuple[ModuleSpec, type]:
    """The Llama layer spec for model.transformer_impl, and its final-norm module."""
    if cfg.model.transformer_impl == "local":
        chosen = fusions.resolve(cfg, resolve_device(cfg))
        spec = get_gpt_layer_local_spec(normalization="RMSNorm")
        norm = fusions.norm_module(chosen, WrappedTorchNorm)
        spec.submodules.input_layernorm = spec.submodules.pre_mlp_layernorm = norm
        spec.module = fusions.layer_module(chosen, spec.module)
        attention = spec.submodules.self_attention
        attention.module = fusions.attention_module(chosen, attention.module)
        spec.submodules.mlp.submodules.activation_func = fusions.activation_module(chosen)
        return spec, norm
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        raise ConfigError(
            "model.transformer_impl is 'te' but transformer_engine is not installed; install it or set "
            "model.transformer_impl=local"
        ) from None
    from megatron.core.extensions.transformer_engine import TENorm
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

    return get_gpt_layer_with_transformer_engine_spec(), TENorm


def layer_specs(cfg: Config) -> list[ModuleSpec]:
    """One layer spec per layer, first to last, following `cfg.layer_kinds()` (the hybrid plan).

    Layers differ only in the core_attention slot: MoBACoreAttention (block_size, topk, backend,
    shared_gqa_selection from cfg.attention) or FullCoreAttention.
    """
    att = cfg.attention
    core_attention = {
        "moba": ModuleSpec(
            module=MoBACoreAttention,
            params={
                "block_size": att.block_size,
                "topk": att.topk,
                "backend": att.backend,
                "shared_gqa_selection": att.shared_gqa_selection,
            },
        ),
        "full": ModuleSpec(module=FullCoreAttention, params={"sdpa_backend": att.full_backend}),
    }
    base, _ = _base_layer_spec(cfg)
    specs = []
    for kind in cfg.layer_kinds():
        spec = copy.deepcopy(base)
        spec.submodules.self_attention.submodules.core_attention = core_attention[kind]
        specs.append(spec)
    return specs


def rope_inv_freq(cfg: Config) -> torch.Tensor:
    """RoPE inverse frequencies `[head_dim // 2]` fp32, with Llama 3.1 scaling when configured.

    Exactly Hugging Face's default and "llama3" rope initialisation, honouring all four scaling
    values (Megatron-Core 0.16.1 fixes three of them).
    """
    dim, theta = cfg.model.head_dim, cfg.model.rope_theta
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaling = cfg.model.rope_scaling
    if scaling is None:
        return inv_freq
    factor, low, high = scaling.factor, scaling.low_freq_factor, scaling.high_freq_factor
    old_context = scaling.original_max_position_embeddings
    low_freq_wavelen = old_context / low
    high_freq_wavelen = old_context / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class LlamaModel(GPTModel):
    """Megatron-Core's GPTModel, whose cross-entropy may be replaced (model.fusions.cross_entropy=liger) or
    computed with the output layer in chunks (fused_linear: `fusions.linear_cross_entropy`)."""

    def __init__(self, *args, loss_function=None, fused_linear_loss: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.loss_function = loss_function
        self.fused_linear_loss = fused_linear_loss

    def _postprocess(self, hidden_states, input_ids, position_ids, labels, *args, **kwargs):
        """Megatron's, except that with fused_linear_loss the losses of labelled tokens come from the hidden
        states and the output weight directly (no logits kept); inference and multi-token prediction keep
        Megatron's path."""
        inference = kwargs.get("inference_context") is not None and not self.training
        if (not self.fused_linear_loss or labels is None or not self.post_process or inference
                or self.config.mtp_num_layers is not None):
            return super()._postprocess(hidden_states, input_ids, position_ids, labels, *args, **kwargs)
        weight = self.shared_embedding_or_output_weight() if self.share_embeddings_and_output_weights \
            else self.output_layer.weight
        s, b, h = hidden_states.shape
        losses = fusions.linear_cross_entropy(hidden_states.reshape(s * b, h), weight,
                                              labels.transpose(0, 1).reshape(s * b))
        return losses.view(s, b).transpose(0, 1).contiguous()

    def compute_language_model_loss(self, labels: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        if self.loss_function is None:
            return super().compute_language_model_loss(labels, logits)
        loss = self.loss_function(logits, labels.transpose(0, 1).contiguous(), self.pg_collection.tp)
        return loss.transpose(0, 1).contiguous()


def build_model(cfg: Config) -> GPTModel:
    """GPTModel (Llama) in fp32 on the current device; needs `init_distributed` (and `set_seed`) first."""
    config = transformer_config(cfg)
    _, final_norm = _base_layer_spec(cfg)
    chosen = fusions.resolve(cfg, resolve_device(cfg))
    model = LlamaModel(
        loss_function=fusions.loss_function(chosen),
        fused_linear_loss=chosen["cross_entropy"] == "fused_linear",
        config=config,
        transformer_layer_spec=TransformerBlockSubmodules(layer_specs=layer_specs(cfg), layer_norm=final_norm),
        vocab_size=padded_vocab_size(cfg, cfg.parallel.tensor),
        max_sequence_length=cfg.model.max_position_embeddings,
        pre_process=True,
        post_process=True,
        share_embeddings_and_output_weights=cfg.model.tie_embeddings,
        position_embedding_type="rope",
        rotary_percent=1.0,
        rotary_base=cfg.model.rope_theta,
    )
    # Our inv_freq replaces Megatron's (a plain attribute, not in the state dict) before any forward
    # fills RotaryEmbedding's cache.
    rope = model.rotary_pos_emb
    rope.inv_freq = rope_inv_freq(cfg).to(rope.inv_freq.device)
    # Megatron allocates its linear layers on the current device but torch norms (WrappedTorchNorm) on the CPU;
    # only the distributed optimizer's buffers would move them. Megatron-LM moves the whole model likewise.
    return model.to(torch.cuda.current_device())


def packed_seq_params(batch: dict, context_parallel_size: int = 1) -> Optional[PackedSeqParams]:
    """PackedSeqParams (thd) for a batch whose cu_seqlens split samples into documents, else None.

    None when cu_seqlens is `0, s, 2s, ..., b*s` (every sample one sequence) and there is no context
    parallelism. Otherwise the boundaries over the flattened tokens, kept on the host (the core
    attention and Megatron's thd RoPE read them there, so no layer waits for the GPU); `forward_step`
    then runs the micro-batch as one row (Megatron's thd path needs batch 1), see the module docstring.
    Under context parallelism the batch is a shard (`context_parallel.shard_batch`) and the boundaries
    are the whole padded sequences', which Megatron's thd RoPE splits by CP rank as the shard does.
    """
    b, s = batch["tokens"].shape
    cu_seqlens = batch["cu_seqlens"].to("cpu", torch.int32)
    if context_parallel_size == 1 and cu_seqlens.tolist() == list(range(0, (b + 1) * s, s)):
        return None
    max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
    return PackedSeqParams(
        qkv_format="thd",
        cu_seqlens_q=cu_seqlens,
        cu_seqlens_kv=cu_seqlens,
        max_seqlen_q=max_seqlen,
        max_seqlen_kv=max_seqlen,
    )


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on `device` without waiting for the device: a copy from pageable memory would first
    synchronise the stream (the host would wait for all queued work), so CUDA copies go through pinned
    memory, asynchronously (PyTorch's pinned allocator keeps the staging buffer until the copy is done).
    Pinning copies into a tensor of the same strides, which a broadcast view (stride 0: the evaluation's
    position ids) cannot be written to, so views that are not contiguous are made so first."""
    if tensor.device == device:
        return tensor
    if device.type == "cuda" and tensor.device.type == "cpu":
        return tensor.contiguous().pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def local_batch(batch: dict) -> dict:
    """The part of a micro-batch this process computes: all of it, or under context parallelism its shard
    (`context_parallel.shard_batch`: the one place a batch is split over the CP group)."""
    cp = parallel_state.get_context_parallel_world_size()
    if cp == 1:
        return batch
    return context_parallel.shard_batch(batch, cp, parallel_state.get_context_parallel_rank())


def token_losses(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """Per-token cross-entropy `[b, s]` (fp32) of one micro-batch, before loss_mask.

    Moves the batch to the model's device. Packed batches run as one row of b*s tokens (thd). Under
    context parallelism pass `local_batch(batch)`: the losses are then those of this rank's shard.
    """
    device = next(model.parameters()).device
    params = packed_seq_params(batch, parallel_state.get_context_parallel_world_size())
    tokens, labels, position_ids = (to_device(batch[key], device) for key in ("tokens", "labels", "position_ids"))
    b, s = tokens.shape
    if params is not None:
        tokens, labels, position_ids = (x.reshape(1, b * s) for x in (tokens, labels, position_ids))
    loss = model(tokens, position_ids, attention_mask=None, labels=labels, packed_seq_params=params)
    return loss.reshape(b, s).float()


def forward_step(model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """One micro-batch forward: (sum of loss_mask-weighted token losses, number of counted tokens).

    Both are fp32 scalars on the model's device, over this process's part of the batch (`local_batch`);
    the trainer sums them over micro-batches and data- and context-parallel ranks.
    """
    batch = local_batch(batch)
    losses = token_losses(model, batch)
    loss_mask = to_device(batch["loss_mask"], losses.device).float()
    return (losses * loss_mask).sum(), loss_mask.sum()


def matrix_params(cfg: Config) -> int:
    """Matrix parameters N for model FLOPs (6 N per token): every linear layer of every transformer
    layer plus the output layer (padded vocabulary at cfg.parallel.tensor), not the embedding lookup."""
    m = cfg.model
    h, d = m.hidden_size, m.head_dim
    qkv = h * (m.num_attention_heads + 2 * m.num_query_groups) * d
    proj = m.num_attention_heads * d * h
    mlp = h * 2 * m.ffn_hidden_size + m.ffn_hidden_size * h
    output = h * padded_vocab_size(cfg, cfg.parallel.tensor)
    return m.num_layers * (qkv + proj + mlp) + output
