import pytest
import torch
from megatron.core.datasets.gpt_dataset import _get_ltor_masks_and_position_ids

from moba_train.data.batches import collate, document_cu_seqlens

EOD = 0


def sample(tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    _, _, positions = _get_ltor_masks_and_position_ids(tokens, EOD, True, False, False, False)
    return {"tokens": tokens, "labels": tokens.roll(-1), "loss_mask": torch.ones(len(tokens)),
            "position_ids": positions, "cu_seqlens": document_cu_seqlens(tokens, EOD)}


def block_diagonal_causal(cu: torch.Tensor, total: int) -> torch.Tensor:
    seq = torch.repeat_interleave(torch.arange(len(cu) - 1), (cu[1:] - cu[:-1]).long())
    return (seq[:, None] == seq[None, :]) & torch.ones(total, total, dtype=torch.bool).tril()


@pytest.mark.parametrize("eod_positions", [[], [0], [5, 6, 20], [31], [3, 31], list(range(0, 32, 4))])
def test_document_boundaries_match_megatron_masks(eod_positions):
    tokens = torch.randint(1, 50, (32,))
    tokens[eod_positions] = EOD
    mask, _, _ = _get_ltor_masks_and_position_ids(tokens, EOD, True, True, False, True)
    cu = document_cu_seqlens(tokens, EOD)
    assert torch.equal(block_diagonal_causal(cu, 32), ~mask[0])  # Megatron: True = masked out


def test_collate_offsets_per_document_cu_seqlens_over_the_flattened_batch():
    a, b = torch.randint(1, 50, (16,)), torch.randint(1, 50, (16,))
    a[[3, 9]] = EOD
    b[15] = EOD
    batch = collate([sample(a), sample(b)], reset_attention_mask=True)
    assert batch["cu_seqlens"].tolist() == [0, 4, 10, 16, 32] and batch["cu_seqlens"].dtype == torch.int32
    for row, tokens in enumerate((a, b)):
        _, _, positions = _get_ltor_masks_and_position_ids(tokens, EOD, True, False, False, False)
        assert torch.equal(batch["position_ids"][row], positions)
    assert torch.equal(batch["tokens"], torch.stack([a, b]))


def test_collate_without_reset_gives_one_sequence_per_sample():
    a = torch.randint(1, 50, (16,))
    a[3] = EOD
    batch = collate([sample(a)] * 3, reset_attention_mask=False)
    assert batch["cu_seqlens"].tolist() == [0, 16, 32, 48]
    assert {k: tuple(v.shape) for k, v in batch.items() if k != "cu_seqlens"} == {
        k: (3, 16) for k in ("tokens", "labels", "loss_mask", "position_ids")}
