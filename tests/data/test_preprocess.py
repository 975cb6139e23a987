import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset

from moba_train.data.preprocess import DataError, load_tokenizer, preprocess, write_indexed_dataset

REPO = Path(__file__).resolve().parents[2]
DOCS = ["hello world", "def f(x):\n    return x * 2\n", "", "ünïcode ✓ text", "a" * 500]


def write_input(tmp_path: Path, fmt: str) -> Path:
    if fmt == "jsonl":
        path = tmp_path / "docs.jsonl"
        path.write_text("".join(json.dumps({"body": d, "id": i}) + "\n" for i, d in enumerate(DOCS)))
    elif fmt == "parquet":
        path = tmp_path / "docs.parquet"
        pq.write_table(pa.table({"body": DOCS}), path)
    else:
        path = tmp_path / "txt"
        path.mkdir()
        for i, d in enumerate(DOCS):
            (path / f"{i:02d}.txt").write_text(d)
    return path


@pytest.mark.parametrize("fmt,workers", [("jsonl", 2), ("parquet", 1), ("txt", 1)])
def test_documents_round_trip_to_the_same_token_ids(tmp_path, tokenizer_dir, fmt, workers):
    source = write_input(tmp_path, fmt)
    field = "text" if fmt == "txt" else "body"
    stats = preprocess(str(source), str(tokenizer_dir), str(tmp_path / "out"), text_field=field,
                       workers=workers, progress=False)
    tok = load_tokenizer(tokenizer_dir)
    expected = [tok(d, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for d in DOCS if d]
    ds = IndexedDataset(str(tmp_path / "out"))
    assert [ds[i].tolist() for i in range(len(ds))] == expected
    assert stats.lengths.tolist() == [len(e) for e in expected]
    assert "4 documents" in stats.summary() and ">=8K: 0" in stats.summary()


@pytest.mark.parametrize("workers", [1, 2])
def test_the_end_of_document_text_inside_a_document_is_text_not_a_boundary(tmp_path, tokenizer_dir, workers):
    # e.g. transformers' GPT-NeoX tokenizer source, which build_corpus --site-packages reads.
    text = 'EOS = "<|endoftext|>"\nprint(EOS)\n'
    write_indexed_dataset([text], tokenizer_dir, tmp_path / "out", workers=workers, progress=False)
    tok = load_tokenizer(tokenizer_dir)
    dataset = IndexedDataset(str(tmp_path / "out"))  # held: its documents are views of its memory map
    doc = dataset[0].tolist()
    assert doc.index(tok.eos_token_id) == len(doc) - 1  # only the boundary that preprocessing appends
    assert tok.decode(doc[:-1]) == text


def test_completed_output_is_skipped_unless_overwrite(tmp_path, tokenizer_dir):
    source = write_input(tmp_path, "jsonl")
    prefix = str(tmp_path / "out")
    assert preprocess(str(source), str(tokenizer_dir), prefix, text_field="body", progress=False) is not None
    mtime = os.stat(prefix + ".bin").st_mtime_ns
    assert preprocess(str(source), str(tokenizer_dir), prefix, text_field="body", progress=False) is None
    assert os.stat(prefix + ".bin").st_mtime_ns == mtime
    assert preprocess(str(source), str(tokenizer_dir), prefix, text_field="body", overwrite=True,
                      progress=False) is not None


def failing_texts(n_good: int):
    for i in range(n_good):
        yield f"document {i} " * 50
    raise KeyboardInterrupt  # the user pressed ^C mid-write


@pytest.mark.parametrize("workers", [1, 2])
def test_interrupted_write_leaves_no_valid_looking_prefix(tmp_path, tokenizer_dir, workers):
    prefix = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        write_indexed_dataset(failing_texts(300), tokenizer_dir, prefix, workers=workers, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_interrupted_overwrite_keeps_the_previous_complete_dataset(tmp_path, tokenizer_dir):
    prefix = tmp_path / "out"
    write_indexed_dataset(["first", "second"], tokenizer_dir, prefix, progress=False)
    old = IndexedDataset(str(prefix))  # kept alive: Megatron closes the mmap under its arrays on deletion
    before = [old[i].tolist() for i in range(2)]
    del old
    with pytest.raises(KeyboardInterrupt):
        write_indexed_dataset(failing_texts(100), tokenizer_dir, prefix, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin", "out.idx"]
    ds = IndexedDataset(str(prefix))
    assert len(ds) == 2 and [ds[i].tolist() for i in range(2)] == before


@pytest.mark.parametrize("case,match", [
    ("missing input", "does not exist|cannot be read"),
    ("empty file", "is empty"),
    ("missing field", "has no field 'text'"),
    ("bad tokenizer file", "cannot be loaded"),
    ("missing tokenizer", "tokenizer .* does not exist"),
    ("only empty documents", "only empty documents"),
    ("list of strings", "field 'body' of document 2 of input .* is of type list, not a string"),
    ("numbers", "field 'body' of document 2 of input .* is of type int, not a string"),
    ("objects", "field 'body' of document 2 of input .* is of type dict, not a string"),
    ("latin-1 jsonl", "input .* is not UTF-8 text \\(document 2: "),
    ("latin-1 txt", "input .* is not UTF-8 text"),
    ("output under a file", "output prefix .* cannot be written"),
    ("output prefix is a directory", "output prefix .* names a directory; give a file prefix such as"),
    ("output prefix ends with a slash", "output prefix .* names a directory; give a file prefix such as"),
])
def test_bad_input_is_one_clear_error_and_nothing_is_written(tmp_path, tokenizer_dir, case, match):
    source, tok, field, prefix = write_input(tmp_path, "jsonl"), str(tokenizer_dir), "body", tmp_path / "out"
    bodies = {"list of strings": ["first part", "second part"], "numbers": 7, "objects": {"text": "nested"}}
    if case in bodies:
        source.write_text(json.dumps({"body": "fine"}) + "\n" + json.dumps({"body": bodies[case]}) + "\n")
    elif case == "latin-1 jsonl":
        source.write_bytes(json.dumps({"body": "fine"}).encode() + b"\n" + '{"body": "café"}\n'.encode("latin-1"))
    elif case == "latin-1 txt":
        source = tmp_path / "doc.txt"
        source.write_bytes("déjà vu".encode("latin-1"))
        field = "text"
    elif case == "output under a file":
        (tmp_path / "file").write_text("not a directory")
        prefix = tmp_path / "file" / "out"
    elif case == "output prefix is a directory":
        prefix = tmp_path / "outdir"
        prefix.mkdir()
    elif case == "output prefix ends with a slash":
        prefix = f"{tmp_path / 'outdir'}/"
    elif case == "missing input":
        source = tmp_path / "nope.jsonl"
    elif case == "empty file":
        source = tmp_path / "empty.jsonl"
        source.write_text("")
    elif case == "missing field":
        field = "text"
    elif case == "bad tokenizer file":
        tok = tmp_path / "tokenizer.json"
        tok.write_text("{not json")
    elif case == "missing tokenizer":
        tok = tmp_path / "no_tokenizer"
    elif case == "only empty documents":
        source = tmp_path / "blank.jsonl"
        source.write_text(json.dumps({"body": ""}) + "\n")
    with pytest.raises(DataError, match=match) as err:
        preprocess(str(source), str(tok), str(prefix), text_field=field, progress=False)
    assert "\n" not in str(err.value)
    assert not list(tmp_path.glob("out*.*")) and not list(tmp_path.glob(".out*"))
    assert not list(tmp_path.glob("outdir/*"))


def test_script_reports_an_error_in_one_line_with_a_nonzero_exit(tmp_path, tokenizer_dir):
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts/preprocess_data.py"), "--input", str(tmp_path / "missing.jsonl"),
         "--tokenizer", str(tokenizer_dir), "--output-prefix", str(tmp_path / "out")],
        capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "missing.jsonl" in errors[0] and "Traceback" not in result.stderr


def test_documents_without_text_are_skipped_and_counted(tmp_path, tokenizer_dir):
    source = tmp_path / "docs.jsonl"
    bodies = ["first", None, "", "second", None]
    source.write_text("".join(json.dumps({"text": b}) + "\n" for b in bodies))
    stats = preprocess(str(source), str(tokenizer_dir), str(tmp_path / "out"), progress=False)
    tok = load_tokenizer(tokenizer_dir)
    expected = [tok(b, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for b in ("first", "second")]
    ds = IndexedDataset(str(tmp_path / "out"))
    assert [ds[i].tolist() for i in range(len(ds))] == expected
    assert stats.skipped == 3
    assert stats.summary().startswith(f"2 documents, {sum(map(len, expected))} tokens (3 skipped: null or empty text);")


def test_staging_of_a_killed_run_is_removed_by_the_next_run(tmp_path, tokenizer_dir):
    source = tmp_path / "docs.jsonl"
    source.write_text("".join(json.dumps({"text": f"document {i} " * 200}) + "\n" for i in range(3000)))
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "scripts/preprocess_data.py"), "--input", str(source), "--tokenizer",
         str(tokenizer_dir), "--output-prefix", str(tmp_path / "out"), "--workers", "1"],
        env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while not list(tmp_path.glob(".out*")) and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
    assert list(tmp_path.glob(".out*")), "the killed run left nothing to clean up; the test needs a slower input"
    source.write_text(json.dumps({"text": "small"}) + "\n")
    preprocess(str(source), str(tokenizer_dir), str(tmp_path / "out"), progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["docs.jsonl", "out.bin", "out.idx"]

