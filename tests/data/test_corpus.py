from pathlib import Path

from megatron.core.datasets.indexed_dataset import IndexedDataset

from moba_train.data.corpus import build_corpus, python_source_files, read_sources
from moba_train.data.preprocess import eod_id, load_tokenizer

SUBSET = 40_000  # bytes of source: a handful of standard-library files


def test_corpus_builder_writes_a_lossless_tokenizer_and_one_document_per_source_file(tmp_path):
    out = tmp_path / "corpus"
    stats = build_corpus(out, vocab_size=300, max_bytes=SUBSET, progress=False)
    texts = read_sources(python_source_files(), SUBSET)
    tok = load_tokenizer(out / "tokenizer")
    assert eod_id(tok) == 0 and len(tok) == 300
    ds = IndexedDataset(str(out / "python"))
    assert len(ds) == len(texts) == len(stats.lengths) > 1
    for i, text in enumerate(texts):
        ids = ds[i].tolist()
        assert ids[-1] == 0 and 0 not in ids[:-1]
        assert tok.decode(ids[:-1]) == text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus"]  # no temporary directory left


def test_corpus_is_byte_identical_when_rebuilt_and_kept_unless_overwrite(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    build_corpus(a, vocab_size=300, max_bytes=SUBSET, progress=False)
    build_corpus(b, vocab_size=300, max_bytes=SUBSET, progress=False)
    for rel in ("tokenizer/tokenizer.json", "python.bin", "python.idx"):
        assert Path(a, rel).read_bytes() == Path(b, rel).read_bytes(), rel
    assert build_corpus(a, vocab_size=300, max_bytes=SUBSET, progress=False) is None
    assert build_corpus(a, vocab_size=300, max_bytes=SUBSET, progress=False, overwrite=True) is not None


def test_source_files_are_sorted_standard_library_python_files():
    files = python_source_files()
    assert files == sorted(files) and all(f.suffix == ".py" for f in files)
    assert not any("site-packages" in f.parts for f in files)
    assert any(f.name == "os.py" for f in files)
