"""Every accommodation that lets Megatron-Core 0.16.1 run on a CPU, in one place.

Megatron-Core assumes CUDA in a few places that CPU runs (tests, CI, the demo) reach. On CPU,
`apply_cpu_accommodations(device)` replaces exactly the attributes listed in `PATCHES`; on CUDA it
does nothing. Every other module runs the same code on both devices: nothing else under
`moba_train/` patches torch or Megatron (tests/test_platform.py checks this), except that
`fusions.install_rope` fills Megatron-Core's fused-RoPE hooks, which Transformer Engine fills when installed
(model.fusions.rope=compile or triton), and `fusions.install_grad_accumulation` fills its slot for Apex's
weight-gradient accumulation kernel (model.fusions.grad_accumulation=fused), on every device.

What is patched on CPU, and why:
- `torch.cuda.current_device` -> "cpu": Megatron allocates parameters, buffers and RoPE tables on
  `torch.cuda.current_device()`; with "cpu" they land on the CPU.
- `torch.cuda.synchronize` -> no-op: parallel_state and dist_checkpointing synchronise the device.
- `torch.cuda.get_rng_state`, `torch.cuda.manual_seed`, and Megatron's
  `tensor_parallel.random._get_cuda_rng_state` / `_set_cuda_rng_state` -> the CPU generator's: the
  model-parallel RNG tracker (`model_parallel_cuda_manual_seed`, tensor-parallel weight init,
  dropout) keeps CUDA generator states. On CPU the "device generator" is the CPU generator, so the
  tracker's named states (data-parallel, model-parallel, expert) are CPU generator states.
- the `megatron.core.tensor_parallel.random` logger -> disabled: its tracker warns "CPU RNG state
  changed within GPU RNG context" on every fork, which is expected when the device RNG is the CPU's.

One scoped accommodation, `cuda_stand_in()`, is a context manager rather than a patch: Megatron's
optimizer (FP32Optimizer, DistributedOptimizer, clip_grads) allocates with `device="cuda"` and
asserts `grad.type() == "torch.cuda.FloatTensor"`. Inside the context, on CPU only, such factories
get the CPU and `Tensor.type()` reports the CUDA name; wrap exactly the Megatron calls that need it.
"""

from __future__ import annotations

import contextlib
import importlib
import logging

import torch
from torch.overrides import TorchFunctionMode

PATCHES = (
    "torch.cuda.current_device",
    "torch.cuda.synchronize",
    "torch.cuda.get_rng_state",
    "torch.cuda.manual_seed",
    "megatron.core.tensor_parallel.random._get_cuda_rng_state",
    "megatron.core.tensor_parallel.random._set_cuda_rng_state",
    "logging:megatron.core.tensor_parallel.random.disabled",
)
"""The exact targets `apply_cpu_accommodations` changes on CPU (the `logging:` one is a logger's attribute)."""

_applied = False


def _cpu_device() -> str:
    return "cpu"


def _no_sync(device=None) -> None:
    return None


def _cpu_rng_state(*args, **kwargs) -> torch.Tensor:
    return torch.get_rng_state()


def _set_cpu_rng_state(new_state: torch.Tensor, *args, **kwargs) -> None:
    torch.set_rng_state(new_state)


def _cpu_manual_seed(seed: int) -> None:
    torch.manual_seed(seed)


_REPLACEMENTS = {
    "torch.cuda.current_device": _cpu_device,
    "torch.cuda.synchronize": _no_sync,
    "torch.cuda.get_rng_state": _cpu_rng_state,
    "torch.cuda.manual_seed": _cpu_manual_seed,
    "megatron.core.tensor_parallel.random._get_cuda_rng_state": _cpu_rng_state,
    "megatron.core.tensor_parallel.random._set_cuda_rng_state": _set_cpu_rng_state,
    "logging:megatron.core.tensor_parallel.random.disabled": True,
}
assert tuple(_REPLACEMENTS) == PATCHES


def resolve_target(target: str) -> tuple[object, str]:
    """The (owner object, attribute name) a `PATCHES` entry names."""
    path, _, attr = target.rpartition(".")
    if path.startswith("logging:"):
        return logging.getLogger(path.removeprefix("logging:")), attr
    return importlib.import_module(path), attr


def apply_cpu_accommodations(device: torch.device) -> None:
    """Patch `PATCHES` when `device` is the CPU; a no-op on CUDA. Idempotent."""
    global _applied
    if device.type != "cpu" or _applied:
        return
    for target, replacement in _REPLACEMENTS.items():
        owner, attr = resolve_target(target)
        setattr(owner, attr, replacement)
    _applied = True


def cpu_accommodations_applied() -> bool:
    """Whether this process runs with the CPU accommodations."""
    return _applied


class _CudaStandIn(TorchFunctionMode):
    """device="cuda" factories -> CPU; Tensor.type() -> "torch.cuda.<Type>" (see module docstring)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        device = kwargs.get("device")
        if device is not None and torch.device(device).type == "cuda":
            kwargs["device"] = "cpu"
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            return func(*args).replace("torch.", "torch.cuda.", 1)
        return func(*args, **kwargs)


@contextlib.contextmanager
def cuda_stand_in():
    """Run CUDA-assuming Megatron code (its optimizer) on CPU; a no-op unless the accommodations are applied."""
    if not _applied:
        yield
        return
    with _CudaStandIn():
        yield
