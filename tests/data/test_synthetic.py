import pytest
import torch

from moba_train.config import Config
from moba_train.data import build_datasets
from moba_train.data.synthetic import EOD, FACT, QUERY, SyntheticRecallDataset


def make(seed=7, split=0, s=256, answers_only=False, vocab=1024):
    return SyntheticRecallDataset(
        num_samples=100, seq_length=s, vocab_size=vocab, num_facts=4, key_tokens=2, value_tokens=3,
        answers_only_loss=answers_only, seed=seed, split=split,
    )


def parse(doc: list[int], kt: int, vt: int):
    """Independent reading of a document: planted facts and queried facts, as {key: value} dicts."""
    planted, queried, i = {}, [], 0
    while i < len(doc):
        if doc[i] in (FACT, QUERY):
            key, value = tuple(doc[i + 1 : i + 1 + kt]), tuple(doc[i + 1 + kt : i + 1 + kt + vt])
            (planted.__setitem__(key, value) if doc[i] == FACT else queried.append((key, value)))
            i += 1 + kt + vt
        else:
            i += 1
    return planted, queried


@pytest.mark.parametrize("index", [0, 1, 57])
def test_every_query_answer_is_the_value_planted_for_its_key(index):
    ds = make()
    x = ds[index]
    doc = x["tokens"].tolist() + [x["labels"][-1].item()]
    planted, queried = parse(doc, 2, 3)
    assert len(planted) == 4 and len(queried) == 4
    assert sorted(queried) == sorted(planted.items())
    assert doc[-1] == EOD and EOD not in doc[:-1]
    first_query = doc.index(QUERY)
    assert max(i for i, t in enumerate(doc) if t == FACT) < first_query


def test_sample_is_a_pure_function_of_seed_split_and_index():
    a, b = make(seed=7), make(seed=7)
    for i in (3, 0, 99, 3):
        for key in ("tokens", "labels", "loss_mask", "position_ids"):
            torch.testing.assert_close(a[i][key], b[i][key], rtol=0, atol=0)
    assert not torch.equal(make(seed=8)[3]["tokens"], a[3]["tokens"])
    assert not torch.equal(make(split=1)[3]["tokens"], a[3]["tokens"])
    assert not torch.equal(a[4]["tokens"], a[3]["tokens"])


def test_labels_are_next_tokens_and_ids_within_vocabulary():
    ds = make(vocab=100)
    x = ds[5]
    assert torch.equal(x["labels"][:-1], x["tokens"][1:])
    assert int(x["tokens"].max()) < 100 and int(x["tokens"].min()) >= 0
    assert x["tokens"].dtype == torch.int64 and x["loss_mask"].dtype == torch.float32
    assert torch.equal(x["position_ids"], torch.arange(256))


def test_filler_counts_up_by_one_across_planted_facts():
    ds = make()
    doc = ds.document(11)[0]
    filler = [t for t in doc.tolist() if ds.filler_lo <= t < ds.key_lo]
    n = ds.range_size
    assert all((b - a) % n == 1 for a, b in zip(filler, filler[1:]))


def test_answers_only_loss_covers_exactly_the_recalled_value_tokens():
    x = make(answers_only=True)[9]
    doc = x["tokens"].tolist() + [x["labels"][-1].item()]
    expected = torch.zeros(256)
    for i, t in enumerate(doc):
        if t == QUERY:
            expected[i + 2 : i + 5] = 1  # label position p predicts doc[p + 1]: values at doc[i+3 .. i+5]
    torch.testing.assert_close(x["loss_mask"], expected)


def test_build_datasets_gives_distinct_train_and_valid_splits_from_the_recipe():
    cfg = Config.model_validate({"train": {"seq_length": 128}, "attention": {"block_size": 32}, "run": {"seed": 3}})
    train, valid = build_datasets(cfg, None)
    assert len(train) == cfg.data.synthetic.num_samples and train[0]["tokens"].shape == (128,)
    assert not torch.equal(train[0]["tokens"], valid[0]["tokens"])


def test_too_short_sequence_is_a_one_sentence_error():
    with pytest.raises(ValueError, match="cannot hold 4 synthetic facts"):
        SyntheticRecallDataset(num_samples=1, seq_length=20, vocab_size=1024, num_facts=4, key_tokens=2,
                               value_tokens=2, answers_only_loss=False, seed=0, split=0)


def test_id_range_draws_every_range_from_the_first_ids_and_keeps_the_task():
    """data.synthetic.id_range: filler, keys and values each from `id_range` ids right after the specials,
    so on a BPE vocabulary the task uses its first (frequent) ids; answers still match the planted facts."""
    ds = SyntheticRecallDataset(num_samples=100, seq_length=512, vocab_size=32768, num_facts=4, key_tokens=2,
                                value_tokens=3, answers_only_loss=False, seed=7, split=0, id_range=16)
    seen = set()
    for index in range(20):
        doc = ds.document(index)[0].tolist()
        planted, queried = parse(doc, 2, 3)
        assert sorted(queried) == sorted(planted.items()) and len(planted) == 4
        for key, value in planted.items():
            assert all(19 <= t < 35 for t in key) and all(35 <= t < 51 for t in value)
        seen |= set(doc)
    assert seen <= {EOD, FACT, QUERY} | set(range(3, 51)) and len(seen & set(range(35, 51))) == 16
    filler = [t for t in ds.document(3)[0].tolist() if 3 <= t < 19]
    assert all((b - a) % 16 == 1 for a, b in zip(filler, filler[1:]))


def test_an_id_range_too_large_for_the_vocabulary_is_a_one_sentence_error():
    with pytest.raises(ValueError, match=r"id_range \(400\) does not fit three times in model.vocab_size \(1024\)"):
        SyntheticRecallDataset(num_samples=1, seq_length=256, vocab_size=1024, num_facts=4, key_tokens=2,
                               value_tokens=2, answers_only_loss=False, seed=0, split=0, id_range=400)


def test_the_recipe_id_range_reaches_training_and_evaluation_documents():
    from moba_train.evaluation import recall_dataset

    cfg = Config.model_validate({"train": {"seq_length": 128}, "attention": {"block_size": 32},
                                 "model": {"vocab_size": 1024}, "data": {"synthetic": {"id_range": 8}}})
    train, _ = build_datasets(cfg, None)
    for ds in (train, recall_dataset(cfg, 2)):
        doc = ds.document(0)[0]
        assert int(doc.max()) < 3 + 3 * 8
