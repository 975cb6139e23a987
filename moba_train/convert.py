"""Hugging Face Llama <-> our Megatron-Core checkpoints.

    import_hf(hf_dir, out_dir)          HF LlamaForCausalLM directory -> model-only checkpoint
    export_hf(ckpt_dir, hf_out_dir)     our checkpoint -> HF LlamaForCausalLM directory
    load_hf_weights(model, hf_dir, cfg) HF weights straight into a built (tensor-parallel) GPTModel

Weight layout (HF name -> GPTModel name, per layer i; "L" = model.layers.i, "D" = decoder.layers.i):
    model.embed_tokens.weight            embedding.word_embeddings.weight      rows padded to the padded vocab
    L.input_layernorm.weight             D.input_layernorm.weight
    L.self_attn.{q,k,v}_proj.weight      D.self_attention.linear_qkv.weight    fused, see `fuse_qkv`
    L.self_attn.o_proj.weight            D.self_attention.linear_proj.weight
    L.post_attention_layernorm.weight    D.pre_mlp_layernorm.weight
    L.mlp.{gate,up}_proj.weight          D.mlp.linear_fc1.weight               [gate; up] along dim 0
    L.mlp.down_proj.weight               D.mlp.linear_fc2.weight
    model.norm.weight                    decoder.final_layernorm.weight
    lm_head.weight                       output_layer.weight                   absent when embeddings are tied
Both use the same (non-interleaved, "rotate half") RoPE convention, so q and k rows need no permutation.

HF checkpoints are read tensor by tensor, one safetensors shard at a time: host memory holds one
shard's worth of pending tensors at most, plus the model being filled. The model itself is fp32
(build_model), so import_hf / export_hf of an 8B model need about 32 GB of host memory.
An imported checkpoint keeps the source's config.json, generation config and tokenizer files under
`<checkpoint>/hf/`; export_hf starts from them, so an import -> export round trip is lossless.

Both directions write the whole output in a staging directory beside the target and rename it into
place when complete (moba_train.staging): an interrupted conversion leaves the target as it was. A
target that is not empty is replaced only when it is an earlier output of the same direction (an
imported checkpoint: complete, with `hf/config.json`; an export: nothing but the files export_hf writes,
its safetensors marked by EXPORT_METADATA), or with `overwrite`.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from pydantic import ValidationError
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from moba_train.checkpointing import (
    is_complete,
    load_model_weights,
    resolve_checkpoint,
    save_model_checkpoint,
    unwrap_model,
)
from moba_train.config import Config, ConfigError, ModelConfig, RopeScalingConfig, load_config
from moba_train.distributed import destroy_distributed, init_distributed, set_seed
from moba_train.model import build_model
from moba_train.staging import replace_dir, staging_dir


class ConversionError(ConfigError):
    """A Hugging Face checkpoint cannot be converted or disagrees with the recipe: one sentence for the
    user. A ConfigError (hence a ValueError), so entry points print it and exit with code 2."""


HF_ARCHITECTURE = "LlamaForCausalLM"
HF_SIDECAR = "hf"
"""Subdirectory of an imported checkpoint holding the source's config and tokenizer files."""
HF_SIDECAR_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "chat_template.jinja",
)
MAX_SHARD_BYTES = 5 * 1024**3
"""export_hf splits the weights into safetensors shards of at most this many bytes (plus an index)."""
EXPORT_METADATA = {"format": "pt", "written_by": "moba-train export_hf"}
"""The header metadata of every safetensors file export_hf writes: how a later export recognises its own output."""
_EXPORT_WEIGHTS = re.compile(r"^model(-\d{5}-of-\d{5})?\.safetensors$")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_IGNORED = re.compile(r"rotary_emb\.inv_freq$")


# ---------------------------------------------------------------------------------------------
# Configs


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConversionError(f"'{path}' is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg}); "
                              "it is damaged: download it again") from None


_HF_SIZES = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
_HF_OPTIONAL_SIZES = ("num_key_value_heads", "head_dim", "max_position_embeddings")


def _check_hf_sizes(hf: dict, path: Path) -> None:
    """ConversionError unless the size fields of a HF config are positive integers that split into heads."""
    for key in _HF_SIZES + _HF_OPTIONAL_SIZES:
        if key not in hf and key in _HF_SIZES:
            raise ConversionError(f"'{path}' lacks '{key}'; it is incomplete: download it again")
        value = hf.get(key)
        if value is None and key in _HF_OPTIONAL_SIZES:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ConversionError(f"'{path}' has {key}={value!r}, not a positive integer; it is damaged: "
                                  "download it again")
    heads, groups = hf["num_attention_heads"], hf.get("num_key_value_heads") or hf["num_attention_heads"]
    if heads % groups:
        raise ConversionError(f"'{path}' has num_attention_heads={heads}, num_key_value_heads={groups}; the "
                              "heads must split evenly into key-value groups: it is damaged, download it again")


def read_hf_config(hf_dir: str | Path) -> dict:
    """config.json of a HF Llama directory as a dict; ConversionError if absent, damaged, incomplete or not
    a Llama."""
    path = Path(hf_dir) / "config.json"
    if not path.is_file():
        raise ConversionError(f"'{hf_dir}' has no config.json; pass a Hugging Face model directory")
    hf = _read_json(path)
    if not isinstance(hf, dict):
        raise ConversionError(f"'{path}' is not a JSON object of model settings; it is damaged: download it again")
    architectures = hf.get("architectures") or []
    if hf.get("model_type") != "llama" or (architectures and architectures != [HF_ARCHITECTURE]):
        found = architectures[0] if architectures else hf.get("model_type")
        raise ConversionError(
            f"'{hf_dir}' holds a {found} model, not {HF_ARCHITECTURE}; only Llama checkpoints convert"
        )
    for key in ("attention_bias", "mlp_bias"):
        if hf.get(key):
            raise ConversionError(f"'{hf_dir}' sets {key}=true; our Llama has no biases, so it cannot be converted")
    if hf.get("hidden_act", "silu") != "silu":
        raise ConversionError(f"'{hf_dir}' uses hidden_act={hf['hidden_act']!r}; only SwiGLU (silu) Llamas convert")
    _check_hf_sizes(hf, path)
    try:
        model_config_from_hf(hf)
    except KeyError as exc:  # e.g. a llama3 RoPE scaling without its factors
        raise ConversionError(f"'{path}' lacks '{exc.args[0]}'; it is incomplete: download it again") from None
    except (ValidationError, TypeError) as exc:
        reason = exc.errors()[0]["msg"].removeprefix("Value error, ") if isinstance(exc, ValidationError) else exc
        raise ConversionError(f"'{path}' does not describe a Llama we can build ({reason}); "
                              "fix it or download it again") from None
    return hf


def _rope(hf: dict) -> tuple[float, dict | None]:
    """(rope theta, llama3 scaling dict or None) from transformers 5.x `rope_parameters` or the
    published `rope_theta` + `rope_scaling` keys."""
    params = hf.get("rope_parameters")
    if params is not None:
        theta, scaling = params.get("rope_theta", hf.get("rope_theta", 10000.0)), params
    else:
        theta, scaling = hf.get("rope_theta", 10000.0), hf.get("rope_scaling")
    rope_type = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if rope_type == "default":
        return float(theta), None
    if rope_type != "llama3":
        raise ConversionError(
            f"RoPE type {rope_type!r} is not supported; only default and llama3 (Llama 3.1) RoPE convert"
        )
    return float(theta), scaling


def model_config_from_hf(hf: dict) -> ModelConfig:
    """Our model section for a HF Llama config dict (read_hf_config)."""
    theta, scaling = _rope(hf)
    hidden, heads = hf["hidden_size"], hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or hidden // heads
    return ModelConfig(
        num_layers=hf["num_hidden_layers"],
        hidden_size=hidden,
        ffn_hidden_size=hf["intermediate_size"],
        num_attention_heads=heads,
        num_query_groups=hf.get("num_key_value_heads") or heads,
        kv_channels=None if head_dim * heads == hidden else head_dim,
        vocab_size=hf["vocab_size"],
        max_position_embeddings=hf.get("max_position_embeddings", 2048),
        rope_theta=theta,
        rope_scaling=None if scaling is None else RopeScalingConfig(
            factor=scaling["factor"],
            low_freq_factor=scaling["low_freq_factor"],
            high_freq_factor=scaling["high_freq_factor"],
            original_max_position_embeddings=scaling["original_max_position_embeddings"],
        ),
        norm_epsilon=hf.get("rms_norm_eps", 1e-6),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
    )


def _plain(value):
    return value.model_dump() if isinstance(value, RopeScalingConfig) else value


_COMPARED = (
    "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups", "head_dim",
    "vocab_size", "rope_theta", "rope_scaling", "norm_epsilon", "tie_embeddings",
)


def check_recipe_matches(recipe: ModelConfig, hf_dir: str | Path) -> dict:
    """The HF config dict of `hf_dir`; ConversionError naming the first model field where the recipe disagrees."""
    hf = read_hf_config(hf_dir)
    source = model_config_from_hf(hf)
    for field in _COMPARED:
        ours, theirs = (_plain(getattr(m, field)) for m in (recipe, source))
        if ours != theirs:
            raise ConversionError(
                f"recipe model.{field} is {ours!r} but the Hugging Face checkpoint '{hf_dir}' has {theirs!r}; "
                f"set model.{field}={theirs!r} to match it"
            )
    return hf


def hf_config_from_model(model: ModelConfig, dtype: torch.dtype, base: dict | None = None) -> dict:
    """config.json for LlamaForCausalLM: `base` (the imported source's, when known) updated with our fields."""
    hf = dict(base or {})
    modern_rope = "rope_parameters" in hf
    for key in ("rope_parameters", "rope_scaling", "rope_theta", "torch_dtype"):
        hf.pop(key, None)
    hf.update(
        architectures=[HF_ARCHITECTURE],
        model_type="llama",
        hidden_size=model.hidden_size,
        intermediate_size=model.ffn_hidden_size,
        num_hidden_layers=model.num_layers,
        num_attention_heads=model.num_attention_heads,
        num_key_value_heads=model.num_query_groups,
        head_dim=model.head_dim,
        vocab_size=model.vocab_size,
        max_position_embeddings=model.max_position_embeddings,
        rms_norm_eps=model.norm_epsilon,
        hidden_act="silu",
        attention_bias=False,
        mlp_bias=False,
        tie_word_embeddings=model.tie_embeddings,
        dtype=str(dtype).removeprefix("torch."),
    )
    # The source's RoPE form; by default the published one (rope_theta + rope_scaling), which
    # transformers 4.x and 5.x both read.
    scaling = {"rope_type": "llama3", **model.rope_scaling.model_dump()} if model.rope_scaling else None
    if modern_rope:
        hf["rope_parameters"] = {"rope_type": "default", **(scaling or {}), "rope_theta": model.rope_theta}
    else:
        hf["rope_theta"] = model.rope_theta
        if scaling:
            hf["rope_scaling"] = scaling
    return hf


# ---------------------------------------------------------------------------------------------
# Weight layouts


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, groups: int) -> torch.Tensor:
    """HF q [Hq*D, h], k/v [G*D, h] -> Megatron linear_qkv [G*(Hq/G + 2)*D, h]: per KV group its
    query heads, then its key head, then its value head."""
    hidden = q.shape[1]
    q_g = q.reshape(groups, -1, hidden)
    k_g, v_g = k.reshape(groups, -1, hidden), v.reshape(groups, -1, hidden)
    return torch.cat([q_g, k_g, v_g], dim=1).reshape(-1, hidden)


def split_qkv(qkv: torch.Tensor, groups: int, heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of `fuse_qkv`."""
    hidden = qkv.shape[1]
    per_group = qkv.reshape(groups, -1, hidden)
    head_dim = per_group.shape[1] // (heads // groups + 2)
    q_rows = heads // groups * head_dim
    q, k, v = per_group.split([q_rows, head_dim, head_dim], dim=1)
    return q.reshape(-1, hidden), k.reshape(-1, hidden), v.reshape(-1, hidden)


def pad_vocab(weight: torch.Tensor, rows: int) -> torch.Tensor:
    """[V, h] -> [rows, h], zero rows appended (they are never produced by the tokenizer)."""
    assert rows >= weight.shape[0]
    return torch.cat([weight, weight.new_zeros(rows - weight.shape[0], weight.shape[1])])


_DIRECT = {
    "input_layernorm.weight": "input_layernorm.weight",
    "self_attn.o_proj.weight": "self_attention.linear_proj.weight",
    "post_attention_layernorm.weight": "pre_mlp_layernorm.weight",
    "mlp.down_proj.weight": "mlp.linear_fc2.weight",
}
_QKV = ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight")
_FC1 = ("mlp.gate_proj.weight", "mlp.up_proj.weight")


def megatron_tensors(
    hf_tensors: Iterator[tuple[str, torch.Tensor]], model: ModelConfig, vocab_rows: int, config: str | Path
) -> Iterator[tuple[str, torch.Tensor]]:
    """Full (unsharded) GPTModel tensors from a stream of HF tensors, each yielded as soon as its
    inputs have arrived. Raises ConversionError on an unexpected name, a shape other than the `config`
    file (the source of `model`) implies, or when a tensor is missing."""
    pending: dict[int, dict[str, torch.Tensor]] = {}
    expected = hf_shapes(model)
    for name, tensor in hf_tensors:
        if _IGNORED.search(name) or (name == "lm_head.weight" and model.tie_embeddings):
            continue
        if name not in expected:
            raise ConversionError(f"unexpected tensor '{name}' in the Hugging Face checkpoint; it is not a plain Llama")
        shape = expected.pop(name)
        if tuple(tensor.shape) != shape:
            raise ConversionError(f"tensor '{name}' has shape {list(tensor.shape)} but '{config}' implies "
                                  f"{list(shape)}; the weights do not belong to this config.json")
        if name == "model.embed_tokens.weight":
            yield "embedding.word_embeddings.weight", pad_vocab(tensor, vocab_rows)
        elif name == "lm_head.weight":
            yield "output_layer.weight", pad_vocab(tensor, vocab_rows)
        elif name == "model.norm.weight":
            yield "decoder.final_layernorm.weight", tensor
        else:
            match = _LAYER.match(name)
            layer, rest = int(match.group(1)), match.group(2)
            prefix = f"decoder.layers.{layer}."
            if rest in _DIRECT:
                yield prefix + _DIRECT[rest], tensor
                continue
            parts = pending.setdefault(layer, {})
            parts[rest] = tensor
            if all(p in parts for p in _QKV):
                qkv = fuse_qkv(*(parts.pop(p) for p in _QKV), groups=model.num_query_groups)
                yield prefix + "self_attention.linear_qkv.weight", qkv
            if all(p in parts for p in _FC1):
                yield prefix + "mlp.linear_fc1.weight", torch.cat([parts.pop(p) for p in _FC1])
    if expected:
        raise ConversionError(
            f"the Hugging Face checkpoint lacks tensor '{sorted(expected)[0]}' ({len(expected)} missing); "
            "check that every shard was downloaded completely"
        )


def hf_shapes(model: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor of a HF LlamaForCausalLM with this architecture."""
    h, f, v = model.hidden_size, model.ffn_hidden_size, model.vocab_size
    q, kv = model.num_attention_heads * model.head_dim, model.num_query_groups * model.head_dim
    layer = {
        "input_layernorm.weight": (h,), "self_attn.o_proj.weight": (h, q), "post_attention_layernorm.weight": (h,),
        "mlp.down_proj.weight": (h, f), "self_attn.q_proj.weight": (q, h), "self_attn.k_proj.weight": (kv, h),
        "self_attn.v_proj.weight": (kv, h), "mlp.gate_proj.weight": (f, h), "mlp.up_proj.weight": (f, h),
    }
    assert layer.keys() == {*_DIRECT, *_QKV, *_FC1}
    shapes = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,)}
    for i in range(model.num_layers):
        shapes.update({f"model.layers.{i}.{rest}": shape for rest, shape in layer.items()})
    if not model.tie_embeddings:
        shapes["lm_head.weight"] = (v, h)
    return shapes


def hf_tensors_from_megatron(state: dict[str, torch.Tensor], model: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """HF tensors from a full (unsharded) GPTModel state dict, vocab padding removed."""
    vocab = model.vocab_size
    yield "model.embed_tokens.weight", state["embedding.word_embeddings.weight"][:vocab]
    for i in range(model.num_layers):
        prefix, hf_prefix = f"decoder.layers.{i}.", f"model.layers.{i}."
        for hf_rest, rest in _DIRECT.items():
            yield hf_prefix + hf_rest, state[prefix + rest]
        qkv = state[prefix + "self_attention.linear_qkv.weight"]
        qkv = split_qkv(qkv, model.num_query_groups, model.num_attention_heads)
        for hf_rest, tensor in zip(_QKV, qkv):
            yield hf_prefix + hf_rest, tensor
        for hf_rest, tensor in zip(_FC1, state[prefix + "mlp.linear_fc1.weight"].chunk(2)):
            yield hf_prefix + hf_rest, tensor
    yield "model.norm.weight", state["decoder.final_layernorm.weight"]
    if not model.tie_embeddings:
        yield "lm_head.weight", state["output_layer.weight"][:vocab]


def tensor_parallel_shard(name: str, full: torch.Tensor, param: torch.Tensor, rank: int, size: int) -> torch.Tensor:
    """This tensor-parallel rank's part of a full tensor, following Megatron's partitioning of `param`.

    Column-parallel weights (qkv, fc1, embedding, output layer) split dim 0, row-parallel ones dim 1.
    The fused QKV splits whole KV groups; fc1 splits gate and up separately ([gate_r; up_r]).
    """
    if size == 1 or not getattr(param, "tensor_model_parallel", False):
        return full
    if name.endswith("mlp.linear_fc1.weight"):
        gate, up = full.chunk(2)
        return torch.cat([gate.chunk(size)[rank], up.chunk(size)[rank]])
    return full.chunk(size, dim=param.partition_dim)[rank]


# ---------------------------------------------------------------------------------------------
# Safetensors


def safetensors_files(hf_dir: str | Path) -> list[Path]:
    """The safetensors files of a HF directory (sharded with an index, or one model.safetensors)."""
    hf_dir = Path(hf_dir)
    index = hf_dir / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(_read_json(index)["weight_map"].values()))
        for shard in shards:
            if not (hf_dir / shard).is_file():
                raise ConversionError(
                    f"shard '{shard}' listed in {index} is missing; download all {len(shards)} shards"
                )
        return [hf_dir / shard for shard in shards]
    single = hf_dir / "model.safetensors"
    if single.is_file():
        return [single]
    raise ConversionError(
        f"'{hf_dir}' has no model.safetensors or model.safetensors.index.json; save the model with "
        "save_pretrained(..., safe_serialization=True)"
    )


def _open_safetensors(file: Path):
    try:
        return safe_open(str(file), framework="pt")
    except SafetensorError as exc:  # the header is checked against the file size: truncation fails here
        raise ConversionError(f"'{file}' is not a complete safetensors file ({exc}); it is truncated or damaged: "
                              "download it again") from None


def read_safetensors(files: list[Path], progress: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of every tensor in `files`, file by file, in the stored dtype, with a progress bar.
    ConversionError naming the file when one is truncated or damaged (all headers are read first)."""
    handles = [_open_safetensors(f) for f in files]
    total = sum(len(h.keys()) for h in handles)
    with tqdm(total=total, desc="reading Hugging Face weights", unit="tensor", disable=not progress) as bar:
        for handle in handles:
            for name in handle.keys():
                yield name, handle.get_tensor(name)
                bar.update()


def write_safetensors(tensors: Iterator[tuple[str, torch.Tensor]], out_dir: Path, max_shard_bytes: int) -> None:
    """Write tensors as model.safetensors, or as model-0000i-of-0000n.safetensors shards + index when
    they exceed `max_shard_bytes`. Each shard is written as soon as it is full (one shard in memory)."""
    written: list[tuple[Path, list[str]]] = []
    shard: dict[str, torch.Tensor] = {}
    size = total = 0

    def flush() -> None:
        path = out_dir / f".shard-{len(written) + 1:05d}.safetensors"
        save_file(shard, str(path), metadata=EXPORT_METADATA)
        written.append((path, list(shard)))
        shard.clear()

    for name, tensor in tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if shard and size + nbytes > max_shard_bytes:
            flush()
            size = 0
        shard[name] = tensor.contiguous()
        size += nbytes
        total += nbytes
    flush()
    if len(written) == 1:
        written[0][0].rename(out_dir / "model.safetensors")
        return
    weight_map = {}
    for i, (path, names) in enumerate(written):
        file = f"model-{i + 1:05d}-of-{len(written):05d}.safetensors"
        path.rename(out_dir / file)
        weight_map.update(dict.fromkeys(names, file))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


# ---------------------------------------------------------------------------------------------
# Public API


def load_hf_weights(model: torch.nn.Module, hf_dir: str | Path, cfg: Config) -> None:
    """Fill a built GPTModel (possibly tensor-parallel; DDP/Float16Module wrappers are unwrapped) with
    the weights of a HF Llama directory. ConversionError when the recipe's model section disagrees with
    the HF config, or the checkpoint is incomplete. Call on every rank (each reads what it needs)."""
    check_recipe_matches(cfg.model, hf_dir)
    files = safetensors_files(hf_dir)
    inner = unwrap_model(model)
    params = dict(inner.named_parameters())
    rank, size = parallel_state.get_tensor_model_parallel_rank(), parallel_state.get_tensor_model_parallel_world_size()
    vocab_rows = params["embedding.word_embeddings.weight"].shape[0] * size
    filled = set()
    progress = not dist.is_initialized() or dist.get_rank() == 0
    with torch.no_grad():
        tensors = read_safetensors(files, progress)
        for name, full in megatron_tensors(tensors, cfg.model, vocab_rows, Path(hf_dir) / "config.json"):
            param = params[name]
            part = tensor_parallel_shard(name, full, param, rank, size)
            assert part.shape == param.shape, (name, part.shape, param.shape)
            param.copy_(part)
            filled.add(name)
    assert filled == set(params), set(params) - filled


@contextlib.contextmanager
def _single_process(cfg: Config):
    """A world-size-1 Megatron set-up for conversion (reusing one that already exists)."""
    if dist.is_initialized():
        if dist.get_world_size() != 1:
            raise ConversionError("checkpoint conversion runs in one process; run it outside torchrun")
        yield
        return
    init_distributed(cfg)
    set_seed(cfg.run.seed)
    try:
        yield
    finally:
        destroy_distributed()


def _conversion_config(model: ModelConfig) -> Config:
    """The recipe a conversion builds the model with: our model section, full attention, TP 1, CPU, the local
    layer spec and the default fusions. A GPU run records CUDA-only fusions and maybe Transformer Engine; none of
    them changes a parameter, and Megatron-Core's local spec saves and loads its norms under TE's keys."""
    fields = model.model_dump(exclude={"fusions", "transformer_impl"})
    return Config.model_validate({"model": fields, "attention": {"mode": "full"}, "run": {"device": "cpu"}})


def _is_import(path: Path) -> bool:
    """Whether `path` is a checkpoint written by import_hf."""
    return is_complete(path) and (path / HF_SIDECAR / "config.json").is_file()


def _is_export(path: Path) -> bool:
    """Whether `path` holds nothing but the files export_hf writes, with safetensors it marked."""
    entries = list(path.iterdir())
    weights = [p for p in entries if _EXPORT_WEIGHTS.match(p.name)]
    known = {"model.safetensors.index.json", *HF_SIDECAR_FILES}
    if not weights or any(not p.is_file() or (p not in weights and p.name not in known) for p in entries):
        return False
    try:
        marks = [(safe_open(str(p), framework="pt").metadata() or {}).get("written_by") for p in weights]
    except SafetensorError:
        return False
    return all(mark == EXPORT_METADATA["written_by"] for mark in marks)


def _check_target(target: Path, source: Path, what: str, is_earlier: Callable[[Path], bool], overwrite: bool) -> None:
    """ConversionError unless a conversion may publish at `target`: new, empty, an earlier output of the same
    kind (`is_earlier`) or `overwrite`; never the source or a directory holding it."""
    if target.resolve() in (source.resolve(), *source.resolve().parents):
        raise ConversionError(f"'{target}' holds the source '{source}'; write the {what} to another directory")
    if target.exists() and not target.is_dir():
        raise ConversionError(f"'{target}' is a file; pass a directory for the {what}")
    if target.is_dir() and any(target.iterdir()) and not overwrite and not is_earlier(target):
        raise ConversionError(f"'{target}' is not empty and is not an earlier {what}: choose a new or empty "
                              "directory, or pass --overwrite to replace everything in it")


def import_hf(hf_dir: str | Path, out_dir: str | Path, overwrite: bool = False) -> Path:
    """Convert a HF Llama directory into a model-only checkpoint at `out_dir` (config.yaml + weights,
    loadable under any TP layout via `checkpoint.init_from`), published whole. A non-empty `out_dir` is
    replaced only when it is an earlier import, or with `overwrite`. Returns `out_dir`."""
    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    cfg = _conversion_config(model_config_from_hf(read_hf_config(hf_dir)))
    _check_target(out_dir, hf_dir, "import", _is_import, overwrite)
    with staging_dir(out_dir) as stage, _single_process(cfg):
        model = build_model(cfg)
        load_hf_weights(model, hf_dir, cfg)
        recorded = cfg.model_copy(update={"run": cfg.run.model_copy(update={"device": "auto"})})
        staged = save_model_checkpoint(stage / out_dir.name, model, recorded)
        sidecar = staged / HF_SIDECAR
        sidecar.mkdir()
        for file in HF_SIDECAR_FILES:
            if (hf_dir / file).is_file():
                shutil.copy2(hf_dir / file, sidecar / file)
        replace_dir(staged, out_dir)
    return out_dir


def _source_dtype(hf: dict) -> torch.dtype:
    name = hf.get("dtype") or hf.get("torch_dtype") or "bfloat16"
    return DTYPES.get(name, torch.bfloat16)


def hf_source(ckpt: Path, recipe: Config) -> Path | None:
    """The HF directory a checkpoint's model came from (its config.json is the base of the export):
    the imported source's copy `<ckpt>/hf`, the run's `model.init_from_hf`, or the `hf/` copy of the
    imported checkpoint the run started from (`checkpoint.init_from`). None when unknown."""
    candidates = [ckpt / HF_SIDECAR]
    if recipe.model.init_from_hf:
        candidates.append(Path(recipe.model.init_from_hf))
    if recipe.checkpoint.init_from:
        candidates.append(Path(recipe.checkpoint.init_from) / HF_SIDECAR)
    return next((path for path in candidates if (path / "config.json").is_file()), None)


def export_hf(
    ckpt_dir: str | Path, hf_out_dir: str | Path, dtype: torch.dtype | None = None, overwrite: bool = False
) -> Path:
    """Write our checkpoint (a complete checkpoint or a checkpoint root: its newest) as a HF
    LlamaForCausalLM directory: config.json, safetensors (sharded with an index when large), and the
    tokenizer files of the HF source (`hf_source`) or of `data.tokenizer`, published whole. dtype defaults
    to the source's, else bf16. A non-empty `hf_out_dir` is replaced only when it is an earlier export, or
    with `overwrite`. Returns `hf_out_dir`."""
    ckpt, out = resolve_checkpoint(ckpt_dir), Path(hf_out_dir)
    _check_target(out, ckpt, "export", _is_export, overwrite)
    recipe = load_config(ckpt / "config.yaml")
    source = hf_source(ckpt, recipe)
    base = _read_json(source / "config.json") if source else None
    dtype = dtype or _source_dtype(base or {})
    cfg = _conversion_config(recipe.model)
    with _single_process(cfg):
        model = build_model(cfg)
        load_model_weights(ckpt, model)
        state = {name: p.detach() for name, p in model.named_parameters()}
    tokenizer_dirs = [d for d in (source, recipe.data.tokenizer and Path(recipe.data.tokenizer)) if d and d.is_dir()]
    with staging_dir(out) as stage:
        staged = stage / out.name
        staged.mkdir()
        tensors = ((name, t.to(dtype)) for name, t in hf_tensors_from_megatron(state, cfg.model))
        write_safetensors(tensors, staged, MAX_SHARD_BYTES)
        config = hf_config_from_model(cfg.model, dtype, base)
        (staged / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        for file in HF_SIDECAR_FILES[1:]:
            found = next((d / file for d in tokenizer_dirs if (d / file).is_file()), None)
            if found:
                shutil.copy2(found, staged / file)
        replace_dir(staged, out)
    return out
