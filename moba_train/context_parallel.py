"""Context parallelism beneath the attention: each sequence split over the CP ranks, exact against one rank.

Sharding (Megatron's load-balanced layout). A sequence of L tokens (a sample, or with
`data.reset_attention_mask` a document, padded at its end to a multiple of 2 * CP) is cut into 2 * CP
chunks of c = L / (2 * CP) tokens; rank r keeps chunks r and 2 * CP - 1 - r, so every rank holds the
same amount of causal work and Megatron's RoPE for the thd format (which slices the same two chunks by
CP rank) applies. `shard_batch` does this for a whole micro-batch in one place: tokens, labels, loss
mask and positions alike; padding tokens carry no loss and come after every real token of their
document, so no real token attends or gates on them. Under CP every micro-batch runs in Megatron's thd
format with the padded document offsets as cu_seqlens, kept on the host (Megatron's thd RoPE reads
them to the host per layer; so would the attention).

Attention (`attention`), for MoBA and full layers alike, through the attention API's suffix-of-keys
contract (queries at the end of their keys: cu_seqlens_q, cu_seqlens_k):
- `all_gather` (default): all-gather K and V over the CP group (backward: reduce-scatter their
  gradients); each local chunk attends its causal prefix of the gathered keys as one varlen sequence.
  Works for any KV-head count; per layer and rank it sends 2 (CP - 1) c_local K/V bytes forward and the
  same backward (c_local = this rank's tokens x Hkv x D x element size).
- `a2a` (head-parallel, Ulysses-style): all-to-all from sequence-sharded to head-sharded q, k, v, the
  attention over whole sequences for Hq / CP query and Hkv / CP KV heads, all-to-all back. Needs the
  KV heads per tensor-parallel rank divisible by CP. Sends (CP - 1) / CP of q, k, v and of the output
  forward, the same of their gradients backward.
Byte counts are recorded per call (`comm_bytes`) and equal `bytes_per_layer` (docs/context_parallel.md
derives both and compares the designs, including ones not implemented here).

The CP group comes from the caller (Megatron's process-group collection); nothing here reads globals.
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

COMM_DESIGNS = ("all_gather", "a2a")
PAD_TOKEN = 0
"""Token and label id of the padding that makes every sequence a multiple of 2 * CP (its loss mask is 0)."""

_BYTES: Counter = Counter()  # (design, "forward" | "backward") -> bytes this rank sent


def comm_bytes() -> dict:
    """Bytes this process sent through the CP collectives since the last reset, by (design, pass)."""
    return dict(_BYTES)


def reset_comm_bytes() -> None:
    _BYTES.clear()


def bytes_per_layer(design: str, local_tokens: int, cp: int, q_heads: int, kv_heads: int, head_dim: int,
                    element_size: int) -> dict:
    """Closed form of what one attention layer makes each rank send, forward and backward (heads are per
    tensor-parallel rank; local_tokens = this rank's tokens of the micro-batch)."""
    kv = 2 * local_tokens * kv_heads * head_dim * element_size  # this rank's K and V
    if design == "all_gather":  # ring all-gather of K, V; ring reduce-scatter of their gradients
        return {"forward": (cp - 1) * kv, "backward": (cp - 1) * kv}
    if design == "a2a":  # q, k, v out and the output back; their gradients the other way
        qkvo = 2 * local_tokens * q_heads * head_dim * element_size + kv
        return {"forward": (cp - 1) * qkvo // cp, "backward": (cp - 1) * qkvo // cp}
    raise ValueError(f"unknown context-parallel design {design!r}; use one of {', '.join(COMM_DESIGNS)}")


# --- batch sharding ---------------------------------------------------------------------------------


def padded_lengths(lengths: Sequence[int], cp: int) -> list[int]:
    """Each sequence length rounded up to a multiple of 2 * cp."""
    unit = 2 * cp
    return [-(-n // unit) * unit for n in lengths]


def chunk_order(lengths: Sequence[int], cp: int, rank: int) -> torch.Tensor:
    """int64 indices into the concatenated sequences (of `lengths`, each a multiple of 2 * cp) of this rank's
    tokens, in its local order: per sequence, chunk `rank` then chunk 2 * cp - 1 - rank."""
    parts, start = [], 0
    for n in lengths:
        c = n // (2 * cp)
        for chunk in (rank, 2 * cp - 1 - rank):
            parts.append(torch.arange(start + chunk * c, start + (chunk + 1) * c))
        start += n
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64)


def shard_batch(batch: dict, cp: int, rank: int) -> dict:
    """This CP rank's part of a micro-batch (see the module doc). In: tokens/labels/position_ids int64 and
    loss_mask float [b, s], cu_seqlens int32 [n + 1] over the b * s tokens (per sample, or per document).
    Out: the same keys as [1, t] with t = sum(padded lengths) / cp, and cu_seqlens = the padded sequences'
    offsets over the whole (unsplit) batch, int32 on the CPU, as Megatron's thd RoPE takes them."""
    cu = batch["cu_seqlens"].cpu().tolist()
    lengths = [b - a for a, b in zip(cu[:-1], cu[1:])]
    padded = padded_lengths(lengths, cp)
    source = []  # for every padded position: its flat token index, or -1 for padding
    for a, n, m in zip(cu[:-1], lengths, padded):
        source.append(torch.arange(a, a + n))
        source.append(torch.full((m - n,), -1, dtype=torch.int64))
    source = torch.cat(source)[chunk_order(padded, cp, rank)]
    real = source >= 0
    index = source.clamp(min=0)
    out = {}
    for key, fill in (("tokens", PAD_TOKEN), ("labels", PAD_TOKEN), ("loss_mask", 0)):
        flat = batch[key].reshape(-1)[index]
        out[key] = torch.where(real, flat, torch.full_like(flat, fill))[None]
    # Positions continue past the end of a document into its padding (unused by RoPE, kept consistent).
    positions = torch.cat([torch.arange(m) for m in padded]) if padded else torch.zeros(0, dtype=torch.int64)
    out["position_ids"] = positions[chunk_order(padded, cp, rank)][None]
    out["cu_seqlens"] = torch.tensor([0, *padded], dtype=torch.int32).cumsum(0, dtype=torch.int32)
    return out


# --- collectives with their backward ----------------------------------------------------------------

_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


class _AllGather(torch.autograd.Function):
    """[t, ...] on each rank -> [cp * t, ...] rank-major; backward: reduce-scatter (sum) of the gradient."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        cp = dist.get_world_size(group)
        out = x.new_empty(cp * x.shape[0], *x.shape[1:])
        _all_gather(out, x.contiguous(), group=group)
        _BYTES["all_gather", "forward"] += (cp - 1) * x.numel() * x.element_size()
        return out

    @staticmethod
    def backward(ctx, grad):
        cp = dist.get_world_size(ctx.group)
        out = grad.new_empty(grad.shape[0] // cp, *grad.shape[1:])
        _reduce_scatter(out, grad.contiguous(), group=ctx.group)
        _BYTES["all_gather", "backward"] += (cp - 1) * out.numel() * out.element_size()
        return out, None


def _all_to_all(x: torch.Tensor, group, direction: str) -> torch.Tensor:
    """all_to_all over dim 0 of x [cp, ...]: block j goes to rank j, block j of the result came from rank j."""
    x = x.contiguous()
    out = torch.empty_like(x)
    dist.all_to_all_single(out, x, group=group)
    cp = x.shape[0]
    _BYTES["a2a", direction] += (cp - 1) * x.numel() * x.element_size() // cp
    return out


class _HeadsToTokens(torch.autograd.Function):
    """Sequence-sharded [t, H, D] -> head-sharded [cp * t, H / cp, D] (tokens rank-major); backward inverse."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        cp = dist.get_world_size(group)
        t, heads, dim = x.shape
        blocks = x.view(t, cp, heads // cp, dim).transpose(0, 1)  # [cp (head group), t, H / cp, D]
        return _all_to_all(blocks, group, "forward").view(cp * t, heads // cp, dim)

    @staticmethod
    def backward(ctx, grad):
        return _TokensToHeads.apply(grad, ctx.group, "backward"), None


class _TokensToHeads(torch.autograd.Function):
    """Head-sharded [cp * t, H / cp, D] -> sequence-sharded [t, H, D]; backward inverse."""

    @staticmethod
    def forward(ctx, x, group, direction="forward"):
        ctx.group = group
        cp = dist.get_world_size(group)
        tokens, heads, dim = x.shape
        back = _all_to_all(x.view(cp, tokens // cp, heads, dim), group, direction)  # [cp (head group), t, ...]
        return back.transpose(0, 1).reshape(tokens // cp, cp * heads, dim)

    @staticmethod
    def backward(ctx, grad):
        cp = dist.get_world_size(ctx.group)
        t, heads, dim = grad.shape
        blocks = grad.reshape(t, cp, heads // cp, dim).transpose(0, 1)
        return _all_to_all(blocks, ctx.group, "backward").view(cp * t, heads // cp, dim), None, None


# --- the attention under CP ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    """Where this rank's tokens sit for one micro-batch (device tensors; host offsets as lists).

    all_gather: queries are this rank's 2 chunks of every sequence, keys their causal prefixes gathered
    from the rank-major all-gathered K/V through `key_index`. a2a: `natural` orders the rank-major
    gathered tokens back into whole sequences (`offsets`)."""

    cu_q: torch.Tensor  # int32 [2n + 1]: this rank's chunks as query sequences
    cu_k: torch.Tensor  # int32 [2n + 1]: their key prefixes
    host_q: list[int]
    host_k: list[int]
    key_index: torch.Tensor  # int64: rows of the gathered [cp * t] keys, prefix after prefix
    natural: torch.Tensor  # int64 [cp * t]: gathered row of every token of the whole sequences, in order
    restore: torch.Tensor  # int64 [cp * t]: inverse of `natural`
    offsets: torch.Tensor  # int32 [n + 1]: the whole (padded) sequences
    host_offsets: list[int]


@functools.lru_cache(maxsize=32)
def layout(lengths: tuple[int, ...], cp: int, rank: int, device: torch.device) -> Layout:
    """The Layout of sequences of these padded lengths (each a multiple of 2 * cp) on rank `rank`; cached
    (every layer of a step asks for the same one)."""
    local = sum(lengths) // cp
    host_q, host_k, key_rows = [0], [0], []
    # Rank-major row of every position of the whole sequences: position p of a sequence lies in chunk
    # j = p // c, owned by rank j (first local half) or 2cp - 1 - j (second half).
    natural, base = [], 0
    for n in lengths:
        if n == 0:
            continue
        c = n // (2 * cp)
        chunk = torch.arange(n) // c
        owner = torch.where(chunk < cp, chunk, 2 * cp - 1 - chunk)
        within = torch.arange(n) % c + torch.where(chunk < cp, 0, c)
        rows = owner * local + base + within
        natural.append(rows)
        for j in (rank, 2 * cp - 1 - rank):
            host_q.append(host_q[-1] + c)
            host_k.append(host_k[-1] + (j + 1) * c)
            key_rows.append(rows[: (j + 1) * c])
        base += 2 * c
    natural = torch.cat(natural) if natural else torch.zeros(0, dtype=torch.int64)
    offsets = [0]
    for n in lengths:
        offsets.append(offsets[-1] + n)
    as_int32 = functools.partial(torch.tensor, dtype=torch.int32, device=device)
    return Layout(
        cu_q=as_int32(host_q), cu_k=as_int32(host_k), host_q=host_q, host_k=host_k,
        key_index=(torch.cat(key_rows) if key_rows else torch.zeros(0, dtype=torch.int64)).to(device),
        natural=natural.to(device), restore=torch.argsort(natural).to(device),
        offsets=as_int32(offsets), host_offsets=offsets,
    )


@torch.no_grad()
def gather_sequences(x: torch.Tensor, lengths: Sequence[int], group) -> torch.Tensor:
    """This rank's tokens [t, ...] (local order of `shard_batch`) -> the whole padded sequences [cp * t, ...]
    in order, on every rank of `group` (no gradient: for measurements such as the routing diagnostics)."""
    cp, rank = dist.get_world_size(group), dist.get_rank(group)
    gathered = x.new_empty(cp * x.shape[0], *x.shape[1:])
    _all_gather(gathered, x.contiguous(), group=group)
    return gathered[layout(tuple(lengths), cp, rank, x.device).natural]


Attend = Callable[..., torch.Tensor]
"""attend(q, k, v, cu_seqlens_q=, cu_seqlens_k=, host_cu_seqlens=) -> out: MoBA or full causal attention."""


def attention(q, k, v, lengths: Sequence[int], attend: Attend, design: str, group) -> torch.Tensor:
    """Causal attention of this rank's tokens q [t, Hq, D], k, v [t, Hkv, D] (local order of `shard_batch`)
    over whole sequences of the padded `lengths` split over `group`; returns [t, Hq, D]."""
    cp, rank = dist.get_world_size(group), dist.get_rank(group)
    lay = layout(tuple(lengths), cp, rank, q.device)
    if design == "all_gather":
        k_seq = _AllGather.apply(k, group)[lay.key_index]
        v_seq = _AllGather.apply(v, group)[lay.key_index]
        return attend(q, k_seq, v_seq, cu_seqlens_q=lay.cu_q, cu_seqlens_k=lay.cu_k,
                      host_cu_seqlens=(lay.host_q, lay.host_k))
    if design == "a2a":
        q_h, k_h, v_h = (_HeadsToTokens.apply(x, group)[lay.natural] for x in (q, k, v))
        out = attend(q_h, k_h, v_h, cu_seqlens_q=lay.offsets, cu_seqlens_k=lay.offsets,
                     host_cu_seqlens=(lay.host_offsets, lay.host_offsets))
        return _TokensToHeads.apply(out[lay.restore], group)
    raise ValueError(f"unknown context-parallel design {design!r}; use one of {', '.join(COMM_DESIGNS)}")
