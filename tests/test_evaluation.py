"""Evaluation on tiny CPU models: loss by position equals a direct computation; the passkey generator
places the needle where it says and the scorer accepts only the exact answer; a model that can attend
only within its own block fails far needles and far recall facts while the same weights with full
attention pass; checkpoint and Hugging Face export load to the same logits; bad paths and flags are
one clear error."""

from __future__ import annotations

import math
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from moba_train import checksums, convert, distributed
from moba_train.attention.naive import moba_selection_naive
from moba_train.checkpointing import save_model_checkpoint
from moba_train.config import Config, ConfigError, load_config
from moba_train.core_attention import MoBACoreAttention
from moba_train.data.corpus import train_tokenizer
from moba_train.data.mix import COPY_MIN_PERIOD, TaskMixDataset
from moba_train.data.passkey import PasskeyTask, place_needle
from moba_train.data.preprocess import load_tokenizer
from moba_train.data.synthetic import EOD, FACT, QUERY, SyntheticRecallDataset
from moba_train.diagnostics import attention_inputs
from moba_train.evaluation import (
    answer_predictions,
    copy_accuracy,
    copy_documents,
    exact_answer,
    gate_recall_by_position,
    length_label,
    load_model,
    logits,
    loss_by_position,
    passkey_accuracy,
    recall_accuracy,
)
from moba_train.model import build_model

VOCAB = 250


SINGLE_PROCESS = Config.model_validate({"run": {"device": "cpu"}, "attention": {"mode": "full"}})


@pytest.fixture(scope="module", autouse=True)
def single_process():
    distributed.init_distributed(SINGLE_PROCESS)
    yield
    distributed.destroy_distributed()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A random 2-layer GQA Llama trained with MoBA (block 16, top-2), saved as a model-only checkpoint."""
    cfg = Config.model_validate({
        "model": {"num_layers": 2, "hidden_size": 64, "ffn_hidden_size": 160, "num_attention_heads": 4,
                  "num_query_groups": 2, "vocab_size": VOCAB, "make_vocab_size_divisible_by": 64,
                  "max_position_embeddings": 512, "init_method_std": 0.2},
        "attention": {"mode": "moba", "block_size": 16, "topk": 2},
        "train": {"seq_length": 64},
    })
    distributed.set_seed(3)
    path = tmp_path_factory.mktemp("ckpt") / "step_00000001"
    save_model_checkpoint(path, build_model(cfg), cfg)
    return path


def random_windows(count: int, length: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, VOCAB, (count, length))


# --- loss by position ---------------------------------------------------------------------------


def test_loss_by_position_equals_a_direct_computation(checkpoint):
    loaded = load_model(checkpoint)
    windows = random_windows(5, 65)
    report = loss_by_position(loaded, windows, bucket_size=16, trailing_tokens=8, batch_size=2)

    tokens, labels = torch.from_numpy(windows[:, :-1]), torch.from_numpy(windows[:, 1:])
    with torch.no_grad():  # the whole padded vocabulary, as the model's own loss counts it
        raw = loaded.model(tokens, torch.arange(64).expand(5, 64), attention_mask=None)
    direct = F.cross_entropy(raw.reshape(-1, raw.shape[-1]).double(), labels.reshape(-1), reduction="none")
    per_position = direct.reshape(5, 64).mean(0).numpy()
    assert report["windows"] == 5 and report["seq_length"] == 64
    assert [(b["start"], b["end"]) for b in report["buckets"]] == [(0, 16), (16, 32), (32, 48), (48, 64)]
    expected = [per_position[a : a + 16].mean() for a in range(0, 64, 16)]
    np.testing.assert_allclose([b["loss"] for b in report["buckets"]], expected, rtol=0, atol=1e-5)
    assert report["trailing_loss"] == pytest.approx(per_position[-8:].mean(), abs=1e-5)
    assert report["loss"] == pytest.approx(per_position.mean(), abs=1e-5)
    assert math.log(VOCAB) * 0.5 < report["loss"]  # a random model: the buckets are not trivially equal
    assert np.ptp([b["loss"] for b in report["buckets"]]) > 1e-3
    # A window shorter than the trailing span: the trailing loss is the whole window's, and says so.
    longer = loss_by_position(loaded, windows, bucket_size=16, trailing_tokens=100, batch_size=2)
    assert longer["trailing_tokens"] == 64 and longer["trailing_loss"] == pytest.approx(report["loss"], abs=1e-6)


def test_passkey_plot_labels_a_context_in_k_only_when_it_is_whole_thousands_of_1024():
    assert [length_label(n) for n in (512, 1536, 2048, 2560, 8192)] == ["512", "1536", "2K", "2560", "8K"]


# --- copying -----------------------------------------------------------------------------------


def _gate_recall_reference(loaded, windows, block, topk, bucket):
    """Per position bucket, mean over MoBA layers of the mean over windows, positions and heads of the dense
    causal softmax mass (float64, every earlier key of the window) on the blocks the naive selection picks."""
    captured = {}
    modules = [m for m in loaded.model.modules() if isinstance(m, MoBACoreAttention)]
    handles = [m.register_forward_pre_hook(
        lambda module, args, kwargs, i=i: captured.__setitem__(i, attention_inputs(module, args, kwargs)[:3]),
        with_kwargs=True) for i, m in enumerate(modules)]
    try:
        logits(loaded, torch.from_numpy(windows[:, :-1]))
    finally:
        for h in handles:
            h.remove()
    s = windows.shape[1] - 1
    per_layer = []
    for q, k, cu in captured.values():
        picks = moba_selection_naive(q.float(), k.float(), cu_seqlens=cu, block_size=block, topk=topk)
        heads, group = q.shape[1], q.shape[1] // k.shape[1]
        recall = np.zeros((len(windows), s))
        for w in range(len(windows)):
            for p in range(s):
                t = w * s + p
                for h in range(heads):
                    scores = (k[w * s:t + 1, h // group].double() @ q[t, h].double()) / math.sqrt(q.shape[-1])
                    probs = torch.softmax(scores, 0)
                    blocks = torch.arange(p + 1) // block
                    kept = torch.isin(blocks, picks[t, h][picks[t, h] >= 0].long())
                    recall[w, p] += probs[kept].sum().item() / heads
        per_layer.append([recall[:, a:a + bucket].mean() for a in range(0, s, bucket)])
    return np.mean(per_layer, axis=0)


def test_gate_recall_by_position_equals_a_direct_computation(checkpoint):
    """The share of dense attention's mass on what MoBA attends, per 16-token bucket (every position), against
    the naive selection and a float64 softmax; exactly 1 in the blocks whose queries see every earlier block
    (the first two at top-2), below 1 after; 1 everywhere when top-k covers every block; none under full
    attention."""
    loaded = load_model(checkpoint)
    windows = random_windows(3, 65, seed=4)
    report = gate_recall_by_position(loaded, windows, bucket_size=16, queries_per_bucket=16, batch_size=2)
    got = np.array([b["gate_recall"] for b in report["buckets"]])
    assert [(b["start"], b["end"]) for b in report["buckets"]] == [(0, 16), (16, 32), (32, 48), (48, 64)]
    np.testing.assert_allclose(got, _gate_recall_reference(loaded, windows, 16, 2, 16), rtol=0, atol=2e-5)
    np.testing.assert_allclose(got[:2], 1.0, atol=1e-6)
    assert (got[2:] < 0.99).all()
    assert set(report["layers"]) == {"layer_00", "layer_01"}
    wide = gate_recall_by_position(load_model(checkpoint, ["attention.topk=4"]), windows, bucket_size=16)
    np.testing.assert_allclose([b["gate_recall"] for b in wide["buckets"]], 1.0, atol=1e-6)
    assert gate_recall_by_position(load_model(checkpoint, ["attention.mode=full"]), windows) is None


def test_copy_documents_tile_the_start_of_their_window_with_periods_apart_from_trainings():
    windows = random_windows(40, 256, seed=3)
    docs = copy_documents(windows, seed=3)
    periods = [period for _, period in docs]
    for window, (doc, period) in zip(windows, docs):
        assert COPY_MIN_PERIOD <= period <= 128
        np.testing.assert_array_equal(doc, np.resize(window[:period], 256))
    assert min(periods) < 32 and max(periods) > 64  # log-uniform over 16..128
    training = TaskMixDataset.__new__(TaskMixDataset)  # only copy_document's field
    training.seed = 3
    assert periods != [training.copy_document(i, window)[1] for i, window in enumerate(windows)]


@torch.no_grad()
def test_copy_accuracy_equals_a_direct_computation_and_counts_only_the_repeats(checkpoint):
    loaded = load_model(checkpoint)
    docs = copy_documents(random_windows(7, 65), seed=1)
    report = copy_accuracy(loaded, docs, batch_size=3)

    hits, losses, periods, first = [], [], [], []
    for doc, period in docs:
        raw = loaded.model(torch.from_numpy(doc[None, :-1]), torch.arange(64)[None], attention_mask=None)
        scores = raw[0, :, :VOCAB].double()
        targets = torch.from_numpy(doc[1:])
        loss = F.cross_entropy(scores, targets, reduction="none").numpy()
        hit = (scores.argmax(-1) == targets).numpy()
        hits.append(hit[period - 1:])  # position j predicts doc[j + 1]: the repeats start at j = period - 1
        losses.append(loss[period - 1:])
        periods.append(period)
        first.append(hit[: period - 1])
    assert report["documents"] == 7 and report["tokens"] == sum(65 - p for p in periods)
    assert report["loss"] == pytest.approx(np.concatenate(losses).mean(), abs=1e-5)
    assert report["token_accuracy"] == pytest.approx(np.concatenate(hits).mean(), abs=1e-9)
    assert report["first_period_token_accuracy"] == pytest.approx(np.concatenate(first).mean(), abs=1e-9)
    assert sum(b["documents"] for b in report["by_period"]) == 7
    for bucket in report["by_period"]:
        low, high = bucket["periods"]
        rows = [i for i, p in enumerate(periods) if low <= p < high]
        assert bucket["documents"] == len(rows) > 0 and high == 4 * low
        assert bucket["loss"] == pytest.approx(np.concatenate([losses[i] for i in rows]).mean(), abs=1e-5)

    # Documents whose every scored token is the model's own greedy prediction score 1; a one-token shift of
    # the scored positions would score about 1 / vocabulary.
    greedy = []
    for doc, period in docs:
        doc = doc.copy()
        for j in range(period - 1, 64):
            raw = loaded.model(torch.from_numpy(doc[None, : j + 1]), torch.arange(j + 1)[None], attention_mask=None)
            doc[j + 1] = int(raw[0, -1, :VOCAB].argmax())
        greedy.append((doc, period))
    assert copy_accuracy(loaded, greedy, batch_size=4)["token_accuracy"] == 1.0


# --- passkey generator and scorer ---------------------------------------------------------------


@pytest.mark.parametrize("context_length", [12, 40, 101])
@pytest.mark.parametrize("depth", [0.0, 0.3, 0.5, 1.0])
def test_needle_is_placed_at_the_depth_it_says_in_order_haystack(context_length, depth):
    haystack = np.arange(100, 300)
    needle = (np.array([1, 2]), np.array([7, 8, 9]), np.array([3]))
    question = np.array([4, 5])
    sample = place_needle(haystack, needle, question, context_length, depth)
    filler = context_length - 6 - 2 - 2  # the answer's first two tokens are read by the scoring pass too
    assert len(sample.tokens) + 2 == context_length and sample.tokens.dtype == np.int64
    assert sample.needle_start == round(depth * filler)
    assert sample.tokens[sample.needle_start : sample.needle_start + 6].tolist() == [1, 2, 7, 8, 9, 3]
    assert sample.tokens[-2:].tolist() == [4, 5] and sample.answer.tolist() == [7, 8, 9]
    rest = np.delete(sample.tokens[:-2], range(sample.needle_start, sample.needle_start + 6))
    assert rest.tolist() == haystack[:filler].tolist()  # the haystack, in order, around the needle
    if depth == 0:
        assert sample.needle_start == 0
    if depth == 1:
        assert sample.needle_start + 6 == len(sample.tokens) - 2  # the needle ends where the question begins


def test_passkey_task_states_the_key_in_the_needle_and_asks_for_it_at_the_end(tmp_path):
    texts = ["def add(a, b):\n    return a + b  # 0123456789\n", "The pass key is 31415. Remember it.\n"] * 20
    tokenizer = load_tokenizer(train_tokenizer(texts, 300, tmp_path / "tok"))
    haystack = np.asarray(tokenizer("".join(texts) * 5)["input_ids"])
    task = PasskeyTask(tokenizer, haystack, seed=7)
    keys = set()
    for depth in (0.0, 0.5, 1.0):
        sample = task.sample(400, depth, index=3)
        assert sample.tokens.tolist() == task.sample(400, depth, index=3).tokens.tolist()  # a pure function
        key = tokenizer.decode(sample.answer.tolist())
        assert key.startswith(" ") and key.strip().isdigit() and len(key.strip()) == 5
        keys.add(key)
        needle = np.concatenate([task.before, sample.answer, task.after])
        assert sample.tokens[sample.needle_start : sample.needle_start + len(needle)].tolist() == needle.tolist()
        assert tokenizer.decode(needle.tolist()) == f"\n# The pass key is{key}. Remember it.\n"
        assert tokenizer.decode(sample.tokens[-len(task.question):].tolist()).endswith("The pass key is")
        assert len(sample.tokens) + len(sample.answer) - 1 == 400
    assert len(keys) == 3


def test_scorer_accepts_only_the_exact_answer():
    answer = np.array([11, 12, 13])
    assert exact_answer(np.array([11, 12, 13]), answer)
    for wrong in ([11, 12, 14], [11, 12], [11, 12, 13, 13], [], [13, 12, 11]):
        assert not exact_answer(np.array(wrong, dtype=np.int64), answer), wrong


# --- a model that retrieves, with full attention or only within its block ------------------------

# Vocabulary of 64, laid out as the synthetic recall task lays out a vocabulary of 64:
# EOD 0, FACT 1, QUERY 2, filler 3..22, keys 23..42, values 43..62.
FILLER, KEYS, VALUES = range(3, 23), range(23, 43), range(43, 63)


@pytest.fixture(scope="module")
def retriever(tmp_path_factory):
    """A one-layer Llama (Hugging Face directory) with hand-set weights: at every key token, one head
    attends to the value tokens before it and writes the value's identity, which the output layer
    reads out; with no value in view it predicts EOD. Attention is content-based: query and key live in
    the lowest-frequency RoPE pair (a rotation below 1e-3 rad over these lengths)."""
    hidden, head_dim = 64, 32
    config = LlamaConfig(vocab_size=64, hidden_size=hidden, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, head_dim=head_dim, max_position_embeddings=1024,
                         rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 1e7},
                         tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    value_flag, key_flag, default_flag, neutral = 20, 21, 22, 63
    slot = head_dim // 2 - 1  # the pair (15, 31) turns slowest
    state = {name: torch.zeros_like(t) for name, t in model.state_dict().items()}
    emb = state["model.embed_tokens.weight"]
    emb[[EOD, FACT, QUERY, 63], neutral] = 1
    for i, token in enumerate(FILLER):
        emb[token, 23 + i] = 1
    for token in KEYS:
        emb[token, [key_flag, default_flag]] = 1
    for i, token in enumerate(VALUES):
        emb[token, [i, value_flag]] = 1
    layer = "model.layers.0."
    state[layer + "self_attn.q_proj.weight"][slot, key_flag] = 2.5
    state[layer + "self_attn.k_proj.weight"][slot, value_flag] = 2.5
    for i in range(len(VALUES)):
        state[layer + "self_attn.v_proj.weight"][i, i] = 1
        state[layer + "self_attn.o_proj.weight"][i, i] = 1
        state["lm_head.weight"][VALUES[i], i] = 1
    state["lm_head.weight"][EOD, default_flag] = 1
    for norm in (layer + "input_layernorm.weight", layer + "post_attention_layernorm.weight", "model.norm.weight"):
        state[norm] += 1  # down_proj stays zero: the MLP adds nothing
    model.load_state_dict(state)
    path = tmp_path_factory.mktemp("retriever")
    model.save_pretrained(path)
    return path


WINDOWED = ["attention.mode=moba", "attention.block_size=32", "attention.topk=1"]  # its own 32-token block only


def needle_sampler(seed: int = 0):
    def sample(length: int, depth: float, index: int):
        rng = np.random.default_rng([seed, length, round(depth * 100), index])
        haystack = rng.choice(FILLER, size=length)
        needle = (np.array([FACT]), np.array([rng.choice(VALUES)]), np.array([], dtype=np.int64))
        return place_needle(haystack, needle, np.array([QUERY, rng.choice(KEYS)]), length, depth)

    return sample


def test_a_model_that_attends_only_within_its_block_fails_far_needles_while_full_attention_passes(retriever):
    depths = [0.0, 0.5, 1.0]
    full = passkey_accuracy(load_model(retriever), needle_sampler(), [128, 256], depths, samples=4, batch_size=4)
    windowed = passkey_accuracy(load_model(retriever, WINDOWED), needle_sampler(), [128, 256], depths, samples=4,
                                batch_size=4)
    assert full["accuracy"] == [[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]]
    assert windowed["accuracy"] == [[0.0, 0.0, 1.0], [0.0, 0.0, 1.0]]  # only the needle beside the question


def test_scoring_counts_a_prediction_only_when_it_is_the_needles_answer(retriever):
    loaded = load_model(retriever)
    sample = needle_sampler()(128, 0.5, 0)
    true = sample.answer
    other = np.array([VALUES[(VALUES.index(int(true[0])) + 1) % len(VALUES)]])
    (predicted,) = answer_predictions(loaded, [sample])
    assert exact_answer(predicted, true) and not exact_answer(predicted, other)


def test_recall_accuracy_is_full_with_full_attention_and_counts_only_facts_in_view_within_a_block(retriever):
    dataset = SyntheticRecallDataset(num_samples=12, seq_length=256, vocab_size=64, num_facts=1, key_tokens=1,
                                     value_tokens=1, answers_only_loss=True, seed=5, split=1)
    full = recall_accuracy(load_model(retriever), dataset, batch_size=6)
    windowed = recall_accuracy(load_model(retriever, WINDOWED), dataset, batch_size=6)
    in_view = []
    for i in range(len(dataset)):  # the direct count: is the planted value in the query's 32-token block?
        doc, is_answer = dataset.document(i)
        query_key = int(np.flatnonzero(is_answer)[0]) - 1
        fact_value = int(np.flatnonzero(doc == doc[query_key + 1])[0])
        in_view.append(fact_value // 32 == query_key // 32)
    assert full["facts"] == windowed["facts"] == 12
    assert full["fact_accuracy"] == full["token_accuracy"] == 1.0
    assert windowed["fact_accuracy"] == pytest.approx(np.mean(in_view)) and windowed["fact_accuracy"] < 0.5
    assert full["answer_loss"] < windowed["answer_loss"]


# --- loading paths ------------------------------------------------------------------------------


@pytest.mark.parametrize("attention", [["attention.mode=full"],
                                       ["attention.mode=moba", "attention.block_size=16", "attention.topk=2"]],
                         ids=["full", "moba"])
def test_checkpoint_and_its_hugging_face_export_load_to_the_same_logits(checkpoint, tmp_path, attention):
    convert.export_hf(checkpoint, tmp_path / "hf", dtype=torch.float32)
    tokens = torch.from_numpy(random_windows(2, 64, seed=1))
    from_checkpoint = logits(load_model(checkpoint, attention), tokens)
    from_hf = logits(load_model(tmp_path / "hf", attention), tokens)
    assert from_checkpoint.shape == (2, 64, VOCAB) and from_checkpoint.std() > 0.1
    torch.testing.assert_close(from_hf, from_checkpoint, rtol=0, atol=1e-5)


def test_a_rope_flag_applies_to_a_checkpoint_and_its_hugging_face_export_alike(checkpoint, tmp_path):
    # RoPE is no weight: evaluating at another base (e.g. to probe a context extension) is a flag on either path.
    convert.export_hf(checkpoint, tmp_path / "hf", dtype=torch.float32)
    tokens = torch.from_numpy(random_windows(1, 64, seed=4))
    flag = ["attention.mode=full", "model.rope_theta=20000"]
    from_checkpoint = logits(load_model(checkpoint, flag), tokens)
    from_hf = logits(load_model(tmp_path / "hf", flag), tokens)
    torch.testing.assert_close(from_hf, from_checkpoint, rtol=0, atol=1e-5)
    assert (from_checkpoint - logits(load_model(checkpoint, flag[:1]), tokens)).abs().max() > 1e-3


def test_the_attention_flag_changes_how_a_checkpoint_attends(checkpoint):
    tokens = torch.from_numpy(random_windows(1, 64, seed=2))
    trained = logits(load_model(checkpoint), tokens)
    moba = logits(load_model(checkpoint, ["attention.mode=moba"]), tokens)
    full = logits(load_model(checkpoint, ["attention.mode=full"]), tokens)
    torch.testing.assert_close(trained, moba, rtol=0, atol=0)  # as trained: MoBA
    assert (full - moba)[0, 32:].abs().max() > 1e-3  # past two blocks, top-2 MoBA sees less than full
    torch.testing.assert_close(full[0, :32], moba[0, :32], rtol=0, atol=1e-5)  # within two blocks they agree


def test_a_checkpoint_of_a_tensor_parallel_run_loads_in_a_process_of_its_own(checkpoint, tmp_path):
    # The recipe of a run with tensor parallel 2: evaluation starts a one-process set-up of its own,
    # builds the model unsplit, and the weights reshard.
    shutil.copytree(checkpoint, tmp_path / "step_00000001")
    recipe = tmp_path / "step_00000001/config.yaml"
    recipe.write_text(recipe.read_text().replace("tensor: 1", "tensor: 2"))
    checksums.write_manifest(tmp_path / "step_00000001")  # the edit is deliberate: record it, or loading finds damage
    assert load_config(recipe).parallel.tensor == 2
    tokens = torch.from_numpy(random_windows(1, 64, seed=3))
    expected = logits(load_model(checkpoint), tokens)
    distributed.destroy_distributed()  # the module's set-up: load_model must make its own
    try:
        torch.testing.assert_close(logits(load_model(tmp_path / "step_00000001"), tokens), expected, rtol=0, atol=0)
    finally:
        distributed.destroy_distributed()
        distributed.init_distributed(SINGLE_PROCESS)


def test_a_path_without_a_model_is_one_clear_error(tmp_path):
    with pytest.raises(ConfigError, match=r"is neither a moba-train checkpoint .* nor a Hugging Face model directory"):
        load_model(tmp_path / "missing")


def test_flags_that_change_the_weights_shapes_are_one_clear_error(checkpoint, retriever):
    with pytest.raises(ConfigError, match="holds a model with model.hidden_size=64 but the flags set 128"):
        load_model(checkpoint, ["model.hidden_size=128"])
    with pytest.raises(ConfigError, match="holds a model with model.num_layers=1 but the flags set 2"):
        load_model(retriever, ["model.num_layers=2"])


def test_held_out_data_with_ids_beyond_the_models_vocabulary_is_one_clear_error(checkpoint, tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    from moba_train.data.preprocess import DataError
    from moba_train.evaluation import EvalSettings, evaluate

    builder = IndexedDatasetBuilder(str(tmp_path / "held_out.bin"), dtype=np.uint16)
    for doc in ([5, 6, 7] * 30, [5, VOCAB + 3, 7] * 30):
        builder.add_document(torch.tensor(doc), [len(doc)])
    builder.finalize(str(tmp_path / "held_out.idx"))
    with pytest.raises(DataError, match=f"holds token id {VOCAB + 3} but the model has {VOCAB} tokens"):
        evaluate(load_model(checkpoint), EvalSettings(seq_length=32, windows=2), data_prefix=tmp_path / "held_out")
