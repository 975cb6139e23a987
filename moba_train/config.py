"""Typed recipe schema: every key a recipe (configs/*.yaml) may hold, documented where it is declared.

A recipe is YAML with the sections below; `section.key=value` overrides on the command line are
applied on top (values parsed as YAML, so `train.lr=1e-5`, `attention.layer_kinds=[moba,full]`).
Every problem (missing file, unknown key, wrong type, bad value) raises `ConfigError` with one
sentence naming the file and key; entry points print it and exit with code 2.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Annotated, Any, Literal, Optional

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator


class ConfigError(ValueError):
    """A recipe or override is wrong; the message is one sentence for the user."""


# A directory the run writes: `~` expanded once, so that every process reading the recipe (the trainer, a SLURM
# job's submission and its steps) means the same one.
Directory = Annotated[str, AfterValidator(os.path.expanduser)]


class _Section(BaseModel):
    # coerce_numbers_to_str: a text key given a number-like value (run.name=2024, data.split=100) keeps its text.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_attribute_docstrings=True,
                              coerce_numbers_to_str=True)


class RunConfig(_Section):
    name: str = "moba"
    """Run name: used in log lines and as the W&B run name."""
    output_dir: Directory = "runs/moba"
    """Directory for checkpoints (`<output_dir>/checkpoints` unless checkpoint.dir is set) and logs."""
    seed: int = 1234
    """Seeds model init, data order and dropout; the same seed gives the same run."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """auto: CUDA when available (nccl), otherwise CPU (gloo)."""


class RopeScalingConfig(_Section):
    """Llama 3.1 style RoPE frequency scaling (rope_type "llama3" in Hugging Face configs)."""

    factor: float = Field(8.0, gt=0)
    low_freq_factor: float = Field(1.0, gt=0)
    high_freq_factor: float = Field(4.0, gt=0)
    original_max_position_embeddings: int = Field(8192, ge=1)


class FusionsConfig(_Section):
    """Fused kernels for the dense parts (moba_train/fusions.py). auto: on CUDA the fastest measured (our Triton
    RMSNorm with the residual adds, Liger-Kernel's SwiGLU and cross-entropy, our Triton RoPE, weight gradients
    accumulated into the fp32 main gradients), on CPU the plain paths."""

    rmsnorm: Literal["auto", "torch", "liger", "compile", "triton"] = "auto"
    """triton (our kernels with each layer's residual adds folded in; auto on CUDA), torch (PyTorch's RMSNorm, auto
    on CPU), liger (Liger-Kernel, CUDA) or compile (torch.compile)."""
    swiglu: Literal["auto", "torch", "megatron", "liger"] = "auto"
    """torch (unfused), megatron (Megatron's fused SwiGLU) or liger (Liger-Kernel, CUDA; auto on CUDA)."""
    rope: Literal["auto", "torch", "compile", "triton"] = "auto"
    """torch (Megatron's unfused RoPE), compile (torch.compile) or triton (our kernel, auto on CUDA)."""
    grad_accumulation: Literal["auto", "torch", "fused"] = "auto"
    """torch (a bf16 weight gradient added to the fp32 main gradient) or fused (the product accumulates into
    the main gradient, auto on CUDA)."""
    cross_entropy: Literal["auto", "megatron", "megatron_fused", "liger", "fused_linear"] = "auto"
    """megatron (unfused), megatron_fused (its gradient rounded to bf16), liger (Liger-Kernel, CUDA; auto on CUDA)
    or fused_linear (with the output layer, in chunks: the logits are never kept; tensor parallel 1)."""


class ModelConfig(_Section):
    """Llama architecture: RMSNorm, SwiGLU, RoPE, GQA, no biases."""

    num_layers: int = Field(2, ge=1)
    """Transformer layers."""
    hidden_size: int = Field(128, ge=1)
    """Model width."""
    ffn_hidden_size: int = Field(352, ge=1)
    """SwiGLU inner width (intermediate_size in Hugging Face configs)."""
    num_attention_heads: int = Field(4, ge=1)
    """Query heads."""
    num_query_groups: int = Field(4, ge=1)
    """Number of KV heads (GQA); equal to num_attention_heads for MHA, 1 for MQA."""
    kv_channels: Optional[int] = Field(None, ge=1)
    """Head dimension; default hidden_size // num_attention_heads."""
    vocab_size: int = Field(1024, ge=1)
    """Tokenizer vocabulary; the embedding is padded to a multiple of make_vocab_size_divisible_by x TP."""
    make_vocab_size_divisible_by: int = Field(128, ge=1)
    """Embedding rows are padded to a multiple of this times the tensor-parallel size."""
    max_position_embeddings: int = Field(131072, ge=1)
    """Longest sequence the RoPE tables are built for."""
    rope_theta: float = Field(500000.0, gt=0)
    """RoPE base frequency."""
    rope_scaling: Optional[RopeScalingConfig] = None
    """Llama 3.1 RoPE scaling; null for none."""
    norm_epsilon: float = Field(1e-5, gt=0)
    """RMSNorm epsilon."""
    tie_embeddings: bool = False
    """Share the input embedding with the output layer."""
    init_method_std: float = Field(0.02, gt=0)
    """Standard deviation of the normal weight initialisation (random init only)."""
    transformer_impl: Literal["local", "te"] = "local"
    """local: pure PyTorch layer spec (runs anywhere); te: Transformer Engine spec (must be installed)."""
    init_from_hf: Optional[str] = None
    """Hugging Face Llama directory to import weights from at start (instead of a separate conversion)."""
    fusions: FusionsConfig = Field(default_factory=FusionsConfig)
    """Which implementation of RMSNorm, SwiGLU, RoPE and the cross-entropy; each computes the same function."""

    @model_validator(mode="after")
    def _heads(self):
        if self.num_attention_heads % self.num_query_groups:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_query_groups ({self.num_query_groups})"
            )
        if self.kv_channels is None and self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                f"({self.num_attention_heads}) unless kv_channels is set"
            )
        if self.init_from_hf and self.transformer_impl == "te":
            raise ValueError(
                "init_from_hf fills the local layer spec's parameters, not Transformer Engine's; import the model "
                "first (scripts/convert_hf.py import) and start from it with checkpoint.init_from"
            )
        return self

    @property
    def head_dim(self) -> int:
        return self.kv_channels or self.hidden_size // self.num_attention_heads


class AttentionConfig(_Section):
    """Which layers use MoBA and how it routes."""

    mode: Literal["moba", "full"] = "moba"
    """moba: MoBA everywhere except the `full_layers` (full_layers_at, layer_kinds); full: every layer full causal
    attention."""
    block_size: int = Field(4096, ge=16)
    """Tokens per key block."""
    topk: int = Field(12, ge=1)
    """Blocks each query attends, counting its own (current) block."""
    full_layers: int = Field(0, ge=0)
    """N layers keep full attention (helps sparse-gradient tasks such as SFT): the last N, or see full_layers_at."""
    full_layers_at: Literal["last", "probe"] = "last"
    """Where the full_layers sit. last: the last N layers. probe: the N layers where the model training starts
    from copies most (its induction probe before the first step, moba_train/induction.py; needs
    model.init_from_hf or checkpoint.init_from; where fewer layers copy than N, the rest stay last, with a
    warning). The trainer writes the probed layers to attention.layer_kinds of the run's saved config and
    run.output_dir/probe.json, and a resumed run keeps them."""
    layer_kinds: Optional[list[Literal["moba", "full"]]] = None
    """Explicit per-layer kinds (length num_layers); overrides full_layers when set."""
    backend: Literal["auto", "naive", "torch", "varlen", "triton"] = "auto"
    """MoBA implementation (see moba_train.attention); auto picks the fastest for the device and shape."""
    shared_gqa_selection: bool = False
    """Heads of one KV group share one block selection (sum of their gate scores)."""
    full_backend: Literal["auto", "sdpa", "cudnn"] = "auto"
    """Full-attention layers' kernel for sequences of one length (packed documents take FA2 varlen): sdpa is
    PyTorch's choice (FlashAttention-2 on an H200), cudnn is cuDNN's fused attention through SDPA (CUDA;
    K/V repeated to the query heads). auto: see moba_train.attention.full_attention."""


class ParallelConfig(_Section):
    """Model-parallel sizes; data parallel is world_size / (tensor * pipeline * context)."""

    tensor: int = Field(1, ge=1)
    """Tensor-parallel size (splits heads and FFN columns)."""
    pipeline: int = Field(1, ge=1)
    """Pipeline-parallel size (only 1 is supported for now)."""
    context: int = Field(1, ge=1)
    """Context-parallel size: each sequence is cut into 2 x context chunks, rank r keeps chunks r and 2cp - 1 - r."""
    context_comm: Literal["all_gather", "a2a"] = "all_gather"
    """Attention under context parallelism: all_gather K/V (any KV heads) or a2a (head-parallel; needs the KV
    heads per tensor rank divisible by context). docs/context_parallel.md compares them."""
    sequence_parallel: bool = False
    """Megatron sequence parallelism for norms/dropout (needs tensor > 1)."""
    distributed_optimizer: Optional[bool] = None
    """Shard optimizer state over data-parallel ranks; default: on for CUDA, off on CPU."""


class TrainConfig(_Section):
    steps: int = Field(100, ge=1)
    """Total optimizer steps."""
    seq_length: int = Field(32768, ge=1)
    """Tokens per training sequence."""
    micro_batch_size: int = Field(1, ge=1)
    """Sequences per forward/backward on one data-parallel rank."""
    global_batch_size: int = Field(8, ge=1)
    """Sequences per optimizer step over all data-parallel ranks (gradient accumulation fills the gap)."""
    lr: float = Field(3e-4, gt=0)
    """Peak learning rate."""
    min_lr: float = Field(3e-5, ge=0)
    """Learning rate at the end of the decay."""
    lr_schedule: Literal["cosine", "wsd", "constant"] = "cosine"
    """After warmup: cosine decay to min_lr, warmup-stable-decay, or constant."""
    warmup_steps: int = Field(10, ge=0)
    """Linear warmup from 0 to lr."""
    wsd_decay_fraction: float = Field(0.1, gt=0, le=1)
    """WSD: fraction of steps (after warmup) spent in the final decay to min_lr."""
    weight_decay: float = Field(0.1, ge=0)
    """AdamW decoupled weight decay (not applied to norms)."""
    adam_beta1: float = Field(0.9, ge=0, lt=1)
    """AdamW beta1."""
    adam_beta2: float = Field(0.95, ge=0, lt=1)
    """AdamW beta2."""
    adam_eps: float = Field(1e-8, gt=0)
    """AdamW epsilon."""
    clip_grad: float = Field(1.0, ge=0)
    """Gradient-norm clipping threshold; 0 disables clipping."""
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    """auto: bf16 on CUDA, fp32 on CPU."""
    recompute: Literal["none", "full", "selective"] = "none"
    """Activation recomputation: full recomputes every layer from its input (Megatron-Core's full
    granularity); selective recomputes the MLP from its input (Megatron-Core's selective granularity with
    recompute_modules [mlp]), keeping the attention's activations, so the attention never runs twice."""
    max_nonfinite_steps: int = Field(5, ge=1)
    """Abort after this many consecutive steps with a non-finite loss or gradient norm (each is skipped)."""
    log_interval: int = Field(1, ge=1)
    """Print a log line every N steps."""
    eval_interval: int = Field(0, ge=0)
    """Validation every N steps; 0 disables."""
    eval_steps: int = Field(2, ge=1)
    """Validation micro-batches per evaluation."""
    eval_passkey: int = Field(0, ge=0)
    """Passkey prompts per evaluation, an in-training retrieval check (indexed data): a five-digit key hidden in
    held-out text at train.seq_length, needle depths 0, 1/4, 1/2, 3/4 and 1 in turn, asked for at the end (the
    prompts of scripts/evaluate.py). Logged: `val/passkey_loss`, the mean loss on the key's tokens (falling
    toward 0 as the model retrieves), and `val/passkey_found`, the share of keys whose
    every token gets over half the model's probability (a lower bound on exact-answer accuracy). Rounded up to
    whole micro-batches on every data-parallel rank; 0: off."""

    @model_validator(mode="after")
    def _warmup(self):
        if self.warmup_steps >= self.steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) must be smaller than steps ({self.steps})")
        return self


class SyntheticDataConfig(_Section):
    """Built-in long-context recall task: filler documents with key->value facts planted at random
    depths and queried at the end."""

    num_facts: int = Field(4, ge=1)
    """Facts planted per document (each queried once at the end)."""
    key_tokens: int = Field(2, ge=1)
    """Tokens per key."""
    value_tokens: int = Field(2, ge=1)
    """Tokens per value (the answer to recall)."""
    num_samples: int = Field(100000, ge=1)
    """Documents in the training split (the sampler wraps around after them)."""
    loss: Literal["all", "answers"] = "all"
    """all: full LM loss (filler pattern, facts, answers); answers: loss on the recalled value tokens only."""
    id_range: Optional[int] = Field(None, ge=1)
    """Ids per range (filler, keys, values: three ranges from id 3 up); default a third of the vocabulary.
    Small ranges keep the ids among a tokenizer's first, most frequent ones."""


class DataConfig(_Section):
    kind: Literal["synthetic", "indexed"] = "synthetic"
    """synthetic: the built-in recall task (data.synthetic); indexed: Megatron .bin/.idx datasets (data.blend)."""
    blend: list[str] = Field(default_factory=list)
    """Indexed kind: "weight prefix" strings, e.g. ["0.7 data/a", "0.3 data/b"], or bare prefixes (weighted by size)."""
    split: str = "98,2,0"
    """Train/valid/test split of each prefix's documents, Megatron-style."""
    valid_blend: list[str] = Field(default_factory=list)
    """Indexed kind: the validation data's own datasets, written as data.blend (Megatron-LM's --valid-data-path),
    e.g. held-out packages. Every document of data.blend then trains, and data.split, if given, must give
    validation no share (e.g. "100,0,0")."""
    tokenizer: Optional[str] = None
    """Hugging Face tokenizer (directory or tokenizer.json); its EOD id and vocabulary size are used."""
    cache_dir: Optional[Directory] = None
    """Where Megatron-Core caches the sample indices; default <output_dir>/data_cache."""
    reset_position_ids: bool = False
    """Restart positions at every document inside a packed sequence."""
    reset_attention_mask: bool = False
    """Keep attention within documents (per-document cu_seqlens: MoBA blocks restart at each document)."""
    eod_mask_loss: bool = False
    """Exclude EOD tokens from the loss."""
    min_doc_length: int = Field(0, ge=0)
    """Keep only documents of at least this many tokens (0 keeps all); kept documents are packed into sequences."""
    num_workers: int = Field(0, ge=0)
    """DataLoader worker processes per rank (0 loads in the training process), not forks of the trainer."""
    passkey_mix: float = Field(0.0, ge=0.0, le=1.0)
    """Indexed kind: the share of training samples made passkey-retrieval documents (moba_train.data.passkey:
    the sample's text as haystack, a key at a random depth asked for at the end); 0 trains on the text as is."""
    recall_mix: float = Field(0.0, ge=0.0, le=1.0)
    """Indexed kind: the share of training samples made synthetic recall documents (data.synthetic's facts and
    loss, moba_train.data.mix); with passkey_mix and copy_mix, the shares add up to at most 1."""
    copy_mix: float = Field(0.0, ge=0.0, le=1.0)
    """Indexed kind: the share of training samples made copy documents (the start of the sample's own text
    repeated, the loss on the repeats, moba_train.data.mix): they teach the copying that retrieval needs."""
    synthetic: SyntheticDataConfig = Field(default_factory=SyntheticDataConfig)


class CheckpointConfig(_Section):
    dir: Optional[Directory] = None
    """Default <run.output_dir>/checkpoints."""
    interval: int = Field(100, ge=1)
    """Save every N steps (and always at the end and on SIGTERM/SIGUSR1)."""
    keep_last: int = Field(3, ge=1)
    """Keep the newest K complete checkpoints."""
    resume: bool = True
    """Resume from the newest complete checkpoint in dir when there is one."""
    init_from: Optional[str] = None
    """Start a new run from this checkpoint's model weights only (no optimizer, step or data state)."""


class WandbConfig(_Section):
    """Weights & Biases (rank 0 only). The run's config is the resolved recipe plus the attention backend
    `auto` chose per layer kind; a resumed run continues the same W&B run (its id is in the checkpoint)."""

    mode: Literal["online", "offline", "disabled"] = "disabled"
    """online: stream to W&B (offline, with one line saying so, when no API key is configured); offline: write
    <output_dir>/wandb/offline-run-* for `wandb sync`; disabled: write nothing."""
    project: str = "moba-train"
    """W&B project."""
    entity: Optional[str] = None
    """W&B entity (team); default your own."""
    name: Optional[str] = None
    """W&B run name; default run.name."""
    group: Optional[str] = None
    """W&B group (e.g. one sweep or ablation)."""
    tags: list[str] = Field(default_factory=list)
    """W&B tags."""
    notes: Optional[str] = None
    """W&B notes: a longer description of the run."""


class LoggingConfig(_Section):
    """Where metrics go (rank 0 only): console line, progress bar, <output_dir>/metrics.jsonl, W&B, TensorBoard."""

    progress_bar: Literal["auto", "on", "off"] = "auto"
    """auto: a progress bar only when stdout is a terminal."""
    tensorboard: bool = False
    """Also write TensorBoard event files to <output_dir>/tensorboard."""
    moba_diag_interval: int = Field(100, ge=0)
    """MoBA routing diagnostics (moba/ metrics, heatmaps in <output_dir>/diagnostics) every N steps; 0 disables."""
    moba_diag_queries: int = Field(256, ge=1)
    """Query positions sampled per diagnostic (only positions whose gate has a choice: block index >= topk)."""
    moba_diag_kv_groups: int = Field(2, ge=1)
    """KV heads sampled per MoBA layer; diagnostics use every query head of each sampled KV head's group."""
    wandb: WandbConfig = Field(default_factory=WandbConfig)

    @model_validator(mode="before")
    @classmethod
    def _yaml_on_off(cls, data):
        # YAML 1.1 reads a bare on/off as true/false.
        if isinstance(data, dict) and isinstance(data.get("progress_bar"), bool):
            data = {**data, "progress_bar": "on" if data["progress_bar"] else "off"}
        return data


class Config(_Section):
    run: RunConfig = Field(default_factory=RunConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    attention: AttentionConfig = Field(default_factory=AttentionConfig)
    parallel: ParallelConfig = Field(default_factory=ParallelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)

    @model_validator(mode="after")
    def _cross_section(self):
        att, model, train = self.attention, self.model, self.train
        if att.layer_kinds is not None and len(att.layer_kinds) != model.num_layers:
            raise ValueError(
                f"attention.layer_kinds has {len(att.layer_kinds)} entries but model.num_layers is {model.num_layers}"
            )
        if att.full_layers > model.num_layers:
            raise ValueError(f"attention.full_layers ({att.full_layers}) exceeds model.num_layers ({model.num_layers})")
        if att.mode == "moba" and att.full_layers_at == "probe" and att.full_layers:
            if att.layer_kinds is not None and att.layer_kinds.count("full") != att.full_layers:
                kept = att.layer_kinds.count("full")
                raise ValueError(
                    f"attention.layer_kinds keeps {kept} layers full but attention.full_layers is {att.full_layers}; "
                    "with attention.full_layers_at=probe leave layer_kinds unset (the probe sets it) or make the two "
                    "agree"
                )
            if not (model.init_from_hf or self.checkpoint.init_from):
                raise ValueError(
                    "attention.full_layers_at=probe keeps full attention where the model training starts from copies, "
                    "but no such model is set; set model.init_from_hf or checkpoint.init_from, or use "
                    "attention.full_layers_at=last"
                )
        if att.mode == "moba" and train.seq_length < att.block_size:
            raise ValueError(
                f"train.seq_length ({train.seq_length}) is shorter than one MoBA block "
                f"(attention.block_size={att.block_size}); lower the block size or use attention.mode=full"
            )
        if train.global_batch_size % train.micro_batch_size:
            raise ValueError(
                f"train.global_batch_size ({train.global_batch_size}) must be a multiple of "
                f"train.micro_batch_size ({train.micro_batch_size})"
            )
        if train.min_lr > train.lr:
            raise ValueError(f"train.min_lr ({train.min_lr}) exceeds train.lr ({train.lr})")
        if self.parallel.pipeline != 1:
            raise ValueError("parallel.pipeline > 1 is not supported yet; set parallel.pipeline=1")
        cp = self.parallel.context
        if cp > 1 and train.seq_length % (2 * cp):
            raise ValueError(
                f"train.seq_length ({train.seq_length}) must be a multiple of 2 x parallel.context ({2 * cp}): "
                f"context parallelism cuts every sequence into {2 * cp} equal chunks; change either"
            )
        kv_per_rank = model.num_query_groups // self.parallel.tensor
        if cp > 1 and self.parallel.context_comm == "a2a" and kv_per_rank % cp:
            raise ValueError(
                f"parallel.context_comm=a2a splits the KV heads of each tensor-parallel rank ({kv_per_rank}) over "
                f"parallel.context ({cp}), which must divide them; use parallel.context_comm=all_gather"
            )
        if model.num_attention_heads % self.parallel.tensor or model.num_query_groups % self.parallel.tensor:
            raise ValueError(
                f"parallel.tensor ({self.parallel.tensor}) must divide model.num_attention_heads "
                f"({model.num_attention_heads}) and model.num_query_groups ({model.num_query_groups})"
            )
        if self.data.reset_position_ids != self.data.reset_attention_mask:
            raise ValueError(
                "data.reset_position_ids and data.reset_attention_mask must be equal: with per-document attention "
                "RoPE positions restart at every document, and without it they cannot; set both true or both false"
            )
        if self.data.kind == "indexed" and not self.data.blend:
            raise ValueError("data.kind is 'indexed' but data.blend is empty; list at least one dataset prefix")
        if self.data.valid_blend:
            if self.data.kind != "indexed":
                raise ValueError("data.valid_blend names indexed validation datasets and needs data.kind 'indexed'; "
                                 "set data.kind to indexed or drop data.valid_blend")
            shares = self.data.split.split(",")
            if "split" in self.data.model_fields_set and len(shares) > 1 and _number(shares[1]) != 0:
                raise ValueError(f"data.split '{self.data.split}' holds out a validation share of data.blend, and "
                                 "data.valid_blend is the validation data; give validation no share (e.g. "
                                 "'100,0,0') or drop data.valid_blend")
        for name, does, advice in (
            ("passkey_mix", "plants passkeys in text", "set it to 0 for the synthetic task"),
            ("recall_mix", "mixes recall documents into text",
             "the synthetic kind is all recall documents already: set it to 0"),
            ("copy_mix", "mixes copy documents into text", "set it to 0 for the synthetic task"),
        ):
            if getattr(self.data, name) and self.data.kind != "indexed":
                raise ValueError(f"data.{name} {does} and needs data.kind 'indexed'; {advice}")
        if self.train.eval_passkey and (self.data.kind != "indexed" or not self.train.eval_interval):
            raise ValueError("train.eval_passkey hides keys in held-out text at every evaluation and needs "
                             "data.kind 'indexed' and train.eval_interval > 0; set it to 0 or give both")
        shares = self.data.passkey_mix + self.data.recall_mix + self.data.copy_mix
        if shares > 1:
            raise ValueError(f"data.passkey_mix + data.recall_mix + data.copy_mix is {shares:g}; the shares of "
                             f"mixed samples cannot exceed 1")
        return self

    def microbatches(self, data_parallel: int) -> int:
        """Micro-batches per step on each of `data_parallel` ranks; ConfigError if the global batch does not split."""
        per_pass = self.train.micro_batch_size * data_parallel
        if self.train.global_batch_size % per_pass:
            raise ConfigError(
                f"train.global_batch_size ({self.train.global_batch_size}) must be a multiple of micro_batch_size x "
                f"data-parallel size ({self.train.micro_batch_size} x {data_parallel}); change the batch sizes or the "
                "process count"
            )
        return self.train.global_batch_size // per_pass

    def probes_full_layers(self) -> bool:
        """Whether the trainer places the full layers by probing the starting model (attention.full_layers_at),
        i.e. they are not yet named in attention.layer_kinds."""
        att = self.attention
        return att.mode == "moba" and att.full_layers_at == "probe" and att.layer_kinds is None and att.full_layers > 0

    def layer_kinds(self) -> list[str]:
        """The attention kind of every layer, first to last: the hybrid plan in one place."""
        n = self.model.num_layers
        if self.attention.mode == "full":
            return ["full"] * n
        if self.attention.layer_kinds is not None:
            return list(self.attention.layer_kinds)
        n_full = self.attention.full_layers
        return ["moba"] * (n - n_full) + ["full"] * n_full

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def _known_keys(model_cls: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, field in model_cls.model_fields.items():
        keys.append(prefix + name)
        ann = field.annotation
        for cand in getattr(ann, "__args__", (ann,)):
            if isinstance(cand, type) and issubclass(cand, BaseModel):
                keys.extend(_known_keys(cand, prefix + name + "."))
    return keys


def _number(text: str) -> float:
    """A data.split share as a number; 0 where it is not one (moba_train.data.indexed.check_split reports those)."""
    try:
        return float(text)
    except ValueError:
        return 0.0


def _suggest(key: str) -> str:
    match = difflib.get_close_matches(key, _known_keys(Config), n=1, cutoff=0.5)
    return f"; did you mean '{match[0]}'?" if match else ""


def _format_error(err: ValidationError, source: str) -> str:
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"])
    if first["type"] == "extra_forbidden":
        return f"{source}: unknown key '{loc}'{_suggest(loc)}"
    msg = first["msg"].removeprefix("Value error, ")
    value = first.get("input")
    if loc and not isinstance(value, dict):
        return f"{source}: invalid value for '{loc}' ({value!r}): {msg}"
    if loc:
        return f"{source}: invalid '{loc}': {msg}"
    return f"{source}: {msg}"


def apply_override(raw: dict, override: str) -> None:
    """Apply one `section.key=value` override to a raw recipe dict in place (value parsed as YAML)."""
    if "=" not in override:
        raise ConfigError(f"override '{override}' is not of the form section.key=value")
    key, _, text = override.partition("=")
    parts = key.strip().split(".")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        value = text
    node = raw
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"override '{override}': '{part}' is not a section")
        node = child
    node[parts[-1]] = value


def _repeated_key(node: yaml.Node, prefix: str = "", seen: set[int] | None = None) -> str | None:
    """"key 'section.key' appears twice (lines a and b)" for the first key a mapping of the composed YAML tree
    repeats, else None. Keys brought in by a merge (`<<: *base`) may be overridden: only written keys count."""
    seen = set() if seen is None else seen
    if id(node) in seen:  # an alias (`*anchor`) repeats a node already checked
        return None
    seen.add(id(node))
    if isinstance(node, yaml.SequenceNode):
        return next(filter(None, (_repeated_key(child, prefix, seen) for child in node.value)), None)
    if not isinstance(node, yaml.MappingNode):
        return None
    lines: dict[str, int] = {}
    for key, value in node.value:
        if key.tag == "tag:yaml.org,2002:merge":
            continue
        name, line = prefix + str(key.value), key.start_mark.line + 1
        if name in lines:
            return f"key '{name}' appears twice (lines {lines[name]} and {line})"
        lines[name] = line
        found = _repeated_key(value, name + ".", seen)
        if found:
            return found
    return None


def read_yaml(path: Path) -> Any:
    """The YAML document of `path`; ConfigError when a mapping repeats a key (PyYAML keeps the last silently)."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text (byte 0x{err.object[err.start]:02x} at offset {err.start}); "
                          "save it as UTF-8") from None
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return {}
        repeated = _repeated_key(node)
        if repeated:
            raise ConfigError(f"{path}: {repeated}; keep one of them")
        return loader.construct_document(node) or {}
    finally:
        loader.dispose()


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Read a recipe, apply overrides, validate. Raises ConfigError with one sentence."""
    raw: dict[str, Any] = {}
    source = "command line"
    if path is not None:
        path = Path(path)
        source = str(path)
        if path.is_dir():
            raise ConfigError(f"'{path}' is a directory, not a recipe; pass a recipe file such as "
                              "configs/tiny_moba.yaml")
        if not path.is_file():
            raise ConfigError(f"config file '{path}' does not exist; pass a recipe such as configs/tiny_moba.yaml")
        try:
            raw = read_yaml(path)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark else ""
            raise ConfigError(f"{path}: not valid YAML{where}; fix the syntax") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: a recipe must be a mapping of sections (run, model, attention, ...)")
        if not raw:  # the defaults alone would start a 32K-token run into runs/moba
            raise ConfigError(f"{path}: the recipe is empty; write its sections, or start from a recipe such as "
                              "configs/tiny_moba.yaml")
    for override in overrides:
        apply_override(raw, override)
    if overrides:
        source += " (with overrides)"
    try:
        return Config.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_error(err, source)) from None


def reference_markdown() -> str:
    """The configuration reference (README): one table row per key, from the schema's docstrings."""
    rows = ["| key | default | meaning |", "| --- | --- | --- |"]

    def walk(cls: type[BaseModel], prefix: str) -> None:
        for name, field in cls.model_fields.items():
            ann = field.annotation
            nested = [c for c in getattr(ann, "__args__", (ann,)) if isinstance(c, type) and issubclass(c, BaseModel)]
            if nested and field.default_factory is not None:
                walk(nested[0], f"{prefix}{name}.")
                continue
            default = field.get_default(call_default_factory=True)
            text = (field.description or "").replace("\n", " ").replace("|", "\\|")
            shown = yaml.safe_dump(default, default_flow_style=True).strip().removesuffix("...").strip()
            rows.append(f"| `{prefix}{name}` | `{shown}` | {text} |")

    walk(Config, "")
    return "\n".join(rows)


if __name__ == "__main__":
    print(reference_markdown())  # regenerates the README's configuration reference
