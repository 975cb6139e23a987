"""The varlen backend's grouping of queries by (head, selected block), and its split into FA2 calls
small enough for 32-bit row offsets. Pure bookkeeping: runs on CPU."""

import torch

from moba_train.attention import varlen
from moba_train.attention.torch_backend import BlockLayout, select_blocks


def _groups(hq=4, hkv=2, dim=32, lengths=(300, 170), block=16, topk=4):
    q = torch.randn(sum(lengths), hq, dim)
    k = torch.randn(sum(lengths), hkv, dim)
    bounds = [0, *torch.tensor(lengths).cumsum(0).tolist()]
    layout = BlockLayout.build(bounds, bounds, block, q.device)
    return varlen._PastGroups(select_blocks(q, k, layout, topk, False), layout, hkv)


def test_split_parts_partition_the_groups_in_order_and_respect_the_element_limit(monkeypatch):
    groups = _groups()
    dim, limit_rows = 32, 97
    monkeypatch.setattr(varlen, "MAX_CALL_ELEMENTS", limit_rows * dim)
    parts = groups.split(dim)
    assert len(parts) > 3
    assert torch.equal(torch.cat([p.rows for p in parts]), groups.rows)
    assert torch.equal(torch.cat([p.kv_rows for p in parts]), groups.kv_rows)
    counts = groups.cu_q.diff()
    offset = 0
    for part in parts:
        n_groups = part.kv_rows.numel()
        part_counts = counts[offset : offset + n_groups]
        assert part.num_rows == int(part_counts.sum())
        assert part.num_rows <= limit_rows or n_groups == 1  # a group is never split
        assert torch.equal(part.cu_q, torch.cat([torch.zeros(1, dtype=torch.int64), part_counts.cumsum(0)]).int())
        assert torch.equal(part.cu_k, torch.arange(n_groups + 1, dtype=torch.int32) * 16)
        assert part.max_q == int(part_counts.max())
        offset += n_groups
    assert offset == groups.kv_rows.numel()


def test_split_keeps_one_call_when_under_the_limit():
    groups = _groups()
    assert groups.split(32) == [groups]


def test_every_gathered_row_reads_the_kv_head_of_its_query_head_and_the_block_it_selected():
    # The FA2 `past` call gathers, for group (head h, block c), the padded key rows c * Hkv + kv(h) with
    # kv(h) = h // (Hq / Hkv) (what the CUDA tests check end to end; a wrong h % Hkv would pass on MHA).
    hq, hkv, block = 8, 2, 16
    q, k = torch.randn(300, hq, 16), torch.randn(300, hkv, 16)
    bounds = [0, 300]
    layout = BlockLayout.build(bounds, bounds, block, q.device)
    selection = select_blocks(q, k, layout, 4, False)
    groups = varlen._PastGroups(selection, layout, hkv)
    padded = layout.pad_blocks(k)  # [blocks * Hkv, block, D]
    group_of_row = torch.repeat_interleave(torch.arange(groups.kv_rows.numel()), groups.cu_q.diff().long())
    for r in range(0, groups.num_rows, 37):
        t, h = int(groups.token[r]), int(groups.head[r])
        kv_row = int(groups.kv_rows[group_of_row[r]])
        block_id, kv = divmod(kv_row, hkv)
        assert kv == h // (hq // hkv)
        assert block_id in selection[t, h].tolist() and block_id != int(layout.token_block[t])
        assert torch.equal(padded[kv_row], k[block_id * block:(block_id + 1) * block, kv])
