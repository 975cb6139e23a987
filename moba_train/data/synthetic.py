"""Synthetic long-context recall: key->value facts planted at random depths in filler, queried at the end.

One sample is one document of `seq_length + 1` tokens (tokens = doc[:-1], labels = doc[1:]):

    filler ... FACT k_1 .. k_K v_1 .. v_V  filler ... FACT (another fact) ... filler ...
    QUERY k_1 .. k_K v_1 .. v_V   QUERY ... (every fact once, in random order)   EOD

Token ids (vocab V = model.vocab_size, ids >= 3 split in three equal ranges):
    EOD = 0, FACT = 1, QUERY = 2
    filler: [3, 3 + n)           a counting pattern: each filler token is the previous one + 1 (mod n),
                                  from a random start; it continues across the facts that interrupt it
    keys:   [3 + n, 3 + 2n)      random; the first key token differs between the facts of a document
    values: [3 + 2n, 3 + 3n)     random
with n = (V - 3) // 3, or `id_range` (data.synthetic.id_range) where given. On a real tokenizer's
vocabulary a small range keeps the ids among its first, most frequent ones (a byte-level BPE starts
with the bytes): a model that learned to copy text copies ids it has seen often, and does not learn
to copy ids drawn from a third of a 32K vocabulary, most of them rare (docs/quality.md).

Predicting the value tokens after a QUERY needs attention to the one distant place where that key was
planted: with MoBA, to the right block. The filler is learnable from the previous token alone, so a
tiny model's full LM loss falls visibly within a minute; the remaining loss is the random fact
contents (unpredictable where planted) and the recalled values (predictable only by retrieval).
`data.synthetic.loss: answers` puts the loss on the recalled value tokens only.

Sample i is a pure function of (seed, split, i): no state, any order, any worker.
"""

from __future__ import annotations

import numpy as np
import torch

EOD, FACT, QUERY = 0, 1, 2
FIRST_ORDINARY_ID = 3


class SyntheticRecallDataset(torch.utils.data.Dataset):
    """Map-style dataset: `ds[i]` -> tokens/labels/position_ids int64 [s], loss_mask float32 [s],
    cu_seqlens int32 [2] (one document per sample)."""

    def __init__(
        self,
        *,
        num_samples: int,
        seq_length: int,
        vocab_size: int,
        num_facts: int,
        key_tokens: int,
        value_tokens: int,
        answers_only_loss: bool,
        seed: int,
        split: int,
        id_range: int | None = None,
    ):
        n = (vocab_size - FIRST_ORDINARY_ID) // 3
        if id_range is not None:
            if id_range > n:
                raise ValueError(
                    f"data.synthetic.id_range ({id_range}) does not fit three times in model.vocab_size "
                    f"({vocab_size}) after {FIRST_ORDINARY_ID} special ids; use at most {n}"
                )
            n = id_range
        if n < num_facts:
            raise ValueError(
                f"model.vocab_size ({vocab_size}) or data.synthetic.id_range ({n} ids per range) is too small "
                f"for {num_facts} distinct synthetic facts; use at least {num_facts} ids per range or fewer facts"
            )
        fact_len = 1 + key_tokens + value_tokens
        needed = 2 * num_facts * fact_len + 2
        if seq_length + 1 < needed:
            raise ValueError(
                f"train.seq_length ({seq_length}) cannot hold {num_facts} synthetic facts and their queries "
                f"({needed - 1} tokens); raise the sequence length or lower data.synthetic.num_facts"
            )
        self.num_samples = num_samples
        self.seq_length = seq_length
        self.num_facts = num_facts
        self.key_tokens = key_tokens
        self.value_tokens = value_tokens
        self.answers_only_loss = answers_only_loss
        self.seed = seed
        self.split = split
        self.filler_lo, self.key_lo, self.value_lo = FIRST_ORDINARY_ID, FIRST_ORDINARY_ID + n, FIRST_ORDINARY_ID + 2 * n
        self.range_size = n

    def __len__(self) -> int:
        return self.num_samples

    def document(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """The raw document (int64 [s + 1]) and a bool [s + 1] marking the recalled value tokens."""
        rng = np.random.default_rng([self.seed, self.split, index])
        n, nf, kt, vt = self.range_size, self.num_facts, self.key_tokens, self.value_tokens
        fact_len = 1 + kt + vt
        length = self.seq_length + 1

        first_keys = rng.choice(n, size=nf, replace=False)
        keys = np.concatenate([first_keys[:, None], rng.integers(0, n, size=(nf, kt - 1))], axis=1) + self.key_lo
        values = rng.integers(0, n, size=(nf, vt)) + self.value_lo
        facts = np.concatenate([np.full((nf, 1), FACT), keys, values], axis=1)  # [nf, fact_len]
        queries = np.concatenate([np.full((nf, 1), QUERY), keys, values], axis=1)[rng.permutation(nf)]

        body_len = length - nf * fact_len - 1  # everything before the queries and EOD
        filler_len = body_len - nf * fact_len
        # Fact j goes after depths[j] filler tokens (sorted, so facts never overlap).
        depths = np.sort(rng.integers(0, filler_len + 1, size=nf))
        filler = self.filler_lo + (rng.integers(0, n) + np.arange(filler_len)) % n

        doc = np.empty(length, dtype=np.int64)
        is_answer = np.zeros(length, dtype=bool)
        pos = prev = 0
        for depth, fact in zip(depths, facts):
            doc[pos : pos + depth - prev] = filler[prev:depth]
            pos += depth - prev
            doc[pos : pos + fact_len] = fact
            pos, prev = pos + fact_len, depth
        doc[pos : pos + filler_len - prev] = filler[prev:]
        pos += filler_len - prev
        assert pos == body_len
        for query in queries:
            doc[pos : pos + fact_len] = query
            is_answer[pos + 1 + kt : pos + fact_len] = True
            pos += fact_len
        doc[pos] = EOD
        assert pos == length - 1
        return doc, is_answer

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not 0 <= index < self.num_samples:
            raise IndexError(index)
        doc, is_answer = self.document(index)
        s = self.seq_length
        loss_mask = is_answer[1:] if self.answers_only_loss else np.ones(s, dtype=bool)
        return {
            "tokens": torch.from_numpy(doc[:-1].copy()),
            "labels": torch.from_numpy(doc[1:].copy()),
            "loss_mask": torch.from_numpy(loss_mask.astype(np.float32)),
            "position_ids": torch.arange(s, dtype=torch.int64),
            "cu_seqlens": torch.tensor([0, s], dtype=torch.int32),
        }
