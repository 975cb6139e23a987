"""Metric sinks: metrics.jsonl rewritten on resume, TensorBoard event files and W&B offline run files read
back (tests/wandb_offline.py), the online-without-credentials fallback, `disabled` writing nothing, and
a real short training run (W&B offline + TensorBoard + validation + diagnostics) resumed after a
simulated crash: the same W&B run, each step exactly once everywhere."""

import json
import math
import re
import shutil
import signal
from pathlib import Path

import numpy as np
import psutil
import pytest
import wandb_offline
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from moba_train.config import load_config
from moba_train.metrics import (
    PEAK_BF16_TFLOPS,
    ConsoleSink,
    Histogram,
    Image,
    JsonlSink,
    MetricLogger,
    TensorBoardSink,
    perf_metrics,
    read_jsonl,
)

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny_moba.yaml"
RUN = [  # 6 steps of 2 x 256 tokens, checkpoints at 3 and 6, validation and diagnostics at 3 and 6
    "train.steps=6", "train.warmup_steps=1", "train.lr_schedule=constant",  # extending steps keeps the lr
    "train.seq_length=256", "train.micro_batch_size=1",
    "train.global_batch_size=2", "train.log_interval=1", "train.eval_interval=3", "train.eval_steps=1",
    "checkpoint.interval=3", "checkpoint.keep_last=2", "data.kind=synthetic", "data.split=90,10,0",
    "attention.block_size=32", "logging.progress_bar=off", "logging.moba_diag_interval=3",
    "logging.moba_diag_queries=64", "logging.tensorboard=true", "logging.wandb.mode=offline",
    "logging.wandb.group=tests", "logging.wandb.tags=[tiny,cpu]", "logging.wandb.notes=a test run",
]


def _cfg(output_dir: Path, *overrides: str):
    return load_config(TINY, [f"run.output_dir={output_dir}", *RUN, *overrides])


def _tensorboard(run_dir: Path) -> EventAccumulator:
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "histograms": 0, "images": 0})
    events.Reload()
    return events


def _lines(messages: list[str]):
    return messages.append


def test_jsonl_resume_drops_the_steps_after_the_checkpoint_atomically(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "train/loss": 10.0 - s}) + "\n" for s in range(1, 9))
                    + '{"step": 9, "train/lo')  # an attempt interrupted mid-line after step 8
    messages = []
    sink = JsonlSink(path, start_step=5, write=_lines(messages))
    assert sink.previous_last_step == 8
    assert [r["step"] for r in read_jsonl(path)] == [1, 2, 3, 4, 5]
    sink.log(6, {"train/loss": 1.5, "moba/distance/layer_00": Histogram([0.0, 2.0], [-0.5, 0.5, 1.5])})
    sink.close()
    records = read_jsonl(path)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert records[-1]["moba/distance/layer_00"] == {"values": [0.0, 2.0], "edges": [-0.5, 0.5, 1.5]}
    assert messages == ["metrics.jsonl: dropped the steps after 5 (logged by the interrupted attempt); they are "
                        "logged again as they run"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]  # no temporary file left


def test_jsonl_fresh_start_moves_an_earlier_file_aside(tmp_path):
    path = tmp_path / "metrics.jsonl"
    earlier = json.dumps({"step": 1, "train/loss": 3.0}) + "\n"
    path.write_text(earlier)
    messages = []
    JsonlSink(path, start_step=0, write=_lines(messages)).close()
    aside = [p for p in tmp_path.iterdir() if p.name != "metrics.jsonl"]
    assert len(aside) == 1 and aside[0].read_text() == earlier and path.read_text() == ""
    assert messages == [f"{path} held an earlier run's steps (this run starts from step 0): moved to {aside[0]}"]


def test_console_prints_every_interval_the_last_step_and_each_validation_and_diagnostic():
    lines = []
    console = ConsoleSink(total_steps=5, start_step=0, log_interval=2, write=lines.append)
    for step in range(1, 6):
        metrics = {"train/loss": 2.0 / step, "train/lr": 1e-3, "train/grad_norm": float("nan"), "perf/mfu": 0.25,
                   "perf/memory_allocated_gib": 1.5, "train/skipped": int(step == 4)}
        if step == 3:
            metrics |= {"val/loss": 1.25, "moba/gate_recall": 0.875, "moba/distance/layer_00": Histogram([1.0], [0, 1])}
        console.log(step, metrics)
    assert [line.split(" | ")[:2] for line in lines] == [
        ["step 2/5", "loss 1.0000"], ["step 3/5", "val loss 1.2500"], ["step 3/5", "moba"], ["step 4/5", "loss 0.5000"],
        ["step 5/5", "loss 0.4000"]]
    assert lines[2] == "step 3/5 | moba | gate recall 0.875"
    assert "grad_norm nan | MFU 25.0% | mem 1.50 GiB | ETA" in lines[0] and lines[3].endswith("SKIPPED (non-finite)")
    assert lines[1] == "step 3/5 | val loss 1.2500"
    console.log(5, {"val/loss": 1.5, "val/passkey_loss": 2.25, "val/passkey_found": 0.375})  # train.eval_passkey
    assert lines[-1] == "step 5/5 | val loss 1.5000 | passkey loss 2.2500, found 38%"


def test_perf_metrics_follow_their_definitions():
    got = perf_metrics(step_time_s=2.0, data_time_s=0.5, tokens=8192, flops=4e15, world_size=4, cuda=False)
    assert got["perf/tokens_per_s"] == 4096
    assert got["perf/tflops_per_gpu"] == pytest.approx(4e15 / 2.0 / 4 / 1e12)
    assert got["perf/data_share"] == 0.25
    assert "perf/mfu" not in got  # no GPU peak to compare with on CPU
    assert PEAK_BF16_TFLOPS == 989.0
    assert 0 < got["system/rss_gib"] and 0 < got["system/host_memory_used"] <= 1


def test_tensorboard_sink_writes_scalars_histograms_and_images_and_purges_on_resume(tmp_path):
    from matplotlib.figure import Figure

    png = tmp_path / "heat.png"
    Figure(figsize=(2, 1)).savefig(png)
    sink = TensorBoardSink(tmp_path / "tensorboard", start_step=0)
    for step in (1, 2, 3):
        distance = Histogram([0.0, 3.0, 1.0], [-0.5, 0.5, 1.5, 2.5])
        sink.log(step, {"train/loss": 4.0 - step, "moba/distance/layer_00": distance, "moba/heatmap": Image(str(png))})
    sink.close()
    resumed = TensorBoardSink(tmp_path / "tensorboard", start_step=1)  # a crash after step 3, resumed from step 1
    resumed.log(2, {"train/loss": 20.0})
    resumed.close()

    events = _tensorboard(tmp_path)
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(1, 3.0), (2, 20.0)]
    hist = events.Histograms("moba/distance/layer_00")[0].histogram_value
    assert list(hist.bucket) == [0.0, 3.0, 1.0] and list(hist.bucket_limit) == [0.5, 1.5, 2.5]
    assert hist.num == 4 and hist.sum == pytest.approx(3 * 1 + 1 * 2)
    image = events.Images("moba/heatmap")[0]
    assert (image.width, image.height) == (200, 100)


def test_wandb_disabled_writes_nothing_but_metrics_jsonl(tmp_path):
    cfg = _cfg(tmp_path, "logging.wandb.mode=disabled", "logging.tensorboard=false")
    logger = MetricLogger(cfg, start_step=0, enabled=True)
    logger.log(1, {"train/loss": 2.0})
    logger.close()
    assert logger.wandb_run_id is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]


def test_other_ranks_write_nothing(tmp_path):
    logger = MetricLogger(_cfg(tmp_path), start_step=0, enabled=False)
    logger.log(1, {"train/loss": 2.0})
    logger.close()
    assert list(tmp_path.iterdir()) == []


def test_online_without_credentials_falls_back_to_offline_with_one_line(tmp_path, monkeypatch, capsys):
    for name in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_DIR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.netrc, no wandb settings
    monkeypatch.setenv("NETRC", str(tmp_path / "home" / ".netrc"))
    logger = MetricLogger(_cfg(tmp_path / "run", "logging.wandb.mode=online"), start_step=0, enabled=True)
    logger.log(1, {"train/loss": 2.0})
    logger.close()
    out = capsys.readouterr().out
    assert out.count("W&B: no API key configured") == 1 and "logging offline instead" in out
    (run_file,) = wandb_offline.offline_runs(tmp_path / "run" / "wandb")
    assert [row["train/loss"] for row in wandb_offline.history(run_file)] == [2.0]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A real 6-step run with W&B offline and TensorBoard."""
    from moba_train.training import train

    mp = pytest.MonkeyPatch()
    mp.setenv("WANDB_MODE", "offline")
    out = tmp_path_factory.mktemp("run")
    try:
        train(_cfg(out))
    finally:
        mp.undo()
    return out


TRAIN_KEYS = {"train/loss", "train/lr", "train/grad_norm", "train/skipped", "train/skipped_steps",
              "train/tokens_seen", "perf/step_time_s", "perf/data_time_s", "perf/data_share", "perf/tokens_per_s",
              "perf/tflops_per_gpu", "system/rss_gib", "system/host_memory_used"}
EVAL_KEYS = {"val/loss", "val/loss_by_position/0-64", "val/loss_by_position/64-128", "val/loss_by_position/128-192",
             "val/loss_by_position/192-256"}
DIAG_KEYS = {f"moba/{name}{layer}" for layer in ("", "/layer_00", "/layer_01")
             for name in ("gate_recall", "previous_block_share", "distance_mean", "first_block_share", "head_overlap")}
DIAG_KEYS |= {f"moba/{name}/layer_0{i}" for name in ("distance", "popularity") for i in (0, 1)}
DIAG_KEYS |= {"moba/heatmap", "moba/time_s"}


def test_a_short_run_writes_the_metrics_to_every_sink(run_dir):
    records = read_jsonl(run_dir / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert set(records[0]) == {"step"} | TRAIN_KEYS
    assert set(records[2]) == {"step"} | TRAIN_KEYS | EVAL_KEYS | DIAG_KEYS
    buckets = [records[2][key] for key in sorted(EVAL_KEYS - {"val/loss"})]
    assert records[2]["val/loss"] == pytest.approx(np.mean(buckets), rel=1e-5)  # synthetic data: every token counted
    assert records[2]["train/tokens_seen"] == 3 * 2 * 256
    assert (run_dir / records[2]["moba/heatmap"]).is_file()

    (run_file,) = wandb_offline.offline_runs(run_dir / "wandb")
    rows = wandb_offline.history(run_file)
    assert [row["_step"] for row in rows] == [1, 2, 3, 4, 5, 6]
    assert TRAIN_KEYS | EVAL_KEYS | DIAG_KEYS <= set(rows[2])
    assert [row["train/loss"] for row in rows] == [r["train/loss"] for r in records]
    assert rows[2]["moba/distance/layer_00"]["values"] == records[2]["moba/distance/layer_00"]["values"]
    assert rows[2]["moba/heatmap"]["_type"] == "image-file"
    config = wandb_offline.config(run_file)
    assert config["train"]["seq_length"] == 256 and config["attention"]["block_size"] == 32  # the resolved recipe
    assert config["attention_backends"] == {"moba": "torch", "full": "full_attention"}
    run = wandb_offline.run_record(run_file)
    assert (run.display_name, run.run_group, list(run.tags), run.notes) == ("tiny_moba", "tests", ["tiny", "cpu"],
                                                                          "a test run")

    events = _tensorboard(run_dir)
    assert TRAIN_KEYS | EVAL_KEYS | {k for k in DIAG_KEYS if not k.startswith(("moba/distance/", "moba/popularity/"))} \
        - {"moba/heatmap"} <= set(events.Tags()["scalars"])
    assert {"moba/distance/layer_00", "moba/popularity/layer_01"} <= set(events.Tags()["histograms"])
    assert events.Tags()["images"] == ["moba/heatmap"]
    assert [e.value for e in events.Scalars("train/loss")] == pytest.approx([r["train/loss"] for r in records])


def test_resume_after_a_crash_continues_the_wandb_run_with_each_step_once(run_dir, tmp_path, monkeypatch, capsys):
    """The attempt crashed after step 6 before its checkpoint completed (a .tmp_step directory, as an
    interrupted save leaves): the relaunch resumes from step 3 and trains on to step 8."""
    from moba_train.training import train

    monkeypatch.setenv("WANDB_MODE", "offline")
    out = tmp_path / "run"
    shutil.copytree(run_dir, out)
    (out / "checkpoints" / "step_00000006").rename(out / "checkpoints" / ".tmp_step_00000006")
    first = read_jsonl(out / "metrics.jsonl")
    train(_cfg(out, "train.steps=8"))
    printed = capsys.readouterr().out
    assert "at step 3" in printed and "steps up to 6 were already sent" in printed

    records = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, 9))
    assert [r["train/loss"] for r in records[:3]] == [r["train/loss"] for r in first[:3]]

    runs = wandb_offline.offline_runs(out / "wandb")
    assert len(runs) == 2
    from megatron.core import dist_checkpointing

    saved_id = dist_checkpointing.load_common_state_dict(str(out / "checkpoints" / "step_00000008"))["trainer"]
    assert [wandb_offline.run_record(path).run_id for path in runs] == [saved_id["wandb_run_id"]] * 2
    steps = [row["_step"] for path in runs for row in wandb_offline.history(path)]
    assert steps == list(range(1, 9))  # synced in order into one run: each step exactly once
    rows = {row["_step"]: row for path in runs for row in wandb_offline.history(path)}
    for r in records:  # resume is exact: the steps W&B kept from the first attempt agree with the rewritten file
        assert rows[r["step"]]["train/loss"] == pytest.approx(r["train/loss"], rel=1e-6)

    events = _tensorboard(out)
    assert [e.step for e in events.Scalars("train/loss")] == list(range(1, 9))
    assert all(math.isfinite(e.value) for e in events.Scalars("train/loss"))


def test_wandb_turned_on_at_a_resume_starts_a_new_run_that_gets_every_step_from_there(tmp_path, monkeypatch):
    # The first attempt logged steps 1-6 with W&B off, so its checkpoint (step 3) holds no W&B run: the new run
    # must get steps 4 on, not only those after the first attempt's last line.
    monkeypatch.setenv("WANDB_MODE", "offline")
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "train/loss": 1.0}) + "\n"
                                                    for s in range(1, 7)))
    logger = MetricLogger(_cfg(tmp_path), start_step=3, enabled=True, wandb_run_id=None)
    for step in (4, 5, 6, 7):
        logger.log(step, {"train/loss": 0.5})
    logger.close()
    runs = wandb_offline.offline_runs(tmp_path / "wandb")
    assert [row["_step"] for path in runs for row in wandb_offline.history(path)] == [4, 5, 6, 7]


def _stop_wandb_service(sig: int) -> None:
    """Signal W&B's service processes (children of this process), as SLURM signals every process of a step."""
    services = [p for p in psutil.Process().children(recursive=True) if "wandb" in " ".join(p.cmdline())]
    assert services, "W&B runs its service in a child process"
    for process in services:
        process.send_signal(sig)
    psutil.wait_procs(services, timeout=30)


def test_a_killed_wandb_service_stops_the_wandb_sink_with_one_line_and_training_goes_on(tmp_path, capsys):
    # SLURM signals every process of a job step, W&B's own service process included: the next log call
    # then failed with ConnectionResetError inside the trainer. The sink must say so once and step aside.
    logger = MetricLogger(_cfg(tmp_path, "logging.tensorboard=false"), start_step=0, enabled=True)
    logger.log(1, {"train/loss": 2.0})
    _stop_wandb_service(signal.SIGKILL)
    for step in (2, 3):
        logger.log(step, {"train/loss": 1.5})
    logger.close()
    assert capsys.readouterr().out.count("W&B stopped working") == 1
    assert [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [1, 2, 3]


def _numbers(record: dict) -> dict:
    return {key: value for key, value in record.items() if key != "step" and isinstance(value, (int, float))}


def test_a_resume_resends_the_steps_that_a_wandb_service_stopped_by_sigterm_never_wrote(tmp_path, capsys):
    # wandb-core buffers what it writes and exits on SIGTERM without writing it: the first attempt's file holds
    # none of steps 1-5 (perhaps a few). The attempt resumed from its checkpoint at step 3 sends steps 1-3 again
    # from metrics.jsonl and logs 4-6 live: the run files of both attempts, synced in order, hold 1-6 once each.
    cfg = _cfg(tmp_path, "logging.tensorboard=false")
    first = MetricLogger(cfg, start_step=0, enabled=True)
    for step in (1, 2, 3, 4):
        first.log(step, {"train/loss": 4.0 / step, "train/skipped": 0,
                         "moba/distance/layer_00": Histogram([1.0], [0, 1])})
    _stop_wandb_service(signal.SIGTERM)
    first.log(5, {"train/loss": 0.75, "train/skipped": 0})
    first.close()
    resumed = MetricLogger(cfg, start_step=3, enabled=True, wandb_run_id=first.wandb_run_id)
    for step in (4, 5, 6):
        resumed.log(step, {"train/loss": 0.5 / step, "train/skipped": 0})
    resumed.close()

    runs = wandb_offline.offline_runs(tmp_path / "wandb", killed=1)
    assert [wandb_offline.run_record(path).run_id for path in runs[1:]] == [first.wandb_run_id]
    rows = [row for path in runs for row in wandb_offline.history(path)]
    assert [row["_step"] for row in rows] == [1, 2, 3, 4, 5, 6]  # each step exactly once
    records = read_jsonl(tmp_path / "metrics.jsonl")
    for row, record in zip(rows, records):
        assert {key: row[key] for key in _numbers(record)} == _numbers(record)
    out = capsys.readouterr().out
    assert out.count("W&B stopped working") == 1
    assert re.search(rf"^W&B run {first.wandb_run_id}: continuing it; its transaction logs hold (no step|steps up to "
                     r"[12]): re-sent steps [123]-3 \([123] steps, their numbers\) from metrics.jsonl$", out, re.M), out


def test_a_resume_after_a_complete_wandb_log_resends_nothing_and_logs_each_step_once(tmp_path, capsys):
    cfg = _cfg(tmp_path, "logging.tensorboard=false")
    first = MetricLogger(cfg, start_step=0, enabled=True)
    for step in range(1, 7):
        first.log(step, {"train/loss": 6.0 / step})
    first.close()
    resumed = MetricLogger(cfg, start_step=3, enabled=True, wandb_run_id=first.wandb_run_id)
    for step in range(4, 9):
        resumed.log(step, {"train/loss": 0.5 / step})
    resumed.close()

    out = capsys.readouterr().out
    assert f"W&B run {first.wandb_run_id}: continuing it; steps up to 6 were already sent" in out
    assert "re-sent" not in out
    rows = [row for path in wandb_offline.offline_runs(tmp_path / "wandb") for row in wandb_offline.history(path)]
    assert [row["_step"] for row in rows] == list(range(1, 9))
    assert [row["train/loss"] for row in rows] == [6.0 / s for s in (1, 2, 3, 4, 5, 6)] + [0.5 / s for s in (7, 8)]


def test_a_wandb_log_of_a_format_it_cannot_read_is_one_line_and_the_steps_of_metrics_jsonl_count_as_sent(
        tmp_path, capsys):
    cfg = _cfg(tmp_path, "logging.tensorboard=false")
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "train/loss": 1.0}) + "\n"
                                                    for s in (1, 2, 3)))
    alien = tmp_path / "wandb" / "offline-run-20260101_000000-abcd1234" / "run-abcd1234.wandb"
    alien.parent.mkdir(parents=True)
    alien.write_bytes(b":W&B\xe1\xbe\x07" + bytes(100))  # a format version this reader does not know
    resumed = MetricLogger(cfg, start_step=2, enabled=True, wandb_run_id="abcd1234")
    for step in (3, 4):
        resumed.log(step, {"train/loss": 0.5})
    resumed.close()

    out = capsys.readouterr().out
    assert out.count("W&B run abcd1234: cannot read its transaction logs (UnreadableLog: ") == 1
    assert f"{alien} does not start with the header of a W&B transaction log of version 0); steps up to 3 count " \
           "as sent, as metrics.jsonl says" in out
    (new,) = wandb_offline.offline_runs(tmp_path / "wandb", killed=1)[1:]
    assert [row["_step"] for row in wandb_offline.history(new)] == [4]  # as before: no step sent twice
