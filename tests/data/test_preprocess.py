import json
import os
import subprocess
import sys
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
])
def test_bad_input_is_one_clear_error_and_nothing_is_written(tmp_path, tokenizer_dir, case, match):
    source, tok, field = write_input(tmp_path, "jsonl"), str(tokenizer_dir), "body"
    if case == "missing input":
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
        preprocess(str(source), str(tok), str(tmp_path / "out"), text_field=field, progress=False)
    assert "\n" not in str(err.value)
    assert not list(tmp_path.glob("out*")) and not list(tmp_path.glob(".out*"))


def test_script_reports_an_error_in_one_line_with_a_nonzero_exit(tmp_path, tokenizer_dir):
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts/preprocess_data.py"), "--input", str(tmp_path / "missing.jsonl"),
         "--tokenizer", str(tokenizer_dir), "--output-prefix", str(tmp_path / "out")],
        capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "missing.jsonl" in errors[0] and "Traceback" not in result.stderr
