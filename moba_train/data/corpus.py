"""Corpora of the Python source files already on this machine: no network needed.

`build_corpus(out_dir)` makes the embedded default corpus (the standard library, a 512-token BPE) and,
with `include_site_packages=True`, a larger vocabulary and a held-out share, a real-sized one (every
installed package: torch, transformers, numpy, ... hundreds of MB of source). The steps:

1. Find the `.py` files: the standard library, then (optionally) every site directory this interpreter
   imports from. Each file belongs to a *package*, its top-level module (`stdlib/email`, `site/torch`).
   The standard library's own site-packages is excluded, also inside a virtual environment (where
   sysconfig's stdlib is the base interpreter's but purelib is the venv's).
2. Select files in a fixed pseudo-random order (a hash of their machine-independent name, so a byte
   budget samples every package rather than the alphabet's first ones) until `max_bytes`, skipping
   empty and non-UTF-8 files, files over 1 MiB (generated tables, not code) and duplicates:
   - exact: equal after collapsing whitespace;
   - near: a MinHash estimate of the Jaccard similarity of the file's 5-word shingles with an already
     selected file of at least 0.8 (128 hash functions; LSH with 16 bands of 8 rows finds candidates:
     a pair at similarity 0.8 is a candidate with probability 0.95, at 0.9 with 0.9999).
   Installed packages carry many copies of each other: vendored libraries (pip/_vendor,
   setuptools/_vendor, ...), generated variants of one file, backports. Removing them keeps one copy's
   weight in training, and, because it happens before the split, keeps a held-out package from
   reaching training through a copy.
3. Split by package: whole packages, in an order fixed by a hash of their names, are held out until
   they hold `valid_fraction` of the bytes (a package that would overshoot that share by more than a
   quarter is passed over), so no package has files in both splits.
4. Train a byte-level BPE tokenizer on the training split (at most `tokenizer_bytes` of it).
5. Tokenize both splits in `workers` processes into Megatron indexed datasets, one document per file.

Layout of `out_dir`:

    tokenizer/                    Hugging Face tokenizer (eos_token <|endoftext|> = id 0)
    python.bin/.idx               training documents; a recipe's data.blend is ["<out_dir>/python"]
    python_valid.bin/.idx         the held-out packages (only when valid_fraction > 0)
    manifest.json                 what was built: files, packages, duplicates, bytes, tokens, seconds

The same Python installation and arguments give byte-identical datasets and tokenizer (the manifest
also records build times). Everything is built in a temporary sibling directory that is renamed into
place when complete.
"""

from __future__ import annotations

import collections
import hashlib
import json
import multiprocessing
import os
import platform
import re
import sys
import sysconfig
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from moba_train.data.preprocess import DataError, write_indexed_dataset
from moba_train.staging import replace_dir, staging_dir

EOS = "<|endoftext|>"
PREFIX_NAME = "python"
VALID_PREFIX_NAME = "python_valid"
MANIFEST_NAME = "manifest.json"
DEFAULT_MAX_BYTES = 2 * 1024 * 1024
"""About 2 MB of source: 0.95M tokens with the default tokenizer (Python 3.11 here), built in 30 s on 2 busy cores."""
DEFAULT_VOCAB_SIZE = 512
"""Fits the tiny demo model (model.vocab_size 512) and every larger vocabulary."""
MAX_FILE_BYTES = 1 << 20
"""Larger files are generated tables (unicode data, lexer maps), not code worth training on."""
SITE_DIR_NAMES = ("site-packages", "dist-packages")

SHINGLE_WORDS = 5
NUM_HASHES = 128
LSH_BANDS = 16
NEAR_DUPLICATE_JACCARD = 0.8
_WORD = re.compile(r"\w+")
_SHINGLE_MULTIPLIER = np.uint64(0x9E3779B97F4A7C15)
_hash_rng = np.random.default_rng(20240917)
_HASH_A = _hash_rng.integers(0, 2**63, NUM_HASHES, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
_HASH_B = _hash_rng.integers(0, 2**63, NUM_HASHES, dtype=np.uint64)
_FINGERPRINT_BATCH = 32


@dataclass(frozen=True)
class SourceFile:
    """A source file and its machine-independent name: `stdlib/<relative path>` or `site/<relative path>`."""

    path: Path
    name: str

    @property
    def package(self) -> str:
        """The top-level module it belongs to, e.g. `site/torch` for `site/torch/nn/functional.py`."""
        kind, top = self.name.split("/")[:2]
        return f"{kind}/{top.removesuffix('.py')}"


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def site_dirs() -> list[Path]:
    """The site directories this interpreter imports packages from (a venv's, the base interpreter's when
    the venv includes system site packages, the user's), in sys.path order."""
    found = [Path(p) for p in sys.path if Path(p).name in SITE_DIR_NAMES]
    paths = sysconfig.get_paths()
    found += [Path(paths["purelib"]), Path(paths["platlib"])]
    unique = []
    for path in found:
        if path.is_dir() and path.resolve() not in {p.resolve() for p in unique}:
            unique.append(path)
    return unique


def _is_site_dir(path: Path, known: set[Path]) -> bool:
    # By name as well: inside a venv the base interpreter's site-packages (which sits inside its stdlib)
    # is in none of this interpreter's paths.
    return path.name in SITE_DIR_NAMES or path in known


def _walk_py(root: Path, kind: str, skip: set[Path]) -> list[SourceFile]:
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d != "__pycache__" and not _is_site_dir(Path(dirpath, d), skip))
        for name in filenames:
            if name.endswith(".py"):
                path = Path(dirpath, name)
                files.append(SourceFile(path, f"{kind}/{path.relative_to(root).as_posix()}"))
    return sorted(files, key=lambda f: f.name)


def python_source_files(include_site_packages: bool = False) -> list[SourceFile]:
    """The installation's .py files: the standard library sorted by name, then each site directory's."""
    sites = site_dirs()
    files = _walk_py(stdlib_dir(), "stdlib", set(sites))
    if include_site_packages:
        seen = set()
        for site in sites:
            for source in _walk_py(site, "site", set()):
                real = source.path.resolve()
                if real not in seen:
                    seen.add(real)
                    files.append(source)
    return files


# ---------------------------------------------------------------------------------------------
# Selection and duplicates


def _stable_hash(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


def minhash_signature(text: str) -> np.ndarray | None:
    """uint64 [NUM_HASHES]: the minimum of each hash function over the text's 5-word shingles (words are
    `\\w+` runs); None for texts shorter than one shingle."""
    words = _WORD.findall(text)
    if len(words) < SHINGLE_WORDS:
        return None
    word_hash = {w: zlib.crc32(w.encode()) for w in set(words)}
    ids = np.fromiter((word_hash[w] for w in words), dtype=np.uint64, count=len(words))
    count = len(ids) - SHINGLE_WORDS + 1
    shingles = np.zeros(count, dtype=np.uint64)
    for j in range(SHINGLE_WORDS):  # uint64 arithmetic wraps: a polynomial hash of the 5 word hashes
        shingles = shingles * _SHINGLE_MULTIPLIER + ids[j : j + count]
    shingles = np.unique(shingles)
    signature = np.full(NUM_HASHES, np.iinfo(np.uint64).max, dtype=np.uint64)
    for start in range(0, len(shingles), 4096):
        chunk = shingles[None, start : start + 4096]
        np.minimum(signature, (_HASH_A[:, None] * chunk + _HASH_B[:, None]).min(axis=1), out=signature)
    return signature


def _fingerprint(path: Path) -> tuple[str | None, int, bytes, np.ndarray | None]:
    """(text or None if unusable, UTF-8 bytes, whitespace-normalised digest, MinHash signature)."""
    try:
        raw = path.read_bytes()
        text = raw.decode("utf-8") if len(raw) <= MAX_FILE_BYTES else ""
    except (UnicodeDecodeError, OSError):
        text = ""
    if not text.strip():
        return None, 0, b"", None
    digest = hashlib.blake2b(" ".join(text.split()).encode(), digest_size=16).digest()
    return text, len(raw), digest, minhash_signature(text)


def _fingerprint_batch(paths: list[Path]) -> list[tuple]:
    return [_fingerprint(p) for p in paths]


def _fingerprints(paths: list[Path], workers: int) -> Iterator[tuple]:
    """_fingerprint of every path, in order; `workers` processes keep a bounded number of batches ahead."""
    batches = [paths[i : i + _FINGERPRINT_BATCH] for i in range(0, len(paths), _FINGERPRINT_BATCH)]
    if workers <= 1:
        for batch in batches:
            yield from _fingerprint_batch(batch)
        return
    # spawn, not fork: the caller may hold CUDA or tokenizer threads
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        pending = collections.deque()
        for batch in batches:
            pending.append(pool.apply_async(_fingerprint_batch, (batch,)))
            if len(pending) > 2 * workers:
                yield from pending.popleft().get()
        while pending:
            yield from pending.popleft().get()


class NearDuplicateIndex:
    """MinHash signatures of the selected files, with LSH buckets (LSH_BANDS bands of the signature)."""

    def __init__(self):
        self.signatures: list[np.ndarray] = []
        self.buckets = [collections.defaultdict(list) for _ in range(LSH_BANDS)]

    @staticmethod
    def _band_keys(signature: np.ndarray) -> list[bytes]:
        return [band.tobytes() for band in np.split(signature, LSH_BANDS)]

    def match(self, signature: np.ndarray) -> int | None:
        """The index of a selected file whose estimated Jaccard similarity is >= NEAR_DUPLICATE_JACCARD."""
        for bucket, key in zip(self.buckets, self._band_keys(signature)):
            for j in bucket.get(key, ()):
                if np.mean(self.signatures[j] == signature) >= NEAR_DUPLICATE_JACCARD:
                    return j
        return None

    def add(self, signature: np.ndarray) -> None:
        for bucket, key in zip(self.buckets, self._band_keys(signature)):
            bucket[key].append(len(self.signatures))
        self.signatures.append(signature)


@dataclass
class Selection:
    """The selected files and their texts (in selection order) and what was passed over."""

    files: list[SourceFile] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    sizes: list[int] = field(default_factory=list)
    unusable: int = 0
    exact_duplicates: int = 0
    near_duplicates: int = 0
    examples: list[tuple[str, str]] = field(default_factory=list)
    """The first near-duplicate pairs (dropped, kept), for the record."""


def select_sources(files: list[SourceFile], max_bytes: int, workers: int = 1) -> Selection:
    """Files in hash order until `max_bytes` of UTF-8 text, without unusable files or duplicates."""
    order = sorted(files, key=lambda f: (_stable_hash(f.name), f.name))
    chosen = Selection()
    digests: dict[bytes, int] = {}
    index = NearDuplicateIndex()
    indexed: list[int] = []  # selected file of each index entry
    used = 0
    for source, (text, size, digest, signature) in zip(order, _fingerprints([f.path for f in order], workers)):
        if text is None:
            chosen.unusable += 1
            continue
        if digest in digests:
            chosen.exact_duplicates += 1
            continue
        match = index.match(signature) if signature is not None else None
        if match is not None:
            chosen.near_duplicates += 1
            if len(chosen.examples) < 20:
                chosen.examples.append((source.name, chosen.files[indexed[match]].name))
            continue
        if used + size > max_bytes and chosen.files:
            break
        digests[digest] = len(chosen.files)
        if signature is not None:
            index.add(signature)
            indexed.append(len(chosen.files))
        chosen.files.append(source)
        chosen.texts.append(text)
        chosen.sizes.append(size)
        used += size
    return chosen


def held_out_packages(selection: Selection, valid_fraction: float) -> set[str]:
    """Whole packages holding about `valid_fraction` of the selected bytes (see the module docstring)."""
    if valid_fraction <= 0:
        return set()
    sizes = collections.Counter()
    for source, size in zip(selection.files, selection.sizes):
        sizes[source.package] += size
    target = valid_fraction * sum(sizes.values())
    held, used = set(), 0
    for package in sorted(sizes, key=lambda p: (_stable_hash("held-out " + p), p)):
        if used >= target:
            break
        if used + sizes[package] <= 1.25 * target:
            held.add(package)
            used += sizes[package]
    if not held or len(held) == len(sizes):
        raise DataError(f"the {len(sizes)} selected package(s) cannot be split to hold out {valid_fraction:.0%} of "
                        "the bytes by whole packages; change valid_fraction or select more source (max_bytes)")
    return held


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


def _split_record(files: list[SourceFile], sizes: list[int], lengths: np.ndarray) -> dict:
    return {"packages": len({f.package for f in files}), "documents": len(files), "bytes": int(sum(sizes)),
            "tokens": int(lengths.sum()), "documents_of_8k_tokens": int((lengths >= 8192).sum())}


def build_corpus(
    out_dir: str | os.PathLike, *, vocab_size: int = DEFAULT_VOCAB_SIZE, max_bytes: int = DEFAULT_MAX_BYTES,
    include_site_packages: bool = False, valid_fraction: float = 0.0, tokenizer_bytes: int | None = None,
    workers: int = 1, overwrite: bool = False, progress: bool = True, files: list[SourceFile] | None = None,
) -> dict | None:
    """Build tokenizer, datasets and manifest under `out_dir` (see the module docstring); returns the
    manifest, or None when `out_dir` is already complete and kept. `files` replaces the installation's
    files (python_source_files), e.g. for a tree of your own."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise DataError(f"'{out_dir}' is a file, not a directory; choose a directory for the corpus")
    if (out_dir / "tokenizer").is_dir() and Path(f"{out_dir / PREFIX_NAME}.idx").is_file() and not overwrite:
        return None
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / MANIFEST_NAME).is_file() and not overwrite:
        raise DataError(f"'{out_dir}' holds files that are not a corpus; choose a new or empty directory, or pass "
                        "--overwrite to replace everything in it")
    if vocab_size < 257:
        raise DataError(f"vocab_size {vocab_size} is too small for a byte-level tokenizer; use at least 257")
    if not 0 <= valid_fraction < 1:
        raise DataError(f"valid_fraction {valid_fraction} is not in [0, 1); hold out e.g. 0.03 of the corpus")
    start = time.perf_counter()
    files = python_source_files(include_site_packages) if files is None else files
    found = time.perf_counter()
    selection = select_sources(files, max_bytes, workers)
    if not selection.files:
        raise DataError("no readable Python source files were found in this installation")
    held = held_out_packages(selection, valid_fraction)
    selected = time.perf_counter()
    splits = {name: sorted((i for i, f in enumerate(selection.files) if (f.package in held) == valid),
                           key=lambda i: selection.files[i].name)
              for name, valid in (("train", False), ("valid", True))}
    sample, sample_bytes = [], 0
    for i in sorted(splits["train"]):  # selection order: a sample across packages
        if tokenizer_bytes is not None and sample_bytes + selection.sizes[i] > tokenizer_bytes and sample:
            break
        sample.append(selection.texts[i])
        sample_bytes += selection.sizes[i]

    with staging_dir(out_dir) as tmp:  # published whole; a killed build's staging is removed by the next
        tokenizer_dir = train_tokenizer(sample, vocab_size, tmp / "tokenizer")
        trained = time.perf_counter()
        records = {}
        for name, prefix in (("train", PREFIX_NAME), ("valid", VALID_PREFIX_NAME)):
            if not splits[name]:
                continue
            stats = write_indexed_dataset((selection.texts[i] for i in splits[name]), tokenizer_dir, tmp / prefix,
                                          workers=workers, total=len(splits[name]), progress=progress)
            records[name] = _split_record([selection.files[i] for i in splits[name]],
                                          [selection.sizes[i] for i in splits[name]], stats.lengths)
        tokenized = time.perf_counter()
        manifest = {
            "python": platform.python_version(),
            "include_site_packages": include_site_packages,
            "files_found": len(files),
            "max_bytes": max_bytes,
            "selected": {"documents": len(selection.files), "bytes": int(sum(selection.sizes)),
                         "unusable_files": selection.unusable, "exact_duplicates": selection.exact_duplicates,
                         "near_duplicates": selection.near_duplicates,
                         "near_duplicate_examples": selection.examples},
            "splits": records,
            "valid_packages": sorted(held),
            "tokenizer": {"vocab_size": vocab_size, "trained_on_bytes": sample_bytes},
            "workers": workers,
            "seconds": {"find": round(found - start, 2), "select": round(selected - found, 2),
                        "tokenizer": round(trained - selected, 2), "tokenize": round(tokenized - trained, 2),
                        "total": round(tokenized - start, 2)},
        }
        (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # the staging directory was private (mkdtemp); the corpus is not
        replace_dir(tmp, out_dir)
    return manifest


def summary(manifest: dict) -> str:
    """One line: documents, bytes and tokens per split, duplicates removed, build time."""
    parts = [f"{name} {s['documents']} documents / {s['packages']} packages / {s['bytes'] / 2**20:.1f} MiB / "
             f"{s['tokens']:,} tokens ({s['documents_of_8k_tokens']} of >= 8K tokens)"
             for name, s in manifest["splits"].items()]
    sel, vocab, seconds = manifest["selected"], manifest["tokenizer"]["vocab_size"], manifest["seconds"]["total"]
    return (f"{'; '.join(parts)}; removed {sel['exact_duplicates']} exact and {sel['near_duplicates']} near "
            f"duplicates; vocabulary {vocab}; built in {seconds:.0f} s")
