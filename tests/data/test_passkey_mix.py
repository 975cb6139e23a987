"""data.passkey_mix: a share of the training samples made passkey documents (moba_train.data.passkey).

Built through the real path (build_datasets over a Megatron indexed dataset and a trained BPE), each
mixed sample is checked against the plain build of the same recipe: the haystack is that sample's own
text in order, the needle states the key where the depth says, the question ends the prompt and the
key's tokens follow it as labels, in one document. Unmixed samples are the plain samples."""

import numpy as np
import pytest
import torch
from test_indexed import EOD, docs_in_range, recipe, write_ids

from moba_train.config import ConfigError, load_config
from moba_train.data import build_datasets
from moba_train.data.passkey import PasskeyMixDataset, PasskeyTask, filler_length
from moba_train.data.preprocess import DataError, load_tokenizer

SEQ = 256


def _build(tmp_path, tokenizer_dir, prefix, name, **data):
    cfg = recipe(tmp_path / name, tokenizer_dir, [prefix], **data)
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"seq_length": SEQ})})
    return build_datasets(cfg, None)


@pytest.fixture(scope="module")
def mixed_and_plain(tmp_path_factory, tokenizer_dir):
    tmp_path = tmp_path_factory.mktemp("mix")
    rng = np.random.default_rng(4)
    prefix = write_ids(tmp_path / "text", docs_in_range(rng, 3, 290, 400, length=(20, 200)))
    mixed, mixed_valid = _build(tmp_path, tokenizer_dir, prefix, "mixed", passkey_mix=0.3, eod_mask_loss=True)
    plain, plain_valid = _build(tmp_path, tokenizer_dir, prefix, "plain", eod_mask_loss=True)
    return mixed, plain, mixed_valid, plain_valid


def _encode(tokenizer_dir, text):
    return load_tokenizer(str(tokenizer_dir))(text, add_special_tokens=False)["input_ids"]


def test_the_drawn_share_of_samples_becomes_passkey_documents_and_the_rest_stays_text(mixed_and_plain):
    mixed, plain, _, _ = mixed_and_plain
    assert isinstance(mixed, PasskeyMixDataset) and len(mixed) == len(plain)
    n = 400
    drawn = [i for i in range(n) if mixed.passkey_at(i) is not None]
    sigma = (0.3 * 0.7 / n) ** 0.5
    assert abs(len(drawn) / n - 0.3) < 4 * sigma, len(drawn)
    for i in range(40):
        x, y = mixed[i], plain[i]
        same = all(torch.equal(x[k], y[k]) for k in ("tokens", "labels", "loss_mask", "position_ids", "cu_seqlens"))
        assert same == (i not in drawn), i


def test_a_passkey_document_hides_the_key_at_its_depth_in_the_samples_own_text(mixed_and_plain, tokenizer_dir):
    mixed, plain, _, _ = mixed_and_plain
    tokenizer = load_tokenizer(str(tokenizer_dir))
    task = PasskeyTask(tokenizer, np.empty(0, dtype=np.int64))
    before, after, question = (np.asarray(_encode(tokenizer_dir, t)) for t in
                               (PasskeyTask.NEEDLE[0], PasskeyTask.NEEDLE[2], PasskeyTask.QUESTION))
    checked = 0
    for i in range(60):
        drawn = mixed.passkey_at(i)
        if drawn is None:
            continue
        key, depth = drawn
        assert 10_000 <= key < 100_000 and 0 <= depth < 1
        x, y = mixed[i], plain[i]
        answer = np.asarray(_encode(tokenizer_dir, f" {key}"))
        needle = (before, answer, after)
        document = np.concatenate([x["tokens"].numpy(), x["labels"][-1:].numpy()])
        assert np.array_equal(x["labels"][:-1].numpy(), x["tokens"][1:].numpy())
        # The end: the question, then the key's tokens.
        k = len(answer)
        assert np.array_equal(document[-k:], answer)
        assert np.array_equal(document[-k - len(question) : -k], question)
        # The needle at round(depth * filler), the sample's own text around it, in order.
        filler = filler_length(needle, question, SEQ)
        start = round(depth * filler)
        stated = np.concatenate(needle)
        assert np.array_equal(document[start : start + len(stated)], stated)
        text = np.concatenate([y["tokens"].numpy(), y["labels"][-1:].numpy()])[:filler]
        assert np.array_equal(np.concatenate([document[:start], document[start + len(stated) : -k - len(question)]]),
                              text)
        assert tokenizer.decode(document[start : start + len(stated)].tolist()) == \
            f"\n# The pass key is {key}. Remember it.\n"
        # One document: positions run on, the loss everywhere but on EOD labels (data.eod_mask_loss).
        assert x["cu_seqlens"].tolist() == [0, SEQ]
        assert torch.equal(x["position_ids"], torch.arange(SEQ))
        assert torch.equal(x["loss_mask"], (x["labels"] != EOD).float())
        assert task.needle(key)[1].tolist() == answer.tolist()
        checked += 1
    assert checked >= 8


def test_the_mix_is_a_pure_function_of_seed_and_index_and_spares_validation(mixed_and_plain):
    mixed, _, mixed_valid, plain_valid = mixed_and_plain
    order = [37, 3, 11, 52]
    first = {i: mixed[i]["tokens"] for i in order}
    assert all(torch.equal(first[i], mixed[i]["tokens"]) for i in reversed(order))
    assert all(torch.equal(mixed_valid[i]["tokens"], plain_valid[i]["tokens"]) for i in range(len(plain_valid)))


def test_sequences_too_short_for_a_needle_and_the_synthetic_task_are_refused(tmp_path, tokenizer_dir):
    rng = np.random.default_rng(5)
    prefix = write_ids(tmp_path / "text", docs_in_range(rng, 3, 290, 100))
    cfg = recipe(tmp_path, tokenizer_dir, [prefix], passkey_mix=0.5)
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"seq_length": 16})})
    with pytest.raises(DataError, match=r"train.seq_length \(16\) cannot hold a passkey needle and question"):
        build_datasets(cfg, None)
    recipe_path = tmp_path / "r.yaml"
    recipe_path.write_text("data:\n  kind: synthetic\n  passkey_mix: 0.1\n")
    with pytest.raises(ConfigError, match="data.passkey_mix plants passkeys in text and needs data.kind 'indexed'"):
        load_config(recipe_path)
