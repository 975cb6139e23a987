"""scripts/bench_train.py on CPU: two arms of the tiny recipe in one process, the JSON's rates consistent
with its own step times and with moba_train.flops, the speed-up against the `full` arm."""

import json
import subprocess
import sys
from pathlib import Path

from moba_train.config import load_config
from moba_train.flops import training_step_flops
from moba_train.model import matrix_params

ROOT = Path(__file__).resolve().parents[2]
COMMON = ["data.kind=synthetic", "train.seq_length=256", "train.global_batch_size=2", "logging.progress_bar=off"]


def test_two_arms_write_consistent_records(tmp_path):
    out = tmp_path / "train.json"
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench_train.py"), "--config", str(ROOT / "configs" / "tiny_moba.yaml"),
         *COMMON, "--arm", "moba:", "--arm", "full:attention.mode=full", "--warmup", "1", "--steps", "2",
         "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    arms = {r["name"]: r for r in json.loads(out.read_text())["arms"]}
    assert arms.keys() == {"moba", "full"}
    for name, r in arms.items():
        assert len(r["step_times"]) == 2 and len(r["losses"]) == 3
        assert abs(r["tokens_per_s"] - 512 / r["median_step_s"]) < 1e-6 * r["tokens_per_s"]
        cfg = load_config(ROOT / "configs" / "tiny_moba.yaml", [*COMMON, *r["overrides"][len(COMMON):]])
        flops = training_step_flops(matrix_params(cfg), [256, 256], cfg.layer_kinds(), 4, 32, 64, 3)
        assert abs(r["tflops_per_gpu"] - flops / r["median_step_s"] / 1e12) < 1e-9
    assert arms["full"]["layer_kinds"] == ["full"] * 3 and arms["moba"]["layer_kinds"] == ["moba", "moba", "full"]
    assert abs(arms["moba"]["speedup_vs_full"] - arms["moba"]["tokens_per_s"] / arms["full"]["tokens_per_s"]) < 1e-9
    # The README's table from the same JSON: one row per arm with the recipe's block and top-k and the rates.
    table = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_train.py"), "--table", str(out)],
                           capture_output=True, text=True, timeout=120)
    assert table.returncode == 0, table.stderr[-2000:]
    rows = [line for line in table.stdout.splitlines() if line.startswith("| ") and "---" not in line][1:]
    moba_row = next(r for r in rows if "| moba |" in r)
    assert "MoBA b64 top-3, 1 full" in moba_row and f"{arms['moba']['tokens_per_s']:,.0f}" in moba_row
    assert f"{arms['moba']['speedup_vs_full']:.2f}x" in moba_row and len(rows) == 2
    # Arms of one commit in two files (two processes of one device call): the MoBA-only file takes the other's
    # full arm as its reference; a file of another commit does not.
    run = json.loads(out.read_text())
    moba_only, full_only = tmp_path / "moba.json", tmp_path / "full.json"
    moba_arm = dict(run["arms"][0] if run["arms"][0]["name"] == "moba" else run["arms"][1])
    moba_arm.pop("speedup_vs_full")
    moba_only.write_text(json.dumps({**run, "arms": [moba_arm]}))
    full_only.write_text(json.dumps({**run, "arms": [arms["full"]]}))
    other = tmp_path / "other.json"
    other.write_text(json.dumps({**run, "meta": {**run["meta"], "commit": "0" * 40}, "arms": [arms["full"]]}))
    speedup = f"{arms['moba']['speedup_vs_full']:.2f}x"
    for files, expected in (([moba_only, full_only], speedup), ([moba_only, other], "")):
        table = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_train.py"), "--table", *map(str, files)],
                               capture_output=True, text=True, timeout=120)
        row = next(r for r in table.stdout.splitlines() if "| moba |" in r)
        assert row.split("|")[9].strip() == expected, row


def test_a_bad_arm_is_one_line_and_exit_2():
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench_train.py"), "--config", str(ROOT / "configs" / "tiny_moba.yaml"),
         "--arm", "nocolon"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.strip().startswith("error: --arm 'nocolon' is not NAME:OVERRIDES")


def test_the_breakdown_counts_kernels_only_not_the_profilers_annotation_ranges():
    """On CUDA the profiler also puts user annotations on the GPU timeline (`Optimizer.step#AdamW.step`
    spans the whole update): counted as a kernel it doubled the optimizer's time (10.8 of 23 ms at 32K) and,
    as a busy interval, hid the idle time inside it."""
    from types import SimpleNamespace

    import torch

    from moba_train.benchmarking import tally

    cuda = torch.autograd.DeviceType.CUDA

    def event(name, start, end, annotation=False):
        return SimpleNamespace(name=name, device_type=cuda, device_time=end - start, is_user_annotation=annotation,
                               time_range=SimpleNamespace(start=start, end=end))

    events = [
        event("nvjet_sm90_tst_128x256", 0.0, 300_000.0),
        event("multi_tensor_apply_kernel<FusedAdamMathFunctor>", 500_000.0, 600_000.0),
        event("multi_tensor_apply_kernel<FusedAdamMathFunctor>", 700_000.0, 750_000.0),
        event("Optimizer.step#AdamW.step", 400_000.0, 800_000.0, annotation=True),
        SimpleNamespace(name="aten::mm", device_type=torch.autograd.DeviceType.CPU, device_time=0.0,
                        is_user_annotation=False, time_range=SimpleNamespace(start=0.0, end=1.0)),
    ]
    seconds, top = tally(events, step_s=1.0)
    assert seconds["matmul"] == 0.3 and abs(seconds["optimizer"] - 0.15) < 1e-12
    assert abs(seconds["host_gaps"] - 0.55) < 1e-12  # 1 s minus 0.45 s of kernels
    assert [(k["kernel"], k["launches"]) for k in top] == [("nvjet_sm90_tst_128x256", 1),
                                                           ("multi_tensor_apply_kernel<FusedAdamMathFunctor>", 2)]


def test_gpu_idle_is_the_unprofiled_step_minus_the_union_of_kernel_intervals():
    """The profiled step runs slower on the host than the timed ones; only the timed step's length counts
    (the 32K full-attention arm reported 0.17 s of host gaps that were the profiler's own overhead: its
    kernels covered 1.917 s of a 1.921 s step)."""
    from moba_train.benchmarking import gpu_idle

    kernels_us = [(0.0, 400_000.0), (300_000.0, 900_000.0), (1_000_000.0, 1_500_000.0)]  # overlap counted once
    assert abs(gpu_idle(kernels_us, 1.6) - 0.2) < 1e-12  # 1.6 s minus 1.4 s busy
    assert gpu_idle(kernels_us, 1.3) == 0.0  # never negative
    assert abs(gpu_idle([], 0.5) - 0.5) < 1e-12  # no kernels (CPU): the whole step


# Kernel names from the committed H100 and H200 profiles (bench/results/train-*.json's top_kernels) and the kind of
# work each one is: the breakdown and the Amdahl bound read these categories.
PROFILED_KERNELS = [
    ("cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma_f16_knob_26_64x64x64_1x4x1_cga1x1x1_kernel0_0",
     "full_attention"),
    ("void cudnn::fusion::compute_dot_do_o_specialized<true, 64>(void const*, void const*, void*, void*, u",
     "full_attention"),
    ("void cudnn::fusion::convert_dq_to_16bits<true>(void const*, void*, unsigned int, unsigned int, unsig",
     "full_attention"),
    ("_dkdv_kernel", "moba_attention"),
    ("_pack_picks_kernel", "moba_attention"),
    ("void at_cuda_detail::cub::detail::radix_sort::DeviceRadixSortOnesweepKernel<at_cuda_detail::cub::det",
     "moba_attention"),
    ("liger_vocab_parallel_ce_backward_kernel", "loss"),
    ("liger_vocab_parallel_ce_forward_kernel", "loss"),
    ("void at::native::(anonymous namespace)::GammaBetaBackwardCUDAKernelTemplate<c10::BFloat16, float, 32",
     "norm_activation_rope"),
    ("triton_red_fused__to_copy_add_mean_mul_pow_rsqrt_0", "norm_activation_rope"),
    ("_rmsnorm_bwd_kernel", "norm_activation_rope"),
    ("_qkv_rope_kernel", "norm_activation_rope"),
    ("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<at::native::(anonymous namespace)::Fused",
     "optimizer"),
    ("nvjet_sm90_tss_128x256_64x4_2x1_v_badd_coopA_NTN", "matmul"),
]


def test_profiled_kernels_are_filed_under_the_work_they_do():
    from moba_train.benchmarking import kernel_category

    assert {name: kernel_category(name) for name, _ in PROFILED_KERNELS} == dict(PROFILED_KERNELS)


def _markdown_table():
    """scripts/bench_train.py's table function (a script, not a module of the package)."""
    import runpy

    return runpy.run_path(str(ROOT / "scripts/bench_train.py"))["markdown_table"]


def test_the_table_tells_runs_of_one_commit_apart_by_their_tokens_per_step():
    """Session 30 ran the same recipe at 2 x 32K and at 8 x 32K tokens per step at one commit: the table's rows must
    say which is which, read from each arm's tokens_per_step."""
    table = _markdown_table()
    for name, sequences in (("train-h200-c28849c-32k.json", 2), ("train-h200-c28849c-32k-gbs8.json", 8)):
        run = json.loads((ROOT / "bench/results" / name).read_text())
        full = next(a for a in run["arms"] if a["name"] == "full")
        row = next(line for line in table([run]).splitlines() if line.startswith("| c28849c | full |"))
        assert row.split(" | ")[2] == f"{sequences} x 32K", row
        assert f"{full['tokens_per_s']:,.0f}" in row


def test_a_file_of_moba_arms_takes_the_full_arm_of_its_own_batch():
    """A result file without a `full` arm is compared with the full arm of another file of the same commit and
    length, and of the same tokens per step: session 30's 2 x 32K and 8 x 32K files share a commit and a length."""
    table = _markdown_table()
    small, big = (json.loads((ROOT / "bench/results" / name).read_text())
                  for name in ("train-h200-c28849c-32k.json", "train-h200-c28849c-32k-gbs8.json"))
    full = next(a for a in small["arms"] if a["name"] == "full")
    moba = {k: v for k, v in next(a for a in small["arms"] if a["name"] == "moba512").items()
            if k != "speedup_vs_full"}
    alone = {"meta": small["meta"], "arms": [moba]}
    row = table([small, big, alone]).splitlines()[-1]
    assert row.startswith("| c28849c | moba512 | 2 x 32K |"), row
    assert row.split(" | ")[8] == f"{moba['tokens_per_s'] / full['tokens_per_s']:.2f}x", row
