"""Evaluation of trained models: validation loss, loss by position, passkey retrieval, synthetic recall,
copying.

    loaded = load_model("runs/x/checkpoints", ["attention.mode=full"])  # or an exported Hugging Face directory
    windows = validation_windows("data/site_corpus/python_valid", seq_length=8192, count=64)
    report = loss_by_position(loaded, windows)                           # mean, per 1K bucket, the last 1K
    task = PasskeyTask(load_tokenizer(...), haystack=token_stream(prefix))
    grid = passkey_accuracy(loaded, task.sample, lengths=[2048, 8192], depths=[0, 0.5, 1], samples=20)

Models. `load_model` builds our Megatron-Core Llama (so every attention plan, the hybrid included, runs
through the code that trained it) in one process from a moba-train checkpoint (its recorded recipe,
any tensor-parallel size: the weights are resharded on loading) or from a Hugging
Face Llama directory (its config.json), applies `section.key=value` overrides (`attention.mode=full`
evaluates a MoBA-trained model with full attention, `attention.mode=moba` the reverse), and loads the
weights. Overrides may change how the model attends (attention.*), the device, the RoPE settings; not
the shapes of its weights. It starts a one-process torch.distributed / Megatron set-up when none
exists; `moba_train.distributed.destroy_distributed()` ends it.

Windows. Validation text is a Megatron indexed dataset (e.g. the held-out packages of
moba_train.data.corpus). *Packed* windows cut the documents, concatenated with their EOD tokens as
training packs them, into consecutive `seq_length + 1` token windows: the validation loss. *Long
document* windows are the first `seq_length + 1` tokens of each document at least that long: loss by
position there measures what a longer context is worth (the last 1K tokens of an 8K window of one
document can use 7K tokens of that document).

Passkey retrieval (needle in a haystack). A sample is `context_length` tokens: haystack text with a
needle at `depth` (0: the needle starts the context, 1: it ends right before the question), then the
question; the answer is the key's tokens. Scoring is exact: a sample counts only if every answer
token is the model's top prediction given the prompt and the answer's earlier tokens (teacher forcing,
one forward pass), which is exactly when greedy decoding would write the answer.

Synthetic recall (moba_train.data.synthetic): each queried value token is predicted from the
document before it; a fact counts when all its value tokens are right.

Copying (moba_train.data.mix copy documents: the start of a held-out text window tiled): every repeated
token is predicted from the ones before it; accuracy by period says how far back the model finds what to
copy, and the accuracy on the first reading of the same text is the baseline without copying.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from moba_train.checkpointing import is_complete, latest_checkpoint, load_model_weights
from moba_train.config import Config, ConfigError, load_config
from moba_train.data.mix import COPY_MIN_PERIOD, copy_document
from moba_train.data.passkey import PasskeySample, PasskeyTask
from moba_train.data.preprocess import DataError
from moba_train.data.synthetic import SyntheticRecallDataset
from moba_train.staging import write_file, write_json

WEIGHT_SHAPE_FIELDS = (
    "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups", "head_dim",
    "vocab_size", "make_vocab_size_divisible_by", "tie_embeddings",
)
"""Model fields that decide the shapes of the weights: flags cannot change them."""
ONE_PROCESS = ("parallel.tensor=1", "parallel.context=1", "parallel.sequence_parallel=false")
"""Evaluation runs in one process; dist_checkpointing reshards a tensor-parallel checkpoint on loading."""


@dataclass
class LoadedModel:
    """A model ready for evaluation: eval mode, in the recipe's compute precision (bf16 on CUDA)."""

    model: torch.nn.Module
    config: Config
    source: Path
    """The checkpoint directory or Hugging Face directory the weights came from."""

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def vocab_size(self) -> int:
        return self.config.model.vocab_size


def _hf_recipe_overrides(hf_dir: Path) -> list[str]:
    """The recipe a Hugging Face directory implies, as overrides: its model section, full attention,
    and evaluation windows up to its context length."""
    from moba_train.convert import model_config_from_hf, read_hf_config

    model = model_config_from_hf(read_hf_config(hf_dir))
    fields = [f"model.{key}={json.dumps(value)}" for key, value in model.model_dump(mode="json").items()]
    return fields + ["attention.mode=full", f"train.seq_length={model.max_position_embeddings}"]


def _check_weight_shapes(trained: Config, asked: Config, source: Path) -> None:
    for field in WEIGHT_SHAPE_FIELDS:
        theirs, ours = getattr(trained.model, field), getattr(asked.model, field)
        if theirs != ours:
            raise ConfigError(f"'{source}' holds a model with model.{field}={theirs!r} but the flags set {ours!r}; "
                              f"drop that flag (the weights' shapes are fixed)")


def _start_single_process(cfg: Config) -> None:
    from moba_train.distributed import init_distributed

    if not dist.is_initialized():
        init_distributed(cfg)
    elif dist.get_world_size() != 1:
        raise ConfigError("evaluation runs in one process; run it with python, not torchrun")


def load_model(path: str | os.PathLike, overrides: Sequence[str] = ()) -> LoadedModel:
    """The model of a moba-train checkpoint (a step_* directory, or a checkpoint root: its newest) or of
    a Hugging Face Llama directory, with `section.key=value` overrides (see the module docstring).

    ConfigError (one sentence) when `path` holds neither, or the overrides disagree with the weights.
    """
    from moba_train.distributed import set_seed

    path = Path(path)
    checkpoint = path if is_complete(path) else latest_checkpoint(path)
    if checkpoint is not None:
        trained = load_config(checkpoint / "config.yaml")
        cfg = load_config(checkpoint / "config.yaml", [*ONE_PROCESS, *overrides])
        source = checkpoint
    elif (path / "config.json").is_file():
        base = _hf_recipe_overrides(path)
        trained = load_config(None, base)
        cfg = load_config(None, base + list(overrides))
        source = path
    else:
        raise ConfigError(f"'{path}' is neither a moba-train checkpoint (a step_* directory or a directory holding "
                          "one) nor a Hugging Face model directory (config.json); pass one of them")
    _check_weight_shapes(trained, cfg, source)
    _start_single_process(cfg)
    set_seed(cfg.run.seed)
    # Hugging Face weights are checked and mapped against their own recipe: an override may change the RoPE, not them.
    model = model_with_weights(cfg, source, hugging_face=checkpoint is None,
                               weights_recipe=cfg.model_copy(update={"model": trained.model}))
    return LoadedModel(model, cfg, source)


def model_with_weights(cfg: Config, source: Path, *, hugging_face: bool, weights_recipe: Config | None = None):
    """`cfg`'s model (under the current parallel layout; collective) with the weights at `source`, a checkpoint or
    with `hugging_face` a Hugging Face directory (read by `weights_recipe`, default `cfg`), in eval mode and in the
    recipe's compute precision (bf16 on CUDA)."""
    from megatron.core.transformer.module import Float16Module

    from moba_train.distributed import resolve_device
    from moba_train.model import build_model, compute_dtype

    model = build_model(cfg)
    if hugging_face:
        from moba_train.convert import load_hf_weights

        load_hf_weights(model, source, weights_recipe or cfg)
    else:
        load_model_weights(source, model)
    model.eval()
    if compute_dtype(cfg, resolve_device(cfg)) == torch.bfloat16:
        model = Float16Module(model.config, model)
    return model


# ---------------------------------------------------------------------------------------------
# Forward passes


def windows_batch(windows: torch.Tensor) -> dict:
    """A micro-batch (moba_train.model batch contract) of token windows int64 [b, s + 1]: one sequence each."""
    b, s = windows.shape[0], windows.shape[1] - 1
    return {
        "tokens": windows[:, :-1],
        "labels": windows[:, 1:],
        "loss_mask": torch.ones(b, s),
        "position_ids": torch.arange(s).expand(b, s),
        "cu_seqlens": torch.arange(0, (b + 1) * s, s, dtype=torch.int32),
    }


@torch.no_grad()
def logits(loaded: LoadedModel, tokens: torch.Tensor) -> torch.Tensor:
    """fp32 logits [b, s, vocab] (the real vocabulary, without padding rows) for tokens int64 [b, s]."""
    tokens = tokens.to(loaded.device)
    position_ids = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
    out = loaded.model(tokens, position_ids, attention_mask=None)
    return out[..., : loaded.vocab_size].float()


def _check_tokens(loaded: LoadedModel, tokens: np.ndarray, what: str) -> None:
    if tokens.size and int(tokens.max()) >= loaded.vocab_size:
        raise DataError(f"{what} holds token id {int(tokens.max())} but the model's vocabulary has "
                        f"{loaded.vocab_size} tokens; evaluate with the tokenizer and data the model was trained on")


def _batches(count: int, batch_size: int) -> list[range]:
    return [range(i, min(i + batch_size, count)) for i in range(0, count, batch_size)]


# ---------------------------------------------------------------------------------------------
# Validation loss and loss by position


def token_stream(prefix: str | os.PathLike) -> np.ndarray:
    """All tokens of the indexed dataset at `prefix`, documents concatenated in order (EOD included)."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from moba_train.data.indexed import check_indexed_dataset

    check_indexed_dataset(str(prefix))
    ds = IndexedDataset(str(prefix))
    return np.concatenate([np.asarray(ds[i], dtype=np.int64) for i in range(len(ds))])


def validation_windows(prefix: str | os.PathLike, seq_length: int, count: int,
                       long_documents: bool = False) -> np.ndarray:
    """int64 [n, seq_length + 1] windows of the indexed dataset at `prefix` (see the module docstring):
    at most `count`, evenly spaced over what there is. DataError when there is not one."""
    if long_documents:
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        from moba_train.data.indexed import check_indexed_dataset

        check_indexed_dataset(str(prefix))
        ds = IndexedDataset(str(prefix))
        long = np.flatnonzero(ds.sequence_lengths >= seq_length + 1)
        chosen = long[np.unique(np.linspace(0, len(long) - 1, min(count, len(long))).round().astype(int))] \
            if len(long) else long
        windows = [np.asarray(ds.get(int(i), 0, seq_length + 1), dtype=np.int64) for i in chosen]
        what = f"document of at least {seq_length + 1} tokens"
    else:
        stream = token_stream(prefix)
        available = len(stream) // (seq_length + 1)
        starts = np.unique(np.linspace(0, available - 1, min(count, available)).round().astype(int)) \
            if available else []
        windows = [stream[s * (seq_length + 1) : (s + 1) * (seq_length + 1)] for s in starts]
        what = f"window of {seq_length + 1} tokens"
    if not windows:
        raise DataError(f"'{prefix}' holds no {what}; evaluate a shorter sequence length or with more data")
    return np.stack(windows)


@torch.no_grad()
def loss_by_position(loaded: LoadedModel, windows: np.ndarray, *, bucket_size: int = 1024,
                     trailing_tokens: int = 1024, batch_size: int = 4, progress: bool = False) -> dict:
    """Cross-entropy of every window [n, s + 1]: the mean, the mean per position bucket (`bucket_size`
    tokens each, the last one possibly shorter), and the mean over the last `trailing_tokens` positions."""
    from moba_train.model import token_losses

    _check_tokens(loaded, windows, "the validation data")
    rows = []
    for batch in tqdm(_batches(len(windows), batch_size), desc="loss by position", disable=not progress):
        rows.append(token_losses(loaded.model, windows_batch(torch.from_numpy(windows[batch]))).cpu().numpy())
    losses = np.concatenate(rows)  # [n, s]
    per_position = losses.mean(axis=0)
    s = losses.shape[1]
    trailing_tokens = min(trailing_tokens, s)  # a window shorter than the trailing span: all of it
    buckets = [{"start": a, "end": min(a + bucket_size, s), "loss": float(per_position[a : a + bucket_size].mean())}
               for a in range(0, s, bucket_size)]
    return {"windows": len(windows), "seq_length": s, "loss": float(losses.mean()),
            "trailing_tokens": trailing_tokens, "trailing_loss": float(per_position[-trailing_tokens:].mean()),
            "buckets": buckets}


@torch.no_grad()
def forward_capturing(loaded: LoadedModel, windows: np.ndarray, modules: dict[int, torch.nn.Module],
                      capture: Callable, *, batch_size: int, desc: str, progress: bool = False) -> None:
    """Forward `windows` (int64 [n, s + 1]) through the model in batches, calling `capture(layer, module, q, k,
    cu_seqlens)` with what each of `modules` ({layer: core attention}) receives (`diagnostics.attention_inputs`).
    Under context parallelism (the trainer's probe, `induction.probe_start`) each rank forwards its shard of every
    batch, and q, k are that shard's."""
    from moba_train.diagnostics import attention_inputs
    from moba_train.model import local_batch, token_losses

    def hook(layer: int, module, args, kwargs) -> None:
        q, k, cu_seqlens, _ = attention_inputs(module, args, kwargs)
        capture(layer, module, q, k, cu_seqlens)

    handles = [module.register_forward_pre_hook(functools.partial(hook, layer), with_kwargs=True)
               for layer, module in modules.items()]
    try:
        for batch in tqdm(_batches(len(windows), batch_size), desc=desc, disable=not progress):
            # No [b, s, vocab] logits kept; under context parallelism this rank's shard.
            token_losses(loaded.model, local_batch(windows_batch(torch.from_numpy(windows[batch]))))
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def gate_recall_by_position(loaded: LoadedModel, windows: np.ndarray, *, bucket_size: int = 1024,
                            queries_per_bucket: int = 16, batch_size: int = 4, seed: int = 0,
                            progress: bool = False) -> dict | None:
    """Where MoBA's gate finds what full attention would read: for every MoBA layer, at `queries_per_bucket`
    positions drawn in each position bucket (the same in every window), the share of exact dense causal
    attention's probability mass (its own q and k, fp32 softmax over every earlier key) that falls on the
    keys MoBA attends, averaged over heads, windows and the bucket's positions (`diagnostics.query_gate_recall`).
    1 where a query has no more earlier blocks than topk - 1. None for a model without MoBA layers."""
    from moba_train.core_attention import MoBACoreAttention
    from moba_train.diagnostics import layer_index, query_gate_recall

    if queries_per_bucket < 1:
        raise ConfigError(f"gate recall needs at least 1 position per bucket, not {queries_per_bucket}; pass a "
                          "positive --gate-recall (or 0 to skip it)")
    modules = {layer_index(name): module for name, module in loaded.model.named_modules()
               if isinstance(module, MoBACoreAttention)}
    if not modules:
        return None
    _check_tokens(loaded, windows, "the validation data")
    s = windows.shape[1] - 1
    edges = [(a, min(a + bucket_size, s)) for a in range(0, s, bucket_size)]
    rng = np.random.default_rng(seed)
    positions = np.concatenate([np.sort(rng.choice(np.arange(a, b), min(queries_per_bucket, b - a), replace=False))
                                for a, b in edges])
    bucket_of = np.searchsorted([b for _, b in edges], positions, side="right")
    sums = {layer: np.zeros(len(edges)) for layer in modules}

    def capture(layer: int, module: MoBACoreAttention, q, k, cu_seqlens) -> None:
        starts = cu_seqlens[:-1].long()
        queries = (starts[:, None] + torch.from_numpy(positions).to(starts.device)[None, :]).reshape(-1)
        recall = query_gate_recall(q, k, cu_seqlens, block_size=module.block_size, topk=module.topk,
                                   softmax_scale=module.softmax_scale, queries=queries,
                                   shared_gqa_selection=module.shared_gqa_selection)
        np.add.at(sums[layer], bucket_of, recall.view(len(starts), -1).sum(0).cpu().numpy())

    forward_capturing(loaded, windows, modules, capture, batch_size=batch_size, desc="gate recall", progress=progress)
    counts = len(windows) * np.bincount(bucket_of, minlength=len(edges))  # recalls summed into each bucket
    per_layer = {layer: sums[layer] / counts for layer in sorted(modules)}
    mean = np.mean(list(per_layer.values()), axis=0)
    return {"windows": len(windows), "seq_length": s, "queries_per_bucket": queries_per_bucket,
            "buckets": [{"start": a, "end": b, "gate_recall": float(r)} for (a, b), r in zip(edges, mean)],
            "layers": {f"layer_{layer:02d}": recall.tolist() for layer, recall in per_layer.items()}}


# ---------------------------------------------------------------------------------------------
# Passkey retrieval


def exact_answer(predicted: np.ndarray, answer: np.ndarray) -> bool:
    """True only when `predicted` is exactly the answer's tokens."""
    return len(predicted) == len(answer) and bool(np.array_equal(predicted, answer))


@torch.no_grad()
def answer_predictions(loaded: LoadedModel, samples: list[PasskeySample]) -> list[np.ndarray]:
    """The model's top token at every answer position of each sample, teacher-forced: int64 [k] each.
    One forward pass over prompt + answer[:-1], right-padded (causal: padding never reaches them)."""
    inputs = [np.concatenate([s.tokens, s.answer[:-1]]) for s in samples]
    width = max(len(x) for x in inputs)
    batch = torch.zeros(len(inputs), width, dtype=torch.int64)
    for row, x in enumerate(inputs):
        batch[row, : len(x)] = torch.from_numpy(x)
    top = logits(loaded, batch).argmax(dim=-1).cpu().numpy()
    return [top[row, len(s.tokens) - 1 : len(s.tokens) - 1 + len(s.answer)] for row, s in enumerate(samples)]


def passkey_accuracy(loaded: LoadedModel, sample: Callable[[int, float, int], PasskeySample],
                     lengths: Sequence[int], depths: Sequence[float], samples: int, *, batch_size: int = 4,
                     progress: bool = False) -> dict:
    """Exact-answer accuracy on a grid of context lengths x needle depths, `samples` prompts per cell,
    from `sample(context_length, depth, index)` (e.g. PasskeyTask.sample)."""
    accuracy = np.zeros((len(lengths), len(depths)))
    with tqdm(total=len(lengths) * len(depths) * samples, desc="passkey", disable=not progress) as bar:
        for i, length in enumerate(lengths):
            for j, depth in enumerate(depths):
                correct = 0
                for batch in _batches(samples, batch_size):
                    prompts = [sample(length, depth, index) for index in batch]
                    for prompt in prompts:
                        _check_tokens(loaded, prompt.tokens, "a passkey prompt")
                    predicted = answer_predictions(loaded, prompts)
                    correct += sum(exact_answer(p, s.answer) for p, s in zip(predicted, prompts))
                    bar.update(len(batch))
                accuracy[i, j] = correct / samples
    return {"lengths": list(lengths), "depths": list(depths), "samples": samples,
            "accuracy": accuracy.round(6).tolist(), "mean_by_length": accuracy.mean(axis=1).round(6).tolist()}


# ---------------------------------------------------------------------------------------------
# Synthetic recall


def recall_dataset(cfg: Config, documents: int) -> SyntheticRecallDataset:
    """The validation split of the recipe's synthetic recall task (moba_train.data.synthetic)."""
    syn = cfg.data.synthetic
    return SyntheticRecallDataset(
        num_samples=documents, seq_length=cfg.train.seq_length, vocab_size=cfg.model.vocab_size,
        num_facts=syn.num_facts, key_tokens=syn.key_tokens, value_tokens=syn.value_tokens,
        answers_only_loss=True, seed=cfg.run.seed, split=1, id_range=syn.id_range,
    )


@torch.no_grad()
def recall_accuracy(loaded: LoadedModel, dataset: SyntheticRecallDataset, *, batch_size: int = 4,
                    progress: bool = False) -> dict:
    """Fact accuracy (every value token of a queried fact right), token accuracy and loss on the
    recalled value tokens, over every document of `dataset`."""
    correct, losses = [], []
    for batch in tqdm(_batches(len(dataset), batch_size), desc="recall", disable=not progress):
        docs = [dataset.document(i) for i in batch]
        tokens = torch.from_numpy(np.stack([doc[:-1] for doc, _ in docs]))
        _check_tokens(loaded, tokens.numpy(), "the synthetic recall task")
        out = logits(loaded, tokens)
        for row, (doc, is_answer) in enumerate(docs):
            positions = torch.from_numpy(np.flatnonzero(is_answer[1:])).to(out.device)
            labels = torch.from_numpy(doc[1:]).to(out.device)[positions]
            row_logits = out[row, positions]
            correct.append((row_logits.argmax(-1) == labels).cpu().numpy())
            losses.append(torch.nn.functional.cross_entropy(row_logits, labels, reduction="none").cpu().numpy())
    tokens_right = np.stack(correct)  # [documents, facts * value_tokens], queries in order
    facts_right = tokens_right.reshape(len(tokens_right), -1, dataset.value_tokens).all(axis=-1)
    return {"documents": len(dataset), "facts": int(facts_right.size), "fact_accuracy": float(facts_right.mean()),
            "token_accuracy": float(tokens_right.mean()), "answer_loss": float(np.concatenate(losses).mean())}


# ---------------------------------------------------------------------------------------------
# Copying


COPY_EVAL_STREAM = 0xC0E7
"""Seeds the evaluation's copy documents apart from training's (moba_train.data.mix.COPY_MIX_STREAM)."""


def copy_documents(windows: np.ndarray, seed: int = 0) -> list[tuple[np.ndarray, int]]:
    """One copy document per text window int64 [count, seq_length + 1] (e.g. `validation_windows`): the
    window's first `period` tokens tiled, as training's copy documents tile their sample's text
    (moba_train.data.mix.copy_document), with the periods drawn from another stream."""
    return [copy_document(window, np.random.default_rng([seed, COPY_EVAL_STREAM, i]))
            for i, window in enumerate(windows)]


@torch.no_grad()
def copy_accuracy(loaded: LoadedModel, documents: list[tuple[np.ndarray, int]], *, batch_size: int = 4,
                  progress: bool = False) -> dict:
    """Token accuracy and loss on the repeats of copy documents (every token from the second period on,
    predicted from the ones before it: what training's copy documents carry the loss on), over all
    documents and by period bucket: [16, 64), [64, 256), ... The period is how far back the copied token
    stands, so a model that cannot reach that far fails the long periods' buckets. `first_period` scores
    the same text where it is read the first time (tokens 1 to period - 1): what the model predicts with
    nothing to copy, the baseline the repeats improve on."""
    hits, losses, periods, first = [], [], [], []
    for batch in tqdm(_batches(len(documents), batch_size), desc="copy", disable=not progress):
        docs = [documents[i] for i in batch]
        tokens = np.stack([doc[:-1] for doc, _ in docs])
        _check_tokens(loaded, tokens, "the copy documents")
        out = logits(loaded, torch.from_numpy(tokens))
        predicted = out.argmax(-1).cpu().numpy()  # position j predicts doc[j + 1]
        for row, (doc, period) in enumerate(docs):
            first.append(predicted[row, : period - 1] == doc[1:period])
            hits.append(predicted[row, period - 1:] == doc[period:])  # the repeats: j >= period - 1
            labels = torch.from_numpy(doc[period:]).to(out.device)
            loss = torch.nn.functional.cross_entropy(out[row, period - 1:], labels, reduction="none")
            losses.append(loss.cpu().numpy())
            periods.append(period)

    def summary(rows: list[int]) -> dict:
        return {"documents": len(rows), "tokens": int(sum(hits[i].size for i in rows)),
                "token_accuracy": float(np.concatenate([hits[i] for i in rows]).mean()),
                "loss": float(np.concatenate([losses[i] for i in rows]).mean())}

    buckets, low = [], COPY_MIN_PERIOD
    while low <= max(periods):
        rows = [i for i, p in enumerate(periods) if low <= p < 4 * low]
        if rows:
            buckets.append({"periods": [low, 4 * low], **summary(rows)})
        low *= 4
    return {**summary(list(range(len(periods)))), "by_period": buckets,
            "first_period_token_accuracy": float(np.concatenate(first).mean())}


# ---------------------------------------------------------------------------------------------
# Everything at once


@dataclass(frozen=True)
class EvalSettings:
    """What `evaluate` measures; lengths in tokens."""

    seq_length: int | None = None  # None: the recipe's train.seq_length
    windows: int = 64
    bucket_size: int = 1024
    trailing_tokens: int = 1024
    passkey_lengths: tuple[int, ...] = ()
    passkey_depths: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    passkey_samples: int = 20
    recall_documents: int = 0
    copy_documents: int = 0
    gate_recall_queries: int = 0  # per position bucket of the long documents; 0: not measured
    batch_size: int = 4
    seed: int = 0

    def __post_init__(self):
        """ConfigError (one sentence) for settings that would fail, or mean nothing, after the model is loaded."""
        for name in ("seq_length", "windows", "bucket_size", "trailing_tokens", "passkey_samples", "batch_size"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"evaluation setting {name} is {getattr(self, name)}; it must be at least 1")
        if any(not 0 <= depth <= 1 for depth in self.passkey_depths):
            raise ConfigError(f"passkey depths {list(self.passkey_depths)} are not all in [0, 1] (0: the start of the "
                              "context, 1: right before the question); pass depths between 0 and 1")


def _passkey_task(cfg: Config, settings: EvalSettings, data_prefix, tokenizer) -> PasskeyTask:
    """The passkey prompts' task (haystack from `data_prefix`); ConfigError before any work when a context
    length cannot hold the needle, the question and the answer."""
    from moba_train.data.preprocess import load_tokenizer

    tokenizer = tokenizer or cfg.data.tokenizer
    if tokenizer is None:
        raise ConfigError("passkey prompts need a tokenizer and the recipe names none; pass --tokenizer")
    task = PasskeyTask(load_tokenizer(tokenizer), token_stream(data_prefix), seed=settings.seed)
    if min(settings.passkey_lengths) < task.shortest_context():
        raise ConfigError(f"a passkey context of {min(settings.passkey_lengths)} tokens cannot hold the needle, "
                          f"question and answer; pass lengths of at least {task.shortest_context()} tokens")
    return task


def evaluate(loaded: LoadedModel, settings: EvalSettings, data_prefix: str | os.PathLike | None = None,
             tokenizer: str | os.PathLike | None = None, progress: bool = False) -> dict:
    """Validation loss and loss by position (packed and long-document windows of `data_prefix`; on the
    latter, the MoBA gate's recall by position when `gate_recall_queries` is set), passkey
    accuracy (haystack from `data_prefix`, needles through `tokenizer`, default the recipe's
    data.tokenizer), synthetic recall accuracy (the recipe's task), copying accuracy (held-out copy documents
    of `seq_length`); each only when asked for."""
    cfg = loaded.config
    settings = dataclasses.replace(settings, seq_length=settings.seq_length or cfg.train.seq_length)
    results = {"model": str(loaded.source), "attention": {
        "mode": cfg.attention.mode, "layer_kinds": cfg.layer_kinds(), "block_size": cfg.attention.block_size,
        "topk": cfg.attention.topk}, "settings": dataclasses.asdict(settings)}
    if data_prefix is not None:
        from moba_train.data.indexed import check_indexed_dataset

        check_indexed_dataset(str(data_prefix), cfg.model.vocab_size)  # ids the embedding has rows for
        task = _passkey_task(cfg, settings, data_prefix, tokenizer) if settings.passkey_lengths else None
        options = dict(bucket_size=settings.bucket_size, trailing_tokens=settings.trailing_tokens,
                       batch_size=settings.batch_size, progress=progress)
        windows = validation_windows(data_prefix, settings.seq_length, settings.windows)
        results["validation"] = loss_by_position(loaded, windows, **options)
        try:
            long = validation_windows(data_prefix, settings.seq_length, settings.windows, long_documents=True)
            results["long_documents"] = loss_by_position(loaded, long, **options)
            if settings.gate_recall_queries:
                results["gate_recall"] = gate_recall_by_position(
                    loaded, long, bucket_size=settings.bucket_size, queries_per_bucket=settings.gate_recall_queries,
                    batch_size=settings.batch_size, seed=settings.seed, progress=progress)
        except DataError:
            results["long_documents"] = None  # no held-out document is that long
        if task is not None:
            results["passkey"] = passkey_accuracy(loaded, task.sample, settings.passkey_lengths,
                                                  settings.passkey_depths, settings.passkey_samples,
                                                  batch_size=settings.batch_size, progress=progress)
    if settings.recall_documents:
        results["recall"] = recall_accuracy(loaded, recall_dataset(cfg, settings.recall_documents),
                                            batch_size=settings.batch_size, progress=progress)
    if settings.copy_documents:
        if data_prefix is None:
            raise ConfigError("copy documents repeat held-out text; pass its indexed prefix (--data)")
        windows = validation_windows(data_prefix, settings.seq_length, settings.copy_documents)
        results["copy"] = copy_accuracy(loaded, copy_documents(windows, settings.seed),
                                        batch_size=settings.batch_size, progress=progress)
    return results


# ---------------------------------------------------------------------------------------------
# Outputs


def write_report(results: dict, out_dir: str | os.PathLike, label: str = "model") -> list[Path]:
    """<out_dir>/eval.json, loss_by_position.png (packed and long-document windows) and passkey.png."""
    out_dir = Path(out_dir)
    written = [write_json(out_dir / "eval.json", results)]
    curves = {f"{label}, {name.replace('_', ' ')}": results[key]
              for key, name in (("validation", "packed windows"), ("long_documents", "long documents"))
              if results.get(key)}
    if curves:
        written.append(plot_loss_by_position(curves, out_dir / "loss_by_position.png"))
    if results.get("passkey"):
        written.append(plot_passkey({label: results["passkey"]}, out_dir / "passkey.png"))
    return written


def report_summary(results: dict) -> str:
    """A few lines for the console: the headline numbers of `evaluate`'s results."""
    lines = []
    if results.get("validation"):
        v = results["validation"]
        lines.append(f"validation loss {v['loss']:.4f} over {v['windows']} windows of {v['seq_length']} tokens")
    if results.get("long_documents"):
        d = results["long_documents"]
        lines.append(f"long documents ({d['windows']}): loss {d['loss']:.4f}, last {d['trailing_tokens']} tokens "
                     f"{d['trailing_loss']:.4f}")
    if results.get("gate_recall"):
        g = results["gate_recall"]
        lines.append("gate recall (dense attention's mass on the keys MoBA attends) by position: " + ", ".join(
            f"{b['start']}-{b['end']}: {100 * b['gate_recall']:.1f}%" for b in g["buckets"]))
    if results.get("passkey"):
        p = results["passkey"]
        lines.append("passkey exact-answer accuracy by context length: " + ", ".join(
            f"{n}: {100 * a:.0f}%" for n, a in zip(p["lengths"], p["mean_by_length"])))
    if results.get("recall"):
        r = results["recall"]
        lines.append(f"recall: {100 * r['fact_accuracy']:.1f}% of {r['facts']} facts, "
                     f"{100 * r['token_accuracy']:.1f}% of value tokens, answer loss {r['answer_loss']:.4f}")
    if results.get("copy"):
        c = results["copy"]
        lines.append(f"copy: {100 * c['token_accuracy']:.1f}% of {c['tokens']} repeated tokens (the first reading: "
                     f"{100 * c['first_period_token_accuracy']:.1f}%), loss {c['loss']:.4f}; "
                     "by period " + ", ".join(f"{b['periods'][0]}-{b['periods'][1]}: {100 * b['token_accuracy']:.1f}%"
                                              for b in c["by_period"]))
    return "\n".join(lines)


def save_figure(fig, path: str | os.PathLike) -> Path:
    """Save a pyplot figure as a PNG, atomically, and close it (saved or not)."""
    import matplotlib.pyplot as plt

    try:
        return write_file(path, lambda f: fig.savefig(f, format="png", dpi=120, bbox_inches="tight"))
    finally:
        plt.close(fig)


def plot_loss_by_position(reports: dict[str, dict], path: str | os.PathLike, title: str = "") -> Path:
    """One line per model: mean loss of each position bucket (loss_by_position reports)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, report in reports.items():
        centers = [(b["start"] + b["end"]) / 2 / 1024 for b in report["buckets"]]
        ax.plot(centers, [b["loss"] for b in report["buckets"]], marker="o", label=label)
    ax.set_xlabel("position in the window (K tokens, bucket centre)")
    ax.set_ylabel("cross-entropy (nats)")
    ax.set_title(title or "loss by position")
    ax.grid(alpha=0.3)
    ax.legend()
    return save_figure(fig, path)


def length_label(tokens: int) -> str:
    """A context length as a tick label: whole multiples of 1,024 in K, others in tokens."""
    return f"{tokens // 1024}K" if tokens % 1024 == 0 else str(tokens)


def plot_passkey(grids: dict[str, dict], path: str | os.PathLike) -> Path:
    """One heatmap per model: exact-answer accuracy by context length (rows) and needle depth (columns)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(grids), figsize=(3.2 * len(grids) + 1, 3.2), squeeze=False)
    image = None
    for ax, (label, grid) in zip(axes[0], grids.items()):
        acc = np.asarray(grid["accuracy"])
        image = ax.imshow(acc, vmin=0, vmax=1, cmap="viridis", aspect="auto")
        ax.set_xticks(range(len(grid["depths"])), [f"{d:g}" for d in grid["depths"]])
        ax.set_yticks(range(len(grid["lengths"])), [length_label(n) for n in grid["lengths"]])
        for (i, j), value in np.ndenumerate(acc):
            ax.text(j, i, f"{100 * value:.0f}", ha="center", va="center", color="w" if value < 0.6 else "k")
        ax.set_xlabel("needle depth")
        ax.set_title(label)
    axes[0][0].set_ylabel("context")
    fig.colorbar(image, ax=axes[0].tolist(), label="exact-answer accuracy")
    return save_figure(fig, path)
