"""data.passkey_mix, data.recall_mix and data.copy_mix: shares of the training samples made retrieval
documents (moba_train.data.mix).

Built through the real path (build_datasets over a Megatron indexed dataset and a trained BPE), each
mixed sample is checked against the plain build of the same recipe: the haystack is that sample's own
text in order, the needle states the key where the depth says, the question ends the prompt and the
key's tokens follow it as labels, in one document. Recall documents are parsed back: every query's
values are the values its key was planted with. Copy documents are checked for their smallest period,
found from the tokens. Unmixed samples are the plain samples."""

import itertools
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from test_indexed import EOD, docs_in_range, recipe, write_ids

from moba_train.config import ConfigError, load_config
from moba_train.data import build_dataloader, build_datasets, build_passkey_validation
from moba_train.data.mix import PASSKEY_EVAL_DEPTHS, PasskeyValidationDataset, TaskMixDataset
from moba_train.data.passkey import PasskeyTask, filler_length
from moba_train.data.preprocess import DataError, load_tokenizer
from moba_train.data.synthetic import FACT, FIRST_ORDINARY_ID, QUERY

SEQ = 256


def _build(tmp_path, tokenizer_dir, prefix, name, **data):
    cfg = recipe(tmp_path / name, tokenizer_dir, [prefix], **data)
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"seq_length": SEQ})})
    return build_datasets(cfg, None)


SYNTHETIC = {"num_facts": 6, "key_tokens": 2, "value_tokens": 3}


@pytest.fixture(scope="module")
def text_prefix(tmp_path_factory):
    """400 text documents as an indexed dataset: the text every mixed build starts from."""
    rng = np.random.default_rng(4)
    return write_ids(tmp_path_factory.mktemp("text") / "text", docs_in_range(rng, 3, 290, 400, length=(20, 200)))


@pytest.fixture(scope="module")
def mixed_and_plain(tmp_path_factory, tokenizer_dir, text_prefix):
    tmp_path, prefix = tmp_path_factory.mktemp("mix"), text_prefix
    mixed, mixed_valid = _build(tmp_path, tokenizer_dir, prefix, "mixed", passkey_mix=0.3, eod_mask_loss=True)
    plain, plain_valid = _build(tmp_path, tokenizer_dir, prefix, "plain", eod_mask_loss=True)
    return mixed, plain, mixed_valid, plain_valid


def _encode(tokenizer_dir, text):
    return load_tokenizer(str(tokenizer_dir))(text, add_special_tokens=False)["input_ids"]


def test_the_drawn_share_of_samples_becomes_passkey_documents_and_the_rest_stays_text(mixed_and_plain):
    mixed, plain, _, _ = mixed_and_plain
    assert isinstance(mixed, TaskMixDataset) and len(mixed) == len(plain)
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


@pytest.fixture(scope="module")
def with_recall(tmp_path_factory, tokenizer_dir, text_prefix):
    tmp_path, prefix, synthetic = tmp_path_factory.mktemp("recall"), text_prefix, SYNTHETIC
    both, _ = _build(tmp_path, tokenizer_dir, prefix, "both", passkey_mix=0.3, recall_mix=0.4, eod_mask_loss=True,
                     synthetic=synthetic)
    answers, _ = _build(tmp_path, tokenizer_dir, prefix, "answers", recall_mix=0.5,
                        synthetic={**synthetic, "loss": "answers", "id_range": 20})  # ids 3 to 62 only
    return both, answers, synthetic


def _parse_recall(tokens: np.ndarray, key_tokens: int, value_tokens: int):
    """{key: values} as planted after FACT, and [(key, values, position of the first value)] as queried."""
    fact_len = 1 + key_tokens + value_tokens
    planted, queried = {}, []
    for pos in np.flatnonzero(tokens == FACT):
        key = tuple(tokens[pos + 1 : pos + 1 + key_tokens])
        planted[key] = tuple(tokens[pos + 1 + key_tokens : pos + fact_len])
    for pos in np.flatnonzero(tokens == QUERY):
        key = tuple(tokens[pos + 1 : pos + 1 + key_tokens])
        queried.append((key, tuple(tokens[pos + 1 + key_tokens : pos + fact_len]), pos + 1 + key_tokens))
    return planted, queried


def test_recall_documents_take_their_share_apart_from_the_passkeys_which_stay_as_they_were(
        with_recall, mixed_and_plain):
    both, _, _ = with_recall
    passkey_only, plain, _, _ = mixed_and_plain
    n = 400
    passkeys = {i for i in range(n) if both.passkey_at(i) is not None}
    recalls = {i for i in range(n) if both.is_recall(i)}
    assert not passkeys & recalls
    for share, drawn in ((0.3, passkeys), (0.4, recalls)):
        assert abs(len(drawn) / n - share) < 4 * (share * (1 - share) / n) ** 0.5, (share, len(drawn))
    # Adding recall documents changes no passkey document and no text sample of the passkey-only build.
    assert passkeys == {i for i in range(n) if passkey_only.passkey_at(i) is not None}
    for i in range(40):
        if i not in recalls:
            assert torch.equal(both[i]["tokens"], passkey_only[i]["tokens"]), i
        if i not in recalls | passkeys:
            assert torch.equal(both[i]["tokens"], plain[i]["tokens"]), i


def test_a_recall_document_queries_every_planted_fact_with_its_values_and_carries_the_chosen_loss(with_recall):
    both, answers, synthetic = with_recall
    kt, vt = synthetic["key_tokens"], synthetic["value_tokens"]
    checked = 0
    for mix, answers_only in ((both, False), (answers, True)):
        for i in [i for i in range(60) if mix.is_recall(i)][:6]:
            x = mix[i]
            document = np.concatenate([x["tokens"].numpy(), x["labels"][-1:].numpy()])
            assert np.array_equal(x["labels"][:-1].numpy(), x["tokens"][1:].numpy())
            values_end = mix.recall_docs.value_lo + mix.recall_docs.range_size
            assert values_end == (FIRST_ORDINARY_ID + 3 * 20 if answers_only else mix.recall_docs.value_lo
                                  + (mix.vocab_size - FIRST_ORDINARY_ID) // 3)
            assert len(document) == SEQ + 1 and FIRST_ORDINARY_ID > QUERY and document.max() < values_end
            planted, queried = _parse_recall(document, kt, vt)
            assert len(planted) == synthetic["num_facts"] and len(queried) == synthetic["num_facts"]
            assert {key for key, _, _ in queried} == set(planted)
            assert all(planted[key] == values for key, values, _ in queried)
            # The loss: every token, or exactly the queried values (label j is document[j + 1]).
            expected = np.ones(SEQ)
            if answers_only:
                expected = np.zeros(SEQ)
                for _, _, first in queried:
                    expected[first - 1 : first - 1 + vt] = 1
            assert np.array_equal(x["loss_mask"].numpy(), expected)
            assert x["cu_seqlens"].tolist() == [0, SEQ] and torch.equal(x["position_ids"], torch.arange(SEQ))
            checked += 1
    assert checked == 12


def test_mixed_recall_documents_use_the_token_ranges_the_evaluation_scores(with_recall, tmp_path, tokenizer_dir):
    """The evaluation's recall documents (moba_train.evaluation.recall_dataset) come from the model's
    vocabulary; the mixed ones must use the same key and value ids, or a model trained on the mix would
    be scored on tokens it never saw as values."""
    from moba_train.evaluation import recall_dataset

    both, _, synthetic = with_recall
    cfg = recipe(tmp_path, tokenizer_dir, ["unused"], synthetic=synthetic)
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"seq_length": SEQ})})
    evaluated = recall_dataset(cfg, 1)
    mixed = both.recall_docs
    assert cfg.model.vocab_size > 300  # the tokenizer's 300 tokens would give other ranges
    assert (mixed.key_lo, mixed.value_lo, mixed.range_size) == (evaluated.key_lo, evaluated.value_lo,
                                                                evaluated.range_size)


def test_recall_mix_needs_text_data_and_the_shares_cannot_exceed_one(tmp_path):
    recipe_path = tmp_path / "r.yaml"
    recipe_path.write_text("data:\n  kind: synthetic\n  recall_mix: 0.1\n")
    with pytest.raises(ConfigError, match="data.recall_mix mixes recall documents into text and needs data.kind"):
        load_config(recipe_path)
    recipe_path.write_text("data:\n  kind: indexed\n  blend: [x]\n  tokenizer: t\n  passkey_mix: 0.6\n"
                           "  recall_mix: 0.5\n")
    with pytest.raises(ConfigError, match=r"data.passkey_mix \+ data.recall_mix \+ data.copy_mix is 1.1; the shares"):
        load_config(recipe_path)
    recipe_path.write_text("data:\n  kind: indexed\n  blend: [x]\n  tokenizer: t\n  recall_mix: 0.5\n"
                           "  copy_mix: 0.6\n")
    with pytest.raises(ConfigError, match=r"data.copy_mix is 1.1; the shares of mixed samples cannot exceed 1"):
        load_config(recipe_path)
    recipe_path.write_text("data:\n  kind: synthetic\n  copy_mix: 0.1\n")
    with pytest.raises(ConfigError, match="data.copy_mix mixes copy documents into text and needs data.kind"):
        load_config(recipe_path)


@pytest.fixture(scope="module")
def with_copy(tmp_path_factory, tokenizer_dir, text_prefix, with_recall):
    """(the recall fixture's passkey + recall build, the same recipe with copy documents added)."""
    tasks, _, _ = with_recall
    copies, _ = _build(tmp_path_factory.mktemp("copy"), tokenizer_dir, text_prefix, "copies", passkey_mix=0.3,
                       recall_mix=0.4, copy_mix=0.2, eod_mask_loss=True, synthetic=SYNTHETIC)
    return tasks, copies


def test_copy_documents_take_their_share_after_the_other_tasks_which_stay_as_they_were(with_copy):
    tasks, copies = with_copy
    n = 400
    copied = {i for i in range(n) if copies.is_copy(i)}
    assert abs(len(copied) / n - 0.2) < 4 * (0.2 * 0.8 / n) ** 0.5, len(copied)
    for name in ("passkey_at", "is_recall"):
        before = {i for i in range(n) if getattr(tasks, name)(i) not in (None, False)}
        assert before == {i for i in range(n) if getattr(copies, name)(i) not in (None, False)}
        assert not before & copied
    for i in [i for i in range(60) if i not in copied][:20]:
        assert torch.equal(copies[i]["tokens"], tasks[i]["tokens"]), i
        assert torch.equal(copies[i]["loss_mask"], tasks[i]["loss_mask"]), i



def test_worker_processes_read_the_mixed_documents_the_training_process_reads(with_copy, tmp_path, tokenizer_dir,
                                                                               text_prefix):
    """data.num_workers > 0 starts fresh interpreters (moba_train.data.sampler): the mix of all three tasks
    travels to them pickled and must give them the batches read in this process."""
    _, copies = with_copy
    cfg = recipe(tmp_path, tokenizer_dir, [text_prefix], eod_mask_loss=True)
    rank = SimpleNamespace(rank=0, dp_rank=0, dp=1)
    inline = list(itertools.islice(build_dataloader(copies, cfg, rank, 0, num_workers=0), 12))
    spawned = list(itertools.islice(build_dataloader(copies, cfg, rank, 0, num_workers=2), 12))
    assert all(torch.equal(x[key], y[key]) for x, y in zip(inline, spawned) for key in x)

def test_a_copy_document_repeats_the_start_of_its_text_and_carries_the_loss_on_the_repeats(with_copy):
    tasks, copies = with_copy
    periods = []
    for i in [i for i in range(200) if copies.is_copy(i)][:30]:
        x, plain = copies[i], tasks[i]  # sample i is text in the build without copies
        document = np.concatenate([x["tokens"].numpy(), x["labels"][-1:].numpy()])
        text = np.concatenate([plain["tokens"].numpy(), plain["labels"][-1:].numpy()])
        assert len(document) == SEQ + 1 and np.array_equal(x["labels"][:-1].numpy(), x["tokens"][1:].numpy())
        # The shortest start of its own text that, tiled, gives the document.
        period = next(p for p in range(1, SEQ + 1) if np.array_equal(document, np.resize(text[:p], SEQ + 1)))
        assert 16 <= period <= (SEQ + 1) // 2
        # The loss: exactly the labels that repeat an earlier token (label j is document[j + 1]).
        assert np.array_equal(x["loss_mask"].numpy(), (np.arange(SEQ) + 1 >= period).astype(np.float32))
        assert x["cu_seqlens"].tolist() == [0, SEQ] and torch.equal(x["position_ids"], torch.arange(SEQ))
        periods.append(period)
    # Log-uniform from 16 to 128: short and long reaches both occur.
    assert len(periods) == 30 and min(periods) < 32 and max(periods) > 64


def test_the_passkey_check_asks_for_keys_hidden_in_validation_text_with_the_loss_on_the_key_only(
        mixed_and_plain, tokenizer_dir):
    """train.eval_passkey's documents: held-out sample i's own text around a needle at depth 0, 1/4, ... in turn,
    the question, then the key's tokens as the last labels, and the loss mask on exactly those."""
    _, _, _, valid = mixed_and_plain
    tokenizer = load_tokenizer(str(tokenizer_dir))
    question = np.asarray(_encode(tokenizer_dir, PasskeyTask.QUESTION))
    check = PasskeyValidationDataset(valid, tokenizer, size=12, seed=7, seq_length=SEQ)
    keys = set()
    for i in range(len(check)):
        key, depth = check.key_at(i)
        keys.add(key)
        assert depth == PASSKEY_EVAL_DEPTHS[i % 5] and 10_000 <= key < 100_000
        x, text = check[i], valid[i % len(valid)]
        answer = np.asarray(_encode(tokenizer_dir, f" {key}"))
        k = len(answer)
        assert x["loss_mask"].tolist() == [0] * (SEQ - k) + [1] * k
        assert np.array_equal(x["labels"][-k:].numpy(), answer)
        document = np.concatenate([x["tokens"].numpy(), x["labels"][-1:].numpy()])
        assert np.array_equal(document[-k - len(question) : -k], question)
        stated = np.concatenate([_encode(tokenizer_dir, PasskeyTask.NEEDLE[0]), answer,
                                 _encode(tokenizer_dir, PasskeyTask.NEEDLE[2])])
        filler = SEQ - len(stated) - len(question) - (k - 1)
        start = round(depth * filler)
        assert np.array_equal(document[start : start + len(stated)], stated)
        haystack = np.concatenate([text["tokens"].numpy(), text["labels"][-1:].numpy()])[:filler]
        assert np.array_equal(np.concatenate([document[:start], document[start + len(stated) : -k - len(question)]]),
                              haystack)
        assert x["cu_seqlens"].tolist() == [0, SEQ] and torch.equal(x["position_ids"], torch.arange(SEQ))
    assert len(keys) > 6  # keys drawn per document
    again = PasskeyValidationDataset(valid, tokenizer, size=12, seed=7, seq_length=SEQ)
    assert all(torch.equal(again[i]["tokens"], check[i]["tokens"]) for i in (9, 2, 5))


def test_the_passkey_check_rounds_up_to_whole_micro_batches_and_refuses_what_it_cannot_do(
        mixed_and_plain, tokenizer_dir, tmp_path):
    _, _, _, valid = mixed_and_plain
    cfg = load_config(None, ["data.kind=indexed", f"data.tokenizer={tokenizer_dir}", "data.blend=[x]",
                             "train.micro_batch_size=2", "train.eval_interval=5", "train.eval_passkey=5",
                             f"train.seq_length={SEQ}", "attention.block_size=64"])

    class Env:
        dp = 2

    assert len(build_passkey_validation(cfg, Env, valid)) == 8  # 5 prompts -> two passes of 2 x 2
    with pytest.raises(DataError, match="the validation split is empty; give data.split a validation share"):
        PasskeyValidationDataset([], load_tokenizer(str(tokenizer_dir)), size=4, seed=0, seq_length=SEQ)
    with pytest.raises(DataError, match=r"train.seq_length \(16\) cannot hold a passkey needle and question"):
        PasskeyValidationDataset(valid, load_tokenizer(str(tokenizer_dir)), size=4, seed=0, seq_length=16)
    with pytest.raises(ConfigError, match="train.eval_passkey hides keys in held-out text at every evaluation"):
        load_config(None, ["train.eval_passkey=4", "train.eval_interval=5"])  # the synthetic kind
    with pytest.raises(ConfigError, match="needs data.kind 'indexed' and train.eval_interval > 0"):
        load_config(None, ["data.kind=indexed", "data.blend=[x]", "train.eval_passkey=4"])
