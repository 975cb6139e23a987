"""scripts/pretrain.py as a user runs it: config mistakes give one stderr line and exit code 2 (no
traceback); a 2-process run warns nothing on stderr and says once which implementations Megatron-Core
uses; the README demo (`make demo`: build the embedded corpus, then torchrun the tiny recipe with
2 processes; shortened here) trains with a falling loss and leaves a complete checkpoint with its config."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "pretrain.py"
TINY = ROOT / "configs" / "tiny_moba.yaml"


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}


def _pretrain(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=_env(), timeout=300)


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--config", str(TINY), "train.lrr=1e-4"], "unknown key 'train.lrr'; did you mean 'train.lr'?"),
        (["--config", str(TINY), "model.num_layers=three"], "invalid value for 'model.num_layers' ('three')"),
        (["--config", str(TINY), "attention.topk=0"], "invalid value for 'attention.topk' (0)"),
        (["--config", "configs/does_not_exist.yaml"], "config file 'configs/does_not_exist.yaml' does not exist"),
    ],
    ids=["unknown-key", "bad-type", "bad-value", "missing-file"],
)
def test_config_error_is_one_stderr_line_and_exit_code_2(args, expected):
    result = _pretrain(*args)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], result.stderr
    assert result.stdout == ""


def test_unknown_key_in_the_recipe_file_names_the_file(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(TINY.read_text().replace("  topk: 3", "  top_k: 3"))
    result = _pretrain("--config", str(recipe))
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: {recipe}: unknown key 'attention.top_k'; did you mean 'attention.topk'?"


def test_a_recipe_that_is_not_utf8_text_is_one_line(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_bytes(TINY.read_bytes() + b"# caf\xe9 (Latin-1)\n")
    result = _pretrain("--config", str(recipe), "--dry-run")
    assert result.returncode == 2
    assert result.stderr.strip() == (f"error: {recipe}: not UTF-8 text (byte 0xe9 at offset "
                                      f"{len(TINY.read_bytes()) + 5}); save it as UTF-8")


def test_overrides_may_follow_the_options():
    from moba_train.cli import parse_recipe

    cfg, args = parse_recipe(["--config", str(TINY), "train.steps=50", "--dry-run", "train.lr=1e-4"], "pretrain",
                             dry_run=True)
    assert (cfg.train.steps, cfg.train.lr, args.dry_run) == (50, 1e-4, True)
    with pytest.raises(SystemExit):  # argparse's usage line and exit code 2
        parse_recipe(["--config", str(TINY), "--dry-run", "--world-size", "-2"], "pretrain", dry_run=True)


def test_demo_command_trains_two_processes_with_falling_loss_and_final_checkpoint(tmp_path):
    # `make demo`, shortened: build the embedded corpus as `make data` does, then torchrun the recipe on it.
    corpus = tmp_path / "corpus"
    built = subprocess.run([sys.executable, str(ROOT / "scripts" / "build_corpus.py"), "--out-dir", str(corpus)],
                           capture_output=True, text=True, env=_env(), timeout=300)
    assert built.returncode == 0, built.stderr[-3000:]
    steps = 12
    result = subprocess.run(
        # `python -m torch.distributed.run` is torchrun, whatever PATH holds
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(SCRIPT),
         "--config", str(TINY),
         f"run.output_dir={tmp_path / 'run'}", f"train.steps={steps}", "train.warmup_steps=2", "train.log_interval=4",
         "logging.progress_bar=off", f"data.blend=[{corpus / 'python'}]", f"data.tokenizer={corpus / 'tokenizer'}"],
        capture_output=True, text=True, env=_env(), timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "# resolved config (2 process(es), cpu, tp=1 cp=1 dp=2)" in result.stdout
    log_lines = [line for line in result.stdout.splitlines() if line.startswith("step ")]
    assert [line.split(" | ")[0] for line in log_lines] == ["step 4/12", "step 8/12", "step 12/12"]
    assert all("tokens/s" in line and "TFLOP/s/GPU" in line and "ETA" in line for line in log_lines)
    metrics = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    losses = [json.loads(line)["train/loss"] for line in metrics]
    assert len(losses) == steps
    # From ln(512) ~ 6.24 at random init to ~5.7 after 12 steps on Python source (untrained stays at ~6.2).
    assert max(losses[-3:]) < losses[0] - 0.3
    final = tmp_path / "run" / "checkpoints" / f"step_{steps:08d}"
    assert (final / "COMPLETE").is_file() and (final / "config.yaml").is_file()


def test_a_two_process_run_warns_nothing_and_names_megatrons_implementations_once(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(SCRIPT), "--config",
         str(TINY), f"run.output_dir={tmp_path}", "train.steps=1", "train.warmup_steps=0", "train.seq_length=256",
         "logging.progress_bar=off", "data.kind=synthetic"],
        capture_output=True, text=True, env=_env(), timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr == ""  # Megatron-Core's import-time fallback warnings were 14 lines per rank
    [line] = [line for line in result.stdout.splitlines() if line.startswith("Megatron-Core ")]
    te, apex = (importlib.util.find_spec(name) is not None for name in ("transformer_engine", "apex"))
    assert ("no Transformer Engine" in line) != te and ("no Apex" in line) != apex
    if not te and not apex:
        assert line.endswith("on PyTorch fallbacks (no Transformer Engine, no Apex): optimizer "
                             "torch.optim.adamw.AdamW, torch norms, local multi-tensor ops")
