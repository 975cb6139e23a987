"""Block layout of a packed varlen batch: where every MoBA key block starts, and which block holds a token.

Blocks are `block_size` consecutive tokens restarting at each sequence start (the last block of a
sequence may be partial). Blocks are numbered globally over the batch, sequence by sequence, so a
sequence's local block c is global block `first[seq] + c`.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class BlockLayout(NamedTuple):
    """Global block tables (int32, on the tokens' device)."""

    start: torch.Tensor  # [NB] first token of the block
    length: torch.Tensor  # [NB] tokens in the block (block_size except a sequence's last block)
    local: torch.Tensor  # [NB] index of the block within its sequence
    first: torch.Tensor  # [NB] global index of local block 0 of the block's sequence
    num_blocks: int


def block_layout(cu_seqlens: torch.Tensor, block_size: int, total_tokens: int, device: torch.device) -> BlockLayout:
    """Block tables on `device` from cu_seqlens int32 [N+1]; one host sync (block and token counts)."""
    cu = cu_seqlens.to(device=device, dtype=torch.int64)
    lengths = cu[1:] - cu[:-1]
    blocks_per_seq = (lengths + block_size - 1) // block_size
    first_of_seq = torch.cumsum(blocks_per_seq, 0) - blocks_per_seq
    num_blocks, last = torch.stack([blocks_per_seq.sum(), cu[-1]]).tolist()
    if last != total_tokens:
        raise ValueError(f"cu_seqlens must end at the token count {total_tokens}; it ends at {last}.")
    seq = torch.repeat_interleave(torch.arange(len(lengths), device=cu.device), blocks_per_seq, output_size=num_blocks)
    local = torch.arange(num_blocks, device=cu.device) - first_of_seq[seq]
    start = cu[seq] + local * block_size
    length = torch.clamp(lengths[seq] - local * block_size, max=block_size)
    return BlockLayout(start.int(), length.int(), local.int(), first_of_seq[seq].int(), num_blocks)
