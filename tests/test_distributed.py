"""Process-group and parallel-state set-up: single process without torchrun, and size validation."""

from __future__ import annotations

import pytest
import torch
from megatron.core import parallel_state

from moba_train import distributed
from moba_train.config import Config, ConfigError


def test_single_process_without_torchrun_is_a_world_of_one(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    cfg = Config()
    device = distributed.resolve_device(cfg)
    backend = "nccl" if device.type == "cuda" else "gloo"
    env = distributed.init_distributed(cfg)
    try:
        assert env == distributed.DistEnv(rank=0, world_size=1, local_rank=0, device=device,
                                          backend=backend, tp=1, pp=1, cp=1, dp=1, dp_rank=0)
        assert torch.distributed.get_backend() == backend
        assert parallel_state.get_tensor_model_parallel_world_size() == 1
    finally:
        distributed.destroy_distributed()
    assert not torch.distributed.is_initialized()


def test_world_size_not_divisible_by_model_parallel_size_is_a_config_error(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "0")
    cfg = Config.model_validate({"parallel": {"tensor": 2}})
    with pytest.raises(ConfigError, match="world size 3 is not divisible by .* = 2"):
        distributed.init_distributed(cfg)
    assert not torch.distributed.is_initialized()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error")
def test_asking_for_cuda_without_a_gpu_is_a_config_error():
    with pytest.raises(ConfigError, match="no CUDA device is available"):
        distributed.resolve_device(Config.model_validate({"run": {"device": "cuda"}}))
