"""Training data: the synthetic recall task, Megatron indexed datasets, the embedded corpus, batches.

    build_datasets(cfg, env) -> (train, valid or None)   map-style; ds[i] -> dict of [s] tensors
    build_passkey_validation(cfg, env, valid) -> the in-training passkey check's documents, or None
    build_dataloader(dataset, cfg, env, consumed_samples[, num_workers]) -> iterator of micro-batches [b, s]
    collate(samples, reset_attention_mask) -> micro-batch with cu_seqlens
"""

from __future__ import annotations

from moba_train.data.batches import collate
from moba_train.data.sampler import build_dataloader
from moba_train.data.synthetic import SyntheticRecallDataset

__all__ = ["build_datasets", "build_dataloader", "build_passkey_validation", "collate", "SyntheticRecallDataset"]


def build_datasets(cfg, env):
    """(train, valid or None) for `cfg.data.kind`; sample i is a pure function of (cfg.run.seed, i)."""
    if cfg.data.kind == "indexed":
        from moba_train.data.indexed import build_indexed_datasets

        return build_indexed_datasets(cfg, env)
    syn = cfg.data.synthetic

    def split(index: int) -> SyntheticRecallDataset:
        return SyntheticRecallDataset(
            num_samples=syn.num_samples,
            seq_length=cfg.train.seq_length,
            vocab_size=cfg.model.vocab_size,
            num_facts=syn.num_facts,
            key_tokens=syn.key_tokens,
            value_tokens=syn.value_tokens,
            answers_only_loss=syn.loss == "answers",
            seed=cfg.run.seed,
            split=index,
            id_range=syn.id_range,
        )

    return split(0), split(1)


def build_passkey_validation(cfg, env, valid):
    """The in-training passkey check's documents over the validation split `valid` (`train.eval_passkey`
    prompts, rounded up to whole micro-batches on every data-parallel rank), or None when it is off."""
    if not cfg.train.eval_passkey:
        return None
    from moba_train.data.mix import PasskeyValidationDataset
    from moba_train.data.preprocess import DataError, load_tokenizer

    if valid is None:
        raise DataError("train.eval_passkey hides its keys in validation text and this recipe builds no validation "
                        "split; give data.split a validation share")
    per_pass = cfg.train.micro_batch_size * env.dp
    size = -(-cfg.train.eval_passkey // per_pass) * per_pass
    return PasskeyValidationDataset(valid, load_tokenizer(cfg.data.tokenizer), size=size, seed=cfg.run.seed,
                                    seq_length=cfg.train.seq_length)
