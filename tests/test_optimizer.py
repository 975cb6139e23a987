"""The LR schedule (Megatron's OptimizerParamScheduler as configured by build_scheduler) against its
closed form, update by update."""

import math

import pytest
import torch

from moba_train.config import Config
from moba_train.optimizer import build_scheduler


def _closed_form(schedule: str, s: int, lr: float, min_lr: float, warmup: int, steps: int, frac: float) -> float:
    if s <= warmup:
        return lr * s / warmup
    if schedule == "constant":
        return lr
    if schedule == "cosine":
        return min_lr + (lr - min_lr) * 0.5 * (1 + math.cos(math.pi * (s - warmup) / (steps - warmup)))
    decay = max(1, round(frac * (steps - warmup)))
    if s <= steps - decay:
        return lr
    return min_lr + (lr - min_lr) * (1 - (s - (steps - decay)) / decay)


def _lrs(cfg: Config) -> list[float]:
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=cfg.train.lr)
    scheduler = build_scheduler(cfg, optimizer)
    lrs = []
    for _ in range(cfg.train.steps):
        scheduler.step(1)
        lrs.append(optimizer.param_groups[0]["lr"])
    return lrs


@pytest.mark.parametrize("schedule", ["cosine", "wsd", "constant"])
@pytest.mark.parametrize("warmup", [0, 7])
def test_schedule_matches_closed_form_at_every_update(schedule, warmup):
    cfg = Config.model_validate(
        {"train": {"steps": 50, "warmup_steps": warmup, "lr": 3e-4, "min_lr": 3e-5,
                   "lr_schedule": schedule, "wsd_decay_fraction": 0.2}}
    )
    expected = [_closed_form(schedule, s, 3e-4, 3e-5, warmup, 50, 0.2) for s in range(1, 51)]
    assert _lrs(cfg) == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_decaying_schedules_end_at_min_lr_and_wsd_holds_peak_until_its_decay():
    base = {"steps": 40, "warmup_steps": 4, "lr": 1e-3, "min_lr": 1e-4, "wsd_decay_fraction": 0.25}
    cosine = _lrs(Config.model_validate({"train": {**base, "lr_schedule": "cosine"}}))
    wsd = _lrs(Config.model_validate({"train": {**base, "lr_schedule": "wsd"}}))
    assert cosine[-1] == pytest.approx(1e-4) and wsd[-1] == pytest.approx(1e-4)
    assert wsd[3:31] == [1e-3] * 28  # stable phase: updates 4..31; decay over the last 9 updates
    assert wsd[31] < 1e-3


def test_weight_decay_is_constant_and_skipped_for_no_wd_groups():
    cfg = Config.model_validate({"train": {"steps": 10, "warmup_steps": 2, "weight_decay": 0.1}})
    optimizer = torch.optim.AdamW(
        [{"params": [torch.nn.Parameter(torch.zeros(2, 2))]},
         {"params": [torch.nn.Parameter(torch.zeros(2))], "wd_mult": 0.0}]
    )
    scheduler = build_scheduler(cfg, optimizer)
    for _ in range(10):
        scheduler.step(1)
        assert [g["weight_decay"] for g in optimizer.param_groups] == [0.1, 0.0]
