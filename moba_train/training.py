"""The trainer. `train(cfg)` reads top to bottom as the story of a run: set up, build, load, loop
(accumulate micro-batches, step, log, checkpoint), finish.

Batching. One optimizer step consumes `train.global_batch_size` sequences: each data-parallel rank
runs `num_microbatches = global_batch_size / (micro_batch_size * dp)` forward/backward passes,
gradients accumulate in Megatron DDP's fp32 buffers and are reduced once per step. The loss is the
mean over every counted (loss_mask) token of the global batch: each micro-batch backpropagates
`loss_sum * dp / global_tokens` (DDP averages over the dp ranks).

Robustness. A step whose loss or gradient norm is NaN/inf changes nothing (no update; its data is
consumed and it counts as a step); after `train.max_nonfinite_steps` such steps in a row (counted across
a relaunch) training aborts. SIGTERM, SIGUSR1 and SIGINT set a flag (moba_train.signals): the current step finishes, a
checkpoint is saved, the run exits 0; relaunching the same command resumes from the newest complete
checkpoint.
"""

from __future__ import annotations

import math
import signal
import time
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer_param_scheduler import get_canonical_lr_for_logging
from megatron.core.transformer.module import Float16Module

from moba_train import checkpointing, data, fusions, implementations, preflight
from moba_train.checkpointing import TrainState
from moba_train.cli import SharedConfigError
from moba_train.config import Config, ConfigError
from moba_train.diagnostics import RoutingDiagnostics
from moba_train.distributed import DistEnv, destroy_distributed, init_distributed, set_seed
from moba_train.flops import training_step_flops
from moba_train.induction import place_full_layers
from moba_train.metrics import MetricLogger, attention_backends, perf_metrics
from moba_train.model import (
    build_model,
    compute_dtype,
    forward_step,
    local_batch,
    matrix_params,
    to_device,
    token_losses,
)
from moba_train.optimizer import build_optimizer, build_scheduler, optimizer_step, use_distributed_optimizer
from moba_train.resume import check_init_from, find_resume_point
from moba_train.run_lock import hold_run_directory
from moba_train.signals import StopSignal


class TrainingAborted(RuntimeError):
    """Training cannot continue (e.g. repeated non-finite losses); the message says why and what to do."""


def num_microbatches(cfg: Config, env: DistEnv) -> int:
    """Micro-batches per step on each data-parallel rank (every rank decides it alike)."""
    try:
        return cfg.microbatches(env.dp)
    except ConfigError as err:
        raise SharedConfigError(str(err)) from None


def wrap_model(cfg: Config, model: torch.nn.Module, env: DistEnv) -> DistributedDataParallel:
    """bf16 compute (Float16Module) when the precision resolves to bf16, then Megatron DDP."""
    config = model.config
    if compute_dtype(cfg, env.device) == torch.bfloat16:
        model = Float16Module(config, model)
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=use_distributed_optimizer(cfg, env.device),
    )
    wrapped = DistributedDataParallel(config, ddp_config, model)
    fusions.install_grad_accumulation(cfg, wrapped, env.device)
    return wrapped


def _step_flops(cfg: Config, seqlens: list[int]) -> float:
    m, att = cfg.model, cfg.attention
    return float(training_step_flops(matrix_params(cfg), seqlens, cfg.layer_kinds(), m.num_attention_heads,
                                     m.head_dim, att.block_size, att.topk))


def train_step(model, optimizer, batches: list[dict], env: DistEnv) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward/backward over this rank's micro-batches and one optimizer update, queued without a host sync.

    Returns (loss, grad_norm, updated) as device tensors; loss is the mean per counted token of the global
    batch. Reading them (`step_values`) waits for the step to finish.
    """
    model.zero_grad_buffer()
    optimizer.zero_grad()
    replicas = env.dp * env.cp
    # The micro-batches are whole (context-parallel ranks each hold the same ones and compute their shards):
    # the global count sums over data-parallel ranks only.
    global_tokens = to_device(torch.tensor([sum(float(b["loss_mask"].sum()) for b in batches)]), env.device)
    dist.all_reduce(global_tokens, group=parallel_state.get_data_parallel_group())
    loss_sum = torch.zeros(1, device=env.device)
    for batch in batches:
        batch_loss, _ = forward_step(model, batch)
        (batch_loss * replicas / global_tokens).backward()
        loss_sum += batch_loss.detach()
    finalize_model_grads([model])
    dist.all_reduce(loss_sum, group=parallel_state.get_data_parallel_group(with_context_parallel=True))
    loss = (loss_sum / global_tokens).squeeze(0)
    updated, grad_norm = optimizer_step(optimizer, loss)
    return loss, grad_norm, updated


def step_values(loss: torch.Tensor, grad_norm: torch.Tensor, updated: torch.Tensor) -> tuple[float, float, bool]:
    """`train_step`'s results on the host, in one transfer (it waits for the step)."""
    values = torch.stack([loss.float(), grad_norm.float().to(loss.device), updated.float().to(loss.device)]).tolist()
    return values[0], values[1], bool(values[2])


POSITION_BUCKETS = 4
"""Validation loss is also reported per quarter of the sequence positions."""


@torch.no_grad()
def evaluate(model, dataset, cfg: Config, env: DistEnv, passkey=None) -> dict[str, float]:
    """`val/loss`: mean per-token loss over the first `train.eval_steps` global micro-batches of `dataset`;
    `val/loss_by_position/<first>-<end>`: the same over positions [first, end) of the sequences (quarters);
    with the `passkey` documents (`data.build_passkey_validation`) also `val/passkey_loss` and
    `val/passkey_found` (`passkey_check`)."""
    result = passkey_check(model, passkey, cfg, env) if passkey is not None else {}
    model.eval()
    # A few batches, read in this process: workers (fresh interpreters) would take longer to start.
    batches = data.build_dataloader(dataset, cfg, env, consumed_samples=0, num_workers=0)
    length = cfg.train.seq_length
    edges = [length * i // POSITION_BUCKETS for i in range(POSITION_BUCKETS + 1)]
    boundaries = torch.tensor(edges[1:-1], device=env.device)
    sums = torch.zeros(2, POSITION_BUCKETS, device=env.device)  # (loss sum, counted tokens) per bucket
    for _ in range(cfg.train.eval_steps):
        batch = local_batch(next(batches))  # under context parallelism: this rank's shard
        losses = token_losses(model, batch)  # [b, s]
        mask = batch["loss_mask"].to(losses.device, torch.float32)
        # A token's bucket is its position in its sequence (its document's, with reset position ids).
        bucket = torch.bucketize(batch["position_ids"].to(env.device), boundaries, right=True)
        sums[0].index_add_(0, bucket.flatten(), (losses * mask).flatten())
        sums[1].index_add_(0, bucket.flatten(), mask.flatten())
    dist.all_reduce(sums, group=parallel_state.get_data_parallel_group(with_context_parallel=True))
    model.train()
    result["val/loss"] = float(sums[0].sum() / sums[1].sum())
    for i, (first, end) in enumerate(zip(edges[:-1], edges[1:])):
        if sums[1, i] > 0:
            result[f"val/loss_by_position/{first}-{end}"] = float(sums[0, i] / sums[1, i])
    return result


FOUND = math.log(2.0)
"""A key token whose loss is below ln 2 has over half the probability: the model's top choice."""


@torch.no_grad()
def passkey_check(model, dataset, cfg: Config, env: DistEnv) -> dict[str, float]:
    """`val/passkey_loss`: mean loss over the key tokens of all of `dataset`'s documents (each carries its loss
    mask on its key only); `val/passkey_found`: the share of documents whose every key token has a loss below
    ln 2. A document's tokens may lie on several context-parallel ranks: its sums meet over that group first."""
    model.eval()
    batches = data.build_dataloader(dataset, cfg, env, consumed_samples=0, num_workers=0)  # as `evaluate`'s
    totals = torch.zeros(3, device=env.device, dtype=torch.float64)  # loss sum, key tokens, documents found
    for _ in range(len(dataset) // (cfg.train.micro_batch_size * env.dp)):
        batch = local_batch(next(batches))
        losses = token_losses(model, batch)  # [b, s] of this rank's shard
        mask = batch["loss_mask"].to(losses.device, torch.float32)
        per_doc = torch.stack([(losses * mask).sum(1), mask.sum(1), ((losses >= FOUND) * mask).sum(1)])
        if parallel_state.get_context_parallel_world_size() > 1:
            dist.all_reduce(per_doc, group=parallel_state.get_context_parallel_group())
        totals += torch.stack([per_doc[0].sum(), per_doc[1].sum(), (per_doc[2] == 0).sum()]).double()
    dist.all_reduce(totals, group=parallel_state.get_data_parallel_group())
    model.train()
    return {"val/passkey_loss": float(totals[0] / totals[1]), "val/passkey_found": float(totals[2] / len(dataset))}


def train(cfg: Config) -> signal.Signals | None:
    """Run (or resume) the training described by `cfg`; torchrun or a single process. Returns the stop signal
    that arrived while it ran, if any: one during the last step or the final save ends the run as finishing
    does, and a caller that goes on to other work (the quality study) must stop all the same."""
    with StopSignal() as stop:  # from the start: a signal during set-up stops after the first step
        preflight.check(cfg)
        try:
            env = init_distributed(cfg)
        except ConfigError as err:  # the launch's size or device: the same on every rank of a node
            raise SharedConfigError(str(err)) from None
        try:
            with hold_run_directory(cfg.run.output_dir, env.is_main):
                _train(cfg, env, stop)
        finally:
            destroy_distributed()
    return stop.received


def _train(cfg: Config, env: DistEnv, stop: StopSignal) -> None:
    n_micro = num_microbatches(cfg, env)
    output_dir = Path(cfg.run.output_dir)
    if env.is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        print(f"# resolved config ({env.world_size} process(es), {env.device.type}, tp={env.tp} cp={env.cp} "
              f"dp={env.dp})\n{cfg.to_yaml()}", flush=True)
        print(implementations.describe(), flush=True)
    set_seed(cfg.run.seed)

    # Where to continue from: the newest intact checkpoint that the recipe can resume (moba_train.resume).
    ckpt_root = checkpointing.checkpoint_dir(cfg)
    unfinished_saves, restored = checkpointing.clean_up_saves(ckpt_root)  # collective: before any rank lists them
    if env.is_main:
        for unfinished in unfinished_saves:
            what = ("a checkpoint that a stopped run was deleting" if unfinished.name.startswith(
                checkpointing.PRUNED_PREFIX) else "a save that a stopped run never finished")
            print(f"removed {unfinished}: {what}", flush=True)
        for checkpoint in restored:
            print(f"put back {checkpoint}: a stopped run had set it aside to save its step again", flush=True)
    bf16, distributed = compute_dtype(cfg, env.device) == torch.bfloat16, use_distributed_optimizer(cfg, env.device)
    layout = checkpointing.optimizer_layout(distributed, bf16)
    resume = find_resume_point(cfg, ckpt_root, layout, env.is_main) if cfg.checkpoint.resume else None
    if resume is not None and resume.state.step >= cfg.train.steps:
        if env.is_main:
            print(f"training is complete: checkpoint {resume.path} is at step {resume.state.step} of "
                  f"train.steps={cfg.train.steps}; raise train.steps to train further", flush=True)
        return
    init_from = check_init_from(cfg) if resume is None and cfg.checkpoint.init_from else None
    # attention.full_layers_at=probe: the full layers go where the weights training continues from copy.
    cfg = place_full_layers(cfg, resume=resume.path if resume else None, init_from=init_from, is_main=env.is_main)
    set_seed(cfg.run.seed)  # the probe's model drew from the generators: start as a recipe naming the layers would

    # Build: the fp32 model, its initial weights, then bf16/DDP wrapping, optimizer and schedule.
    model = build_model(cfg)
    if resume is None and cfg.model.init_from_hf:
        from moba_train.convert import load_hf_weights

        load_hf_weights(model, cfg.model.init_from_hf, cfg)
    if init_from is not None:
        source = checkpointing.load_model_weights(init_from, model)
        if env.is_main:
            print(f"initialised model weights from {source}", flush=True)
    model = wrap_model(cfg, model, env)
    optimizer = build_optimizer(cfg, [model], bf16=bf16, distributed=distributed)
    scheduler = build_scheduler(cfg, optimizer)

    # Load: the checkpoint found above, if any.
    state = TrainState()
    if resume is not None:
        state = checkpointing.load_checkpoint(resume.path, model, optimizer, scheduler)
        if env.is_main:
            print(f"resumed from {resume.path} at step {state.step} ({state.consumed_samples} samples consumed)",
                  flush=True)

    train_dataset, valid_dataset = data.build_datasets(cfg, env)
    passkey_dataset = data.build_passkey_validation(cfg, env, valid_dataset)
    batches = data.build_dataloader(train_dataset, cfg, env, state.consumed_samples)
    backends = attention_backends(cfg, env.device, compute_dtype(cfg, env.device))
    metrics = MetricLogger(cfg, state.step, enabled=env.is_main, wandb_run_id=state.wandb_run_id,
                           run_info={"attention_backends": backends, "world_size": env.world_size})
    state.wandb_run_id = metrics.wandb_run_id
    metrics.print(f"attention backends at train.seq_length {cfg.train.seq_length}: "
                  + ", ".join(f"{kind} layers -> {backend}" for kind, backend in backends.items()))
    diagnostics = RoutingDiagnostics(cfg, model, enabled=env.is_main)

    # Loop.
    model.train()
    while state.step < cfg.train.steps:
        state.step += 1
        scheduler.step(1)
        started = time.perf_counter()
        micro_batches = [next(batches) for _ in range(n_micro)]
        data_time = time.perf_counter() - started
        loss, grad_norm, updated = step_values(*train_step(model, optimizer, micro_batches, env))
        step_time = time.perf_counter() - started
        state.consumed_samples += cfg.train.global_batch_size
        if not updated:
            state.skipped_steps += 1
            state.nonfinite_in_a_row += 1
        else:
            state.nonfinite_in_a_row = 0

        seqlens = [int(n) for b in micro_batches for n in b["cu_seqlens"].diff()]
        record = {
            "train/loss": loss, "train/lr": get_canonical_lr_for_logging(optimizer.param_groups),
            "train/grad_norm": grad_norm, "train/skipped": int(not updated), "train/skipped_steps": state.skipped_steps,
            "train/tokens_seen": state.consumed_samples * cfg.train.seq_length,
            **perf_metrics(step_time, data_time, cfg.train.global_batch_size * cfg.train.seq_length,
                           _step_flops(cfg, seqlens) * env.dp, env.world_size, cuda=env.device.type == "cuda"),
        }
        if valid_dataset is not None and cfg.train.eval_interval and state.step % cfg.train.eval_interval == 0:
            record.update(evaluate(model, valid_dataset, cfg, env, passkey_dataset))
        if diagnostics.due(state.step):
            record.update(diagnostics.run(state.step, micro_batches[0]))
        metrics.log(state.step, record)
        if state.nonfinite_in_a_row >= cfg.train.max_nonfinite_steps:
            raise TrainingAborted(
                f"{state.nonfinite_in_a_row} consecutive steps had a non-finite loss or gradient norm (last at step "
                f"{state.step}); lower train.lr or check the data, then relaunch to resume from the last checkpoint"
            )

        stopping = stop.agreed(env.device)
        if state.step % cfg.checkpoint.interval == 0 or state.step == cfg.train.steps or stopping:
            try:
                path = checkpointing.save_checkpoint(cfg, model, optimizer, scheduler, state)
            except checkpointing.CheckpointWriteError as err:
                raise TrainingAborted(str(err)) from None
            metrics.print(f"saved checkpoint {path}")
        if stopping:
            metrics.print(f"stopped by signal after step {state.step}; relaunch the same command to resume")
            break
    metrics.close()
