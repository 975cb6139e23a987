import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset

from moba_train.data.corpus import (
    MANIFEST_NAME,
    NEAR_DUPLICATE_JACCARD,
    PREFIX_NAME,
    SHINGLE_WORDS,
    VALID_PREFIX_NAME,
    SourceFile,
    build_corpus,
    minhash_signature,
    python_source_files,
    select_sources,
    site_dirs,
)
from moba_train.data.preprocess import DataError, eod_id, load_tokenizer

SUBSET = 40_000  # bytes of source: a handful of standard-library files


def decoded_documents(prefix: Path, tokenizer) -> list[str]:
    ds = IndexedDataset(str(prefix))
    docs = []
    for i in range(len(ds)):
        ids = ds[i].tolist()
        assert ids[-1] == eod_id(tokenizer) and eod_id(tokenizer) not in ids[:-1]
        docs.append(tokenizer.decode(ids[:-1]))
    return docs


def test_corpus_builder_writes_a_lossless_tokenizer_and_one_document_per_source_file(tmp_path):
    out = tmp_path / "corpus"
    manifest = build_corpus(out, vocab_size=300, max_bytes=SUBSET, progress=False)
    selection = select_sources(python_source_files(), SUBSET)
    expected = [text for _, text in sorted(zip((f.name for f in selection.files), selection.texts))]
    tok = load_tokenizer(out / "tokenizer")
    assert eod_id(tok) == 0 and len(tok) == 300
    assert decoded_documents(out / PREFIX_NAME, tok) == expected and len(expected) > 1
    assert manifest["splits"]["train"]["documents"] == len(expected)
    assert manifest["splits"]["train"]["bytes"] == sum(len(t.encode()) for t in expected) <= SUBSET
    assert json.loads((out / "manifest.json").read_text()) == manifest
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
    assert [f.name for f in files] == sorted(f.name for f in files)
    assert all(f.path.suffix == ".py" and f.name.startswith("stdlib/") for f in files)
    assert not any("site-packages" in f.path.parts or "dist-packages" in f.path.parts for f in files)
    assert any(f.name == "stdlib/os.py" for f in files)
    assert {f.package for f in files if f.name.startswith("stdlib/email/")} == {"stdlib/email"}


def test_standard_library_files_inside_a_virtual_environment_exclude_the_base_site_packages(tmp_path):
    # In a venv, sysconfig's stdlib is the base interpreter's, whose site-packages sits inside it,
    # while purelib is the venv's own: the base site-packages must still be recognised as such.
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], check=True)
    code = "import json; from moba_train.data.corpus import python_source_files; " \
           "print(json.dumps([str(f.path) for f in python_source_files()]))"
    result = subprocess.run([str(venv / "bin" / "python"), "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    files = [Path(f) for f in json.loads(result.stdout)]
    assert any(f.name == "os.py" for f in files)
    assert not any("site-packages" in f.parts or "dist-packages" in f.parts for f in files)


# --- a source tree of our own: duplicates, budgets, the package split ---------------------------------

WORDS = [f"name{i}" for i in range(3000)]


def module_text(seed: int, lines: int = 120) -> str:
    """Python-looking source with random identifiers: distinct seeds share almost no 5-word shingle."""
    rng = np.random.default_rng(seed)
    return "".join(f"def {rng.choice(WORDS)}({rng.choice(WORDS)}, {rng.choice(WORDS)}):\n"
                   f"    return {rng.choice(WORDS)} + {int(rng.integers(100))}\n" for _ in range(lines))


def edited(text: str, every: int, seed: int) -> str:
    """`text` with every `every`-th line replaced."""
    rng = np.random.default_rng(seed)
    lines = text.splitlines(keepends=True)
    return "".join(f"x = {rng.choice(WORDS)}\n" if i % every == 0 else line for i, line in enumerate(lines))


def shingle_jaccard(a: str, b: str) -> float:
    def shingles(text):
        words = re.findall(r"\w+", text)
        return {tuple(words[i : i + SHINGLE_WORDS]) for i in range(len(words) - SHINGLE_WORDS + 1)}

    sa, sb = shingles(a), shingles(b)
    return len(sa & sb) / len(sa | sb)


def write_tree(root: Path, files: dict[str, str]) -> list[SourceFile]:
    sources = []
    for name, text in sorted(files.items()):
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        sources.append(SourceFile(path, f"site/{name}"))
    return sources


@pytest.mark.parametrize("every", [2, 4, 10, 40])
def test_minhash_estimates_the_jaccard_similarity_of_shingles(every):
    a = module_text(1)
    b = edited(a, every, seed=2)
    exact = shingle_jaccard(a, b)
    estimate = float(np.mean(minhash_signature(a) == minhash_signature(b)))
    assert abs(estimate - exact) < 0.15, (exact, estimate)  # 128 hashes: standard error <= 0.045


def test_selection_drops_exact_and_near_duplicates_and_keeps_distinct_files(tmp_path):
    original = module_text(1)
    near = edited(original, 40, seed=3)
    loose = edited(original, 3, seed=4)
    assert shingle_jaccard(original, near) > 0.85 and shingle_jaccard(original, loose) < NEAR_DUPLICATE_JACCARD - 0.2
    files = write_tree(tmp_path, {
        "alpha/core.py": original,
        "beta/_vendor/alpha/core.py": near,                           # a vendored, slightly edited copy
        "gamma/copy.py": original.replace("\n", "\n\n").replace(" + ", "  +  "),  # whitespace only
        "delta/rewrite.py": loose,                                    # shares a third of its lines: kept
        "epsilon/other.py": module_text(5),
        "zeta/__init__.py": "\n",                                     # empty: unusable
        "eta/latin1.py": "x = 'caf\xe9'\n",
    })
    (tmp_path / "eta/latin1.py").write_bytes("x = 'caf\xe9'\n".encode("latin-1"))  # not UTF-8: unusable
    selection = select_sources(files, max_bytes=10**9)
    names = {f.name for f in selection.files}
    assert len(names & {"site/alpha/core.py", "site/beta/_vendor/alpha/core.py", "site/gamma/copy.py"}) == 1
    assert {"site/delta/rewrite.py", "site/epsilon/other.py"} <= names
    assert selection.exact_duplicates + selection.near_duplicates == 2 and selection.unusable == 2
    assert sorted(selection.texts) == sorted(f.path.read_text() for f in selection.files)
    whitespace_only = select_sources([f for f in files if f.package in ("site/alpha", "site/gamma")], 10**9)
    assert (len(whitespace_only.files), whitespace_only.exact_duplicates, whitespace_only.near_duplicates) == (1, 1, 0)


def test_byte_budget_samples_across_packages_not_the_first_in_alphabetical_order(tmp_path):
    files = write_tree(tmp_path, {f"pkg{p:02d}/mod{m}.py": module_text(100 * p + m, lines=10)
                                  for p in range(20) for m in range(5)})
    total = sum(f.path.stat().st_size for f in files)
    selection = select_sources(files, max_bytes=total // 4)
    assert total // 4 - max(selection.sizes) < sum(selection.sizes) <= total // 4
    assert len({f.package for f in selection.files}) >= 10  # a quarter of the bytes touches most packages
    assert select_sources(files, max_bytes=total // 4).files == selection.files  # a fixed order


def test_held_out_split_is_by_whole_package_with_the_requested_share(tmp_path):
    files = write_tree(tmp_path, {f"pkg{p:02d}/mod{m}.py": module_text(100 * p + m, lines=10)
                                  for p in range(20) for m in range(1 + p % 3)})
    manifest = build_corpus(tmp_path / "out", vocab_size=300, max_bytes=10**9, valid_fraction=0.25, files=files,
                            progress=False)
    held = set(manifest["valid_packages"])
    tok = load_tokenizer(tmp_path / "out/tokenizer")
    by_name = sorted(files, key=lambda f: f.name)
    expected = {split: [f.path.read_text() for f in by_name if (f.package in held) == (split == VALID_PREFIX_NAME)]
                for split in (PREFIX_NAME, VALID_PREFIX_NAME)}
    for prefix, texts in expected.items():
        assert decoded_documents(tmp_path / "out" / prefix, tok) == texts and texts
    valid, train = manifest["splits"]["valid"]["bytes"], manifest["splits"]["train"]["bytes"]
    assert 0.25 * 0.75 <= valid / (valid + train) <= 0.25 * 1.25
    assert manifest["splits"]["valid"]["packages"] == len(held)
    assert manifest["splits"]["train"]["packages"] + len(held) == 20


def test_a_split_that_whole_packages_cannot_make_is_one_clear_error(tmp_path):
    files = write_tree(tmp_path, {"only/mod.py": module_text(1)})
    with pytest.raises(DataError, match="cannot be split to hold out 10% of the bytes by whole packages"):
        build_corpus(tmp_path / "out", vocab_size=300, valid_fraction=0.1, files=files, progress=False)
    assert not (tmp_path / "out").exists()


def test_a_directory_holding_other_files_is_refused_and_kept_unless_overwrite(tmp_path):
    files = write_tree(tmp_path / "src", {f"pkg/mod{m}.py": module_text(m, lines=10) for m in range(4)})
    out = tmp_path / "data"
    out.mkdir()
    (out / "mydata.bin").write_bytes(b"a dataset of the user's")
    with pytest.raises(DataError, match=f"^'{out}' holds files that are not a corpus; choose a new or empty"):
        build_corpus(out, vocab_size=300, files=files, progress=False)
    assert [p.name for p in out.iterdir()] == ["mydata.bin"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left behind
    build_corpus(out, vocab_size=300, files=files, progress=False, overwrite=True)  # asked for: replaced
    assert not (out / "mydata.bin").exists() and (out / MANIFEST_NAME).is_file()


def test_a_file_where_the_corpus_directory_should_be_is_refused_and_kept(tmp_path):
    """Even with --overwrite (which replaces a directory's contents): a file is not a corpus directory."""
    files = write_tree(tmp_path / "src", {f"pkg/mod{m}.py": module_text(m, lines=10) for m in range(4)})
    out = tmp_path / "notes.txt"
    out.write_text("the user's notes")
    for overwrite in (False, True):
        with pytest.raises(DataError, match=f"^'{out}' is a file, not a directory; choose a directory for the corpus"):
            build_corpus(out, vocab_size=300, files=files, progress=False, overwrite=overwrite)
        assert out.read_text() == "the user's notes"


def test_a_published_corpus_is_readable_by_others(tmp_path):
    """The staging directory (mkdtemp: mode 0700) is renamed into place: the corpus gets the usual mode."""
    files = write_tree(tmp_path / "src", {f"pkg/mod{m}.py": module_text(m, lines=10) for m in range(4)})
    build_corpus(tmp_path / "out", vocab_size=300, files=files, progress=False)
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o777 & ~umask


def test_site_directories_are_where_installed_packages_import_from():
    import numpy
    import torch

    dirs = {d.resolve() for d in site_dirs()}
    assert Path(numpy.__file__).resolve().parents[1] in dirs and Path(torch.__file__).resolve().parents[1] in dirs


def test_a_size_of_zero_is_refused_by_the_script(tmp_path):
    out = subprocess.run([sys.executable, str(Path(__file__).resolve().parents[2] / "scripts/build_corpus.py"),
                          "--out-dir", str(tmp_path / "c"), "--max-mb", "0"], capture_output=True, text=True)
    assert out.returncode == 2 and "argument --max-mb: 0 is not a positive size in MiB" in out.stderr
    assert not (tmp_path / "c").exists()
