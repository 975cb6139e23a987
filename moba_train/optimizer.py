"""The optimizer and the learning-rate schedule.

Megatron-Core's AdamW (`get_megatron_optimizer`): fp32 main parameters and gradients, bf16 model
parameters when training in bf16, state sharded over data-parallel ranks with the distributed
optimizer. Norm weights (1-D parameters) get no weight decay (Megatron's standard overrides).

Without Transformer Engine or Apex, Megatron-Core builds torch's AdamW in its default (foreach) mode,
and its gradient norm falls back to a loop that reads every parameter's norm on the host. Here torch's
AdamW runs its fused kernel instead, and `optimizer_step` keeps the whole update on the device: one
pass of `torch._foreach_norm` for the norm, and the clipping and the skip of a non-finite update go
into the fused kernel as its `grad_scale` and `found_inf` (the tensors PyTorch's GradScaler feeds it).
No step waits for the host; the caller reads the loss and norm after the step, when it logs them.

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
from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32
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
        optimizer = get_megatron_optimizer(opt_cfg, model_chunks)
    fuse_torch_adam(optimizer)
    return optimizer


def _chained(optimizer: MegatronOptimizer) -> list:
    chained = getattr(optimizer, "chained_optimizers", [optimizer])
    return [o for o in chained if not getattr(o, "is_stub_optimizer", False)]


def fuse_torch_adam(optimizer: MegatronOptimizer) -> bool:
    """Switch every torch Adam/AdamW under `optimizer` to its fused kernel; False (and nothing changed)
    when any is another implementation (Transformer Engine's or Apex's FusedAdam)."""
    inner = [o.optimizer for o in _chained(optimizer)]
    if not all(type(o) in (torch.optim.Adam, torch.optim.AdamW) for o in inner):
        return False
    for o in inner:
        for group in o.param_groups:
            group.update(fused=True, foreach=False)
        o.defaults.update(fused=True, foreach=False)
    return True


def _fused(optimizer: MegatronOptimizer) -> bool:
    return all(group.get("fused") for o in _chained(optimizer) for group in o.optimizer.param_groups)


def place_adam_steps(optimizer: MegatronOptimizer) -> None:
    """Give every Adam state its own fp32 'step' tensor where torch's Adam expects it: on the parameter's
    device for the fused kernel, on the CPU otherwise. Megatron-Core 0.16.1's DistributedOptimizer load
    (torch's Adam) gives every parameter one shared CPU tensor, which Adam would increment once per
    parameter and which the fused kernel cannot read."""
    for o in _chained(optimizer):
        inner = o.optimizer
        for group in inner.param_groups:
            device = None if group.get("fused") or group.get("capturable") else torch.device("cpu")
            for param in group["params"]:
                state = inner.state.get(param)
                if state and "step" in state:
                    state["step"] = state["step"].to(device or param.device, torch.float32, copy=True)


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


def grad_norm(optimizer: MegatronOptimizer) -> torch.Tensor:
    """The global L2 norm of the main gradients (fp32 scalar on their device), as Megatron's
    `get_grad_norm` defines it (duplicates under tensor parallelism and shared parameters counted once,
    reduced over each optimizer's grad-stats group), without reading anything on the host."""
    total = None
    for o in _chained(optimizer):
        grads = o.get_main_grads_for_grad_norm()
        if not grads:
            continue
        square = torch.stack(torch._foreach_norm(grads)).float().square().sum()
        group = o.get_grad_stats_parallel_group()
        if group is not None and torch.distributed.get_world_size(group) > 1:
            torch.distributed.all_reduce(square, group=group)
        total = square if total is None else total + square.to(total.device)
    if total is None:
        return torch.zeros(())
    return total.sqrt()


def optimizer_step(optimizer: MegatronOptimizer, loss: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Clip and apply the accumulated gradients unless `loss` or their norm is non-finite.

    Returns (updated, grad_norm) as device tensors (bool, fp32): a NaN/inf loss or gradient norm leaves
    parameters and optimizer state untouched, the Adam step count included (the caller zeroes the
    gradient buffers before the next step either way). With torch's fused AdamW (`fuse_torch_adam`) the
    decision and the clipping are the fused kernel's `found_inf` and `grad_scale`, so nothing waits for
    the host; other Adam implementations take Megatron's own step, which reads the norm on the host.
    """
    with platform.cuda_stand_in():
        if not _fused(optimizer):
            return _host_step(optimizer, loss)
        optimizer.prepare_grads()  # bf16 and fp32 have no loss scaler: nothing is read on the host
        norm = grad_norm(optimizer)
        finite = torch.isfinite(norm)
        if loss is not None:
            finite = finite & torch.isfinite(loss.detach().to(norm.device)).all()
        clip = optimizer.config.clip_grad
        # Megatron's clip multiplies by clip / (norm + 1e-6) when that is below 1; the kernel divides by grad_scale.
        scale = torch.clamp((norm + 1.0e-6) / clip, min=1.0) if clip > 0 else torch.ones_like(norm)
        found_inf = (~finite).float()
        inner = [o.optimizer for o in _chained(optimizer)]
        for o in inner:
            o.grad_scale, o.found_inf = scale, found_inf
        try:
            optimizer.step_with_ready_grads()
        finally:
            for o in inner:
                del o.grad_scale, o.found_inf
    return finite, norm


def _host_step(optimizer: MegatronOptimizer, loss: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Megatron's own step, for Adam implementations without `found_inf` (Transformer Engine's, Apex's)."""
    found_inf = optimizer.prepare_grads()
    norm = float(optimizer.get_grad_norm())
    if found_inf or not math.isfinite(norm) or (loss is not None and not math.isfinite(float(loss))):
        return torch.tensor(False), torch.tensor(norm)
    clip = optimizer.config.clip_grad
    if clip > 0:
        for o in _chained(optimizer):
            params = o.get_parameters()
            if params:
                clip_grad_by_total_norm_fp32(params, clip, norm)
    return torch.tensor(bool(optimizer.step_with_ready_grads())), torch.tensor(norm)
