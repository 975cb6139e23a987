"""The kernels compiled for sm_90 (H100 / H200) on a machine without a GPU: scripts/compile_kernels.py over
moba_train/kernel_compile.py. The launches are recorded under the interpreter; the compile runs Triton's own
compiler and ptxas, as a device call would."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
COMPILED = dict(os.environ, TRITON_INTERPRET="0")  # this process's kernels are interpreted: compile elsewhere


def test_the_recipes_kernels_compile_for_sm90(tmp_path):
    """The 32K recipe's attention (head dim 64, GQA 4, block 512: packed dK/dV over 256-key tiles, the workspace
    passes), a block of one key tile (the dK/dV programs write the current block's dQ; runs of picks in the
    forward) and the standard shapes' head dim 128: every launch of their forward and backward builds."""
    out = tmp_path / "compiled.json"
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "compile_kernels.py"), "--jobs", "2", "--json",
                           str(out), "--workloads", "d64_b512_gqa4,d64_b64_shared,d128_b128"],
                          env=COMPILED, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads(out.read_text())["launches"]
    assert all(r["ok"] and r["registers"] > 0 for r in results)
    kernels = {r["launch"]["kernel"] for r in results}
    assert kernels >= {"_block_mean_kernel", "_gate_topk_kernel", "_pick_keys_kernel", "_current_block_fwd_kernel",
                       "_past_slot_fwd_kernel", "_past_run_fwd_kernel", "_delta_kernel", "_pack_picks_kernel",
                       "_dkdv_kernel", "_dkdv_reduce_kernel", "_current_block_dq_kernel", "_dq_merge_kernel"}
    packed = [r["launch"]["constexprs"] for r in results if r["launch"]["kernel"] == "_dkdv_kernel"
              and r["launch"]["constexprs"]["PACKED"]]
    assert packed and packed[0]["BLOCK_N"] == 256 and packed[0]["HEAD_DIM"] == 64
    # its main loop keeps everything in registers (the dQ partials as dS K; as (K^T dS^T)^T it spilled there: 33
    # spill instructions with Triton 3.6, 12 with 3.9, and was 2-3% slower on an H100; bench/NOTES.md, session 20)
    recipe_dkdv = next(r for r in results if r["launch"]["kernel"] == "_dkdv_kernel"
                       and r["launch"]["constexprs"]["PACKED"])
    assert recipe_dkdv["loop_spills"] == 0, recipe_dkdv
    # compiled as the GPU's launcher specialises it: its 16-byte-aligned pointers and strides carry the hint
    dkdv = next(r["launch"] for r in results if r["launch"]["kernel"] == "_dkdv_kernel")
    assert {"q_ptr", "k_ptr", "v_ptr", "dk_ptr", "stride_qh"} <= set(dkdv["divisible"])
    assert f"{len(results)} of {len(results)} launches compile for sm_90" in done.stdout


def test_a_launch_that_does_not_compile_is_reported_with_the_compilers_error(tmp_path):
    """A recorded launch with one constexpr made invalid (RoPE's half width not a power of two: tl.arange
    rejects it when it builds the kernel) comes back not ok, with the compiler's message."""
    script = """
import json, sys
from dataclasses import replace
from moba_train import kernel_compile
launch = kernel_compile.record_in_child(["rope"])[0]
good = kernel_compile.compile_launch(launch)
bad = kernel_compile.compile_launch(replace(launch, constexprs=dict(launch.constexprs, HALF=24)))
print(json.dumps([good.ok, bad.ok, bad.error]))
"""
    done = subprocess.run([sys.executable, "-c", script], env=COMPILED, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    good, bad, error = json.loads(done.stdout.splitlines()[-1])
    assert good and not bad
    assert "power of 2" in error


def test_an_unknown_workload_or_variant_or_a_missing_gpu_is_one_clear_line():
    for flags, message in ((["--workloads", "d64_b999"], "unknown workload 'd64_b999'"),
                           (["--workloads", "rope", "--jobs", "0"], "argument --jobs: 0 is not a positive number"),
                           (["--workloads", "rope", "--variant", "d64_nope"], "no variant 'd64_nope'"),
                           *([(["--workloads", "rope", "--against-gpu"], "needs a CUDA device")]
                             if not torch.cuda.is_available() else [])):
        done = subprocess.run([sys.executable, str(ROOT / "scripts" / "compile_kernels.py"), *flags],
                              env=COMPILED, capture_output=True, text=True, timeout=300)
        assert done.returncode == 2 and "Traceback" not in done.stderr
        lines = done.stderr.strip().splitlines()
        assert message in lines[-1]
        assert len(lines) == 1 or lines[0].startswith("usage: ")  # argparse's errors follow its usage


def test_loop_spills_counts_local_loads_and_stores_inside_loops_only():
    """A spill before the loop and a reload after it cost once; the two inside the loop (a backward branch's
    target to the branch, the predicated one too) cost every iteration."""
    from moba_train.kernel_compile import loop_spills

    sass = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;         /* 0x00000a0000017a02 */
        /*0010*/                   STL [R1+0x4], R2 ;             /* 0x0000040201007387 */
        /*0020*/                   LDL.LU R3, [R1+0x4] ;          /* 0x0000040001037983 */
        /*0030*/                   HGMMA.64x32x16.F32.BF16 R24, gdesc[UR4], RZ ;  /* 0x0000000004187df0 */
        /*0040*/               @P1 STL [R1+0x8], R3 ;             /* 0x0000080301001387 */
        /*0050*/               @P0 BRA 0x20 ;                     /* 0xfffffffc00f00947 */
        /*0060*/                   LDL R4, [R1+0x8] ;             /* 0x0000080001047983 */
        /*0070*/               @!P2 BRA 0x90 ;                    /* 0x0000000000082947 */
        /*0080*/                   STL [R1+0xc], R4 ;             /* 0x00000c0401007387 */
        /*0090*/                   EXIT ;                         /* 0x000000000000794d */
    """
    assert loop_spills(sass) == 2
