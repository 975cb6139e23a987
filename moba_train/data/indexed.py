"""Training input from Megatron-Core indexed datasets: `BlendedMegatronDatasetBuilder` + `GPTDataset`.

`data.blend` names `<prefix>.bin/.idx` pairs written by scripts/preprocess_data.py or
scripts/build_corpus.py, with optional weights. Documents are concatenated (packed) into sequences of
`train.seq_length` tokens, shuffled deterministically from `run.seed`; Megatron-Core caches the sample
indices under `data.cache_dir` (default `<run.output_dir>/data_cache`). With torch.distributed
initialised, rank 0 builds the caches first and the other ranks read them after a barrier, so every
rank must call `build_indexed_datasets`.

`data.min_doc_length > 0` keeps only documents of at least that many tokens (long-context recipes);
0 packs every document. Samples gain per-document `cu_seqlens` from their EOD tokens instead of
Megatron's dense attention mask. `data.passkey_mix`, `data.recall_mix` and `data.copy_mix` make those
shares of the training samples retrieval documents (moba_train.data.mix); validation samples stay text.
"""

from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from megatron.core.datasets import blended_dataset, gpt_dataset
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
from megatron.core.datasets.indexed_dataset import _IndexReader

from moba_train.data.batches import document_cu_seqlens
from moba_train.data.preprocess import DataError, eod_id, load_tokenizer
from moba_train.staging import write_file


def parse_blend(blend: list[str]) -> tuple[list[str], list[float] | None]:
    """["0.7 data/a", "0.3 data/b"] -> (prefixes, weights); bare prefixes (all of them) -> weights None."""
    prefixes, weights = [], []
    for entry in blend:
        parts = entry.split()
        if len(parts) == 1:
            prefixes.append(parts[0])
            continue
        try:
            weight = float(parts[0])
        except (ValueError, IndexError):  # not a number, or an empty entry
            weight = None
        if len(parts) != 2 or weight is None or not weight > 0 or not np.isfinite(weight):
            raise DataError(f"data.blend entry '{entry}' is not 'WEIGHT PREFIX' with a positive weight; "
                            "write e.g. '0.7 data/corpus/python'")
        weights.append(weight)
        prefixes.append(parts[1])
    if weights and len(weights) != len(prefixes):
        raise DataError("data.blend mixes weighted and bare prefixes; give every entry a weight or none")
    return prefixes, weights or None


def check_split(split: str) -> None:
    """Raise DataError unless `split` is 1-3 comma-separated non-negative numbers with a positive sum."""
    try:
        shares = [float(x) for x in split.split(",")]
    except ValueError:
        shares = []
    if not 1 <= len(shares) <= 3 or min(shares) < 0 or sum(shares) <= 0:
        raise DataError(f"data.split '{split}' is not train,valid,test shares; write e.g. '98,2,0'")


def check_indexed_dataset(prefix: str, vocab_size: int | None = None, tokenizer: str | None = None) -> int:
    """The dataset's token count. Raise DataError unless `<prefix>.idx` reads, `<prefix>.bin` has exactly the bytes
    it indexes and, given the `vocab_size` of `tokenizer`, every token id is in [0, vocab_size): one pass over the
    memory-mapped tokens at disk speed, so that data built with another tokenizer fails here and not steps into
    training."""
    idx, bin_ = Path(f"{prefix}.idx"), Path(f"{prefix}.bin")
    if not idx.is_file() or not bin_.is_file():
        raise DataError(f"indexed dataset '{prefix}' is missing ({idx.name} and {bin_.name} must both exist); "
                        "build it with scripts/preprocess_data.py, or `make data` for the embedded corpus")
    try:
        index = _IndexReader(str(idx), multimodal=False)
        count = index.sequence_count
        lengths, pointers = index.sequence_lengths, index.sequence_pointers
        ok = len(lengths) == count and len(pointers) == count and count > 0
        expected = int(pointers[-1]) + int(lengths[-1]) * index.dtype_size if ok else -1
        tokens = int(lengths.sum()) if ok else 0  # before `del index`, which closes the map its arrays view
        dtype = index.dtype
        del index
    except Exception:  # a truncated or foreign .idx fails in numpy/struct with various errors
        ok = False
    if not ok:
        raise DataError(f"'{idx}' is truncated or not a Megatron index; rebuild the dataset with --overwrite")
    if bin_.stat().st_size != expected:
        raise DataError(f"'{bin_}' has {bin_.stat().st_size} bytes but its index expects {expected}; "
                        "the .bin/.idx pair is truncated or mismatched, rebuild it with --overwrite")
    if expected == 0:
        raise DataError(f"indexed dataset '{prefix}' holds {count} documents and no tokens; rebuild it from "
                        "non-empty text or drop it")
    if vocab_size is None:
        return tokens
    ids = np.memmap(bin_, dtype=dtype, mode="r")
    bad = int(ids.max())
    if bad < vocab_size and np.issubdtype(dtype, np.signedinteger):
        bad = int(ids.min())
    del ids
    if not 0 <= bad < vocab_size and tokenizer is None:
        raise DataError(f"'{bin_}' holds token id {bad} but the model has {vocab_size} tokens "
                        f"(ids 0-{vocab_size - 1}); the dataset was built with another tokenizer than the model's")
    if not 0 <= bad < vocab_size:
        raise DataError(f"'{bin_}' holds token id {bad} but tokenizer '{tokenizer}' has {vocab_size} tokens "
                        f"(ids 0-{vocab_size - 1}); the dataset was built with another tokenizer: set data.tokenizer "
                        "to that one, or rebuild the dataset with scripts/preprocess_data.py --tokenizer "
                        f"{tokenizer}")
    return tokens


@dataclass(frozen=True)
class TokenizerInfo:
    """What GPTDataset needs from a tokenizer: the EOD id and the vocabulary size."""

    eod: int
    vocab_size: int

    @property
    def unique_identifiers(self) -> dict:
        return {"eod": self.eod, "vocab_size": self.vocab_size}


def prefix_fingerprint(prefix: str) -> str:
    """What the index caches of an indexed dataset depend on besides the recipe: a digest of its .idx file (the
    documents' lengths and offsets) and its .bin file's size. A dataset rebuilt under the same prefix gets new
    caches; an identical rebuild keeps them."""
    with open(f"{prefix}.idx", "rb") as index:
        digest = hashlib.file_digest(index, "sha256")  # streamed: an index may hold many millions of documents
    digest.update(str(Path(f"{prefix}.bin").stat().st_size).encode())
    return digest.hexdigest()[:16]


@dataclass
class LongContextGPTDatasetConfig(GPTDatasetConfig):
    min_doc_length: int = 0
    """Keep only documents with at least this many tokens (0 keeps all)."""
    prefix_fingerprints: dict = field(default_factory=dict)
    """prefix_fingerprint of every prefix of the blends: part of each cache's key."""


class LongContextGPTDataset(GPTDataset):
    """GPTDataset over the documents of at least `min_doc_length` tokens; samples carry cu_seqlens."""

    def __init__(self, indexed_dataset, dataset_path, indexed_indices, num_samples, index_split, config):
        if config.min_doc_length:
            lengths = indexed_dataset.sequence_lengths[indexed_indices]
            indexed_indices = indexed_indices[lengths >= config.min_doc_length]
            if len(indexed_indices) == 0:
                raise DataError(f"no document of '{dataset_path}' ({index_split.name} split) has "
                                f"data.min_doc_length={config.min_doc_length} tokens; lower it")
        if num_samples and indexed_dataset.sequence_lengths[indexed_indices].sum() == 0:
            # Megatron's epoch count would loop forever looking for tokens.
            raise DataError(f"the {index_split.name} split of '{dataset_path}' holds no tokens "
                            f"({len(indexed_indices)} documents under data.split='{config.split}'); "
                            f"give that split a larger share or use more data")
        super().__init__(indexed_dataset, dataset_path, indexed_indices, num_samples, index_split, config)

    @staticmethod
    def _key_config_attributes() -> list[str]:
        return GPTDataset._key_config_attributes() + ["min_doc_length", "prefix_fingerprints"]

    def __getitem__(self, idx):
        sample = super().__getitem__(idx)
        sample["cu_seqlens"] = document_cu_seqlens(sample["tokens"], self.config.tokenizer.eod)
        return sample


@contextlib.contextmanager
def _single_process_group():
    """Megatron-Core's BlendedDataset asks torch.distributed for the rank before writing its cache, even in a
    single process; a run without a process group gets a one-process in-memory group for the build."""
    if torch.distributed.is_initialized():
        yield
        return
    torch.distributed.init_process_group("gloo", store=torch.distributed.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        torch.distributed.destroy_process_group()


class _NumpySavingAtomically:
    """numpy as Megatron-Core's dataset modules see it while we build: `save` publishes each index cache file
    whole (staging.write_file). Megatron saves them in place, and its cache test is only that the files
    exist: a run killed while writing one left a truncated file that every later run with the recipe took
    for a hit and failed on, and a run reading a shared cache meanwhile could read part of a file."""

    def __getattr__(self, name):
        return getattr(np, name)

    @staticmethod
    def save(file, arr, allow_pickle=True):
        write_file(file, lambda f: np.save(f, arr, allow_pickle=allow_pickle))


@contextlib.contextmanager
def _index_caches_written_whole():
    modules = (gpt_dataset, blended_dataset)
    for module in modules:
        module.numpy = _NumpySavingAtomically()
    try:
        yield
    finally:
        for module in modules:
            module.numpy = np


def truncated_npy_files(directory: Path) -> list[tuple[Path, int, int]]:
    """(file, bytes, bytes its header promises) of each .npy file in `directory` shorter than its header says."""
    short = []
    for path in sorted(directory.glob("*.npy")):
        size = path.stat().st_size
        try:
            with open(path, "rb") as f:
                major, _ = np.lib.format.read_magic(f)
                read_header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
                shape, _, dtype = read_header(f)
                expected = f.tell() + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        except (ValueError, EOFError, OSError):  # cut inside the header
            short.append((path, size, -1))
            continue
        if size < expected:
            short.append((path, size, expected))
    return short


def _build(config: LongContextGPTDatasetConfig, sizes: list[int]):
    """BlendedMegatronDatasetBuilder(...).build() with the index caches written whole, and a truncated cache
    file (written before this version, or cut by a full disk or a crash) named instead of numpy's error."""
    try:
        with _index_caches_written_whole():
            return BlendedMegatronDatasetBuilder(LongContextGPTDataset, sizes, lambda: True, config).build()
    except (ValueError, EOFError, OSError) as error:
        cache_dir = Path(config.path_to_cache)
        short = truncated_npy_files(cache_dir) if cache_dir.is_dir() else []
        if not short:
            raise
        path, size, expected = short[0]
        whole = f"of {expected} bytes" if expected >= 0 else "bytes, cut inside its header"
        raise DataError(f"index cache file '{path}' is truncated ({size} {whole}: a run was killed or the disk "
                        "filled while it was written); delete it, and the next run rebuilds it") from error


def build_indexed_datasets(cfg, env):
    """(train, valid or None) over `cfg.data.blend`; call on every rank (rank 0 builds the index caches)."""
    data, train = cfg.data, cfg.train
    if data.tokenizer is None:
        raise DataError("data.kind is 'indexed' but data.tokenizer is not set; "
                        "name the tokenizer the data was built with")
    prefixes, weights = parse_blend(data.blend)
    tokenizer = load_tokenizer(data.tokenizer)
    info = TokenizerInfo(eod=eod_id(tokenizer), vocab_size=len(tokenizer))
    if info.vocab_size > cfg.model.vocab_size:
        raise DataError(f"tokenizer '{data.tokenizer}' has {info.vocab_size} tokens but model.vocab_size is "
                        f"{cfg.model.vocab_size}; set model.vocab_size to at least {info.vocab_size}")
    valid_prefixes, valid_weights = parse_blend(data.valid_blend) if data.valid_blend else ([], None)
    tokens = {prefix: check_indexed_dataset(prefix, info.vocab_size, data.tokenizer)
              for prefix in prefixes + valid_prefixes}
    # Bare prefixes weigh by size. Given as weights, Megatron draws the samples a run needs (several epochs, each
    # shuffled anew) instead of one epoch of each, and a prefix smaller than one sample is repeated, not dropped.
    if weights is None and len(prefixes) > 1:
        weights = [tokens[prefix] for prefix in prefixes]
    if valid_weights is None and len(valid_prefixes) > 1:
        valid_weights = [tokens[prefix] for prefix in valid_prefixes]
    if valid_prefixes:  # every document of data.blend trains; validation is its own blend (Megatron's per-split)
        splits = dict(blend_per_split=[(prefixes, weights), (valid_prefixes, valid_weights), None])
    else:
        check_split(data.split)
        splits = dict(blend=(prefixes, weights), split=data.split)
    config = LongContextGPTDatasetConfig(
        random_seed=cfg.run.seed,
        sequence_length=train.seq_length,
        **splits,
        path_to_cache=data.cache_dir or str(Path(cfg.run.output_dir) / "data_cache"),
        tokenizer=info,
        reset_position_ids=data.reset_position_ids,
        reset_attention_mask=data.reset_attention_mask,
        eod_mask_loss=data.eod_mask_loss,
        create_attention_mask=False,
        min_doc_length=data.min_doc_length,
        prefix_fingerprints={prefix: prefix_fingerprint(prefix) for prefix in prefixes + valid_prefixes},
    )
    evals = train.steps // train.eval_interval + 1 if train.eval_interval else 1
    sizes = [train.steps * train.global_batch_size, evals * train.eval_steps * train.global_batch_size,
             train.eval_steps * train.global_batch_size]
    with _single_process_group():
        train_ds, valid_ds, _ = _build(config, sizes)
        if data.num_workers:
            # The rank that built an index cache holds its arrays in memory, and spawned workers would get copies
            # (data.sampler). Built again, every rank maps the cache files read-only, which travel as their names.
            # All ranks take this branch or none: the build is collective.
            train_ds, valid_ds, _ = _build(config, sizes)
    if train_ds is None or len(train_ds) == 0:
        raise DataError(f"data.split '{data.split}' leaves no training documents; give the train split a share")
    if data.passkey_mix or data.recall_mix or data.copy_mix:
        from moba_train.data.mix import TaskMixDataset

        train_ds = TaskMixDataset(train_ds, tokenizer, passkey=data.passkey_mix, recall=data.recall_mix,
                                  copy=data.copy_mix,
                                  synthetic=data.synthetic, seed=cfg.run.seed, eod=info.eod,
                                  eod_mask_loss=data.eod_mask_loss, seq_length=train.seq_length,
                                  vocab_size=cfg.model.vocab_size)
    return train_ds, valid_ds
