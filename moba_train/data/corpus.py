"""The embedded default corpus: Python source files already on this machine, no network needed.

`build_corpus(out_dir)` collects the standard library's `.py` files (optionally installed packages
too) in sorted path order up to a byte budget, trains a byte-level BPE tokenizer on them with the
`tokenizers` library, and writes one document per file:

    <out_dir>/tokenizer/       Hugging Face tokenizer (tokenizer.json, eos_token <|endoftext|> = id 0)
    <out_dir>/python.bin/.idx  Megatron-Core indexed dataset; the recipe's data.blend is ["<out_dir>/python"]

The same Python installation and arguments give byte-identical outputs. Everything is built in a
temporary sibling directory that is renamed into place when complete.
"""

from __future__ import annotations

import os
import shutil
import sysconfig
from pathlib import Path

from moba_train.data.preprocess import DataError, DocumentStats, write_indexed_dataset

EOS = "<|endoftext|>"
PREFIX_NAME = "python"
DEFAULT_MAX_BYTES = 2 * 1024 * 1024
"""About 2 MB of source (~160 files, ~0.8M tokens): built in about 15 s on 2 idle cores."""
DEFAULT_VOCAB_SIZE = 512
"""Fits the tiny demo model (model.vocab_size 512) and every larger vocabulary."""


def python_source_files(include_site_packages: bool = False) -> list[Path]:
    """The installation's .py files, sorted: the standard library first, then installed packages."""
    paths = sysconfig.get_paths()
    site = sorted({Path(paths["purelib"]), Path(paths["platlib"])})
    files = _walk_py(Path(paths["stdlib"]), skip=set(site))
    if include_site_packages:
        files += sorted({p for root in site for p in _walk_py(root, skip=set())})
    return files


def _walk_py(root: Path, skip: set[Path]) -> list[Path]:
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if Path(dirpath, d) not in skip and d != "__pycache__"]
        files += [Path(dirpath, f) for f in filenames if f.endswith(".py")]
    return sorted(files)


def read_sources(files: list[Path], max_bytes: int) -> list[str]:
    """UTF-8 texts of `files` in order until `max_bytes` (files that are not UTF-8 or empty are skipped)."""
    texts, used = [], 0
    for path in files:
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if not text.strip():
            continue
        if used + len(text) > max_bytes and texts:
            break
        texts.append(text)
        used += len(text)
    return texts


def train_tokenizer(texts: list[str], vocab_size: int, out_dir: Path) -> Path:
    """Byte-level BPE trained on `texts`, saved as a Hugging Face tokenizer directory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS).save_pretrained(str(out_dir))
    return out_dir


def build_corpus(
    out_dir: str | os.PathLike, *, vocab_size: int = DEFAULT_VOCAB_SIZE, max_bytes: int = DEFAULT_MAX_BYTES,
    include_site_packages: bool = False, workers: int = 1, overwrite: bool = False, progress: bool = True,
) -> DocumentStats | None:
    """Build tokenizer + indexed dataset under `out_dir`; None when it is already complete and kept."""
    out_dir = Path(out_dir)
    if (out_dir / "tokenizer").is_dir() and Path(f"{out_dir / PREFIX_NAME}.idx").is_file() and not overwrite:
        return None
    if vocab_size < 257:
        raise DataError(f"vocab_size {vocab_size} is too small for a byte-level tokenizer; use at least 257")
    texts = read_sources(python_source_files(include_site_packages), max_bytes)
    if not texts:
        raise DataError("no readable Python source files were found in this installation")
    tmp = out_dir.with_name(f".{out_dir.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tokenizer_dir = train_tokenizer(texts, vocab_size, tmp / "tokenizer")
        stats = write_indexed_dataset(texts, tokenizer_dir, tmp / PREFIX_NAME, workers=workers,
                                      total=len(texts), progress=progress)
        shutil.rmtree(out_dir, ignore_errors=True)
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return stats
