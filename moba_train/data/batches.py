"""Micro-batches: stacking per-sample dicts and the `cu_seqlens` that tell attention where documents end.

A document ends after an EOD token: with EOD at position i of `tokens`, the next document starts at
i + 1 (Megatron's reset_position_ids / reset_attention_mask convention).
"""

from __future__ import annotations

import torch

BATCH_KEYS = ("tokens", "labels", "loss_mask", "position_ids")


def document_cu_seqlens(tokens_s: torch.Tensor, eod: int) -> torch.Tensor:
    """Document boundaries of one sample: int32 [n + 1], 0 = cu[0] < ... < cu[n] = s."""
    s = tokens_s.shape[0]
    starts = (torch.nonzero(tokens_s[:-1] == eod).flatten() + 1).to(torch.int32)
    return torch.cat([torch.zeros(1, dtype=torch.int32), starts, torch.tensor([s], dtype=torch.int32)])


def collate(samples: list[dict[str, torch.Tensor]], reset_attention_mask: bool) -> dict[str, torch.Tensor]:
    """Stack b samples into a micro-batch: tokens/labels/position_ids int64 [b, s], loss_mask float32 [b, s],
    cu_seqlens int32 [n + 1] over the flattened b*s tokens.

    With `reset_attention_mask` the boundaries are every sample's documents (each sample carries its own
    `cu_seqlens` [k + 1]); otherwise each sample is one sequence: 0, s, 2s, ..., b*s.
    """
    batch = {key: torch.stack([sample[key] for sample in samples]) for key in BATCH_KEYS}
    b, s = batch["tokens"].shape
    if reset_attention_mask:
        parts = [torch.zeros(1, dtype=torch.int32)]
        for i, sample in enumerate(samples):
            cu = sample["cu_seqlens"]
            assert cu[0] == 0 and cu[-1] == s, "a sample's cu_seqlens must span its s tokens"
            parts.append(cu[1:] + i * s)
        batch["cu_seqlens"] = torch.cat(parts).to(torch.int32)
    else:
        batch["cu_seqlens"] = torch.arange(0, (b + 1) * s, s, dtype=torch.int32)
    return batch
