"""Memory per GPU of a recipe, estimated from the recipe alone (no model is built): what `pretrain.py
--dry-run` prints and what the trainer checks against the device before it builds a 70 GB model on a
24 GB machine.

Per process, with tensor parallelism t, context parallelism c and data parallelism d (Megatron-Core's
DDP and optimizer, bf16 training, gradients reduced in fp32):
    weights       2 bytes per parameter in bf16 (4 in fp32) of this rank's shard (matrices / t)
    gradients     4 bytes per parameter (the fp32 gradient buffer)
    optimizer     12 bytes per parameter (fp32 main weights in bf16 training, Adam's two moments;
                  8 in fp32 training), divided by d x c with the distributed optimizer
    activations   what autograd keeps for the backward of one micro-batch of s / c tokens, per token and layer
                  (elements, 2 bytes in bf16; `layer_activation_bytes`):
                      4 h                 the layer input, the attention residual (the norms' inputs) and
                                          both norms' outputs (the QKV and fc1 products' inputs)
                      (2 Hq + 2 Hkv) D / t  with one row (one document per sample, or packed documents:
                                          data.reset_attention_mask, or context parallelism): q, k, v and
                                          the attention output (also the output projection's input); v is
                                          its own tensor (the fused QKV RoPE kernel writes it, or the core
                                          attention copies it off the QKV projection's output, which its
                                          view would keep whole: (Hq + 2 Hkv) D more);
                      (3 Hq + 2 Hkv) D / t  with several one-document rows: q, k, v and the output in the
                                          attention's layout, and the output again in the projection's
                      3 F / t             the fc1 output (2 F) and the SwiGLU output (F, the fc2 input) with
                                          a fused SwiGLU (megatron or liger); 5 F / t with PyTorch's (Megatron's
                                          glu keeps SiLU's output and the up half plus its offset)
                  plus the attention's log-sum-exp (Hq / t floats) and the norms' inverse RMS (2 floats);
                  4 D more for the cosines and sines of Megatron's unfused RoPE (model.fusions.rope torch, or
                  compile on packed documents).
                  Selective recomputation (the MLP, from its input) drops the MLP's; full recomputation keeps
                  every layer's input (h) plus one layer's activations while it is recomputed.
                  Under context parallelism (all_gather) each layer also keeps the gathered K and V
                  prefixes, 2 (1 + 1 / 2c) s Hkv D / t elements (with full recomputation only the layer
                  being recomputed holds them).
    logits        the output layer's logits and the cross-entropy's fp32 copy: 6 bytes per vocabulary
                  entry (/ t) per token of the micro-batch; also 6 with Liger's cross-entropy (measured: 4 bytes
                  per entry held from the forward, the logits and their gradient, and 2 more at the start of the
                  backward); with fused_linear 8 bytes per token (its losses and log-sum-exps) and one chunk's
                  fp32 logits and probabilities
The estimate ignores the allocator's fragmentation, the CUDA context (about 0.5-1 GiB) and the other layers'
transient buffers. Measured (scripts/bench_memory.py, the 1.1B recipes): what one layer keeps is the formula's to
the byte with full attention, on one document per sample and on packed documents, and 0.9% (32K) and 2.4% (128K)
more with MoBA, on either (its routing) (one H100 at 777e163 for 32K, memory-h100-777e163-32k.json; one H100 at
3f7cb3a for 128K, memory-h100-3f7cb3a-128k.json, where packed full attention keeps 26,760 B/token, 32,904 at
99f2efd before the copy of v and FA2's GQA); the allocator's bytes after one forward grow by the same amount per
layer, so nothing is kept outside autograd's saved tensors. Whole steps (the bench_train results): without
recomputation at 32K the estimate (61.6 GiB) is 0.6% below full attention's peak (62.0 GiB) and 0.9% below MoBA
block 512's (62.2 GiB; train-h200-99f2efd-32k.json); at 128K with the MLP recomputed (94.8 GiB) 1.1% below full
attention's 95.9 GiB and 2.3% below MoBA's 97.1 GiB (train-h200-99f2efd-128k.json); with full recomputation at 32K
(28.9 GiB) 7% above the measured 26.9 GiB (train-h100-5377e38-32k-b512-recipe.json).
"""

from __future__ import annotations

from dataclasses import dataclass

from moba_train.config import Config


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per process."""

    weights: int
    gradients: int
    optimizer: int
    activations: int
    logits: int

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.activations + self.logits

    def lines(self) -> list[str]:
        gib = 2**30
        parts = [("weights", self.weights), ("gradients", self.gradients), ("optimizer state", self.optimizer),
                 ("activations", self.activations), ("logits and loss", self.logits)]
        return [f"  {name:<16} {value / gib:8.1f} GiB" for name, value in parts] + [
            f"  {'total':<16} {self.total / gib:8.1f} GiB"]


def parameters_per_rank(cfg: Config) -> int:
    """This tensor-parallel rank's parameters: its shard of every matrix and the embedding, the norms whole."""
    from moba_train.model import padded_vocab_size

    m, tp = cfg.model, cfg.parallel.tensor
    h, d = m.hidden_size, m.head_dim
    per_layer = (h * (m.num_attention_heads + 2 * m.num_query_groups) * d + m.num_attention_heads * d * h
                 + 3 * h * m.ffn_hidden_size) // tp + 2 * h
    vocab = padded_vocab_size(cfg, tp) // tp * h
    return m.num_layers * per_layer + vocab * (1 if m.tie_embeddings else 2) + h


def packs_documents(cfg: Config) -> bool:
    """Whether the recipe's micro-batches run as one row of packed documents (`model.packed_seq_params`):
    indexed data attended per document (data.reset_attention_mask), or context parallelism."""
    return (cfg.data.kind == "indexed" and cfg.data.reset_attention_mask) or cfg.parallel.context > 1


def layer_activation_bytes(cfg: Config, fused: dict[str, str], element: int,
                           packed: bool | None = None) -> tuple[int, int]:
    """Bytes per token of the micro-batch that one layer keeps for its backward (the module docstring):
    (its norms' and attention's, its MLP's). `element`: 2 in bf16, 4 in fp32; `packed`: default
    `packs_documents(cfg)`."""
    m, tp = cfg.model, cfg.parallel.tensor
    h, d = m.hidden_size, m.head_dim
    hq, hkv, ffn = m.num_attention_heads // tp, m.num_query_groups // tp, m.ffn_hidden_size // tp
    packed = packs_documents(cfg) if packed is None else packed
    one_row = packed or cfg.train.micro_batch_size == 1
    if one_row:
        attention = (2 * hq + 2 * hkv) * d
    else:  # the rows' layout copies: the attention's q, k, v, and its output in the projection's layout
        attention = (3 * hq + 2 * hkv) * d
    # Megatron's unfused rotation keeps the cosines and sines of q's and k's angles (rope torch, and compile
    # on packed documents, which take Megatron's thd path); the kernels keep the angles, shared by the layers
    if fused["rope"] == "torch" or (fused["rope"] == "compile" and packed):
        attention += 4 * d
    mlp = (5 if fused["swiglu"] == "torch" else 3) * ffn
    return (4 * h + attention) * element + 4 * (hq + 2), mlp * element


def estimate(cfg: Config, world_size: int, bf16: bool, distributed_optimizer: bool,
             fused: dict[str, str] | None = None) -> MemoryEstimate:
    """The estimate of the module docstring for `cfg` launched on `world_size` processes; `fused` is
    `fusions.resolve`'s choice for the device (default: the plain paths)."""
    from moba_train.fusions import LINEAR_LOSS_CHUNK_BYTES, PLAIN

    fused = fused or PLAIN
    m, par, train = cfg.model, cfg.parallel, cfg.train
    tp, cp = par.tensor, par.context
    dp = max(world_size // (tp * par.pipeline * cp), 1)
    params = parameters_per_rank(cfg)
    element = 2 if bf16 else 4
    shard = dp * cp if distributed_optimizer else 1
    tokens = train.micro_batch_size * train.seq_length // cp
    core, mlp = layer_activation_bytes(cfg, fused, element)
    if train.recompute == "full":
        kept = m.num_layers * m.hidden_size * element + core + mlp
    elif train.recompute == "selective":  # the MLP recomputed from its input (a norm output, kept in core)
        kept = m.num_layers * core
    else:
        kept = m.num_layers * (core + mlp)
    gathered = 0
    if cp > 1 and par.context_comm == "all_gather":  # inside each layer's attention: with full recomputation, one
        holding = 1 if train.recompute == "full" else m.num_layers  # layer (the one recomputed) holds them
        hkv = m.num_query_groups // tp
        gathered = holding * 2 * (train.micro_batch_size * train.seq_length) * (2 * cp + 1) // (2 * cp) * hkv \
            * m.head_dim * element
    return MemoryEstimate(
        weights=params * element,
        gradients=params * 4,
        optimizer=params * (12 if bf16 else 8) // shard,
        activations=tokens * kept + gathered,
        logits=8 * tokens + 2 * LINEAR_LOSS_CHUNK_BYTES if fused["cross_entropy"] == "fused_linear"
        else tokens * (m.vocab_size // tp) * 6,
    )
