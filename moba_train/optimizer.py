"""The optimizer and the learning-rate schedule.

Megatron-Core's AdamW (`get_megatron_optimizer`): fp32 main parameters and gradients, bf16 model
parameters when training in bf16, state sharded over data-parallel ranks with the distributed
optimizer. Norm weights (1-D parameters) get no weight decay (Megatron's standard overrides).

The schedule is Megatron-Core's `OptimizerParamScheduler`, advanced *before* each update so that
update s (1-based, s = 1..T with T = train.steps, W = train.warmup_steps) uses

    warmup    s <= W:            lr * s / W
    cosine    W < s <= T:        min_lr + (lr - min_lr) * (1 + cos(pi * (s - W) / (T - W))) / 2
    wsd       W < s <= T - D:    lr
              T - D < s <= T:    min_lr + (lr - min_lr) * (1 - (s - (T - D)) / D)
                                 with D = max(1, round(wsd_decay_fraction * (T - W)))
    constant  W < s:             lr
"""

from __future__ import annotations

import math

import torch
from megatron.core.optimizer import MegatronOptimizer, OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from moba_train import platform
from moba_train.config import Config

_DECAY_STYLE = {"cosine": "cosine", "wsd": "WSD", "constant": "constant"}


def use_distributed_optimizer(cfg: Config, device: torch.device) -> bool:
    """parallel.distributed_optimizer, default on CUDA and off on CPU."""
    if cfg.parallel.distributed_optimizer is None:
        return device.type == "cuda"
    return cfg.parallel.distributed_optimizer


def build_optimizer(cfg: Config, model_chunks: list, *, bf16: bool, distributed: bool) -> MegatronOptimizer:
    """AdamW over the DDP-wrapped model chunks (Megatron `DistributedDataParallel` modules)."""
    train = cfg.train
    opt_cfg = OptimizerConfig(
        optimizer="adam",
        lr=train.lr,
        min_lr=train.min_lr,
        weight_decay=train.weight_decay,
        adam_beta1=train.adam_beta1,
        adam_beta2=train.adam_beta2,
        adam_eps=train.adam_eps,
        clip_grad=train.clip_grad,
        bf16=bf16,
        params_dtype=torch.bfloat16 if bf16 else torch.float32,
        use_distributed_optimizer=distributed,
    )
    with platform.cuda_stand_in():
        return get_megatron_optimizer(opt_cfg, model_chunks)


def build_scheduler(cfg: Config, optimizer) -> OptimizerParamScheduler:
    """The schedule of the module docstring over `optimizer.param_groups` (any torch-style optimizer).

    The recipe is the source of truth: a resumed run takes only the step count from its checkpoint,
    so raising train.steps on relaunch extends the schedule.
    """
    train = cfg.train
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if train.warmup_steps else train.lr,
        max_lr=train.lr,
        min_lr=train.min_lr,
        lr_warmup_steps=train.warmup_steps,
        lr_decay_steps=train.steps,
        lr_decay_style=_DECAY_STYLE[train.lr_schedule],
        start_wd=train.weight_decay,
        end_wd=train.weight_decay,
        wd_incr_steps=train.steps,
        wd_incr_style="constant",
        wsd_decay_steps=max(1, round(train.wsd_decay_fraction * (train.steps - train.warmup_steps))),
        lr_wsd_decay_style="linear",
        use_checkpoint_opt_param_scheduler=False,
        override_opt_param_scheduler=True,
    )


def optimizer_step(optimizer: MegatronOptimizer) -> tuple[bool, float]:
    """Clip and apply the accumulated gradients unless their norm is non-finite.

    Returns (updated, grad_norm): a NaN/inf gradient norm leaves parameters and optimizer state
    untouched (the caller zeroes the gradient buffers before the next step either way).
    """
    with platform.cuda_stand_in():
        found_inf = optimizer.prepare_grads()
        grad_norm = float(optimizer.get_grad_norm())
        if found_inf or not math.isfinite(grad_norm):
            return False, grad_norm
        updated, _, _ = optimizer.step()
    return bool(updated), grad_norm
