"""The CPU accommodations: exactly the documented patches, none on CUDA, nowhere else in the package,
and Megatron's RNG tracker behaving on CPU as Megatron defines it."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moba_train import distributed, platform
from moba_train.config import Config

PACKAGE = Path(__file__).resolve().parents[1] / "moba_train"

_PROBE = """
import json, logging, torch
import megatron.core.tensor_parallel.random as mrandom
from moba_train import platform

def snapshot():
    values = {}
    modules = {"torch": torch, "torch.cuda": torch.cuda, "megatron.core.tensor_parallel.random": mrandom}
    for prefix, module in modules.items():
        values.update({f"{prefix}.{name}": value for name, value in vars(module).items()})
    values["logging:megatron.core.tensor_parallel.random.disabled"] = logging.getLogger(mrandom.__name__).disabled
    return values

def changed(before, after):
    keys = before.keys() | after.keys()
    return sorted(k for k in keys if before.get(k) is not after.get(k) and before.get(k) != after.get(k))

before = snapshot()
with platform.cuda_stand_in():
    stand_in_before_applying = torch.zeros(1).type()
platform.apply_cpu_accommodations(torch.device("cuda", 0))
on_cuda = changed(before, snapshot())
platform.apply_cpu_accommodations(torch.device("cpu"))
on_cpu = changed(before, snapshot())
again = snapshot()
platform.apply_cpu_accommodations(torch.device("cpu"))
print(json.dumps({"stand_in_before_applying": stand_in_before_applying, "on_cuda": on_cuda, "on_cpu": on_cpu,
                  "second_call": changed(again, snapshot()), "current_device": str(torch.cuda.current_device())}))
"""


def test_cpu_accommodations_patch_exactly_the_documented_targets_and_nothing_for_cuda():
    result = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, check=True)
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["stand_in_before_applying"] == "torch.FloatTensor"
    assert report["on_cuda"] == []
    assert report["on_cpu"] == sorted(platform.PATCHES)
    assert report["second_call"] == []
    assert report["current_device"] == "cpu"


def test_no_module_besides_platform_patches_torch_or_megatron():
    patching = re.compile(
        r"torch\.cuda\.\w+\s*=[^=]|setattr\(\s*(torch|megatron)|_(get|set)_cuda_rng_state|apply_cpu_accommodations"
        r"|TorchFunctionMode|TorchDispatchMode|megatron\.core\.\S+\s*=[^=]|rope_utils\.\w+\s*=[^=]"
        r"|layers\.\w+\s*=[^=]"
    )
    # The other writes into Megatron-Core, on every device, each filling a hook an optional package fills when
    # installed (moba_train/fusions.py): the fused-RoPE hooks (Transformer Engine's; install_rope) and the
    # weight-gradient accumulation kernel (Apex's fused_weight_gradient_mlp_cuda; install_grad_accumulation).
    hooks = {"rope_utils.fused_apply_rotary_pos_emb = _fused_rope",
             "rope_utils.fused_apply_rotary_pos_emb_thd = _fused_rope_thd",
             "layers.fused_weight_gradient_mlp_cuda = _ApexWgrad"}
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "platform.py":
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            applies = (path.name == "distributed.py" and "platform.apply_cpu_accommodations" in line) or (
                path.name == "fusions.py" and line.strip() in hooks)
            if patching.search(line) and not applies:
                offenders.append(f"{path.relative_to(PACKAGE.parent)}:{number}: {line.strip()}")
    assert offenders == [], "CPU accommodations belong in moba_train/platform.py (optimizer: platform.cuda_stand_in())"
    calls = (PACKAGE / "distributed.py").read_text().count("platform.apply_cpu_accommodations(device)")
    assert calls == 1, "init_distributed is the one place that applies the accommodations"


on_cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU accommodations")


@on_cpu_only
def test_rng_tracker_on_cpu_follows_megatron_seeding():
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    distributed.init_distributed(Config())
    try:
        assert platform.cpu_accommodations_applied()
        draws = []
        for _ in range(2):
            distributed.set_seed(5)
            with get_cuda_rng_tracker().fork():
                model_parallel = torch.randn(8)
            draws.append((model_parallel, torch.randn(8)))
        # Megatron seeds the model-parallel stream with seed + 2718 + tp_rank, the default one with seed.
        torch.manual_seed(5 + 2718)
        expected_model_parallel = torch.randn(8)
        torch.manual_seed(5)
        expected_default = torch.randn(8)
        for model_parallel, default in draws:
            torch.testing.assert_close(model_parallel, expected_model_parallel, rtol=0, atol=0)
            torch.testing.assert_close(default, expected_default, rtol=0, atol=0)
    finally:
        distributed.destroy_distributed()


@on_cpu_only
def test_cuda_stand_in_moves_cuda_factories_to_the_cpu_only_inside_the_context():
    distributed.init_distributed(Config())
    try:
        with platform.cuda_stand_in():
            flags = torch.zeros(3, dtype=torch.int32, device="cuda")
            grad_type = torch.ones(2).type()
        assert flags.device.type == "cpu" and flags.dtype == torch.int32
        assert grad_type == "torch.cuda.FloatTensor"
        assert torch.ones(2).type() == "torch.FloatTensor"
    finally:
        distributed.destroy_distributed()
