"""MoBA routing diagnostics: which context the gate reads, measured on a real training micro-batch.

Every `logging.moba_diag_interval` steps the trainer calls `RoutingDiagnostics.run(step, batch)`: one
no-grad forward of a micro-batch of that step, with forward pre-hooks on the MoBA core-attention
modules that take each layer's q and k as the attention receives them (`core_attention.to_thd`), and
per MoBA layer, on sampled KV heads (every query head of each one's group) and sampled queries:

    distance               query block - picked block, over the past blocks the gate picked (the
                           current block, always attended, is not a pick): `moba/distance/layer_NN`
                           (histogram, one bin per distance) and `moba/distance_mean/layer_NN`
    previous_block_share   share of (query, head) pairs whose picks include the block just before
                           their own
    gate_recall            share of exact dense causal attention's probability mass (fp32 softmax over
                           every key <= the query) that falls on the keys MoBA attends (the picked
                           blocks and the current block up to the query)
    popularity             per key block c: picks of c / (query, head) pairs (`moba/popularity/layer_NN`,
                           a histogram over blocks that sums to topk - 1); `first_block_share` is
                           popularity[0] / (topk - 1): the attention-sink effect MoBA's authors describe
                           (absent at top-1, which picks no earlier block)
    head_overlap           mean over pairs of heads of one KV group of |picks_i & picks_j| / (topk - 1):
                           1 when the group's heads agree (shared_gqa_selection would then cost nothing);
                           absent without GQA groups of two or more heads, and at top-1
    heatmap                [query block, key block]: share of the queries of a block (every query of
                           the micro-batch, the first sampled head) that attend the key block, as
                           `<output_dir>/diagnostics/heatmap_step_NNNNNNNN.png` (one panel per layer,
                           logged as `moba/heatmap`) and `.npz` (the arrays, by layer name)
`moba/<name>` without a layer is the mean over MoBA layers; `moba/time_s` is the diagnostic's wall time.

Sampled queries are positions whose gate has a choice (local block index >= topk: more earlier blocks
than slots; positions before attend every earlier block by construction), drawn uniformly without
replacement with a generator seeded by the step, the same positions for every layer. The selection is
`moba_train.attention.moba_selection` (the public API), so diagnostics see exactly what training
attends. Statistics are computed per sequence from key-local positions (`_sequence_recall`), so
queries that are a suffix of their sequence's keys (context parallelism: cu_seqlens_q != cu_seqlens_k)
need only their offsets passed through. Rank 0 computes and writes; every rank runs the forward (tensor
parallelism needs all of them), and with tensor parallelism rank 0 samples from its own heads.
"""

from __future__ import annotations

import functools
import inspect
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from moba_train import context_parallel
from moba_train.attention import moba_selection
from moba_train.config import Config
from moba_train.core_attention import MoBACoreAttention, host_offsets, to_thd
from moba_train.metrics import Histogram, Image, Value
from moba_train.model import forward_step
from moba_train.staging import write_file

RECALL_CHUNK = 16
"""Sampled queries per dense-attention chunk in gate recall (bounds its [chunk, heads, keys] buffers)."""


@dataclass
class LayerRouting:
    """Routing statistics of one layer (see the module docstring); arrays over `num_blocks` blocks."""

    distance_counts: np.ndarray  # int64 [num_blocks]: picks at distance d = query block - picked block
    previous_block_share: float
    gate_recall: float
    popularity: np.ndarray  # float64 [num_blocks]: picks of block c per (query, head) pair
    head_overlap: float | None
    heatmap: np.ndarray  # float64 [num_blocks, num_blocks]: share of block b's queries attending block c


def choice_positions(bounds: list[int], block_size: int, topk: int) -> torch.Tensor:
    """int64 [n]: the token positions (over the packed tokens) whose local block index is >= topk."""
    ranges = [torch.arange(min(start + topk * block_size, end), end) for start, end in zip(bounds[:-1], bounds[1:])]
    return torch.cat(ranges) if ranges else torch.zeros(0, dtype=torch.int64)


def sample_queries(bounds: list[int], block_size: int, topk: int, count: int, generator: torch.Generator):
    """int64 [min(count, n)], ascending: positions drawn without replacement from `choice_positions`."""
    candidates = choice_positions(bounds, block_size, topk)
    picked = torch.randperm(len(candidates), generator=generator)[:count]
    return candidates[picked].sort().values


def sample_kv_heads(num_kv_heads: int, count: int, generator: torch.Generator) -> list[int]:
    """Ascending KV head indices, min(count, num_kv_heads) of them, drawn without replacement."""
    return sorted(torch.randperm(num_kv_heads, generator=generator)[:count].tolist())


def _token_blocks(bounds: list[int], block_size: int, device) -> torch.Tensor:
    """Each token's block index local to its sequence, int64 [T]."""
    lengths = torch.tensor([b - a for a, b in zip(bounds[:-1], bounds[1:])], device=device)
    starts = torch.repeat_interleave(torch.tensor(bounds[:-1], device=device), lengths)
    return (torch.arange(bounds[-1], device=device) - starts) // block_size


def _sequence_recall(q_mhd, k_lgd, picked_mhn, positions_m, block_size: int, scale: float) -> torch.Tensor:
    """float64 [m]: per query, the sum over heads of the dense-attention mass on the keys MoBA attends, for
    queries of one sequence at key positions `positions_m` (int64 [m]), q [m, H, D], that sequence's keys
    [L, G, D] (query head h reads KV head h // (H // G)) and picks as a bool [m, H, num_blocks] block mask."""
    heads, kv_heads = q_mhd.shape[1], k_lgd.shape[1]
    keys = k_lgd.float().repeat_interleave(heads // kv_heads, dim=1)  # [L, H, D]
    key_pos = torch.arange(keys.shape[0], device=keys.device)
    sums = []
    for lo in range(0, q_mhd.shape[0], RECALL_CHUNK):
        q, pos, picked = (x[lo:lo + RECALL_CHUNK] for x in (q_mhd, positions_m, picked_mhn))
        causal = key_pos[None, :] <= pos[:, None]  # [c, L]
        logits = torch.einsum("chd,lhd->chl", q.float(), keys) * scale
        probs = torch.softmax(logits.masked_fill(~causal[:, None, :], float("-inf")), dim=-1)
        attended = picked[:, :, key_pos // block_size] & causal[:, None, :]  # [c, H, L]
        sums.append((probs * attended).sum(dim=(1, 2), dtype=torch.float64))
    return torch.cat(sums)


def _query_picks(selection, token_block, queries):
    """(picks [n, H, topk], own block [n, 1, 1], past [n, H, topk] bool) of the queries `queries` from a
    moba_selection [T, H, topk] (int64) and each token's local block index: past marks the picks of an
    earlier block (not the query's own, not an empty slot)."""
    picks = selection[queries]
    own = token_block[queries][:, None, None]
    return picks, own, (picks >= 0) & (picks != own)


def _past_picks(picks, past, num_blocks: int) -> torch.Tensor:
    """bool [n, H, num_blocks]: the earlier blocks that each query picked, per head (`_query_picks`)."""
    picked = torch.zeros(*picks.shape[:2], num_blocks + 1, dtype=torch.bool, device=picks.device)
    picked.scatter_(2, torch.where(past, picks, num_blocks), True)
    return picked[..., :num_blocks]


def _attended_recall(q, k, bounds: list[int], picked, token_block, queries, block_size: int, scale: float):
    """float64 [n]: per query of `queries`, the dense-attention mass on what MoBA attends (the past picks
    `picked` and its own block up to it), summed over the heads of q."""
    attended = picked.clone()
    attended.scatter_(2, token_block[queries][:, None, None].expand(-1, q.shape[1], 1), True)  # the current block
    recall = torch.zeros(len(queries), dtype=torch.float64, device=q.device)
    for start, end in zip(bounds[:-1], bounds[1:]):
        in_seq = (queries >= start) & (queries < end)
        if in_seq.any():
            recall[in_seq] = _sequence_recall(q[queries[in_seq]], k[start:end], attended[in_seq],
                                              queries[in_seq] - start, block_size, scale)
    return recall


def query_gate_recall(q, k, cu_seqlens, *, block_size: int, topk: int, softmax_scale: float, queries: torch.Tensor,
                      shared_gqa_selection: bool = False) -> torch.Tensor:
    """float64 [n]: for each query position of `queries` (int64, over the packed tokens of q [T, H, D]; k
    [T, G, D]), the share of exact dense causal attention's probability mass that falls on the keys MoBA
    attends, averaged over the heads. 1 where the query's sequence has no more earlier blocks than topk - 1."""
    bounds = cu_seqlens.tolist()
    selection = moba_selection(q, k, cu_seqlens=cu_seqlens, block_size=block_size, topk=topk,
                               shared_gqa_selection=shared_gqa_selection).long()
    token_block = _token_blocks(bounds, block_size, q.device)
    num_blocks = int(token_block.max().item()) + 1 if len(token_block) else 1
    queries = queries.to(q.device)
    picks, _, past = _query_picks(selection, token_block, queries)
    picked = _past_picks(picks, past, num_blocks)
    return _attended_recall(q, k, bounds, picked, token_block, queries, block_size, softmax_scale) / q.shape[1]


def layer_routing(q, k, cu_seqlens, *, block_size: int, topk: int, softmax_scale: float, queries: torch.Tensor,
                  num_blocks: int, shared_gqa_selection: bool = False) -> LayerRouting:
    """Routing statistics of one layer from its q [T, H, D] and k [T, G, D] (the sampled heads and their KV
    heads, H % G == 0), int32 cu_seqlens [N+1], and the sampled query positions `queries` (int64 [n], n >= 1,
    each with a choice: local block >= topk). `num_blocks` sizes the per-block arrays (>= any sequence's)."""
    bounds = cu_seqlens.tolist()
    selection = moba_selection(q, k, cu_seqlens=cu_seqlens, block_size=block_size, topk=topk,
                               shared_gqa_selection=shared_gqa_selection).long()  # [T, H, topk]
    token_block = _token_blocks(bounds, block_size, q.device)
    heads = q.shape[1]

    first = selection[:, 0, :]  # [T, topk]: the heatmap head
    rows = token_block[:, None].expand_as(first)
    heat = torch.zeros(num_blocks, num_blocks, dtype=torch.float64, device=q.device)
    heat.index_put_((rows[first >= 0], first[first >= 0]), torch.ones((), dtype=torch.float64, device=q.device),
                    accumulate=True)
    per_block = torch.bincount(token_block, minlength=num_blocks).to(torch.float64)
    heat /= per_block.clamp(min=1)[:, None]

    queries = queries.to(q.device)
    picks, own, past = _query_picks(selection, token_block, queries)  # [n, H, topk]
    pairs = len(queries) * heads
    distance_counts = torch.bincount((own - picks)[past], minlength=num_blocks)
    previous = ((picks == own - 1) & past).any(-1).sum().item() / pairs
    popularity = torch.bincount(picks[past], minlength=num_blocks).to(torch.float64) / pairs

    picked = _past_picks(picks, past, num_blocks)  # [n, H, num_blocks]
    group = heads // k.shape[1]
    overlap = None
    if group > 1 and topk > 1:  # top-1 picks nothing past: no overlap to measure
        grouped = picked.view(len(queries), k.shape[1], group, num_blocks).double()
        shared = torch.einsum("ngib,ngjb->ngij", grouped, grouped)  # |picks_i & picks_j|
        off_diagonal = ~torch.eye(group, dtype=torch.bool, device=q.device)
        overlap = (shared[..., off_diagonal].mean() / (topk - 1)).item()

    recall = _attended_recall(q, k, bounds, picked, token_block, queries, block_size, softmax_scale).sum()
    return LayerRouting(
        distance_counts=distance_counts.cpu().numpy(),
        previous_block_share=previous,
        gate_recall=recall.item() / pairs,
        popularity=popularity.cpu().numpy(),
        head_overlap=overlap,
        heatmap=heat.cpu().numpy(),
    )


def layer_index(name: str) -> int:
    match = re.search(r"layers\.(\d+)\.", name)
    assert match, f"core attention module {name} is not inside a transformer layer"
    return int(match.group(1))


def _block_edges(num_blocks: int) -> list[float]:
    return [i - 0.5 for i in range(num_blocks + 1)]


def routing_metrics(results: dict[int, LayerRouting], topk: int) -> dict[str, Value]:
    """moba/ metrics of per-layer results (keyed by 0-based layer index): per layer and means over layers."""
    metrics: dict[str, Value] = {}
    means: dict[str, list[float]] = {}
    for layer, result in sorted(results.items()):
        counts = result.distance_counts
        distances = np.arange(len(counts))
        scalars = {
            "gate_recall": result.gate_recall,
            "previous_block_share": result.previous_block_share,
            "distance_mean": float((counts * distances).sum() / max(counts.sum(), 1)),
        }
        if topk > 1:  # top-1 picks no earlier block
            scalars["first_block_share"] = float(result.popularity[0] / (topk - 1))
        if result.head_overlap is not None:
            scalars["head_overlap"] = result.head_overlap
        for name, value in scalars.items():
            metrics[f"moba/{name}/layer_{layer:02d}"] = value
            means.setdefault(name, []).append(value)
        edges = _block_edges(len(counts))
        metrics[f"moba/distance/layer_{layer:02d}"] = Histogram([float(c) for c in counts], edges)
        metrics[f"moba/popularity/layer_{layer:02d}"] = Histogram([float(p) for p in result.popularity], edges)
    for name, values in means.items():
        metrics[f"moba/{name}"] = float(np.mean(values))
    return metrics


def save_heatmaps(heatmaps: dict[int, np.ndarray], step: int, out_dir: Path) -> Path:
    """One PNG (a panel per layer) and one .npz (`layer_NN` arrays) of step `step`; returns the PNG path.
    Both are written atomically (staging.write_file)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"heatmap_step_{step:08d}"
    write_file(stem.with_suffix(".npz"),
               lambda f: np.savez(f, **{f"layer_{layer:02d}": heat for layer, heat in heatmaps.items()}))

    cols = min(4, len(heatmaps))
    rows = math.ceil(len(heatmaps) / cols)
    fig = Figure(figsize=(3.2 * cols, 3.0 * rows), layout="constrained")
    FigureCanvasAgg(fig)
    for i, (layer, heat) in enumerate(sorted(heatmaps.items())):
        ax = fig.add_subplot(rows, cols, i + 1)
        image = ax.imshow(heat, vmin=0, vmax=1, cmap="viridis", origin="upper")
        ax.set_title(f"layer {layer}", fontsize=9)
        ax.set_xlabel("key block", fontsize=8)
        ax.set_ylabel("query block", fontsize=8)
    fig.colorbar(image, ax=fig.axes, shrink=0.8, label="share of the block's queries attending")
    fig.suptitle(f"MoBA selection, step {step} (first sampled head)")
    return write_file(stem.with_suffix(".png"), lambda f: fig.savefig(f, format="png", dpi=80))


def attention_inputs(module: MoBACoreAttention, args, kwargs):
    """(q [T, H, D], k [T, G, D], int32 cu_seqlens, the bound arguments) of one call of a MoBA core attention,
    as the attention receives them (`core_attention.to_thd`); for forward pre-hooks registered with_kwargs."""
    bound = inspect.signature(module.forward).bind(*args, **kwargs)
    q, k, _, cu_seqlens = to_thd(bound.arguments["query"], bound.arguments["key"], bound.arguments["value"],
                                 bound.arguments.get("packed_seq_params"))
    return q, k, cu_seqlens, bound


class RoutingDiagnostics:
    """The trainer's hook: `due(step)` says when, `run(step, batch)` measures (all ranks call it; rank 0,
    `enabled`, computes and returns the moba/ metrics, the others return {})."""

    def __init__(self, cfg: Config, model: torch.nn.Module, enabled: bool):
        self.cfg = cfg
        self.model = model
        self.enabled = enabled
        self.interval = cfg.logging.moba_diag_interval
        self.modules = {layer_index(name): module for name, module in model.named_modules()
                        if isinstance(module, MoBACoreAttention)}
        self.out_dir = Path(cfg.run.output_dir) / "diagnostics"

    def due(self, step: int) -> bool:
        return bool(self.interval and self.modules and step % self.interval == 0)

    @torch.no_grad()
    def run(self, step: int, batch: dict) -> dict[str, Value]:
        """One no-grad forward of `batch` (a micro-batch) with capture hooks; moba/ metrics (rank 0)."""
        started = time.perf_counter()
        att, log = self.cfg.attention, self.cfg.logging
        generator = torch.Generator().manual_seed(self.cfg.run.seed + step)
        results: dict[int, LayerRouting] = {}
        sampled: dict = {}

        def capture(layer: int, module: MoBACoreAttention, args, kwargs) -> None:
            q, k, cu_seqlens, bound = attention_inputs(module, args, kwargs)
            params = bound.arguments.get("packed_seq_params")
            if module.cp_group is not None:  # every CP rank sends its shard; rank 0 measures whole sequences
                host = host_offsets(bound.arguments["query"], params)
                lengths = [b - a for a, b in zip(host[:-1], host[1:])]
                q, k = (context_parallel.gather_sequences(x, lengths, module.cp_group) for x in (q, k))
            if not self.enabled:
                return
            if not sampled:  # the same queries and heads for every layer of this step
                bounds = cu_seqlens.tolist()
                sampled["bounds"] = bounds
                sampled["queries"] = sample_queries(bounds, module.block_size, module.topk, log.moba_diag_queries,
                                                    generator)
                sampled["kv_heads"] = sample_kv_heads(k.shape[1], log.moba_diag_kv_groups, generator)
            if not len(sampled["queries"]):
                return
            group = q.shape[1] // k.shape[1]
            kv_heads = sampled["kv_heads"]
            heads = [h * group + i for h in kv_heads for i in range(group)]
            longest = max(b - a for a, b in zip(sampled["bounds"][:-1], sampled["bounds"][1:]))
            results[layer] = layer_routing(
                q[:, heads], k[:, kv_heads], cu_seqlens, block_size=module.block_size, topk=module.topk,
                softmax_scale=module.softmax_scale, queries=sampled["queries"],
                num_blocks=math.ceil(longest / module.block_size), shared_gqa_selection=module.shared_gqa_selection,
            )

        handles = []
        if self.enabled or self.cfg.parallel.context > 1:
            for layer, module in self.modules.items():
                handles.append(module.register_forward_pre_hook(functools.partial(capture, layer), with_kwargs=True))
        self.model.eval()
        try:
            forward_step(self.model, batch)
        finally:
            self.model.train()
            for handle in handles:
                handle.remove()
        if not results:
            return {}
        metrics = routing_metrics(results, att.topk)
        png = save_heatmaps({layer: r.heatmap for layer, r in results.items()}, step, self.out_dir)
        metrics["moba/heatmap"] = Image(str(png))
        metrics["moba/time_s"] = time.perf_counter() - started
        return metrics
