"""Which layers of a model copy from far context: induction scores on repeated random tokens.

A head copies from context when, at a token it has seen before, it attends to the token that followed the
earlier occurrence: an induction head (Olsson et al., 2022), the circuit behind passkey retrieval and the
study's copy task. On L random tokens repeated once, a head's induction score is its attention weight, at a
query t of the second copy (t >= L), on key t - L + 1, averaged over the sampled queries and sequences. Random
tokens carry no other structure, so a high score is copying and nothing else. (RazorAttention, Tang et al. 2024,
picks the heads that keep a full KV cache by scores of this kind.)

The weights are those of exact dense causal attention from each layer's own q and k (after RoPE, as the core
attention receives them), in fp32, whatever attention the layer runs: for a MoBA layer the score says what it
would read with full attention. `probed_layer_kinds` keeps full attention in the layers whose best head copies
most; the quality study's arm `hybrid_probed` tests that placement against the last layers (docs/quality.md).
`scripts/probe_layers.py` prints the scores of a checkpoint or a Hugging Face model (`probe_model`, one process);
the trainer's `attention.full_layers_at: probe` runs the same probe on the model training starts from, under the
run's own tensor and context parallelism (`place_full_layers`, `probe_start`). Both run that model with full
attention in every layer.
"""

from __future__ import annotations

import gc
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state

from moba_train import context_parallel
from moba_train.config import Config, ConfigError
from moba_train.resume import saved_recipe

FIRST_TOKEN = 16
"""Random tokens are drawn from ids FIRST_TOKEN.. so that no special token (end of document, padding) is one."""


def repeated_random_tokens(sequences: int, segment_length: int, vocab_size: int, seed: int = 0) -> np.ndarray:
    """int64 [sequences, 2 * segment_length]: each row L random ids, then the same L again."""
    if vocab_size <= FIRST_TOKEN + 1:
        raise ConfigError(f"the induction probe draws random tokens from ids {FIRST_TOKEN}.., but the model's "
                          f"vocabulary has only {vocab_size}")
    first = np.random.default_rng(seed).integers(FIRST_TOKEN, vocab_size, (sequences, segment_length))
    return np.concatenate([first, first], axis=1)


def query_positions(segment_length: int, queries: int, seed: int = 0) -> np.ndarray:
    """The sorted query positions of the second copy the scores average over (all of them if queries >=
    segment_length); the same in every sequence."""
    second = np.arange(segment_length, 2 * segment_length)
    if queries >= segment_length:
        return second
    return np.sort(np.random.default_rng(seed).choice(second, queries, replace=False))


def head_induction_scores(q: torch.Tensor, k: torch.Tensor, starts: torch.Tensor, positions: torch.Tensor,
                          segment_length: int, softmax_scale: float) -> torch.Tensor:
    """fp32 [sequences, heads]: per sequence starting at `starts` (offsets into q's tokens), the mean over
    `positions` of each head's dense causal attention weight on the key one past the query's earlier copy.
    q [T, H, D] and k [T, G, D] (G divides H; query head h reads key head h // (H // G), Megatron's grouping)."""
    heads, groups = q.shape[1], k.shape[1]
    out = []
    for start in starts.tolist():
        length = 2 * segment_length
        qs = q[start + positions].float()                                           # [P, H, D]
        ks = k[start:start + length].float().repeat_interleave(heads // groups, 1)  # [2L, H, D]
        logits = torch.einsum("phd,khd->hpk", qs, ks) * softmax_scale
        future = torch.arange(length, device=q.device)[None, :] > positions[:, None]
        weights = logits.masked_fill(future[None], float("-inf")).softmax(-1)
        target = (positions - segment_length + 1)[None, :, None].expand(heads, -1, 1)
        out.append(weights.gather(-1, target)[..., 0].mean(-1))                   # [H]
    return torch.stack(out)


@torch.no_grad()
def induction_scores(loaded, *, segment_length: int = 256, sequences: int = 8, queries: int = 64,
                     batch_size: int = 4, seed: int = 0, progress: bool = False) -> dict:
    """Every layer's heads' induction scores (`head_induction_scores`, averaged over the sequences) of a loaded
    model (moba_train.evaluation.load_model, or the trainer's `probe_start`), its best head's and their mean,
    and the layers ranked by their best head (highest first). Under tensor and context parallelism (the
    trainer's) every rank scores all heads of whole sequences: the same numbers as one process."""
    from moba_train.core_attention import _CoreAttention
    from moba_train.diagnostics import layer_index
    from moba_train.evaluation import forward_capturing

    if segment_length < 2 or sequences < 1 or queries < 1:
        raise ConfigError(f"the induction probe needs a segment of at least 2 tokens and at least 1 sequence and "
                          f"query, not segment {segment_length}, {sequences} sequences, {queries} queries")
    limit = loaded.config.model.max_position_embeddings
    if 2 * segment_length > limit:
        raise ConfigError(f"two copies of {segment_length} tokens exceed the model's {limit} positions; pass a "
                          f"segment length of at most {limit // 2}")
    modules = {layer_index(name): module for name, module in loaded.model.named_modules()
               if isinstance(module, _CoreAttention)}
    tokens = repeated_random_tokens(sequences, segment_length, loaded.vocab_size, seed)
    windows = np.concatenate([tokens, tokens[:, :1]], axis=1)  # a window's last token is only a label
    positions = query_positions(segment_length, queries, seed)
    sums = {layer: 0.0 for layer in modules}

    tp_group = parallel_state.get_tensor_model_parallel_group()
    tp = parallel_state.get_tensor_model_parallel_world_size()

    def capture(layer: int, module, q, k, cu_seqlens) -> None:
        if module.cp_group is not None:  # this rank's shard of each sequence: every rank scores whole sequences
            bounds = cu_seqlens.tolist()
            lengths = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
            q, k = (context_parallel.gather_sequences(x, lengths, module.cp_group) for x in (q, k))
        scores = head_induction_scores(q, k, cu_seqlens[:-1].long(), torch.from_numpy(positions).to(q.device),
                                       segment_length, module.softmax_scale)
        if tp > 1:  # this rank's heads: Megatron gives rank r the r-th contiguous slice of them
            parts = [torch.empty_like(scores) for _ in range(tp)]
            dist.all_gather(parts, scores.contiguous(), group=tp_group)
            scores = torch.cat(parts, dim=1)
        sums[layer] = sums[layer] + scores.sum(0).cpu()

    forward_capturing(loaded, windows, modules, capture, batch_size=batch_size, desc="induction probe",
                      progress=progress)
    layers = {}
    for layer in sorted(modules):
        heads = (sums[layer] / sequences).tolist()
        layers[f"layer_{layer:02d}"] = {"heads": heads, "max": max(heads), "mean": float(np.mean(heads))}
    ranking = sorted(modules, key=lambda layer: (-layers[f"layer_{layer:02d}"]["max"], -layer))
    return {"segment_length": segment_length, "sequences": sequences, "queries": len(positions), "seed": seed,
            "layers": layers, "ranking": ranking}


COPYING = 10.0
"""A layer copies when its best head's induction score is at least this many times the weight that uniform causal
attention puts on one key (`uniform_score`). Random weights score about 1x; in the quality study's ten probed starts
(bench/results/quality) the layers chosen scored 21-297x, and every start had at least three layers above 15x."""


def uniform_score(scores: dict) -> float:
    """The induction score of a head that attends uniformly: the mean over the probe's query positions t of 1/(t+1)
    (the positions are those `induction_scores` drew, from its segment length, query count and seed)."""
    positions = query_positions(scores["segment_length"], scores["queries"], scores["seed"])
    return float(np.mean(1.0 / (positions + 1)))


def copying_layers(scores: dict, uniform: float | None = None) -> list[int]:
    """The layers that copy (best head at least COPYING x `uniform_score`, given as `uniform` where the caller has
    it), in `ranking` order."""
    floor = COPYING * (uniform_score(scores) if uniform is None else uniform)
    return [layer for layer in scores["ranking"] if scores["layers"][f"layer_{layer:02d}"]["max"] >= floor]


def probed_layer_kinds(scores: dict, full_layers: int) -> list[str]:
    """Per layer, first to last: "full" for the `full_layers` layers whose best head scores highest (`ranking`;
    at a tie the later layer), "moba" for the rest. Only layers that copy (`copying_layers`) are placed so; where
    fewer than `full_layers` do, the rest of the full layers are the last ones not yet full (the layout of
    `attention.full_layers_at: last`): the probe found nothing to place them by. (`placement`'s layer_kinds.)"""
    return placement(scores, full_layers)["layer_kinds"]


def placement(scores: dict, full_layers: int) -> dict:
    """Where a probe keeps `full_layers` layers full: full_layers, copying_layers, layer_kinds (`probed_layer_kinds`),
    and note, "" where every full layer was placed by the probe, else one sentence saying how many layers copy and
    that the rest of the full layers are the last ones."""
    layers = len(scores["ranking"])
    if not 0 <= full_layers <= layers:
        raise ConfigError(f"cannot keep {full_layers} full layers of a model of {layers}")
    uniform = uniform_score(scores)
    copying = copying_layers(scores, uniform)
    full = set(copying[:full_layers])
    last = (layer for layer in reversed(range(layers)) if layer not in full)
    full.update(next(last) for _ in range(full_layers - len(full)))
    note = "" if len(copying) >= full_layers else (
        f"only {len(copying)} layer(s) copy (best head at least {COPYING:g} x the uniform weight "
        f"{uniform:.2g}), so {full_layers - len(copying)} full layer(s) stay last; is this the trained "
        f"model you meant to start from?")
    return {"full_layers": full_layers, "copying_layers": copying,
            "layer_kinds": ["full" if layer in full else "moba" for layer in range(layers)], "note": note}


def probe_model(path: str | os.PathLike, full_layers: int, overrides: Sequence[str] = (), *,
                segment_length: int | None = None, **settings) -> dict:
    """`induction_scores` of the model at `path` (a checkpoint or Hugging Face directory, loaded by
    moba_train.evaluation.load_model with `overrides`, then full attention in every layer, as `probe_start`
    runs it; segment_length None: half the recipe's train.seq_length, at most PROBE_SEGMENT, as the trainer's
    probe), with where it keeps `full_layers` layers full (`placement`)."""
    from moba_train.distributed import destroy_distributed
    from moba_train.evaluation import load_model

    try:
        loaded = load_model(path, [*overrides, "attention.mode=full"])
        if segment_length is None:
            segment_length = probe_segment(loaded.config)
        scores = induction_scores(loaded, segment_length=segment_length, **settings)
    finally:
        destroy_distributed()
    return {**scores, **placement(scores, full_layers)}


PROBE_SEQUENCES, PROBE_QUERIES = 16, 64
"""The trainer's probe (`attention.full_layers_at: probe`): the quality study's settings (docs/quality.md)."""
PROBE_SEGMENT = 4096
"""Its repeated segments: half the training length, at most this (the study probed 4K of 8K)."""


def probe_segment(cfg: Config) -> int:
    """The probe's repeated segment for a recipe: half its train.seq_length, at most PROBE_SEGMENT."""
    return min(cfg.train.seq_length // 2, PROBE_SEGMENT)


def probe_start(cfg: Config, source: str | os.PathLike, *, hugging_face: bool, seed: int = 0) -> dict:
    """`induction_scores` of the weights at `source` (a checkpoint, or with `hugging_face` a Hugging Face
    directory) in a model built from `cfg` under its parallel layout (collective: every rank of the run calls
    it), in the run's compute precision, with full attention in every layer: each layer's q and k are then
    those of the model as a Hugging Face Llama was trained (and as the quality study probed its shared start,
    trained with full attention). The model is freed before returning. Every rank returns rank 0's scores, so
    that a tie cannot place the full layers differently on two ranks."""
    from moba_train.evaluation import LoadedModel, model_with_weights

    cfg = _with_attention(cfg, mode="full")
    model = model_with_weights(cfg, Path(source), hugging_face=hugging_face)
    try:
        scores = induction_scores(LoadedModel(model, cfg, Path(source)), segment_length=probe_segment(cfg),
                                  sequences=PROBE_SEQUENCES, queries=PROBE_QUERIES, batch_size=1, seed=seed)
    finally:
        del model
        gc.collect()
        if torch.cuda.is_initialized():
            torch.cuda.empty_cache()
    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [scores]
        dist.broadcast_object_list(box, src=0)
        scores = box[0]
    return scores


def _with_attention(cfg: Config, **changes) -> Config:
    """`cfg` with these attention settings (validated again)."""
    raw = cfg.model_dump()
    raw["attention"].update(changes)
    return Config.model_validate(raw)


def probe_record(cfg: Config) -> Path:
    """Where the trainer's probe writes its scores and placement: run.output_dir/probe.json."""
    return Path(cfg.run.output_dir) / "probe.json"


def place_full_layers(cfg: Config, *, resume: Path | None, init_from: Path | None, is_main: bool) -> Config:
    """The trainer's `attention.full_layers_at: probe`: `cfg` with attention.layer_kinds keeping the
    `full_layers` layers full where the model training continues from copies most (`probe_start`,
    `probed_layer_kinds`); `cfg` itself for any other recipe. That model is the resumed checkpoint `resume`,
    else `init_from` (checkpoint.init_from), else model.init_from_hf. A resumed run whose checkpoint was
    trained with probed layers keeps them (its config.yaml's layer_kinds) and probes nothing. Rank 0 prints
    the scores and writes them to run.output_dir/probe.json."""
    att = cfg.attention
    if not cfg.probes_full_layers():
        return cfg
    if resume is not None:
        saved = saved_recipe(resume) or {}
        kinds = saved.get("attention.layer_kinds")
        if (saved.get("attention.full_layers_at") == "probe" and isinstance(kinds, list)
                and len(kinds) == cfg.model.num_layers and kinds.count("full") == att.full_layers):
            if is_main:
                print(f"full attention in layers {_numbers(kinds)}, as probed when this run started "
                      f"({resume / 'config.yaml'})", flush=True)
            return _with_attention(cfg, layer_kinds=kinds)
    source = resume or init_from or cfg.model.init_from_hf
    scores = probe_start(cfg, source, hugging_face=resume is None and init_from is None)
    placed = placement(scores, att.full_layers)
    kinds = placed["layer_kinds"]
    if is_main:
        from moba_train.staging import write_json

        best = ", ".join(f"{record['max']:.3f}" for record in scores["layers"].values())
        print(f"induction probe of {source} ({scores['sequences']} x {scores['segment_length']} random tokens "
              f"repeated once): best head per layer {best}; full attention in layers {_numbers(kinds)}", flush=True)
        if placed["note"]:
            print(f"warning: {placed['note']}", flush=True)
        write_json(probe_record(cfg), {**scores, "source": str(source), **placed})
    return _with_attention(cfg, layer_kinds=kinds)


def _numbers(kinds: list[str]) -> str:
    """The full layers, counted from 1 as the README and the probe script count them."""
    return ", ".join(str(i + 1) for i, kind in enumerate(kinds) if kind == "full")
