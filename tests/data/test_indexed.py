import itertools
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from megatron.core.datasets.gpt_dataset import _get_ltor_masks_and_position_ids
from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
from pydantic import ValidationError

from moba_train.config import Config, ConfigError, load_config
from moba_train.data import build_dataloader, build_datasets
from moba_train.data.indexed import check_indexed_dataset, parse_blend
from moba_train.data.preprocess import DataError

EOD = 0  # the conftest tokenizer's <|endoftext|>


def write_ids(prefix: Path, docs: list[list[int]], dtype=np.uint16) -> str:
    """An indexed dataset straight from token ids (each document ends with EOD)."""
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=dtype)
    for doc in docs:
        builder.add_document(torch.tensor(doc + [EOD]), [len(doc) + 1])
    builder.finalize(f"{prefix}.idx")
    return str(prefix)


def recipe(tmp_path, tokenizer_dir, blend, **data):
    return Config.model_validate({
        "run": {"output_dir": str(tmp_path / "run"), "seed": 5},
        "train": {"seq_length": 64, "micro_batch_size": 2, "global_batch_size": 8, "steps": 50},
        "attention": {"block_size": 16},
        "data": {"kind": "indexed", "blend": blend, "tokenizer": str(tokenizer_dir), "split": "90,10,0", **data},
    })


def docs_in_range(rng, lo, hi, count, length=(5, 40)):
    return [rng.integers(lo, hi, size=int(rng.integers(*length))).tolist() for _ in range(count)]


def test_blend_draws_each_dataset_in_proportion_to_its_weight(tmp_path, tokenizer_dir):
    rng = np.random.default_rng(0)
    a = write_ids(tmp_path / "a", docs_in_range(rng, 10, 20, 300))
    b = write_ids(tmp_path / "b", docs_in_range(rng, 20, 30, 300))
    train, valid = build_datasets(recipe(tmp_path, tokenizer_dir, [f"0.7 {a}", f"0.3 {b}"]), None)
    n = 400
    from_a = sum(int(train[i]["tokens"].max()) < 20 for i in range(n))  # a sample holds one dataset's tokens only
    assert abs(from_a / n - 0.7) < 0.03
    assert valid is not None and len(valid) > 0


def test_samples_carry_per_document_boundaries_and_reset_positions(tmp_path, tokenizer_dir):
    rng = np.random.default_rng(1)
    a = write_ids(tmp_path / "a", docs_in_range(rng, 10, 200, 200))
    cfg = recipe(tmp_path, tokenizer_dir, [a], reset_position_ids=True, reset_attention_mask=True, eod_mask_loss=True)
    train, _ = build_datasets(cfg, None)
    for i in range(20):
        x = train[i]
        _, loss_mask, positions = _get_ltor_masks_and_position_ids(x["tokens"], EOD, True, True, True, False)
        cu = x["cu_seqlens"].tolist()
        assert cu[0] == 0 and cu[-1] == 64
        assert all(x["tokens"][c - 1] == EOD for c in cu[1:-1]) and (x["tokens"][:-1] == EOD).sum() == len(cu) - 2
        assert torch.equal(x["position_ids"], positions) and torch.equal(x["loss_mask"], loss_mask)


def test_worker_processes_read_a_blend_as_the_training_process_does(tmp_path, tokenizer_dir):
    """Workers are fresh interpreters (moba_train.data.sampler), so the blended Megatron datasets travel to
    them pickled: they must read the same packed samples, document boundaries included. The index caches
    travel as file names, not bytes, also from the process that built them (a cold cache, as here): the
    pickle stays a small fraction of the index arrays, which would otherwise be copied into every worker."""
    from multiprocessing.reduction import ForkingPickler

    rng = np.random.default_rng(3)
    a = write_ids(tmp_path / "a", docs_in_range(rng, 10, 200, 200))
    b = write_ids(tmp_path / "b", docs_in_range(rng, 10, 200, 200))
    cfg = recipe(tmp_path, tokenizer_dir, [f"0.6 {a}", f"0.4 {b}"], reset_position_ids=True,
                 reset_attention_mask=True, num_workers=2)
    cfg.train.steps = 20_000  # indices of 160,000 samples, several MB
    assert not (tmp_path / "run" / "data_cache").exists()
    train, _ = build_datasets(cfg, None)
    rank = SimpleNamespace(rank=1, dp_rank=1, dp=2)
    inline = list(itertools.islice(build_dataloader(train, cfg, rank, 16, num_workers=0), 4))
    spawned = list(itertools.islice(build_dataloader(train, cfg, rank, 16), 4))
    assert inline[0].keys() == spawned[0].keys()
    assert all(torch.equal(x[key], y[key]) for x, y in zip(inline, spawned) for key in x)
    index_bytes = sum(f.stat().st_size for f in (tmp_path / "run" / "data_cache").rglob("*.npy"))
    assert index_bytes > 3_000_000
    assert len(ForkingPickler.dumps(train)) < index_bytes / 20

def test_sample_order_is_identical_when_rebuilt_from_the_index_cache(tmp_path, tokenizer_dir):
    rng = np.random.default_rng(2)
    a = write_ids(tmp_path / "a", docs_in_range(rng, 10, 200, 200))
    cfg = recipe(tmp_path, tokenizer_dir, [a])
    first = [build_datasets(cfg, None)[0][i]["tokens"] for i in range(10)]
    assert any(Path(cfg.run.output_dir, "data_cache").iterdir())
    again = [build_datasets(cfg, None)[0][i]["tokens"] for i in range(10)]
    assert all(torch.equal(x, y) for x, y in zip(first, again))


def test_a_blend_of_bare_prefixes_weighs_by_size_and_holds_every_sample_the_run_needs(tmp_path, tokenizer_dir):
    rng = np.random.default_rng(0)
    big = write_ids(tmp_path / "big", docs_in_range(rng, 10, 20, 100, length=(30, 31)))  # 3,100 tokens
    small = write_ids(tmp_path / "small", [[21, 22, 23, 24]] * 3)  # 15 tokens: less than one 64-token sample
    cfg = recipe(tmp_path, tokenizer_dir, [big, small], split="100,0,0")
    train, _ = build_datasets(cfg, None)
    assert len(train) >= cfg.train.steps * cfg.train.global_batch_size  # several epochs, not one of each
    tokens = torch.cat([train[i]["tokens"] for i in range(len(train))])
    assert 0 < ((tokens >= 21) & (tokens <= 24)).float().mean() < 0.02  # about 15 / 3,115 of the samples


def test_a_dataset_rebuilt_under_the_same_prefix_is_read_through_new_index_caches(tmp_path, tokenizer_dir):
    # preprocess_data.py --overwrite rewrites a prefix; the caches of the old one must not index the new one.
    a = write_ids(tmp_path / "a", [[11] * 30 for _ in range(100)])
    cfg = recipe(tmp_path, tokenizer_dir, [a], split="100,0,0")
    build_datasets(cfg, None)
    write_ids(tmp_path / "a", [[i + 10] * 20 for i in range(250)])  # document i holds only token i + 10
    train, _ = build_datasets(cfg, None)
    seen = set(torch.cat([train[i]["tokens"] for i in range(len(train))]).tolist()) - {EOD}
    assert seen == {i + 10 for i in range(250)}


def test_min_doc_length_keeps_only_long_documents(tmp_path, tokenizer_dir):
    rng = np.random.default_rng(3)
    docs = docs_in_range(rng, 10, 20, 100, length=(3, 10)) + docs_in_range(rng, 100, 110, 100, length=(100, 120))
    a = write_ids(tmp_path / "a", [docs[i] for i in rng.permutation(len(docs))])
    train, _ = build_datasets(recipe(tmp_path, tokenizer_dir, [a], min_doc_length=50), None)
    tokens = torch.cat([train[i]["tokens"] for i in range(50)])
    assert (((tokens >= 100) & (tokens < 110)) | (tokens == EOD)).all()
    unfiltered, _ = build_datasets(recipe(tmp_path, tokenizer_dir, [a]), None)
    tokens = torch.cat([unfiltered[i]["tokens"] for i in range(50)])
    assert ((tokens >= 10) & (tokens < 20)).any()


@pytest.mark.parametrize("blend,match", [
    (["abc data/x"], "not 'WEIGHT PREFIX'"),
    ([" "], "not 'WEIGHT PREFIX'"),
    (["-1 data/x"], "positive weight"),
    (["0.5 data/x extra"], "not 'WEIGHT PREFIX'"),
    (["0.5 data/x", "data/y"], "mixes weighted and bare"),
])
def test_blend_that_does_not_parse_is_one_clear_error(blend, match):
    with pytest.raises(DataError, match=match):
        parse_blend(blend)


def test_blend_parses_weights_and_bare_prefixes():
    assert parse_blend(["0.7 data/a", "3e-1 data/b"]) == (["data/a", "data/b"], [0.7, 0.3])
    assert parse_blend(["data/a", "data/b"]) == (["data/a", "data/b"], None)


@pytest.mark.parametrize("damage,match", [
    ("truncate bin", "has .* bytes but its index expects"),
    ("truncate idx", "truncated or not a Megatron index"),
    ("swap bin", "has .* bytes but its index expects"),
    ("remove idx", "is missing"),
])
def test_damaged_indexed_dataset_is_one_clear_error(tmp_path, tokenizer_dir, damage, match):
    a = write_ids(tmp_path / "a", [[11, 12, 13]] * 20)
    b = write_ids(tmp_path / "b", [[11, 12]] * 20)
    if damage == "truncate bin":
        Path(a + ".bin").write_bytes(Path(a + ".bin").read_bytes()[:-4])
    elif damage == "truncate idx":
        Path(a + ".idx").write_bytes(Path(a + ".idx").read_bytes()[:30])
    elif damage == "swap bin":
        shutil.copy(b + ".bin", a + ".bin")
    else:
        Path(a + ".idx").unlink()
    with pytest.raises(DataError, match=match):
        check_indexed_dataset(a)
    with pytest.raises(DataError, match=match):
        build_datasets(recipe(tmp_path, tokenizer_dir, [a]), None)


def _samples(dataset, count=20):
    return [dataset[i]["tokens"] for i in range(count)]


def test_a_build_killed_while_writing_the_index_cache_leaves_nothing_that_the_next_run_reads(
    tmp_path, tokenizer_dir, monkeypatch
):
    """Megatron-Core saves its index caches with numpy.save in place. A writer that dies in the last of a
    dataset's three files (its other files and description already there) must not leave a file under its
    name: the next run would take it for a cache hit and fail in numpy ("mmap length is greater than file
    size"), and a run reading the cache meanwhile (a shared data.cache_dir) would read part of it. The next
    build must produce the samples of an untouched build."""
    rng = np.random.default_rng(4)
    a = write_ids(tmp_path / "a", docs_in_range(rng, 10, 200, 300))
    reference = _samples(build_datasets(recipe(tmp_path / "clean", tokenizer_dir, [a]), None)[0])
    cfg = recipe(tmp_path, tokenizer_dir, [a])
    real_write, calls = np.lib.format.write_array, []

    def dies_in_the_third_file(fp, array, *args, **kwargs):  # train's document, sample, shuffle index
        calls.append(array.nbytes)
        if len(calls) == 3:
            fp.write(b"\x93NUMPY" + b"\0" * 100)  # a header's worth, then the process is gone
            raise SystemExit("killed while writing the shuffle index")
        return real_write(fp, array, *args, **kwargs)

    monkeypatch.setattr(np.lib.format, "write_array", dies_in_the_third_file)
    with pytest.raises(SystemExit):
        build_datasets(cfg, None)
    monkeypatch.setattr(np.lib.format, "write_array", real_write)
    cache = Path(cfg.run.output_dir) / "data_cache"
    assert not list(cache.glob("*shuffle_index.npy")) and list(cache.glob("*document_index.npy"))
    assert all(torch.equal(x, y) for x, y in zip(_samples(build_datasets(cfg, None)[0]), reference))


def test_an_index_cache_truncated_by_an_earlier_crash_is_one_clear_error(tmp_path, tokenizer_dir):
    """A cache file cut short outside our writes (an older version's kill, a full disk, a crash before the page
    cache reached the disk) is named with what to do, not numpy's "mmap length is greater than file size"."""
    rng = np.random.default_rng(5)
    a = write_ids(tmp_path / "a", docs_in_range(rng, 10, 200, 300))
    cfg = recipe(tmp_path, tokenizer_dir, [a])
    build_datasets(cfg, None)
    (shuffle,) = (Path(cfg.run.output_dir) / "data_cache").glob("*train-shuffle_index.npy")
    whole = shuffle.read_bytes()
    shuffle.write_bytes(whole[: len(whole) - 40])
    with pytest.raises(DataError, match=re.escape(
            f"index cache file '{shuffle}' is truncated ({len(whole) - 40} of {len(whole)} bytes"
            ) + r".*delete it, and the next run rebuilds it"):
        build_datasets(cfg, None)
    shuffle.unlink()
    assert len(build_datasets(cfg, None)[0]) > 0


def test_a_dataset_of_empty_documents_is_one_clear_error(tmp_path):
    builder = IndexedDatasetBuilder(str(tmp_path / "empty.bin"), dtype=np.uint16)
    for _ in range(3):
        builder.add_document(torch.tensor([], dtype=torch.int64), [0])
    builder.finalize(str(tmp_path / "empty.idx"))
    with pytest.raises(DataError, match="holds 3 documents and no tokens; rebuild it from non-empty text"):
        check_indexed_dataset(str(tmp_path / "empty"), vocab_size=300)


@pytest.mark.parametrize("dtype, bad_id", [(np.uint16, 300), (np.uint16, 65535), (np.int32, -1)])
def test_token_ids_outside_the_tokenizer_vocabulary_are_one_clear_error_when_the_dataset_opens(
    tmp_path, tokenizer_dir, dtype, bad_id
):
    docs = [[11, 12, 13]] * 20
    a = write_ids(tmp_path / "a", docs[:7] + [[11, bad_id, 12]] + docs[7:], dtype=dtype)
    expected = (f"'{a}.bin' holds token id {bad_id} but tokenizer '{tokenizer_dir}' has 300 tokens (ids 0-299); "
                "the dataset was built with another tokenizer")
    with pytest.raises(DataError, match=re.escape(expected)):
        build_datasets(recipe(tmp_path, tokenizer_dir, [a]), None)
    good = write_ids(tmp_path / "good", docs[:7] + [[11, 299, 12]] + docs[7:], dtype=dtype)
    train, _ = build_datasets(recipe(tmp_path, tokenizer_dir, [good]), None)
    assert int(torch.cat([train[i]["tokens"] for i in range(len(train))]).max()) == 299


def test_tokenizer_larger_than_the_model_vocabulary_is_one_clear_error(tmp_path, tokenizer_dir):
    a = write_ids(tmp_path / "a", [[11, 12, 13]] * 20)
    cfg = recipe(tmp_path, tokenizer_dir, [a])
    cfg.model.vocab_size = 128
    with pytest.raises(DataError, match="set model.vocab_size to at least 300"):
        build_datasets(cfg, None)


@pytest.mark.parametrize("data,match", [
    ({"split": "90;10"}, "is not train,valid,test shares"),
    ({"split": "0,0,0"}, "is not train,valid,test shares"),
    ({"tokenizer": None}, "data.tokenizer is not set"),
])
def test_bad_split_or_missing_tokenizer_is_one_clear_error(tmp_path, tokenizer_dir, data, match):
    a = write_ids(tmp_path / "a", [[11, 12, 13]] * 20)
    with pytest.raises(DataError, match=match):
        build_datasets(recipe(tmp_path, tokenizer_dir, [a], **data), None)


def test_a_split_left_without_documents_is_a_clear_error_not_an_endless_epoch_search(tmp_path, tokenizer_dir):
    rng = np.random.default_rng(4)
    a = write_ids(tmp_path / "a", docs_in_range(rng, 10, 200, 20))  # 2% of 20 documents rounds to none
    expected = r"the valid split of .* holds no tokens \(0 documents under data.split='98,2,0'\)"
    with pytest.raises(DataError, match=expected):
        build_datasets(recipe(tmp_path, tokenizer_dir, [a], split="98,2,0"), None)


def test_a_validation_blend_validates_on_its_own_datasets_and_trains_on_all_of_the_blend(tmp_path, tokenizer_dir):
    """data.valid_blend (Megatron-LM's --valid-data-path): validation samples come from its datasets only, and
    every document of data.blend trains; a split that would also hold out part of data.blend is refused."""
    rng = np.random.default_rng(6)
    train_prefix = write_ids(tmp_path / "train", docs_in_range(rng, 10, 20, 200))
    valid_prefix = write_ids(tmp_path / "valid", docs_in_range(rng, 20, 30, 60))
    cfg = recipe(tmp_path, tokenizer_dir, [train_prefix], valid_blend=[valid_prefix], split="100,0,0")
    train, valid = build_datasets(cfg, None)
    own = {EOD}
    assert all(set(train[i]["tokens"].tolist()) <= own | set(range(10, 20)) for i in range(len(train)))
    assert all(set(valid[i]["tokens"].tolist()) <= own | set(range(20, 30)) for i in range(len(valid)))
    # Every training document is drawn, as with data.split giving validation no share.
    plain_train, _ = build_datasets(recipe(tmp_path / "plain", tokenizer_dir, [train_prefix], split="100,0,0"), None)
    assert all(torch.equal(train[i]["tokens"], plain_train[i]["tokens"]) for i in range(20))
    unset = Config.model_validate({"data": {"kind": "indexed", "blend": [train_prefix], "valid_blend": [valid_prefix]}})
    assert unset.data.split == "98,2,0"  # the default is not the user's: not refused, not used
    with pytest.raises(ValidationError, match="data.split '90,10,0' holds out a validation share of data.blend"):
        recipe(tmp_path, tokenizer_dir, [train_prefix], valid_blend=[valid_prefix], split="90,10,0")
    with pytest.raises(ConfigError, match="data.valid_blend names indexed validation datasets"):
        load_config(None, [f"data.valid_blend=[{valid_prefix}]"])
    missing = recipe(tmp_path, tokenizer_dir, [train_prefix], valid_blend=[str(tmp_path / "nothing")], split="100")
    with pytest.raises(DataError, match=f"indexed dataset '{tmp_path / 'nothing'}' is missing"):
        build_datasets(missing, None)
