"""The LR schedule (Megatron's OptimizerParamScheduler as configured by build_scheduler) against its
closed form, update by update; the update itself (`optimizer_step`) against Megatron-Core's own step,
the refusal of non-finite updates, and (on CUDA) the absence of host syncs in a training step."""

import math
import warnings
from pathlib import Path

import pytest
import torch

from moba_train import platform
from moba_train.config import Config, load_config
from moba_train.data import build_dataloader, build_datasets
from moba_train.distributed import destroy_distributed, init_distributed, set_seed
from moba_train.model import build_model, compute_dtype, forward_step
from moba_train.optimizer import build_optimizer, build_scheduler, optimizer_step, use_distributed_optimizer
from moba_train.training import step_values, train_step, wrap_model


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


# --- The update: torch's fused AdamW with the clip and the skip on the device, against Megatron's own step ---

ROOT = Path(__file__).resolve().parents[1]
PRECISIONS = {"fp32": [], "bf16-distributed-optimizer": ["train.precision=bf16", "parallel.distributed_optimizer=true"]}


def _setup(tmp_path, precision: str, *extra: str):
    cfg = load_config(ROOT / "configs" / "tiny_moba.yaml",
                      [f"run.output_dir={tmp_path}", "train.seq_length=128", "data.kind=synthetic",
                       "train.lr_schedule=constant", "train.warmup_steps=0", "train.lr=1e-2",
                       *PRECISIONS[precision], *extra])
    return cfg, init_distributed(cfg)


def _build(cfg, env, fused: bool = True):
    set_seed(cfg.run.seed)
    model = wrap_model(cfg, build_model(cfg), env)
    optimizer = build_optimizer(cfg, [model], bf16=compute_dtype(cfg, env.device) == torch.bfloat16,
                                distributed=use_distributed_optimizer(cfg, env.device))
    if not fused:  # Megatron-Core's choice without Transformer Engine or Apex: torch's AdamW, foreach
        for o in optimizer.chained_optimizers:
            for group in o.optimizer.param_groups:
                group.update(fused=False, foreach=None)
    build_scheduler(cfg, optimizer).step(1)
    return model, optimizer


def _backward(cfg, env, model, optimizer, step: int, poison: bool = False):
    model.zero_grad_buffer()
    optimizer.zero_grad()
    consumed = step * cfg.train.global_batch_size
    loader = build_dataloader(build_datasets(cfg, env)[0], cfg, env, consumed_samples=consumed)
    loss, tokens = forward_step(model, next(loader))
    (loss / tokens).backward()
    model.finish_grad_sync()
    if poison:  # one NaN in the gradient buffer, as an overflow in one layer's backward would leave it
        next(iter(model.buffers[0].grad_data.view(-1)[:1])).fill_(float("nan"))
    return loss / tokens


def _main_params(optimizer) -> list[torch.Tensor]:
    return [p.detach().clone() for o in optimizer.chained_optimizers for g in o.optimizer.param_groups
            for p in g["params"]]


def _adam_state(optimizer) -> list[torch.Tensor]:
    return [v.detach().clone() for o in optimizer.chained_optimizers for s in o.optimizer.state.values()
            for v in s.values()]


@pytest.mark.parametrize("precision", PRECISIONS)
def test_update_equals_megatrons_own_step_with_clipping(tmp_path, precision):
    """Updates through `optimizer_step` (fused kernel, clip as its grad_scale) and through Megatron's `step()`
    on torch's foreach AdamW: the same gradient norms and main parameters. The clip (0.05) is far below the
    norms, so a clip applied wrongly or not at all moves the later updates by a good part of lr (Adam's first
    update is lr * sign(g) whatever the scale). In bf16 the weights after one update may round differently,
    and Adam turns a small difference in a small gradient into one of order lr: there, the first update. Both
    optimizers get the same gradient buffers, so only their arithmetic differs."""
    cfg, env = _setup(tmp_path, precision, "train.clip_grad=0.05")
    try:
        model_a, ours = _build(cfg, env)
        model_b, megatron = _build(cfg, env, fused=False)
        assert all(g["fused"] for o in ours.chained_optimizers for g in o.optimizer.param_groups)
        for step in range(3 if precision == "fp32" else 1):
            _backward(cfg, env, model_a, ours, step)
            model_b.zero_grad_buffer()
            megatron.zero_grad()
            for a, b in zip(model_a.buffers, model_b.buffers):  # the same gradients: GPU kernels may not repeat exactly
                b.grad_data.copy_(a.grad_data)
            updated, norm = optimizer_step(ours)
            with platform.cuda_stand_in():
                success, want_norm, _ = megatron.step()
            assert bool(updated) and success
            assert want_norm > 10 * cfg.train.clip_grad
            assert float(norm) == pytest.approx(want_norm, rel=1e-5)
            # Rounding differs (a division by grad_scale against a multiplication by its inverse); where a
            # gradient is as small as Adam's eps that moves an update by up to ~0.1% of lr.
            for a, b in zip(_main_params(ours), _main_params(megatron)):
                torch.testing.assert_close(a, b, rtol=0, atol=cfg.train.lr * 1e-3)
    finally:
        destroy_distributed()


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "megatron-step"])
def test_a_non_finite_gradient_or_loss_changes_nothing(tmp_path, fused):
    """After one update, a NaN in the gradients and then a NaN loss with finite gradients: both updates are
    refused with the parameters and every Adam state (moments and step count) unchanged, and the next
    update equals that of an optimizer that never saw them (its bias correction is that of update 2)."""
    cfg, env = _setup(tmp_path, "bf16-distributed-optimizer")
    try:
        model, optimizer = _build(cfg, env, fused=fused)
        twin_model, twin = _build(cfg, env, fused=fused)
        for m, o in ((model, optimizer), (twin_model, twin)):
            _backward(cfg, env, m, o, 0)
            assert bool(optimizer_step(o)[0])
        before, state = _main_params(optimizer), _adam_state(optimizer)
        _backward(cfg, env, model, optimizer, 1, poison=True)
        updated, norm = optimizer_step(optimizer)
        assert not bool(updated) and not math.isfinite(float(norm))
        loss = _backward(cfg, env, model, optimizer, 1)
        updated, norm = optimizer_step(optimizer, loss * float("nan"))
        assert not bool(updated) and math.isfinite(float(norm))
        for a, b in zip(_main_params(optimizer), before):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        assert len(_adam_state(optimizer)) == len(state) > 0
        for a, b in zip(_adam_state(optimizer), state):
            torch.testing.assert_close(a, b, rtol=0, atol=0)

        for m, o in ((model, optimizer), (twin_model, twin)):
            _backward(cfg, env, m, o, 2)
            assert bool(optimizer_step(o)[0])
        moved = 0.0
        for a, b, c in zip(_main_params(optimizer), _main_params(twin), before):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
            moved = max(moved, float((a - c).abs().max()))
        assert moved > 0.5 * cfg.train.lr  # the update happened: Adam moves some parameter by about lr
    finally:
        destroy_distributed()


SYNC_WARNING = "called a synchronizing CUDA operation"  # PyTorch's sync debug mode, per synchronizing call


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_training_step_queues_without_a_host_sync(tmp_path):
    """A whole `train_step` (MoBA and full-attention layers, two micro-batches, the update) under PyTorch's
    sync debug mode: no operation inside it waits for the GPU."""
    cfg, env = _setup(tmp_path, "bf16-distributed-optimizer", "train.global_batch_size=2", "train.micro_batch_size=1")
    try:
        model, optimizer = _build(cfg, env)
        loader = build_dataloader(build_datasets(cfg, env)[0], cfg, env, consumed_samples=0)
        step_values(*train_step(model, optimizer, [next(loader) for _ in range(2)], env))  # warm-up: compiles, caches
        batches = [next(loader) for _ in range(2)]
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                results = train_step(model, optimizer, batches, env)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        syncs = [f"{w.filename}:{w.lineno}: {w.message}" for w in caught if SYNC_WARNING in str(w.message)]
        assert not syncs, "\n".join(syncs)
        loss, norm, updated = step_values(*results)
        assert updated and math.isfinite(loss) and math.isfinite(norm)
        # The detector works here: reading the loss on the host is reported.
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                results[0].item()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        assert any(SYNC_WARNING in str(w.message) for w in caught)
    finally:
        destroy_distributed()


# --- Weight gradients accumulated into the main gradients (model.fusions.grad_accumulation) ---


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("tied", [False, True])
def test_fused_grad_accumulation_gives_megatrons_main_gradients(tmp_path, precision, tied):
    """Two micro-batches accumulated by the fused path (the product adds into the fp32 main gradient) and by
    Megatron's plain one (a weight gradient the DDP hook adds): the same main gradients, with the tied
    output layer too (its embedding gradient arrives through the hook on top of the fused product). bf16:
    the plain path rounds each product to bf16 before adding, so the two agree at bf16's resolution."""
    from megatron.core.tensor_parallel import layers

    main_grads = {}
    for run, choice in (("torch", "torch"), ("torch again", "torch"), ("fused", "fused")):
        cfg, env = _setup(tmp_path, precision, f"model.fusions.grad_accumulation={choice}",
                          f"model.tie_embeddings={str(tied).lower()}")
        try:
            model, _ = _build(cfg, env)
            switched = [m for m in model.modules() if isinstance(m, (layers.ColumnParallelLinear,
                                                                      layers.RowParallelLinear))]
            assert all(m.gradient_accumulation_fusion == (choice == "fused") for m in switched) and switched
            model.zero_grad_buffer()
            loader = build_dataloader(build_datasets(cfg, env)[0], cfg, env, consumed_samples=0)
            for _ in range(2):
                loss, tokens = forward_step(model, next(loader))
                (loss / tokens).backward()
            model.finish_grad_sync()
            main_grads[run] = {n: p.main_grad.detach().clone() for n, p in model.named_parameters()}
            half = compute_dtype(cfg, env.device) != torch.float32  # "fp32" is precision auto: bf16 on CUDA
        finally:
            destroy_distributed()
    assert main_grads["fused"].keys() == main_grads["torch"].keys()
    for name, grad in main_grads["fused"].items():
        reference = main_grads["torch"][name]
        assert reference.abs().max() > 0, name
        scale = reference.abs().max().item()
        # GPU kernels need not repeat a sum bit for bit: the plain path run twice bounds that noise (0 on CPU)
        noise = (main_grads["torch again"][name] - reference).abs().max().item()
        rtol, atol = (1e-5, 1e-6 * scale) if half is False else (2e-2, 1e-2 * scale)
        err = (grad - reference).abs().max().item()
        torch.testing.assert_close(grad, reference, rtol=rtol, atol=max(atol, 4 * noise),
                                   msg=f"{name}: max error {err:.3g}, plain run-to-run {noise:.3g}, scale {scale:.3g}")


def test_fused_grad_accumulation_needs_the_ddp_wrapper():
    from moba_train import fusions

    cfg = Config.model_validate({"model": {"fusions": {"grad_accumulation": "fused"}}})
    assert fusions.resolve(cfg, torch.device("cpu"))["grad_accumulation"] == "fused"
    init_distributed(cfg)
    try:
        with pytest.raises(RuntimeError, match="wrapped in Megatron's DDP first"):
            fusions.install_grad_accumulation(cfg, build_model(cfg), torch.device("cpu"))
    finally:
        destroy_distributed()


def test_without_an_fp32_output_product_auto_stays_plain_and_fused_is_one_clear_error(tmp_path, monkeypatch):
    """A PyTorch without the fp32-output matmul: `auto` (fused on CUDA) then keeps Megatron's plain
    accumulation, and an explicit `fused` is refused in one sentence. (The DDP model is built on CPU, where
    `auto` is plain; the install is then asked as for CUDA.)"""
    from megatron.core.tensor_parallel import layers

    from moba_train import fusions
    from moba_train.config import ConfigError

    cfg, env = _setup(tmp_path, "fp32", "run.device=cpu")  # on a GPU machine too: there auto would fuse at build
    try:
        model, _ = _build(cfg, env)
        monkeypatch.setattr(fusions, "accumulation_mode", lambda device: None)
        cuda = torch.device("cuda")
        assert fusions.resolve(cfg, cuda)["grad_accumulation"] == "fused"
        assert fusions.install_grad_accumulation(cfg, model, cuda) == 0
        linears = [m for m in model.modules() if isinstance(m, (layers.ColumnParallelLinear, layers.RowParallelLinear))]
        assert linears and not any(m.gradient_accumulation_fusion for m in linears)
        explicit = cfg.model_copy(update={"model": cfg.model.model_copy(
            update={"fusions": cfg.model.fusions.model_copy(update={"grad_accumulation": "fused"})})})
        with pytest.raises(ConfigError, match=r"grad_accumulation=fused needs PyTorch's fp32-output matmul.*set model"):
            fusions.install_grad_accumulation(explicit, model, cuda)
    finally:
        destroy_distributed()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the fp32-output product runs on CUDA")
def test_cuda_accumulation_adds_the_bf16_product_in_fp32():
    from moba_train import fusions

    assert fusions.accumulation_mode(torch.device("cuda")) == "in_place"  # as on the H200 (torch 2.13)
    g = torch.Generator().manual_seed(3)
    x, dy = torch.randn(3, 50, 40, generator=g), torch.randn(3, 50, 24, generator=g)
    main = torch.randn(24, 40, generator=g)
    x16, dy16 = x.bfloat16(), dy.bfloat16()
    expected = main.double() + dy16.double().reshape(-1, 24).t() @ x16.double().reshape(-1, 40)
    out = main.cuda()
    fusions._wgrad_gemm_accum(x16.cuda(), dy16.cuda(), out)
    torch.testing.assert_close(out.cpu().double(), expected, rtol=1e-4, atol=1e-4)
