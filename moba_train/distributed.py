"""torch.distributed + Megatron-Core parallel_state set-up and teardown, and seeding.

Works under torchrun (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT in the environment)
and as a plain single process (world size 1 on a free local port). gloo on CPU, nccl on CUDA.
"""

from __future__ import annotations

import os
import random
import socket
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel

from moba_train import platform
from moba_train.config import Config, ConfigError


@dataclass(frozen=True)
class DistEnv:
    """This process's place in the job. world_size = tp * pp * cp * dp."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str
    tp: int
    pp: int
    cp: int
    dp: int
    dp_rank: int

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that logs and writes shared files."""
        return self.rank == 0


def resolve_device(cfg: Config, local_rank: int = 0) -> torch.device:
    """The device `cfg.run.device` asks for: auto is CUDA when available, otherwise CPU."""
    want = cfg.run.device
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    if want == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("run.device is 'cuda' but no CUDA device is available; set run.device=cpu or auto")
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def check_world_size(cfg: Config, world_size: int) -> None:
    """ConfigError unless `world_size` processes hold whole model replicas (tensor x pipeline x context)."""
    par = cfg.parallel
    model_parallel = par.tensor * par.pipeline * par.context
    if world_size % model_parallel:
        raise ConfigError(
            f"world size {world_size} is not divisible by parallel.tensor x pipeline x context = {model_parallel}; "
            f"launch a multiple of {model_parallel} processes or change the parallel sizes"
        )


def init_distributed(cfg: Config) -> DistEnv:
    """Start torch.distributed and Megatron-Core's parallel state for `cfg.parallel`.

    Applies the CPU accommodations (moba_train.platform) when running on CPU. Call once per
    process; `destroy_distributed()` undoes it.
    """
    launched = "WORLD_SIZE" in os.environ
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    par = cfg.parallel
    check_world_size(cfg, world_size)
    device = resolve_device(cfg, local_rank)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    platform.apply_cpu_accommodations(device)
    if launched:
        dist.init_process_group(backend, rank=rank, world_size=world_size)
    else:
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=par.tensor,
        pipeline_model_parallel_size=par.pipeline,
        context_parallel_size=par.context,
    )
    return DistEnv(
        rank=rank,
        world_size=world_size,
        local_rank=local_rank,
        device=device,
        backend=backend,
        tp=par.tensor,
        pp=par.pipeline,
        cp=par.context,
        dp=parallel_state.get_data_parallel_world_size(),
        dp_rank=parallel_state.get_data_parallel_rank(),
    )


def destroy_distributed() -> None:
    """Tear down Megatron-Core's parallel state and the process group (safe to call twice)."""
    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def set_seed(seed: int) -> None:
    """Seed python, numpy, torch and Megatron's model-parallel RNG tracker.

    Tensor-parallel ranks get distinct tracker streams for partitioned weights (Megatron's
    `model_parallel_cuda_manual_seed`); on CPU the tracker runs on the CPU generator (platform.py).
    Needs `init_distributed` first.
    """
    seed = seed + 100 * parallel_state.get_pipeline_model_parallel_rank()
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed, force_reset_rng=True)
