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
`scripts/probe_layers.py` prints the scores of a checkpoint or a Hugging Face model.
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np
import torch

from moba_train.config import ConfigError

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
    model (moba_train.evaluation.load_model), its best head's and their mean, and the layers ranked by their
    best head (highest first)."""
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

    def capture(layer: int, module, q, k, cu_seqlens) -> None:
        scores = head_induction_scores(q, k, cu_seqlens[:-1].long(), torch.from_numpy(positions).to(q.device),
                                       segment_length, module.softmax_scale)
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


def probed_layer_kinds(scores: dict, full_layers: int) -> list[str]:
    """Per layer, first to last: "full" for the `full_layers` layers whose best head scores highest (`ranking`;
    at a tie the later layer), "moba" for the rest."""
    ranking = scores["ranking"]
    if not 0 <= full_layers <= len(ranking):
        raise ConfigError(f"cannot keep {full_layers} full layers of a model of {len(ranking)}")
    full = set(ranking[:full_layers])
    return ["full" if layer in full else "moba" for layer in range(len(ranking))]


def probe_model(path: str | os.PathLike, full_layers: int, overrides: Sequence[str] = (), *,
                segment_length: int | None = None, **settings) -> dict:
    """`induction_scores` of the model at `path` (a checkpoint or Hugging Face directory, loaded by
    moba_train.evaluation.load_model with `overrides`; segment_length None: half the recipe's train.seq_length),
    with `full_layers` and the layer kinds that keep them full (`probed_layer_kinds`)."""
    from moba_train.distributed import destroy_distributed
    from moba_train.evaluation import load_model

    try:
        loaded = load_model(path, overrides)
        if segment_length is None:
            segment_length = loaded.config.train.seq_length // 2
        scores = induction_scores(loaded, segment_length=segment_length, **settings)
    finally:
        destroy_distributed()
    return {**scores, "full_layers": full_layers, "layer_kinds": probed_layer_kinds(scores, full_layers)}
