"""Retrieval tasks mixed into text pretraining (`data.passkey_mix`, `data.recall_mix`, `data.copy_mix`).

A model of a hundred million parameters trained from scratch on tens of millions of tokens of text
retrieves nothing: induction over thousands of tokens forms later than that. A study that asks whether
an attention plan (MoBA's block selection) learns retrieval as well as full attention needs training
data that asks for it. `TaskMixDataset` replaces a share of a training split's samples by documents of
the same length that do:

- passkey documents (moba_train.data.passkey): the sample's own text as the haystack, a five-digit key
  stated at a random depth in the evaluation's format, the question and the key at the end. A few
  answer tokens per document: a weak signal.
- recall documents (moba_train.data.synthetic, the recipe's `data.synthetic` settings): facts planted
  in a counting filler, every fact queried at the end: tens of recalled tokens per document for the
  same skill (find the key, copy what followed it). With the loss on every token they are still a
  small share of the gradient (docs/quality.md measured it: no retrieval at the study's budget).
- copy documents: the start of the sample's own text repeated to the end of the sample, the loss on
  the repeats (every token after the first period). They teach the copy mechanism itself (find where the
  current token was before, predict what followed it), which passkey and recall answers need and text of
  this size teaches late. The period is log-uniform from COPY_MIN_PERIOD to half the sample, so the copy
  reaches back anywhere from a few tokens to thousands (with MoBA, the gate must pick the right block).
  The copied tokens are text, not random ids: copying a token means mapping its embedding to its own
  output row, which the model learns for the ids it sees often. With ids drawn uniformly from a 32K
  vocabulary, most of them rare, nothing learned to copy (docs/quality.md: a 2-layer model on CPU
  stayed at a uniform guess for 700 steps, and so did the 126M study model on the GPU after 1,040),
  where the same 2-layer model copying its text got 41% of the repeated tokens right after 1,000 steps
  (8% where it first read them).

One uniform draw per sample from (seed, index) decides: below passkey_mix a passkey document, then up to
passkey_mix + recall_mix a recall document, then up to + copy_mix a copy document, else the text sample
as it is. Sample i stays a pure function of (seed, i), whatever the order and the worker."""

from __future__ import annotations

import numpy as np
import torch

from moba_train.data.passkey import PasskeyTask, filler_length, place_needle
from moba_train.data.preprocess import DataError
from moba_train.data.synthetic import SyntheticRecallDataset

PASSKEY_MIX_STREAM = 0x9A55
"""Seeds the mix's draws apart from the evaluation's prompts and the data order."""
RECALL_MIX_STREAM = 0x9A56
"""The recall documents' `split` seed: apart from the synthetic task's own train (0) and valid (1) splits."""
COPY_MIX_STREAM = 0x9A57
"""Seeds the copy documents' periods and tokens."""
COPY_MIN_PERIOD = 16
PASSKEY_EVAL_STREAM = 0x9A58
"""Seeds the keys of the in-training passkey check (`PasskeyValidationDataset`)."""
PASSKEY_EVAL_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
"""Needle depths of the in-training passkey check, in turn."""


def copy_document(text: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, int]:
    """A copy document as long as `text` and its period: the first `period` tokens of `text` tiled, so
    token j >= period repeats token j - period. The period is log-uniform from COPY_MIN_PERIOD to half the
    length. Training's copy documents (`TaskMixDataset`: the sample's own text) and the evaluation's
    (moba_train.evaluation.copy_accuracy: held-out text) come from here."""
    length = len(text)
    top = max(COPY_MIN_PERIOD, length // 2)
    period = int(np.exp(rng.uniform(np.log(COPY_MIN_PERIOD), np.log(top + 1))))
    period = min(max(period, COPY_MIN_PERIOD), top)
    return np.resize(text[:period], length), period


class TaskMixDataset(torch.utils.data.Dataset):
    """`base` (a training split whose samples are dicts of [s] tensors: tokens, labels, loss_mask,
    position_ids, cu_seqlens) with the drawn samples replaced by retrieval documents of s + 1 tokens, one
    document each (positions 0..s-1, cu_seqlens [0, s]).

    Passkey documents carry the loss on every token (EOD labels masked if `eod_mask_loss`; the haystack's
    EOD tokens stay in it, as in the evaluation's prompts). Recall documents carry the loss that
    `synthetic.loss` names (all tokens or the recalled values), over token ids below `vocab_size` (the
    model's, as the evaluation's recall documents: moba_train.evaluation.recall_dataset). Copy documents
    (the sample's own text, its first period tiled) carry the loss on their repeats."""

    def __init__(self, base, tokenizer, *, passkey: float, recall: float, synthetic, seed: int, eod: int,
                 eod_mask_loss: bool, seq_length: int, vocab_size: int, copy: float = 0.0):
        self.base, self.passkey, self.recall, self.copy, self.seed = base, passkey, recall, copy, seed
        self.vocab_size = vocab_size
        self.eod, self.eod_mask_loss = eod, eod_mask_loss
        self.task = PasskeyTask(tokenizer, haystack=np.empty(0, dtype=np.int64), seed=seed)
        if passkey:
            filler = filler_length(self.task.needle(10**self.task.digits - 1), self.task.question, seq_length)
            if filler < 0:
                raise DataError(f"train.seq_length ({seq_length}) cannot hold a passkey needle and question "
                                f"({seq_length - filler} tokens); set data.passkey_mix to 0 or train on longer "
                                f"sequences")
        self.recall_docs = None
        if recall:
            try:
                self.recall_docs = SyntheticRecallDataset(
                    num_samples=len(base), seq_length=seq_length, vocab_size=vocab_size,
                    num_facts=synthetic.num_facts, key_tokens=synthetic.key_tokens,
                    value_tokens=synthetic.value_tokens, answers_only_loss=synthetic.loss == "answers",
                    seed=seed, split=RECALL_MIX_STREAM, id_range=synthetic.id_range)
            except ValueError as e:
                raise DataError(f"data.recall_mix: {e}") from None

    def __len__(self) -> int:
        return len(self.base)

    def _draw(self, index: int) -> tuple[str, int, float] | None:
        """("passkey", key, depth), ("recall", 0, 0.0), ("copy", 0, 0.0) or None (text) for sample `index`: one
        draw."""
        rng = np.random.default_rng([self.seed, PASSKEY_MIX_STREAM, index])
        u = rng.random()
        if u < self.passkey:
            return "passkey", self.task.random_key(rng), float(rng.random())
        if u < self.passkey + self.recall:
            return "recall", 0, 0.0
        if u < self.passkey + self.recall + self.copy:
            return "copy", 0, 0.0
        return None

    def passkey_at(self, index: int) -> tuple[int, float] | None:
        """(key, depth) of sample `index` if it is a passkey document, else None."""
        drawn = self._draw(index)
        return drawn[1:] if drawn and drawn[0] == "passkey" else None

    def _kind(self, index: int) -> str | None:
        drawn = self._draw(index)
        return drawn and drawn[0]

    def is_recall(self, index: int) -> bool:
        return self._kind(index) == "recall"

    def is_copy(self, index: int) -> bool:
        return self._kind(index) == "copy"

    def copy_document(self, index: int, text: np.ndarray) -> tuple[np.ndarray, int]:
        """Sample `index`'s copy document of its own `text` and its period (`copy_document`)."""
        return copy_document(text, np.random.default_rng([self.seed, COPY_MIX_STREAM, index]))

    def __getitem__(self, index: int) -> dict:
        sample = self.base[index]
        drawn = self._draw(index)
        if drawn is None:
            return sample
        s = sample["tokens"].shape[0]
        if drawn[0] == "passkey":
            document = passkey_document(self.task, sample, *drawn[1:])
            loss_mask = torch.ones(s, dtype=sample["loss_mask"].dtype)
            if self.eod_mask_loss:
                loss_mask[document[1:] == self.eod] = 0
        elif drawn[0] == "copy":
            text = torch.cat([sample["tokens"], sample["labels"][-1:]]).numpy()
            tiled, period = self.copy_document(index, text)
            document = torch.from_numpy(tiled)
            loss_mask = torch.zeros(s, dtype=sample["loss_mask"].dtype)
            loss_mask[period - 1:] = 1  # label j is document[j + 1]: a repeat from j = period - 1 on
        else:
            recall = self.recall_docs[index]
            document = torch.cat([recall["tokens"], recall["labels"][-1:]])
            loss_mask = recall["loss_mask"].to(sample["loss_mask"].dtype)
        return as_sample(sample, document, loss_mask)


def as_sample(sample: dict, document: torch.Tensor, loss_mask: torch.Tensor) -> dict:
    """`sample` (of s tokens) replaced by one `document` of s + 1 tokens with `loss_mask` on its labels:
    positions 0..s-1, cu_seqlens [0, s], the sample's dtypes."""
    s = sample["tokens"].shape[0]
    return {**sample, "tokens": document[:-1].to(sample["tokens"].dtype),
            "labels": document[1:].to(sample["labels"].dtype), "loss_mask": loss_mask,
            "position_ids": torch.arange(s, dtype=sample["position_ids"].dtype),
            "cu_seqlens": torch.tensor([0, s], dtype=torch.int32)}


def passkey_document(task: PasskeyTask, sample: dict, key: int, depth: float) -> torch.Tensor:
    """s + 1 tokens for a sample of s: the prompt over the sample's own text, then the key's tokens (the last
    labels of the sample made of it)."""
    s = sample["tokens"].shape[0]
    haystack = np.concatenate([sample["tokens"].numpy(), sample["labels"][-1:].numpy()]).astype(np.int64)
    prompt = place_needle(haystack, task.needle(key), task.question, s, depth)
    return torch.from_numpy(np.concatenate([prompt.tokens, prompt.answer]))


class PasskeyValidationDataset(torch.utils.data.Dataset):
    """`size` passkey documents for the in-training retrieval check (`train.eval_passkey`): document i hides a
    key drawn from (seed, i) at depth PASSKEY_EVAL_DEPTHS[i % 5] in the text of held-out sample i (`base`, the
    validation split, read in turn from its start), with the loss on the key's tokens only: what the model puts
    on the answer after the question, as one document of s + 1 tokens (positions 0..s-1, cu_seqlens [0, s])."""

    def __init__(self, base, tokenizer, *, size: int, seed: int, seq_length: int):
        if len(base) == 0:
            raise DataError("train.eval_passkey hides its keys in validation text, and the validation split is "
                            "empty; give data.split a validation share")
        self.base, self.size, self.seed = base, size, seed
        self.task = PasskeyTask(tokenizer, haystack=np.empty(0, dtype=np.int64), seed=seed)
        filler = filler_length(self.task.needle(10**self.task.digits - 1), self.task.question, seq_length)
        if filler < 0:
            raise DataError(f"train.seq_length ({seq_length}) cannot hold a passkey needle and question "
                            f"({seq_length - filler} tokens); set train.eval_passkey to 0 or train on longer "
                            "sequences")

    def __len__(self) -> int:
        return self.size

    def key_at(self, index: int) -> tuple[int, float]:
        """(key, depth) of document `index`."""
        rng = np.random.default_rng([self.seed, PASSKEY_EVAL_STREAM, index])
        return self.task.random_key(rng), PASSKEY_EVAL_DEPTHS[index % len(PASSKEY_EVAL_DEPTHS)]

    def __getitem__(self, index: int) -> dict:
        sample = self.base[index % len(self.base)]
        key, depth = self.key_at(index)
        document = passkey_document(self.task, sample, key, depth)
        s = sample["tokens"].shape[0]
        loss_mask = torch.zeros(s, dtype=sample["loss_mask"].dtype)
        loss_mask[s - len(self.task.needle(key)[1]):] = 1  # label j is document[j + 1]: the key ends it
        return as_sample(sample, document, loss_mask)
