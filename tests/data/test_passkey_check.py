"""train.eval_passkey, the in-training retrieval check (moba_train.training.passkey_check): its `val/passkey_loss`
and `val/passkey_found` equal a direct computation from the model's logits over the same documents, at the
'found' threshold in use and at thresholds that find half and all of them, in one process and on every rank of
two gloo processes as context parallel 2 and as data parallel 2; and a real training run under torchrun at
context parallel 2 logs the numbers a single process logs. Real Megatron-Core models, a real indexed dataset and
a trained BPE."""

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from test_indexed import docs_in_range, write_ids

from moba_train import distributed, training
from moba_train.config import load_config
from moba_train.data import build_datasets, build_passkey_validation
from moba_train.model import build_model

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "tiny_moba.yaml"


@pytest.fixture(scope="module")
def text_prefix(tmp_path_factory):
    rng = np.random.default_rng(8)
    return write_ids(tmp_path_factory.mktemp("text") / "text", docs_in_range(rng, 3, 290, 300, length=(20, 200)))


def _overrides(output_dir, tokenizer_dir, prefix) -> list[str]:
    return [f"run.output_dir={output_dir}", "run.device=cpu", "data.kind=indexed", f"data.blend=[{prefix}]",
            f"data.tokenizer={tokenizer_dir}", "data.split=80,20,0", "train.seq_length=256",
            "attention.block_size=32", "attention.topk=2", "train.micro_batch_size=1", "train.global_batch_size=2",
            "train.steps=2", "train.warmup_steps=1", "train.eval_interval=2", "train.eval_steps=1",
            "train.eval_passkey=6", "train.log_interval=1", "checkpoint.interval=2", "logging.progress_bar=off"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _check_worker(rank: int, world: int, port: int, overrides: list, state: dict, thresholds: list, want: list):
    """One rank of `world` (context or data parallel, as `overrides` say): the check on the reference weights
    must give every rank the single-process numbers, at each 'found' threshold."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    cfg = load_config(TINY, overrides)
    env = distributed.init_distributed(cfg)
    try:
        distributed.set_seed(3)
        model = build_model(cfg)
        with torch.no_grad():
            for name, param in model.named_parameters():
                param.copy_(state[name])
        _, valid = build_datasets(cfg, env)
        documents = build_passkey_validation(cfg, env, valid)
        for threshold, expected in zip(thresholds, want):
            training.FOUND = threshold
            assert training.passkey_check(model, documents, cfg, env) == pytest.approx(expected, rel=1e-5), rank
    finally:
        distributed.destroy_distributed()


def test_the_check_equals_a_direct_computation_on_one_and_on_two_ranks(tmp_path, tokenizer_dir, text_prefix,
                                                                      monkeypatch):
    overrides = _overrides(tmp_path / "run", tokenizer_dir, text_prefix)
    cfg = load_config(TINY, overrides)
    env = distributed.init_distributed(cfg)
    try:
        distributed.set_seed(3)
        model = build_model(cfg)
        state = {name: p.detach().clone() for name, p in model.named_parameters()}
        _, valid = build_datasets(cfg, env)
        documents = build_passkey_validation(cfg, env, valid)
        assert len(documents) == 6
        key_losses = []
        with torch.no_grad():
            model.eval()
            for i in range(len(documents)):
                x = documents[i]
                logits = model(x["tokens"][None], x["position_ids"][None], attention_mask=None)[0]
                losses = F.cross_entropy(logits[:, : cfg.model.vocab_size].float(), x["labels"], reduction="none")
                key_losses.append(losses[x["loss_mask"].bool()])
            model.train()
        want_loss = float(torch.cat(key_losses).mean())
        assert want_loss == pytest.approx(math.log(cfg.model.vocab_size), rel=0.1)  # a random model guesses
        worst = sorted(float(d.max()) for d in key_losses)
        thresholds = [training.FOUND, (worst[2] + worst[3]) / 2, worst[-1] + 1.0]  # none, half, all found
        want = [{"val/passkey_loss": want_loss,
                 "val/passkey_found": float(np.mean([bool((d < t).all()) for d in key_losses]))} for t in thresholds]
        assert [w["val/passkey_found"] for w in want[1:]] == [0.5, 1.0]
        for threshold, expected in zip(thresholds, want):
            monkeypatch.setattr(training, "FOUND", threshold)
            assert training.passkey_check(model, documents, cfg, env) == pytest.approx(expected, rel=1e-5)
    finally:
        distributed.destroy_distributed()
    for parallel in (["parallel.context=2"], []):  # context parallel 2, data parallel 2
        mp.spawn(_check_worker, args=(2, _free_port(), overrides + parallel, state, thresholds, want), nprocs=2,
                 join=True)


def _run(output_dir: Path, tokenizer_dir, prefix, processes: int, *extra: str) -> dict:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"] \
        if processes > 1 else [sys.executable]
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    result = subprocess.run(
        [*launcher, str(ROOT / "scripts" / "pretrain.py"), "--config", str(TINY),
         *_overrides(output_dir, tokenizer_dir, prefix), *extra],
        capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return next(r for r in records if r["step"] == 2)


def test_two_processes_log_what_one_process_logs(tmp_path, tokenizer_dir, text_prefix):
    one = _run(tmp_path / "one", tokenizer_dir, text_prefix, 1)
    assert 0 < one["val/passkey_loss"] and 0 <= one["val/passkey_found"] <= 1
    two = _run(tmp_path / "cp2", tokenizer_dir, text_prefix, 2, "parallel.context=2")
    assert two["val/passkey_loss"] == pytest.approx(one["val/passkey_loss"], rel=1e-4)
    assert two["val/passkey_found"] == one["val/passkey_found"]
