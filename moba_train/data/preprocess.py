"""Text -> token ids -> Megatron-Core indexed dataset (`<prefix>.bin` + `<prefix>.idx`).

Input is read with Hugging Face `datasets`: local json/jsonl/parquet/txt files or directories of them
(a .txt file is one document), or a hub dataset name. The text field must hold one UTF-8 string per
document; documents whose text is null or empty are skipped and counted. Each document is tokenized by
worker processes, EOS is appended, and the ids are written with `IndexedDatasetBuilder` into a staging
directory beside the prefix (moba_train.staging) and renamed out of it only when complete: the `.idx`
is published last, so an interrupted run never leaves a prefix that opens, and the staging a killed run
left behind is removed by the next run. Re-running skips a prefix that is already complete unless
`overwrite`.
"""

from __future__ import annotations

import collections
import contextlib
import multiprocessing
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from moba_train.config import ConfigError
from moba_train.staging import remove_stale_staging, staging_dir

FORMATS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".txt": "text"}
EOS_CANDIDATES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>")
BATCH_DOCUMENTS = 64
LONG_CONTEXT_LENGTHS = (8192, 32768, 131072)


class DataError(ConfigError):
    """Input data, tokenizer or dataset files are wrong; the message is one sentence for the user."""


def _first_line(exc: Exception) -> str:
    return (str(exc).strip().splitlines() or [""])[0]


def _not_utf8(source: str, exc: UnicodeDecodeError, document: int | None = None) -> DataError:
    where = f"document {document}: " if document is not None else ""
    return DataError(f"input '{source}' is not UTF-8 text ({where}{exc.reason}); convert it to UTF-8, "
                     "e.g. iconv -f latin1 -t utf-8")


def _decode_error(exc: BaseException) -> UnicodeDecodeError | None:
    """The UnicodeDecodeError behind `exc` (datasets wraps the reader's errors), if any."""
    while exc is not None and not isinstance(exc, UnicodeDecodeError):
        exc = exc.__cause__ or exc.__context__
    return exc


def load_tokenizer(path: str | os.PathLike):
    """A Hugging Face fast tokenizer from a model directory or a tokenizer.json file."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    path = Path(path)
    try:
        if path.is_file():
            return PreTrainedTokenizerFast(tokenizer_file=str(path))
        if path.is_dir():
            return AutoTokenizer.from_pretrained(str(path))
    except Exception as exc:  # transformers raises many types for unreadable tokenizers
        raise DataError(f"tokenizer '{path}' cannot be loaded ({type(exc).__name__}: {_first_line(exc)}); "
                        "pass a tokenizer directory or a valid tokenizer.json") from None
    raise DataError(f"tokenizer '{path}' does not exist; pass a tokenizer directory or a tokenizer.json file")


def eod_id(tokenizer) -> int:
    """The end-of-document id: the tokenizer's EOS, else a conventional end-of-text special token."""
    if tokenizer.eos_token_id is not None:
        return tokenizer.eos_token_id
    vocab = tokenizer.get_vocab()
    for token in EOS_CANDIDATES:
        if token in vocab:
            return vocab[token]
    raise DataError(f"tokenizer '{tokenizer.name_or_path}' has no EOS token; "
                    f"use one that defines eos_token or contains one of {', '.join(EOS_CANDIDATES)}")


def input_files(path: Path) -> list[Path]:
    """The data files of a file or directory (recursive, sorted), all of one format."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.suffix in FORMATS and p.is_file())
    if not files:
        raise DataError(f"input '{path}' holds no {'/'.join(sorted(FORMATS))} files; point it at your data")
    kinds = {FORMATS.get(p.suffix) for p in files}
    if None in kinds:
        raise DataError(f"input '{path}' is not a {'/'.join(sorted(FORMATS))} file; convert it or pass a directory")
    if len(kinds) > 1:
        raise DataError(f"input '{path}' mixes formats ({', '.join(sorted(kinds))}); preprocess each format separately")
    if all(p.stat().st_size == 0 for p in files):
        raise DataError(f"input '{path}' is empty; it holds no documents")
    return files


def load_documents(source: str, text_field: str = "text"):
    """A `datasets.Dataset` of documents from local files/directories or a hub dataset name."""
    import datasets

    path = Path(source)
    try:
        if path.exists():
            files = input_files(path)
            builder = FORMATS[files[0].suffix]
            extra = {"sample_by": "document"} if builder == "text" else {}
            ds = datasets.load_dataset(builder, data_files=[str(p) for p in files], split="train", **extra)
        else:
            ds = datasets.load_dataset(source, split="train")
    except DataError:
        raise
    except Exception as exc:  # datasets raises many types for unreadable or unreachable input
        if (decode_error := _decode_error(exc)) is not None:
            raise _not_utf8(source, decode_error) from None
        raise DataError(f"input '{source}' cannot be read ({type(exc).__name__}: {_first_line(exc)}); "
                        "pass existing json/jsonl/parquet/txt files or a reachable hub dataset") from None
    if text_field not in ds.column_names:
        raise DataError(f"input '{source}' has no field '{text_field}' (fields: {', '.join(ds.column_names)}); "
                        "pass --text-field with one of them")
    if len(ds) == 0:
        raise DataError(f"input '{source}' is empty; it holds no documents")
    feature = ds.features[text_field]
    if not (isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string", "null")):
        # Not a string column (numbers, lists, objects, or a mix): name the first document that is not text.
        texts = (row[text_field] for row in ds)
        number, value = next(((i, v) for i, v in enumerate(texts, 1) if not isinstance(v, (str, type(None)))),
                             (1, None))
        raise DataError(f"field '{text_field}' of document {number} of input '{source}' is of type "
                        f"{type(value).__name__}, not a string; each document must be one string (join lists "
                        "before preprocessing, or pass --text-field with another field)")
    return ds


def _document_texts(docs, source: str, text_field: str = "text") -> Iterator[str | None]:
    """The text of each document of `load_documents`, in order (None where it is null)."""
    read = 0
    try:
        for row in docs:
            yield row[text_field]
            read += 1
    except UnicodeDecodeError as exc:
        raise _not_utf8(source, exc, read + 1) from None


@dataclass
class DocumentStats:
    """Token counts per written document (EOS included), and how many documents had no text to write."""

    lengths: np.ndarray
    skipped: int = 0
    """Documents whose text was null or empty."""

    def summary(self) -> str:
        n, lengths = len(self.lengths), self.lengths
        p50, p90, p99 = np.percentile(lengths, [50, 90, 99]).astype(int)
        long = ", ".join(f">={k // 1024}K: {(lengths >= k).sum()}" for k in LONG_CONTEXT_LENGTHS)
        return (f"{n} documents, {int(lengths.sum())} tokens ({self.skipped} skipped: null or empty text); "
                f"length min {lengths.min()} / p50 {p50} / p90 {p90} / p99 {p99} / max {lengths.max()}; "
                f"documents {long}")


_worker_tokenizer = None


def _init_worker(tokenizer_path: str) -> None:
    global _worker_tokenizer
    _worker_tokenizer = load_tokenizer(tokenizer_path)


def _encode(texts: list[str]) -> list[list[int]]:
    # split_special_tokens: a document's own text "<|endoftext|>" (e.g. in a tokenizer's source) is text, not
    # the end-of-document token that preprocessing appends to mark the boundary.
    return _worker_tokenizer(texts, add_special_tokens=False, split_special_tokens=True)["input_ids"]


def _batches(texts: Iterable[str | None], stats: DocumentStats) -> Iterator[list[str]]:
    """Batches of the non-empty texts; the others are counted in `stats.skipped`."""
    batch = []
    for text in texts:
        if not text:
            stats.skipped += 1
            continue
        batch.append(text)
        if len(batch) == BATCH_DOCUMENTS:
            yield batch
            batch = []
    if batch:
        yield batch


def _encoded_in_pool(batches: Iterable[list[str]], pool, workers: int) -> Iterator[list[list[int]]]:
    """Batches encoded by the pool, in order. `batches` is read here, in the calling thread (not in the pool's
    feeder thread), so that an error or ^C while reading surfaces at once instead of stalling the pool."""
    pending = collections.deque()
    for batch in batches:
        pending.append(pool.apply_async(_encode, (batch,)))
        if len(pending) > 2 * workers:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


def is_complete(prefix: str | os.PathLike) -> bool:
    return Path(f"{prefix}.idx").is_file() and Path(f"{prefix}.bin").is_file()


@contextlib.contextmanager
def _output_staging(prefix: Path) -> Iterator[Path]:
    """The staging directory for `<prefix>.bin/.idx`; DataError when the prefix's directory cannot be written."""
    stack = contextlib.ExitStack()
    try:
        stage = stack.enter_context(staging_dir(prefix))
    except OSError as exc:
        raise DataError(f"output prefix '{prefix}' cannot be written ({exc.strerror}: '{exc.filename}'); "
                        "choose a directory you can write to") from None
    with stack:
        yield stage


def _write_staged(
    texts: Iterable[str | None], tokenizer_path, prefix: Path, stage: Path, workers: int, total: int | None,
    progress: bool,
) -> DocumentStats:
    import torch
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder
    from tqdm import tqdm

    tokenizer = load_tokenizer(tokenizer_path)
    eod = eod_id(tokenizer)
    staged = stage / "data"
    builder = IndexedDatasetBuilder(f"{staged}.bin", dtype=DType.optimal_dtype(len(tokenizer)))
    stats = DocumentStats(np.zeros(0, dtype=np.int64))
    lengths = []
    pool = None
    if workers > 1:  # spawn, not fork: the parent may hold tokenizer/arrow threads
        pool = multiprocessing.get_context("spawn").Pool(workers, _init_worker, (str(tokenizer_path),))
    try:
        if pool is None:
            _init_worker(str(tokenizer_path))
        batches = _batches(texts, stats)
        encoded = _encoded_in_pool(batches, pool, workers) if pool else map(_encode, batches)
        with tqdm(total=total, unit="doc", disable=not progress, desc=f"tokenizing -> {prefix.name}") as bar:
            for ids_batch in encoded:
                for ids in ids_batch:
                    ids.append(eod)
                    builder.add_document(torch.tensor(ids, dtype=torch.int64), [len(ids)])
                    lengths.append(len(ids))
                bar.update(len(ids_batch))
        if not lengths:
            raise DataError("the input holds only empty documents; nothing to write")
        builder.finalize(f"{staged}.idx")
        Path(f"{prefix}.idx").unlink(missing_ok=True)  # the .idx marks completeness: drop a stale one first
        os.replace(f"{staged}.bin", f"{prefix}.bin")
        os.replace(f"{staged}.idx", f"{prefix}.idx")
    finally:
        builder.data_file.close()
        if pool is not None:
            pool.terminate()
    stats.lengths = np.asarray(lengths, dtype=np.int64)
    return stats


def _check_prefix(prefix: str | os.PathLike) -> None:
    """A prefix names files (<prefix>.bin, .idx), not a directory: "data/out/" would write data/out.bin."""
    text = os.fspath(prefix)
    if text.endswith(("/", os.sep)) or Path(text).is_dir():
        raise DataError(f"output prefix '{text}' names a directory; give a file prefix such as "
                        f"'{Path(text) / 'data'}' (it writes <prefix>.bin and <prefix>.idx)")


def write_indexed_dataset(
    texts: Iterable[str | None], tokenizer_path: str | os.PathLike, prefix: str | os.PathLike,
    *, workers: int = 1, total: int | None = None, progress: bool = True,
) -> DocumentStats:
    """Tokenize `texts` (EOS appended, null and empty texts skipped and counted) into `<prefix>.bin/.idx`,
    atomically."""
    _check_prefix(prefix)
    prefix = Path(prefix)
    with _output_staging(prefix) as stage:
        return _write_staged(texts, tokenizer_path, prefix, stage, workers, total, progress)


def preprocess(
    source: str, tokenizer_path: str, prefix: str, *, text_field: str = "text", workers: int = 1,
    overwrite: bool = False, progress: bool = True,
) -> DocumentStats | None:
    """Tokenize a text collection into an indexed dataset; None when `prefix` is complete and kept."""
    _check_prefix(prefix)
    remove_stale_staging(prefix)
    if is_complete(prefix) and not overwrite:
        return None
    load_tokenizer(tokenizer_path)  # fail on the tokenizer and the output before reading any data
    with _output_staging(Path(prefix)) as stage:
        docs = load_documents(source, text_field)
        return _write_staged(_document_texts(docs, source, text_field), tokenizer_path, Path(prefix), stage,
                             workers, len(docs), progress)
